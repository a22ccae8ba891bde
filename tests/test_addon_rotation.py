"""fp_addon: a rotated key file or webhook secret file is taken without a restart
(``fp_secrets_reload``)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import secrets
import signal
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from mitmproxy import exceptions
from mitmproxy.test import taddons

import fp_addon
from fp_core import rotation as rotation_module
from fp_core.keys import DecryptionKey
from fp_core.webhook import SECRET_ENV_VAR, WebhookSecret
from fp_core.worker import WorkerClient
from tests.e2e.conftest import secret_forms
from tests.test_addon import KEY, fp_body, make_flow, run
from tests.test_addon_worker import Gate, annotated, on_loop, started, until

NEW = DecryptionKey.generate()


def rotate(path: Path, *lines: str) -> None:
    path.write_text("".join(line + "\n" for line in lines))
    path.chmod(0o600)


def verdict_for(tap: fp_addon.FingerprintTap, key: DecryptionKey) -> str:
    flow = run(tap, make_flow(fp_body(key=key)[0]))
    record = flow.metadata["fp"]
    return str(record["verdict"] if record["ok"] else record["error"]["kind"])


async def rotate_and_kill(
    tap: fp_addon.FingerprintTap, path: Path, *lines: str, ran: float = 0
) -> WorkerClient:
    """Let the tap's worker run ``ran`` seconds, rewrite the file at ``path`` (keys or a
    webhook secret) with ``lines``, and kill the worker (which this process has not seen
    take the file); the worker."""
    worker = tap.worker
    assert worker is not None
    assert worker.proc is not None
    await asyncio.sleep(ran)
    rotate(path, *lines)
    os.kill(worker.proc.pid, signal.SIGKILL)
    return worker


def messages(caplog: pytest.LogCaptureFixture, text: str) -> list[str]:
    return [r.getMessage() for r in caplog.records if text in r.getMessage()]


def no_key_in(text: str) -> None:
    for key in (KEY, NEW):
        for form in secret_forms(key.raw()):
            assert form.decode("latin-1") not in text


def test_a_rotated_key_file_is_used_from_the_next_check(keyfile: Path, caplog) -> None:
    caplog.set_level(logging.INFO)
    tap = fp_addon.FingerprintTap()
    with taddons.context(tap) as tctx:
        tctx.configure(tap, fp_keys_file=str(keyfile), fp_worker=False)
        assert verdict_for(tap, NEW) == "decrypt_failed"
        assert asyncio.run(tap.reload_files()) == [], "unchanged"

        rotate(keyfile, NEW.to_base64(), KEY.to_base64())
        assert asyncio.run(tap.reload_files()) == ["keys"]
        assert verdict_for(tap, NEW) == "trusted"
        assert verdict_for(tap, KEY) == "trusted", "the old key still works"
        assert asyncio.run(tap.reload_files()) == [], "taken"

        stats = json.loads(tap.stats_command())
        assert stats["reloaded"] == {"keys": 1}
        assert "keys_reload" not in stats["errors"]
        tap.done()
    assert messages(caplog, "changed:") == [
        f"fp-tap: key file {keyfile} changed: 2 decryption key(s): {NEW.key_id}, {KEY.key_id}"
    ]
    no_key_in(caplog.text)


def test_a_file_being_written_keeps_the_keys_in_use(keyfile: Path, caplog) -> None:
    tap = fp_addon.FingerprintTap()
    with taddons.context(tap) as tctx:
        tctx.configure(tap, fp_keys_file=str(keyfile), fp_worker=False)
        rotate(keyfile, NEW.to_base64()[:30])
        assert asyncio.run(tap.reload_files()) == []
        assert asyncio.run(tap.reload_files()) == []
        assert verdict_for(tap, KEY) == "trusted", "the key in use stays"
        assert json.loads(tap.stats_command())["errors"] == {"keys_reload": 1}

        rotate(keyfile, NEW.to_base64())
        assert asyncio.run(tap.reload_files()) == ["keys"]
        assert verdict_for(tap, NEW) == "trusted"
        assert verdict_for(tap, KEY) == "decrypt_failed", "the file no longer has it"
        tap.done()
    assert messages(caplog, "keeping") == [
        f"fp-tap: key file {keyfile} line 1: decodes to 22 bytes, an AES-256 key is 32; "
        "keeping the 1 key(s) in use"
    ]
    no_key_in(caplog.text)


def test_a_bad_content_back_after_the_good_one_is_news_again_after_a_handover(
    keyfile: Path, caplog
) -> None:
    """The watches this process hands a new pipeline (fp_worker switched, a dead worker)
    carry what its checks learnt, the file being back as it was included: the same
    half-written content later is warned about and counted again."""
    tap = fp_addon.FingerprintTap()
    with taddons.context(tap) as tctx:
        tctx.configure(tap, fp_keys_file=str(keyfile), fp_worker=False)
        half = NEW.to_base64()[:30]
        rotate(keyfile, half)
        assert asyncio.run(tap.reload_files()) == []
        rotate(keyfile, KEY.to_base64())  # back as it was (the same bytes)
        assert asyncio.run(tap.reload_files()) == []
        tctx.configure(tap, fp_worker=False)  # a new pipeline, from this process's watches
        rotate(keyfile, half)  # caught half-written again
        assert asyncio.run(tap.reload_files()) == []
        assert verdict_for(tap, KEY) == "trusted"
        errors = json.loads(tap.stats_command())["errors"]
        tap.done()
    assert len(messages(caplog, "keeping")) == 2
    assert errors == {"keys_reload": 2}


@on_loop
async def test_switching_the_worker_on_after_a_whole_rotation_starts_one(keyfile: Path) -> None:
    """This process's own check may lag (fp_secrets_reload, or 0: never): the worker gets
    the ids of what the file holds now, as a dead worker's successor does."""
    tap = fp_addon.FingerprintTap()
    with taddons.context(tap) as tctx:
        tctx.configure(
            tap, fp_keys_file=str(keyfile), fp_worker=False, fp_secrets_reload=0, fp_hold=True
        )
        await started(tap)
        rotate(keyfile, NEW.to_base64(), KEY.to_base64())  # a finished rotation
        tctx.configure(tap, fp_worker=True)
        assert tap.worker is not None
        flow = make_flow(fp_body(key=NEW)[0])
        await annotated(tap, flow)
        assert flow.metadata["fp"]["verdict"] == "trusted", "unsealed with the new key"
        tap.done()


