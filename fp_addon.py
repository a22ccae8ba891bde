"""fp-tap: a mitmproxy addon that unseals Fingerprint Open Client Responses in flight.

    mitmdump -s fp_addon.py --set fp_keys_file=keys.txt --set fp_jsonl=events.jsonl \
        --set fp_sqlite=events.sqlite3 --set fp_webhook_url=https://backend.example/fp

It reads responses and never changes what the client receives. This is the only module
that speaks mitmproxy; the work is done by ``fp_core`` (found beside this file, so a
stock or standalone mitmproxy runs it without installing anything). The README lists
every option, the record format and the commands.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import threading
import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, Optional

from mitmproxy import command, contentviews, ctx, exceptions, flowfilter, http, types
from mitmproxy import flow as mflow
from mitmproxy.addonmanager import Loader
from mitmproxy.net.http import url

from fp_core.checks import CheckConfig, parse_origins
from fp_core.content import ContentError, decode_content
from fp_core.envelope import might_be_open_response, parse_open_response
from fp_core.errors import FpError, KeyConfigError, UnsealError
from fp_core.keys import ENV_VAR, DecryptionKey, key_file_too_open, load_keys
from fp_core.redact import PRESETS, REDACTED, Redactor, parse_paths
from fp_core.scrub import Scrubber
from fp_core.sealed import DEFAULT_MAX_SIZE, unseal_event
from fp_core.stats import Stats
from fp_core.tap import ResponseInfo, Tap, TapConfig, metadata_of
from fp_core.webhook import (
    SECRET_ENV_VAR,
    WebhookSink,
    check_url,
    describe_url,
    is_plaintext_remote,
    load_secret,
    tls_context,
)
from fp_core.writer import JsonlSink, RecordWriter, Sink, WithoutEvent, dumps, open_private

if TYPE_CHECKING:
    # At run time these are imported where fp_sqlite or fp_webhook_url needs them: they
    # use sqlite3, which mitmproxy's standalone binaries do not bundle, and the rest of
    # the addon must load there all the same.
    from fp_core.delivery import Delivery, DeliveryConfig

log = logging.getLogger(__name__)

PROXY_SECRET_HEADER = "FPJS-Proxy-Secret"  # noqa: S105 (a header name, not a secret)
CLIENT_IP_HEADER = "FPJS-Proxy-Client-IP"
MARK_SUSPICIOUS = ":warning:"
MARK_ERROR = ":x:"
METADATA_KEY = "fp"

# Options whose change means a new record writer (its sinks are opened once).
_WRITER_OPTIONS = {"fp_jsonl", "fp_queue_size", "fp_sqlite", "fp_include_event"}
# Options of the webhook delivery (a new one only for a new fp_state_dir).
_DELIVERY_OPTIONS = {
    "fp_webhook_url",
    "fp_webhook_secret_file",
    "fp_webhook_ca",
    "fp_webhook_timeout",
    "fp_webhook_concurrency",
    "fp_webhook_retry_ms",
    "fp_webhook_retry_max",
    "fp_webhook_give_up",
    "fp_state_dir",
}
# Options whose change means a new tap configuration.
_TAP_OPTIONS = {
    "fp_keys_file",
    "fp_include_event",
    "fp_max_age",
    "fp_replay_ttl",
    "fp_origins",
    "fp_max_event",
    "fp_redact",
    "fp_webhook_url",  # the webhook needs the event in records even without fp_include_event
}


# The options (names are a public interface; the README documents each with its
# default). mitmproxy's option parser understands typing.Optional, not "str | None".
OPTIONS: tuple[tuple[str, Any, Any, str], ...] = (
    (
        "fp_keys_file",
        Optional[str],  # noqa: UP045
        None,
        f"File of base64 decryption keys, one per line, tried in order after those in "
        f"the {ENV_VAR} environment variable. Keys are never taken as option values.",
    ),
    (
        "fp_filter",
        Optional[str],  # noqa: UP045
        None,
        "Only inspect responses matching this mitmproxy filter expression "
        "(e.g. '~d fp.example.com'). Default: every response.",
    ),
    (
        "fp_jsonl",
        Optional[str],  # noqa: UP045
        None,
        "Append one JSON record per open response to this file (created with mode "
        "0600); '-' writes to stdout.",
    ),
    (
        "fp_include_event",
        bool,
        True,
        "Put the full unsealed event in exported records (the summary is always there).",
    ),
    (
        "fp_max_age",
        int,
        10,
        "Seconds after which an event is stale (not fresh) at the time of the response.",
    ),
    (
        "fp_replay_ttl",
        int,
        3600,
        "Seconds a request id is remembered to flag a second sighting as a duplicate.",
    ),
    (
        "fp_origins",
        Sequence[str],
        [],
        "Origins (scheme://host[:port]) the event's URL must have; empty: no check.",
    ),
    (
        "fp_redact",
        Sequence[str],
        [],
        'Replace these parts of every record with "[redacted]" before it is logged, '
        "kept on the flow or exported: dotted paths from the record (event.ip_address, "
        "event.products.*.data.ip, summary.url, client_ip) or a preset "
        f"({', '.join(PRESETS)}).",
    ),
    (
        "fp_log_trusted",
        bool,
        True,
        "Log a line for trusted open responses too. False logs only suspicious ones and "
        "failures: on a busy tap each log line costs mitmproxy more than unsealing.",
    ),
    (
        "fp_max_body",
        int,
        1024 * 1024,
        "Response bodies larger than this many bytes (after decoding) are not parsed.",
    ),
    (
        "fp_max_event",
        int,
        DEFAULT_MAX_SIZE,
        "Largest unsealed event JSON in bytes; larger ones fail with too_large.",
    ),
    (
        "fp_queue_size",
        int,
        10_000,
        "Records waiting for the background writer; beyond this they are dropped "
        "(counted and warned about) rather than slowing the proxy.",
    ),
    (
        "fp_sqlite",
        Optional[str],  # noqa: UP045
        None,
        "Also write one row per open response to this SQLite file (WAL, mode 0600); "
        "its request ids count for the duplicate check after a restart.",
    ),
    (
        "fp_webhook_url",
        Optional[str],  # noqa: UP045
        None,
        "POST each unsealed event (signed like a Fingerprint webhook) to this http(s) "
        "URL, at least once, from a spool in fp_state_dir.",
    ),
    (
        "fp_webhook_secret_file",
        Optional[str],  # noqa: UP045
        None,
        f"File holding the webhook signing secret (or set {SECRET_ENV_VAR}); the "
        "secret is never an option value.",
    ),
    (
        "fp_webhook_ca",
        Optional[str],  # noqa: UP045
        None,
        "PEM file of the CA certificates to trust for an https webhook receiver, "
        "instead of the system's.",
    ),
    (
        "fp_webhook_timeout",
        int,
        10,
        "Seconds to wait for the webhook receiver to connect, and then to answer.",
    ),
    (
        "fp_webhook_concurrency",
        int,
        4,
        "Webhook requests in flight at the same time, at most.",
    ),
    (
        "fp_webhook_retry_ms",
        int,
        1000,
        "Milliseconds before the first retry of a failed webhook delivery; doubles with "
        "each failure (with jitter) up to fp_webhook_retry_max.",
    ),
    ("fp_webhook_retry_max", int, 300, "Longest wait between webhook retries, in seconds."),
    (
        "fp_webhook_give_up",
        int,
        86_400,
        "Seconds after which an event that still cannot be delivered is parked: kept in "
        "the spool and counted; fp.resend sends parked events again.",
    ),
    (
        "fp_state_dir",
        str,
        "~/.fp-tap",
        "Directory (created with mode 0700) for the webhook spool.",
    ),
    (
        "fp_drain_timeout",
        int,
        5,
        "On shutdown, keep delivering webhook events for up to this many seconds; what "
        "is left stays in the spool for the next start.",
    ),
)


class FingerprintTap:
    """Options, hooks and commands; each a few lines calling into fp_core."""

    def __init__(self) -> None:
        self.stats = Stats()
        self.keys: list[DecryptionKey] = []
        self.tap = Tap(TapConfig(), self.stats)
        self.filter: flowfilter.TFilter | None = None
        self.max_body = 1024 * 1024
        self.writer: RecordWriter | None = None
        self.delivery: Delivery | None = None
        self.drain_timeout = 5
        self.include_event = True
        self.log_trusted = True
        self.view = FingerprintView(self)
        self.scrubber = Scrubber()
        self._log_filter = _ScrubFilter(self.scrubber)
        self._background: list[threading.Thread] = []

    # -- options ---------------------------------------------------------------------

    def load(self, loader: Loader) -> None:
        for name, typespec, default, help_text in OPTIONS:
            loader.add_option(name, typespec, default, help_text)
        contentviews.add(self.view)
        self._filter_logs()

    def running(self) -> None:
        self._filter_logs()  # handlers added after the script was loaded

    def _filter_logs(self) -> None:
        for handler in logging.getLogger().handlers:
            if self._log_filter not in handler.filters:
                handler.addFilter(self._log_filter)

    def configure(self, updated: set[str]) -> None:
        opts = _options()
        if "fp_filter" in updated:
            self.filter = _parse_filter(opts.fp_filter)
        if "fp_log_trusted" in updated:
            self.log_trusted = opts.fp_log_trusted
        if "fp_max_body" in updated:
            self.max_body = _positive(opts, "fp_max_body")
        if "fp_drain_timeout" in updated:
            self.drain_timeout = _non_negative(opts, "fp_drain_timeout")
        if updated & (_WRITER_OPTIONS | _DELIVERY_OPTIONS):
            self._configure_outputs(opts, updated)
        if updated & _TAP_OPTIONS:
            self._configure_tap(opts, reload_keys="fp_keys_file" in updated)
        if opts.fp_sqlite and updated & {"fp_sqlite", "fp_replay_ttl"}:
            self._preload_replay(opts.fp_sqlite)

    def _configure_tap(self, opts: Any, reload_keys: bool) -> None:
        if reload_keys:
            self.keys = _load_keys(opts.fp_keys_file)
            for key in self.keys:
                self.scrubber.add_key(key.raw())
        try:
            origins = parse_origins(opts.fp_origins)
        except ValueError as exc:
            raise exceptions.OptionsError(f"fp_origins: {exc}") from None
        try:
            redactor = Redactor(parse_paths(opts.fp_redact))
        except ValueError as exc:
            raise exceptions.OptionsError(f"fp_redact: {exc}") from None
        self.include_event = opts.fp_include_event
        config = TapConfig(
            keys=self.keys,
            include_event=opts.fp_include_event or bool(opts.fp_webhook_url),
            max_event=_positive(opts, "fp_max_event"),
            checks=CheckConfig(max_age_ms=_positive(opts, "fp_max_age") * 1000, origins=origins),
            replay_ttl=_positive(opts, "fp_replay_ttl"),
            redactor=redactor,
        )
        replay = self.tap.replay
        self.tap = Tap(config, self.stats)
        if replay.ttl == config.replay_ttl:
            self.tap.replay = replay  # keep what was seen across unrelated option changes

    def _configure_outputs(self, opts: Any, updated: set[str]) -> None:
        """Open what the options ask for first; only then swap it in and retire the old
        writer and delivery (in that order, off the event loop), so that a bad value
        leaves the running ones untouched."""
        delivery, retired = self.delivery, None
        if updated & _DELIVERY_OPTIONS:
            config = _delivery_config(opts)
            if config is not None and config.secret is not None:
                self.scrubber.add(config.secret.text())
            if config is None:
                delivery, retired = None, self.delivery
            elif delivery is None or delivery.spool.state_dir != _state_dir(opts):
                delivery, retired = _open_delivery(_state_dir(opts), config, self.stats), delivery
            else:
                delivery.configure(config)
        writer, old_writer = self.writer, None
        if delivery is not self.delivery or updated & _WRITER_OPTIONS:
            try:
                writer, old_writer = self._new_writer(opts, delivery), self.writer
            except exceptions.OptionsError:
                if delivery is not self.delivery and delivery is not None:
                    delivery.close(drain=0)
                raise
        self.writer, self.delivery = writer, delivery
        if old_writer is not None or retired is not None:
            self._in_background(_retire(old_writer, retired))

    def _new_writer(self, opts: Any, delivery: Delivery | None) -> RecordWriter | None:
        # The spool comes first: a record found in the JSONL file or the store is
        # already in the spool, so a crash right after cannot lose its delivery.
        max_queue = _positive(opts, "fp_queue_size")
        sinks: list[Sink] = []
        if delivery is not None:
            sinks.append(WebhookSink(delivery.spool, self.stats, delivery.wake))
        files = _file_sinks(opts, self.stats)
        if delivery is not None and not opts.fp_include_event:
            files = [WithoutEvent(sink) for sink in files]
        sinks += files
        if not sinks:
            return None
        writer = RecordWriter(sinks, self.stats, max_queue=max_queue)
        writer.start()
        return writer

    def _preload_replay(self, path: str) -> None:
        """Ids the store saw within the replay ttl count as seen (a one-off read at start)."""
        from fp_core.store import recent_request_ids

        now, replay = time.time(), self.tap.replay
        try:
            items = recent_request_ids(path, now - replay.ttl, replay.max_entries)
        except FpError as exc:
            log.warning("fp-tap: duplicate check: cannot read earlier ids: %s", exc.message)
            return
        replay.preload(items, now)
        if items:
            log.info(
                "fp-tap: duplicate check: %d request id(s) from the last %d s of %s",
                len(items),
                replay.ttl,
                path,
            )

    # -- hooks -----------------------------------------------------------------------

    def requestheaders(self, flow: http.HTTPFlow) -> None:
        secret = flow.request.headers.get(PROXY_SECRET_HEADER)
        if secret:
            self.scrubber.add(secret)

    def responseheaders(self, flow: http.HTTPFlow) -> None:
        _mask_proxy_secret(flow)

    def error(self, flow: http.HTTPFlow) -> None:
        _mask_proxy_secret(flow)

    def response(self, flow: http.HTTPFlow) -> None:
        try:
            _mask_proxy_secret(flow)
            self._inspect(flow)
        except Exception as exc:  # an escaping exception would skip later addons' hooks
            self.stats.incr_group("errors", "internal")
            log.warning("fp-tap: internal error on flow %s: %s", flow.id, type(exc).__name__)

    def done(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None
        if self.delivery is not None:
            self.delivery.close(drain=self.drain_timeout)
        for thread in self._background:
            thread.join(timeout=10)
        log.info("fp-tap summary: %s", json.dumps(self.snapshot(), sort_keys=True))
        for handler in logging.getLogger().handlers:
            handler.removeFilter(self._log_filter)

    # -- commands --------------------------------------------------------------------

    @command.command("fp.stats")
    def stats_command(self) -> str:
        """Counters: responses, open responses, unsealed, errors by kind, skipped, dropped."""
        return json.dumps(self.snapshot(), sort_keys=True)

    @command.command("fp.export")
    def export_command(self, flows: Sequence[mflow.Flow], path: types.Path) -> None:
        """Write the records of the selected flows to a JSONL file (mode 0600)."""
        records = [r for f in flows if (r := self.record_for(f)) is not None]

        def write() -> None:
            with open_private(str(path), "w") as handle:
                handle.write("".join(dumps(r) + "\n" for r in records))
            log.info("fp.export: wrote %d record(s) to %s", len(records), path)

        self._in_background(write)

    @command.command("fp.resend")
    def resend_command(self) -> None:
        """Send the parked webhook events again (in the background; see fp.stats)."""
        delivery = self.delivery
        if delivery is None:
            raise exceptions.CommandError("fp.resend: no webhook configured (fp_webhook_url)")

        def resend() -> None:
            log.info("fp.resend: %d parked webhook event(s) queued again", delivery.resend())

        self._in_background(resend)

    # -- the work --------------------------------------------------------------------

    def snapshot(self) -> dict[str, Any]:
        out = self.tap.snapshot()
        out["queued"] = self.writer.pending() if self.writer else 0
        if self.delivery is not None:
            out.update(self.delivery.snapshot())
        return out

    def _inspect(self, flow: http.HTTPFlow) -> None:
        if flow.response is None or (self.filter is not None and not self.filter(flow)):
            return
        self.stats.incr("responses")
        info = self._response_info(flow, count=True)
        if info is None:
            return
        record = self.tap.inspect(info)
        if record is None:
            return
        _annotate(flow, record)
        if self.log_trusted or record["verdict"] != "trusted":
            _log_record(record)
        if self.writer is not None:
            self.writer.submit(record)

    def _response_info(self, flow: http.HTTPFlow, count: bool) -> ResponseInfo | None:
        response = flow.response
        assert response is not None
        raw = response.raw_content
        if raw is None:  # streamed: the body never passes through the addon
            if count:
                self.stats.incr_group("skipped", "streamed")
            return None
        try:
            if len(raw) > self.max_body:
                raise ContentError("too_big", "raw body too big")
            body = decode_content(raw, response.headers.get("content-encoding"), self.max_body)
        except ContentError as exc:
            if count:
                self.stats.incr_group("skipped", exc.reason)
            return None
        # Every response passes here: ordinary traffic stops before anything more is
        # read from the flow (pretty_host alone costs more than this test).
        if not might_be_open_response(body):
            return None
        peer = flow.client_conn.peername
        return ResponseInfo(
            flow_id=flow.id,
            time=response.timestamp_end or response.timestamp_start,
            host=_pretty_host(flow.request),
            path=flow.request.path.split("?", 1)[0],
            method=flow.request.method,
            status_code=response.status_code,
            body=body,
            peer_ip=peer[0] if peer else None,
            header_client_ip=flow.request.headers.get(CLIENT_IP_HEADER),
        )

    def record_for(self, flow: mflow.Flow) -> dict[str, Any] | None:
        """The record of an already inspected flow, with the verdict seen at the time."""
        if not isinstance(flow, http.HTTPFlow) or flow.response is None:
            return None
        info = self._response_info(flow, count=False)
        record = self.tap.inspect(info, remember=False) if info else None
        stored = flow.metadata.get(METADATA_KEY)
        if record is not None and isinstance(stored, dict):
            record.update({k: stored[k] for k in ("checks", "verdict", "reasons") if k in stored})
        if record is not None and not self.include_event:
            record.pop("event", None)  # the tap keeps it for the webhook only
        return record

    def _in_background(self, fn: Any) -> None:
        thread = threading.Thread(target=fn, name="fp-tap-background", daemon=True)
        self._background = [t for t in self._background if t.is_alive()] + [thread]
        thread.start()


class _ScrubFilter(logging.Filter):
    """Masks secrets in every log record, whoever logged it (see fp_core.scrub)."""

    def __init__(self, scrubber: Scrubber) -> None:
        super().__init__("fp-tap-scrub")
        self.scrubber = scrubber

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            message = record.getMessage()
        except (TypeError, ValueError):
            return True
        clean = self.scrubber.scrub(message)
        if clean is not message:
            record.msg, record.args = clean, None
        return True


class FingerprintView(contentviews.Contentview):
    """Read-only view of an open response: the unsealed event and the tap's checks."""

    syntax_highlight = "yaml"  # JSON is YAML; the header lines are YAML comments

    def __init__(self, addon: FingerprintTap) -> None:
        self.addon = addon

    @property
    def name(self) -> str:
        return "fingerprint"

    def render_priority(self, data: bytes, metadata: contentviews.Metadata) -> float:
        if not isinstance(metadata.http_message, http.Response):
            return -1
        # Above the JSON view (1), so open responses open here by default.
        return 2 if parse_open_response(data) is not None else -1

    def prettify(self, data: bytes, metadata: contentviews.Metadata) -> str:
        opened = parse_open_response(data)
        if opened is None:
            raise ValueError("not a Fingerprint open response")
        lines = [f"# Fingerprint open response ({opened.api}), request id {opened.request_id}"]
        stored = metadata.flow.metadata.get(METADATA_KEY) if metadata.flow else None
        if isinstance(stored, dict):
            reasons = ", ".join(stored.get("reasons") or [])
            lines.append(
                f"# verdict: {stored.get('verdict')}" + (f" ({reasons})" if reasons else "")
            )
            checks = stored.get("checks") or {}
            lines.append("# checks: " + " ".join(f"{k}={json.dumps(v)}" for k, v in checks.items()))
        try:
            event = unseal_event(
                opened.sealed, self.addon.keys, max_size=self.addon.tap.config.max_event
            )
        except UnsealError as exc:
            lines.append(f"# cannot unseal: {exc}")
            return "\n".join(lines) + "\n" + json.dumps(json.loads(data), indent=2)
        lines.append(f"# unsealed with key {event.key_id} (#{event.key_index + 1})")
        return "\n".join(lines) + "\n" + json.dumps(event, indent=2, ensure_ascii=False)


