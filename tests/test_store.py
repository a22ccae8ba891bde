"""fp_core.store: the SQLite record store (schema, rows, locks, preload reads)."""

from __future__ import annotations

import json
import sqlite3
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from fp_core import store as store_module
from fp_core.generate import generate_event
from fp_core.jsontext import JsonObject
from fp_core.sqlite_files import SqliteFileError
from fp_core.stats import Stats
from fp_core.store import (
    MIGRATIONS,
    SCHEMA_VERSION,
    SqliteStore,
    read_records,
    recent_request_ids,
    record_of,
    row_of,
)
from fp_core.tap import iso_time
from fp_core.writer import JsonlSink, RecordWriter

PATIENCE = 10.0


def ok_record(i: int, *, when: float | None = None, duplicate: bool = False) -> dict[str, Any]:
    event = generate_event("v4", rng=i, timestamp_ms=1_790_000_000_000 + i)
    rid = event["event_id"]
    return {
        "time": iso_time(time.time() if when is None else when),
        "flow_id": f"flow-{i}",
        "host": "fp.shop.example",
        "path": "/agent/v4",
        "method": "POST",
        "status_code": 200,
        "client_ip": "203.0.113.7",
        "api": "v4",
        "request_id": rid,
        "ok": True,
        "error": None,
        "key_id": "cf66b2df",
        "checks": {
            "id_match": True,
            "fresh": True,
            "age_ms": 12,
            "duplicate": duplicate,
            "replayed": False,
            "ip_match": None,
            "origin_ok": None,
        },
        "verdict": "suspicious" if duplicate else "trusted",
        "reasons": ["duplicate"] if duplicate else [],
        "summary": {"request_id": rid, "visitor_id": f"visitor-{i % 3}", "bot": "not_detected"},
        "event": event,
    }


def error_record(i: int, *, when: float | None = None) -> dict[str, Any]:
    record = ok_record(i, when=when)
    record.update(
        ok=False,
        error={"kind": "decrypt_failed", "message": "no key fits — žádný"},
        key_id=None,
        checks=dict.fromkeys(record["checks"]),
        verdict="error",
        reasons=["decrypt_failed"],
        summary={"request_id": None, "visitor_id": None, "bot": None},
    )
    del record["event"]
    return record


def rows(path: Path, sql: str = "SELECT * FROM records ORDER BY id") -> list[sqlite3.Row]:
    conn = sqlite3.connect(path)
    conn.row_factory = sqlite3.Row
    try:
        return conn.execute(sql).fetchall()
    finally:
        conn.close()


@pytest.fixture
def store(tmp_path: Path) -> SqliteStore:
    return SqliteStore(str(tmp_path / "events.sqlite3"), Stats())


def test_new_store_is_private_wal_and_at_the_current_schema(tmp_path: Path) -> None:
    path = tmp_path / "events.sqlite3"
    store = SqliteStore(str(path), Stats())
    store.write([ok_record(1)])
    for name in ("events.sqlite3", "events.sqlite3-wal", "events.sqlite3-shm"):
        assert (tmp_path / name).stat().st_mode & 0o777 == 0o600, name
    conn = sqlite3.connect(path)
    assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert conn.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION == len(MIGRATIONS)
    indexes = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type='index'")}
    assert {"records_request_id", "records_visitor_id", "records_time"} <= indexes
    conn.close()
    store.close()


def test_reopening_keeps_rows_and_does_not_migrate_again(tmp_path: Path) -> None:
    path = str(tmp_path / "events.sqlite3")
    first = SqliteStore(path, Stats())
    first.write([ok_record(1)])
    first.close()
    second = SqliteStore(path, Stats())
    second.write([ok_record(2)])
    second.close()
    assert [r["flow_id"] for r in read_records(path)] == ["flow-1", "flow-2"]


def test_a_store_from_a_newer_version_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "events.sqlite3"
    conn = sqlite3.connect(path)
    conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    conn.close()
    with pytest.raises(SqliteFileError, match="newer"):
        SqliteStore(str(path), Stats())
    with pytest.raises(SqliteFileError, match="newer"):
        list(read_records(str(path)))


def test_a_file_that_is_not_sqlite_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "events.jsonl"
    path.write_text('{"not": "sqlite"}\n' * 100)
    with pytest.raises(SqliteFileError):
        SqliteStore(str(path), Stats())


def test_an_unwritable_location_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(SqliteFileError, match="cannot open"):
        SqliteStore(str(tmp_path / "missing-dir" / "x.sqlite3"), Stats())


def test_rows_give_back_the_records_they_were_made_from(store: SqliteStore) -> None:
    records = [ok_record(1), error_record(2), ok_record(3, duplicate=True)]
    records[0]["note"] = {"an": "extra field"}  # e.g. from a later version of the tap
    store.write(records)
    store.close()
    assert list(read_records(store.path)) == records


