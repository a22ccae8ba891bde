"""Forwarding events like a Fingerprint webhook: the secret, signing, headers, the sink
that spools them, and one HTTP POST with the standard library.

The body is the unsealed event JSON, signed as Fingerprint signs its webhooks
(``FPJS-Event-Signature: v1=<hex HMAC-SHA256 of the raw body>``), so a backend that
already verifies Fingerprint webhooks with an official SDK accepts it unchanged.

Standard library only, and no ``sqlite3`` at import time: mitmproxy's standalone
binaries bundle ``http.client``, ``ssl`` and ``hmac`` but leave ``sqlite3`` out.
"""

from __future__ import annotations

import hashlib
import hmac
import http.client
import ipaddress
import json
import logging
import os
import re
import ssl
import threading
import time
import urllib.parse
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from fp_core.errors import FpError
from fp_core.jsontext import dumps
from fp_core.stats import Stats
from fp_core.throttle import Throttle

if TYPE_CHECKING:  # only a type here: this module must load without sqlite3
    from fp_core.spool import Spool

SECRET_ENV_VAR = "FP_WEBHOOK_SECRET"  # noqa: S105 (the variable's name, not a secret)
SIGNATURE_HEADER = "FPJS-Event-Signature"
IDEMPOTENCY_HEADER = "Idempotency-Key"
VERDICT_HEADER = "FP-Tap-Verdict"
CHECKS_HEADER = "FP-Tap-Checks"
USER_AGENT = "fp-tap"
#: A receiver's answer is read up to this size (to reuse the connection), never kept.
MAX_ANSWER = 64 * 1024

log = logging.getLogger(__name__)


class WebhookConfigError(FpError):
    """The webhook URL, secret or CA file cannot be used."""

    kind = "bad_webhook"


@dataclass(frozen=True, slots=True)
class Outgoing:
    """An event to forward: the body to POST and the headers that depend on the record."""

    request_id: str
    body: bytes
    headers: dict[str, str] = field(default_factory=dict)


class WebhookSecret:
    """The HMAC secret; ``repr``/``str`` never show it and it refuses to be pickled."""

    __slots__ = ("_value",)

    def __init__(self, value: str) -> None:
        if not value:
            raise WebhookConfigError("the webhook secret is empty")
        self._value = value.encode("utf-8")

    def sign(self, body: bytes) -> str:
        """The ``FPJS-Event-Signature`` value for ``body``."""
        return sign(body, self._value)

    def text(self) -> str:
        """The secret itself. A method, not an attribute, so it is never dumped by accident
        (the addon hands it to its log scrubber)."""
        return self._value.decode("utf-8")

    def __repr__(self) -> str:
        return "WebhookSecret(<hidden>)"

    __str__ = __repr__

    def __reduce__(self) -> tuple[object, ...]:
        raise TypeError("WebhookSecret cannot be pickled")


def sign(body: bytes, secret: bytes) -> str:
    """``v1=`` and the lowercase hex HMAC-SHA256 of ``body`` keyed with ``secret``."""
    return "v1=" + hmac.new(secret, body, hashlib.sha256).hexdigest()


def env_secret(
    secret_file: str | None, environ: Mapping[str, str] | None = None
) -> WebhookSecret | None:
    """The secret in ``FP_WEBHOOK_SECRET``, or None; an error when ``secret_file`` is set
    too (which one would win is not obvious)."""
    env = os.environ if environ is None else environ
    from_env = env.get(SECRET_ENV_VAR, "").strip()
    if from_env and secret_file:
        raise WebhookConfigError(
            f"the webhook secret is set twice ({SECRET_ENV_VAR} and fp_webhook_secret_file); "
            "keep one"
        )
    return WebhookSecret(from_env) if from_env else None


def check_url(url: str) -> str:
    """The receiver URL if it is usable: http or https, a host, no credentials."""
    try:
        parts = urllib.parse.urlsplit(url)
        parts.port  # noqa: B018 (raises ValueError on a bad port)
    except ValueError as exc:
        raise WebhookConfigError(f"not a valid URL: {exc}") from None
    if parts.scheme not in ("http", "https"):
        raise WebhookConfigError(f"{parts.scheme or 'no'} scheme: use an http:// or https:// URL")
    if not parts.hostname:
        raise WebhookConfigError("the URL has no host")
    if parts.username is not None or parts.password is not None:
        # Option values show in process lists; the signature authenticates the tap.
        raise WebhookConfigError("the URL must not contain credentials (user:password@)")
    if not all(" " < c <= "~" for c in url):
        # http.client sends the URL's target as it is, in ASCII, and refuses the rest on
        # every attempt: that would only show as failures until the events are parked.
        raise WebhookConfigError(
            "the URL must be percent-encoded: no spaces, only ASCII (punycode for a host)"
        )
    return url