def _options() -> Any:
    return ctx.options


def _positive(opts: Any, name: str) -> int:
    value = getattr(opts, name)
    if value <= 0:
        raise exceptions.OptionsError(f"{name} must be a positive number, got {value}")
    return int(value)


def _non_negative(opts: Any, name: str) -> int:
    value = getattr(opts, name)
    if value < 0:
        raise exceptions.OptionsError(f"{name} cannot be negative, got {value}")
    return int(value)


def _state_dir(opts: Any) -> str:
    if not str(opts.fp_state_dir).strip():
        raise exceptions.OptionsError("fp_state_dir cannot be empty")
    return os.path.abspath(os.path.expanduser(str(opts.fp_state_dir)))


def _delivery_config(opts: Any) -> DeliveryConfig | None:
    """The webhook settings, validated (the secret read once, here); None: no webhook."""
    if not opts.fp_webhook_url:
        return None
    _require_sqlite("fp_webhook_url")  # for the spool
    from fp_core.delivery import DeliveryConfig

    try:
        url = check_url(opts.fp_webhook_url)
        secret = load_secret(opts.fp_webhook_secret_file)
        if opts.fp_webhook_ca:
            tls_context(opts.fp_webhook_ca)  # a bad file is an error now, not per request
    except FpError as exc:
        raise exceptions.OptionsError(f"fp_webhook: {exc.message}") from None
    secret_file = opts.fp_webhook_secret_file
    if secret_file and key_file_too_open(secret_file):
        log.warning(
            "fp-tap: webhook secret file %s is readable by others; chmod 600 it", secret_file
        )
    if secret is None:
        log.warning(
            "fp-tap: webhook events are not signed: set %s or fp_webhook_secret_file",
            SECRET_ENV_VAR,
        )
    if is_plaintext_remote(url):
        log.warning(
            "fp-tap: fp_webhook_url is plain http to another host: events travel unencrypted"
        )
    return DeliveryConfig(
        url=url,
        secret=secret,
        timeout=_positive(opts, "fp_webhook_timeout"),
        concurrency=_positive(opts, "fp_webhook_concurrency"),
        retry_first=_positive(opts, "fp_webhook_retry_ms") / 1000,
        retry_max=_positive(opts, "fp_webhook_retry_max"),
        give_up=_positive(opts, "fp_webhook_give_up"),
        ca_file=opts.fp_webhook_ca or None,
    )


