"""fp_core.webhook: signing, the secret, headers, the spool sink and the HTTP poster."""

from __future__ import annotations

import json
import logging
import pickle
import re
import secrets
import socket
import sqlite3
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from fingerprint_server_sdk import WebhookValidation

from fp_core.jsontext import JsonObject
from fp_core.rotation import load_secret_watched, secret_file_watch
from fp_core.spool import Spool
from fp_core.sqlite_files import SqliteFileError
from fp_core.stats import Stats
from fp_core.webhook import (
    CHECKS_HEADER,
    IDEMPOTENCY_HEADER,
    SECRET_ENV_VAR,
    SIGNATURE_HEADER,
    VERDICT_HEADER,
    HeldEvents,
    HttpPoster,
    WebhookConfigError,
    WebhookSecret,
    WebhookSink,
    check_url,
    describe_url,
    env_secret,
    idempotency_key,
    is_plaintext_remote,
    outgoing,
    request_headers,
    sign,
    verdict_header,
)
from scripts.harness import free_port, make_tls_files
from scripts.receiver import Receiver, ReceiverConfig, tls_context


def new_secret() -> str:
    return secrets.token_urlsafe(24)


def record(
    *, ok: bool = True, verdict: str = "trusted", reasons: list[str] | None = None
) -> dict[str, Any]:
    rec: dict[str, Any] = {
        "request_id": "1795730334960.4ucbXp",
        "ok": ok,
        "verdict": verdict if ok else "error",
        "reasons": reasons or [],
        "checks": {"id_match": True, "fresh": True, "age_ms": 7, "duplicate": False},
    }
    if ok:
        rec["event"] = {"event_id": "1795730334960.4ucbXp", "url": "https://příklad.cz/"}
    return rec


# -- signing and the secret -----------------------------------------------------------


def test_signature_known_answer() -> None:
    expected = "v1=1b2c16b75bd2a870c114153ccda5bcfca63314bc722fa160d690de133ccbb9db"
    assert sign(b"data", b"secret") == expected
    assert WebhookSecret("secret").sign(b"data") == expected


def test_the_official_sdk_accepts_our_signatures() -> None:
    secret = new_secret()
    body = json.dumps(record()["event"], ensure_ascii=False).encode()
    header = WebhookSecret(secret).sign(body)
    assert WebhookValidation.is_valid_webhook_signature(header, body, secret)
    assert not WebhookValidation.is_valid_webhook_signature(header, body + b" ", secret)
    assert not WebhookValidation.is_valid_webhook_signature(header, body, new_secret())


def test_the_secret_never_shows() -> None:
    value = new_secret()
    secret = WebhookSecret(value)
    assert value not in repr(secret)
    assert value not in str(secret)
    assert value not in f"{secret!r} {[secret]}"
    with pytest.raises(TypeError):
        pickle.dumps(secret)


def test_secret_from_the_environment(tmp_path: Path) -> None:
    value = new_secret()
    secret = env_secret(None, {SECRET_ENV_VAR: f" {value}\n"})
    assert secret is not None
    assert secret.sign(b"x") == sign(b"x", value.encode())
    assert env_secret(None, {SECRET_ENV_VAR: ""}) is None
    assert env_secret(None, {}) is None


def test_secret_from_a_file(tmp_path: Path) -> None:
    value = new_secret()
    path = tmp_path / "secret"
    path.write_text(value + "\n")
    secret = secret_file_watch(path).load()
    assert secret.sign(b"x") == sign(b"x", value.encode())


@pytest.mark.parametrize(
    ("content", "environ", "message"),
    [
        ("file-secret", {SECRET_ENV_VAR: "env-secret"}, "set twice"),
        ("  \n", {}, "is empty"),
        (None, {}, "cannot read"),
    ],
)
def test_secret_errors_never_contain_it(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    content: str | None,
    environ: dict[str, str],
    message: str,
) -> None:
    monkeypatch.delenv(SECRET_ENV_VAR, raising=False)
    for name, value in environ.items():
        monkeypatch.setenv(name, value)
    path = tmp_path / "secret"
    if content is not None:
        path.write_text(content)
    with pytest.raises(WebhookConfigError, match=message) as info:
        load_secret_watched(str(path))
    assert "file-secret" not in str(info.value)
    assert "env-secret" not in str(info.value)


