"""fp_addon with the SQLite store and the webhook, inside mitmproxy's test harness."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import secrets
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from mitmproxy import exceptions
from mitmproxy.test import taddons

import fp_addon
from fp_core.keys import ENV_VAR
from fp_core.spool import SPOOL_FILE, Spool
from fp_core.store import read_records
from fp_core.webhook import SECRET_ENV_VAR, outgoing, verdict_header
from scripts.harness import REPO, make_tls_files
from scripts.receiver import Receiver, ReceiverConfig, tls_context
from tests.test_addon import fp_body, hostile_bodies, make_flow, run

PATIENCE = 15.0


def wait_until(condition: Callable[[], object], what: str) -> None:
    deadline = time.monotonic() + PATIENCE
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


@pytest.fixture
def secret(monkeypatch: pytest.MonkeyPatch) -> str:
    value = secrets.token_urlsafe(24)
    monkeypatch.setenv(SECRET_ENV_VAR, value)
    return value


@pytest.fixture
def receiver(secret: str) -> Iterator[Receiver]:
    server = Receiver(ReceiverConfig(secret=secret))
    yield server
    server.close()


class Tap:
    """An addon in a taddons context, configured with a key file and a state dir."""

    def __init__(self, tctx: taddons.context, addon: fp_addon.FingerprintTap) -> None:
        self.tctx = tctx
        self.addon = addon

    def configure(self, **options: Any) -> None:
        self.tctx.configure(self.addon, **options)

    def send(self, *bodies: bytes, when: float | None = None) -> list[Any]:
        return [run(self.addon, make_flow(body, when=when)) for body in bodies]


@pytest.fixture
def start(
    keyfile: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> Iterator[Callable[..., Tap]]:
    monkeypatch.delenv(ENV_VAR, raising=False)
    contexts: list[tuple[taddons.context, fp_addon.FingerprintTap]] = []

    def start(**options: Any) -> Tap:
        addon = fp_addon.FingerprintTap()
        tctx = taddons.context(addon)
        tctx.__enter__()
        contexts.append((tctx, addon))
        defaults = {
            "fp_keys_file": str(keyfile),
            "fp_state_dir": str(tmp_path / "state"),
            "fp_webhook_retry_ms": 20,
            "fp_webhook_retry_max": 1,
            "fp_worker": False,  # in-process: see test_addon_worker.py for the other way
        }
        tctx.configure(addon, **(defaults | options))
        return Tap(tctx, addon)

    yield start
    for tctx, addon in reversed(contexts):
        addon.done()
        tctx.__exit__(None, None, None)


def stats(tap: Tap) -> dict[str, Any]:
    return json.loads(tap.addon.stats_command())


def jsonl(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


# -- the SQLite store --------------------------------------------------------------------


def test_store_and_jsonl_hold_the_same_records(start: Callable[..., Tap], tmp_path: Path) -> None:
    db, out = tmp_path / "events.sqlite3", tmp_path / "events.jsonl"
    tap = start(fp_sqlite=str(db), fp_jsonl=str(out))
    body, _ = fp_body()
    tap.send(body, body, fp_body(bot="bad")[0], hostile_bodies()["decrypt_failed"])
    tap.addon.done()
    stored = list(read_records(str(db)))
    assert stored == jsonl(out)
    assert [r["checks"]["duplicate"] for r in stored] == [False, True, False, None]
    assert db.stat().st_mode & 0o777 == 0o600
    snapshot = stats(tap)
    assert snapshot["store"] == {"rows": 4}
    assert snapshot["written"] == {"jsonl": 4, "sqlite": 4}


def test_ids_in_the_store_count_as_seen_after_a_restart(
    start: Callable[..., Tap], tmp_path: Path
) -> None:
    db = str(tmp_path / "events.sqlite3")
    recent, _ = fp_body()
    old, _ = fp_body()
    first = start(fp_sqlite=db)
    first.send(recent)
    first.send(old, when=time.time() - 7200)  # older than fp_replay_ttl (3600 s)
    first.addon.done()
    second = start(fp_sqlite=db)
    again_recent, again_old = second.send(recent, old)
    assert again_recent.metadata["fp"]["checks"]["duplicate"] is True
    assert again_recent.metadata["fp"]["reasons"] == ["duplicate"]
    assert again_old.metadata["fp"]["checks"]["duplicate"] is False
    assert stats(second)["replay_ids"] == 2


def test_a_bad_store_path_stops_the_start(start: Callable[..., Tap], tmp_path: Path) -> None:
    with pytest.raises(exceptions.OptionsError, match="fp_sqlite"):
        start(fp_sqlite=str(tmp_path / "no-such-dir" / "events.sqlite3"))


# -- the webhook -----------------------------------------------------------------------


def test_unsealed_events_are_forwarded_signed(
    start: Callable[..., Tap], receiver: Receiver, tmp_path: Path
) -> None:
    out = tmp_path / "events.jsonl"
    tap = start(fp_webhook_url=receiver.url, fp_jsonl=str(out))
    body, _ = fp_body()
    tap.send(body, body, fp_body(api="v3")[0], hostile_bodies()["decrypt_failed"])
    receiver.wait_for(3)
    tap.addon.done()
    unsealed = [r for r in jsonl(out) if r["ok"]]
    assert len(unsealed) == 3, "the error record is not forwarded"
    # One POST per unsealed record (the replay too, flagged), each verified by the
    # official SDK in the receiver, its body the record's event byte for byte.
    assert sorted((r.request_id, r.verdict, r.body_sha256) for r in receiver.received) == sorted(
        (r["request_id"], verdict_header(r), hashlib.sha256(outgoing(r).body).hexdigest())
        for r in unsealed
    )
    assert [r.verdict for r in receiver.received].count("suspicious; reasons=duplicate") == 1
    assert all(r.signature == "valid" for r in receiver.received)
    assert all(r.content_type == "application/json" for r in receiver.received)
    assert all(
        json.loads(r.checks or "") in [u["checks"] for u in unsealed] for r in receiver.received
    )
    snapshot = stats(tap)
    assert snapshot["webhook"] == {"sent": 3, "spooled": 3}
    assert (snapshot["webhook_pending"], snapshot["webhook_parked"]) == (0, 0)


def test_without_include_event_only_the_webhook_gets_the_event(
    start: Callable[..., Tap], receiver: Receiver, tmp_path: Path
) -> None:
    db, out, export = tmp_path / "e.sqlite3", tmp_path / "e.jsonl", tmp_path / "export.jsonl"
    tap = start(
        fp_webhook_url=receiver.url, fp_jsonl=str(out), fp_sqlite=str(db), fp_include_event=False
    )
    (flow,) = tap.send(fp_body()[0])
    receiver.wait_for(1)
    tap.addon.export_command([flow], str(export))
    tap.addon.done()
    assert receiver.received[0].body_len > 100
    assert "event" not in jsonl(out)[0]
    assert "event" not in next(read_records(str(db)))
    assert "event" not in jsonl(export)[0]


def test_the_proxy_never_waits_for_the_receiver(start: Callable[..., Tap], tmp_path: Path) -> None:
    gate = tmp_path / "gate"
    stuck = Receiver(ReceiverConfig(gate=gate, closed="hold"))
    tap = start(fp_webhook_url=stuck.url, fp_webhook_concurrency=1)
    bodies = [fp_body()[0] for _ in range(20)]
    sender = threading.Thread(target=tap.send, args=bodies)
    sender.start()
    # The receiver holds every request until the gate opens: a hook that waited for
    # it would still be running at the end of this join.
    sender.join(PATIENCE)
    assert not sender.is_alive()
    wait_until(lambda: stats(tap)["webhook_pending"] == 20, "every event in the spool")
    assert stuck.received == []
    gate.touch()
    stuck.wait_for(20)
    tap.addon.done()
    stuck.close()


def two_parked(
    start: Callable[..., Tap], tmp_path: Path, secret: str
) -> tuple[Tap, Receiver, Path]:
    """A tap whose receiver answers 500 until ``gate`` exists, with two events parked."""
    gate = tmp_path / "gate"
    failing = Receiver(ReceiverConfig(secret=secret, gate=gate, closed="fail"))
    tap = start(fp_webhook_url=failing.url, fp_webhook_give_up=1)
    tap.send(fp_body()[0], fp_body()[0])
    wait_until(lambda: stats(tap)["webhook_parked"] == 2, "parking")
    return tap, failing, gate


def test_parked_events_are_sent_again_by_fp_resend(
    start: Callable[..., Tap], tmp_path: Path, secret: str, caplog: pytest.LogCaptureFixture
) -> None:
    tap, failing, gate = two_parked(start, tmp_path, secret)
    assert stats(tap)["webhook"]["parked"] == 2
    assert "gave up on" in caplog.text
    gate.touch()
    caplog.set_level(logging.INFO)
    tap.tctx.command(tap.addon.resend_command)
    failing.wait_for(2)
    wait_until(lambda: stats(tap)["webhook_pending"] == 0, "resent events delivered")
    assert stats(tap)["webhook"]["resent"] == 2
    assert stats(tap)["webhook_parked"] == 0
    assert "fp.resend: 2 parked webhook event(s) queued again" in caplog.text
    failing.close()


@pytest.mark.parametrize("name", ["resend", "discard"])
def test_a_spool_command_just_before_shutdown_finishes_and_is_counted(
    start: Callable[..., Tap],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    name: str,
) -> None:
    """In mitmproxy's process the command ran on the addon's own background, which
    shutdown joined only after the spool was closed and the summary taken: a command
    still under way failed on the closed spool and went uncounted (found by a worker
    hunt). The worker's pipeline always waited for it."""
    from fp_core import delivery as delivery_module
    from fp_core.webhook import Outgoing

    state = tmp_path / "state"
    spool = Spool(str(state))
    spool.add([Outgoing(f"rid-{i}", b"{}") for i in range(50)])
    spool.close()
    with sqlite3.connect(state / SPOOL_FILE) as conn:
        conn.execute("UPDATE events SET parked = 1, parked_at = ?", (time.time(),))
    conn.close()
    original = getattr(delivery_module.Delivery, name)

    def slowly(self: Any) -> int:
        time.sleep(0.5)  # the spool busy a moment (the writer's transaction, a slow disk)
        return int(original(self))

    monkeypatch.setattr(delivery_module.Delivery, name, slowly)
    caplog.set_level(logging.INFO)
    tap = start(fp_webhook_url="http://127.0.0.1:9/hook", fp_drain_timeout=0)
    tap.tctx.command(getattr(tap.addon, f"{name}_command"))
    tap.addon.done()
    counted = "resent" if name == "resend" else "discarded"
    assert stats(tap)["webhook"].get(counted) == 50
    assert "closed database" not in caplog.text