def _open_delivery(state_dir: str, config: DeliveryConfig, stats: Stats) -> Delivery:
    from fp_core.delivery import Delivery
    from fp_core.spool import Spool

    try:
        spool = Spool(state_dir)
    except FpError as exc:
        raise exceptions.OptionsError(f"fp_state_dir: {exc.message}") from None
    try:
        delivery = Delivery(spool, config, stats)
    except FpError as exc:
        spool.close()
        raise exceptions.OptionsError(f"fp_webhook: {exc.message}") from None
    delivery.start()
    log.info(
        "fp-tap: forwarding unsealed events to %s (%s), spool %s",
        describe_url(config.url),
        "signed" if config.secret else "unsigned",
        spool.path,
    )
    return delivery


def _file_sinks(opts: Any, stats: Stats) -> list[Sink]:
    """The SQLite store and the JSONL file, as configured; all or none opened."""
    sinks: list[Sink] = []
    try:
        if opts.fp_sqlite:
            _require_sqlite("fp_sqlite")
            from fp_core.store import SqliteStore

            try:
                sinks.append(SqliteStore(opts.fp_sqlite, stats))
            except FpError as exc:
                raise exceptions.OptionsError(f"fp_sqlite: {exc.message}") from None
        if opts.fp_jsonl:
            try:
                sinks.append(JsonlSink(opts.fp_jsonl))
            except OSError as exc:
                raise exceptions.OptionsError(
                    f"fp_jsonl: cannot open {opts.fp_jsonl}: {exc.strerror}"
                ) from None
    except exceptions.OptionsError:
        for sink in sinks:
            sink.close()
        raise
    return sinks