# -- URLs and headers -------------------------------------------------------------------


@pytest.mark.parametrize(
    "url",
    [
        "http://127.0.0.1:8080/hook",
        "https://backend.example/fp?tenant=3",
        "http://[::1]/",
        "http://backend.example/my%20ho%C3%B6k?q=a%20b",
    ],
)
def test_good_urls(url: str) -> None:
    assert check_url(url) == url


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("ftp://backend.example/", "scheme"),
        ("backend.example/hook", "scheme"),
        ("https:///nohost", "no host"),
        ("https://user:pw@backend.example/", "credentials"),
        ("http://backend.example:99999/", "not a valid URL"),
        # http.client would refuse these at every attempt, until the events are parked.
        ("http://backend.example/hoök", "percent-encoded"),
        ("http://backend.example/my hook", "percent-encoded"),
        ("http://backend.example/hook?q=a\tb", "percent-encoded"),
    ],
)
def test_bad_urls(url: str, message: str) -> None:
    with pytest.raises(WebhookConfigError, match=message) as info:
        check_url(url)
    assert "pw" not in str(info.value)


def test_plaintext_to_another_host_is_spotted() -> None:
    assert is_plaintext_remote("http://backend.example/hook")
    assert is_plaintext_remote("http://10.0.0.7/hook")
    assert not is_plaintext_remote("http://127.0.0.1:9/hook")
    assert not is_plaintext_remote("http://localhost/hook")
    assert not is_plaintext_remote("http://[::1]/hook")
    assert not is_plaintext_remote("https://backend.example/hook")


def test_describe_url_leaves_out_the_query() -> None:
    assert describe_url("https://b.example/fp?token=abc") == "https://b.example/fp"


def test_verdict_header() -> None:
    assert verdict_header(record()) == "trusted"
    suspicious = record(verdict="suspicious", reasons=["duplicate", "bad_bot"])
    assert verdict_header(suspicious) == "suspicious; reasons=duplicate,bad_bot"


def test_only_unsealed_events_are_forwarded() -> None:
    rec = record(verdict="suspicious", reasons=["bad_bot"])
    item = outgoing(rec)
    assert item is not None
    assert item.request_id == rec["request_id"]
    assert json.loads(item.body) == rec["event"]
    assert "příklad".encode() in item.body, "UTF-8, as the JSONL file has it"
    assert item.headers[VERDICT_HEADER] == "suspicious; reasons=bad_bot"
    assert json.loads(item.headers[CHECKS_HEADER]) == rec["checks"]
    assert item.headers[CHECKS_HEADER].isascii()
    assert outgoing(record(ok=False)) is None
    without_event = record()
    del without_event["event"]
    assert outgoing(without_event) is None


def test_the_idempotency_key_is_the_sealed_id_and_header_safe() -> None:
    rec = record()
    rec["summary"] = {"request_id": "1795730334960.4ucbXp"}
    rec["request_id"] = "1795730399999.forged"  # a spliced or replayed outer id
    item = outgoing(rec)
    assert item is not None
    assert item.request_id == "1795730334960.4ucbXp", "the authenticated id, not the outer"
    rec["summary"] = {"request_id": None}  # no id sealed: the outer one it is
    assert idempotency_key(rec) == "1795730399999.forged"
    server = Receiver(ReceiverConfig())
    poster = HttpPoster(server.url, timeout=5)
    for unsafe in ("a\r\nX-Injected: 1", "p\u0159\u00edklad", "with space", "x" * 257):
        rec["summary"] = {"request_id": unsafe}
        key = idempotency_key(rec)
        assert re.fullmatch(r"sha256-[0-9a-f]{64}", key), unsafe
        assert key == idempotency_key(rec), "the same id, the same key"
        # Such an id as the header made every attempt fail ("internal"), for a day.
        assert poster.post(b"{}", request_headers({}, key, b"{}", None)).ok, unsafe
    poster.close_local()
    server.close()
    assert len(server.received) == 4


