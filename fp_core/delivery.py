"""Webhook delivery: threads that send the spool to the receiver, at least once.

One dispatcher thread picks due events from the :class:`~fp_core.spool.Spool` and hands
them to at most ``concurrency`` worker threads, each making one POST at a time with
its own timeout. Outcomes go back to the dispatcher, which writes each round to the
spool in one transaction: delivered events are deleted, failed ones rescheduled with
exponential backoff and jitter, and those failing past the give-up age are parked. Parked
events stay until ``fp.resend``, ``fp.discard``, or, with ``keep_parked``, their age.
Nothing here runs on the proxy's event loop, and the writer thread only ever inserts
into the spool, so neither waits for the receiver.
"""

from __future__ import annotations

import logging
import queue
import random
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Protocol

from fp_core.spool import Outcomes, Spool, Spooled
from fp_core.stats import Stats
from fp_core.store import KEEP_FOREVER
from fp_core.throttle import Throttle
from fp_core.webhook import (
    MAX_WAIT,
    HeldEvents,
    HttpPoster,
    PostResult,
    WebhookSecret,
    describe_url,
    request_headers,
)

log = logging.getLogger(__name__)

#: The dispatcher looks at the spool at least this often even when nobody wakes it.
IDLE_WAIT = 1.0
#: With ``keep_parked``, the dispatcher deletes expired parked events this often at
#: most (or every keep/2 seconds if that is shorter), so many per transaction: a backlog
#: goes in steps between rounds of delivery.
EXPIRE_EVERY = 60.0
EXPIRE_BATCH = 1_000


@dataclass(frozen=True)
class DeliveryConfig:
    """Where and how to deliver; every duration in seconds."""

    url: str
    secret: WebhookSecret | None = None
    timeout: float = 10.0
    concurrency: int = 4
    retry_first: float = 1.0
    retry_max: float = 300.0
    give_up: float = 86_400.0
    ca_file: str | None = None
    #: Events the spool holds at most, pending and parked: beyond, new ones are refused.
    max_events: int = 1_000_000
    #: Delete parked events this long after they were parked; 0 keeps them.
    keep_parked: float = 0.0


def backoff(failures: int, first: float, cap: float, rng: random.Random) -> float:
    """Seconds to wait after the ``failures``-th failed attempt in a row.

    Doubles from ``first`` up to ``cap``, with "equal jitter": a random point in the
    upper half of that, so that events failing together do not retry together, yet
    never come back much sooner than planned.
    """
    ceiling = min(cap, first * 2.0 ** min(max(failures - 1, 0), 62))
    return ceiling / 2 + rng.uniform(0, ceiling / 2)


class Sender(Protocol):
    """Makes one POST; called from a worker thread, one call at a time per thread."""

    def post(self, body: bytes, headers: Mapping[str, str]) -> PostResult: ...


def http_sender(config: DeliveryConfig) -> Sender:
    """The real sender for a configuration (tests pass their own factory)."""
    return HttpPoster(config.url, timeout=config.timeout, ca_file=config.ca_file)


@dataclass(frozen=True, slots=True)
class _Job:
    event: Spooled
    sender: Sender
    secret: WebhookSecret | None