def _require_sqlite(option: str) -> None:
    """A clear start-up error when ``option`` needs sqlite3 and this Python has none."""
    try:
        import sqlite3  # noqa: F401
    except ImportError:
        raise exceptions.OptionsError(
            f"{option} needs Python's sqlite3 module, which this mitmproxy does not include "
            "(the standalone binaries leave it out): run a mitmproxy installed from PyPI "
            "(e.g. pipx install mitmproxy)"
        ) from None


def _retire(writer: RecordWriter | None, delivery: Delivery | None) -> Callable[[], None]:
    """Close a replaced writer, then the delivery whose spool it may still be feeding."""

    def retire() -> None:
        if writer is not None:
            writer.close()
        if delivery is not None:
            delivery.close(drain=0)

    return retire


def _parse_filter(expression: str | None) -> flowfilter.TFilter | None:
    if not expression:
        return None
    try:
        return flowfilter.parse(expression)
    except ValueError as exc:
        raise exceptions.OptionsError(f"fp_filter: invalid filter expression: {exc}") from None


def _load_keys(keys_file: str | None) -> list[DecryptionKey]:
    try:
        keys = load_keys(keys_file)
    except KeyConfigError as exc:
        raise exceptions.OptionsError(f"fp-tap: {exc.message}") from None
    if keys_file and key_file_too_open(keys_file):
        log.warning("fp-tap: key file %s is readable by group or others; chmod 600 it", keys_file)
    if keys:
        log.info("fp-tap: %d decryption key(s): %s", len(keys), ", ".join(k.key_id for k in keys))
    else:
        log.warning(
            "fp-tap: no decryption keys (set %s or fp_keys_file): open responses will be "
            "recorded with error no_keys",
            ENV_VAR,
        )
    return keys