def test_new_keys_are_scrubbed_from_log_lines(keyfile: Path, caplog) -> None:
    tap = fp_addon.FingerprintTap()
    with taddons.context(tap) as tctx:
        tctx.configure(tap, fp_keys_file=str(keyfile), fp_worker=False)
        rotate(keyfile, NEW.to_base64())
        assert asyncio.run(tap.reload_files()) == ["keys"]
        logging.getLogger("fp_addon").warning("leak? %s", NEW.to_base64())
        tap.done()
    no_key_in(caplog.text)


def test_an_option_change_during_a_check_wins(keyfile: Path, tmp_path: Path) -> None:
    """A check still reading the old file when fp_keys_file is set to another must not
    bring the old file's keys back."""
    other = tmp_path / "other.txt"
    rotate(other, NEW.to_base64())
    tap = fp_addon.FingerprintTap()
    with taddons.context(tap) as tctx:
        tctx.configure(tap, fp_keys_file=str(keyfile), fp_worker=False)
        rotate(keyfile, KEY.to_base64(), "# changed")

        async def check_while_the_option_changes() -> list[str]:
            checking = asyncio.ensure_future(tap.reload_files())
            await asyncio.sleep(0)  # the check is off to its thread
            tctx.configure(tap, fp_keys_file=str(other))
            return await checking

        assert asyncio.run(check_while_the_option_changes()) == []
        assert [k.key_id for k in tap.keys] == [NEW.key_id]
        assert verdict_for(tap, NEW) == "trusted"
        tap.done()


