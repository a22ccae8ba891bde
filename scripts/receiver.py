"""A local webhook receiver for tests and benchmarks: it checks every signature with
Fingerprint's official SDK and logs what it received.

    python scripts/receiver.py [--port 0] [--log received.jsonl] [--secret-file PATH]
        [--delay-ms N] [--fail-first N] [--fail-status 500]
        [--gate PATH --closed refuse|hold|fail] [--tls-cert cert.pem --tls-key key.pem]

It prints ``receiver on http://127.0.0.1:PORT`` (or ``https://``) once the port is
bound, flushed, and serves until SIGTERM or SIGINT (exit 0). Every ``POST`` (any path)
is answered ``200 {"ok":true}`` unless told otherwise:

- ``--secret-file`` (or ``FP_WEBHOOK_SECRET``): verify ``FPJS-Event-Signature`` with
  ``fingerprint_server_sdk.WebhookValidation.is_valid_webhook_signature``; a missing or
  wrong signature is answered 401, as a backend that verifies would.
- ``--delay-ms``: a slow receiver, sleeping before each answer.
- ``--fail-first N``: answer ``--fail-status`` to the first N requests.
- ``--gate PATH``: until the file PATH exists, the receiver is *closed*, in the way
  ``--closed`` says: ``refuse`` (down: the port is bound but not listening, so
  connections are refused), ``hold`` (accept and answer nothing until the gate opens)
  or ``fail`` (answer ``--fail-status``). A test opens the gate by creating the file.

``--log`` appends one JSON line per request answered: its ``Idempotency-Key``, the
event id in the body, whether the signature was ``valid``, ``invalid``, ``missing`` or
``unchecked``, the status answered and the ``FP-Tap-*`` headers. The secret is never
written anywhere. :class:`Receiver` runs the same server inside a test process.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import signal
import socket
import ssl
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from socketserver import TCPServer
from types import FrameType
from typing import Any

from fingerprint_server_sdk import WebhookValidation

SECRET_ENV_VAR = "FP_WEBHOOK_SECRET"  # noqa: S105 (the variable's name)
CLOSED_MODES = ("refuse", "hold", "fail")
#: A held request is answered at the latest after this long, gate or not.
HOLD_MAX = 120.0
MAX_BODY = 16 * 1024 * 1024


@dataclass
class ReceiverConfig:
    secret: str | None = None
    delay_s: float = 0.0
    fail_first: int = 0
    fail_status: int = 500
    gate: Path | None = None
    closed: str = "refuse"
    log: Path | None = None


@dataclass
class Received:
    """What the receiver saw of one request (also the ``--log`` line)."""

    time: str
    request_id: str | None
    event_id: str | None
    signature: str
    status: int
    verdict: str | None
    checks: str | None
    content_type: str | None
    body_sha256: str
    body_len: int

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


@dataclass
class _State:
    lock: threading.Lock = field(default_factory=threading.Lock)
    requests: int = 0
    received: list[Received] = field(default_factory=list)


class ReceiverServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, port: int, config: ReceiverConfig, tls: ssl.SSLContext | None) -> None:
        self.config = config
        self.tls = tls
        self.state = _State()
        self._log = config.log.open("a", encoding="utf-8") if config.log else None
        super().__init__(("127.0.0.1", port), Handler, bind_and_activate=False)
        try:
            self.server_bind()
        except OSError:
            self.server_close()
            raise

    def server_bind(self) -> None:
        # HTTPServer.server_bind looks up the host's FQDN, a DNS query that can stall
        # start-up on a machine without DNS, for a name nothing here uses.
        TCPServer.server_bind(self)
        host, port = self.socket.getsockname()[:2]
        self.server_name, self.server_port = str(host), int(port)

    @property
    def url(self) -> str:
        return f"{'https' if self.tls else 'http'}://127.0.0.1:{self.server_port}/webhook"

    def gate_open(self) -> bool:
        return self.config.gate is None or self.config.gate.exists()

    def get_request(self) -> tuple[socket.socket, Any]:
        sock, address = super().get_request()
        if self.tls is None:
            return sock, address
        # The handshake then runs in the connection's own thread, under its timeout.
        return self.tls.wrap_socket(sock, server_side=True, do_handshake_on_connect=False), address

    def handle_error(self, request: Any, client_address: Any) -> None:
        error = sys.exc_info()[1]
        if isinstance(error, OSError):  # resets, broken pipes, failed TLS handshakes
            return
        super().handle_error(request, client_address)

    def record(self, received: Received) -> None:
        with self.state.lock:
            self.state.received.append(received)
            if self._log is not None:
                self._log.write(json.dumps(received.to_dict()) + "\n")
                self._log.flush()

    def take_number(self) -> int:
        """This request's number, 1 for the first."""
        with self.state.lock:
            self.state.requests += 1
            return self.state.requests

    def server_close(self) -> None:
        super().server_close()
        if self._log is not None:
            self._log.close()


