"""The SQLite record store: one row per record, queryable, written by the background writer.

The file is in WAL mode, so readers (``python -m fp_core report``, ``sqlite3``, the
replay preload at start) never block the writer and see only whole batches. The schema
is versioned with ``PRAGMA user_version``; :data:`MIGRATIONS` takes any older file to
the current version when the store opens.

Another process can still take the write lock (``BEGIN EXCLUSIVE`` in a shell, a
backup tool). Then a batch is *held* in memory and retried a little later, together
with the following batches, rather than dropped or left to stall the writer thread
that also feeds the other sinks.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import closing
from datetime import datetime
from typing import Any

from fp_core.jsontext import dumps, encodable
from fp_core.sqlite_files import (
    SqliteFileError,
    connect,
    connect_readonly,
    is_busy,
    migrate,
    reason,
    schema_version,
    transaction,
)
from fp_core.stats import Stats
from fp_core.tap import RECORD_FIELDS, iso_time
from fp_core.throttle import Throttle

log = logging.getLogger(__name__)

#: Each entry takes the schema from version ``i`` to ``i + 1``; never edit a released one.
MIGRATIONS: tuple[tuple[str, ...], ...] = (
    (
        """
        CREATE TABLE records (
            id INTEGER PRIMARY KEY,
            time TEXT,              -- ISO 8601 UTC with milliseconds, sorts as text
            request_id TEXT,        -- the outer request id / event_id
            api TEXT,
            ok INTEGER,             -- 1 unsealed, 0 error
            error_kind TEXT,
            key_id TEXT,
            visitor_id TEXT,
            bot TEXT,
            verdict TEXT,
            duplicate INTEGER,      -- 1 when the tap had seen this request id before
            flow_id TEXT,
            host TEXT,
            path TEXT,
            method TEXT,
            status_code INTEGER,
            client_ip TEXT,
            error TEXT,             -- JSON
            reasons TEXT,           -- JSON
            checks TEXT,            -- JSON
            summary TEXT,           -- JSON
            event TEXT,             -- JSON; NULL when the record carries no event
            extra TEXT              -- JSON object of any other record fields, or NULL
        )
        """,
        "CREATE INDEX records_request_id ON records (request_id)",
        "CREATE INDEX records_visitor_id ON records (visitor_id)",
        "CREATE INDEX records_time ON records (time)",
    ),
)
SCHEMA_VERSION = len(MIGRATIONS)

#: Record fields kept as they are, each in the column of the same name. Listed rather
#: than derived from RECORD_FIELDS: the columns are fixed by MIGRATIONS, so a record field
#: added later lands in ``extra`` until a migration gives it a column.
_PLAIN = (
    "time",
    "flow_id",
    "host",
    "path",
    "method",
    "status_code",
    "client_ip",
    "api",
    "request_id",
    "key_id",
    "verdict",
)
#: Record fields kept as JSON text.
_JSON = ("error", "checks", "reasons", "summary")
_KNOWN = {*_PLAIN, *_JSON, "ok", "event"}
_COLUMNS = (*_PLAIN, *_JSON, "ok", "event", "error_kind", "visitor_id", "bot", "duplicate", "extra")
_PRUNE = "DELETE FROM records WHERE id IN (SELECT id FROM records WHERE time < ? LIMIT ?)"
# Built from the constant column names above, never from data.
_INSERT = f"INSERT INTO records ({', '.join(_COLUMNS)}) VALUES ({', '.join('?' * len(_COLUMNS))})"  # noqa: S608

# While the file is locked: how long SQLite itself waits for the lock within one try,
# and how long the store then leaves it alone (doubling per failure) so that the writer
# thread keeps feeding the other sinks meanwhile.
BUSY_TIMEOUT_MS = 250
RETRY_FIRST = 0.5
RETRY_MAX = 5.0
#: Records held at most while the file stays unwritable; beyond, the oldest are lost
#: (counted as ``store.lost``): memory is bounded even if the lock is never released.
MAX_HELD = 100_000
#: How long ``close`` keeps retrying held records before giving up on them.
CLOSE_PATIENCE = 5.0
#: With a retention (``keep``): how often rows older than it are deleted, at most (and at
#: least twice per ``keep``), and how many per transaction. Short transactions: the
#: writer thread, which also feeds the other sinks, and the file's readers wait little;
#: a backlog (a retention set on a large file) goes in steps between batches of records.
PRUNE_EVERY = 60.0
PRUNE_BATCH = 1_000
#: A retention this long (about 31,700 years) keeps every row, as 0 does: beyond it, the
#: arithmetic on the clock would overflow.
KEEP_FOREVER = 10**12


def row_of(record: dict[str, Any]) -> tuple[Any, ...]:
    """The column values of one record, in the order of the INSERT."""
    checks = record.get("checks") or {}
    summary = record.get("summary") or {}
    error = record.get("error")
    extra = {k: v for k, v in record.items() if k not in _KNOWN}
    return (
        *(_scalar(record.get(name)) for name in _PLAIN),
        *(_json_or_null(record.get(name)) for name in _JSON),
        _int_or_null(record.get("ok")),
        dumps(record["event"]) if "event" in record else None,
        _scalar(error.get("kind")) if isinstance(error, dict) else None,
        _scalar(summary.get("visitor_id")),
        _scalar(summary.get("bot")),
        _int_or_null(checks.get("duplicate")),
        dumps(extra) if extra else None,
    )


def record_of(row: sqlite3.Row) -> dict[str, Any]:
    """The record a row was made from (what the JSONL file holds for it)."""
    record: dict[str, Any] = {}
    for name in RECORD_FIELDS:
        if name in _JSON:
            record[name] = None if row[name] is None else json.loads(row[name])
        elif name == "ok":
            record[name] = None if row[name] is None else bool(row[name])
        else:
            record[name] = row[name]
    if row["event"] is not None:
        record["event"] = json.loads(row["event"])
    if row["extra"] is not None:
        record.update(json.loads(row["extra"]))
    return record


def _scalar(value: Any) -> Any:
    # A value SQLite cannot bind would fail its batch again on every retry and hold up
    # every record after it: store anything unexpected as its JSON text instead, and a
    # string with a lone surrogate with that written as its escape.
    if isinstance(value, str):
        return encodable(value)
    if value is None or isinstance(value, int | float):
        return value
    return dumps(value)


def _json_or_null(value: Any) -> str | None:
    return None if value is None else dumps(value)


def _int_or_null(value: Any) -> int | None:
    return None if value is None else int(bool(value))


def open_store(path: str) -> sqlite3.Connection:
    """A read-only connection to a store this version can read."""
    conn = connect_readonly(path)
    version = schema_version(conn, path)
    if not 0 < version <= SCHEMA_VERSION:
        conn.close()
        problem = "no fp-tap schema" if version == 0 else f"schema version {version} is newer"
        raise SqliteFileError(f"{path}: not a store this fp-tap can read ({problem})")
    return conn


def read_records(path: str) -> Iterator[dict[str, Any]]:
    """Every record in the store, oldest row first (as a JSONL file would list them)."""
    with closing(open_store(path)) as conn:
        yield from (record_of(row) for row in conn.execute("SELECT * FROM records ORDER BY id"))


def recent_request_ids(path: str, since: float, limit: int) -> list[tuple[str, float]]:
    """(request id, epoch seconds) of the newest ``limit`` unsealed records at or after
    ``since``, for the replay memory; ``[]`` when the store does not exist yet.

    The id is the one the replay check remembers: the event's own, else the outer one.
    """
    if not os.path.isfile(path):
        return []
    with closing(open_store(path)) as conn:
        try:
            rows = conn.execute(
                "SELECT request_id, summary, time FROM records WHERE ok = 1 AND time >= ? "
                "ORDER BY time DESC LIMIT ?",
                (iso_time(max(since, 0.0)), limit),  # a ttl of centuries: every row
            ).fetchall()
        except sqlite3.Error as exc:
            raise SqliteFileError(f"cannot read {path}: {reason(exc)}") from None
    out = []
    for row in rows:
        try:
            summary = json.loads(row["summary"]) if row["summary"] else {}
            when = datetime.fromisoformat(row["time"]).timestamp()
        except (TypeError, ValueError):
            continue  # a row someone edited by hand: not worth failing the start for
        seen_id = summary.get("request_id") if isinstance(summary, dict) else None
        if seen_id or row["request_id"]:
            out.append((seen_id or row["request_id"], when))
    return out


class SqliteStore:
    """A :class:`~fp_core.writer.Sink`: each batch is one transaction.

    Called from the writer thread only. A batch that cannot be written (file locked,
    disk full) is held and retried with the next batch or the writer's idle tick.

    With ``keep`` (seconds, 0: for ever), rows whose ``time`` is older than that are
    deleted as the store goes (:data:`PRUNE_EVERY`): a tap that runs for months keeps a
    file of bounded size, whose freed pages SQLite reuses for new rows.
    """

    name = "sqlite"

    def __init__(
        self,
        path: str,
        stats: Stats,
        *,
        keep: float = 0,
        busy_timeout_ms: int = BUSY_TIMEOUT_MS,
        max_held: int = MAX_HELD,
        clock: Callable[[], float] = time.monotonic,
        wall: Callable[[], float] = time.time,
    ) -> None:
        self.path = path
        self.stats = stats
        self.max_held = max_held
        self.keep = 0 if keep >= KEEP_FOREVER else keep
        self._clock = clock
        self._wall = wall
        self._prune_at = float("-inf")
        self._conn = connect(path)
        try:
            migrate(self._conn, MIGRATIONS, f"store {path}")
            self._conn.execute(f"PRAGMA busy_timeout = {int(busy_timeout_ms)}")
        except BaseException:
            self._conn.close()
            raise
        self._held: list[tuple[Any, ...]] = []
        # Rows a replaced store of the same file handed over (from the thread retiring
        # it), taken in by this store's own writer thread.
        self._handed: list[tuple[Any, ...]] = []
        self._handed_lock = threading.Lock()
        self._successor: SqliteStore | None = None
        self._closed = False
        self._retry_at = float("-inf")
        self._retry_delay = RETRY_FIRST
        self._warnings = Throttle(clock=self._clock)
        self._prune_warnings = Throttle(clock=self._clock)  # its own: not to hide those

    def held(self) -> int:
        """Records waiting to be written (non-zero only while the file is unwritable)."""
        with self._handed_lock:
            return len(self._held) + len(self._handed)

    def succeeded_by(self, successor: SqliteStore) -> None:
        """``successor`` (a new writer's store) takes over: when this one closes, the
        records it still holds are handed to it rather than given up on after
        :data:`CLOSE_PATIENCE`, if it writes the same file."""
        with contextlib.suppress(OSError):
            if os.path.samefile(self.path, successor.path):
                self._successor = successor

    def _take_handed(self, rows: list[tuple[Any, ...]]) -> bool:
        """Take rows a predecessor still holds; False when this store (and whatever
        replaced it) is closed: the giver then gives them its own patience."""
        with self._handed_lock:
            if not self._closed:
                self._handed += rows
                return True
        # Closed meanwhile (retirements run side by side): on to what replaced it.
        return self._successor is not None and self._successor._take_handed(rows)

    def _adopt_handed(self) -> None:
        """The handed-over rows go before this store's own: they were written first."""
        with self._handed_lock:
            if self._handed:
                self._held[:0] = self._handed
                self._handed = []

    def write(self, records: Sequence[dict[str, Any]]) -> None:
        self._adopt_handed()
        self._held.extend(row_of(r) for r in records)
        self._bound_held()
        if self._clock() < self._retry_at:
            self.stats.incr_group("store", "deferred", len(records))
            return
        if not self._flush():
            if records:
                self.stats.incr_group("store", "deferred", len(records))
            return
        self._prune()

    def retry_held(self) -> None:
        """Try the held records again once their retry time has come, and delete rows
        past the retention when due (the writer's idle tick)."""
        self._adopt_handed()
        self._bound_held()
        if self._clock() < self._retry_at:
            return
        if self._flush():
            self._prune()

    def _prune(self) -> None:
        """Delete up to :data:`PRUNE_BATCH` rows older than ``keep``, when due; again at
        the next call if there may be more."""
        if not self.keep or self._clock() < self._prune_at:
            return
        # Not before 1970: a keep of centuries keeps every row (and dates stay valid).
        cutoff = iso_time(max(self._wall() - self.keep, 0.0))
        next_turn = self._clock() + min(PRUNE_EVERY, self.keep / 2)
        try:
            with transaction(self._conn):
                deleted = self._conn.execute(_PRUNE, (cutoff, PRUNE_BATCH)).rowcount
        except sqlite3.Error as exc:
            # Locked or failing: records come first; the deletion waits for its next turn.
            busy = is_busy(exc)
            self.stats.incr_group("store", "busy" if busy else "errors")
            self._prune_at = next_turn
            if self._prune_warnings.ready():
                why = "locked by another connection" if busy else reason(exc)
                log.warning("fp-tap: cannot delete old rows from %s (%s)", self.path, why)
            return
        if deleted:
            self.stats.incr_group("store", "pruned", deleted)
        if deleted < PRUNE_BATCH:
            self._prune_at = next_turn

    def close(self) -> None:
        self._adopt_handed()
        successor = self._successor
        # One try at once; then a successor on the same file takes what is left (it
        # retries as this one would); else (none, or closed already) CLOSE_PATIENCE more.
        if (
            successor is not None
            and self._held
            and not self._flush()
            and successor._take_handed(self._held)
        ):
            self._held = []
        deadline = self._clock() + CLOSE_PATIENCE
        while self._held and not self._flush() and self._clock() < deadline:
            time.sleep(0.1)
        with self._handed_lock:
            self._closed = True
            left, self._held, self._handed = self._held + self._handed, [], []
        if left and not (successor is not None and successor._take_handed(left)):
            self.stats.incr_group("store", "lost", len(left))
            log.warning(
                "fp-tap: %d record(s) could not be written to %s before closing",
                len(left),
                self.path,
            )
        self._conn.close()

    def _flush(self) -> bool:
        """Write everything held in one transaction; False (and retry later) on failure."""
        if not self._held:
            return True
        try:
            with transaction(self._conn):
                self._conn.executemany(_INSERT, self._held)
        except sqlite3.Error as exc:
            self._failed(exc)
            return False
        self.stats.incr_group("store", "rows", len(self._held))
        self._held = []
        self._retry_delay = RETRY_FIRST
        self._retry_at = float("-inf")
        return True

    def _failed(self, exc: sqlite3.Error) -> None:
        busy = is_busy(exc)
        self.stats.incr_group("store", "busy" if busy else "errors")
        now = self._clock()
        self._retry_at = now + self._retry_delay
        self._retry_delay = min(self._retry_delay * 2, RETRY_MAX)
        if self._warnings.ready():
            log.warning(
                "fp-tap: cannot write to %s (%s); holding %d record(s) and retrying",
                self.path,
                "locked by another connection" if busy else reason(exc),
                len(self._held),
            )

    def _bound_held(self) -> None:
        excess = len(self._held) - self.max_held
        if excess > 0:
            del self._held[:excess]
            self.stats.incr_group("store", "lost", excess)
