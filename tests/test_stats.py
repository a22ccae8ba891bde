"""fp_core.stats.Stats: named and grouped counters, snapshot shape, thread safety."""

from __future__ import annotations

import sys
import threading
from collections.abc import Callable, Iterator

import pytest

from fp_core.stats import Stats


def test_counters_start_at_zero_and_add_up() -> None:
    stats = Stats()
    assert stats.get("unsealed") == 0
    stats.incr("unsealed")
    stats.incr("unsealed")
    stats.incr("unsealed", 5)
    stats.incr("dropped", 3)
    assert stats.get("unsealed") == 7
    assert stats.get("dropped") == 3


def test_reading_a_missing_counter_does_not_create_it() -> None:
    stats = Stats()
    assert stats.get("nothing") == 0
    assert stats.group("nothing") == {}
    assert stats.snapshot() == {}


def test_groups_count_by_key() -> None:
    stats = Stats()
    stats.incr_group("errors", "decrypt_failed")
    stats.incr_group("errors", "decrypt_failed")
    stats.incr_group("errors", "bad_base64", 4)
    stats.incr_group("skipped", "too_big")
    assert stats.group("errors") == {"decrypt_failed": 2, "bad_base64": 4}
    assert stats.group("skipped") == {"too_big": 1}
    # Groups and plain counters are separate namespaces for get().
    assert stats.get("errors") == 0


def test_group_returns_a_copy() -> None:
    stats = Stats()
    stats.incr_group("errors", "x")
    copy = stats.group("errors")
    copy["x"] = 100
    copy["y"] = 1
    assert stats.group("errors") == {"x": 1}


def test_snapshot_shape_and_order() -> None:
    stats = Stats()
    stats.incr("unsealed", 2)
    stats.incr("open_responses", 3)
    stats.incr_group("verdicts", "trusted", 1)
    stats.incr_group("verdicts", "suspicious", 1)
    stats.incr_group("errors", "no_keys")
    snap = stats.snapshot()
    assert snap == {
        "open_responses": 3,
        "unsealed": 2,
        "errors": {"no_keys": 1},
        "verdicts": {"suspicious": 1, "trusted": 1},
    }
    # Stable order: plain counters sorted, then groups sorted, each group's keys sorted.
    assert list(snap) == ["open_responses", "unsealed", "errors", "verdicts"]
    assert list(snap["verdicts"]) == ["suspicious", "trusted"]


def test_snapshot_is_detached_from_later_counts() -> None:
    stats = Stats()
    stats.incr("a")
    stats.incr_group("g", "k")
    snap = stats.snapshot()
    stats.incr("a")
    stats.incr_group("g", "k")
    assert snap == {"a": 1, "g": {"k": 1}}
    snap["g"]["k"] = 99
    assert stats.group("g") == {"k": 2}


@pytest.fixture
def busy_switching() -> Iterator[None]:
    # Switch threads as often as possible, so an unlocked read-modify-write in Stats
    # would lose increments in practice rather than in theory.
    old = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    try:
        yield
    finally:
        sys.setswitchinterval(old)


def _hammer(threads: int, fn: Callable[[], None]) -> None:
    start = threading.Barrier(threads)

    def work() -> None:
        start.wait()
        fn()

    workers = [threading.Thread(target=work) for _ in range(threads)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()


@pytest.mark.usefixtures("busy_switching")
def test_concurrent_increments_give_the_exact_total() -> None:
    stats = Stats()
    threads, rounds = 8, 5_000

    def work() -> None:
        for i in range(rounds):
            stats.incr("n")
            stats.incr("m", 2)
            stats.incr_group("g", "even" if i % 2 == 0 else "odd")

    _hammer(threads, work)
    assert stats.get("n") == threads * rounds
    assert stats.get("m") == 2 * threads * rounds
    assert stats.group("g") == {"even": threads * rounds // 2, "odd": threads * rounds // 2}


@pytest.mark.usefixtures("busy_switching")
def test_concurrent_first_increments_of_new_names_are_not_lost() -> None:
    # Every thread bumps the same never-seen names at the same moment. The first
    # increment of a name runs Counter.__missing__ (Python code, where the interpreter
    # may switch threads), so without the lock some of these increments get lost.
    stats = Stats()
    threads, rounds = 8, 10_000

    def work() -> None:
        for i in range(rounds):
            stats.incr(f"c{i}")
            stats.incr_group("g", f"k{i}")

    _hammer(threads, work)
    snap = stats.snapshot()
    groups = snap.pop("g")
    assert snap == {f"c{i}": threads for i in range(rounds)}
    assert groups == {f"k{i}": threads for i in range(rounds)}


@pytest.mark.usefixtures("busy_switching")
def test_snapshot_while_others_count() -> None:
    # A snapshot taken mid-flight never raises ("dict changed size") and never goes down.
    stats = Stats()
    threads, rounds = 4, 5_000
    seen: list[int] = []
    errors: list[BaseException] = []

    def count() -> None:
        for i in range(rounds):
            stats.incr("n")
            stats.incr_group("g", f"k{i % 50}")

    def watch() -> None:
        try:
            for _ in range(rounds):
                seen.append(stats.snapshot().get("n", 0))
        except BaseException as exc:  # a thread's exception would otherwise be lost
            errors.append(exc)

    workers = [threading.Thread(target=count) for _ in range(threads)]
    workers.append(threading.Thread(target=watch))
    for thread in workers:
        thread.start()
    for thread in workers:
        thread.join()
    assert errors == []
    assert len(seen) == rounds
    assert seen == sorted(seen)
    assert stats.get("n") == threads * rounds
    assert sum(stats.group("g").values()) == threads * rounds
