"""fp_core.delivery: dispatcher and workers over a real spool, with a scripted sender."""

from __future__ import annotations

import logging
import random
import threading
import time
from collections.abc import Callable, Collection, Iterator, Mapping
from dataclasses import replace
from pathlib import Path

import pytest
from fingerprint_server_sdk import WebhookValidation

from fp_core import delivery as delivery_module
from fp_core.delivery import Delivery, DeliveryConfig, backoff
from fp_core.spool import Spool, Spooled
from fp_core.stats import Stats
from fp_core.webhook import (
    IDEMPOTENCY_HEADER,
    SIGNATURE_HEADER,
    Outgoing,
    PostResult,
    WebhookSecret,
)

#: Bounds every wait; reached only when the code under test is broken.
PATIENCE = 15.0
OK = PostResult(200, None)
DOWN = PostResult(None, "connection")


def wait_until(condition: Callable[[], object], what: str) -> None:
    deadline = time.monotonic() + PATIENCE
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.01)


class Sender:
    """Answers from a script (a function of the call number), and keeps what it got."""

    def __init__(self, answer: Callable[[int], PostResult] = lambda n: OK) -> None:
        self.answer = answer
        self.lock = threading.Lock()
        self.calls: list[tuple[bytes, dict[str, str]]] = []
        self.active = 0
        self.max_active = 0
        self.gate = threading.Event()
        self.gate.set()

    def post(self, body: bytes, headers: Mapping[str, str]) -> PostResult:
        with self.lock:
            self.calls.append((body, dict(headers)))
            number = len(self.calls)
            self.active += 1
            self.max_active = max(self.max_active, self.active)
        try:
            self.gate.wait(PATIENCE)
            return self.answer(number)
        finally:
            with self.lock:
                self.active -= 1

    def ids(self) -> list[str]:
        with self.lock:
            return [h[IDEMPOTENCY_HEADER] for _, h in self.calls]


def config(**changes: object) -> DeliveryConfig:
    base = DeliveryConfig(
        url="http://127.0.0.1:9/hook", timeout=5, concurrency=2, retry_first=0.02, retry_max=0.1
    )
    return replace(base, **changes)  # type: ignore[arg-type]


def items(n: int, start: int = 0) -> list[Outgoing]:
    return [
        Outgoing(f"req-{i}", f'{{"event_id":"req-{i}"}}'.encode(), {"FP-Tap-Verdict": "trusted"})
        for i in range(start, start + n)
    ]


class Rig:
    def __init__(self, tmp_path: Path) -> None:
        self.state = str(tmp_path / "state")
        self.stats = Stats()
        self.deliveries: list[Delivery] = []

    def start(self, sender: Sender, cfg: DeliveryConfig | None = None) -> Delivery:
        delivery = Delivery(
            Spool(self.state),
            cfg or config(),
            self.stats,
            sender_factory=lambda _: sender,
            rng=random.Random(1),
        )
        delivery.start()
        self.deliveries.append(delivery)
        return delivery

    def close_all(self) -> None:
        for delivery in self.deliveries:
            delivery.close(drain=0)


@pytest.fixture
def rig(tmp_path: Path) -> Iterator[Rig]:
    rig = Rig(tmp_path)
    yield rig
    rig.close_all()


def webhook(stats: Stats) -> dict[str, int]:
    return stats.group("webhook")


# -- backoff ---------------------------------------------------------------------------


def test_backoff_doubles_with_jitter_up_to_the_cap() -> None:
    rng = random.Random(7)
    for failures, ceiling in [(1, 1), (2, 2), (3, 4), (4, 8), (9, 256), (10, 300), (500, 300)]:
        delays = [backoff(failures, 1.0, 300.0, rng) for _ in range(200)]
        assert all(ceiling / 2 <= d <= ceiling for d in delays), failures
        assert len(set(delays)) > 100, "jittered, not one fixed delay"


# -- delivery --------------------------------------------------------------------------


def test_every_event_is_delivered_signed_and_removed(rig: Rig) -> None:
    secret = "test-secret-" + str(random.random())
    sender = Sender()
    delivery = rig.start(sender, config(secret=WebhookSecret(secret)))
    delivery.spool.add(items(5))
    delivery.wake()
    wait_until(lambda: delivery.spool.pending == 0, "deliveries")
    assert sorted(sender.ids()) == [f"req-{i}" for i in range(5)]
    for body, headers in sender.calls:
        assert WebhookValidation.is_valid_webhook_signature(headers[SIGNATURE_HEADER], body, secret)
        assert headers["FP-Tap-Verdict"] == "trusted"
    assert webhook(rig.stats) == {"sent": 5}
    assert delivery.snapshot() == {
        "webhook_pending": 0,
        "webhook_parked": 0,
        "webhook_in_flight": 0,
    }


