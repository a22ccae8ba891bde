"""fp-tap: a mitmproxy addon that unseals Fingerprint Open Client Responses in flight.

    mitmdump -s fp_addon.py --set fp_keys_file=keys.txt --set fp_jsonl=events.jsonl \
        --set fp_sqlite=events.sqlite3 --set fp_webhook_url=https://backend.example/fp

It reads responses and never changes what the client receives. This is the only module
that speaks mitmproxy; the work is done by ``fp_core`` (found beside this file, so a
stock or standalone mitmproxy runs it without installing anything). The README lists
every option, the record format and the commands.
"""

from __future__ import annotations

import asyncio
import atexit
import concurrent.futures
import contextlib
import copy
import functools
import json
import logging
import sys
import threading
import time
import weakref
from collections.abc import Callable, Sequence
from dataclasses import replace
from types import SimpleNamespace
from typing import TYPE_CHECKING, Any, Optional

from mitmproxy import command, contentviews, ctx, exceptions, flowfilter, hooks, http, types
from mitmproxy import flow as mflow
from mitmproxy.addonmanager import Loader
from mitmproxy.addons.termlog import TermLogHandler
from mitmproxy.log import LegacyLogEvents
from mitmproxy.net.http import url

from fp_core.content import ContentError, decode_content
from fp_core.envelope import might_be_open_response, parse_open_response
from fp_core.errors import ConfigError, FpError, UnsealError
from fp_core.events import inner_request_id
from fp_core.jsontext import dumps, encodable
from fp_core.keys import ENV_VAR, DecryptionKey, describe_keys, too_open_warning, with_env_keys
from fp_core.loglines import DirectLines, printable
from fp_core.pipeline import (
    DELIVERY_OPTIONS,
    OUTPUT_OPTIONS,
    TAP_OPTIONS,
    Background,
    InUse,
    Pipeline,
    non_negative,
    positive,
    tap_config,
)
from fp_core.pipeline import OPTIONS as PIPELINE_OPTIONS
from fp_core.redact import PRESETS, REDACTED
from fp_core.rotation import FileWatch, Watches, load_keys_watched, load_secret_watched
from fp_core.scrub import Scrubber
from fp_core.sealed import DEFAULT_MAX_SIZE, unseal_event
from fp_core.stats import Stats, merge_counts, without_gauges
from fp_core.tap import METADATA_FIELDS, ResponseInfo, Tap, TapConfig, metadata_of
from fp_core.throttle import Throttle
from fp_core.webhook import SECRET_ENV_VAR, WebhookSecret
from fp_core.worker import Records, WorkerClient
from fp_core.writer import open_private

if TYPE_CHECKING:
    from fp_core.delivery import Delivery
    from fp_core.writer import RecordWriter

log = logging.getLogger(__name__)
#: The one line per open response. It reaches every log handler (the terminal,
#: mitmweb's and the console's event log, any added with logging) but not mitmproxy's
#: deprecated ``add_log`` event: that one hands every line to every loaded addon, which
#: measured 0.15 ms a line (BENCHMARKS.md), more than all else fp-tap still costs the
#: event loop per open response. Where the terminal is the only reader (mitmdump), the
#: lines are written to it directly (``_log_record``).
record_log = logging.getLogger(f"{__name__}.records")