class Delivery:
    """The dispatcher and its workers for one spool; owns (and finally closes) the spool."""

    def __init__(
        self,
        spool: Spool,
        config: DeliveryConfig,
        stats: Stats,
        *,
        sender_factory: Callable[[DeliveryConfig], Sender] = http_sender,
        rng: random.Random | None = None,
    ) -> None:
        self.spool = spool
        self.stats = stats
        self._sender_factory = sender_factory
        self._rng = rng or random.Random()
        self.config = config
        self._sender = sender_factory(config)
        self._jobs: queue.SimpleQueue[_Job | None] = queue.SimpleQueue()
        self._results: queue.SimpleQueue[tuple[Spooled, PostResult]] = queue.SimpleQueue()
        self._unsettled: list[tuple[Spooled, PostResult]] = []
        self._in_flight: set[int] = set()
        self._workers: list[threading.Thread] = []
        self._wake = threading.Event()
        self._stopping = threading.Event()
        self._deadline = float("inf")
        self._next_expiry = 0.0  # monotonic
        #: Events the record writers could not spool yet (shared by their sinks).
        self.held = HeldEvents()
        self._warnings = Throttle()
        self._thread = threading.Thread(target=self._run, name="fp-tap-delivery", daemon=True)

    def start(self) -> None:
        if self.spool.pending or self.spool.parked:
            log.info(
                "fp-tap: webhook spool %s: %d event(s) from an earlier run to send, %d parked",
                self.spool.path,
                self.spool.pending,
                self.spool.parked,
            )
        self._add_workers()
        self._thread.start()

    def max_events(self) -> int:
        """The most events the spool may hold, as configured now."""
        return self.config.max_events

    def configure(self, config: DeliveryConfig) -> None:
        """Use new settings from the next attempt on (same spool)."""
        if (config.url, config.timeout, config.ca_file) != (
            self.config.url,
            self.config.timeout,
            self.config.ca_file,
        ):
            self._sender = self._sender_factory(config)
        if config.keep_parked != self.config.keep_parked:
            self._next_expiry = 0.0  # at the new pace from now, not the old one's turn
        self.config = config
        self._add_workers()
        self.wake()

    def wake(self) -> None:
        """Look at the spool now (new events, a resend)."""
        self._wake.set()

    def resend(self) -> int:
        """Queue every parked event again; how many."""
        count = self.spool.resend()
        self.stats.incr_group("webhook", "resent", count)
        self.wake()
        return count

    def discard(self) -> int:
        """Delete every parked event; how many."""
        count = self.spool.discard()
        self.stats.incr_group("webhook", "discarded", count)
        return count

    def snapshot(self) -> dict[str, int]:
        """The spool's gauges, from memory (no disk access: callable from any thread)."""
        return {
            "webhook_pending": self.spool.pending,
            "webhook_parked": self.spool.parked,
            "webhook_in_flight": len(self._in_flight),
        }

    def close(self, drain: float) -> bool:
        """Keep delivering for up to ``drain`` seconds, then stop and close the spool.

        Events still pending (or in flight: a receiver's late answer is not waited for)
        stay in the spool for the next start. True when nothing was left.
        """
        # A drain meant as "as long as it takes" must still fit the platform's waits.
        drain = min(max(drain, 0.0), MAX_WAIT)
        self._deadline = time.monotonic() + drain
        self._stopping.set()
        self.wake()
        if self._thread.ident is not None:
            self._thread.join(drain + IDLE_WAIT + 5)
        for _ in self._workers:
            self._jobs.put(None)
        # The writers are closed by now, each after one last try (WebhookSink.close): what
        # they could not spool is lost with the spool.
        self.held.give_up(self.stats, "the spool could not take them before it closed")
        if self._thread.is_alive():
            log.warning("fp-tap: webhook delivery did not stop; the spool stays open")
            return False
        # Attempts still out are abandoned (their answers are not waited for): their
        # events are among the pending, for the next start, not in flight any more.
        self._in_flight.clear()
        left = self.spool.pending
        self.spool.close()
        if left:
            log.info(
                "fp-tap: %d webhook event(s) left in the spool %s for the next start",
                left,
                self.spool.path,
            )
        return left == 0

    # -- the dispatcher ----------------------------------------------------------------

    def _run(self) -> None:
        while True:
            self._wake.clear()
            try:
                self._settle()
                if self._stopping.is_set() and self._drained():
                    break
                self._expire()
                wait = self._dispatch()
            except Exception as exc:  # the spool failing must not end delivery for good
                self.stats.incr_group("webhook", "spool_errors")
                self._warn("spool", "fp-tap: webhook spool error: %s", exc)
                if self._stopping.is_set() and time.monotonic() >= self._deadline:
                    break
                wait = IDLE_WAIT
            if self._stopping.is_set():  # the drain ends at its deadline, not after a nap
                wait = min(wait, max(self._deadline - time.monotonic(), 0.01))
            self._wake.wait(wait)
        try:
            self._settle()
        except Exception as exc:
            self._warn("spool", "fp-tap: webhook spool error: %s", exc)

    def _dispatch(self) -> float:
        """Hand due events to free workers; how long to wait before looking again."""
        now = time.time()
        if self._stopping.is_set() and time.monotonic() >= self._deadline:
            return 0.05
        free = self.config.concurrency - len(self._in_flight)
        for event in self.spool.due(now, free, self._in_flight):
            self._in_flight.add(event.id)
            if event.attempts:
                self.stats.incr_group("webhook", "retried")
            self._jobs.put(_Job(event, self._sender, self.config.secret))
        if len(self._in_flight) >= self.config.concurrency:
            return IDLE_WAIT  # a finishing worker wakes us
        next_due = self.spool.next_due_after(now)
        if next_due is not None and next_due > now + self.config.retry_max:
            # Nothing is scheduled further ahead than retry_max (backoff and Retry-After
            # are capped there): the wall clock went back. Those events are due now.
            self.spool.pull_in(now)
            return 0.01
        wait = IDLE_WAIT if next_due is None else min(IDLE_WAIT, next_due - now)
        return max(wait, 0.01)

    def _expire(self) -> None:
        """Delete the parked events older than ``keep_parked``, when that is due."""
        keep = self.config.keep_parked
        if keep <= 0 or keep >= KEEP_FOREVER or time.monotonic() < self._next_expiry:
            return
        # Set first: a spool error (counted by the caller) waits for the next turn too.
        self._next_expiry = time.monotonic() + min(EXPIRE_EVERY, keep / 2)
        count = self.spool.expire(time.time() - keep, EXPIRE_BATCH)
        if count == EXPIRE_BATCH:
            self._next_expiry = 0.0  # a backlog: the next step at the next turn
        if count:
            self.stats.incr_group("webhook", "expired", count)
            if self._warnings.ready("expired"):
                log.info(
                    "fp-tap: webhook: deleted %d event(s) parked more than %d s ago "
                    "(fp_webhook_keep_parked); %d parked left",
                    count,
                    keep,
                    self.spool.parked,
                )

    def _drained(self) -> bool:
        if time.monotonic() >= self._deadline:
            return True
        if self._in_flight:
            return False
        now = time.time()
        if self.spool.due(now, 1):
            return False
        next_due = self.spool.next_due_after(now)
        # Nothing more can succeed before the deadline: stop now rather than sit it out.
        return next_due is None or next_due - now > self._deadline - time.monotonic()

    def _settle(self) -> None:
        while True:
            try:
                self._unsettled.append(self._results.get_nowait())
            except queue.Empty:
                break
        if not self._unsettled:
            return
        now = time.time()
        outcomes = Outcomes()
        for event, result in self._unsettled:
            if result.ok:
                outcomes.delivered.append(event.id)
                continue
            failures = event.attempts + 1
            error = result.error or "unknown"
            if now - event.window_start >= self.config.give_up:
                outcomes.park.append((event.id, error))
                continue
            delay = backoff(failures, self.config.retry_first, self.config.retry_max, self._rng)
            if result.retry_after is not None:
                delay = max(delay, min(result.retry_after, self.config.retry_max))
            outcomes.retry.append((event.id, now + delay, error))
        self.spool.settle(outcomes)
        self._count(outcomes)
        for event, _ in self._unsettled:
            self._in_flight.discard(event.id)
        self._unsettled = []

    def _count(self, outcomes: Outcomes) -> None:
        for name, n in (
            ("sent", len(outcomes.delivered)),
            ("failed", len(outcomes.retry) + len(outcomes.park)),
            ("parked", len(outcomes.park)),
        ):
            if n:
                self.stats.incr_group("webhook", name, n)
        for event, result in self._unsettled:
            if not result.ok:
                self.stats.incr_group("webhook_failures", result.error or "unknown")
                self._warn(
                    "failed",
                    "fp-tap: webhook %s: %s%s for %s (attempt %d); %d event(s) pending",
                    describe_url(self.config.url),
                    result.error,
                    f" ({result.detail})" if result.detail else "",
                    event.request_id,
                    event.attempts + 1,
                    self.spool.pending,
                )
        if outcomes.park:
            self._warn(
                "parked",
                "fp-tap: webhook: gave up on %d event(s) after %d s (parked: %d in all; "
                "fp.resend sends them again, fp.discard deletes them)",
                len(outcomes.park),
                self.config.give_up,
                self.spool.parked,
            )

    def _warn(self, topic: str, message: str, *args: object) -> None:
        if self._warnings.ready(topic):
            log.warning(message, *args)

    # -- the workers -------------------------------------------------------------------

    def _add_workers(self) -> None:
        while len(self._workers) < self.config.concurrency:
            worker = threading.Thread(
                target=self._work, name=f"fp-tap-webhook-{len(self._workers)}", daemon=True
            )
            self._workers.append(worker)
            worker.start()

    def _work(self) -> None:
        last: Sender | None = None
        while True:
            job = self._jobs.get()
            if job is None or job.sender is not last:
                _close_local(last)  # stopping, or new settings: drop the old connection
                if job is None:
                    return
                last = job.sender
            event = job.event
            try:
                headers = request_headers(event.headers, event.request_id, event.body, job.secret)
                result = job.sender.post(event.body, headers)
            except Exception:  # a bug in sending must not kill the worker
                result = PostResult(None, "internal")
            self._results.put((event, result))
            self._wake.set()


def _close_local(sender: Sender | None) -> None:
    close = getattr(sender, "close_local", None)
    if close is not None:
        close()
