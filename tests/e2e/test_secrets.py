"""No secret in anything written: a full scenario at maximum verbosity, every byte searched."""

from __future__ import annotations

import http.client
import json
import socket
import threading
import time
from pathlib import Path

import pytest

from fp_core.keys import DecryptionKey
from scripts.harness import MitmdumpConfig, Service, start_mitmdump, start_receiver
from tests.e2e.conftest import Keys, fetch, secret_forms

pytestmark = pytest.mark.e2e

PROXY_SECRET = "hygiene-proxy-secret-5b2e7f01"
WEBHOOK_SECRET = "hygiene-webhook-secret-77c0d2e9"


def forms(secret: bytes) -> list[bytes]:
    out = secret_forms(secret)
    return [*out, secret.hex().upper().encode()]


def test_nothing_written_holds_a_secret(tmp_path: Path, keys: Keys, endpoint: Service) -> None:
    env_key = DecryptionKey.generate()  # a rotated-out key, tried first, from the environment
    flows, jsonl = tmp_path / "flows.mitm", tmp_path / "events.jsonl"
    secret_file = tmp_path / "webhook-secret"
    secret_file.write_text(WEBHOOK_SECRET)
    secret_file.chmod(0o600)
    receiver, webhook_url = start_receiver(
        tmp_path, log=tmp_path / "received.jsonl", env={"FP_WEBHOOK_SECRET": WEBHOOK_SECRET}
    )
    proxy = start_mitmdump(
        tmp_path,
        MitmdumpConfig(
            mode=f"reverse:http://127.0.0.1:{endpoint.port}",
            options={
                "fp_keys_file": str(keys.file),
                "fp_jsonl": str(jsonl),
                "fp_sqlite": str(tmp_path / "events.sqlite3"),
                "fp_webhook_url": webhook_url,
                "fp_webhook_secret_file": str(secret_file),
                "fp_state_dir": str(tmp_path / "state"),
                "termlog_verbosity": "debug",
                "flow_detail": 4,  # mitmdump prints full requests and responses
                "proxy_debug": True,  # ... and every byte on the wire
            },
            save_flows=flows,
            keys_env=env_key.to_base64(),
        ),
    )
    cases = ["ok", "bad_bot", "mismatch", "wrong_key", "bad_header", "not_json", "bomb", "html"]
    try:
        for i, case in enumerate(cases * 2):
            api = "v3" if i % 2 else "v4"
            reply = fetch(
                f"http://127.0.0.1:{proxy.port}/agent?case={case}&api={api}&encoding=gzip",
                headers={"FPJS-Proxy-Secret": PROXY_SECRET, "FPJS-Proxy-Client-IP": "8.8.8.8"},
            )
            assert reply.status == 200
        for seed in range(30):
            fetch(
                f"http://127.0.0.1:{proxy.port}/agent?case=hostile&seed={seed}",
                headers={"FPJS-Proxy-Secret": PROXY_SECRET},
            )
    finally:
        assert proxy.stop() == 0
        receiver.stop()

    # The scenario did exercise everything: records, store, webhook, flows, verbose logs.
    records = [json.loads(x) for x in jsonl.read_text().splitlines()]
    unsealed = sum(r["ok"] for r in records)
    assert unsealed >= 8
    received = [json.loads(x) for x in (tmp_path / "received.jsonl").read_text().splitlines()]
    assert len(received) >= unsealed
    assert all(r["signature"] == "valid" for r in received)
    assert (tmp_path / "events.sqlite3").stat().st_size > 0
    assert any((tmp_path / "state").iterdir())
    assert flows.stat().st_size > 0
    assert "[redacted]" in proxy.output()  # flow_detail=4 printed the masked header

    secrets = {
        "proxy secret": [PROXY_SECRET.encode()],
        "webhook secret": [WEBHOOK_SECRET.encode()],
        "file key": forms(keys.key.raw()),
        "environment key": forms(env_key.raw()),
    }
    inputs = {keys.file, secret_file}
    written = [p for p in tmp_path.rglob("*") if p.is_file() and p not in inputs]
    assert len(written) >= 5
    for path in written:
        data = path.read_bytes()
        for name, variants in secrets.items():
            for form in variants:
                assert form not in data, f"the {name} leaked into {path.relative_to(tmp_path)}"


def test_a_request_in_flight_at_shutdown_is_saved_without_the_proxy_secret(
    tmp_path: Path,
) -> None:
    """-w saves, at shutdown, flows with neither a response nor an error yet: here a
    request an upstream read and never answered."""
    upstream = socket.create_server(("127.0.0.1", 0))
    arrived = threading.Event()
    held: list[socket.socket] = []

    def serve() -> None:
        conn, _ = upstream.accept()
        held.append(conn)
        data = b""
        while b"\r\n\r\n" not in data and (chunk := conn.recv(65536)):
            data += chunk
        arrived.set()

    threading.Thread(target=serve, daemon=True).start()
    flows = tmp_path / "flows.mitm"
    proxy = start_mitmdump(
        tmp_path,
        MitmdumpConfig(
            mode=f"reverse:http://127.0.0.1:{upstream.getsockname()[1]}", save_flows=flows
        ),
    )

    def client() -> None:
        conn = http.client.HTTPConnection("127.0.0.1", proxy.port, timeout=30)
        try:
            conn.request("POST", "/agent", body=b"{}", headers={"FPJS-Proxy-Secret": PROXY_SECRET})
            conn.getresponse().read()
        except OSError:
            pass  # the proxy goes away first
        finally:
            conn.close()

    threading.Thread(target=client, daemon=True).start()
    try:
        assert arrived.wait(30), "the request never reached the upstream"
        time.sleep(0.3)
    finally:
        assert proxy.stop() == 0
        for conn in held:
            conn.close()
        upstream.close()
    saved = flows.read_bytes()
    assert b"/agent" in saved, "the flow in flight was saved"
    assert PROXY_SECRET.encode() not in saved
    assert b"[redacted]" in saved