class Handler(BaseHTTPRequestHandler):
    server: ReceiverServer
    protocol_version = "HTTP/1.1"
    server_version = "fp-tap-test-receiver"
    disable_nagle_algorithm = True
    timeout = 120

    def log_request(self, code: int | str = "-", size: int | str = "-") -> None:
        pass  # --log is the record of what arrived

    def do_POST(self) -> None:
        text = (self.headers.get("Content-Length") or "0").strip()
        if not (text.isascii() and text.isdigit()):
            # Not a length (or a negative one, which read() would take as "to the end")
            self._answer(400, b"")
            self.close_connection = True
            return
        length = int(text)
        if length > MAX_BODY:
            self._answer(413, b"")
            self.close_connection = True
            return
        body = self.rfile.read(length)
        config = self.server.config
        number = self.server.take_number()
        if config.closed == "hold" and not self.server.gate_open():
            deadline = time.monotonic() + HOLD_MAX
            while not self.server.gate_open() and time.monotonic() < deadline:
                time.sleep(0.05)
        if config.delay_s:
            time.sleep(config.delay_s)
        signature = self._signature(body)
        if number <= config.fail_first or (config.closed == "fail" and not self.server.gate_open()):
            status = config.fail_status
        elif signature in ("invalid", "missing"):
            status = 401
        else:
            status = 200
        self.server.record(
            Received(
                time=datetime.now(UTC).isoformat(timespec="milliseconds"),
                request_id=self.headers.get("Idempotency-Key"),
                event_id=_event_id(body),
                signature=signature,
                status=status,
                verdict=self.headers.get("FP-Tap-Verdict"),
                checks=self.headers.get("FP-Tap-Checks"),
                content_type=self.headers.get("Content-Type"),
                body_sha256=hashlib.sha256(body).hexdigest(),
                body_len=len(body),
            )
        )
        self._answer(status, b'{"ok":true}' if status == 200 else b'{"ok":false}')

    def _signature(self, body: bytes) -> str:
        secret = self.server.config.secret
        header = self.headers.get("FPJS-Event-Signature")
        if secret is None:
            return "unchecked"
        if header is None:
            return "missing"
        valid = WebhookValidation.is_valid_webhook_signature(header, body, secret)
        return "valid" if valid else "invalid"

    def _answer(self, status: int, body: bytes) -> None:
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


def _event_id(body: bytes) -> str | None:
    try:
        event = json.loads(body)
    except (ValueError, RecursionError):  # not JSON, or nested too deeply to read
        return None
    if not isinstance(event, dict):
        return None
    if isinstance(event.get("event_id"), str):
        return str(event["event_id"])
    for product in ("identification", "botd"):
        data = _object(_object(_object(event.get("products")).get(product)).get("data"))
        if isinstance(data.get("requestId"), str):
            return str(data["requestId"])
    return None


def _object(value: object) -> dict[str, Any]:
    """``value`` when a JSON object, else an empty one: any body is answered."""
    return value if isinstance(value, dict) else {}