def test_columns_for_querying(store: SqliteStore) -> None:
    store.write([ok_record(1), error_record(2), ok_record(3, duplicate=True)])
    store.close()
    got = [
        dict(r)
        for r in rows(
            Path(store.path),
            "SELECT request_id, api, ok, error_kind, key_id, visitor_id, bot, verdict, "
            "duplicate, event IS NULL AS no_event FROM records ORDER BY id",
        )
    ]
    assert got[0]["ok"] == 1
    assert got[0]["visitor_id"] == "visitor-1"
    assert got[0]["bot"] == "not_detected"
    assert (got[0]["verdict"], got[0]["duplicate"], got[0]["no_event"]) == ("trusted", 0, 0)
    assert (got[1]["ok"], got[1]["error_kind"], got[1]["key_id"]) == (0, "decrypt_failed", None)
    assert got[1]["no_event"] == 1
    assert (got[2]["verdict"], got[2]["duplicate"]) == ("suspicious", 1)
    json_columns = rows(Path(store.path), "SELECT checks, summary, event FROM records")[0]
    assert json.loads(json_columns["checks"])["age_ms"] == 12
    assert json.loads(json_columns["event"]) == ok_record(1)["event"]


def test_duplicates_get_one_row_each(store: SqliteStore) -> None:
    record = ok_record(1)
    again = ok_record(1, duplicate=True)
    store.write([record])
    store.write([again])
    store.close()
    ids = [r["request_id"] for r in rows(Path(store.path))]
    assert ids == [record["request_id"]] * 2


def test_an_odd_value_cannot_block_the_store(store: SqliteStore) -> None:
    odd = ok_record(1)
    odd["client_ip"] = {"not": "a string"}  # e.g. a later change to the record format
    store.write([odd, ok_record(2)])
    assert store.held() == 0
    store.close()
    assert [r["client_ip"] for r in read_records(store.path)] == [
        '{"not":"a string"}',
        "203.0.113.7",
    ]


def test_a_lone_surrogate_cannot_block_the_store(store: SqliteStore) -> None:
    """A string SQLite cannot take (a "\\ud800" escape someone wrote, read by Python as a
    character with no UTF-8 form) would fail its batch on every retry."""
    odd = ok_record(1)
    odd["request_id"] = "a\ud800"
    odd["summary"] = {**odd["summary"], "visitor_id": "v\udfff"}
    store.write([odd, ok_record(2)])
    assert store.held() == 0
    store.close()
    first, second = read_records(store.path)
    assert (first["request_id"], first["summary"]["visitor_id"]) == ("a\\ud800", "v\udfff")
    assert second["request_id"] == ok_record(2)["request_id"]


def test_row_of_and_record_of_are_inverse() -> None:
    conn = sqlite3.connect(":memory:")
    conn.row_factory = sqlite3.Row
    for statement in MIGRATIONS[0]:
        conn.execute(statement)
    from fp_core.store import _INSERT

    record = ok_record(7)
    conn.execute(_INSERT, row_of(record))
    assert record_of(conn.execute("SELECT * FROM records").fetchone()) == record
    # An event with the text it was unsealed from is stored as that text.
    text = json.dumps(record["event"], indent=1).replace("\n", "")
    record["event"] = JsonObject(record["event"], text)
    assert text in row_of(record)


def test_each_batch_is_one_transaction(store: SqliteStore, tmp_path: Path) -> None:
    # A reader sees all of a batch or none of it: count rows between batches only.
    seen: list[int] = []
    for batch in range(5):
        store.write([ok_record(batch * 10 + i) for i in range(10)])
        seen.append(len(rows(Path(store.path))))
    store.close()
    assert seen == [10, 20, 30, 40, 50]


def hold_write_lock(path: str) -> sqlite3.Connection:
    """Another connection holding the write lock, as a shell's BEGIN EXCLUSIVE would."""
    other = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    other.execute("BEGIN EXCLUSIVE")
    return other


def test_a_locked_file_holds_records_back_and_loses_none(tmp_path: Path) -> None:
    stats = Stats()
    clock = [100.0]
    store = SqliteStore(
        str(tmp_path / "s.sqlite3"), stats, busy_timeout_ms=10, clock=lambda: clock[0]
    )
    lock = hold_write_lock(store.path)
    store.write([ok_record(1)])
    assert store.held() == 1
    # Within the retry delay the file is not even tried: the writer thread moves on.
    store.write([ok_record(2)])
    store.retry_held()
    assert store.held() == 2
    assert stats.group("store") == {"busy": 1, "deferred": 2}
    clock[0] += 1  # past the first retry delay, but still locked
    store.retry_held()
    assert stats.group("store")["busy"] == 2
    lock.execute("ROLLBACK")
    lock.close()
    clock[0] += 10
    store.retry_held()
    assert store.held() == 0
    store.write([ok_record(3)])
    store.close()
    assert [r["flow_id"] for r in read_records(store.path)] == ["flow-1", "flow-2", "flow-3"]
    assert stats.group("store")["rows"] == 3
    assert "lost" not in stats.group("store")