def _pretty_host(request: http.Request) -> str:
    """``request.pretty_host``, remembering the answer for each Host header."""
    authority = request.host_header
    return _authority_host(authority) if authority else request.host


@functools.lru_cache(maxsize=1024)
def _authority_host(authority: str) -> str:
    # What pretty_host does with the header, which costs more than the rest of the
    # record put together; a tap sees the same few hosts over and over.
    return url.parse_authority(authority, check=False)[0]


def _mask_proxy_secret(flow: http.HTTPFlow) -> None:
    """Blank the proxy secret once the request has gone upstream.

    By then the value has done its job; what stays in the flow is what mitmproxy
    shows in its UIs and writes to saved flow files (``-w``), where a credential has
    no business. What the client and the upstream see is unaffected.
    """
    headers = flow.request.headers
    if PROXY_SECRET_HEADER in headers and headers[PROXY_SECRET_HEADER] != REDACTED:
        headers[PROXY_SECRET_HEADER] = REDACTED


def _annotate(flow: http.HTTPFlow, record: dict[str, Any]) -> None:
    flow.metadata[METADATA_KEY] = metadata_of(record)
    comment = _comment(record)
    flow.comment = f"{flow.comment}\n{comment}" if flow.comment else comment
    if not flow.marked and record["verdict"] != "trusted":
        flow.marked = MARK_ERROR if record["verdict"] == "error" else MARK_SUSPICIOUS