class Receiver:
    """The receiver inside the calling process (unit and addon tests)."""

    def __init__(
        self, config: ReceiverConfig | None = None, *, tls: ssl.SSLContext | None = None
    ) -> None:
        self.server = ReceiverServer(0, config or ReceiverConfig(), tls)
        self._serving = Serving(self.server)

    @property
    def url(self) -> str:
        return self.server.url

    @property
    def received(self) -> list[Received]:
        with self.server.state.lock:
            return list(self.server.state.received)

    def wait_for(self, count: int, timeout: float = 30.0, *, status: int = 200) -> list[Received]:
        """Wait until ``count`` requests were answered ``status``; all received so far."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if sum(r.status == status for r in self.received) >= count:
                return self.received
            time.sleep(0.02)
        raise AssertionError(f"received {len(self.received)} request(s), wanted {count}")

    def close(self) -> None:
        self._serving.stop()


class Serving:
    """Serve ``server`` in a thread; in ``refuse`` mode only once the gate opens."""

    def __init__(self, server: ReceiverServer) -> None:
        self.server = server
        self._stop = threading.Event()
        self._started = threading.Event()
        self._refusing = server.config.closed == "refuse" and not server.gate_open()
        if not self._refusing:
            self._activate()  # listening before the caller goes on to connect
        self._thread = threading.Thread(target=self._run, name="receiver", daemon=True)
        self._thread.start()

    def _activate(self) -> None:
        self.server.server_activate()
        self._started.set()

    def _run(self) -> None:
        if self._refusing:
            while not self.server.gate_open():
                if self._stop.wait(0.05):
                    return
            self._activate()
        self.server.serve_forever(0.05)

    def stop(self) -> None:
        self._stop.set()
        if self._started.is_set():
            self.server.shutdown()
        self._thread.join(10)
        self.server.server_close()


def _parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="receiver.py", description=__doc__.split("\n")[0])
    parser.add_argument("--port", type=int, default=0, help="port on 127.0.0.1; 0 picks one")
    parser.add_argument("--log", type=Path, help="append one JSON line per request")
    parser.add_argument("--secret-file", help=f"the signing secret (else {SECRET_ENV_VAR})")
    parser.add_argument("--delay-ms", type=int, default=0, help="sleep before each answer")
    parser.add_argument("--fail-first", type=int, default=0, help="fail the first N requests")
    parser.add_argument("--fail-status", type=int, default=500, help="status of a failure")
    parser.add_argument("--gate", type=Path, help="closed until this file exists")
    parser.add_argument("--closed", choices=CLOSED_MODES, default="refuse")
    parser.add_argument("--tls-cert", help="PEM certificate: serve HTTPS (needs --tls-key)")
    parser.add_argument("--tls-key", help="PEM private key of --tls-cert")
    args = parser.parse_args(argv)
    if (args.tls_cert is None) != (args.tls_key is None):
        parser.error("--tls-cert and --tls-key go together")
    if args.delay_ms < 0 or args.fail_first < 0:
        parser.error("--delay-ms and --fail-first cannot be negative")
    return args


def tls_context(cert: str, key: str) -> ssl.SSLContext:
    """A server context for ``cert``/``key``."""
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert, key)
    return context


def main(argv: Sequence[str] | None = None) -> int:
    """Serve until SIGTERM or SIGINT; 0 on a clean stop, 2 on a bad setup."""
    args = _parse_args(argv)
    # Read as the tap reads it: surrounding whitespace and a byte order mark are no part
    # of the secret.
    secret = os.environ.get(SECRET_ENV_VAR, "").strip() or None
    if args.secret_file:
        try:
            secret = Path(args.secret_file).read_text(encoding="utf-8-sig").strip()
        except (OSError, UnicodeDecodeError) as exc:
            why = exc.strerror if isinstance(exc, OSError) else "not UTF-8"
            print(f"receiver: cannot read {args.secret_file}: {why}", file=sys.stderr)
            return 2
    config = ReceiverConfig(
        secret=secret,
        delay_s=args.delay_ms / 1000,
        fail_first=args.fail_first,
        fail_status=args.fail_status,
        gate=args.gate,
        closed=args.closed,
        log=args.log,
    )
    try:
        tls = tls_context(args.tls_cert, args.tls_key) if args.tls_cert else None
        server = ReceiverServer(args.port, config, tls)
    except (OSError, ssl.SSLError) as error:
        print(f"receiver: cannot start: {error}", file=sys.stderr)
        return 2
    stop = threading.Event()

    def request_stop(signum: int, frame: FrameType | None) -> None:
        stop.set()

    signal.signal(signal.SIGTERM, request_stop)
    signal.signal(signal.SIGINT, request_stop)
    serving = Serving(server)  # listening (unless refusing) before it says where
    print(f"receiver on {server.url}", flush=True)
    stop.wait()
    serving.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