def test_parked_events_are_deleted_by_fp_discard(
    start: Callable[..., Tap], tmp_path: Path, secret: str, caplog: pytest.LogCaptureFixture
) -> None:
    tap, failing, gate = two_parked(start, tmp_path, secret)
    assert "fp.discard deletes them" in caplog.text
    caplog.set_level(logging.INFO)
    tap.tctx.command(tap.addon.discard_command)
    wait_until(lambda: stats(tap)["webhook_parked"] == 0, "the parked events deleted")
    assert stats(tap)["webhook"]["discarded"] == 2
    assert "fp.discard: 2 parked webhook event(s) deleted" in caplog.text
    gate.touch()
    tap.tctx.command(tap.addon.resend_command)
    wait_until(lambda: "fp.resend: 0 parked webhook event(s)" in caplog.text, "the resend")
    posts = len(failing.received)
    time.sleep(0.3)
    assert len(failing.received) == posts, "nothing left to send"
    failing.close()


def test_parked_events_expire_after_fp_webhook_keep_parked(
    start: Callable[..., Tap], tmp_path: Path, secret: str
) -> None:
    failing = Receiver(ReceiverConfig(secret=secret, gate=tmp_path / "gate", closed="fail"))
    tap = start(fp_webhook_url=failing.url, fp_webhook_give_up=1, fp_webhook_keep_parked=1)
    tap.send(fp_body()[0], fp_body()[0])
    wait_until(lambda: stats(tap).get("webhook", {}).get("parked") == 2, "parking")
    wait_until(lambda: stats(tap)["webhook"].get("expired") == 2, "expiry")
    assert stats(tap)["webhook_parked"] == 0
    with pytest.raises(exceptions.OptionsError, match="fp_webhook_keep_parked cannot be negative"):
        tap.configure(fp_webhook_keep_parked=-1)
    failing.close()


