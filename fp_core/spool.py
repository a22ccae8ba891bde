"""The webhook spool: every event to forward, on disk, until the receiver takes it.

An SQLite file in the state directory (``webhook-spool.sqlite3``, mode 0600, in a 0700
directory). A row is added in the writer thread's transaction, so once a record has
been written anywhere its event is in the spool; it is deleted only when the receiver
answered 2xx. A row whose delivery keeps failing past the give-up age is *parked*:
kept, counted, and sent again by :meth:`Spool.resend` (the ``fp.resend`` command), until
:meth:`Spool.discard` (``fp.discard``) or :meth:`Spool.expire` (``fp_webhook_keep_parked``)
deletes it.

One tap owns a spool at a time (an exclusive ``flock`` on ``webhook-spool.lock``): the
owner knows which rows it is sending, and a second tap on the same directory is told
so at start instead of sending everything twice.
"""

from __future__ import annotations

import json
import logging
import os
import sqlite3
import stat
import sys
import threading
import time
from collections.abc import Callable, Collection, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field

from fp_core.sqlite_files import SqliteFileError, connect, migrate, reason, transaction
from fp_core.webhook import Outgoing

log = logging.getLogger(__name__)

SPOOL_FILE = "webhook-spool.sqlite3"
LOCK_FILE = "webhook-spool.lock"
#: Seconds to wait for the lock: a tap that was just stopped (or killed: its worker
#: process then closes the spool itself) may still be letting go of it.
LOCK_WAIT = 5.0
#: How long SQLite waits for another connection's lock once the spool is open: the
#: writer holds events it cannot spool (fp_core.webhook.HeldEvents), and delivery
#: tries again at its next turn.
BUSY_TIMEOUT_MS = 250
#: Parked rows that fp.resend and fp.discard take per transaction.
STEP = 1_000

MIGRATIONS: tuple[tuple[str, ...], ...] = (
    (
        """
        CREATE TABLE events (
            id INTEGER PRIMARY KEY,
            request_id TEXT NOT NULL,
            body BLOB NOT NULL,          -- the exact bytes to POST
            headers TEXT NOT NULL,       -- JSON object of extra headers (verdict, checks)
            created REAL NOT NULL,       -- epoch seconds when spooled
            window_start REAL NOT NULL,  -- start of the give-up clock: created, or resend
            attempts INTEGER NOT NULL DEFAULT 0,
            next_attempt REAL NOT NULL,  -- epoch seconds
            parked INTEGER NOT NULL DEFAULT 0,
            last_error TEXT
        )
        """,
        "CREATE INDEX events_due ON events (parked, next_attempt)",
    ),
    (
        # When a row was parked (epoch seconds), for fp_webhook_keep_parked. Rows parked
        # by an earlier version get the time of this upgrade: a full keep from then on.
        "ALTER TABLE events ADD COLUMN parked_at REAL",
        "UPDATE events SET parked_at = (julianday('now') - 2440587.5) * 86400.0 WHERE parked = 1",
        # Only parked rows: spooling a new event does not touch it.
        "CREATE INDEX events_parked ON events (parked_at) WHERE parked = 1",
    ),
)


@dataclass(frozen=True, slots=True)
class Spooled:
    """A spooled event, as the delivery threads send it."""

    id: int
    request_id: str
    body: bytes
    headers: dict[str, str]
    attempts: int
    window_start: float


@dataclass
class Outcomes:
    """What became of a round of attempts, written back in one transaction."""

    delivered: list[int] = field(default_factory=list)
    #: (row id, next attempt at, error)
    retry: list[tuple[int, float, str]] = field(default_factory=list)
    #: (row id, error)
    park: list[tuple[int, str]] = field(default_factory=list)


def private_dir(path: str) -> bool:
    """Create ``path`` (and parents) with mode 0700 unless it exists.

    True when an existing directory is open to group or others (worth a warning: it
    holds undelivered events).
    """
    if not os.path.isdir(path):
        os.makedirs(path, mode=0o700, exist_ok=True)
        os.chmod(path, 0o700)  # makedirs applies the umask
        return False
    return bool(os.stat(path).st_mode & (stat.S_IRWXG | stat.S_IRWXO))