def test_the_body_is_the_event_as_sealed() -> None:
    rec = record()
    text = '{"event_id": "1795730334960.4ucbXp",  "url": "https://p\u0159\u00edklad.cz/"}'
    rec["event"] = JsonObject(json.loads(text), text)
    item = outgoing(rec)
    assert item is not None
    assert item.body == text.encode()


def test_request_headers() -> None:
    value = new_secret()
    headers = request_headers({VERDICT_HEADER: "trusted"}, "rid-1", b"{}", WebhookSecret(value))
    assert headers["Content-Type"] == "application/json"
    assert headers[IDEMPOTENCY_HEADER] == "rid-1"
    assert headers[VERDICT_HEADER] == "trusted"
    assert WebhookValidation.is_valid_webhook_signature(headers[SIGNATURE_HEADER], b"{}", value)
    assert SIGNATURE_HEADER not in request_headers({}, "rid-1", b"{}", None)


def test_the_sink_spools_unsealed_events_only(tmp_path: Path) -> None:
    stats = Stats()
    spool = Spool(str(tmp_path / "state"))
    woken: list[bool] = []
    sink = WebhookSink(spool, stats, lambda: woken.append(True))
    sink.write([record(), record(ok=False), record(verdict="suspicious", reasons=["duplicate"])])
    sink.write([record(ok=False)])
    assert spool.pending == 2
    assert stats.group("webhook") == {"spooled": 2}
    assert woken == [True], "woken once per batch that spooled something"
    sink.close()
    spool.close()