@pytest.mark.parametrize("command", ["resend", "discard"])
def test_spool_commands_without_a_webhook(start: Callable[..., Tap], command: str) -> None:
    tap = start()
    with pytest.raises(exceptions.CommandError, match=f"fp.{command}: no webhook"):
        getattr(tap.addon, f"{command}_command")()


def test_done_drains_the_spool(start: Callable[..., Tap], receiver: Receiver) -> None:
    tap = start(fp_webhook_url=receiver.url, fp_drain_timeout=30)
    tap.send(*(fp_body()[0] for _ in range(10)))
    tap.addon.done()
    assert len({r.request_id for r in receiver.received}) == 10


def test_events_left_at_shutdown_are_sent_by_the_next_start(
    start: Callable[..., Tap], tmp_path: Path, secret: str
) -> None:
    gate = tmp_path / "gate"
    down = Receiver(ReceiverConfig(secret=secret, gate=gate, closed="refuse"))
    first = start(fp_webhook_url=down.url, fp_drain_timeout=0)
    first.send(fp_body()[0], fp_body()[0])
    wait_until(lambda: stats(first).get("webhook", {}).get("failed", 0) >= 2, "failures")
    first.addon.done()
    assert stats(first)["webhook_pending"] == 2
    gate.touch()
    second = start(fp_webhook_url=down.url)
    down.wait_for(2)
    wait_until(lambda: stats(second)["webhook_pending"] == 0, "delivery after restart")
    down.close()


