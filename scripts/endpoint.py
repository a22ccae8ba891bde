"""A local stand-in for the Fingerprint API with Open Client Response enabled.

The demo, the end-to-end tests (a real ``mitmdump`` between a real client and this
server) and the benchmarks point their traffic here instead of at ``api.fpjs.io``::

    python scripts/endpoint.py --keys-file keys.txt [--port 0] [--api v4] \\
        [--tls-cert cert.pem --tls-key key.pem] [--log answers.jsonl] [--delay-ms 0]

It prints ``listening on http://127.0.0.1:PORT`` (or ``https://``) once, flushed, and
serves until SIGTERM or SIGINT (exit 0). It answers ``POST`` and ``GET`` on any path;
the query string chooses the answer (unknown parameters, such as ``ii=``, are ignored):

- ``case=``: ``ok`` (default), ``good_bot``, ``bad_bot``, ``mismatch``, ``wrong_key``,
  ``bad_base64``, ``bad_header``, ``truncated``, ``not_deflate``, ``not_json``,
  ``not_event``, ``bomb``, ``stale``, ``replayed`` (open responses) or ``plain``,
  ``html``, ``empty``, ``huge``, ``garbage`` (ordinary traffic); see ``CASES``.
- ``api=v3|v4``: the open-response and event shape (default: ``--api``).
- ``encoding=identity|gzip|deflate|br|zstd``: the response's Content-Encoding.
- ``seed=N``: derive everything random (event, request id, AES-GCM nonce, bytes) from
  N. With ``ts`` as well, identical requests get byte-identical bodies; without it the
  event is stamped "now", which changes the timestamp and the request id built from it.
- ``ts=MS``: the event's timestamp in epoch milliseconds (default: now, so it is fresh).
- ``status=N``: the HTTP status, 200-599 (default 200; 204 for ``case=empty``).

Every open response is sealed with the first key of ``--keys-file``. The header
``X-Stand-In-Request-Id`` carries the outer request id (empty for ordinary traffic).
``--log`` appends one JSON line per response sent; it records whether the request had
an ``FPJS-Proxy-Secret`` header, never its value, and no key material is ever output.

:func:`build_response` is the pure core, importable by tests.
"""

from __future__ import annotations

import argparse
import base64
import gzip
import hashlib
import importlib
import json
import random
import socket
import ssl
import sys
import threading
import time
import traceback
import urllib.parse
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from functools import cache
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from socketserver import TCPServer
from typing import Any, NamedTuple, TextIO

# `python scripts/endpoint.py` puts scripts/ on sys.path, not the repository root, and
# fp_core is deliberately not installed (the addon runs as a plain mitmdump script).
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from fp_core.envelope import parse_open_response
from fp_core.events import Api
from fp_core.generate import generate_event, new_request_id, open_response_body
from fp_core.hostile import hostile_response
from fp_core.keys import KEY_SIZE, DecryptionKey
from fp_core.sealed import HEADER, NONCE_SIZE, deflate_raw, seal_event, seal_raw
from scripts.harness import sealing_key, stop_on_signals

#: Cases that answer with an open response (a sealed result, valid or broken).
OPEN_CASES = (
    "ok",
    "good_bot",
    "bad_bot",
    "mismatch",
    "wrong_key",
    "bad_base64",
    "bad_header",
    "truncated",
    "not_deflate",
    "not_json",
    "not_event",
    "bomb",
    "stale",
    "replayed",
)
#: Cases that answer with ordinary traffic, which a tap must ignore.
ORDINARY_CASES = ("plain", "html", "empty", "huge", "garbage")
#: One of fp_core.hostile's malformed or hostile responses, chosen by the seed; the
#: answer says what the tap must make of it in ``X-Stand-In-Expect``.
HOSTILE_CASE = "hostile"
CASES = (*OPEN_CASES, *ORDINARY_CASES, HOSTILE_CASE)
APIS: tuple[Api, ...] = ("v3", "v4")
ENCODINGS = ("identity", "gzip", "deflate", "br", "zstd")

