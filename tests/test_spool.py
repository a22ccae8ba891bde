"""fp_core.spool: the durable webhook spool (add, due, settle, park, resend, discard, expire,
ownership)."""

from __future__ import annotations

import sqlite3
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from fp_core.spool import LOCK_FILE, MIGRATIONS, SPOOL_FILE, Outcomes, Spool, private_dir
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
    assert conn.execute("PRAGMA user_version").fetchone()[0] == len(MIGRATIONS) == 2
    assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    conn.close()


def park(spool: Spool, clock: Clock, *numbers: int) -> list[int]:
    """Spool these events and park them at the clock's time; their row ids."""
    spool.add([item(n) for n in numbers])
    due = [e for e in spool.due(clock.now, 10**6) if e.request_id in {f"req-{n}" for n in numbers}]
    spool.settle(Outcomes(park=[(e.id, "http_400") for e in due]))
    return [e.id for e in due]


def request_ids(spool: Spool, parked: int) -> list[str]:
    conn = sqlite3.connect(spool.path)
    try:
        rows = conn.execute(
            "SELECT request_id FROM events WHERE parked = ? ORDER BY id", (parked,)
        ).fetchall()
    finally:
        conn.close()
    return [row[0] for row in rows]


def test_discard_deletes_the_parked_events_only(spool: Spool, clock: Clock) -> None:
    park(spool, clock, 1, 2)
    spool.add([item(3)])
    assert (spool.pending, spool.parked) == (1, 2)
    assert spool.discard() == 2
    assert (spool.pending, spool.parked) == (1, 0)
    assert request_ids(spool, parked=1) == []
    assert request_ids(spool, parked=0) == ["req-3"]
    assert spool.discard() == 0
    # The room they took is free again.
    assert spool.add([item(4), item(5)], max_events=3) == 2


def test_expire_deletes_what_was_parked_before_the_time_oldest_first(
    spool: Spool, clock: Clock
) -> None:
    park(spool, clock, 1, 2)
    clock.now += 100
    park(spool, clock, 3)
    spool.add([item(4)])  # pending: never expired, however old
    clock.now += 10**6
    assert spool.expire(clock.now - 10**6 - 50, 10) == 2, "parked 100 s before the third"
    assert request_ids(spool, parked=1) == ["req-3"]
    assert spool.expire(clock.now - 10**6, 10) == 0, "parked exactly then: not before it"
    assert spool.expire(clock.now, 10) == 1
    assert (spool.pending, spool.parked) == (1, 0)
    assert request_ids(spool, parked=0) == ["req-4"]


def test_expire_takes_at_most_its_limit_the_oldest(spool: Spool, clock: Clock) -> None:
    for n in range(5):
        park(spool, clock, n)
        clock.now += 1
    assert spool.expire(clock.now, 2) == 2
    assert request_ids(spool, parked=1) == ["req-2", "req-3", "req-4"]
    assert spool.parked == 3


def test_resend_forgets_when_an_event_was_parked(spool: Spool, clock: Clock) -> None:
    park(spool, clock, 1)
    assert spool.resend() == 1
    clock.now += 10**6
    assert spool.expire(clock.now, 10) == 0, "pending again: not expired"
    (event,) = spool.due(clock.now, 10)
    # Parked again later: its age counts from then.
    spool.settle(Outcomes(park=[(event.id, "http_400")]))
    assert spool.expire(clock.now - 1, 10) == 0
    assert spool.expire(clock.now + 1, 10) == 1


def test_a_spool_of_the_first_version_is_migrated_its_parked_events_parked_now(
    tmp_path: Path, clock: Clock
) -> None:
    state = tmp_path / "state"
    state.mkdir(mode=0o700)
    conn = sqlite3.connect(state / SPOOL_FILE)
    for statement in MIGRATIONS[0]:
        conn.execute(statement)
    conn.execute("PRAGMA user_version = 1")
    conn.executemany(
        "INSERT INTO events (request_id, body, headers, created, window_start, next_attempt, "
        "parked) VALUES (?, ?, '{}', 1, 1, 1, ?)",
        [("old-parked", b"{}", 1), ("old-pending", b"{}", 0)],
    )
    conn.commit()
    conn.close()
    before = time.time()
    spool = Spool(str(state), clock=clock)
    try:
        assert (spool.pending, spool.parked) == (1, 1)
        conn = sqlite3.connect(spool.path)
        rows = dict(conn.execute("SELECT request_id, parked_at FROM events").fetchall())
        conn.close()
        assert rows["old-pending"] is None
        assert before - 1 <= rows["old-parked"] <= time.time() + 1
        assert spool.expire(before - 1, 10) == 0, "a full keep from the upgrade on"
        assert spool.expire(time.time() + 1, 10) == 1
        assert [e.request_id for e in spool.due(clock.now, 10)] == ["old-pending"]
    finally:
        spool.close()


def test_an_unusable_state_dir_is_an_error(tmp_path: Path, clock: Clock) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    with pytest.raises(SqliteFileError, match="cannot create"):
        Spool(str(blocker / "state"), clock=clock)


@pytest.mark.parametrize("command", ["resend", "discard"])
def test_resend_and_discard_go_in_steps(
    spool: Spool, clock: Clock, monkeypatch: pytest.MonkeyPatch, command: str
) -> None:
    """A transaction per STEP rows, the lock let go in between: a million parked events
    must not keep the writer and delivery out for seconds."""
    from fp_core import spool as spool_module

    monkeypatch.setattr(spool_module, "STEP", 2)
    park(spool, clock, *range(5))
    spool.add([item(9)])
    steps: list[int] = []
    real = spool._conn

    class Counting:
        def execute(self, sql: str, *args: Any) -> sqlite3.Cursor:
            if sql.startswith(("UPDATE events SET parked = 0", "DELETE FROM events WHERE id IN")):
                steps.append(1)
            return real.execute(sql, *args)

    monkeypatch.setattr(spool, "_conn", Counting())
    assert getattr(spool, command)() == 5
    assert len(steps) == 3, "2 + 2 + 1"
    monkeypatch.setattr(spool, "_conn", real)
    assert spool.parked == 0
    assert spool.pending == (6 if command == "resend" else 1)
    assert request_ids(spool, parked=1) == []