def test_https_receiver_with_a_private_ca(
    start: Callable[..., Tap], tmp_path: Path, secret: str
) -> None:
    ca, cert, key = make_tls_files(tmp_path / "tls")
    server = Receiver(ReceiverConfig(secret=secret), tls=tls_context(str(cert), str(key)))
    tap = start(fp_webhook_url=server.url, fp_webhook_ca=str(ca))
    tap.send(fp_body()[0])
    assert server.wait_for(1)[0].signature == "valid"
    tap.addon.done()
    server.close()


def test_changing_the_url_at_runtime(start: Callable[..., Tap], secret: str) -> None:
    first, second = Receiver(ReceiverConfig(secret=secret)), Receiver(ReceiverConfig(secret=secret))
    tap = start(fp_webhook_url=first.url)
    tap.send(fp_body()[0])
    first.wait_for(1)
    tap.configure(fp_webhook_url=second.url)
    tap.send(fp_body()[0])
    second.wait_for(1)
    tap.configure(fp_webhook_url=None)
    assert tap.addon.delivery is None
    tap.send(fp_body()[0])
    assert "webhook_pending" not in stats(tap)
    tap.addon.done()
    assert (len(first.received), len(second.received)) == (1, 1)
    first.close()
    second.close()


def test_the_secret_stays_secret(
    start: Callable[..., Tap],
    receiver: Receiver,
    secret: str,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)
    out, db = tmp_path / "e.jsonl", tmp_path / "e.sqlite3"
    tap = start(fp_webhook_url=receiver.url, fp_jsonl=str(out), fp_sqlite=str(db))
    (flow,) = tap.send(fp_body()[0])
    receiver.wait_for(1)
    tap.addon.done()
    assert secret not in caplog.text
    assert secret not in json.dumps(flow.get_state(), default=repr)
    assert secret not in tap.addon.stats_command()
    for path in [out, db, *(tmp_path / "state").iterdir()]:
        assert secret.encode() not in path.read_bytes(), path.name
    assert secret not in repr(vars(tap.addon))


def test_unsigned_webhooks_are_warned_about(
    start: Callable[..., Tap], caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv(SECRET_ENV_VAR, raising=False)
    server = Receiver()
    start(fp_webhook_url=server.url)
    assert "webhook events are not signed" in caplog.text
    server.close()


def test_the_state_dir_is_made_only_for_the_webhook(
    start: Callable[..., Tap], tmp_path: Path, receiver: Receiver
) -> None:
    start(fp_jsonl=str(tmp_path / "e.jsonl"))
    assert not (tmp_path / "state").exists()
    start(fp_webhook_url=receiver.url, fp_state_dir=str(tmp_path / "other"))
    assert (tmp_path / "other").stat().st_mode & 0o777 == 0o700
    assert (tmp_path / "other" / SPOOL_FILE).stat().st_mode & 0o777 == 0o600


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"fp_webhook_url": "ftp://backend.example/"}, "fp_webhook"),
        ({"fp_webhook_url": "https://u:p@backend.example/"}, "credentials"),
        ({"fp_webhook_concurrency": 0}, "fp_webhook_concurrency"),
        ({"fp_webhook_timeout": -1}, "fp_webhook_timeout"),
        ({"fp_webhook_give_up": 0}, "fp_webhook_give_up"),
        ({"fp_webhook_retry_ms": 0}, "fp_webhook_retry_ms"),
        ({"fp_drain_timeout": -1}, "fp_drain_timeout"),
        ({"fp_webhook_ca": "/nonexistent/ca.pem"}, "CA file"),
        ({"fp_webhook_secret_file": "/nonexistent/secret"}, "set twice"),
        ({"fp_state_dir": " "}, "fp_state_dir"),
    ],
)
def test_bad_webhook_options(
    start: Callable[..., Tap], receiver: Receiver, options: dict[str, Any], message: str
) -> None:
    tap = start()
    with pytest.raises(exceptions.OptionsError, match=message):
        tap.configure(**({"fp_webhook_url": receiver.url} | options))
    assert tap.addon.delivery is None, "nothing half-configured is left running"