@pytest.mark.parametrize("option", ["fp_secrets_reload", "fp_stats_every"])
def test_a_negative_interval_is_an_option_error(keyfile: Path, option: str) -> None:
    tap = fp_addon.FingerprintTap()
    with taddons.context(tap) as tctx, pytest.raises(exceptions.OptionsError, match=option):
        tctx.configure(tap, fp_keys_file=str(keyfile), **{option: -1})


@on_loop
async def test_the_worker_takes_the_new_keys(keyfile: Path, caplog) -> None:
    tap = fp_addon.FingerprintTap()
    with taddons.context(tap) as tctx:
        tctx.configure(tap, fp_keys_file=str(keyfile), fp_hold=True, fp_secrets_reload=1)
        await started(tap)
        assert tap.worker is not None
        flow = make_flow(fp_body(key=NEW)[0])
        await annotated(tap, flow)
        assert flow.metadata["fp"]["error"]["kind"] == "decrypt_failed"

        rotate(keyfile, NEW.to_base64()[:30])  # half-written
        assert await tap.reload_files() == []
        await until(lambda: tap.snapshot().get("errors", {}).get("keys_reload") == 1, "the refusal")
        await asyncio.sleep(1.5)  # the worker's next check, and this process's again
        assert await tap.reload_files() == []

        rotate(keyfile, NEW.to_base64())
        assert await tap.reload_files() == [], "the worker checks on its own"
        assert [k.key_id for k in tap.keys] == [NEW.key_id], "this process's own copy"
        await until(lambda: tap.snapshot().get("reloaded") == {"keys": 1}, "the worker's reload")
        flow = make_flow(fp_body(key=NEW)[0])
        await annotated(tap, flow)
        assert flow.metadata["fp"]["verdict"] == "trusted"
        assert flow.metadata["fp"]["key_id"] == NEW.key_id
        tap.done()
    assert json.loads(tap.stats_command())["errors"] == {"decrypt_failed": 1, "keys_reload": 1}
    assert len(messages(caplog, "keeping")) == 1, "one warning, from the worker"