def test_failures_are_retried_until_delivered(rig: Rig) -> None:
    # The first three attempts fail (down, then 500, then a timeout), then all succeed.
    answers = [DOWN, PostResult(500, "http_500"), PostResult(None, "timeout")]
    sender = Sender(lambda n: answers[n - 1] if n <= len(answers) else OK)
    delivery = rig.start(sender, config(concurrency=1))
    delivery.spool.add(items(2))
    delivery.wake()
    wait_until(lambda: delivery.spool.pending == 0, "deliveries")
    # Five attempts in all; while one event waits out its backoff the other goes ahead.
    assert sorted(set(sender.ids())) == ["req-0", "req-1"]
    assert len(sender.ids()) == 5
    assert webhook(rig.stats) == {"sent": 2, "failed": 3, "retried": 3}
    assert rig.stats.group("webhook_failures") == {"connection": 1, "http_500": 1, "timeout": 1}


def test_a_failure_is_logged_with_what_it_said(rig: Rig, caplog: pytest.LogCaptureFixture) -> None:
    refused = PostResult(None, "connection", detail="Connection refused")
    sender = Sender(lambda n: refused if n == 1 else OK)
    with caplog.at_level(logging.WARNING, logger="fp_core.delivery"):
        delivery = rig.start(sender, config(concurrency=1))
        delivery.spool.add(items(1))
        delivery.wake()
        wait_until(lambda: webhook(rig.stats).get("sent") == 1, "the retry")
    assert [r.getMessage() for r in caplog.records] == [
        "fp-tap: webhook http://127.0.0.1:9/hook: connection (Connection refused) for req-0 "
        "(attempt 1); 1 event(s) pending"
    ]


def test_a_clock_that_goes_back_does_not_hold_events_back(rig: Rig) -> None:
    """Retry times are wall-clock: after the clock went back an hour, an event due
    "in an hour" is really due within retry_max, and goes then."""
    sender = Sender(lambda n: DOWN if n == 1 else OK)
    delivery = rig.start(sender, config(concurrency=1, retry_first=5, retry_max=5))
    delivery.spool.add(items(1))
    delivery.wake()
    wait_until(lambda: webhook(rig.stats).get("failed") == 1, "the first failure")
    with delivery.spool._lock:  # what a clock set back an hour looks like from here
        delivery.spool._conn.execute("UPDATE events SET next_attempt = next_attempt + 3600")
    delivery.wake()
    # wait_until gives up after a minute: the event must not wait out the hour.
    wait_until(lambda: webhook(rig.stats).get("sent") == 1, "the delivery")


def test_retry_after_is_honoured(rig: Rig) -> None:
    sender = Sender(lambda n: PostResult(503, "http_503", retry_after=60))
    delivery = rig.start(sender, config(retry_max=3600))
    delivery.spool.add(items(1))
    before = time.time()
    delivery.wake()
    wait_until(lambda: webhook(rig.stats).get("failed") == 1, "one failure")
    next_due = delivery.spool.next_due_after(before)
    assert next_due is not None
    assert next_due >= before + 60


def parked(rig: Rig, count: int) -> tuple[Sender, Delivery]:
    """A delivery to a receiver that is down, once ``count`` events were parked."""
    sender = Sender(lambda n: DOWN)
    delivery = rig.start(sender, config(give_up=0.1))
    delivery.spool.add(items(count))
    delivery.wake()
    wait_until(lambda: delivery.spool.parked == count, "parking")
    return sender, delivery


def test_events_failing_past_the_give_up_age_are_parked_then_resent(rig: Rig) -> None:
    sender, delivery = parked(rig, 3)
    attempts = len(sender.calls)
    assert attempts >= 3
    assert webhook(rig.stats)["parked"] == 3
    assert delivery.snapshot()["webhook_parked"] == 3
    # Parked events are left alone...
    time.sleep(0.3)
    assert len(sender.calls) == attempts
    # ... until resent, here to a receiver that is back.
    sender.answer = lambda n: OK
    assert delivery.resend() == 3
    wait_until(lambda: delivery.spool.pending == 0, "redelivery")
    assert delivery.spool.parked == 0
    assert webhook(rig.stats)["resent"] == 3
    assert webhook(rig.stats)["sent"] == 3