def test_a_long_read_transaction_does_not_delay_writes(store: SqliteStore) -> None:
    reader = sqlite3.connect(store.path, isolation_level=None)
    reader.execute("BEGIN")
    assert reader.execute("SELECT COUNT(*) FROM records").fetchone()[0] == 0
    store.write([ok_record(1)])
    assert store.held() == 0  # WAL: a reader never blocks the writer
    # The reader keeps its snapshot until it ends its transaction.
    assert reader.execute("SELECT COUNT(*) FROM records").fetchone()[0] == 0
    reader.execute("COMMIT")
    assert reader.execute("SELECT COUNT(*) FROM records").fetchone()[0] == 1
    reader.close()
    store.close()


def test_close_waits_for_a_lock_released_soon(tmp_path: Path) -> None:
    stats = Stats()
    store = SqliteStore(str(tmp_path / "s.sqlite3"), stats, busy_timeout_ms=10)
    lock = hold_write_lock(store.path)
    store.write([ok_record(1)])
    assert store.held() == 1

    def release() -> None:
        lock.execute("ROLLBACK")
        lock.close()

    releaser = threading.Timer(0.3, release)
    releaser.start()
    store.close()
    releaser.join(PATIENCE)
    assert len(list(read_records(store.path))) == 1
    assert "lost" not in stats.group("store")


def test_held_records_are_bounded(tmp_path: Path) -> None:
    stats = Stats()
    store = SqliteStore(str(tmp_path / "s.sqlite3"), stats, busy_timeout_ms=10, max_held=3)
    lock = hold_write_lock(store.path)
    store.write([ok_record(i) for i in range(5)])
    assert store.held() == 3
    assert stats.group("store")["lost"] == 2
    lock.execute("ROLLBACK")
    lock.close()
    store.close()
    # The newest are kept: the oldest went first.
    assert [r["flow_id"] for r in read_records(store.path)] == ["flow-2", "flow-3", "flow-4"]


def test_the_writer_retries_held_records_when_idle(tmp_path: Path) -> None:
    stats = Stats()
    store = SqliteStore(str(tmp_path / "s.sqlite3"), stats, busy_timeout_ms=10)
    jsonl = tmp_path / "r.jsonl"
    writer = RecordWriter([store, JsonlSink(str(jsonl))], stats)
    writer.start()
    lock = hold_write_lock(store.path)
    writer.submit(ok_record(1))
    deadline = time.monotonic() + PATIENCE
    while store.held() == 0 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert store.held() == 1
    # The other sink was not held up by the locked store.
    while not jsonl.read_text() and time.monotonic() < deadline:
        time.sleep(0.01)
    assert len(jsonl.read_text().splitlines()) == 1
    lock.execute("ROLLBACK")
    lock.close()
    # No new record arrives: the idle tick alone writes the held one.
    while store.held() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert store.held() == 0
    assert len(list(read_records(store.path))) == 1
    assert writer.close() is True


class Clocks:
    """The store's two clocks, moved by hand: monotonic (when to prune) and wall (what
    is old)."""

    def __init__(self) -> None:
        self.mono, self.wall = 100.0, 1_800_000_000.0

    def store(self, path: Path, stats: Stats, keep: float, **kwargs: Any) -> SqliteStore:
        return SqliteStore(
            str(path), stats, keep=keep, clock=lambda: self.mono, wall=lambda: self.wall, **kwargs
        )


def flow_ids(path: str) -> list[str]:
    return [r["flow_id"] for r in read_records(path)]


def test_rows_older_than_keep_are_deleted_as_the_store_goes(tmp_path: Path) -> None:
    stats, clocks = Stats(), Clocks()
    store = clocks.store(tmp_path / "s.sqlite3", stats, keep=60)
    now = clocks.wall
    store.write([ok_record(1, when=now - 120), ok_record(2, when=now - 61), ok_record(3, when=now)])
    assert flow_ids(store.path) == ["flow-3"], "the two older than 60 s went at once"
    assert stats.group("store") == {"rows": 3, "pruned": 2}
    clocks.wall += 45  # flow-3 is 45 s old: kept
    store.write([ok_record(4, when=clocks.wall - 90)])
    assert flow_ids(store.path) == ["flow-3", "flow-4"], "not due yet: at most every keep/2"
    clocks.mono += 30
    store.retry_held()  # the writer's idle tick
    assert flow_ids(store.path) == ["flow-3"]
    clocks.wall += 30
    clocks.mono += 30
    store.retry_held()
    assert flow_ids(store.path) == []
    assert stats.group("store") == {"rows": 4, "pruned": 4}
    store.close()