def test_a_state_dir_in_use_is_refused(
    start: Callable[..., Tap], tmp_path: Path, receiver: Receiver
) -> None:
    owner = Spool(str(tmp_path / "state"))
    try:
        with pytest.raises(exceptions.OptionsError, match=r"fp_state_dir: .* in use"):
            start(fp_webhook_url=receiver.url)
    finally:
        owner.close()


def test_a_bad_change_keeps_the_running_delivery(
    start: Callable[..., Tap], receiver: Receiver, tmp_path: Path
) -> None:
    tap = start(fp_webhook_url=receiver.url)
    delivery = tap.addon.delivery
    with pytest.raises(exceptions.OptionsError):
        tap.configure(fp_state_dir=str(tmp_path / "state"), fp_jsonl="/nonexistent/x.jsonl")
    assert tap.addon.delivery is delivery
    tap.send(fp_body()[0])
    receiver.wait_for(1)


def test_the_spool_is_written_before_the_files(
    start: Callable[..., Tap], receiver: Receiver, tmp_path: Path
) -> None:
    tap = start(fp_webhook_url=receiver.url, fp_jsonl=str(tmp_path / "e.jsonl"))
    assert tap.addon.writer is not None
    assert [s.name for s in tap.addon.writer.sinks] == ["webhook", "jsonl"]


def test_spool_rows_carry_no_secret_and_no_signature(
    start: Callable[..., Tap], tmp_path: Path, secret: str
) -> None:
    gate = tmp_path / "gate"
    down = Receiver(ReceiverConfig(gate=gate, closed="refuse"))
    tap = start(fp_webhook_url=down.url, fp_drain_timeout=0)
    tap.send(fp_body()[0])
    wait_until(lambda: stats(tap)["webhook_pending"] == 1, "spooling")
    conn = sqlite3.connect(tmp_path / "state" / SPOOL_FILE)
    (headers,) = conn.execute("SELECT headers FROM events").fetchone()
    conn.close()
    assert set(json.loads(headers)) == {"FP-Tap-Verdict", "FP-Tap-Checks"}
    down.close()


# -- without sqlite3, as in mitmproxy's standalone binaries -----------------------------


def test_the_addon_loads_without_sqlite3(tmp_path: Path) -> None:
    code = (
        "import sys\n"
        "sys.modules['sqlite3'] = sys.modules['_sqlite3'] = None  # as in the binaries\n"
        "import fp_addon\n"
        "assert not {'fp_core.store', 'fp_core.spool', 'fp_core.delivery'} & set(sys.modules)\n"
    )
    subprocess.run(
        [sys.executable, "-c", code],
        cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        check=True,
        timeout=60,
    )


@pytest.mark.parametrize("option", ["fp_sqlite", "fp_webhook_url"])
def test_without_sqlite3_the_store_and_webhook_say_why(
    start: Callable[..., Tap],
    tmp_path: Path,
    receiver: Receiver,
    monkeypatch: pytest.MonkeyPatch,
    option: str,
) -> None:
    out = tmp_path / "e.jsonl"
    tap = start(fp_jsonl=str(out))
    monkeypatch.setitem(sys.modules, "sqlite3", None)
    value = receiver.url if option == "fp_webhook_url" else str(tmp_path / "e.sqlite3")
    with pytest.raises(exceptions.OptionsError, match=f"{option} needs Python's sqlite3"):
        tap.configure(**{option: value})
    tap.send(fp_body()[0])  # the rest of the tap carries on
    tap.addon.done()
    assert len(jsonl(out)) == 1