PROXY_SECRET_HEADER = "FPJS-Proxy-Secret"  # noqa: S105 (a header name, not a secret)
CLIENT_IP_HEADER = "FPJS-Proxy-Client-IP"
#: Marks fp-tap's own lines (records, counters): they hold no proxy secret, so the values
#: requests carried in that header are not masked in them (see Scrubber.scrub).
OWN_LINE = {"fp_own": True}
MARK_SUSPICIOUS = ":warning:"
MARK_ERROR = ":x:"
METADATA_KEY = "fp"
#: Whether the flow's mark is fp-tap's (True) or its user's (False), saved with the flow.
MARKED_KEY = "fp_marked"
#: Seconds to wait for the worker process to take a configuration with outputs.
WORKER_TIMEOUT = 60.0
#: Seconds an option change or shutdown waits for a dead worker's replacement to be made
#: (a new worker takes its options within WORKER_TIMEOUT).
REPLACEMENT_TIMEOUT = WORKER_TIMEOUT + 10
#: Options checked in configure although the pipeline uses them: the worker (or a
#: pipeline made later) would refuse them where no option error can reach mitmproxy.
CHECKED_HERE = frozenset(
    {
        "fp_secrets_reload",
        "fp_stats_every",
        "fp_worker_restart",
        "fp_sqlite_keep",
        "fp_webhook_keep_parked",
    }
)
#: How often the periodic task wakes up to see whether fp_secrets_reload or
#: fp_stats_every says it is time.
TICK = 1.0

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
        "fp_secrets_reload",
        int,
        5,
        "Seconds between checks of fp_keys_file and fp_webhook_secret_file: when one "
        "changed, what it holds is used from then on (a rotation without a restart); 0 "
        "never checks.",
    ),
    (
        "fp_stats_every",
        int,
        0,
        "Log the counters (what fp.stats says) every this many seconds, for a headless "
        "tap, where fp.stats cannot be called; 0: only the summary at shutdown.",
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
        "failures: on a busy tap in mitmweb or the console, each log line costs mitmproxy "
        "more than unsealing.",
    ),
    (
        "fp_worker",
        bool,
        True,
        "Unseal, check and write records in a worker process of their own, so that "
        "mitmproxy's event loop only hands response bodies over. False does it all in "
        "mitmproxy's process (as standalone mitmproxy binaries do: they cannot start one).",
    ),
    (
        "fp_worker_restart",
        int,
        60,
        "When the worker process dies after running at least this many seconds, start a "
        "new one (off the event loop; responses wait for it meanwhile). One that dies "
        "sooner, as in a crash loop, gives way to work in mitmproxy's process. 0 never "
        "starts a new one.",
    ),
    (
        "fp_hold",
        bool,
        False,
        "Hold each open response until its record is on the flow, so that addons after "
        "fp-tap see it in their response hook. On by itself when flows are saved (-w). "
        "Off, the client gets the response at once and the annotation follows.",
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
        "fp_sqlite_keep",
        int,
        0,
        "Delete rows of fp_sqlite older than this many seconds as the tap runs (0: keep them all).",
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
        "the spool and counted; fp.resend sends parked events again, fp.discard deletes them.",
    ),
    (
        "fp_webhook_max_events",
        int,
        1_000_000,
        "Webhook events the spool holds at most, pending and parked; beyond, new events "
        "are not spooled (counted as webhook.spool_full; their records are still written).",
    ),
    (
        "fp_webhook_keep_parked",
        int,
        0,
        "Delete parked webhook events this many seconds after they were parked (0: keep "
        "them until fp.resend or fp.discard).",
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
        # Re-reads flows for the content view and fp.export (never counts, never
        # remembers); the live work is the pipeline's, here or in the worker process.
        self.tap = Tap(TapConfig(), self.stats)
        self.pipeline: Pipeline | None = None
        self.worker: WorkerClient | None = None
        self.filter: flowfilter.TFilter | None = None
        self.max_body = 1024 * 1024
        self.drain_timeout = 5
        self.include_event = True
        self.log_trusted = True
        self.hold = False
        self.view = FingerprintView(self)
        self.scrubber = Scrubber()
        self._log_filter = _ScrubFilter(self.scrubber)
        self._lines = DirectLines(
            record_log,
            self.scrubber,
            terminal=_terminal_stream,
            ignores=_ignores_records,
            own_filters=(self._log_filter,),
        )
        self._background = Background()
        #: Flows whose proxy secret is not masked yet (see requestheaders).
        self._unmasked: weakref.WeakSet[http.HTTPFlow] = weakref.WeakSet()
        self._has_view = False
        self._running = False
        #: fp_worker is on but the process is not started yet (see _start_pipeline).
        self._worker_wanted = False
        #: Counters of worker processes that are gone (their last report).
        self._carried: dict[str, Any] = {}
        self._warnings = Throttle()
        self._final: dict[str, Any] | None = None
        self._exports: concurrent.futures.ThreadPoolExecutor | None = None
        #: The fp_worker value the pipeline was started for (None: not started yet).
        self._worker_on: bool | None = None
        #: Open responses mitmproxy finished after the summary (see _after_summary).
        self._late = 0
        #: The files whose content is in use (this process's own watches).
        self._watches = Watches()
        #: The webhook secret in use (None: none, or the pipeline refuses the options).
        self.secret: WebhookSecret | None = None
        self._keys_read = False
        #: What runs every TICK seconds: the file watch, the stats line.
        self._ticker: asyncio.Task[None] | None = None
        self.queue_size = 10_000
        #: When the worker in use started (a dead one is restarted if it ran long enough).
        self._worker_since = 0.0
        #: What replaces a dead worker, being made off the event loop (a new worker, or
        #: a pipeline in this process), and the responses that wait for it meanwhile.
        self._replacing: concurrent.futures.Future[WorkerClient | Pipeline] | None = None
        #: ``_replacing`` when it makes the first worker (no dead one: nothing restarted).
        self._first_start: concurrent.futures.Future[WorkerClient | Pipeline] | None = None
        self._waiting: list[tuple[http.HTTPFlow, ResponseInfo, asyncio.Future[None] | None]] = []

    @property
    def writer(self) -> RecordWriter | None:
        """The in-process record writer (None with a worker process)."""
        return self.pipeline.writer if self.pipeline else None

    @property
    def delivery(self) -> Delivery | None:
        """The in-process webhook delivery (None with a worker process)."""
        return self.pipeline.delivery if self.pipeline else None

    # -- options ---------------------------------------------------------------------

    def load(self, loader: Loader) -> None:
        for name, typespec, default, help_text in OPTIONS:
            loader.add_option(name, typespec, default, help_text)
        contentviews.add(self.view)
        self._filter_logs()

    def running(self) -> None:
        self._filter_logs()  # handlers added after the script was loaded
        self._running = True
        if self._worker_wanted:
            self._start_wanted()
        # Only an interactive tool shows flows; telling it about late annotations
        # costs a hook dispatch to every addon, which mitmdump can do without.
        self._has_view = ctx.master.addons.get("view") is not None
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:  # a hook called by hand, not by mitmproxy on its loop
            return
        if self._ticker is None or self._ticker.done():  # one, if running() came twice
            self._ticker = loop.create_task(self._tick())

    def _filter_logs(self) -> None:
        for handler in logging.getLogger().handlers:
            if isinstance(handler, LegacyLogEvents) and _NOT_RECORDS not in handler.filters:
                # First, so that the lines it keeps out are not scrubbed for nothing.
                handler.filters.insert(0, _NOT_RECORDS)
            if self._log_filter not in handler.filters:
                handler.addFilter(self._log_filter)

    def configure(self, updated: set[str]) -> None:
        try:
            self._configure(_options(), updated)
        except (ConfigError, exceptions.OptionsError) as exc:
            message = exc.message if isinstance(exc, ConfigError) else str(exc)
            if not updated.issuperset(ctx.options.keys()):
                # A change: mitmproxy refuses the value and says why, then rolls back,
                # calling configure again (which takes any responses still waiting).
                raise exceptions.OptionsError(message) from None
            # Every option at once: mitmproxy's script loader (at start, or reloading
            # the script), which logs whatever escapes with a traceback. The message
            # says it all; logged at ERROR it still stops mitmdump at start.
            log.error(message if message.startswith("fp-tap: ") else f"fp-tap: {message}")
            self._keep_working()
        if self._waiting and self._replacing is None:
            # A replacement given up on: what the options started takes the responses
            # that waited for it (counted as dropped if nothing could).
            self._hand_over_waiting()

    def _keep_working(self) -> None:
        """After options refused with no rollback to follow: if that left nothing to inspect
        responses with (a worker that refused its first options), work in this process
        with what it has."""
        if self.worker or self.pipeline or self._worker_wanted or self._replacing:
            return
        try:
            self._run_in_process(_options())
        except (ConfigError, exceptions.OptionsError):
            return  # the options themselves are bad: the error above says why
        log.warning("fp-tap: unsealing in mitmproxy's process")

    def _configure(self, opts: Any, updated: set[str]) -> None:
        if "fp_filter" in updated:
            self.filter = _parse_filter(opts.fp_filter)
        if "fp_log_trusted" in updated:
            self.log_trusted = opts.fp_log_trusted
        if "fp_max_body" in updated:
            self.max_body = positive(opts, "fp_max_body")
        if "fp_drain_timeout" in updated:
            self.drain_timeout = non_negative(opts, "fp_drain_timeout")
        for name in sorted(CHECKED_HERE & updated):
            non_negative(opts, name)
        if updated & {"fp_hold", "save_stream_file"}:
            # Flows saved with -w are written in the response hook of the addon after
            # this one: only a held response is saved with its annotations.
            self.hold = opts.fp_hold or bool(getattr(opts, "save_stream_file", None))
        # Read at the first configuration whatever it names (the environment's keys
        # count even without fp_keys_file), and again when the option changes.
        read_keys = "fp_keys_file" in updated or not self._keys_read
        if read_keys:
            keys, watch = _load_keys(opts.fp_keys_file)
            self._adopt_keys(keys)
            self._watches.set("keys", watch)
            self._keys_read = True
        if read_keys or updated & TAP_OPTIONS:
            self.tap = Tap(tap_config(opts, self.keys), self.stats)
            self.include_event = opts.fp_include_event
        if updated & DELIVERY_OPTIONS:
            self._scrub_webhook_secret(opts)
        queue_size = self.queue_size = positive(opts, "fp_queue_size")
        nothing = self.pipeline is None and self.worker is None and self._replacing is None
        # A switch, not the same value set again (mitmproxy's options.load sets every
        # option it reads): a new pipeline starts a new replay memory.
        switched = "fp_worker" in updated and bool(opts.fp_worker) != self._worker_on
        if switched or nothing:
            self._start_pipeline(opts, keys_just_read=read_keys)
        elif names := updated & PIPELINE_OPTIONS:
            # A dead worker's replacement is waited for, then takes the change: other
            # options (mitmproxy's own) leave it to be made off the event loop.
            self._settle()
            if self.worker is None and self.pipeline is None:
                # It failed, or was given up on: these options start one afresh (also
                # after mitmproxy rolled back values it was being made with).
                self._start_pipeline(opts, keys_just_read=read_keys)
            elif self.worker is not None:
                self.worker.max_in_flight = queue_size
                # Waits (blocking the event loop) for the worker to open the outputs, so
                # that a bad path is refused as an option error; the worker answers in
                # order, after the responses it still has, which is milliseconds unless
                # it is far behind.
                self.worker.configure(
                    self._worker_values(opts),
                    names,
                    wait=_has_outputs(opts) or "fp_keys_file" in names,
                    timeout=WORKER_TIMEOUT,
                )
            elif self.pipeline is not None:
                self.pipeline.configure(opts, names, in_use=self._in_use())

    def _adopt_keys(self, keys: list[DecryptionKey]) -> None:
        self.keys = keys
        for key in keys:
            self.scrubber.add_key(key.raw())

    async def _tick(self) -> None:
        """Every fp_stats_every seconds the stats line, every fp_secrets_reload seconds
        the file check, while the addon runs."""
        since_stats = since_check = 0.0
        while True:
            await asyncio.sleep(TICK)
            since_stats += TICK
            since_check += TICK
            opts = _options()
            try:
                if 0 < opts.fp_stats_every <= since_stats:
                    since_stats = 0.0
                    log.info(
                        "fp-tap stats: %s",
                        json.dumps(self.snapshot(), sort_keys=True),
                        extra=OWN_LINE,
                    )
                if 0 < opts.fp_secrets_reload <= since_check:
                    since_check = 0.0
                    await self.reload_files()
            except Exception as exc:  # the ticker must outlive a bug
                self.stats.incr_group("errors", "internal")
                log.warning("fp-tap: internal error in periodic work: %s", type(exc).__name__)

    async def reload_files(self) -> list[str]:
        """Take what changed in the key file and the webhook secret file, reading them off
        the event loop; what the pipeline took, when it runs in this process.

        This process keeps its own copy of both, for the log scrubber and the content
        view, and takes a change silently: the pipeline, which unseals and signs with
        them, here or in the worker process (which checks on its own), logs and counts.
        """
        # Copies are checked, and put in use here with their values: the watches in use
        # always go with the keys and secret in use (_in_use hands both to a pipeline).
        checked = self._watches.copy()
        changes = await asyncio.to_thread(checked.check)
        # All of them, those that found nothing new too (their memory of a bad content
        # may have moved on), unless an option change replaced one meanwhile.
        self._watches.adopt_all(checked)
        for change in changes:
            value = change.reload.value
            if not self._watches.current(change) or value is None:
                continue
            if change.name == "keys":
                self._adopt_keys(with_env_keys(value))
                self.tap = Tap(replace(self.tap.config, keys=self.keys), self.stats)
            else:
                self.secret = value
                self.scrubber.pin(value.text())
        pipeline = self.pipeline
        if pipeline is None:
            return []
        changes = await asyncio.to_thread(pipeline.check_files)
        return pipeline.take(changes) if pipeline is self.pipeline else []

    def _scrub_webhook_secret(self, opts: Any) -> None:
        # Read here to mask it in log lines (and watched while there is a webhook, to mask
        # the next one too); the pipeline checks and uses it. As the pipeline does, the
        # secret in use stays while its file does: a change of the file is for the
        # watches to take, here and in the pipeline alike.
        path = opts.fp_webhook_secret_file if opts.fp_webhook_url else None
        kept = (self.secret, self._watches.get("webhook_secret"))
        try:
            secret, watch = load_secret_watched(path, [kept])
        except FpError:  # the pipeline refuses the options and says why: nothing changes
            return
        if secret is not None:
            self.scrubber.pin(secret.text())
        self.secret = secret
        self._watches.set("webhook_secret", watch)

    def _in_use(self) -> InUse:
        """The keys and secret this process has, for a pipeline in it to take as they are."""
        keys, secret = self._watches.get("keys"), self._watches.get("webhook_secret")
        return InUse(
            keys=list(self.keys),
            key_watch=keys.copy() if keys else None,
            secret=self.secret,
            secret_watch=secret.copy() if secret else None,
        )

    def _start_pipeline(self, opts: Any, *, keys_just_read: bool) -> None:
        """Run the pipeline where ``fp_worker`` says, retiring the one running before
        (its queued records written out, undelivered events left in the spool).
        ``keys_just_read``: this process read the key file in this configuration."""
        self._worker_on = bool(opts.fp_worker)
        self._stop_pipeline(drain=0)
        self._worker_wanted = False
        if opts.fp_worker and getattr(sys, "frozen", False):
            log.info("fp-tap: a standalone mitmproxy cannot start a worker process")
        elif opts.fp_worker:
            # Outputs are opened (and their errors reported) now; without any, the
            # process starts once mitmproxy runs (no process for a mere option check).
            if self._running or _has_outputs(opts):
                self._spawn_worker(opts, keys_just_read)
            else:
                self._worker_wanted = True
            return
        self._run_in_process(opts)

    def _run_in_process(self, opts: Any) -> None:
        self.pipeline = _in_process_pipeline(self.stats, opts, self._in_use())

    def _spawn_worker(self, opts: Any, keys_just_read: bool) -> None:
        """Start the worker process; if it cannot start, work in this process."""
        self._worker_wanted = False
        worker = self._new_worker(positive(opts, "fp_queue_size"))
        try:
            worker.start()
        except ConfigError as exc:
            log.warning("fp-tap: %s; unsealing in mitmproxy's process", exc.message)
            self._run_in_process(opts)
            return
        try:
            # Always waited for: a worker that refuses its first options (a key file
            # caught half-written since this process read it) must not run without keys.
            # With the ids of the keys this process read when it has just read them (a
            # rotation since is refused, and reported by the work in this process that
            # follows); else with those the key file holds now, as a dead worker's
            # successor gets them: this process's check may be up to fp_secrets_reload
            # behind (or off), and a finished rotation is no reason to refuse fp_worker.
            if keys_just_read:
                values = self._worker_values(opts)
            else:
                values = self._successor_values(_values(opts), self._watches.copy(), self.keys)
            worker.configure(values, PIPELINE_OPTIONS, wait=True, timeout=WORKER_TIMEOUT)
        except ConfigError:
            worker.close(drain=0)
            raise
        self.worker = worker
        self._worker_since = time.monotonic()

    def _new_worker(self, max_in_flight: int) -> WorkerClient:
        worker = WorkerClient(
            on_records=self._on_records, on_exit=lambda code: None, max_in_flight=max_in_flight
        )
        # Its exit is news only while it is the one in use (not one being started).
        worker.on_exit = functools.partial(self._on_worker_exit, worker)
        return worker

    def _start_wanted(self) -> None:
        """The worker put off until mitmproxy runs, started off the event loop (mitmproxy
        listens already; the process takes 100-200 ms to answer) as a dead worker's
        successor is, responses waiting for it meanwhile. If it cannot start or refuses
        its options, there is no option to refuse: the work goes on in this process."""
        self._worker_wanted = False
        self._replace(_options(), restart=True, first=True)

    def _worker_values(self, opts: Any) -> dict[str, Any]:
        """The option values for the worker, and the ids (not the values) of the keys this
        process read: the worker refuses to run with others."""
        return _values(opts) | {"fp_key_ids": [k.key_id for k in self.keys]}

    def _stop_pipeline(self, drain: float) -> None:
        self._settle()
        worker, pipeline = self.worker, self.pipeline
        self.worker = self.pipeline = None
        if worker is not None:
            self._close_worker(worker, drain)
            self._carry(worker.stats)
            self._drop_unanswered(worker)
        if pipeline is not None:
            pipeline.close(drain)

    def _close_worker(self, worker: WorkerClient, drain: float) -> None:
        """Close the worker; one that dies meanwhile is an error, as at any other time."""
        worker.close(drain)
        if worker.died_closing:
            code = worker.proc.returncode if worker.proc is not None else None
            log.error(
                "fp-tap: the worker process stopped (exit code %s) while writing out what "
                "it held; records and deliveries it had not finished are lost",
                code,
            )
            self.stats.incr_group("errors", "worker_exit")

    def _carry(self, stats: dict[str, Any]) -> None:
        self._carried = merge_counts(self._carried, without_gauges(stats))

    # -- hooks -----------------------------------------------------------------------

    def requestheaders(self, flow: http.HTTPFlow) -> None:
        secret = flow.request.headers.get(PROXY_SECRET_HEADER)
        if secret:
            self.scrubber.add(secret)
            # Masked once it has gone upstream; done() masks those still in flight, which
            # mitmproxy saves (-w) at shutdown with neither a response nor an error.
            self._unmasked.add(flow)

    def responseheaders(self, flow: http.HTTPFlow) -> None:
        _mask_proxy_secret(flow)

    def error(self, flow: http.HTTPFlow) -> None:
        _mask_proxy_secret(flow)

    def response(self, flow: http.HTTPFlow) -> asyncio.Future[None] | None:
        """Inspects the response; returns something to await only when holding it."""
        try:
            _mask_proxy_secret(flow)
            return self._inspect(flow)
        except Exception as exc:  # an escaping exception would skip later addons' hooks
            self.stats.incr_group("errors", "internal")
            log.warning("fp-tap: internal error on flow %s: %s", flow.id, type(exc).__name__)
            return None

    def done(self) -> None:
        if _shutting_down():
            # Before mitmproxy's own done hooks (scripts come first), -w's among them.
            # Not on a script reload: those requests may still be on their way upstream.
            for flow in list(self._unmasked):
                _mask_proxy_secret(flow)
        if self._ticker is not None:
            self._ticker.cancel()
        self._settle()
        self._hand_over_waiting()  # any left by a replacement given up on: dropped
        worker, pipeline = self.worker, self.pipeline
        if worker is not None:
            self._close_worker(worker, self.drain_timeout)
            self._drop_unanswered(worker)
        if pipeline is not None:
            pipeline.close(self.drain_timeout)
        self._final = self.snapshot()  # what fp.stats says from now on
        self.worker = self.pipeline = None
        self._background.join()
        if self._exports is not None:
            self._exports.shutdown(wait=True)
            self._exports = None
        log.info("fp-tap summary: %s", json.dumps(self._final, sort_keys=True), extra=OWN_LINE)
        for handler in logging.getLogger().handlers:
            handler.removeFilter(self._log_filter)
            handler.removeFilter(_NOT_RECORDS)

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
            # The command has returned: the log is where anything goes wrong shows.
            try:
                # Encoded before the file is opened (and emptied): a record that cannot
                # be (a flow file's odd metadata) costs nothing already there.
                text = "".join(dumps(r) + "\n" for r in records)
            except (TypeError, ValueError) as exc:
                log.warning("fp.export: cannot write %s: a record is not JSON (%s)", path, exc)
                return
            try:
                with open_private(str(path), "w") as handle:
                    handle.write(text)
            except OSError as exc:
                log.warning("fp.export: cannot write %s: %s", path, exc.strerror or exc)
                return
            log.info("fp.export: wrote %d record(s) to %s", len(records), path)

        # One at a time, in the order asked: two exports to one path at once ended with
        # the earlier one's records, or both torn together.
        if self._exports is None:
            self._exports = concurrent.futures.ThreadPoolExecutor(1, "fp-tap-export")
        self._exports.submit(write)

    def _join_exports(self) -> None:
        """Wait for the exports asked so far."""
        if self._exports is not None:
            self._exports.submit(lambda: None).result()

    @command.command("fp.resend")
    def resend_command(self) -> None:
        """Send the parked webhook events again (in the background; see fp.stats)."""
        self._spool_command("resend")

    @command.command("fp.discard")
    def discard_command(self) -> None:
        """Delete the parked webhook events (in the background; see fp.stats)."""
        self._spool_command("discard")

    def _spool_command(self, name: str) -> None:
        if not _options().fp_webhook_url:
            raise exceptions.CommandError(f"fp.{name}: no webhook configured (fp_webhook_url)")
        if self._replacing is not None:
            raise exceptions.CommandError(
                f"fp.{name}: the worker process is starting or being replaced; "
                "try again in a moment"
            )
        if self.worker is not None:
            self.worker.spool_command(name)
        elif (pipeline := self.pipeline) is not None:
            # The pipeline's own background, as in the worker: its close waits for the
            # command before it closes the spool, and before the summary is taken.
            pipeline.background.run(lambda: pipeline.spool_command(name))

    # -- the work --------------------------------------------------------------------

    def snapshot(self) -> dict[str, Any]:
        if self.worker is not None:
            # This process counts what it sees before the worker does (responses,
            # skipped, responses it could not hand over); the worker the rest.
            # (This process keeps no gauges: the worker's come through as they are.)
            live = merge_counts(self.stats.snapshot(), self.worker.stats)
            live["queued"] = live.get("queued", 0) + self.worker.in_flight
        elif self.pipeline is not None:
            live = self.pipeline.snapshot()
        elif self._final is not None:
            return self._final
        else:
            live = self.stats.snapshot()
        return merge_counts(live, self._carried) if self._carried else live

    def _inspect(self, flow: http.HTTPFlow) -> asyncio.Future[None] | None:
        if flow.response is None or (self.filter is not None and not self.filter(flow)):
            return None
        self.stats.incr("responses")
        info = self._response_info(flow, count=True)
        if info is None:
            if METADATA_KEY in flow.metadata:  # most traffic: no call at all
                # Inspected before (a replay), answered now by something else.
                self._drop_annotation(flow, late=False)
            return None
        if self._worker_wanted:
            self._start_wanted()
        if self.worker is None:
            if self.pipeline is None and self._replacing is not None:
                return self._wait_for_replacement(flow, info)
            self._hand_over(flow, info, None, late=False)
            return None
        held = asyncio.get_running_loop().create_future() if self.hold else None
        return held if self._hand_over(flow, info, held, late=False) else None

    def _on_records(self, records: Records) -> None:
        """Answers from the worker process, on the event loop."""
        for context, record in records:
            if context is None:
                continue
            flow, held, log_trusted = context
            try:
                if record is not None:
                    self._show(flow, record, late=held is None, log_trusted=log_trusted)
                else:
                    self._drop_annotation(flow, late=held is None)
            except Exception as exc:  # one bad answer must not stop the rest, nor hold
                self.stats.incr_group("errors", "internal")
                log.warning("fp-tap: internal error on flow %s: %s", flow.id, type(exc).__name__)
            finally:
                if held is not None and not held.done():
                    held.set_result(None)  # a held response goes on whatever happened

    def _on_worker_exit(self, worker: WorkerClient, code: int | None) -> None:
        if worker is not self.worker:
            return
        lost = self._drop_unanswered(worker)
        opts = _options()
        after = opts.fp_worker_restart
        restart = after > 0 and time.monotonic() - self._worker_since >= after
        if restart:
            then = "starting a new one"
        else:
            ran = f"it ran less than {after} s: " if after > 0 else ""
            then = f"{ran}unsealing in mitmproxy's process from now on"
        log.error(
            "fp-tap: the worker process stopped (exit code %s) with %d response(s) not "
            "inspected; %s",
            code,
            lost,
            then,
        )
        self.stats.incr_group("errors", "worker_exit")
        self._carry(worker.stats)
        self.worker = None
        self._replace(opts, restart)

    def _replace(self, opts: Any, restart: bool, first: bool = False) -> None:
        """Start what takes over from a dead worker (a new one if ``restart``, else a
        pipeline in this process) off the event loop: both open the outputs, and a new
        worker takes a moment to start. Responses wait for it (``_waiting``). ``first``:
        no worker died, this is the one put off until mitmproxy runs."""
        values, queue_size, in_use = _values(opts), self.queue_size, self._in_use()
        probe, keys = self._watches.copy(), list(self.keys)
        # A first worker gets the ids of the keys this process read, as one started on
        # the loop would: a key file changed since is refused, and the in-process
        # pipeline that takes over reports the change. (A dead worker may have taken a
        # change already, which its successor must take too: _successor_values.)
        first_values = self._worker_values(opts) if first else None

        def make() -> WorkerClient | Pipeline:
            if restart:
                worker = self._new_worker(queue_size)
                try:
                    # In this thread, without the event loop: attached once adopted.
                    worker.start()
                    worker.configure(
                        first_values or self._successor_values(values, probe, keys),
                        PIPELINE_OPTIONS,
                        wait=True,
                        timeout=WORKER_TIMEOUT,
                    )
                    return worker
                except Exception as exc:  # whatever stops it, the work goes on here
                    why = exc.message if isinstance(exc, FpError) else type(exc).__name__
                    with contextlib.suppress(Exception):
                        worker.close(drain=0)
                    log.warning("fp-tap: %s; unsealing in mitmproxy's process", why)
            # With what this process has, and its watches as they stand: the pipeline
            # then reports (and takes) whatever changed in the files since, as it would.
            return _in_process_pipeline(self.stats, SimpleNamespace(**values), in_use)

        future: concurrent.futures.Future[WorkerClient | Pipeline] = concurrent.futures.Future()
        self._replacing = future
        self._first_start = future if first else None
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:  # a hook called by hand, not by mitmproxy on its loop
            _complete(future, make)
            self._replaced(future)
            return

        def adopt_on_loop(done: concurrent.futures.Future[WorkerClient | Pipeline]) -> None:
            try:
                loop.call_soon_threadsafe(self._replaced, done)
            except RuntimeError:  # the loop closed (mitmproxy ended): nobody takes it
                if done.exception() is None:
                    _close(done.result())

        future.add_done_callback(adopt_on_loop)
        threading.Thread(
            target=_complete, args=(future, make), name="fp-tap-replace", daemon=True
        ).start()

    def _replaced(self, future: concurrent.futures.Future[WorkerClient | Pipeline]) -> None:
        """Put what ``_replace`` made in use, on the event loop, and hand it the responses
        that waited for it."""
        if self._replacing is not future:  # put in use by _settle already, or given up on
            return
        first = future is self._first_start
        self._replacing = self._first_start = None
        made: WorkerClient | Pipeline | None = None
        try:
            made = future.result(timeout=0)
        except ConfigError as exc:
            log.error("fp-tap: cannot carry on in mitmproxy's process: %s", exc.message)
        except Exception as exc:
            self.stats.incr_group("errors", "internal")
            what = "start" if first else "replace"
            log.error("fp-tap: cannot %s the worker process: %s", what, type(exc).__name__)
        if isinstance(made, WorkerClient):
            made.attach()
            self.worker, self._worker_since = made, time.monotonic()
            if not first:
                self.stats.incr_group("restarted", "worker")
                log.info("fp-tap: a new worker process runs")
        elif made is not None:
            self.pipeline = made
        self._hand_over_waiting()

    def _successor_values(
        self, values: dict[str, Any], probe: Watches, keys: list[DecryptionKey]
    ) -> dict[str, Any]:
        """The options of a new worker (a dead one's successor, or one an option change
        starts), which reads the files itself, with the ids of the keys the key file
        holds now: a worker may have taken a rotation this process has not checked yet.
        ``probe`` is a throwaway copy of this process's watches (which take the change on
        their own, at their next check); what it finds is masked in log lines before the
        new worker uses it."""
        for change in probe.check():
            if (value := change.reload.value) is None:
                continue
            if change.name == "keys":
                keys = with_env_keys(value)
            else:
                self.scrubber.pin(value.text())
        for key in keys:
            self.scrubber.add_key(key.raw())
        return values | {"fp_key_ids": [k.key_id for k in keys]}

    def _settle(self) -> None:
        """Wait (blocking) for a replacement being made, and put it in use: before options
        replace the pipeline, and at shutdown."""
        future = self._replacing
        if future is None:
            return
        concurrent.futures.wait([future], timeout=REPLACEMENT_TIMEOUT)
        if future.done():
            self._replaced(future)
            return
        self._replacing = self._first_start = None  # it hangs: made later, retired unused
        future.add_done_callback(self._retire)
        log.error("fp-tap: gave up waiting for the worker process's replacement")
        # The responses that waited go to what the caller starts instead (configure), or
        # are counted as dropped (done).

    def _retire(self, future: concurrent.futures.Future[WorkerClient | Pipeline]) -> None:
        """Close a replacement given up on, once made (in the background: this runs on
        whichever thread completes it)."""
        if future.exception() is None:
            self._background.run(functools.partial(_close, future.result()))

    def _wait_for_replacement(
        self, flow: http.HTTPFlow, info: ResponseInfo
    ) -> asyncio.Future[None] | None:
        if len(self._waiting) >= self.queue_size:
            self._dropped(1)
            return None
        held = asyncio.get_running_loop().create_future() if self.hold else None
        self._waiting.append((flow, info, held))
        return held

    def _hand_over_waiting(self) -> None:
        """The responses that waited for the replacement: to whatever inspects them now
        (the hook of one that is not held has returned: its annotation comes late)."""
        waiting, self._waiting = self._waiting, []
        for flow, info, held in waiting:
            try:
                self._hand_over(flow, info, held, late=held is None)
            except Exception as exc:  # as the response hook does
                self.stats.incr_group("errors", "internal")
                log.warning("fp-tap: internal error on flow %s: %s", flow.id, type(exc).__name__)
                if held is not None and not held.done():
                    held.set_result(None)

    def _hand_over(
        self,
        flow: http.HTTPFlow,
        info: ResponseInfo,
        held: asyncio.Future[None] | None,
        *,
        late: bool,
    ) -> bool:
        """Have ``info`` inspected by whatever does that now; whether ``held`` waits for
        the worker's answer (else it is released here)."""
        worker, pipeline = self.worker, self.pipeline
        if worker is not None:
            # With the fp_log_trusted of when the response came, as in this process.
            if worker.submit(info, (flow, held, self.log_trusted)):
                return True
            self._dropped(1)
        elif pipeline is not None:
            record = pipeline.inspect(info)
            if record is not None:
                self._show(flow, record, late=late)
            else:
                self._drop_annotation(flow, late=late)
        elif self._final is not None:
            self._after_summary(flow)
        else:
            # Neither a worker nor a pipeline: the worker died and the fallback could not
            # start (logged then). Counted, until an option change starts one.
            self.stats.incr("dropped")
        if held is not None and not held.done():
            held.set_result(None)
        return False

    def _after_summary(self, flow: http.HTTPFlow) -> None:
        """An open response mitmproxy finished after fp-tap's done hook: at shutdown it
        completes flows still on their way (a body framed by the connection's end) when
        it cancels its connections, after the addons' done hooks. The outputs are closed
        and mitmproxy's log is gone: counted as dropped in the final counters, and said
        on stderr, once, and in all at exit."""
        assert self._final is not None
        self._final["dropped"] = self._final.get("dropped", 0) + 1
        self._late += 1
        if self._late == 1:
            sys.stderr.write(
                f"fp-tap: an open response mitmproxy finished after fp-tap's summary (flow "
                f"{flow.id}) was not inspected or written; counted as dropped\n"
            )
            atexit.register(self._say_late)

    def _say_late(self) -> None:
        if self._late > 1:
            sys.stderr.write(
                f"fp-tap: {self._late} open responses mitmproxy finished after fp-tap's "
                "summary were not inspected or written; counted as dropped\n"
            )

    def _drop_unanswered(self, worker: WorkerClient) -> int:
        """Count as dropped, and let go (held ones included), the responses ``worker``
        will never answer (it died, or did not answer its close); how many."""
        lost = worker.take_pending()
        if lost:
            self.stats.incr("dropped", len(lost))
        for _, held, _ in lost:
            if held is not None and not held.done():
                held.set_result(None)
        return len(lost)

    def _dropped(self, count: int) -> None:
        """Count responses the worker could not take (too far behind, or just died)."""
        self.stats.incr("dropped", count)
        if self._warnings.ready():
            log.warning(
                "fp-tap: the worker process takes no more responses (%d waiting for it); "
                "these are not inspected (%d so far)",
                self.worker.in_flight if self.worker else len(self._waiting),
                self.stats.get("dropped"),
            )

    def _show(
        self,
        flow: http.HTTPFlow,
        record: dict[str, Any],
        late: bool = False,
        log_trusted: bool | None = None,
    ) -> None:
        _annotate(flow, record)
        if log_trusted is None:
            log_trusted = self.log_trusted
        if log_trusted or record["verdict"] != "trusted":
            _log_record(record, self._lines)
        if late and self._has_view:
            ctx.master.addons.trigger(hooks.UpdateHook([flow]))

    def _drop_annotation(self, flow: http.HTTPFlow, late: bool) -> None:
        """Not an open response after all: any annotation of an earlier one goes, and the
        UI hears of it when the hook has returned already (as with _show)."""
        if METADATA_KEY in flow.metadata:
            _forget(flow)
            if late and self._has_view:
                ctx.master.addons.trigger(hooks.UpdateHook([flow]))

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
        inner = record["summary"]["request_id"] if record is not None and record["ok"] else None
        if (
            record is not None
            and isinstance(stored, dict)
            and _same_response(stored, record["request_id"], inner)
        ):
            if stored.get("ok") is True and record["ok"] is True:
                kept: tuple[str, ...] = ("checks", "verdict", "reasons")
            else:
                # Unsealed then and not now (a key gone: a flow file read by another tap),
                # or the other way round, or an error then: the record as it was (its
                # error with its reasons), without an event it did not have or that
                # cannot be opened now.
                kept = METADATA_FIELDS
                if not stored.get("ok"):
                    record.pop("event", None)
            # Copies: an export only reads the flow (redaction below must not reach it).
            record.update({k: copy.deepcopy(stored[k]) for k in kept if k in stored})
            if kept is METADATA_FIELDS and self.tap.config.redactor:
                # Redacted when captured, maybe under other settings: these as well.
                self.tap.config.redactor.apply(record)
        if record is not None and not self.include_event:
            record.pop("event", None)  # the tap keeps it for the webhook only
        return record


def _same_response(stored: dict[str, Any], request_id: str, inner_id: str | None) -> bool:
    """Whether the flow's annotation is about the response read now (outer id, and the
    sealed id when both were unsealed): an edited response (mitmweb, the console's
    editor) shows and exports as it reads now, not with the verdict of the one it
    replaced."""
    if stored.get("request_id") != request_id:
        return False
    then = stored.get("summary")
    if inner_id is not None and stored.get("ok") is True and isinstance(then, dict):
        return bool(then.get("request_id") == inner_id)
    return True


class _NotRecords(logging.Filter):
    """Keeps the per-record lines from mitmproxy's add_log event (see ``record_log``)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return record.name != record_log.name


_NOT_RECORDS = _NotRecords()


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
        own = getattr(record, "fp_own", False)
        # A traceback's last line repeats the exception's message (mitmproxy logs an
        # addon's exception that way): scrubbed with the message, which then carries it.
        if record.exc_info:
            message += "\n" + _TRACEBACKS.formatException(record.exc_info)
            record.exc_info = record.exc_text = None
        if record.stack_info:
            message += "\n" + record.stack_info
            record.stack_info = None
        # Formatted once: the handlers after this one (and their formatters) read the
        # message again, now without formatting it.
        record.msg, record.args = self.scrubber.scrub(message, seen=not own), None
        return True


_TRACEBACKS = logging.Formatter()


class FingerprintView(contentviews.Contentview):
    """Read-only view of an open response: the unsealed event and the tap's checks."""

    syntax_highlight = "yaml"  # JSON is YAML; the header lines are YAML comments

    def __init__(self, addon: FingerprintTap) -> None:
        self.addon = addon

    @property
    def name(self) -> str:
        return "fingerprint"

    def render_priority(self, data: bytes, metadata: contentviews.Metadata) -> float:
        if not isinstance(metadata.http_message, http.Response) or not self.addon._has_view:
            # Not chosen by itself where nobody opens it: mitmdump's flow dump (flow_detail
            # 3 and 4, often a log file) shows the outer JSON, never the unsealed event.
            return -1
        # Above the JSON view (1), so open responses open here by default.
        return 2 if parse_open_response(data) is not None else -1

    def prettify(self, data: bytes, metadata: contentviews.Metadata) -> str:
        opened = parse_open_response(data)
        if opened is None:
            raise ValueError("not a Fingerprint open response")
        lines = [
            f"# Fingerprint open response ({opened.api}), request id {printable(opened.request_id)}"
        ]
        stored = metadata.flow.metadata.get(METADATA_KEY) if metadata.flow else None
        try:
            event = unseal_event(
                opened.sealed, self.addon.keys, max_size=self.addon.tap.config.max_event
            )
        except UnsealError as exc:
            if isinstance(stored, dict):
                lines += _verdict_lines(stored, opened.request_id, None)
            lines.append(f"# cannot unseal: {exc}")
            try:
                outer = json.dumps(json.loads(data), indent=2)
            except ValueError:  # what the agent reads, Python's json does not (a BOM, ...)
                outer = data.decode("utf-8", "replace")
            return "\n".join(lines) + "\n" + outer
        if isinstance(stored, dict):
            lines += _verdict_lines(stored, opened.request_id, inner_request_id(event))
        lines.append(f"# unsealed with key {event.key_id} (#{event.key_index + 1})")
        # A lone surrogate in the event (a "\ud800" escape) has no UTF-8 form: the UIs'
        # highlighter could not take the text.
        pretty = encodable(json.dumps(event, indent=2, ensure_ascii=False))
        return "\n".join(lines) + "\n" + pretty


def _verdict_lines(stored: dict[str, Any], request_id: str, inner_id: str | None) -> list[str]:
    """The view's lines for the annotation on the flow: only if it is this response's
    (an edited response keeps the old one's until inspected again), and only what reads
    as an annotation (a flow file's metadata may hold anything)."""
    if not _same_response(stored, request_id, inner_id):
        return ["# verdict: (the annotation is for an earlier version of this response)"]
    reasons, checks = stored.get("reasons"), stored.get("checks")
    if not (
        isinstance(reasons, list)
        and all(isinstance(r, str) for r in reasons)
        and isinstance(checks, dict)
    ):
        return ["# verdict: (unreadable annotation)"]
    said = f" ({', '.join(reasons)})" if reasons else ""
    return [
        printable(f"# verdict: {stored.get('verdict')}{said}"),
        printable("# checks: " + " ".join(f"{k}={json.dumps(v)}" for k, v in checks.items())),
    ]


def _options() -> Any:
    return ctx.options


def _shutting_down() -> bool:
    """mitmproxy is stopping (it sets should_exit before the done hooks), not unloading
    or reloading this script while it goes on serving."""
    should_exit = getattr(ctx.master, "should_exit", None)
    return isinstance(should_exit, asyncio.Event) and should_exit.is_set()


def _values(opts: Any) -> dict[str, Any]:
    """What the worker process needs of the options: plain values, no secrets."""
    return {name: getattr(opts, name) for name in PIPELINE_OPTIONS}


def _in_process_pipeline(stats: Stats, opts: Any, in_use: InUse) -> Pipeline:
    pipeline = Pipeline(stats)
    # What this process has read already: a pipeline made after a worker died, or
    # when fp_worker was switched off, must not depend on the files being usable
    # right now (nor read them on the event loop).
    pipeline.configure(opts, PIPELINE_OPTIONS, in_use=in_use)
    return pipeline


def _complete[T](future: concurrent.futures.Future[T], make: Callable[[], T]) -> None:
    try:
        future.set_result(make())
    except BaseException as exc:  # handed over to whoever reads the future
        future.set_exception(exc)


def _close(made: WorkerClient | Pipeline) -> None:
    made.close(0)


def _has_outputs(opts: Any) -> bool:
    return any(getattr(opts, name) for name in OUTPUT_OPTIONS)


def _parse_filter(expression: str | None) -> flowfilter.TFilter | None:
    if not expression:
        return None
    try:
        return flowfilter.parse(expression)
    except ValueError as exc:  # it says "Invalid filter expression: ..." itself
        raise exceptions.OptionsError(f"fp_filter: {exc}") from None


def _load_keys(keys_file: str | None) -> tuple[list[DecryptionKey], FileWatch[Any] | None]:
    try:
        keys, watch = load_keys_watched(keys_file)
    except ConfigError as exc:
        raise exceptions.OptionsError(f"fp-tap: {exc.message}") from None
    if warning := too_open_warning(keys_file):
        log.warning("fp-tap: %s", warning)
    if keys:
        log.info("fp-tap: %s", describe_keys(keys))
    elif keys_file:
        log.warning(
            "fp-tap: key file %s holds no key (nor does %s): open responses will be "
            "recorded with error no_keys",
            keys_file,
            ENV_VAR,
        )
    else:
        log.warning(
            "fp-tap: no decryption keys (set %s or fp_keys_file): open responses will be "
            "recorded with error no_keys",
            ENV_VAR,
        )
    return keys, watch


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
    # A request edited in mitmweb or the console was backed up first, secret and all:
    # "revert" would bring the value back into the flow.
    backup = getattr(flow, "_backup", None)
    if backup:
        request = backup.get("request")
        if isinstance(request, dict) and request.get("headers"):
            request["headers"] = tuple(
                (name, _REDACTED_BYTES if name.lower() == _SECRET_NAME else value)
                for name, value in request["headers"]
            )


_SECRET_NAME = PROXY_SECRET_HEADER.lower().encode()
_REDACTED_BYTES = REDACTED.encode()


def _annotate(flow: http.HTTPFlow, record: dict[str, Any]) -> None:
    previous = flow.metadata.get(METADATA_KEY)
    if isinstance(previous, dict):
        # Inspected before: a client replay, or flows read back from a file (-r). The
        # new verdict replaces the old one's comment line and mark, not a user's.
        _unannotate(flow, previous)
    flow.metadata[METADATA_KEY] = metadata_of(record)
    comment = _comment(record)
    flow.comment = f"{flow.comment}\n{comment}" if flow.comment else comment
    # Whose mark it is, saved with the flow: a user's stays through any re-inspection.
    ours = not flow.marked and bool(_mark(record))
    if ours:
        flow.marked = _mark(record)
    flow.metadata[MARKED_KEY] = ours


def _forget(flow: http.HTTPFlow) -> None:
    """Drop fp-tap's annotation of an earlier response of this flow (a client replay
    answered with something that is not an open response)."""
    previous = flow.metadata.pop(METADATA_KEY, None)
    if isinstance(previous, dict):
        _unannotate(flow, previous)


def _unannotate(flow: http.HTTPFlow, previous: dict[str, Any]) -> None:
    try:
        comment, mark = _comment(previous), _mark(previous)
    except (KeyError, TypeError, AttributeError):  # metadata from an older or odd file
        return
    lines = flow.comment.split("\n")
    if comment in lines:  # the last such line: a user may have written after it
        del lines[len(lines) - 1 - lines[::-1].index(comment)]
        flow.comment = "\n".join(lines)
    # Flows annotated before fp-tap said whose the mark is: fp-tap's if it is the one
    # it gives.
    ours = flow.metadata.pop(MARKED_KEY, None)
    if mark and flow.marked == mark and ours is not False:
        flow.marked = ""


def _mark(record: dict[str, Any]) -> str:
    """The marker fp-tap gives a flow with this verdict ("": none)."""
    if record["verdict"] == "trusted":
        return ""
    return MARK_ERROR if record["verdict"] == "error" else MARK_SUSPICIOUS


def _comment(record: dict[str, Any]) -> str:
    if not record["ok"]:
        return f"fp error: {record['error']['kind']}"
    summary = record["summary"]
    reasons = f" ({', '.join(record['reasons'])})" if record["reasons"] else ""
    visitor = printable(summary["visitor_id"])
    return f"fp {record['verdict']}{reasons} · visitor {visitor} · bot {summary['bot']}"


def _log_record(record: dict[str, Any], lines: DirectLines) -> None:
    # One line per open response, on the event loop: the text is built in one go. In
    # mitmdump the line is written straight to the terminal (``lines``, see
    # fp_core.loglines): 10-12 us instead of 29-35, and 2-4 % more throughput
    # (BENCHMARKS.md, section 6 and "A fifth pass"). Elsewhere the record is made and
    # handed to the handlers directly (what Logger.info does, less its search of the
    # stack for the caller, which no mitmproxy handler shows); with the log filters'
    # order and _ScrubFilter formatting once, a quarter less time per answer (section 6).
    level = logging.INFO if record["ok"] else logging.WARNING
    if not record_log.isEnabledFor(level):
        return
    if level == logging.WARNING:
        error = record["error"]
        text = (
            f"fp {record['api']} {printable(record['request_id'])} error {error['kind']}: "
            f"{printable(error['message'])} [flow {record['flow_id']}]"
        )
    else:
        summary = record["summary"]
        reasons = f" ({','.join(record['reasons'])})" if record["reasons"] else ""
        checks = " ".join(f"{name}={_word(value)}" for name, value in record["checks"].items())
        text = (
            f"fp {record['api']} {printable(record['request_id'])} {record['verdict']}{reasons} "
            f"visitor={printable(summary['visitor_id'])} bot={summary['bot']} "
            f"key={record['key_id']} {checks} [flow {record['flow_id']}]"
        )
    if lines.write(level, text):
        return
    line = record_log.makeRecord(
        record_log.name, level, __file__, _LOG_RECORD_LINE, text, (), None, "_log_record", OWN_LINE
    )
    record_log.handle(line)


#: Where the record lines say they come from (the caller Logger.info would have found).
_LOG_RECORD_LINE = _log_record.__code__.co_firstlineno


def _terminal_stream(handler: logging.Handler) -> Any:
    """mitmproxy's terminal log (mitmdump's output) is the one DirectLines writes to."""
    return handler.file if type(handler) is TermLogHandler else None


def _ignores_records(handler: logging.Handler) -> bool:
    return isinstance(handler, LegacyLogEvents) and _NOT_RECORDS in handler.filters


def _word(value: object) -> str:
    if value is None:
        return "-"
    return "yes" if value is True else "no" if value is False else str(value)


addons = [FingerprintTap()]