def test_a_full_spool_refuses_new_events_counts_and_warns_once(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    stats = Stats()
    spool = Spool(str(tmp_path / "state"))
    limit = [3]
    sink = WebhookSink(spool, stats, None, lambda: limit[0])
    with caplog.at_level(logging.WARNING, logger="fp_core.webhook"):
        sink.write([record() for _ in range(5)])
        sink.write([record()])
    assert spool.pending == 3, "the first three kept their place"
    assert stats.group("webhook") == {"spooled": 3, "spool_full": 3}
    (warning,) = [r.getMessage() for r in caplog.records]
    assert warning == (
        "fp-tap: webhook spool full (fp_webhook_max_events=3, pending and parked): "
        "2 event(s) not spooled (2 so far)"
    )
    limit[0] = 4  # the option raised while running: room for one more
    sink.write([record(), record()])
    assert spool.pending == 4
    assert stats.group("webhook") == {"spooled": 4, "spool_full": 4}
    spool.close()


def numbered(n: int) -> dict[str, Any]:
    rec = record()
    rec["request_id"] = rec["event"]["event_id"] = f"1795730334960.req{n}"
    return rec


def spooled_ids(spool: Spool) -> list[str]:
    conn = sqlite3.connect(spool.path)
    try:
        return [r[0] for r in conn.execute("SELECT request_id FROM events ORDER BY id")]
    finally:
        conn.close()


def test_events_a_locked_spool_cannot_take_are_held_and_spooled_later_in_order(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """At least once: an event whose record reaches the other sinks reaches the spool."""
    stats = Stats()
    spool = Spool(str(tmp_path / "state"))
    clock = [0.0]
    sink = WebhookSink(spool, stats, held=HeldEvents(clock=lambda: clock[0]))
    shell = sqlite3.connect(spool.path, isolation_level=None)
    shell.execute("BEGIN EXCLUSIVE")  # an operator's sqlite3 shell, a backup tool
    try:
        with caplog.at_level(logging.WARNING, logger="fp_core.webhook"):
            sink.write([numbered(1)])  # waits out the spool's busy timeout once
        assert len(sink.held) == 1
        sink.write([numbered(2)])  # before the retry time: held, no second wait
        assert len(sink.held) == 2
    finally:
        shell.execute("ROLLBACK")
        shell.close()
    assert stats.group("webhook") == {"spool_errors": 1}
    (warning,) = [r.getMessage() for r in caplog.records]
    assert warning.startswith("fp-tap: cannot spool webhook events (webhook spool ")
    assert warning.endswith("database is locked); holding 1 and retrying")
    sink.retry_held()
    assert len(sink.held) == 2, "not before its time"
    clock[0] += 0.5
    sink.retry_held()
    assert len(sink.held) == 0
    assert spooled_ids(spool) == ["1795730334960.req1", "1795730334960.req2"]
    assert stats.group("webhook") == {"spool_errors": 1, "spooled": 2}
    sink.close()
    spool.close()


class FailingSpool:
    """A spool whose file refuses writes while ``failing``."""

    def __init__(self) -> None:
        self.failing = True
        self.added: list[str] = []

    def add(self, items: Any, max_events: int | None = None) -> int:
        if self.failing:
            raise SqliteFileError("webhook spool x: database or disk is full")
        self.added += [i.request_id for i in items]
        return len(items)


def test_held_events_are_bounded_retried_with_backoff_and_shared_by_the_next_sink(
    caplog: pytest.LogCaptureFixture,
) -> None:
    stats, spool, clock = Stats(), FailingSpool(), [0.0]
    held = HeldEvents(clock=lambda: clock[0], max_held=3)
    sink = WebhookSink(spool, stats, held=held)  # type: ignore[arg-type]
    sink.write([numbered(n) for n in range(5)])
    assert len(held) == 3
    assert stats.group("webhook") == {"lost": 2, "spool_errors": 1}, "the oldest go"
    for wait in (0.5, 1.0, 2.0, 4.0, 5.0, 5.0):  # doubling, up to 5 s
        errors = stats.group("webhook")["spool_errors"]
        clock[0] += wait - 0.01
        sink.retry_held()
        assert stats.group("webhook")["spool_errors"] == errors, f"tried before {wait} s"
        clock[0] += 0.01
        sink.retry_held()
        assert stats.group("webhook")["spool_errors"] == errors + 1, f"not tried at {wait} s"
    spool.failing = False
    sink.write([numbered(5)])  # before the retry time: held behind the others
    assert spool.added == []
    assert stats.group("webhook")["lost"] == 3, "req2 made room for it"
    clock[0] += 5
    sink.retry_held()
    assert spool.added == [f"1795730334960.req{n}" for n in (3, 4, 5)]
    spool.failing = True
    sink.write([numbered(6)])
    sink.close()  # a writer replaced by an option change: its events stay held...
    assert len(held) == 1
    assert stats.group("webhook")["lost"] == 3
    spool.failing = False
    clock[0] += 5
    next_sink = WebhookSink(spool, stats, held=held)  # type: ignore[arg-type]
    next_sink.retry_held()  # ... for the next writer's sink
    assert spool.added[-1] == "1795730334960.req6"
    spool.failing = True
    sink.write([numbered(7)])
    with caplog.at_level(logging.WARNING, logger="fp_core.webhook"):
        held.give_up(stats, "the spool closed")  # what the delivery does last
    assert len(held) == 0
    assert stats.group("webhook")["lost"] == 4
    assert "1 webhook event(s) never spooled: the spool closed" in caplog.text


# -- HttpPoster against real servers -------------------------------------------------


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    server = Receiver(ReceiverConfig(secret="receiver-secret"))
    yield server
    server.close()


def test_post_reaches_the_receiver_signed(receiver: Receiver) -> None:
    poster = HttpPoster(receiver.url, timeout=5)
    body = b'{"event_id":"rid-1"}'
    headers = request_headers(
        {VERDICT_HEADER: "trusted"}, "rid-1", body, WebhookSecret("receiver-secret")
    )
    result = poster.post(body, headers)
    assert (result.ok, result.status, result.error) == (True, 200, None)
    (got,) = receiver.received
    assert (got.request_id, got.event_id, got.signature) == ("rid-1", "rid-1", "valid")
    assert got.content_type == "application/json"
    assert got.verdict == "trusted"
    poster.close_local()


def test_a_wrong_signature_is_refused_by_the_receiver(receiver: Receiver) -> None:
    poster = HttpPoster(receiver.url, timeout=5)
    result = poster.post(b"{}", request_headers({}, "rid", b"{}", WebhookSecret("other")))
    assert (result.ok, result.error) == (False, "http_401")
    assert receiver.received[0].signature == "invalid"
    poster.close_local()


def test_non_2xx_is_a_failure() -> None:
    server = Receiver(ReceiverConfig(fail_first=1, fail_status=500))
    poster = HttpPoster(server.url, timeout=5)
    assert poster.post(b"{}", {}).error == "http_500"
    assert poster.post(b"{}", {}).ok
    poster.close_local()
    server.close()


def test_refused_connection() -> None:
    poster = HttpPoster(f"http://127.0.0.1:{free_port()}/", timeout=5)
    result = poster.post(b"{}", {})
    assert (result.status, result.error) == (None, "connection")
    assert result.detail == "Connection refused"


def test_a_garbled_answer_is_a_protocol_error_named_not_quoted() -> None:
    """What the receiver sent back stays out of the warning: only the error's name."""
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]

    def answer_garbage() -> None:
        conn, _ = listener.accept()
        with conn:
            conn.recv(65536)
            conn.sendall(b"NOT-HTTP token=abc123\r\n\r\n")

    thread = threading.Thread(target=answer_garbage, daemon=True)
    thread.start()
    result = HttpPoster(f"http://127.0.0.1:{port}/hook?token=abc123", timeout=5).post(b"{}", {})
    thread.join(5)
    listener.close()
    assert (result.status, result.error, result.detail) == (None, "protocol", "BadStatusLine")


def test_timeout_is_its_own_error() -> None:
    server = Receiver(ReceiverConfig(delay_s=2))
    poster = HttpPoster(server.url, timeout=0.2)
    result = poster.post(b"{}", {})
    assert (result.error, result.detail) == ("timeout", "timed out")
    server.close()


def test_https_with_a_private_ca(tmp_path: Path) -> None:
    ca, cert, key = make_tls_files(tmp_path / "tls")
    server = Receiver(tls=tls_context(str(cert), str(key)))
    assert server.url.startswith("https://")
    poster = HttpPoster(server.url, timeout=5, ca_file=str(ca))
    assert poster.post(b"{}", {}).ok
    poster.close_local()
    # Without that CA the certificate is not trusted: no delivery.
    untrusting = HttpPoster(server.url, timeout=5)
    result = untrusting.post(b"{}", {})
    assert result.error == "tls"
    assert result.detail is not None
    assert "certificate verify failed" in result.detail
    server.close()
    assert len(server.received) == 1


def test_a_missing_ca_file_is_a_configuration_error(tmp_path: Path) -> None:
    with pytest.raises(WebhookConfigError, match="CA file"):
        HttpPoster("https://127.0.0.1/", timeout=5, ca_file=str(tmp_path / "none.pem"))


class _Counting(ThreadingHTTPServer):
    daemon_threads = True
    connections = 0
    #: Answer Retry-After with 503 when set; close after each answer when True.
    retry_after: str | None = None
    close_after_answer = False


class _CountingHandler(BaseHTTPRequestHandler):
    server: _Counting
    protocol_version = "HTTP/1.1"

    def setup(self) -> None:
        super().setup()
        self.server.connections += 1

    def log_message(self, *args: Any) -> None:
        pass

    def do_POST(self) -> None:
        self.rfile.read(int(self.headers["Content-Length"]))
        status = 503 if self.server.retry_after is not None else 200
        self.send_response(status)
        if self.server.retry_after is not None:
            self.send_header("Retry-After", self.server.retry_after)
        self.send_header("Content-Length", "0")
        self.end_headers()
        if self.server.close_after_answer:
            # As an idle keep-alive timeout would: no "Connection: close" warning.
            self.wfile.flush()
            self.connection.shutdown(socket.SHUT_RDWR)
            self.close_connection = True


@pytest.fixture
def counting() -> Iterator[_Counting]:
    server = _Counting(("127.0.0.1", 0), _CountingHandler)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05})
    thread.start()
    yield server
    server.shutdown()
    server.server_close()
    thread.join(10)