class Spool:
    """The spool file of one state directory; every method is thread-safe and quick."""

    def __init__(
        self,
        state_dir: str,
        *,
        clock: Callable[[], float] = time.time,
        lock_wait: float = LOCK_WAIT,
    ) -> None:
        self.state_dir = state_dir
        self.path = os.path.join(state_dir, SPOOL_FILE)
        self._clock = clock
        self._lock = threading.Lock()
        try:
            if private_dir(state_dir):
                log.warning(
                    "fp-tap: state directory %s is accessible by group or others; chmod 700 it",
                    state_dir,
                )
        except OSError as exc:
            raise SqliteFileError(f"cannot create {state_dir}: {reason(exc)}") from None
        self._owner = _own(os.path.join(state_dir, LOCK_FILE), lock_wait)
        try:
            self._conn = connect(self.path)
            migrate(self._conn, MIGRATIONS, f"webhook spool {self.path}")
            # A new owner sends what an earlier run left at once: the backoff it had
            # chosen belonged to a receiver state that may be long over.
            with self._sqlite(), transaction(self._conn):
                self._conn.execute(
                    "UPDATE events SET next_attempt = ? WHERE parked = 0", (self._clock(),)
                )
            with self._sqlite():
                self._pending, self._parked = self._count()
                # Taken (above, a tap just stopped may still have it a moment): from now
                # on a lock held by another connection fails fast, as the store's does,
                # rather than stall the writer thread, which feeds the other sinks too.
                self._conn.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
        except BaseException:
            self.close()
            raise

    @property
    def pending(self) -> int:
        """Events waiting to be delivered (including those being sent right now)."""
        return self._pending

    @property
    def parked(self) -> int:
        """Events given up on, kept for :meth:`resend`."""
        return self._parked

    def add(self, items: Sequence[Outgoing], max_events: int | None = None) -> int:
        """Spool events (one transaction), due at once; how many were taken. With
        ``max_events``, the spool (pending and parked) holds no more than that: the
        first items fill what room there is, the rest are refused."""
        with self._lock, self._sqlite():
            if max_events is not None:
                items = items[: max(max_events - self._pending - self._parked, 0)]
            if not items:
                return 0
            now = self._clock()
            rows = [(i.request_id, i.body, json.dumps(i.headers), now, now, now) for i in items]
            with transaction(self._conn):
                self._conn.executemany(
                    "INSERT INTO events (request_id, body, headers, created, window_start, "
                    "next_attempt) VALUES (?, ?, ?, ?, ?, ?)",
                    rows,
                )
            self._pending += len(rows)
            return len(rows)

    def due(self, now: float, limit: int, exclude: Collection[int] = ()) -> list[Spooled]:
        """Up to ``limit`` pending events due by ``now``, oldest due first, skipping the
        ids in ``exclude`` (those being sent)."""
        if limit <= 0:
            return []
        with self._lock, self._sqlite():
            rows = self._conn.execute(
                "SELECT id, request_id, body, headers, attempts, window_start FROM events "
                "WHERE parked = 0 AND next_attempt <= ? ORDER BY next_attempt, id LIMIT ?",
                (now, limit + len(exclude)),
            ).fetchall()
        out = [
            Spooled(row[0], row[1], bytes(row[2]), json.loads(row[3]), row[4], row[5])
            for row in rows
            if row[0] not in exclude
        ]
        return out[:limit]

    def pull_in(self, when: float) -> int:
        """Make every pending event due later than ``when`` due at ``when``; how many."""
        with self._lock, self._sqlite(), transaction(self._conn):
            return self._conn.execute(
                "UPDATE events SET next_attempt = ? WHERE parked = 0 AND next_attempt > ?",
                (when, when),
            ).rowcount

    def next_due_after(self, now: float) -> float | None:
        """When the next pending event not yet due becomes due (None: there is none)."""
        with self._lock, self._sqlite():
            row = self._conn.execute(
                "SELECT MIN(next_attempt) FROM events WHERE parked = 0 AND next_attempt > ?",
                (now,),
            ).fetchone()
        return None if row[0] is None else float(row[0])

    def settle(self, outcomes: Outcomes) -> None:
        """Record a round of attempts: delete the delivered, reschedule or park the rest."""
        now = self._clock()
        with self._lock, self._sqlite():
            with transaction(self._conn):
                delivered = self._conn.executemany(
                    "DELETE FROM events WHERE id = ?", [(i,) for i in outcomes.delivered]
                ).rowcount
                self._conn.executemany(
                    "UPDATE events SET attempts = attempts + 1, next_attempt = ?, last_error = ? "
                    "WHERE id = ?",
                    [(when, error, i) for i, when, error in outcomes.retry],
                )
                parked = self._conn.executemany(
                    "UPDATE events SET attempts = attempts + 1, parked = 1, parked_at = ?, "
                    "last_error = ? WHERE id = ? AND parked = 0",
                    [(now, error, i) for i, error in outcomes.park],
                ).rowcount
            self._pending -= max(delivered, 0) + max(parked, 0)
            self._parked += max(parked, 0)

    def resend(self) -> int:
        """Make every parked event pending again, due now, with a fresh give-up clock."""
        now = self._clock()
        return self._in_steps(
            "UPDATE events SET parked = 0, parked_at = NULL, attempts = 0, next_attempt = ?, "
            "window_start = ? WHERE id IN (SELECT id FROM events WHERE parked = 1 LIMIT ?)",
            (now, now),
            pending=1,
        )

    def discard(self) -> int:
        """Delete every parked event; how many."""
        return self._in_steps(
            "DELETE FROM events WHERE id IN (SELECT id FROM events WHERE parked = 1 LIMIT ?)",
            (),
            pending=0,
        )

    def _in_steps(self, statement: str, values: tuple[float, ...], *, pending: int) -> int:
        """Run ``statement`` on parked rows, :data:`STEP` at a time, each in its own
        transaction with the lock let go in between: a million parked events must not
        keep the writer and delivery out for seconds. Each row taken stops being parked
        (and is ``pending`` or gone); how many rows in all."""
        total = 0
        while True:
            with self._lock, self._sqlite():
                with transaction(self._conn):
                    count = self._conn.execute(statement, (*values, STEP)).rowcount
                self._parked -= count
                self._pending += count * pending
            total += count
            if count < STEP:
                return total

    def expire(self, before: float, limit: int) -> int:
        """Delete up to ``limit`` events parked before ``before`` (epoch seconds), the
        oldest first; how many. A short transaction: delivery settles between calls."""
        with self._lock, self._sqlite():
            with transaction(self._conn):
                count = self._conn.execute(
                    "DELETE FROM events WHERE id IN (SELECT id FROM events "
                    "WHERE parked = 1 AND parked_at < ? ORDER BY parked_at, id LIMIT ?)",
                    (before, limit),
                ).rowcount
            self._parked -= count
        return count

    def close(self) -> None:
        """Close the file and let another tap own the directory."""
        with self._lock:
            conn = getattr(self, "_conn", None)
            if conn is not None:
                conn.close()
            if self._owner >= 0:
                os.close(self._owner)
                self._owner = -1

    @contextmanager
    def _sqlite(self) -> Iterator[None]:
        """SQLite's errors (a lock held by another connection, a full disk) as
        :class:`SqliteFileError`, which callers without sqlite3 can catch (an FpError)."""
        try:
            yield
        except sqlite3.Error as exc:
            raise SqliteFileError(f"webhook spool {self.path}: {reason(exc)}") from None

    def _count(self) -> tuple[int, int]:
        pending, parked = self._conn.execute(
            "SELECT COALESCE(SUM(parked = 0), 0), COALESCE(SUM(parked = 1), 0) FROM events"
        ).fetchone()
        return int(pending), int(parked)


def _own(lock_path: str, wait: float) -> int:
    """Take the directory's lock (released when the returned fd is closed, or the
    process dies), waiting up to ``wait`` seconds for it; an error naming the holder
    when another process keeps it."""
    try:
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o600)
    except OSError as exc:
        raise SqliteFileError(f"cannot create {lock_path}: {reason(exc)}") from None
    if sys.platform != "win32":  # no flock there; one tap per state dir is then on you
        import fcntl

        deadline = time.monotonic() + wait
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except OSError:
                if time.monotonic() < deadline:
                    time.sleep(0.05)
                    continue
            holder = os.read(fd, 32).decode("ascii", "replace").strip() or "?"
            os.close(fd)
            raise SqliteFileError(
                f"{os.path.dirname(lock_path)} is in use by another fp-tap (pid {holder}); "
                "give each tap its own fp_state_dir"
            ) from None
    os.ftruncate(fd, 0)
    os.write(fd, f"{os.getpid()}\n".encode())
    return fd
