"""A lean stand-in for the Fingerprint API, for the proxy benchmark only.

The full stand-in (``scripts/endpoint.py``) generates a new random event for every
request and serves it from a thread per connection through ``http.server``: about
0.75 ms of CPU per request, half of what mitmdump itself spends on one. In production
the Fingerprint API runs elsewhere; on the benchmark's two-CPU machine the stand-in
competes for the CPU that fp-tap's worker process needs, and so weighs on the ratio
the benchmark is meant to measure (BENCHMARKS.md, "An eleventh pass").

This one answers only fresh, trusted open responses (``case=ok``), as the benchmark
sends, on one asyncio thread::

    python scripts/lean_endpoint.py --keys-file keys.txt [--port 0] [--pool 64]

Each answer is still sealed for that request: a new request id, stamped now, inside
and outside, so that fp-tap does the same work as with the full stand-in (nothing is
stale or a replay). What it saves is the event's generation: the event comes from a
pool of ``--pool`` events per API shape (v3, v4) generated at start, in turn, with the
id and times written over. It prints ``listening on http://127.0.0.1:PORT`` once,
flushed, and serves until SIGTERM or SIGINT (exit 0). ``api=v3|v4`` in the query
chooses the shape (default v4); ``case=`` other than ``ok`` is refused with 400 (use
the full stand-in).
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import itertools
import json
import random
import signal
import sys
import time
import urllib.parse
from collections import Counter
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, NamedTuple, cast

# `python scripts/lean_endpoint.py` puts scripts/ on sys.path, not the repository root.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from fp_core.events import Api
from fp_core.generate import generate_event, iso_from_ms, new_request_id, open_response_body
from fp_core.keys import DecryptionKey
from fp_core.sealed import deflate_raw, seal_raw
from scripts.harness import sealing_key

#: The header the full stand-in sets too: the outer request id of the answer.
REQUEST_ID_HEADER = "X-Stand-In-Request-Id"
#: A request's head (request line and headers) may not be longer than this.
MAX_HEAD = 16 * 1024
#: Nor its body (the agent posts a few KB at most).
MAX_BODY = 1024 * 1024
#: Stamped into the pool's events at generation, then written over for each answer.
_SENTINEL_MS = 1_000_000_000_123
_SENTINEL_ID = "1000000000123.SENTNL"
_SENTINEL_ISO = iso_from_ms(_SENTINEL_MS)
_MARKS: dict[str | int, str] = {_SENTINEL_ID: "id", _SENTINEL_MS: "ms", _SENTINEL_ISO: "iso"}


class LeanStandIn:
    """Fresh open responses from a pool of pre-generated events (pure: no sockets)."""

    def __init__(self, key: DecryptionKey, pool: int = 64, seed: int | None = None) -> None:
        if pool < 1:
            raise ValueError("the pool needs at least one event per shape")
        self.key = key
        self._rng = random.Random(seed)
        self._texts: dict[str, Iterator[str]] = {}
        for api in ("v4", "v3"):
            texts = [self._template(api) for _ in range(pool)]
            self._texts[api] = itertools.cycle(texts)

    def _template(self, api: Api) -> str:
        """An event's JSON text, holding the sentinels exactly where the event holds its
        request id, timestamp and ISO times (so that plain text replacement stamps it)."""
        event = generate_event(
            api, rng=self._rng, request_id=_SENTINEL_ID, timestamp_ms=_SENTINEL_MS
        )
        text = json.dumps(event, separators=(",", ":"), ensure_ascii=False)
        found = Counter(_marks_in(event))
        # The id's text holds the time's digits: counted first, and out of the rest.
        ids = text.count(_SENTINEL_ID)
        counted = {
            "id": ids,
            "ms": text.count(str(_SENTINEL_MS)) - ids,
            "iso": text.count(_SENTINEL_ISO),
        }
        if not found["id"] or counted != {k: found[k] for k in counted}:
            raise RuntimeError(f"cannot stamp the generated {api} event: {found} vs {counted}")
        return text

    def answer(self, api: Api, now_ms: int | None = None) -> tuple[str, bytes]:
        """The outer request id and body of one fresh open response of shape ``api``."""
        now = int(time.time() * 1000) if now_ms is None else now_ms
        request_id = new_request_id(self._rng, now)
        text = (
            next(self._texts[api])
            .replace(_SENTINEL_ID, request_id)
            .replace(str(_SENTINEL_MS), str(now))
            .replace(_SENTINEL_ISO, iso_from_ms(now))
        )
        sealed = base64.b64encode(seal_raw(deflate_raw(text.encode("utf-8")), self.key))
        body = json.dumps(
            open_response_body(api, request_id, sealed.decode("ascii")), separators=(",", ":")
        )
        return request_id, body.encode("ascii")

    def http_response(self, method: str, target: str, keep_alive: bool) -> bytes:
        """The whole HTTP/1.1 answer to one request."""
        connection = b"" if keep_alive else b"Connection: close\r\n"
        if method not in ("GET", "POST"):
            return _plain(405, "only GET and POST are answered", connection)
        query = urllib.parse.parse_qs(urllib.parse.urlsplit(target).query)
        api = query.get("api", ["v4"])[-1]
        case = query.get("case", ["ok"])[-1]
        if api not in ("v3", "v4"):
            return _plain(400, "api must be v3 or v4", connection)
        if case != "ok":
            return _plain(
                400, "the lean stand-in answers case=ok only (use endpoint.py)", connection
            )
        request_id, body = self.answer(cast(Api, api))
        head = (
            f"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\n{REQUEST_ID_HEADER}: {request_id}\r\n"
        ).encode("ascii")
        return head + connection + b"\r\n" + body


def _marks_in(obj: Any) -> Iterator[str]:
    """The kind of each sentinel ``obj`` holds, one per place (a bool is never one)."""
    for value in obj.values() if isinstance(obj, dict) else obj:
        if isinstance(value, dict | list):
            yield from _marks_in(value)
        elif type(value) in (str, int) and value in _MARKS:
            yield _MARKS[value]


def _plain(status: int, text: str, connection: bytes) -> bytes:
    reason = {400: "Bad Request", 405: "Method Not Allowed", 411: "Length Required"}.get(
        status, "Error"
    )
    body = (text + "\n").encode("ascii")
    head = (
        f"HTTP/1.1 {status} {reason}\r\nContent-Type: text/plain\r\nContent-Length: {len(body)}\r\n"
    )
    return head.encode("ascii") + connection + b"\r\n" + body


class _Connection(asyncio.Protocol):
    """HTTP/1.1 with keep-alive and pipelining; a body needs a Content-Length."""

    def __init__(self, stand_in: LeanStandIn) -> None:
        self.stand_in = stand_in
        self.buffer = bytearray()
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        while self.transport is not None and not self.transport.is_closing():
            end = self.buffer.find(b"\r\n\r\n")
            if end < 0:
                if len(self.buffer) > MAX_HEAD:
                    self._refuse(400, "request head too long")
                return
            request = _parse_head(bytes(self.buffer[:end]))
            if isinstance(request, Refusal):
                self._refuse(*request)
                return
            method, target, keep_alive, length = request
            if len(self.buffer) < end + 4 + length:
                return  # the body is still coming
            del self.buffer[: end + 4 + length]
            self.transport.write(self.stand_in.http_response(method, target, keep_alive))
            if not keep_alive:
                self.transport.close()

    def _refuse(self, status: int, why: str) -> None:
        assert self.transport is not None
        self.transport.write(_plain(status, why, b"Connection: close\r\n"))
        self.transport.close()


class Refusal(NamedTuple):
    status: int
    why: str


def _parse_head(head: bytes) -> tuple[str, str, bool, int] | Refusal:
    """Method, target, keep-alive and body length; or why the request is refused."""
    lines = head.decode("latin-1").split("\r\n")
    parts = lines[0].split(" ")
    if len(parts) != 3 or parts[2] not in ("HTTP/1.1", "HTTP/1.0"):
        return Refusal(400, "not an HTTP/1.x request line")
    headers: dict[str, str] = {}
    for line in lines[1:]:
        name, colon, value = line.partition(":")
        if not colon:
            return Refusal(400, "malformed header line")
        headers[name.strip().lower()] = value.strip()
    if "transfer-encoding" in headers:
        return Refusal(411, "a body needs a Content-Length (no Transfer-Encoding)")
    length_text = headers.get("content-length", "0")
    if not length_text.isdigit() or not length_text.isascii() or int(length_text) > MAX_BODY:
        return Refusal(400, "bad Content-Length")
    connection = headers.get("connection", "").lower()
    keep_alive = connection != "close" if parts[2] == "HTTP/1.1" else connection == "keep-alive"
    return parts[0], parts[1], keep_alive, int(length_text)


async def serve(stand_in: LeanStandIn, host: str, port: int) -> None:
    """Serve until SIGTERM or SIGINT."""
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    server = await loop.create_server(lambda: _Connection(stand_in), host, port)
    bound = server.sockets[0].getsockname()
    print(f"listening on http://{bound[0]}:{bound[1]}", flush=True)
    await stop.wait()
    server.close()


def _parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="lean_endpoint.py",
        description="A lean stand-in for the Fingerprint API (fresh case=ok answers only).",
    )
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (127.0.0.1)")
    parser.add_argument("--port", type=int, default=0, help="port; 0 picks a free one (0)")
    parser.add_argument("--keys-file", required=True, help="its first key seals every answer")
    parser.add_argument("--pool", type=int, default=64, help="events per API shape (64)")
    args = parser.parse_args(argv)
    if args.pool < 1:
        parser.error("--pool must be at least 1")
    if not 0 <= args.port <= 65535:
        parser.error("--port must be between 0 and 65535")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    """Run until SIGTERM or SIGINT; 0 on a clean stop, 2 on a bad setup."""
    args = _parse_args(argv)
    key = sealing_key(args.keys_file, "lean_endpoint")
    if key is None:
        return 2
    try:
        asyncio.run(serve(LeanStandIn(key, args.pool), args.host, args.port))
    except OSError as error:
        print(f"lean_endpoint: cannot start: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