def is_plaintext_remote(url: str) -> bool:
    """True for http:// to a host other than this machine: events would cross the
    network unencrypted."""
    parts = urllib.parse.urlsplit(url)
    host = parts.hostname or ""
    if parts.scheme != "http" or host == "localhost":
        return False
    try:
        return not ipaddress.ip_address(host).is_loopback
    except ValueError:
        return True


def describe_url(url: str) -> str:
    """The URL without its query string (which may hold a token), for logs."""
    parts = urllib.parse.urlsplit(url)
    return urllib.parse.urlunsplit((parts.scheme, parts.netloc, parts.path, "", ""))


def verdict_header(record: Mapping[str, Any]) -> str:
    """``trusted``, or ``suspicious; reasons=bad_bot,duplicate``."""
    reasons = record.get("reasons") or []
    verdict = str(record.get("verdict"))
    return f"{verdict}; reasons={','.join(reasons)}" if reasons else verdict


def outgoing(record: Mapping[str, Any]) -> Outgoing | None:
    """What to forward for a record: only unsealed events are; None for the rest."""
    event = record.get("event")
    if not record.get("ok") or not isinstance(event, dict):
        return None
    headers = {
        VERDICT_HEADER: verdict_header(record),
        # ASCII JSON: header values must be ASCII, and every check is a bool, int or null.
        CHECKS_HEADER: json.dumps(record.get("checks") or {}, separators=(",", ":")),
    }
    return Outgoing(idempotency_key(record), dumps(event).encode("utf-8"), headers)


#: What an idempotency key may be as it is: a header value of visible ASCII.
_PLAIN_KEY = re.compile(r"[!-~]{1,256}")


def idempotency_key(record: Mapping[str, Any]) -> str:
    """The request id sealed in the event (the outer one only if it has none): the
    outer id is the client's to forge, and a replay sent under another event's outer id
    must not take that event's key. Not visible ASCII (CR, LF, non-Latin-1 would make
    every POST fail), it becomes ``sha256-<hex>`` of itself."""
    summary = record.get("summary")
    inner = summary.get("request_id") if isinstance(summary, Mapping) else None
    key = inner if isinstance(inner, str) and inner else str(record.get("request_id"))
    if _PLAIN_KEY.fullmatch(key):
        return key
    return "sha256-" + hashlib.sha256(key.encode("utf-8", "surrogatepass")).hexdigest()


def request_headers(
    extra: Mapping[str, str], request_id: str, body: bytes, secret: WebhookSecret | None
) -> dict[str, str]:
    """Every header of one POST: content type, idempotency key, signature, verdict, checks."""
    headers = {
        "Content-Type": "application/json",
        "User-Agent": USER_AGENT,
        IDEMPOTENCY_HEADER: request_id,
        **extra,
    }
    if secret is not None:
        headers[SIGNATURE_HEADER] = secret.sign(body)
    return headers


#: Events held in memory at most while the spool cannot be written (another connection
#: holds its lock, the disk is full); beyond, the oldest are lost (``webhook.lost``).
MAX_HELD = 10_000
#: While the spool cannot be written: the first wait before trying again, doubling per
#: failure up to the last (each try may wait out the spool's busy timeout on the writer
#: thread, which the other sinks share).
HOLD_RETRY_FIRST = 0.5
HOLD_RETRY_MAX = 5.0


