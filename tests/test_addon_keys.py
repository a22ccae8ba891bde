"""fp_addon: a rotated key file is taken without a restart (``fp_keys_reload``)."""

from __future__ import annotations

import asyncio
import json
import logging
from pathlib import Path

import pytest
from mitmproxy import exceptions
from mitmproxy.test import taddons

import fp_addon
from fp_core.keys import DecryptionKey
from tests.e2e.conftest import secret_forms
from tests.test_addon import KEY, fp_body, make_flow, run
from tests.test_addon_worker import annotated, on_loop, until

NEW = DecryptionKey.generate()


def rotate(path: Path, *lines: str) -> None:
    path.write_text("".join(line + "\n" for line in lines))
    path.chmod(0o600)


def verdict_for(tap: fp_addon.FingerprintTap, key: DecryptionKey) -> str:
    flow = run(tap, make_flow(fp_body(key=key)[0]))
    record = flow.metadata["fp"]
    return str(record["verdict"] if record["ok"] else record["error"]["kind"])


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
        assert asyncio.run(tap.reload_keys()) is False, "unchanged"

        rotate(keyfile, NEW.to_base64(), KEY.to_base64())
        assert asyncio.run(tap.reload_keys()) is True
        assert verdict_for(tap, NEW) == "trusted"
        assert verdict_for(tap, KEY) == "trusted", "the old key still works"
        assert asyncio.run(tap.reload_keys()) is False, "taken"

        stats = json.loads(tap.stats_command())
        assert stats["keys_reloaded"] == 1
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
        assert asyncio.run(tap.reload_keys()) is False
        assert asyncio.run(tap.reload_keys()) is False
        assert verdict_for(tap, KEY) == "trusted", "the key in use stays"
        assert json.loads(tap.stats_command())["errors"] == {"keys_reload": 1}

        rotate(keyfile, NEW.to_base64())
        assert asyncio.run(tap.reload_keys()) is True
        assert verdict_for(tap, NEW) == "trusted"
        assert verdict_for(tap, KEY) == "decrypt_failed", "the file no longer has it"
        tap.done()
    assert messages(caplog, "keeping") == [
        f"fp-tap: key file {keyfile} line 1: decodes to 22 bytes, an AES-256 key is 32; "
        "keeping the 1 key(s) in use"
    ]
    no_key_in(caplog.text)


def test_new_keys_are_scrubbed_from_log_lines(keyfile: Path, caplog) -> None:
    tap = fp_addon.FingerprintTap()
    with taddons.context(tap) as tctx:
        tctx.configure(tap, fp_keys_file=str(keyfile), fp_worker=False)
        rotate(keyfile, NEW.to_base64())
        assert asyncio.run(tap.reload_keys()) is True
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

        async def check_while_the_option_changes() -> bool:
            checking = asyncio.ensure_future(tap.reload_keys())
            await asyncio.sleep(0)  # the check is off to its thread
            tctx.configure(tap, fp_keys_file=str(other))
            return await checking

        assert asyncio.run(check_while_the_option_changes()) is False
        assert [k.key_id for k in tap.keys] == [NEW.key_id]
        assert verdict_for(tap, NEW) == "trusted"
        tap.done()


def test_a_negative_interval_is_an_option_error(keyfile: Path) -> None:
    tap = fp_addon.FingerprintTap()
    with (
        taddons.context(tap) as tctx,
        pytest.raises(exceptions.OptionsError, match="fp_keys_reload"),
    ):
        tctx.configure(tap, fp_keys_file=str(keyfile), fp_keys_reload=-1)


@on_loop
async def test_the_worker_takes_the_new_keys(keyfile: Path) -> None:
    tap = fp_addon.FingerprintTap()
    with taddons.context(tap) as tctx:
        tctx.configure(tap, fp_keys_file=str(keyfile), fp_hold=True)
        tap.running()
        assert tap.worker is not None
        flow = make_flow(fp_body(key=NEW)[0])
        await annotated(tap, flow)
        assert flow.metadata["fp"]["error"]["kind"] == "decrypt_failed"

        rotate(keyfile, NEW.to_base64())
        assert await tap.reload_keys() is True
        flow = make_flow(fp_body(key=NEW)[0])
        await annotated(tap, flow)
        assert flow.metadata["fp"]["verdict"] == "trusted"
        assert flow.metadata["fp"]["key_id"] == NEW.key_id
        tap.done()


@on_loop
async def test_the_watch_checks_every_interval_and_never_at_zero(
    keyfile: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(fp_addon, "KEYS_TICK", 0.02)
    tap = fp_addon.FingerprintTap()
    with taddons.context(tap) as tctx:
        tctx.configure(tap, fp_keys_file=str(keyfile), fp_worker=False, fp_keys_reload=0)
        tap.running()
        rotate(keyfile, NEW.to_base64())
        await asyncio.sleep(0.5)  # 25 ticks
        assert tap.stats.get("keys_reloaded") == 0, "0: never checks"

        tctx.configure(tap, fp_keys_reload=1)  # 50 ticks
        await until(lambda: tap.stats.get("keys_reloaded") == 1, "the reload")
        assert [k.key_id for k in tap.keys] == [NEW.key_id]
        tap.done()
        assert tap._key_task is not None
        await asyncio.sleep(0)
        assert tap._key_task.cancelled(), "done() stops the watch"
