"""The tap's heavy half: unseal and judge, then hand records to the sinks.

One :class:`Pipeline` holds the :class:`~fp_core.tap.Tap` (with its replay memory), the
record writer and the webhook delivery, built from the addon's option values. The addon
runs it in mitmproxy's own process (``fp_worker=false``) or has :mod:`fp_core.worker`
run it in a separate process; the code is the same either way, which is why it takes
``opts``: any object with the ``fp_*`` option names as attributes (mitmproxy's options,
or the plain values the worker was sent). It reads the key file and the webhook secret
file itself, through a :class:`~fp_core.rotation.FileWatch` each, and takes what they
hold when they change (:meth:`Pipeline.check_files`, :meth:`Pipeline.take`).
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from collections.abc import Set as AbstractSet
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any, cast

from fp_core.checks import CheckConfig, parse_origins
from fp_core.errors import ConfigError, FpError
from fp_core.keys import DecryptionKey, describe_keys, too_open_warning, with_env_keys
from fp_core.redact import Redactor, parse_paths
from fp_core.rotation import (
    FileChange,
    FileWatch,
    SecretInUse,
    Watches,
    load_keys_watched,
    load_secret_watched,
)
from fp_core.stats import Stats
from fp_core.tap import ResponseInfo, Tap, TapConfig
from fp_core.webhook import (
    SECRET_ENV_VAR,
    WebhookSecret,
    WebhookSink,
    check_url,
    describe_url,
    is_plaintext_remote,
    tls_context,
)
from fp_core.writer import JsonlSink, RecordWriter, Sink, WithoutEvent

if TYPE_CHECKING:
    # At run time these are imported where fp_sqlite or fp_webhook_url needs them: they
    # use sqlite3, which mitmproxy's standalone binaries do not bundle, and the rest of
    # the tap must load there all the same.
    from fp_core.delivery import Delivery, DeliveryConfig
    from fp_core.store import SqliteStore

log = logging.getLogger(__name__)

#: The commands on the spool's parked events, and what each does to them.
SPOOL_COMMANDS = {"resend": "queued again", "discard": "deleted"}
#: Options whose change means a new record writer (its sinks are opened once).
WRITER_OPTIONS = frozenset(
    {"fp_jsonl", "fp_queue_size", "fp_sqlite", "fp_sqlite_keep", "fp_include_event"}
)
#: Options of the webhook delivery (a new one only for a new fp_state_dir).
DELIVERY_OPTIONS = frozenset(
    {
        "fp_webhook_url",
        "fp_webhook_secret_file",
        "fp_webhook_ca",
        "fp_webhook_timeout",
        "fp_webhook_concurrency",
        "fp_webhook_retry_ms",
        "fp_webhook_retry_max",
        "fp_webhook_give_up",
        "fp_webhook_max_events",
        "fp_webhook_keep_parked",
        "fp_state_dir",
    }
)
#: Options whose change means a new tap configuration.
TAP_OPTIONS = frozenset(
    {
        "fp_keys_file",
        "fp_include_event",
        "fp_max_age",
        "fp_replay_ttl",
        "fp_origins",
        "fp_max_event",
        "fp_redact",
        "fp_webhook_url",  # the webhook needs the event in records even without fp_include_event
    }
)
#: How often the watched files are checked (the worker process's loop reads it).
RELOAD_OPTIONS = frozenset({"fp_secrets_reload"})
#: Every option a pipeline reads.
OPTIONS = WRITER_OPTIONS | DELIVERY_OPTIONS | TAP_OPTIONS | RELOAD_OPTIONS
#: Options that open files or connections: a configuration with any of them set can fail
#: in ways only opening them tells.
OUTPUT_OPTIONS = ("fp_jsonl", "fp_sqlite", "fp_webhook_url")


class Background:
    """One-off jobs on threads of their own, kept off the event loop; joined at the end."""

    def __init__(self) -> None:
        self._threads: list[threading.Thread] = []

    def run(self, fn: Callable[[], None]) -> None:
        thread = threading.Thread(target=fn, name="fp-tap-background", daemon=True)
        self._threads = [t for t in self._threads if t.is_alive()] + [thread]
        thread.start()

    def join(self, timeout: float = 10) -> None:
        for thread in self._threads:
            thread.join(timeout)


class Pipeline:
    """Tap, writer and delivery; :meth:`inspect` is the per-response entry point."""

    def __init__(self, stats: Stats | None = None) -> None:
        self.stats = stats or Stats()
        self.tap = Tap(TapConfig(), self.stats)
        self.writer: RecordWriter | None = None
        self.delivery: Delivery | None = None
        self.background = Background()
        self._closed = False
        #: The keys in use: the environment's, then the key file's (None: not loaded yet).
        self.keys: list[DecryptionKey] | None = None
        #: Seconds between two checks of the watched files (0: never).
        self.reload_every = 0
        #: The files whose content is in use.
        self._watches = Watches()

    def configure(
        self,
        opts: Any,
        updated: AbstractSet[str],
        keys: Sequence[DecryptionKey] | None = None,
        *,
        in_use: InUse | None = None,
    ) -> None:
        """Apply the options named in ``updated``; raises :class:`ConfigError`, leaving
        what ran before untouched.

        The keys and the webhook secret are read (and then watched) here, unless the
        caller has them already: ``in_use`` (the addon, when the pipeline runs in its
        process), or plain ``keys`` (tests, benchmarks: nothing watched). Options from
        the worker's parent may carry ``fp_key_ids``, the ids of the keys it has: keys
        read here must be those, or the file changed in between and is refused.
        """
        if updated & RELOAD_OPTIONS:
            self.reload_every = non_negative(opts, "fp_secrets_reload")
        if updated & (WRITER_OPTIONS | DELIVERY_OPTIONS):
            self._configure_outputs(opts, updated, in_use)
        if updated & TAP_OPTIONS:
            watch = self._watches.get("keys")
            if keys is not None:
                keys, watch = list(keys), None
            elif self.keys is None or "fp_keys_file" in updated:
                if in_use is not None:
                    keys, watch = in_use.keys, in_use.key_watch
                else:
                    keys, watch = self._load_keys(opts)
            else:
                keys = self.keys
            config = tap_config(opts, keys)
            replay = self.tap.replay
            self.tap = Tap(config, self.stats)
            # What was seen stays seen across option changes; a new fp_replay_ttl applies
            # to it from now on (expiry reads the ttl at each check).
            replay.ttl = config.replay_ttl
            self.tap.replay = replay
            self.keys = keys
            self._watches.set("keys", watch)
        if opts.fp_sqlite and updated & {"fp_sqlite", "fp_replay_ttl"}:
            self._preload_replay(opts.fp_sqlite)

    def _load_keys(
        self, opts: Any
    ) -> tuple[list[DecryptionKey], FileWatch[list[DecryptionKey]] | None]:
        keys, watch = load_keys_watched(opts.fp_keys_file)
        expected = getattr(opts, "fp_key_ids", None)
        if expected is not None and [k.key_id for k in keys] != list(expected):
            # Its parent read the file a moment ago: it changed since (a rotation caught
            # half-written). Refused: a worker must not unseal with other keys.
            raise ConfigError(
                f"key file {opts.fp_keys_file} changed while being read (it holds "
                f"{describe_keys(keys)}, not the {len(expected)} key(s) expected)"
            )
        return keys, watch

    def check_files(self) -> list[FileChange]:
        """What the watched files hold now, where it changed. Blocking: it reads them."""
        return self._watches.check()

    def take(self, changes: Sequence[FileChange]) -> list[str]:
        """Use what :meth:`check_files` found (no file is read here); the names taken.

        A changed file that cannot be used is logged once and counted, and what is in
        use stays.
        """
        taken = []
        for change in changes:
            name, reload = change.name, change.reload
            if not self._watches.current(change):
                continue  # the options changed since: a newer watch has the say
            if reload.value is None:
                self.stats.incr_group("errors", f"{name}_reload")
                in_use = f"the {len(self.keys or ())} key(s)" if name == "keys" else "the secret"
                log.warning("fp-tap: %s; keeping %s in use", reload.problem, in_use)
                continue
            if reload.warning:
                log.warning("fp-tap: %s", reload.warning)
            if name == "keys":
                self._take_keys(reload.value, change.watch.path)
            else:
                self._take_secret(reload.value, change.watch.path)
            self.stats.incr_group("reloaded", name)
            taken.append(name)
        return taken

    def _take_keys(self, file_keys: list[DecryptionKey], path: str) -> None:
        keys = with_env_keys(file_keys)
        replay = self.tap.replay
        self.tap = Tap(replace(self.tap.config, keys=keys), self.stats)
        self.tap.replay = replay
        self.keys = keys
        log.info("fp-tap: key file %s changed: %s", path, describe_keys(keys))

    def _take_secret(self, secret: WebhookSecret, path: str) -> None:
        if self.delivery is not None:
            # The same delivery and spool: the next attempt, a retry or not, signs with it.
            self.delivery.configure(replace(self.delivery.config, secret=secret))
        log.info("fp-tap: webhook secret file %s changed: its secret signs from now on", path)

    def inspect(self, info: ResponseInfo) -> dict[str, Any] | None:
        """The record for ``info`` (queued for the sinks), or None: not an open response."""
        record = self.tap.inspect(info)
        if record is not None and self.writer is not None:
            self.writer.submit(record)
        return record

    def snapshot(self) -> dict[str, Any]:
        """Counters and gauges (see the addon's ``fp.stats``)."""
        out = self.tap.snapshot()
        out["queued"] = self.writer.pending() if self.writer else 0
        if self.delivery is not None:
            out.update(self.delivery.snapshot())
        return out

    def resend(self) -> int:
        """Queue the parked webhook events again; how many."""
        return self._delivery("resend").resend()

    def discard(self) -> int:
        """Delete the parked webhook events; how many."""
        return self._delivery("discard").discard()

    def spool_command(self, name: str) -> None:
        """Run ``fp.<name>`` (a key of :data:`SPOOL_COMMANDS`) and log what it did."""
        try:
            count = self.resend() if name == "resend" else self.discard()
        except ConfigError as exc:
            log.warning("%s", exc.message)
        except FpError as exc:  # the spool's file (locked by another connection, disk full)
            self.stats.incr_group("webhook", "spool_errors")
            log.warning("fp.%s: %s", name, exc.message)
        else:
            log.info("fp.%s: %d parked webhook event(s) %s", name, count, SPOOL_COMMANDS[name])

    def _delivery(self, command: str) -> Delivery:
        if self.delivery is None:
            raise ConfigError(f"fp.{command}: no webhook configured (fp_webhook_url)")
        return self.delivery

    def close(self, drain: float) -> None:
        """Write what is queued, deliver for up to ``drain`` seconds, close everything."""
        if self._closed:
            return
        self._closed = True
        # Writers retired by a change of options finish first: they may still be writing
        # into the spool of the delivery closed last, and hand what their store holds to
        # this writer's (same file), which then gives it its close's patience.
        self.background.join()
        if self.writer is not None:
            self.writer.close()
            self.writer = None
        if self.delivery is not None:
            # Kept (closed): its spool's last gauges stay in snapshot().
            self.delivery.close(drain=drain)

    def _configure_outputs(
        self, opts: Any, updated: AbstractSet[str], in_use: InUse | None = None
    ) -> None:
        """Open what the options ask for first; only then swap it in and retire the old
        writer and delivery (in that order, in the background), so that a bad value
        leaves the running ones untouched."""
        delivery, retired = self.delivery, None
        secret_watch = self._watches.get("webhook_secret")
        if updated & DELIVERY_OPTIONS:
            # The secret in use stays while its file does; else the caller's; else the
            # file is read.
            kept = [(delivery.config.secret, secret_watch)] if delivery is not None else []
            if in_use is not None:
                kept.append((in_use.secret, in_use.secret_watch))
            config, secret_watch = delivery_config(opts, kept)
            if config is None:
                delivery, retired = None, self.delivery
            elif delivery is None or not _same_dir(delivery.spool.state_dir, state_dir(opts)):
                delivery, retired = _open_delivery(state_dir(opts), config, self.stats), delivery
            else:
                delivery.configure(config)
        writer, old_writer = self.writer, None
        if delivery is not self.delivery or updated & WRITER_OPTIONS:
            try:
                writer, old_writer = self._new_writer(opts, delivery), self.writer
            except ConfigError:
                if delivery is not self.delivery and delivery is not None:
                    delivery.close(drain=0)
                raise
        self.writer, self.delivery = writer, delivery
        self._watches.set("webhook_secret", secret_watch)
        old_store, new_store = _store_of(old_writer), _store_of(writer)
        if old_store is not None and new_store is not None:
            # Records held for a locked file go on to the new writer (same file), not lost.
            old_store.succeeded_by(new_store)
        if old_writer is not None or retired is not None:
            self.background.run(_retire(old_writer, retired))

    def _new_writer(self, opts: Any, delivery: Delivery | None) -> RecordWriter | None:
        # The spool comes first: a record found in the JSONL file or the store is
        # already in the spool, so a crash right after cannot lose its delivery.
        max_queue = positive(opts, "fp_queue_size")
        sinks: list[Sink] = []
        if delivery is not None:
            # The limit read at each write: a change of it alone keeps this writer.
            sinks.append(
                WebhookSink(
                    delivery.spool,
                    self.stats,
                    delivery.wake,
                    delivery.max_events,
                    held=delivery.held,
                )
            )
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


def tap_config(opts: Any, keys: Sequence[DecryptionKey]) -> TapConfig:
    """The tap's settings from the options; :class:`ConfigError` names a bad one."""
    try:
        origins = parse_origins(opts.fp_origins)
    except ValueError as exc:
        raise ConfigError(f"fp_origins: {exc}") from None
    try:
        redactor = Redactor(parse_paths(opts.fp_redact))
    except ValueError as exc:
        raise ConfigError(f"fp_redact: {exc}") from None
    return TapConfig(
        keys=list(keys),
        include_event=opts.fp_include_event or bool(opts.fp_webhook_url),
        max_event=positive(opts, "fp_max_event"),
        checks=CheckConfig(max_age_ms=positive(opts, "fp_max_age") * 1000, origins=origins),
        replay_ttl=positive(opts, "fp_replay_ttl"),
        redactor=redactor,
    )


def positive(opts: Any, name: str) -> int:
    value = getattr(opts, name)
    if value <= 0:
        raise ConfigError(f"{name} must be a positive number, got {value}")
    return int(value)


def non_negative(opts: Any, name: str) -> int:
    value = getattr(opts, name)
    if value < 0:
        raise ConfigError(f"{name} cannot be negative, got {value}")
    return int(value)


def state_dir(opts: Any) -> str:
    if not str(opts.fp_state_dir).strip():
        raise ConfigError("fp_state_dir cannot be empty")
    return os.path.abspath(os.path.expanduser(str(opts.fp_state_dir)))


def delivery_config(
    opts: Any, in_use: Iterable[SecretInUse] = ()
) -> tuple[DeliveryConfig | None, FileWatch[WebhookSecret] | None]:
    """The webhook settings, validated, and the watch of the secret file the secret was
    read from, if any; (None, None): no webhook. The secret file is not read again when
    one of ``in_use`` has its secret (:func:`~fp_core.rotation.load_secret_watched`)."""
    if not opts.fp_webhook_url:
        return None, None
    require_sqlite("fp_webhook_url")  # for the spool
    from fp_core.delivery import DeliveryConfig

    try:
        url = check_url(opts.fp_webhook_url)
        secret, watch = load_secret_watched(opts.fp_webhook_secret_file, in_use)
        if opts.fp_webhook_ca:
            tls_context(opts.fp_webhook_ca)  # a bad file is an error now, not per request
    except FpError as exc:
        raise ConfigError(f"fp_webhook: {exc.message}") from None
    if warning := too_open_warning(opts.fp_webhook_secret_file, "webhook secret file"):
        log.warning("fp-tap: %s", warning)
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
        timeout=positive(opts, "fp_webhook_timeout"),
        concurrency=positive(opts, "fp_webhook_concurrency"),
        retry_first=positive(opts, "fp_webhook_retry_ms") / 1000,
        retry_max=positive(opts, "fp_webhook_retry_max"),
        give_up=positive(opts, "fp_webhook_give_up"),
        ca_file=opts.fp_webhook_ca or None,
        max_events=positive(opts, "fp_webhook_max_events"),
        keep_parked=non_negative(opts, "fp_webhook_keep_parked"),
    ), watch