def _comment(record: dict[str, Any]) -> str:
    if not record["ok"]:
        return f"fp error: {record['error']['kind']}"
    summary = record["summary"]
    reasons = f" ({', '.join(record['reasons'])})" if record["reasons"] else ""
    return (
        f"fp {record['verdict']}{reasons} · visitor {summary['visitor_id']} · bot {summary['bot']}"
    )


def _log_record(record: dict[str, Any]) -> None:
    if not record["ok"]:
        log.warning(
            "fp %s %s error %s: %s [flow %s]",
            record["api"],
            record["request_id"],
            record["error"]["kind"],
            record["error"]["message"],
            record["flow_id"],
        )
        return
    summary, checks = record["summary"], record["checks"]
    reasons = f" ({','.join(record['reasons'])})" if record["reasons"] else ""
    log.info(
        "fp %s %s %s%s visitor=%s bot=%s key=%s %s [flow %s]",
        record["api"],
        record["request_id"],
        record["verdict"],
        reasons,
        summary["visitor_id"],
        summary["bot"],
        record["key_id"],
        " ".join(f"{name}={_word(value)}" for name, value in checks.items()),
        record["flow_id"],
    )


def _word(value: object) -> str:
    if value is None:
        return "-"
    return "yes" if value is True else "no" if value is False else str(value)


addons = [FingerprintTap()]