@on_loop
async def test_the_watch_checks_every_interval_and_never_at_zero(
    keyfile: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(fp_addon, "TICK", 0.02)
    tap = fp_addon.FingerprintTap()
    with taddons.context(tap) as tctx:
        tctx.configure(tap, fp_keys_file=str(keyfile), fp_worker=False, fp_secrets_reload=0)
        tap.running()
        task = tap._ticker
        tap.running()
        assert tap._ticker is task, "one watch"
        rotate(keyfile, NEW.to_base64())
        await asyncio.sleep(0.5)  # 25 ticks
        assert tap.stats.group("reloaded") == {}, "0: never checks"

        tctx.configure(tap, fp_secrets_reload=1)  # 50 ticks
        await until(lambda: tap.stats.group("reloaded") == {"keys": 1}, "the reload")
        assert [k.key_id for k in tap.keys] == [NEW.key_id]
        tap.done()
        assert tap._ticker is not None
        await asyncio.sleep(0)
        assert tap._ticker.cancelled(), "done() stops the watch"


@contextlib.contextmanager
def webhook_addon(
    keyfile: Path, secret_file: Path, secret: str, **options: Any
) -> Iterator[tuple[fp_addon.FingerprintTap, taddons.context]]:
    """The addon (in-process unless ``options`` say otherwise), with a webhook nobody
    answers (events wait in the spool) signed with ``secret``, written into
    ``secret_file``."""
    rotate(secret_file, secret)
    tap = fp_addon.FingerprintTap()
    with taddons.context(tap) as tctx:
        tctx.configure(
            tap,
            **{
                "fp_keys_file": str(keyfile),
                "fp_worker": False,
                "fp_webhook_url": "http://127.0.0.1:9/hook",
                "fp_webhook_secret_file": str(secret_file),
                "fp_state_dir": str(secret_file.parent / "state"),
                **options,
            },
        )
        yield tap, tctx


def test_a_rotated_webhook_secret_signs_in_process(
    keyfile: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog
) -> None:
    caplog.set_level(logging.INFO)
    monkeypatch.delenv(SECRET_ENV_VAR, raising=False)
    old, new = secrets.token_urlsafe(24), secrets.token_urlsafe(24)
    path = tmp_path / "webhook.secret"
    with webhook_addon(keyfile, path, old) as (tap, _):
        delivery = tap.delivery
        assert delivery is not None
        assert delivery.config.secret is not None
        assert delivery.config.secret.text() == old

        rotate(path, "")  # caught while being written
        assert asyncio.run(tap.reload_files()) == []
        assert delivery.config.secret.text() == old, "the secret in use stays"
        rotate(path, new)
        assert asyncio.run(tap.reload_files()) == ["webhook_secret"]
        assert tap.delivery is delivery, "the same delivery and spool"
        assert delivery.config.secret is not None
        assert delivery.config.secret.text() == new
        logging.getLogger("fp_addon").warning("leak? %s", new)
        assert json.loads(tap.stats_command())["errors"] == {"webhook_secret_reload": 1}
        tap.done()
    assert messages(caplog, "keeping the secret in use") == [
        f"fp-tap: webhook secret file {path} is empty; keeping the secret in use"
    ]
    assert messages(caplog, "secret file") == [
        f"fp-tap: webhook secret file {path} is empty; keeping the secret in use",
        f"fp-tap: webhook secret file {path} changed: its secret signs from now on",
    ]
    assert old not in caplog.text
    assert new not in caplog.text


def test_the_secret_watch_follows_the_options(keyfile: Path, tmp_path: Path, monkeypatch) -> None:
    """Watched only while a webhook uses the file: no webhook, nothing to reload."""
    monkeypatch.delenv(SECRET_ENV_VAR, raising=False)
    path = tmp_path / "webhook.secret"
    with webhook_addon(keyfile, path, "first") as (tap, tctx):
        tctx.configure(tap, fp_webhook_url=None)
        rotate(path, "second")
        assert asyncio.run(tap.reload_files()) == []
        tap.done()


# -- pipelines made while a file is being rewritten ---------------------------------------


def test_a_pipeline_made_while_the_files_are_refused_keeps_what_is_in_use(
    keyfile: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Switching fp_worker (here: a new in-process pipeline) while both files are caught
    half-written: the new pipeline takes the keys and the secret in use from this
    process, without reading the files."""
    monkeypatch.delenv(SECRET_ENV_VAR, raising=False)
    path = tmp_path / "webhook.secret"
    with webhook_addon(keyfile, path, "secret-in-use", fp_worker=True) as (tap, tctx):
        worker = tap.worker
        assert worker is not None
        rotate(keyfile, NEW.to_base64()[:30])
        rotate(path, "")
        assert asyncio.run(tap.reload_files()) == []
        tctx.configure(tap, fp_worker=False)  # a new pipeline in this process
        assert tap.worker is None
        assert tap.pipeline is not None
        assert verdict_for(tap, KEY) == "trusted", "the keys in use"
        delivery = tap.delivery
        assert delivery is not None
        assert delivery.config.secret is not None
        assert delivery.config.secret.text() == "secret-in-use"
        assert asyncio.run(tap.reload_files()) == [], "refused once, not again"
        rotate(keyfile, NEW.to_base64())
        rotate(path, "next-secret")
        assert sorted(asyncio.run(tap.reload_files())) == ["keys", "webhook_secret"]
        assert verdict_for(tap, NEW) == "trusted"
        assert delivery.config.secret.text() == "next-secret"
        tap.done()


@on_loop
async def test_a_worker_that_refuses_its_first_options_leaves_the_work_in_process(
    keyfile: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The worker starts with mitmproxy (no outputs); the key file changed since this
    process read it. The worker would unseal with other keys, or none: it refuses, and
    the work stays in this process, with the keys in use."""
    tap = fp_addon.FingerprintTap()
    with taddons.context(tap) as tctx:
        tctx.configure(tap, fp_keys_file=str(keyfile), fp_hold=True)
        rotate(keyfile, NEW.to_base64()[:30])
        await started(tap)
        assert tap.worker is None
        assert tap.pipeline is not None
        assert verdict_for(tap, KEY) == "trusted"
        tap.done()
    refusal = "line 1: decodes to 22 bytes, an AES-256 key is 32; unsealing in mitmproxy's"
    assert refusal in caplog.text


@on_loop
async def test_a_key_file_rotated_before_the_first_worker_starts_is_reported(
    keyfile: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A whole new key file between mitmproxy's options and its running hook (at start,
    or a script reload): the worker, started off the event loop, refuses keys this
    process did not read; the in-process pipeline that takes over then takes the new
    key as a rotation, logged with its id and counted. Never used unannounced."""
    caplog.set_level(logging.INFO, logger="fp_addon")
    tap = fp_addon.FingerprintTap()
    with taddons.context(tap) as tctx:
        tctx.configure(tap, fp_keys_file=str(keyfile), fp_hold=True)
        rotate(keyfile, NEW.to_base64())
        await started(tap)
        assert tap.worker is None, "refused: it reads keys this process did not"
        assert "changed while being read" in caplog.text
        assert verdict_for(tap, KEY) == "trusted", "the keys in use, until the check"
        assert await tap.reload_files() == ["keys"]
        assert verdict_for(tap, NEW) == "trusted"
        assert json.loads(tap.stats_command())["reloaded"] == {"keys": 1}
        tap.done()
    assert f"1 decryption key(s): {NEW.key_id}" in caplog.text


@on_loop
async def test_a_dead_worker_hands_over_the_keys_in_use(keyfile: Path) -> None:
    """After the worker died, the in-process pipeline takes this process's keys: the
    file, half-written right now, is not read on the event loop."""
    tap = fp_addon.FingerprintTap()
    with taddons.context(tap) as tctx:
        tctx.configure(tap, fp_keys_file=str(keyfile), fp_hold=True)
        await started(tap)
        await rotate_and_kill(tap, keyfile, NEW.to_base64()[:30])
        await until(lambda: tap.pipeline is not None, "the switch to in-process work")
        assert verdict_for(tap, KEY) == "trusted"
        tap.done()


@on_loop
async def test_a_restarted_worker_that_cannot_read_the_key_file_gives_way_to_the_keys_in_use(
    keyfile: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The dead worker's successor finds the key file caught half-written (and this
    process has not checked it: fp_secrets_reload=0): it cannot start with it, and the
    work goes on in this process with the keys in use."""
    tap = fp_addon.FingerprintTap()
    with taddons.context(tap) as tctx:
        tctx.configure(tap, fp_keys_file=str(keyfile), fp_worker_restart=1, fp_secrets_reload=0)
        await started(tap)
        await rotate_and_kill(tap, keyfile, NEW.to_base64()[:30], ran=1.1)
        await until(lambda: tap.pipeline is not None, "the switch to in-process work")
        assert tap.worker is None
        assert verdict_for(tap, KEY) == "trusted", "the keys this process read"
        tap.done()
    assert "starting a new one" in caplog.text
    assert "line 1: decodes to 22 bytes, an AES-256 key is 32; unsealing in" in caplog.text
    no_key_in(caplog.text)


@on_loop
async def test_switching_the_worker_on_while_the_key_file_is_refused_is_refused(
    keyfile: Path,
) -> None:
    """The new worker would read other keys than this process has: the option change is
    refused, and mitmproxy's rollback puts the work back in this process, with the keys
    in use."""
    tap = fp_addon.FingerprintTap()
    with taddons.context(tap) as tctx:
        tctx.configure(tap, fp_keys_file=str(keyfile), fp_worker=False)
        await started(tap)
        rotate(keyfile, NEW.to_base64()[:30])
        assert await tap.reload_files() == []
        with pytest.raises(exceptions.OptionsError, match="line 1: decodes to 22 bytes"):
            tctx.configure(tap, fp_worker=True)
        assert tctx.options.fp_worker is False, "rolled back"
        assert tap.worker is None
        assert tap.pipeline is not None
        assert verdict_for(tap, KEY) == "trusted"
        tap.done()


def test_an_in_process_pipeline_takes_a_new_secret_file_from_the_addon(
    keyfile: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """fp_webhook_secret_file set to another file: the addon reads it (to mask it), and
    its pipeline takes that secret rather than reading the file again on the loop."""
    monkeypatch.delenv(SECRET_ENV_VAR, raising=False)
    other = tmp_path / "other.secret"
    rotate(other, "other-secret")
    with webhook_addon(keyfile, tmp_path / "webhook.secret", "first") as (tap, tctx):
        read: list[str] = []
        watch_file = rotation_module.secret_file_watch

        def counted(path: str) -> rotation_module.FileWatch[WebhookSecret]:
            read.append(path)
            return watch_file(path)

        monkeypatch.setattr(rotation_module, "secret_file_watch", counted)
        tctx.configure(tap, fp_webhook_secret_file=str(other))
        assert tap.delivery is not None
        assert tap.delivery.config.secret is not None
        assert tap.delivery.config.secret.text() == "other-secret"
        tctx.configure(tap, fp_worker=False)  # a new pipeline: the same
        assert tap.delivery.config.secret.text() == "other-secret"
        tap.done()
    assert read == [str(other)], "read once, by the addon"


def test_another_webhook_option_keeps_the_secret_watched(
    keyfile: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog
) -> None:
    """The secret file caught half-written while another webhook option changes: the
    secret in use stays, here as in the pipeline, and the next one is masked too."""
    monkeypatch.delenv(SECRET_ENV_VAR, raising=False)
    new = secrets.token_urlsafe(24)
    path = tmp_path / "webhook.secret"
    with webhook_addon(keyfile, path, "secret-in-use") as (tap, tctx):
        rotate(path, "")
        tctx.configure(tap, fp_webhook_timeout=7)
        assert tap.secret is not None
        assert tap.secret.text() == "secret-in-use"
        rotate(path, new)
        tctx.configure(tap, fp_webhook_timeout=8)
        assert tap.secret.text() == "secret-in-use", "not taken in passing: the watch's"
        assert asyncio.run(tap.reload_files()) == ["webhook_secret"]
        assert tap.secret.text() == new
        logging.getLogger("fp_addon").warning("leak? %s", new)
        tap.done()
    assert new not in caplog.text


def test_a_worker_refused_at_a_script_load_leaves_the_work_in_process(
    keyfile: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog
) -> None:
    """Every option at once (mitmproxy's script loader, at start or on a reload: no
    rollback follows), and the key file rotated between this process's read and the
    worker's: the worker refuses, and the work goes on here."""
    tap = fp_addon.FingerprintTap()
    with taddons.context(tap) as tctx:
        out = tmp_path / "out.jsonl"
        tctx.configure(tap, fp_keys_file=str(keyfile), fp_worker=False, fp_jsonl=str(out))
        tctx.options.update(fp_worker=True)
        tap.done()  # the script unloaded; the reloaded one is a new addon
        start = WorkerClient.start

        def rotated_first(client: WorkerClient) -> None:
            rotate(keyfile, NEW.to_base64())  # a whole rotation, just now
            start(client)

        monkeypatch.setattr(WorkerClient, "start", rotated_first)
        reloaded = fp_addon.FingerprintTap()
        reloaded.configure(set(tctx.options.keys()))  # every option, as the loader does
        assert reloaded.worker is None
        assert reloaded.pipeline is not None
        assert verdict_for(reloaded, KEY) == "trusted", "the keys this process read"
        reloaded.done()
    assert "changed while being read" in caplog.text
    assert "fp-tap: unsealing in mitmproxy's process" in caplog.text


@pytest.mark.parametrize("restart", [0, 1], ids=["in-process", "restart"])
@on_loop
async def test_a_worker_dying_while_the_addon_reads_a_rotated_key_file_keeps_the_new_key(
    keyfile: Path, monkeypatch: pytest.MonkeyPatch, restart: int
) -> None:
    """The addon's watch must not move on before its keys do: a replacement made in
    between takes both (copies), and would otherwise never see the rotation."""
    tap = fp_addon.FingerprintTap()
    with taddons.context(tap) as tctx:
        tctx.configure(
            tap,
            fp_keys_file=str(keyfile),
            fp_secrets_reload=0,
            fp_worker_restart=restart,
            fp_hold=True,
        )
        await started(tap)
        worker = tap.worker
        assert worker is not None
        assert worker.proc is not None
        await asyncio.sleep(1.1 * restart)  # restart: it ran fp_worker_restart seconds
        rotate(keyfile, NEW.to_base64())
        checked, go_on = threading.Event(), threading.Event()
        check = rotation_module.Watches.check

        def slow_check(watches: rotation_module.Watches) -> Any:  # a slow secret file next
            changes = check(watches)
            if not checked.is_set():  # the addon's own check, not the replacement's
                checked.set()
                assert go_on.wait(30)
            return changes

        monkeypatch.setattr(rotation_module.Watches, "check", slow_check)
        reload = asyncio.ensure_future(tap.reload_files())
        await until(checked.is_set, "the key file read in the thread")
        os.kill(worker.proc.pid, signal.SIGKILL)
        await until(lambda: tap.worker not in (None, worker) or tap.pipeline, "replaced")
        assert (tap.worker is not None) == bool(restart)
        go_on.set()
        await reload
        assert [k.key_id for k in tap.keys] == [NEW.key_id], "the addon took the new key"
        await tap.reload_files()  # the next periodic check: the pipeline's own watch
        held = tap.response(flow := make_flow(fp_body(key=NEW)[0]))
        if held is not None:
            await asyncio.wait_for(held, 30)
        assert flow.metadata["fp"]["verdict"] == "trusted"
        tap.done()


@on_loop
async def test_a_worker_dying_after_a_rotation_the_addon_has_not_checked_yet_is_restarted(
    keyfile: Path,
) -> None:
    """The worker checks the file on its own: it may have taken a rotation this process
    has not seen yet. Its successor starts from the file as it is, not refused for it."""
    tap = fp_addon.FingerprintTap()
    with taddons.context(tap) as tctx:
        tctx.configure(tap, fp_keys_file=str(keyfile), fp_worker_restart=1, fp_secrets_reload=60)
        await started(tap)
        first = await rotate_and_kill(tap, keyfile, NEW.to_base64(), KEY.to_base64(), ran=1.1)
        await until(lambda: tap.worker not in (None, first) or tap.pipeline, "replaced")
        assert tap.worker is not None, "it ran fp_worker_restart seconds: a new worker"
        masked = tap.scrubber.scrub(f"{NEW.to_base64()} {NEW.raw().hex()}")
        no_key_in(masked)  # masked in log lines before the new worker used it
        held = tap.response(make_flow(fp_body(key=NEW)[0]))
        assert held is None
        tap.done()
        stats = json.loads(tap.stats_command())
        assert stats["verdicts"] == {"trusted": 1}


@on_loop
async def test_a_rotation_the_dead_worker_took_is_taken_again_by_its_successor(
    keyfile: Path,
) -> None:
    """Each process counts what it takes: the in-process successor starts from what this
    process has (it had not checked the file yet) and takes the rotation, and counts it,
    as the dead worker had. Counted twice, rather than a change nobody reports."""
    tap = fp_addon.FingerprintTap()
    with taddons.context(tap) as tctx:
        tctx.configure(tap, fp_keys_file=str(keyfile), fp_secrets_reload=1)
        await started(tap)
        assert tap._ticker is not None
        tap._ticker.cancel()  # this process's own check has not come round yet
        first = tap.worker
        assert first is not None
        assert first.proc is not None
        rotate(keyfile, NEW.to_base64(), KEY.to_base64())
        await until(lambda: first.stats.get("reloaded") == {"keys": 1}, "the worker took it")
        os.kill(first.proc.pid, signal.SIGKILL)
        await until(lambda: tap.pipeline is not None, "the in-process replacement")
        await tap.reload_files()
        assert verdict_for(tap, NEW) == "trusted"
        stats = json.loads(tap.stats_command())
        tap.done()
    assert stats["reloaded"] == {"keys": 2}, "the worker's and its successor's"


THIRD = DecryptionKey.generate()


@on_loop
async def test_keys_a_successor_starts_with_are_masked_whatever_this_process_took_since(
    keyfile: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A rotation taken here while the successor is being made: every key either of
    them uses is masked in log lines."""
    gate = Gate(monkeypatch)
    async with gate.replacing(keyfile, fp_worker_restart=0, fp_secrets_reload=0) as (tap, _):
        rotate(keyfile, THIRD.to_base64())
        await tap.reload_files()
        assert [k.key_id for k in tap.keys] == [THIRD.key_id]
        gate.open.set()
        await until(lambda: tap.pipeline is not None, "the in-process successor")
        pipeline = tap.pipeline
        assert pipeline is not None
        used = [*(pipeline.keys or ()), *tap.keys]
        text = " ".join(k.to_base64() for k in used)
        tap.done()
    assert used
    assert all(k.to_base64().rstrip("=") not in tap.scrubber.scrub(text) for k in used)


@pytest.mark.parametrize("content", ["half-written", "rotated"])
@on_loop
async def test_a_change_nobody_took_before_the_worker_died_is_reported_by_its_successor(
    keyfile: Path, caplog: pytest.LogCaptureFixture, content: str
) -> None:
    caplog.set_level(logging.INFO)
    tap = fp_addon.FingerprintTap()
    with taddons.context(tap) as tctx:
        tctx.configure(tap, fp_keys_file=str(keyfile), fp_worker_restart=0, fp_secrets_reload=60)
        await started(tap)
        assert tap._ticker is not None
        tap._ticker.cancel()
        line = NEW.to_base64()[:30] if content == "half-written" else NEW.to_base64()
        await rotate_and_kill(tap, keyfile, line)
        await until(lambda: tap.pipeline is not None, "the in-process successor")
        await tap.reload_files()
        stats = json.loads(tap.stats_command())
        tap.done()
    if content == "half-written":
        assert stats["errors"] == {"worker_exit": 1, "keys_reload": 1}
        assert messages(caplog, "keeping the 1 key(s) in use")
    else:
        assert stats["reloaded"] == {"keys": 1}
        assert messages(caplog, f"changed: 1 decryption key(s): {NEW.key_id}")


@on_loop
async def test_a_webhook_secret_a_restarted_worker_reads_is_masked_here_first(
    keyfile: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The successor reads the rotated secret file itself, which this process has not
    checked yet (fp_secrets_reload=0): the secret is masked in log lines before it signs."""
    monkeypatch.delenv(SECRET_ENV_VAR, raising=False)
    first, second = secrets.token_urlsafe(24), secrets.token_urlsafe(24)
    options = {"fp_worker": True, "fp_worker_restart": 1, "fp_secrets_reload": 0}
    with webhook_addon(keyfile, tmp_path / "webhook.secret", first, **options) as (tap, _):
        await started(tap)
        worker = await rotate_and_kill(tap, tmp_path / "webhook.secret", second, ran=1.1)
        await until(lambda: tap.worker not in (None, worker), "a new worker")
        assert second not in tap.scrubber.scrub(f"signing with {second}")
        tap.done()