def test_discard_deletes_the_parked_events_and_counts_them(rig: Rig) -> None:
    sender, delivery = parked(rig, 3)
    sender.answer = lambda n: OK
    delivery.spool.add(items(1, start=3))
    delivery.wake()
    wait_until(lambda: webhook(rig.stats).get("sent") == 1, "the new event")
    assert delivery.discard() == 3
    assert webhook(rig.stats)["discarded"] == 3
    assert delivery.snapshot()["webhook_parked"] == 0
    assert delivery.resend() == 0, "nothing left to send again"
    calls = len(sender.calls)
    time.sleep(0.3)
    assert len(sender.calls) == calls
    assert delivery.spool.pending == 0


def test_parked_events_expire_after_keep_parked_a_backlog_in_batches(
    rig: Rig, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="fp_core.delivery")
    monkeypatch.setattr(delivery_module, "EXPIRE_BATCH", 2)  # a backlog of 5 takes 3 steps
    _, delivery = parked(rig, 5)
    parked_at = time.time()
    delivery.configure(config(give_up=0.1, keep_parked=0.5))
    wait_until(lambda: delivery.spool.parked == 0, "expiry")
    assert time.time() - parked_at >= 0.5, "not before they were parked keep_parked ago"
    assert webhook(rig.stats)["expired"] == 5
    assert delivery.spool.pending == 0
    lines = [r for r in caplog.records if "fp_webhook_keep_parked" in r.getMessage()]
    assert len(lines) == 1, "one line per 10 s, whatever the steps"
    assert lines[0].levelno == logging.INFO


def test_without_keep_parked_parked_events_stay(rig: Rig) -> None:
    _, delivery = parked(rig, 2)
    for keep in (0, 10**12):  # 0, and a keep too long for the clock: both keep all
        delivery.configure(config(give_up=0.1, keep_parked=keep))
        time.sleep(1.5)  # more than a turn of the dispatcher (IDLE_WAIT)
        assert delivery.spool.parked == 2
    assert "expired" not in webhook(rig.stats)


def test_attempts_abandoned_at_close_are_pending_not_in_flight(rig: Rig) -> None:
    sender = Sender()
    sender.gate.clear()  # the receiver never answers
    delivery = rig.start(sender, config(concurrency=2))
    delivery.spool.add(items(3))
    delivery.wake()
    wait_until(lambda: sender.active == 2, "two requests in flight")
    assert delivery.close(drain=0.2) is False, "events left"
    snapshot = delivery.snapshot()
    assert (snapshot["webhook_in_flight"], snapshot["webhook_pending"]) == (0, 3)
    sender.gate.set()


def test_concurrency_is_bounded(rig: Rig) -> None:
    sender = Sender()
    sender.gate.clear()  # every request hangs, as with a stuck receiver
    delivery = rig.start(sender, config(concurrency=3))
    delivery.spool.add(items(10))
    delivery.wake()
    wait_until(lambda: sender.active == 3, "three requests in flight")
    time.sleep(0.2)  # time for a fourth to start if the bound did not hold
    assert sender.max_active == 3
    assert delivery.snapshot()["webhook_in_flight"] == 3
    sender.gate.set()
    wait_until(lambda: delivery.spool.pending == 0, "deliveries")
    assert sender.max_active == 3
    assert sorted(set(sender.ids())) == sorted(f"req-{i}" for i in range(10))


def test_a_sender_that_raises_is_a_failed_attempt(rig: Rig) -> None:
    def answer(n: int) -> PostResult:
        if n == 1:
            raise RuntimeError("bug")
        return OK

    sender = Sender(answer)
    delivery = rig.start(sender)
    delivery.spool.add(items(1))
    delivery.wake()
    wait_until(lambda: delivery.spool.pending == 0, "delivery")
    assert rig.stats.group("webhook_failures") == {"internal": 1}


def test_close_drains_what_it_can_in_time(rig: Rig) -> None:
    sender = Sender()
    delivery = rig.start(sender)
    delivery.spool.add(items(20))
    assert delivery.close(drain=PATIENCE) is True
    assert len(set(sender.ids())) == 20


def test_close_leaves_undelivered_events_for_the_next_start(rig: Rig) -> None:
    stuck = Sender()
    stuck.gate.clear()
    delivery = rig.start(stuck, config(concurrency=2))
    delivery.spool.add(items(5))
    delivery.wake()
    wait_until(lambda: stuck.active == 2, "two stuck requests")
    assert delivery.close(drain=0.2) is False
    stuck.gate.set()  # the late answers are not waited for, and must not count
    wait_until(lambda: stuck.active == 0, "the late answers")
    # The next start sends all five, including the two that were in flight. Its
    # receiver holds every request until the count is read: otherwise a fast restart
    # could deliver all five before the assertion looks.
    sender = Sender()
    sender.gate.clear()
    again = rig.start(sender)
    assert again.spool.pending == 5
    sender.gate.set()
    wait_until(lambda: again.spool.pending == 0, "deliveries after restart")
    assert sorted(sender.ids()) == [f"req-{i}" for i in range(5)]