def test_one_connection_is_kept_alive_per_thread(counting: _Counting) -> None:
    poster = HttpPoster(f"http://127.0.0.1:{counting.server_port}/", timeout=5)
    assert all(poster.post(b"{}", {}).ok for _ in range(5))
    assert counting.connections == 1
    other = threading.Thread(target=lambda: poster.post(b"{}", {}))
    other.start()
    other.join(10)
    assert counting.connections == 2
    poster.close_local()


def test_a_connection_the_receiver_closed_is_replaced_at_once(counting: _Counting) -> None:
    counting.close_after_answer = True
    poster = HttpPoster(f"http://127.0.0.1:{counting.server_port}/", timeout=5)
    assert poster.post(b"{}", {}).ok
    time.sleep(0.05)  # let the close arrive, as an idle timeout's would
    assert poster.post(b"{}", {}).ok, "the stale connection cost no failed attempt"
    assert counting.connections == 2
    poster.close_local()


def test_retry_after_is_read_from_503(counting: _Counting) -> None:
    counting.retry_after = "7"
    poster = HttpPoster(f"http://127.0.0.1:{counting.server_port}/", timeout=5)
    result = poster.post(b"{}", {})
    assert (result.error, result.retry_after) == ("http_503", 7.0)
    counting.retry_after = "Wed, 21 Oct 2015 07:28:00 GMT"  # dates are not honoured
    assert poster.post(b"{}", {}).retry_after is None
    # A digit to str.isdigit() that float() refuses: still the receiver's 503.
    counting.retry_after = "\u00b2"
    result = poster.post(b"{}", {})
    assert (result.status, result.error, result.retry_after) == (503, "http_503", None)
    poster.close_local()