STALE_AGE_MS = 10 * 60 * 1000
#: The last millisecond of year 9999: later times do not fit an ISO date (v3 events).
MAX_TS = 253_402_300_799_999
BOMB_SIZE = 64 * 1024 * 1024
HUGE_SIZE = 2 * 1024 * 1024
GARBAGE_SIZE = 4096
JSON_TYPE = "application/json; charset=utf-8"
TEXT_TYPE = "text/plain; charset=utf-8"
HTML_TYPE = "text/html; charset=utf-8"
REQUEST_ID_HEADER = "X-Stand-In-Request-Id"
EXPECT_HEADER = "X-Stand-In-Expect"
VARIANT_HEADER = "X-Stand-In-Variant"

_BOTS = {"good_bot": "good", "bad_bot": "bad"}
# RFC 9110: these statuses never have content, and a 204 must not send Content-Length.
_BODYLESS_STATUSES = (204, 304)
_HTML = (
    b"<!doctype html>\n<html><head><meta charset=utf-8><title>Shop</title></head>"
    b"<body><h1>Welcome</h1><p>Ordinary traffic: nothing sealed here.</p></body></html>\n"
)


class RequestError(Exception):
    """A request the stand-in cannot answer as asked: ``status`` and a plain message."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


@dataclass(frozen=True, slots=True)
class ResponseMeta:
    """What was sent, for the ``--log`` line and for tests."""

    case: str
    api: str
    encoding: str
    request_id: str | None
    inner_request_id: str | None


class Response(NamedTuple):
    """One answer; a tuple, so ``status, headers, body, meta = build_response(...)`` works."""

    status: int
    headers: dict[str, str]
    body: bytes
    meta: ResponseMeta


@dataclass(frozen=True, slots=True)
class RequestParams:
    """The query parameters, typed but not yet checked against the valid values."""

    case: str
    api: str
    encoding: str
    seed: int | None
    ts: int | None
    status: int | None


def parse_params(query: str, default_api: str) -> RequestParams:
    """Read the query string (first value wins); a non-integer number is a 400."""
    fields = {name: values[0] for name, values in urllib.parse.parse_qs(query).items()}
    return RequestParams(
        case=fields.get("case", "ok"),
        api=fields.get("api", default_api),
        encoding=fields.get("encoding", "identity"),
        seed=_int_param(fields, "seed"),
        ts=_int_param(fields, "ts"),
        status=_int_param(fields, "status"),
    )


def _int_param(fields: dict[str, str], name: str) -> int | None:
    if name not in fields:
        return None
    try:
        return int(fields[name])
    except ValueError:
        raise RequestError(400, f"{name} must be an integer, got {fields[name]!r}") from None


def build_response(
    case: str,
    api: str,
    encoding: str,
    seed: int | None,
    ts: int | None,
    key: DecryptionKey,
    *,
    status: int | None = None,
) -> Response:
    """The whole answer for one request; raises :class:`RequestError` for a bad request."""
    _check_choice("case", case, CASES)
    _check_choice("api", api, APIS)
    _check_choice("encoding", encoding, ENCODINGS)
    encode = _encoder(encoding)
    status = _status(case, status)
    if ts is not None and not 0 <= ts <= MAX_TS:
        raise RequestError(400, f"ts must be epoch milliseconds between 0 and {MAX_TS}")
    shape: Api = "v3" if api == "v3" else "v4"
    now_ms = int(time.time() * 1000) if ts is None else ts
    rng = random.Random(seed)  # None seeds from the OS: a fresh answer every time
    outer_id: str | None = None
    inner_id: str | None = None
    content_type: str | None = JSON_TYPE
    extra: dict[str, str] = {}
    if case in OPEN_CASES:
        outer_id, inner_id, body = _open_response(case, shape, rng, seed, now_ms, key)
    elif case == HOSTILE_CASE:
        body, expected, variant = hostile_response(rng.getrandbits(64), key, now_ms)
        opened = parse_open_response(body)
        outer_id = opened.request_id if opened is not None else None
        extra = {EXPECT_HEADER: expected, VARIANT_HEADER: variant}
    else:
        body, content_type = _ordinary_body(case, rng)
    # A header value cannot hold a newline or a 100 KB id: the header is a label only.
    headers = {REQUEST_ID_HEADER: _header_safe(outer_id or ""), **extra}
    if status in _BODYLESS_STATUSES:
        if body:
            raise RequestError(400, f"status {status} cannot carry a body; use case=empty")
        encoding = "identity"
    else:
        if body and encoding != "identity":
            body = _encoded_huge(encoding) if case == "huge" else encode(body)
            headers["Content-Encoding"] = encoding
        else:
            encoding = "identity"
        if content_type:
            headers["Content-Type"] = content_type
        headers["Content-Length"] = str(len(body))
    meta = ResponseMeta(case, api, encoding, outer_id, inner_id)
    return Response(status, headers, body, meta)


def _header_safe(value: str) -> str:
    if len(value) > 200 or not value.isprintable() or not value.isascii():
        return ""
    return value


def error_response(error: RequestError, case: str, api: str) -> Response:
    """A plain-text answer to a request that could not be served."""
    body = (error.message + "\n").encode("utf-8")
    headers = {
        REQUEST_ID_HEADER: "",
        "Content-Type": TEXT_TYPE,
        "Content-Length": str(len(body)),
    }
    return Response(error.status, headers, body, ResponseMeta(case, api, "identity", None, None))


def _check_choice(name: str, value: str, valid: Sequence[str]) -> None:
    if value not in valid:
        raise RequestError(400, f"unknown {name} {value!r}; valid: {', '.join(valid)}")


def _status(case: str, status: int | None) -> int:
    if status is None:
        return 204 if case == "empty" else 200
    # 1xx are interim answers, not a response: the client would wait for another one.
    if not 200 <= status <= 599:
        raise RequestError(400, f"status must be between 200 and 599, got {status}")
    return status


def _open_response(
    case: str, api: Api, rng: random.Random, seed: int | None, now_ms: int, key: DecryptionKey
) -> tuple[str, str | None, bytes]:
    """Outer request id, the id sealed inside (None if no event is), and the body."""
    event_ms = now_ms - STALE_AGE_MS if case == "stale" else now_ms
    inner_id = new_request_id(rng, event_ms)
    # A spliced result: the outer id belongs to a later request. Its different time
    # prefix guarantees it differs from the sealed id, whatever the random suffixes are.
    outer_id = new_request_id(rng, event_ms + 1) if case == "mismatch" else inner_id
    event = generate_event(
        api,
        rng=rng,
        bot=_BOTS.get(case, "not_detected"),
        request_id=inner_id,
        timestamp_ms=event_ms,
        replayed=case == "replayed",
    )
    nonce = _nonce(seed, case, api, now_ms)
    sealed = _sealed_for_case(case, event, key, nonce, seed)
    has_event = case not in ("not_json", "not_event", "bomb")
    body = json.dumps(open_response_body(api, outer_id, sealed), separators=(",", ":"))
    return outer_id, inner_id if has_event else None, body.encode("utf-8")


def _nonce(seed: int | None, case: str, api: Api, now_ms: int) -> bytes | None:
    """A nonce fixed by the seed, or None for a random one.

    Everything that changes the plaintext goes into the derivation, so one key never
    seals two different plaintexts under the same nonce (GCM's one hard rule).
    """
    if seed is None:
        return None
    label = f"fp-tap stand-in nonce|{seed}|{case}|{api}|{now_ms}".encode()
    return hashlib.sha256(label).digest()[:NONCE_SIZE]


def _sealed_for_case(
    case: str, event: dict[str, Any], key: DecryptionKey, nonce: bytes | None, seed: int | None
) -> str:
    """The base64 sealed result, broken the way ``case`` says."""
    plaintext = json.dumps(event, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    if case == "wrong_key":
        return seal_event(event, _stranger_key(seed), nonce=nonce)
    if case == "bad_base64":
        # A single character outside the alphabet: strict decoders must reject it.
        return "!" + seal_event(event, key, nonce=nonce)[1:]
    if case == "bad_header":
        # One bit away from the real header, so only an exact comparison catches it.
        raw = seal_raw(deflate_raw(plaintext), key, nonce=nonce)
        return _b64(bytes.fromhex("9e85dcec") + raw[len(HEADER) :])
    if case == "truncated":
        # Half of a multi-KB payload is well above the minimum size: the GCM tag is
        # then read from the middle of the ciphertext, so it is always decrypt_failed.
        raw = seal_raw(deflate_raw(plaintext), key, nonce=nonce)
        return _b64(raw[: len(raw) // 2])
    if case == "not_deflate":
        # The leading space keeps it JSON text, and makes the first DEFLATE block a
        # stored block whose LEN/NLEN check no ASCII can pass: a certain inflate error
        # (bare JSON starting with '{' sometimes inflates a little, depending on digits).
        return _b64(seal_raw(b" " + plaintext, key, nonce=nonce))
    if case == "not_json":
        text = b"deflated plain text where the event JSON belongs"
        return _b64(seal_raw(deflate_raw(text), key, nonce=nonce))
    if case == "not_event":
        not_event = {"ok": True, "note": "valid JSON, but not a Server API event"}
        return _b64(seal_raw(deflate_raw(json.dumps(not_event).encode()), key, nonce=nonce))
    if case == "bomb":
        return _b64(seal_raw(deflate_bomb(), key, nonce=nonce))
    return seal_event(event, key, nonce=nonce)


def _stranger_key(seed: int | None) -> DecryptionKey:
    """A key nobody configured: random, or derived from the seed for determinism."""
    if seed is None:
        return DecryptionKey.generate()
    label = f"fp-tap stand-in stranger key|{seed}".encode()
    return DecryptionKey(hashlib.sha256(label).digest()[:KEY_SIZE])


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


@cache
def deflate_bomb() -> bytes:
    """Raw DEFLATE that inflates to ``BOMB_SIZE`` zero bytes, from about 64 KB.

    Compressing 64 MiB per request would cost a second; instead one MiB of zeros is
    compressed once and its block repeated. FULL_FLUSH ends the block byte-aligned with
    no reference to earlier data, so copies can be concatenated as they are.
    """
    block_size = 1024 * 1024
    compressor = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    block = compressor.compress(bytes(block_size)) + compressor.flush(zlib.Z_FULL_FLUSH)
    return block * (BOMB_SIZE // block_size) + compressor.flush(zlib.Z_FINISH)


def _ordinary_body(case: str, rng: random.Random) -> tuple[bytes, str | None]:
    if case == "plain":
        return b'{"ok":true}', JSON_TYPE
    if case == "html":
        return _HTML, HTML_TYPE
    if case == "huge":
        return huge_json(), JSON_TYPE
    if case == "garbage":
        # 0xFF never occurs in UTF-8, so the body is certainly not UTF-8 (nor JSON).
        return b"\xff" + rng.randbytes(GARBAGE_SIZE - 1), JSON_TYPE
    return b"", None


@cache
def huge_json() -> bytes:
    """About ``HUGE_SIZE`` bytes of ordinary JSON, the same every time (built once)."""
    rng = random.Random(0)
    items: list[str] = []
    size = 0
    # Formatted directly: one json.dumps per item would take most of a second.
    while size < HUGE_SIZE:
        sku, cents = rng.getrandbits(64), rng.randrange(100, 100_000)
        items.append(f'{{"id":{len(items)},"sku":"{sku:016x}","cents":{cents}}}')
        size += len(items[-1]) + 1
    return ('{"ok":true,"items":[' + ",".join(items) + "]}").encode("ascii")


@cache
def _encoded_huge(encoding: str) -> bytes:
    # Compressing 2 MiB takes up to 100 ms, and this body never changes.
    return _encoder(encoding)(huge_json())


# Content encodings, with levels chosen for speed: benchmarks send megabytes through them.
def _encoder(encoding: str) -> Callable[[bytes], bytes]:
    if encoding == "gzip":
        # mtime=0: the gzip header would otherwise hold the time and break determinism.
        return lambda body: gzip.compress(body, compresslevel=6, mtime=0)
    if encoding == "deflate":
        # HTTP "deflate" is the zlib format (RFC 1950), not raw DEFLATE.
        return lambda body: zlib.compress(body, 6)
    if encoding == "br":
        brotli = _optional_module(encoding, ("brotli",))
        return lambda body: bytes(brotli.compress(body, quality=4))
    if encoding == "zstd":
        zstd = _optional_module(encoding, ("compression.zstd", "backports.zstd", "zstandard"))
        return lambda body: bytes(zstd.compress(body, 3))
    return lambda body: body


def _optional_module(encoding: str, names: Sequence[str]) -> Any:
    for name in names:
        try:
            return importlib.import_module(name)
        except ImportError:
            continue
    raise RequestError(
        501, f"encoding={encoding} needs one of these Python modules: {', '.join(names)}"
    )


@dataclass(frozen=True, slots=True)
class ServerConfig:
    key: DecryptionKey
    default_api: Api
    delay_s: float
    log: AnswerLog | None


class AnswerLog:
    """The ``--log`` file: one JSON object per line, written whole under a lock."""

    def __init__(self, path: str) -> None:
        self._file: TextIO = open(path, "a", encoding="utf-8")  # noqa: SIM115 (closed by close())
        self._lock = threading.Lock()

    def write(self, record: dict[str, object]) -> None:
        line = json.dumps(record, separators=(",", ":")) + "\n"
        with self._lock:
            self._file.write(line)
            self._file.flush()

    def close(self) -> None:
        with self._lock:
            self._file.close()


class StandInServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(
        self, address: tuple[str, int], config: ServerConfig, tls: ssl.SSLContext | None
    ) -> None:
        self.config = config
        self.tls = tls
        super().__init__(address, Handler)

    def server_bind(self) -> None:
        # HTTPServer.server_bind looks up the host's FQDN, a DNS query that can stall
        # start-up on a machine without DNS, for a name nothing here uses.
        TCPServer.server_bind(self)
        host, port = self.socket.getsockname()[:2]
        self.server_name, self.server_port = str(host), int(port)

    def get_request(self) -> tuple[socket.socket, Any]:
        sock, address = super().get_request()
        if self.tls is None:
            return sock, address
        # The handshake then runs on first read, in the connection's own thread and under
        # its timeout, so a slow or broken client cannot stall the accept loop.
        wrapped = self.tls.wrap_socket(sock, server_side=True, do_handshake_on_connect=False)
        return wrapped, address

    def handle_error(self, request: Any, client_address: Any) -> None:
        error = sys.exc_info()[1]
        if isinstance(error, OSError):  # resets, broken pipes, failed TLS handshakes
            print(f"endpoint: {client_address}: {error!r}", file=sys.stderr, flush=True)
            return
        super().handle_error(request, client_address)


class Handler(BaseHTTPRequestHandler):
    server: StandInServer
    protocol_version = "HTTP/1.1"
    server_version = "fp-tap-stand-in"
    # Headers and body are two writes; without TCP_NODELAY a keep-alive client can wait
    # ~40 ms for each response (Nagle against delayed ACK), which would skew benchmarks.
    disable_nagle_algorithm = True
    timeout = 120

    def do_POST(self) -> None:
        self._answer()

    def do_GET(self) -> None:
        self._answer()

    def log_request(self, code: int | str = "-", size: int | str = "-") -> None:
        # One stderr line per request slows benchmarks and can fill a pipe nobody reads;
        # --log is the record of what was sent.
        pass

    def _answer(self) -> None:
        query = urllib.parse.urlsplit(self.path).query
        try:
            self._discard_request_body()
        except RequestError as error:
            # The request's framing is unknown, so the connection cannot be reused.
            self.close_connection = True
            response = self._error(error, query)
        else:
            if self.server.config.delay_s:
                time.sleep(self.server.config.delay_s)
            response = self._build(query)
        self.send_response(response.status)
        for name, value in response.headers.items():
            self.send_header(name, value)
        if self.close_connection:
            self.send_header("Connection", "close")
        self.end_headers()
        self.wfile.write(response.body)
        if self.server.config.log is not None:
            self.server.config.log.write(self._log_record(response))

    def _build(self, query: str) -> Response:
        config = self.server.config
        try:
            params = parse_params(query, config.default_api)
            return build_response(
                params.case,
                params.api,
                params.encoding,
                params.seed,
                params.ts,
                config.key,
                status=params.status,
            )
        except RequestError as error:
            return self._error(error, query)
        except Exception as error:
            # A bug here must not leave the client (often a proxy under test) hanging
            # on a dropped connection: answer 500 and keep serving.
            traceback.print_exc()
            return self._error(RequestError(500, f"stand-in failure: {error!r}"), query)

    def _error(self, error: RequestError, query: str) -> Response:
        fields = urllib.parse.parse_qs(query)
        case = fields.get("case", ["ok"])[0]
        api = fields.get("api", [self.server.config.default_api])[0]
        return error_response(error, case, api)

    def _discard_request_body(self) -> None:
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            self._discard_chunked()
            return
        text = self.headers.get("Content-Length", "0").strip()
        if not text.isdigit():
            raise RequestError(400, f"bad Content-Length {text!r}")
        self._discard(int(text))

    def _discard_chunked(self) -> None:
        while True:
            size_line = self.rfile.readline(1024).split(b";", 1)[0].strip()
            try:
                size = int(size_line, 16)
            except ValueError:
                raise RequestError(400, "bad chunked request body") from None
            if size == 0:
                break
            self._discard(size + 2)  # the chunk and its CRLF
        while self.rfile.readline(1024) not in (b"\r\n", b"\n", b""):
            pass  # trailer fields

    def _discard(self, remaining: int) -> None:
        while remaining > 0:
            chunk = self.rfile.read(min(remaining, 65536))
            if not chunk:
                raise RequestError(400, "request body shorter than announced")
            remaining -= len(chunk)

    def _log_record(self, response: Response) -> dict[str, object]:
        meta = response.meta
        return {
            "time": datetime.now(UTC).isoformat(timespec="milliseconds"),
            "path": self.path,
            "case": meta.case,
            "api": meta.api,
            "status": response.status,
            "encoding": meta.encoding,
            "request_id": meta.request_id,
            "inner_request_id": meta.inner_request_id,
            "body_sha256": hashlib.sha256(response.body).hexdigest(),
            "body_len": len(response.body),
            # A credential: record only whether the proxy integration sent it.
            "proxy_secret_present": "FPJS-Proxy-Secret" in self.headers,
            "client_ip_header": self.headers.get("FPJS-Proxy-Client-IP"),
        }


def _parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="endpoint.py",
        description="A local stand-in for the Fingerprint API with Open Client Response.",
    )
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (127.0.0.1)")
    parser.add_argument("--port", type=int, default=0, help="port; 0 picks a free one (0)")
    parser.add_argument(
        "--keys-file", required=True, help="key file; its first key seals every response"
    )
    parser.add_argument(
        "--api", choices=APIS, default="v4", help="shape when a request has no api= (v4)"
    )
    parser.add_argument("--tls-cert", help="PEM certificate: serve HTTPS (needs --tls-key)")
    parser.add_argument("--tls-key", help="PEM private key of --tls-cert")
    parser.add_argument("--log", help="append one JSON line per response sent to this file")
    parser.add_argument(
        "--delay-ms", type=int, default=0, help="sleep before each answer, in ms (0)"
    )
    args = parser.parse_args(argv)
    if (args.tls_cert is None) != (args.tls_key is None):
        parser.error("--tls-cert and --tls-key go together")
    if args.delay_ms < 0:
        parser.error("--delay-ms cannot be negative")
    if not 0 <= args.port <= 65535:
        parser.error("--port must be between 0 and 65535")
    return args


def _tls_context(cert: str, key: str) -> ssl.SSLContext:
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert, key)
    # Like Fingerprint's API behind a proxy integration: HTTP/1.1 only, never h2.
    context.set_alpn_protocols(["http/1.1"])
    return context


def main(argv: Sequence[str] | None = None) -> int:
    """Run the stand-in until SIGTERM or SIGINT; 0 on a clean stop, 2 on a bad setup."""
    args = _parse_args(argv)
    key = sealing_key(args.keys_file, "endpoint")
    if key is None:
        return 2
    try:
        tls = _tls_context(args.tls_cert, args.tls_key) if args.tls_cert else None
        log = AnswerLog(args.log) if args.log else None
        config = ServerConfig(key, args.api, args.delay_ms / 1000, log)
        server = StandInServer((args.host, args.port), config, tls)
    except (OSError, ssl.SSLError) as error:
        print(f"endpoint: cannot start: {error}", file=sys.stderr)
        return 2
    stop = stop_on_signals()
    # Serving runs in a thread because shutdown() blocks until serve_forever returns:
    # called from a signal handler on the serving thread, it would wait forever. A short
    # poll interval makes SIGTERM take effect within 0.1 s, which test teardowns feel.
    serving = threading.Thread(
        target=server.serve_forever, kwargs={"poll_interval": 0.1}, name="serve", daemon=True
    )
    serving.start()
    scheme = "https" if tls else "http"
    print(f"listening on {scheme}://{server.server_name}:{server.server_port}", flush=True)
    stop.wait()
    server.shutdown()
    server.server_close()
    if log is not None:
        log.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
