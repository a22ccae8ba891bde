"""fp_core.spool: the durable webhook spool (add, due, settle, park, resend, ownership)."""

from __future__ import annotations

import sqlite3
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from fp_core.spool import LOCK_FILE, SPOOL_FILE, Outcomes, Spool, private_dir
from fp_core.sqlite_files import SqliteFileError
from fp_core.webhook import Outgoing


class Clock:
    def __init__(self, now: float = 1_800_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def item(i: int) -> Outgoing:
    return Outgoing(f"req-{i}", f'{{"event_id":"req-{i}","n":"ž"}}'.encode(), {"X-N": str(i)})


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def spool(tmp_path: Path, clock: Clock) -> Iterator[Spool]:
    spool = Spool(str(tmp_path / "state"), clock=clock)
    yield spool
    spool.close()


def test_the_state_dir_and_files_are_private(tmp_path: Path, clock: Clock) -> None:
    state = tmp_path / "a" / "state"
    spool = Spool(str(state), clock=clock)
    spool.add([item(1)])
    assert state.stat().st_mode & 0o777 == 0o700
    for name in (SPOOL_FILE, f"{SPOOL_FILE}-wal", f"{SPOOL_FILE}-shm", LOCK_FILE):
        assert (state / name).stat().st_mode & 0o777 == 0o600, name
    spool.close()


def test_private_dir_reports_an_existing_open_directory(tmp_path: Path) -> None:
    open_dir = tmp_path / "open"
    open_dir.mkdir(mode=0o755)
    open_dir.chmod(0o755)
    assert private_dir(str(open_dir)) is True
    assert open_dir.stat().st_mode & 0o777 == 0o755, "an existing directory is left alone"
    assert private_dir(str(tmp_path / "new")) is False


def test_added_events_are_due_at_once_in_order(spool: Spool, clock: Clock) -> None:
    spool.add([item(1), item(2)])
    spool.add([item(3)])
    due = spool.due(clock.now, 10)
    assert [e.request_id for e in due] == ["req-1", "req-2", "req-3"]
    assert due[0].body == item(1).body
    assert due[0].headers == {"X-N": "1"}
    assert (due[0].attempts, due[0].window_start) == (0, clock.now)
    assert spool.pending == 3
    assert spool.due(clock.now, 2) == due[:2]


def test_due_skips_the_events_being_sent(spool: Spool, clock: Clock) -> None:
    spool.add([item(i) for i in range(5)])
    first = spool.due(clock.now, 2)
    rest = spool.due(clock.now, 10, exclude={e.id for e in first})
    assert [e.request_id for e in rest] == ["req-2", "req-3", "req-4"]
    assert spool.due(clock.now, 0) == []


def test_delivered_events_are_deleted(spool: Spool, clock: Clock) -> None:
    spool.add([item(1), item(2)])
    one, two = spool.due(clock.now, 10)
    spool.settle(Outcomes(delivered=[one.id]))
    assert spool.pending == 1
    assert [e.id for e in spool.due(clock.now, 10)] == [two.id]


def test_a_retry_waits_for_its_time_and_counts_the_attempt(spool: Spool, clock: Clock) -> None:
    spool.add([item(1)])
    (event,) = spool.due(clock.now, 10)
    spool.settle(Outcomes(retry=[(event.id, clock.now + 30, "http_500")]))
    assert spool.due(clock.now, 10) == []
    assert spool.next_due_after(clock.now) == clock.now + 30
    clock.now += 30
    (again,) = spool.due(clock.now, 10)
    assert again.attempts == 1
    assert spool.pending == 1


def test_parked_events_are_kept_counted_and_resent(spool: Spool, clock: Clock) -> None:
    spool.add([item(1), item(2)])
    one, two = spool.due(clock.now, 10)
    spool.settle(Outcomes(park=[(one.id, "connection")], delivered=[two.id]))
    assert (spool.pending, spool.parked) == (0, 1)
    assert spool.due(clock.now + 10**6, 10) == []
    assert spool.next_due_after(clock.now) is None
    clock.now += 100
    assert spool.resend() == 1
    assert (spool.pending, spool.parked) == (1, 0)
    (again,) = spool.due(clock.now, 10)
    assert again.request_id == "req-1"
    # A fresh give-up clock and attempt count.
    assert (again.attempts, again.window_start) == (0, clock.now)
    assert spool.resend() == 0


def test_a_limit_counts_pending_and_parked_and_keeps_the_first(spool: Spool, clock: Clock) -> None:
    assert spool.add([item(1), item(2)]) == 2
    one, _ = spool.due(clock.now, 10)
    spool.settle(Outcomes(park=[(one.id, "connection")]))
    assert (spool.pending, spool.parked) == (1, 1)
    assert spool.add([item(3), item(4), item(5)], max_events=3) == 1, "room for one"
    assert spool.add([item(6)], max_events=3) == 0
    assert [e.request_id for e in spool.due(clock.now, 10)] == ["req-2", "req-3"]
    assert (spool.pending, spool.parked) == (2, 1)


def test_a_new_owner_sends_what_was_left_at_once(tmp_path: Path, clock: Clock) -> None:
    state = str(tmp_path / "state")
    first = Spool(state, clock=clock)
    first.add([item(1), item(2), item(3)])
    one, two, three = first.due(clock.now, 10)
    first.settle(
        Outcomes(
            delivered=[one.id],
            retry=[(two.id, clock.now + 3600, "timeout")],
            park=[(three.id, "http_500")],
        )
    )
    first.close()
    clock.now += 1
    second = Spool(state, clock=clock)
    assert (second.pending, second.parked) == (1, 1)
    (due,) = second.due(clock.now, 10)
    assert (due.request_id, due.attempts) == ("req-2", 1)
    second.close()


def test_one_tap_per_state_dir(tmp_path: Path, clock: Clock) -> None:
    state = str(tmp_path / "state")
    first = Spool(state, clock=clock)
    with pytest.raises(SqliteFileError, match="in use by another fp-tap"):
        Spool(state, clock=clock, lock_wait=0.2)
    first.close()
    Spool(state, clock=clock).close()  # free again once the owner closed it


def test_a_spool_being_let_go_is_waited_for(tmp_path: Path, clock: Clock) -> None:
    # A tap restarted right after a SIGKILL: its worker process still closes the spool.
    state = str(tmp_path / "state")
    first = Spool(state, clock=clock)
    threading.Timer(0.3, first.close).start()
    began = time.monotonic()
    Spool(state, clock=clock, lock_wait=10).close()
    assert 0.25 < time.monotonic() - began < 10


def test_the_spool_has_a_versioned_schema(spool: Spool) -> None:
    conn = sqlite3.connect(spool.path)
    assert conn.execute("PRAGMA user_version").fetchone()[0] == 1
    assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    conn.close()


def test_an_unusable_state_dir_is_an_error(tmp_path: Path, clock: Clock) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    with pytest.raises(SqliteFileError, match="cannot create"):
        Spool(str(blocker / "state"), clock=clock)