# --- informational (1xx) answers: a raw server, one connection at a time -------------


def _read_request(conn: socket.socket, buf: bytearray) -> bytes | None:
    """One HTTP request (head + Content-Length body) from ``conn``; None at EOF."""
    while b"\r\n\r\n" not in buf:
        data = conn.recv(65536)
        if not data:
            return None
        buf.extend(data)
    head, _, rest = bytes(buf).partition(b"\r\n\r\n")
    length = 0
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            length = int(value.strip())
    while len(rest) < length:
        data = conn.recv(65536)
        if not data:
            return None
        rest += data
    buf[:] = rest[length:]
    return head + b"\r\n\r\n" + rest[:length]


class RawServer:
    """``answer(n, conn)`` writes the raw answer to the n-th request (from 1)."""

    def __init__(self, answer: Any) -> None:
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.listener.settimeout(0.1)
        self.url = f"http://127.0.0.1:{self.listener.getsockname()[1]}/hook"
        self.answer = answer
        self.requests: list[bytes] = []
        self.connections = 0
        self._stop = False
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        while not self._stop:
            try:
                conn, _ = self.listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            self.connections += 1
            conn.settimeout(10)
            buf = bytearray()
            with conn:
                try:
                    while (request := _read_request(conn, buf)) is not None:
                        self.requests.append(request)
                        self.answer(len(self.requests), conn)
                except OSError:
                    pass

    def close(self) -> None:
        self._stop = True
        self.listener.close()
        self.thread.join(5)


@pytest.fixture
def raw_servers() -> Iterator[list[RawServer]]:
    servers: list[RawServer] = []
    yield servers
    for server in servers:
        server.close()


EARLY_HINTS = b"HTTP/1.1 103 Early Hints\r\nLink: </style.css>; rel=preload\r\n\r\n"


def hints_then_200_then_500(n: int, conn: socket.socket) -> None:
    """The first POST: 103 Early Hints (as a CDN sends it, on its own), then 200; every
    later one: 500."""
    if n == 1:
        conn.sendall(EARLY_HINTS)
        time.sleep(0.2)
        conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
    else:
        conn.sendall(b"HTTP/1.1 500 Internal Server Error\r\nContent-Length: 2\r\n\r\nno")