def test_close_does_not_wait_for_retries_due_after_the_deadline(rig: Rig) -> None:
    sender = Sender(lambda n: DOWN)
    delivery = rig.start(sender, config(retry_first=3600, retry_max=3600))
    delivery.spool.add(items(2))
    delivery.wake()
    wait_until(lambda: webhook(rig.stats).get("failed") == 2, "first attempts")
    # The retries come after at least 1800 s, outside a 600 s drain: nothing to wait for.
    results: list[bool] = []
    closing = threading.Thread(
        target=lambda: results.append(delivery.close(drain=600)), daemon=True
    )
    closing.start()
    closing.join(PATIENCE)
    assert not closing.is_alive(), "close sat out drain time that nothing could use"
    assert results == [False]
    assert len(sender.calls) == 2


def test_new_settings_apply_to_the_next_attempts(rig: Rig) -> None:
    first, second = Sender(lambda n: DOWN), Sender()
    senders = {"http://a/": first, "http://b/": second}
    delivery = Delivery(
        Spool(rig.state),
        config(url="http://a/", retry_first=0.05),
        rig.stats,
        sender_factory=lambda cfg: senders[cfg.url],
    )
    rig.deliveries.append(delivery)
    delivery.start()
    delivery.spool.add(items(1))
    delivery.wake()
    wait_until(lambda: first.calls, "an attempt to the first URL")
    delivery.configure(config(url="http://b/", retry_first=0.05))
    wait_until(lambda: delivery.spool.pending == 0, "delivery to the second URL")
    assert second.ids() == ["req-0"]


def test_a_failing_spool_is_counted_and_delivery_carries_on(
    rig: Rig, monkeypatch: pytest.MonkeyPatch
) -> None:
    sender = Sender()
    delivery = rig.start(sender)
    real_due = delivery.spool.due
    failures = [2]

    def flaky_due(now: float, limit: int, exclude: Collection[int] = ()) -> list[Spooled]:
        if failures[0]:
            failures[0] -= 1
            raise OSError("disk I/O error")
        return real_due(now, limit, exclude)

    monkeypatch.setattr(delivery.spool, "due", flaky_due)
    delivery.spool.add(items(1))
    delivery.wake()
    wait_until(lambda: delivery.spool.pending == 0, "delivery despite the errors")
    assert webhook(rig.stats)["spool_errors"] == 2


# -- found by a delivery hunt --------------------------------------------------------


def test_keep_parked_lowered_at_run_time_applies_at_its_own_pace(rig: Rig) -> None:
    """The next expiry check stayed where the old keep put it (up to 60 s ahead)."""
    delivery = rig.start(Sender(lambda n: DOWN), config(give_up=0.1, keep_parked=3600))
    time.sleep(0.2)  # the first check ran (nothing to expire) and set the next one 60 s on
    delivery.configure(config(give_up=0.1, keep_parked=0.3))
    delivery.spool.add(items(1))
    delivery.wake()
    wait_until(lambda: webhook(rig.stats).get("expired") == 1, "expiry at the new pace")


def test_a_drain_meant_as_for_ever_still_closes(rig: Rig) -> None:
    """A drain of 10**10 s overflowed Thread.join (OverflowError out of close, and of the
    addon's done())."""
    delivery = rig.start(Sender())
    delivery.spool.add(items(1))
    delivery.wake()
    wait_until(lambda: webhook(rig.stats).get("sent") == 1, "delivery")
    assert delivery.close(drain=10**10) is True


def test_the_dispatcher_never_sleeps_past_the_drains_end(
    rig: Rig, monkeypatch: pytest.MonkeyPatch
) -> None:
    """It slept up to a second past the deadline (IDLE_WAIT) when an attempt started in
    the drain; every wait after close() is now within what is left of the drain."""
    sender = Sender(lambda n: PostResult(500, "http_500"))
    delivery = rig.start(sender, config(concurrency=1))
    waits: list[tuple[float, float]] = []
    real_wait = delivery._wake.wait

    def wait(timeout: float | None = None) -> bool:
        if delivery._stopping.is_set():
            waits.append((timeout or 0.0, delivery._deadline - time.monotonic()))
        return real_wait(timeout)

    monkeypatch.setattr(delivery._wake, "wait", wait)
    delivery.spool.add(items(1))
    delivery.wake()
    wait_until(lambda: len(sender.calls) >= 1, "a first attempt")
    delivery.close(drain=0.5)
    assert waits, "the dispatcher waited during the drain"
    assert all(timeout <= max(left, 0.01) + 0.005 for timeout, left in waits), waits