class HeldEvents:
    """Events a spool could not take yet, in order, with when to try again.

    One per spool, shared by every :class:`WebhookSink` that feeds it: a record writer
    replaced by an option change leaves what it holds to the next one, and only the
    spool's owner (the delivery) gives up on them, when it closes the spool.
    """

    def __init__(
        self, *, max_held: int = MAX_HELD, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.max_held = max_held
        self.clock = clock
        #: Held by whoever reads or changes the rest (the writers' threads).
        self.lock = threading.Lock()
        self.items: list[Outgoing] = []
        self.retry_at = float("-inf")
        self.retry_delay = HOLD_RETRY_FIRST

    def __len__(self) -> int:
        return len(self.items)

    def give_up(self, stats: Stats, why: str) -> None:
        """Count what is still held as lost (once the spool is closing)."""
        with self.lock:
            if self.items:
                stats.incr_group("webhook", "lost", len(self.items))
                log.warning("fp-tap: %d webhook event(s) never spooled: %s", len(self.items), why)
                self.items = []


class WebhookSink:
    """A :class:`~fp_core.writer.Sink` that puts each unsealed event into the spool.

    Only a transaction on the writer thread: the HTTP requests are made by the
    delivery threads (:mod:`fp_core.delivery`), so a slow receiver never slows it.
    Events the spool cannot take right now are held (``held``, shared with the other
    sinks of this spool) and spooled later, in order, as the SQLite store holds its rows.
    """

    name = "webhook"

    def __init__(
        self,
        spool: Spool,
        stats: Stats,
        notify: Callable[[], None] | None = None,
        limit: Callable[[], int] | None = None,
        *,
        held: HeldEvents | None = None,
    ) -> None:
        self.spool = spool
        self.stats = stats
        self._notify = notify
        self._limit = limit
        self.held = held if held is not None else HeldEvents()
        self._warnings = Throttle()
        self._hold_warnings = Throttle()

    def write(self, records: Sequence[dict[str, Any]]) -> None:
        held = self.held
        with held.lock:
            held.items.extend(item for r in records if (item := outgoing(r)) is not None)
            excess = len(held.items) - held.max_held
            if excess > 0:
                del held.items[:excess]
                self.stats.incr_group("webhook", "lost", excess)
            if held.clock() >= held.retry_at:
                self._spool_held()

    def retry_held(self) -> None:
        """Spool the held events once their retry time has come."""
        held = self.held
        with held.lock:
            if held.items and held.clock() >= held.retry_at:
                self._spool_held()

    def _spool_held(self) -> None:
        held = self.held
        items = held.items
        if not items:
            return
        # A receiver down for days must not fill the disk: past the limit, new events
        # are refused (the oldest, already waiting longest, keep their turn).
        limit = self._limit() if self._limit is not None else None
        try:
            taken = self.spool.add(items, limit)
        except FpError as exc:  # the spool's file: locked by another connection, disk full
            self.stats.incr_group("webhook", "spool_errors")
            held.retry_at = held.clock() + held.retry_delay
            held.retry_delay = min(held.retry_delay * 2, HOLD_RETRY_MAX)
            if self._hold_warnings.ready():
                log.warning(
                    "fp-tap: cannot spool webhook events (%s); holding %d and retrying",
                    exc.message,
                    len(items),
                )
            return
        held.items = []
        held.retry_at, held.retry_delay = float("-inf"), HOLD_RETRY_FIRST
        if limit is not None and taken < len(items):
            self._refuse(len(items) - taken, limit)
        if not taken:
            return
        self.stats.incr_group("webhook", "spooled", taken)
        if self._notify is not None:
            self._notify()

    def _refuse(self, count: int, limit: int) -> None:
        self.stats.incr_group("webhook", "spool_full", count)
        if self._warnings.ready():
            log.warning(
                "fp-tap: webhook spool full (fp_webhook_max_events=%d, pending and parked): "
                "%d event(s) not spooled (%d so far)",
                limit,
                count,
                self.stats.group("webhook").get("spool_full", 0),
            )

    def close(self) -> None:
        """Spool what is held, one more try; the rest stays held for this spool's next
        sink, or for the delivery to give up on when it closes the spool."""
        with self.held.lock:
            self._spool_held()


@dataclass(frozen=True, slots=True)
class PostResult:
    """How one POST went: the status, or why there was none."""

    status: int | None
    #: None when the receiver answered 2xx; else ``http_<status>``, ``timeout``,
    #: ``connection``, ``tls``, ``protocol`` or ``internal``.
    error: str | None
    #: Seconds the receiver asked to wait (``Retry-After`` on 429 and 503).
    retry_after: float | None = None
    #: What the failure said, for the warning only (the counters keep ``error``):
    #: "Connection refused", "certificate verify failed: ...".
    detail: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None


def tls_context(ca_file: str | None) -> ssl.SSLContext:
    """Certificate and host name checks on; ``ca_file`` replaces the system's CAs."""
    try:
        return ssl.create_default_context(cafile=ca_file)
    except (OSError, ssl.SSLError) as exc:
        why = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        raise WebhookConfigError(f"CA file {ca_file}: cannot load ({why})") from None


#: The longest wait the platform takes (a socket's timeout, a thread's join), less room
#: for what is added to it: a timeout or drain meant as "for ever" is cut to this.
MAX_WAIT = threading.TIMEOUT_MAX - 3600
#: Informational (1xx) answers skipped before a final one; more is a protocol error.
MAX_INFORMATIONAL = 16
_MAX_HEADER_LINES = 100
_MAX_LINE = 65536


class _FinalResponse(http.client.HTTPResponse):
    """A response that skips every informational answer (102 Processing, 103 Early Hints
    from a CDN in front of the receiver, ...), as a client must (RFC 9110 15.2).
    http.client skips only 100 Continue and returns any other 1xx as the answer, with an
    empty body: the final answer would then stay in the socket and be read as the answer
    to the next event's POST on the kept-alive connection."""

    def _read_status(self) -> tuple[str, int, str]:
        # http.client's own hook (begin() reads each status line through it, and skips
        # 100 Continue itself): unchanged since Python 3.0.
        for _ in range(MAX_INFORMATIONAL):
            version, status, reason = super()._read_status()  # type: ignore[misc]
            if not 101 < status < 200:  # 101 Switching Protocols ends the exchange
                return version, status, reason
            _skip_headers(self.fp)
        raise http.client.HTTPException("too many informational answers")


def _skip_headers(fp: Any) -> None:
    for _ in range(_MAX_HEADER_LINES):
        line = fp.readline(_MAX_LINE + 1)
        if len(line) > _MAX_LINE:
            raise http.client.LineTooLong("header line")
        if line in (b"\r\n", b"\n", b""):
            return
    raise http.client.HTTPException("too many headers in an informational answer")


class HttpPoster:
    """POSTs to one URL with ``http.client``; each thread keeps its own connection alive.

    No proxy from the environment and no redirects: the receiver is reached directly,
    and a 3xx is a failed attempt like any other non-2xx.
    """

    def __init__(self, url: str, *, timeout: float, ca_file: str | None = None) -> None:
        parts = urllib.parse.urlsplit(check_url(url))
        self.host = parts.hostname or ""
        self.port = parts.port
        self.target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        # A timeout meant as "none" must still fit a socket's (about 9.2e9 s).
        self.timeout = min(timeout, MAX_WAIT)
        self._tls = tls_context(ca_file) if parts.scheme == "https" else None
        self._local = threading.local()

    def post(self, body: bytes, headers: Mapping[str, str]) -> PostResult:
        """One POST; a kept-alive connection the receiver closed meanwhile is replaced
        once, on the spot, rather than costing the event a backoff."""
        conn = getattr(self._local, "conn", None)
        if conn is not None:
            try:
                return self._exchange(conn, body, headers)
            except (http.client.RemoteDisconnected, ConnectionResetError, BrokenPipeError):
                self.close_local()
            except Exception as exc:
                self.close_local()
                return _failure(exc)
        conn = self._connect()
        self._local.conn = conn
        try:
            return self._exchange(conn, body, headers)
        except Exception as exc:
            self.close_local()
            return _failure(exc)

    def close_local(self) -> None:
        """Close the calling thread's connection, if any."""
        conn = getattr(self._local, "conn", None)
        self._local.conn = None
        if conn is not None:
            conn.close()

    def _connect(self) -> http.client.HTTPConnection:
        conn: http.client.HTTPConnection
        if self._tls is not None:
            conn = http.client.HTTPSConnection(
                self.host, self.port, timeout=self.timeout, context=self._tls
            )
        else:
            conn = http.client.HTTPConnection(self.host, self.port, timeout=self.timeout)
        conn.response_class = _FinalResponse
        return conn

    def _exchange(
        self, conn: http.client.HTTPConnection, body: bytes, headers: Mapping[str, str]
    ) -> PostResult:
        conn.request("POST", self.target, body=body, headers=dict(headers))
        response = conn.getresponse()
        response.read(MAX_ANSWER)
        status = response.status
        # Whatever is left unread (or a receiver that closes, or switches protocols)
        # rules out reuse.
        if response.will_close or not response.isclosed() or status < 200:
            self.close_local()
        if 200 <= status < 300:
            return PostResult(status, None)
        retry_after = None
        if status in (429, 503):
            value = (response.getheader("Retry-After") or "").strip()
            # isascii: str.isdigit() is also true of "²" and other digits float() refuses.
            retry_after = float(value) if value.isascii() and value.isdigit() else None
        return PostResult(status, f"http_{status}", retry_after)


def _failure(exc: BaseException) -> PostResult:
    if isinstance(exc, OSError):  # RemoteDisconnected too: an HTTPException and an OSError
        # What an OS or TLS error says ("Connection refused", "certificate verify
        # failed: ...") names no part of the URL: it goes into the warning.
        detail = _detail(exc)
        if isinstance(exc, TimeoutError):
            return PostResult(None, "timeout", detail=detail)
        if isinstance(exc, ssl.SSLError | ssl.CertificateError):
            return PostResult(None, "tls", detail=detail)
        return PostResult(None, "connection", detail=detail)
    # The rest by name only: some repeat what they parsed, InvalidURL the target with
    # its query, which may carry a token (describe_url leaves it out for that reason).
    kind = "protocol" if isinstance(exc, http.client.HTTPException) else "internal"
    return PostResult(None, kind, detail=type(exc).__name__)


#: A failure's detail is cut here: a warning line, not a dump.
MAX_DETAIL = 160


def _detail(exc: OSError) -> str:
    """What the error says (without its errno), on one short line."""
    text = exc.strerror or str(exc)
    text = " ".join(text.split()) or type(exc).__name__
    return text if len(text) <= MAX_DETAIL else text[: MAX_DETAIL - 3] + "..."