def test_informational_answers_are_skipped_and_never_taken_for_the_next_event(
    raw_servers: list[RawServer],
) -> None:
    """RFC 9110 15.2: any 1xx may come before the final answer. http.client skipped only
    100: the 103 was the answer, and its 200 was read as the next event's."""
    server = RawServer(hints_then_200_then_500)
    raw_servers.append(server)
    poster = HttpPoster(server.url, timeout=5)
    try:
        first = poster.post(b'{"event_id":"a"}', {})
        time.sleep(0.3)  # the first event's final answer has arrived
        second = poster.post(b'{"event_id":"b"}', {})
    finally:
        poster.close_local()
    assert (first.status, first.error) == (200, None)
    assert (second.status, second.error) == (500, "http_500")
    assert server.connections == 1  # the connection was kept alive, and in step


def test_endless_informational_answers_are_a_protocol_error(
    raw_servers: list[RawServer],
) -> None:
    server = RawServer(lambda n, conn: conn.sendall(EARLY_HINTS * 40))
    raw_servers.append(server)
    result = HttpPoster(server.url, timeout=5).post(b"{}", {})
    assert (result.status, result.error, result.detail) == (None, "protocol", "HTTPException")


def test_101_switching_protocols_is_a_failure_that_closes_the_connection(
    raw_servers: list[RawServer],
) -> None:
    def answer(n: int, conn: socket.socket) -> None:
        if n == 1:
            conn.sendall(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: x\r\n\r\n")
        else:
            conn.sendall(b"HTTP/1.1 204 No Content\r\n\r\n")

    server = RawServer(answer)
    raw_servers.append(server)
    poster = HttpPoster(server.url, timeout=5)
    try:
        first = poster.post(b"{}", {})
        second = poster.post(b"{}", {})
    finally:
        poster.close_local()
    assert (first.status, first.error) == (101, "http_101")
    assert (second.status, second.error) == (204, None)
    assert server.connections == 2


def test_an_event_refused_after_another_ones_103_stays_in_the_spool(
    raw_servers: list[RawServer], tmp_path: Path
) -> None:
    """Through the real delivery: B, which the receiver only ever refused, was deleted
    from the spool and counted as sent on A's 200, and A was sent again and again."""
    from fp_core.delivery import Delivery, DeliveryConfig
    from fp_core.webhook import Outgoing

    server = RawServer(hints_then_200_then_500)
    raw_servers.append(server)
    spool = Spool(str(tmp_path / "state"))
    spool.add([Outgoing("A", b'{"event_id":"A"}'), Outgoing("B", b'{"event_id":"B"}')])
    stats = Stats()
    config = DeliveryConfig(
        url=server.url, timeout=5, concurrency=1, retry_first=0.05, retry_max=0.2
    )
    delivery = Delivery(spool, config, stats)
    delivery.start()
    try:
        deadline = time.monotonic() + 15
        while len(server.requests) < 5:
            assert time.monotonic() < deadline, "no retries within 15 s"
            time.sleep(0.02)
    finally:
        delivery.close(drain=0)
    assert stats.group("webhook").get("sent", 0) == 1
    reopened = Spool(str(tmp_path / "state"))
    try:
        left = [s.request_id for s in reopened.due(time.time() + 1e6, 10)]
    finally:
        reopened.close()
    assert left == ["B"]


def test_a_secret_file_with_a_byte_order_mark_signs_with_the_secret(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """U+FEFF is no whitespace: every delivery was signed with it, and refused by the
    receiver, with nothing logged (found by an API hunt)."""
    monkeypatch.delenv(SECRET_ENV_VAR, raising=False)
    path = tmp_path / "webhook.secret"
    path.write_bytes(b"\xef\xbb\xbf" + b"s3cret-for-tests\r\n")
    secret, _ = load_secret_watched(str(path))
    assert secret is not None
    assert secret.sign(b"{}") == sign(b"{}", b"s3cret-for-tests")


def test_a_timeout_meant_as_none_still_fits_a_socket(raw_servers: list[RawServer]) -> None:
    """10**10 s overflowed socket.settimeout: every attempt an internal failure (found by
    a delivery hunt)."""
    server = RawServer(lambda n, conn: conn.sendall(b"HTTP/1.1 204 No Content\r\n\r\n"))
    raw_servers.append(server)
    poster = HttpPoster(server.url, timeout=float(10**10))
    try:
        assert (poster.post(b"{}", {}).status, poster.post(b"{}", {}).error) == (204, None)
    finally:
        poster.close_local()