@pytest.mark.parametrize(
    "keep", [0, 3 * 10**9, 10**400], ids=["zero", "before-1970", "beyond-any-clock"]
)
def test_without_keep_every_row_stays(tmp_path: Path, keep: int) -> None:
    stats, clocks = Stats(), Clocks()
    store = clocks.store(tmp_path / "s.sqlite3", stats, keep=keep)
    store.write([ok_record(1, when=clocks.wall - 10**8)])
    clocks.mono += 10**6
    store.retry_held()
    assert flow_ids(store.path) == ["flow-1"]
    assert stats.group("store") == {"rows": 1}
    store.close()


def test_a_backlog_is_deleted_in_steps_between_batches(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(store_module, "PRUNE_BATCH", 2)
    stats, clocks = Stats(), Clocks()
    path = tmp_path / "s.sqlite3"
    old = [ok_record(i, when=clocks.wall - 3600) for i in range(5)]
    clocks.store(path, Stats(), keep=0).write(old)  # a file kept for ever until now
    store = clocks.store(path, stats, keep=60)
    counts = []
    for _ in range(4):  # no time passes: each turn takes one step while there may be more
        store.retry_held()
        counts.append(len(flow_ids(store.path)))
    assert counts == [3, 1, 0, 0]
    assert stats.group("store") == {"pruned": 5}
    store.close()


def test_a_locked_file_delays_the_deletion_not_the_records(tmp_path: Path) -> None:
    stats, clocks = Stats(), Clocks()
    path = tmp_path / "s.sqlite3"
    clocks.store(path, Stats(), keep=0).write([ok_record(1, when=clocks.wall - 3600)])
    store = clocks.store(path, stats, keep=60, busy_timeout_ms=10)
    lock = hold_write_lock(store.path)
    store.retry_held()
    assert stats.group("store") == {"busy": 1}
    store.retry_held()
    assert stats.group("store") == {"busy": 1}, "not tried again before its next turn"
    lock.execute("ROLLBACK")
    lock.close()
    clocks.mono += 30
    store.write([ok_record(2, when=clocks.wall)])
    assert flow_ids(store.path) == ["flow-2"]
    assert stats.group("store") == {"busy": 1, "rows": 1, "pruned": 1}
    store.close()


def test_recent_request_ids_for_the_replay_memory(store: SqliteStore) -> None:
    now = time.time()
    old = ok_record(1, when=now - 7200)
    recent = ok_record(2, when=now - 60)
    spliced = ok_record(3, when=now - 30)
    spliced["request_id"] = "outer-id"  # the tap remembers the event's own id
    store.write([old, recent, error_record(4), spliced])
    store.close()
    got = recent_request_ids(store.path, since=now - 3600, limit=100)
    assert sorted(rid for rid, _ in got) == sorted(
        [recent["summary"]["request_id"], spliced["summary"]["request_id"]]
    )
    assert all(now - 61 < when < now for _, when in got)
    assert len(recent_request_ids(store.path, since=now - 3600, limit=1)) == 1


def test_recent_request_ids_skips_rows_it_cannot_read(store: SqliteStore) -> None:
    store.write([ok_record(1, when=time.time() - 5), ok_record(2, when=time.time() - 5)])
    store.close()
    conn = sqlite3.connect(store.path)
    conn.execute("UPDATE records SET summary = 'not json' WHERE flow_id = 'flow-1'")
    conn.commit()
    conn.close()
    got = recent_request_ids(store.path, since=time.time() - 60, limit=10)
    assert [rid for rid, _ in got] == [ok_record(2)["request_id"]]


def test_recent_request_ids_of_a_missing_store_is_empty(tmp_path: Path) -> None:
    assert recent_request_ids(str(tmp_path / "none.sqlite3"), 0, 10) == []


def test_read_records_while_another_connection_writes(store: SqliteStore) -> None:
    store.write([ok_record(1)])
    # The store's own connection is still open (as a running tap's would be).
    assert len(list(read_records(store.path))) == 1
    store.write([ok_record(2)])
    assert len(list(read_records(store.path))) == 2
    store.close()


def test_recent_request_ids_with_a_ttl_of_centuries(store: SqliteStore) -> None:
    """fp_replay_ttl has no upper bound: a date before year 1 must not be computed."""
    store.write([ok_record(1)])
    store.close()
    got = recent_request_ids(store.path, since=time.time() - 10**12, limit=10)
    assert [request_id for request_id, _ in got] == [ok_record(1)["request_id"]]
