"""scripts/receiver.py: the test webhook receiver's modes, log and signature checks."""

from __future__ import annotations

import json
import signal
import socket
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from fp_core.webhook import sign
from scripts.harness import start_receiver
from scripts.receiver import Receiver, ReceiverConfig


def post(
    url: str, body: bytes = b'{"event_id":"e-1"}', headers: dict[str, str] | None = None
) -> int:
    request = urllib.request.Request(url, data=body, headers=headers or {}, method="POST")
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return int(response.status)
    except urllib.error.HTTPError as exc:
        return exc.code


def test_signatures_are_checked_with_the_sdk() -> None:
    receiver = Receiver(ReceiverConfig(secret="s3cret"))
    body = b'{"event_id":"e-1"}'
    good = {"FPJS-Event-Signature": sign(body, b"s3cret"), "Idempotency-Key": "e-1"}
    assert post(receiver.url, body, good) == 200
    assert post(receiver.url, body, {"FPJS-Event-Signature": sign(body, b"other")}) == 401
    assert post(receiver.url, body) == 401
    receiver.close()
    assert [r.signature for r in receiver.received] == ["valid", "invalid", "missing"]
    assert receiver.received[0].request_id == "e-1"
    assert receiver.received[0].event_id == "e-1"


def ask(port: int, raw: bytes) -> bytes:
    """The first bytes of the answer to a raw request (a marker if none in 3 s)."""
    with socket.create_connection(("127.0.0.1", port), timeout=3) as sock:
        sock.sendall(raw)
        try:
            return sock.recv(200)
        except TimeoutError:
            return b"<no answer in 3 s>"


@pytest.mark.parametrize(
    ("raw", "status"),
    [
        (b'Content-Length: 14\r\n\r\n{"products":1}', b"401"),
        (b'Content-Length: 16\r\n\r\n{"products":[1]}', b"401"),
        (b'Content-Length: 34\r\n\r\n{"products":{"botd":{"data":[1]}}}', b"401"),
        (b"Content-Length: abc\r\n\r\n{}", b"400"),
        (b"Content-Length: -1\r\n\r\n{}", b"400"),
        (b"Content-Length: 100000\r\n\r\n" + b"[" * 100_000, b"401"),
    ],
    ids=[
        "products-int",
        "products-list",
        "data-list",
        "length-not-a-number",
        "length-negative",
        "nested-too-deeply",
    ],
)
def test_every_post_is_answered_and_logged(raw: bytes, status: bytes) -> None:
    """Bad bodies and lengths got no answer (a traceback and a dropped connection, or a
    wait for the client to close), though every POST is to be answered."""
    receiver = Receiver(ReceiverConfig(secret="receiver-secret"))
    try:
        answer = ask(receiver.server.server_port, b"POST /webhook HTTP/1.1\r\nHost: x\r\n" + raw)
    finally:
        receiver.close()
    assert answer.startswith(b"HTTP/1.1 " + status), answer
    if status == b"401":  # read, so logged
        assert [(r.status, r.event_id) for r in receiver.received] == [(401, None)]


def test_refuse_until_the_gate_opens(tmp_path: Path) -> None:
    gate = tmp_path / "gate"
    receiver = Receiver(ReceiverConfig(gate=gate, closed="refuse"))
    with pytest.raises(urllib.error.URLError, match="refused"):
        post(receiver.url)
    gate.touch()
    status = None
    for _ in range(200):  # the receiver starts listening within its 50 ms poll
        try:
            status = post(receiver.url)
            break
        except urllib.error.URLError:
            time.sleep(0.05)
    assert status == 200
    receiver.close()


def test_hold_until_the_gate_opens(tmp_path: Path) -> None:
    gate = tmp_path / "gate"
    receiver = Receiver(ReceiverConfig(gate=gate, closed="hold"))
    statuses: list[int] = []
    client = threading.Thread(target=lambda: statuses.append(post(receiver.url)))
    client.start()
    client.join(0.5)
    assert client.is_alive(), "the request is held"
    assert receiver.received == []
    gate.touch()
    client.join(30)
    assert statuses == [200]
    receiver.close()


def test_fail_until_the_gate_opens_and_fail_first(tmp_path: Path) -> None:
    gate = tmp_path / "gate"
    receiver = Receiver(ReceiverConfig(gate=gate, closed="fail", fail_status=503))
    assert [post(receiver.url) for _ in range(2)] == [503, 503]
    gate.touch()
    assert post(receiver.url) == 200
    receiver.close()
    counted = Receiver(ReceiverConfig(fail_first=2))
    assert [post(counted.url) for _ in range(3)] == [500, 500, 200]
    counted.close()


def test_as_a_process_with_a_log(tmp_path: Path) -> None:
    log = tmp_path / "received.jsonl"
    secret = "receiver-secret-7Hq2"
    service, url = start_receiver(tmp_path, log=log, env={"FP_WEBHOOK_SECRET": secret})
    try:
        body = b'{"products":{"identification":{"data":{"requestId":"v3-id"}}}}'
        headers = {"FPJS-Event-Signature": sign(body, secret.encode()), "FP-Tap-Verdict": "trusted"}
        assert post(url, body, headers) == 200
    finally:
        assert service.stop(signal.SIGTERM) == 0
    (line,) = [json.loads(x) for x in log.read_text().splitlines()]
    assert (line["event_id"], line["signature"], line["verdict"]) == ("v3-id", "valid", "trusted")
    assert secret not in log.read_text() + service.output()


def test_a_secret_file_it_cannot_read_is_a_bad_setup(tmp_path: Path) -> None:
    import subprocess
    import sys

    from scripts.harness import REPO

    result = subprocess.run(
        [
            sys.executable,
            str(REPO / "scripts" / "receiver.py"),
            "--secret-file",
            str(tmp_path / "none"),
        ],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert (result.returncode, result.stdout) == (2, "")
    assert (
        result.stderr == f"receiver: cannot read {tmp_path / 'none'}: No such file or directory\n"
    )


def test_a_secret_file_is_read_as_the_tap_reads_it(tmp_path: Path) -> None:
    """A byte order mark and surrounding whitespace are no part of the secret: the tap
    ignored the mark, this receiver did not, and answered 401 to every delivery."""
    from fp_core.rotation import secret_file_watch

    secret_file = tmp_path / "secret"
    secret_file.write_bytes(b"\xef\xbb\xbfreceiver-secret\n")
    body = b'{"event_id":"e-1"}'
    signature = secret_file_watch(secret_file).load().sign(body)
    service, url = start_receiver(tmp_path, args=["--secret-file", str(secret_file)])
    try:
        assert post(url, body, {"FPJS-Event-Signature": signature}) == 200
    finally:
        service.stop(signal.SIGTERM)
