"""SQLite files the tap owns (record store, webhook spool): how they are opened.

Created with mode 0600 (SQLite gives its ``-wal`` and ``-shm`` files the same mode), in
WAL mode so that readers never block the writer, with a schema versioned by ``PRAGMA
user_version`` and a list of migrations, and explicit transactions.
"""

from __future__ import annotations

import os
import sqlite3
import urllib.parse
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, suppress

from fp_core.errors import FpError

#: How long opening waits for a lock held by another connection.
OPEN_BUSY_TIMEOUT_MS = 5000
#: The size the ``-wal`` file is cut back to once checkpointed. Without it, the file
#: keeps the size of the largest stretch ever written between two checkpoints (a batch
#: of large records, a backlog of deletions), for as long as the tap runs.
WAL_SIZE_LIMIT = 16 * 1024 * 1024


class SqliteFileError(FpError):
    """A file cannot be opened, is not what it should be, or has a newer schema."""

    kind = "sqlite"


def create_private(path: str) -> None:
    """Create an empty file with mode 0600 unless it exists."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o600)
    os.close(fd)


def connect(path: str, busy_timeout_ms: int = OPEN_BUSY_TIMEOUT_MS) -> sqlite3.Connection:
    """A read-write connection in WAL mode; the file is created with mode 0600.

    Transactions are explicit (``isolation_level=None``, see :func:`transaction`); the
    connection may move between threads as long as one thread at a time uses it.
    """
    try:
        create_private(path)
        conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    except (OSError, sqlite3.Error) as exc:
        raise SqliteFileError(f"cannot open {path}: {reason(exc)}") from None
    try:
        conn.execute(f"PRAGMA busy_timeout = {int(busy_timeout_ms)}")
        conn.execute("PRAGMA journal_mode = WAL")
        # NORMAL in WAL mode: a committed transaction survives the process being killed;
        # only a power loss can take back the last ones.
        conn.execute("PRAGMA synchronous = NORMAL")
        conn.execute(f"PRAGMA journal_size_limit = {int(WAL_SIZE_LIMIT)}")
    except sqlite3.Error as exc:
        conn.close()
        raise SqliteFileError(f"cannot use {path}: {reason(exc)}") from None
    return conn


def migrate(conn: sqlite3.Connection, migrations: Sequence[Sequence[str]], what: str) -> None:
    """Apply the missing migrations, each in one transaction with its version bump."""
    try:
        version = int(conn.execute("PRAGMA user_version").fetchone()[0])
        if version > len(migrations):
            raise SqliteFileError(
                f"{what} has schema version {version}, newer than this fp-tap knows "
                f"({len(migrations)}): use a newer fp-tap or another file"
            )
        for number in range(version, len(migrations)):
            with transaction(conn):
                for statement in migrations[number]:
                    conn.execute(statement)
                conn.execute(f"PRAGMA user_version = {number + 1}")
    except sqlite3.Error as exc:
        raise SqliteFileError(f"cannot set up {what}: {reason(exc)}") from None


@contextmanager
def transaction(conn: sqlite3.Connection) -> Iterator[None]:
    """``BEGIN IMMEDIATE`` ... ``COMMIT``, rolled back on any exception."""
    conn.execute("BEGIN IMMEDIATE")
    try:
        yield
        # Inside: a COMMIT that fails (locked, disk full) must not leave the transaction
        # open, or every later BEGIN on this connection fails for good.
        conn.execute("COMMIT")
    except BaseException:
        if conn.in_transaction:
            with suppress(sqlite3.Error):  # the first error is the one to report
                conn.execute("ROLLBACK")
        raise


def connect_readonly(path: str) -> sqlite3.Connection:
    """A read-only connection (rows as :class:`sqlite3.Row`) that works while another
    process writes the file."""
    if not os.path.isfile(path):
        raise SqliteFileError(f"{path}: no such file")
    uri = f"file:{urllib.parse.quote(os.path.abspath(path))}?mode=ro"
    try:
        conn = sqlite3.connect(uri, uri=True)
        conn.execute(f"PRAGMA busy_timeout = {OPEN_BUSY_TIMEOUT_MS}")
    except sqlite3.Error as exc:
        raise SqliteFileError(f"cannot read {path}: {reason(exc)}") from None
    conn.row_factory = sqlite3.Row
    return conn


def schema_version(conn: sqlite3.Connection, path: str) -> int:
    """``PRAGMA user_version``; a file that is not SQLite at all is an error."""
    try:
        return int(conn.execute("PRAGMA user_version").fetchone()[0])
    except sqlite3.DatabaseError as exc:
        raise SqliteFileError(f"{path}: not an SQLite database ({reason(exc)})") from None


def is_busy(exc: sqlite3.Error) -> bool:
    """True when the error means another connection holds a lock."""
    code = getattr(exc, "sqlite_errorcode", None)
    # Extended codes (SQLITE_BUSY_SNAPSHOT, ...) keep the primary code in the low byte.
    return code is not None and code & 0xFF in (sqlite3.SQLITE_BUSY, sqlite3.SQLITE_LOCKED)


def reason(exc: BaseException) -> str:
    """A short, human reason for an OS or SQLite error."""
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    return str(exc) or type(exc).__name__
