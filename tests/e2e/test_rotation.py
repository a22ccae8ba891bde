"""Rotations through a real mitmdump: the key file, or the webhook secret file, is
rewritten while it runs."""

from __future__ import annotations

import os
import re
import secrets
import signal
import time
from pathlib import Path
from typing import Any

import pytest

from fp_core.keys import DecryptionKey
from fp_core.writer import open_private
from scripts.harness import (
    Service,
    addon_summary,
    start_receiver,
    write_key_file,
)
from tests.e2e.conftest import (
    Keys,
    fetch,
    one_more_record,
    read_jsonl,
    reverse_tap,
    same_as_direct,
    secret_forms,
)

pytestmark = pytest.mark.e2e


def outcome(record: dict[str, Any]) -> str:
    return str(record["verdict"] if record["ok"] else record["error"]["kind"])


def write_private(path: Path, text: str) -> None:
    """Replace the file in one step (a check between truncating and writing in place
    would see an empty file: one more warning, and a flaky count), mode 0600."""
    new = path.with_suffix(".new")
    new.unlink(missing_ok=True)
    with open_private(str(new), "w") as handle:
        handle.write(text)
    os.replace(new, path)


@pytest.mark.parametrize("worker", [True, False], ids=["worker", "in-process"])
def test_a_rotated_key_is_taken_without_a_restart(
    tmp_path: Path, keys: Keys, endpoint: Service, worker: bool
) -> None:
    """The endpoint seals with ``keys.key``; the tap starts with only an old key."""
    old = DecryptionKey.generate()
    tap_keys = write_key_file(tmp_path / "tap-keys.txt", old, "before the rotation")
    jsonl = tmp_path / "events.jsonl"
    proxy = reverse_tap(
        tmp_path,
        endpoint,
        fp_keys_file=str(tap_keys),
        fp_secrets_reload=1,
        fp_jsonl=str(jsonl),
        fp_worker=worker,
    )
    try:
        same_as_direct(proxy, endpoint, 1)
        assert outcome(one_more_record(jsonl, 0)) == "decrypt_failed"

        # Caught half-written: the old key stays, and the tap says so once.
        write_private(tap_keys, keys.key.to_base64()[:25] + "\n")
        proxy.wait_for(re.compile(r"keeping the 1 key\(s\) in use"))
        same_as_direct(proxy, endpoint, 2)
        assert outcome(one_more_record(jsonl, 1)) == "decrypt_failed"

        write_private(tap_keys, f"{keys.key.to_base64()}\n{old.to_base64()}\n")
        proxy.wait_for(re.compile(r"changed: 2 decryption key\(s\): " + keys.key.key_id))
        same_as_direct(proxy, endpoint, 3)
        record = one_more_record(jsonl, 2)
        assert (outcome(record), record["key_id"]) == ("trusted", keys.key.key_id)
        assert proxy.proc.poll() is None, "the same mitmdump, never restarted"
    finally:
        assert proxy.stop(signal.SIGTERM) == 0

    log = proxy.output()
    assert log.count("keeping the 1 key(s) in use") == 1
    summary = addon_summary(log)
    assert summary["reloaded"] == {"keys": 1}
    assert summary["errors"] == {"decrypt_failed": 2, "keys_reload": 1}
    for data in (log.encode(), jsonl.read_bytes()):
        for key in (keys.key, old):
            for form in secret_forms(key.raw()):
                assert form not in data, "a key leaked"
        assert keys.key.to_base64()[:25].encode() not in data, "the half-written key leaked"


def test_a_rotated_webhook_secret_signs_the_next_attempt(
    tmp_path: Path, keys: Keys, endpoint: Service
) -> None:
    """The backend already wants the new secret: an event signed with the old one is
    refused (401) and retried, until the tap reads the rewritten secret file; then the
    same event goes through, and the ones after it on their first attempt."""
    old, new = secrets.token_urlsafe(24), secrets.token_urlsafe(24)
    backend_secret, tap_secret = tmp_path / "backend.secret", tmp_path / "tap.secret"
    write_private(backend_secret, new + "\n")
    write_private(tap_secret, old + "\n")
    received = tmp_path / "received.jsonl"
    receiver, url = start_receiver(
        tmp_path, log=received, args=["--secret-file", str(backend_secret)]
    )
    proxy = reverse_tap(
        tmp_path,
        endpoint,
        fp_keys_file=str(keys.file),
        fp_webhook_url=url,
        fp_webhook_secret_file=str(tap_secret),
        fp_webhook_retry_ms=200,
        fp_webhook_retry_max=1,
        fp_state_dir=str(tmp_path / "state"),
        fp_secrets_reload=1,
    )

    def send(seed: int) -> str:
        reply = fetch(f"http://127.0.0.1:{proxy.port}/?case=ok&seed={seed}")
        assert reply.status == 200
        return {k.lower(): v for k, v in reply.headers}["x-stand-in-request-id"]

    def attempts(event_id: str, signature: str, count: int = 1) -> list[dict[str, Any]]:
        deadline = time.monotonic() + 30
        while (
            len(
                found := [
                    r
                    for r in read_jsonl(received)
                    if r["event_id"] == event_id and r["signature"] == signature
                ]
            )
            < count
        ):
            assert time.monotonic() < deadline, f"no {signature} attempt for {event_id}"
            time.sleep(0.05)
        return found

    try:
        first = send(1)
        assert attempts(first, "invalid", 2)[0]["status"] == 401, "refused, then retried"
        write_private(tap_secret, new + "\n")
        proxy.wait_for(re.compile(r"webhook secret file \S+ changed: its secret signs from now on"))
        assert attempts(first, "valid")[0]["status"] == 200, "the same event, delivered"
        second = send(2)
        assert attempts(second, "valid")[0]["status"] == 200
    finally:
        assert proxy.stop(signal.SIGTERM) == 0
        receiver.stop()

    log = receiver.output() + proxy.output()
    assert [r["signature"] for r in read_jsonl(received) if r["event_id"] == second] == ["valid"]
    summary = addon_summary(proxy.output())
    assert summary["reloaded"] == {"webhook_secret": 1}
    assert summary["webhook"]["sent"] == 2
    for secret in (old, new):
        assert secret not in log, "a webhook secret leaked"
