"""scripts/lean_endpoint.py: the pure answers, then the real process."""

from __future__ import annotations

import json
import os
import select
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from http.client import HTTPConnection
from pathlib import Path
from typing import Any

import pytest

from fp_core.envelope import parse_open_response
from fp_core.events import summarize
from fp_core.generate import iso_from_ms
from fp_core.keys import DecryptionKey
from fp_core.sealed import unseal_event
from fp_core.stats import Stats
from fp_core.tap import ResponseInfo, Tap, TapConfig
from scripts import lean_endpoint
from scripts.lean_endpoint import LeanStandIn

SCRIPT = Path(lean_endpoint.__file__)
NOW_MS = 1_795_000_000_000


def opened(body: bytes, key: DecryptionKey) -> tuple[str, Any]:
    response = parse_open_response(body)
    assert response is not None
    return response.request_id, unseal_event(response.sealed, [key])


@pytest.mark.parametrize("api", ["v4", "v3"])
def test_each_answer_is_stamped_with_its_own_id_and_time(api: Any, key: DecryptionKey) -> None:
    stand_in = LeanStandIn(key, pool=2, seed=1)
    outer, event = opened(stand_in.answer(api, now_ms=NOW_MS)[1], key)
    summary = summarize(event)
    assert (summary["api"], summary["request_id"], summary["timestamp"]) == (api, outer, NOW_MS)
    assert outer.startswith(f"{NOW_MS}.")
    text = event.text
    assert "SENTNL" not in text
    assert "1000000000123" not in text
    if api == "v3":
        ident = event["products"]["identification"]["data"]
        assert ident["time"] == iso_from_ms(NOW_MS) == ident["firstSeenAt"]["global"]
        assert event["products"]["botd"]["data"]["requestId"] == outer


@pytest.mark.parametrize("api", ["v4", "v3"])
def test_answers_are_trusted_by_the_tap_and_never_repeat(api: Any, key: DecryptionKey) -> None:
    stand_in = LeanStandIn(key, pool=3)
    tap = Tap(TapConfig(keys=[key]), Stats())
    ids, sealed = set(), set()
    for _ in range(60):
        request_id, body = stand_in.answer(api, now_ms=NOW_MS)
        record = tap.inspect(ResponseInfo("f", NOW_MS / 1000, "h", "/", "POST", 200, body))
        assert record is not None
        assert record["verdict"] == "trusted", record
        ids.add(request_id)
        sealed.add(json.loads(body)["sealed_result" if api == "v4" else "sealedResult"])
    assert len(ids) == len(sealed) == 60


def test_the_pool_is_used_in_turn(key: DecryptionKey) -> None:
    stand_in = LeanStandIn(key, pool=2, seed=7)
    visitors = [summarize(opened(stand_in.answer("v4")[1], key)[1])["visitor_id"] for _ in range(4)]
    assert visitors[0] == visitors[2] != visitors[1] == visitors[3]


def test_a_template_without_an_id_to_stamp_is_refused(
    key: DecryptionKey, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(lean_endpoint, "generate_event", lambda *a, **k: {"products": {}})
    with pytest.raises(RuntimeError, match="cannot stamp the generated v4 event"):
        LeanStandIn(key, pool=1)


def status_of(answer: bytes) -> int:
    return int(answer.split(b" ", 2)[1])


def test_http_answers_and_refusals(key: DecryptionKey) -> None:
    stand_in = LeanStandIn(key, pool=1)
    ok = stand_in.http_response("POST", "/agent?ii=x&case=ok&api=v3", keep_alive=True)
    head, _, body = ok.partition(b"\r\n\r\n")
    assert status_of(ok) == 200
    assert b"Connection: close" not in head
    assert f"Content-Length: {len(body)}".encode() in head
    request_id = head.split(b"X-Stand-In-Request-Id: ")[1].split(b"\r\n")[0].decode()
    assert opened(body, key)[0] == request_id
    closing = stand_in.http_response("GET", "/", keep_alive=False)
    assert status_of(closing) == 200
    assert b"Connection: close\r\n" in closing
    assert status_of(stand_in.http_response("POST", "/?case=stale", True)) == 400
    assert status_of(stand_in.http_response("POST", "/?api=v5", True)) == 400
    assert status_of(stand_in.http_response("PUT", "/", True)) == 405


# --- the real process ---------------------------------------------------------------


@contextmanager
def running(keys_file: Path) -> Iterator[tuple[subprocess.Popen[str], int]]:
    proc = subprocess.Popen(
        [sys.executable, str(SCRIPT), "--keys-file", str(keys_file), "--pool", "4"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        ready, _, _ = select.select([proc.stdout], [], [], 20)
        assert ready, "the lean stand-in did not print its address within 20 s"
        line = proc.stdout.readline().strip()
        assert line.startswith("listening on http://127.0.0.1:"), line
        yield proc, int(line.rsplit(":", 1)[1])
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.communicate(timeout=5)


def read_answers(sock: socket.socket, count: int) -> list[bytes]:
    """``count`` whole HTTP answers from ``sock`` (each with a Content-Length)."""
    data, answers = b"", list[bytes]()
    while len(answers) < count:
        head_end = data.find(b"\r\n\r\n")
        if head_end >= 0:
            length = int(data[:head_end].split(b"Content-Length: ")[1].split(b"\r\n")[0])
            if len(data) >= head_end + 4 + length:
                answers.append(data[: head_end + 4 + length])
                data = data[head_end + 4 + length :]
                continue
        chunk = sock.recv(65536)
        if not chunk:
            break
        data += chunk
    return answers


@pytest.mark.e2e
def test_process_keeps_alive_pipelines_and_stops_on_sigterm(
    keys_file: Path, key: DecryptionKey
) -> None:
    with running(keys_file) as (proc, port):
        conn = HTTPConnection("127.0.0.1", port, timeout=5)
        ids = []
        for api in ("v4", "v3", "v4"):
            conn.request("POST", f"/agent?ii=x&case=ok&api={api}", body=b"{}")
            response = conn.getresponse()
            body = response.read()
            assert response.status == 200
            ids.append(opened(body, key)[0])
        assert len(set(ids)) == 3
        conn.close()
        with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
            # Two requests in one write, the first with a body: two answers, in order.
            sock.sendall(
                b"POST /?api=v3 HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n\r\n{}"
                b"GET /?case=bad HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
            )
            first, second = read_answers(sock, 2)
            assert status_of(first) == 200
            assert status_of(second) == 400
            assert sock.recv(1) == b""  # closed after the second, as asked
        with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
            sock.sendall(b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n")
            (refused,) = read_answers(sock, 1)
            assert status_of(refused) == 411
            assert sock.recv(1) == b""
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=5) == 0


@pytest.mark.e2e
def test_process_refuses_a_key_file_without_keys(tmp_path: Path) -> None:
    empty = tmp_path / "keys.txt"
    fd = os.open(empty, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    os.close(fd)
    done = subprocess.run(
        [sys.executable, str(SCRIPT), "--keys-file", str(empty)],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert done.returncode == 2
    assert "no key" in done.stderr