@dataclass(frozen=True)
class InUse:
    """Keys and the webhook secret a caller has read already, with the watches of their
    files (copies: each user of a watch needs its own), for a pipeline to take instead
    of reading the files again."""

    keys: list[DecryptionKey] = field(default_factory=list)
    key_watch: FileWatch[list[DecryptionKey]] | None = None
    secret: WebhookSecret | None = None
    secret_watch: FileWatch[WebhookSecret] | None = None


def require_sqlite(option: str) -> None:
    """A clear start-up error when ``option`` needs sqlite3 and this Python has none."""
    try:
        import sqlite3  # noqa: F401
    except ImportError:
        raise ConfigError(
            f"{option} needs Python's sqlite3 module, which this mitmproxy does not include "
            "(the standalone binaries leave it out): run a mitmproxy installed from PyPI "
            "(e.g. pipx install mitmproxy)"
        ) from None


def _open_delivery(folder: str, config: DeliveryConfig, stats: Stats) -> Delivery:
    from fp_core.delivery import Delivery
    from fp_core.spool import Spool

    try:
        spool = Spool(folder)
    except FpError as exc:
        raise ConfigError(f"fp_state_dir: {exc.message}") from None
    try:
        delivery = Delivery(spool, config, stats)
    except FpError as exc:
        spool.close()
        raise ConfigError(f"fp_webhook: {exc.message}") from None
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
        keep = non_negative(opts, "fp_sqlite_keep")
        if opts.fp_sqlite:
            require_sqlite("fp_sqlite")
            from fp_core.store import SqliteStore

            try:
                sinks.append(SqliteStore(opts.fp_sqlite, stats, keep=keep))
            except FpError as exc:
                raise ConfigError(f"fp_sqlite: {exc.message}") from None
        if opts.fp_jsonl:
            try:
                sinks.append(JsonlSink(opts.fp_jsonl))
            except OSError as exc:
                raise ConfigError(
                    f"fp_jsonl: cannot open {opts.fp_jsonl}: {exc.strerror}"
                ) from None
    except ConfigError:
        for sink in sinks:
            sink.close()
        raise
    return sinks


def _same_dir(running: str, wanted: str) -> bool:
    """Whether ``wanted`` names the directory in use (another path to it, a symlink,
    is no change: a second spool there would wait for its own lock)."""
    if running == wanted:
        return True
    try:
        return os.path.samefile(running, wanted)
    except OSError:
        return False


def _store_of(writer: RecordWriter | None) -> SqliteStore | None:
    """The writer's SQLite store, if it has one."""
    for sink in writer.sinks if writer is not None else ():
        inner = sink.sink if isinstance(sink, WithoutEvent) else sink
        if type(inner).__name__ == "SqliteStore":  # not imported: sqlite3 may be missing
            return cast("SqliteStore", inner)
    return None


def _retire(writer: RecordWriter | None, delivery: Delivery | None) -> Callable[[], None]:
    """Close a replaced writer, then the delivery whose spool it may still be feeding."""

    def retire() -> None:
        if writer is not None:
            writer.close()
        if delivery is not None:
            delivery.close(drain=0)

    return retire
