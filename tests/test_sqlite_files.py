"""fp_core.sqlite_files: private WAL files, migrations, transactions, read-only access."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from fp_core import sqlite_files
from fp_core.sqlite_files import (
    SqliteFileError,
    connect,
    connect_readonly,
    is_busy,
    migrate,
    schema_version,
    transaction,
)

STEPS = (
    ("CREATE TABLE a (x)",),
    ("CREATE TABLE b (y)", "INSERT INTO b VALUES (1)"),
)


def test_connect_creates_a_private_wal_file(tmp_path: Path) -> None:
    path = tmp_path / "f.sqlite3"
    conn = connect(str(path))
    assert path.stat().st_mode & 0o777 == 0o600
    assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    conn.close()


def test_the_wal_file_is_cut_back_after_a_large_transaction(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(sqlite_files, "WAL_SIZE_LIMIT", 1024 * 1024)
    path = tmp_path / "f.sqlite3"
    wal = tmp_path / "f.sqlite3-wal"
    conn = connect(str(path))
    conn.execute("CREATE TABLE t (x)")
    with transaction(conn):  # 8 MB in one go: checkpointed at its commit
        conn.executemany("INSERT INTO t VALUES (?)", [("x" * 4000,) for _ in range(2000)])
    assert wal.stat().st_size > 4 * 1024 * 1024
    with transaction(conn):  # the next one starts the WAL over, cut to the limit
        conn.execute("INSERT INTO t VALUES (1)")
    assert wal.stat().st_size <= 1024 * 1024
    conn.close()


def test_connect_keeps_the_mode_of_an_existing_file(tmp_path: Path) -> None:
    path = tmp_path / "f.sqlite3"
    path.touch(mode=0o640)
    path.chmod(0o640)
    connect(str(path)).close()
    assert path.stat().st_mode & 0o777 == 0o640


def test_migrations_run_once_each_in_order(tmp_path: Path) -> None:
    conn = connect(str(tmp_path / "f.sqlite3"))
    migrate(conn, STEPS[:1], "test file")
    assert schema_version(conn, "f") == 1
    migrate(conn, STEPS, "test file")
    migrate(conn, STEPS, "test file")  # nothing left to do: no second INSERT
    assert schema_version(conn, "f") == 2
    assert conn.execute("SELECT COUNT(*) FROM b").fetchone()[0] == 1
    with pytest.raises(SqliteFileError, match="newer than this fp-tap knows"):
        migrate(conn, STEPS[:1], "test file")
    conn.close()


def test_a_failing_migration_leaves_the_version_where_it_was(tmp_path: Path) -> None:
    conn = connect(str(tmp_path / "f.sqlite3"))
    broken = (("CREATE TABLE a (x)",), ("CREATE TABLE c (z)", "NOT SQL AT ALL"))
    with pytest.raises(SqliteFileError, match="cannot set up"):
        migrate(conn, broken, "test file")
    assert schema_version(conn, "f") == 1
    tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master")}
    assert tables == {"a"}, "the half-done step was rolled back"
    conn.close()


def test_transaction_rolls_back_on_error(tmp_path: Path) -> None:
    conn = connect(str(tmp_path / "f.sqlite3"))
    conn.execute("CREATE TABLE t (x)")

    def insert_then_fail() -> None:
        with transaction(conn):
            conn.execute("INSERT INTO t VALUES (1)")
            raise RuntimeError("boom")

    with pytest.raises(RuntimeError):
        insert_then_fail()
    assert not conn.in_transaction
    assert conn.execute("SELECT COUNT(*) FROM t").fetchone()[0] == 0
    conn.close()


def test_a_commit_that_fails_leaves_no_transaction_open(tmp_path: Path) -> None:
    """In a rollback journal a reader's lock makes COMMIT itself fail: the connection
    must come out of it usable, not stuck inside the transaction."""
    path = str(tmp_path / "f.sqlite3")
    conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    conn.execute("PRAGMA journal_mode = DELETE")
    conn.execute("PRAGMA busy_timeout = 0")
    conn.execute("CREATE TABLE t (x)")
    reader = sqlite3.connect(path, isolation_level=None)
    reader.execute("BEGIN")
    reader.execute("SELECT COUNT(*) FROM t").fetchone()  # holds a shared lock

    def insert() -> None:
        with transaction(conn):
            conn.execute("INSERT INTO t VALUES (1)")

    with pytest.raises(sqlite3.OperationalError, match="locked"):
        insert()
    assert not conn.in_transaction
    reader.execute("COMMIT")
    insert()  # the lock gone, the next transaction goes through
    assert conn.execute("SELECT COUNT(*) FROM t").fetchone()[0] == 1
    reader.close()
    conn.close()


def test_is_busy_tells_a_lock_from_other_errors(tmp_path: Path) -> None:
    path = str(tmp_path / "f.sqlite3")
    conn = connect(path, busy_timeout_ms=1)
    other = sqlite3.connect(path, isolation_level=None)
    other.execute("BEGIN EXCLUSIVE")
    with pytest.raises(sqlite3.OperationalError) as locked:
        conn.execute("BEGIN IMMEDIATE")
    assert is_busy(locked.value)
    other.execute("ROLLBACK")
    with pytest.raises(sqlite3.OperationalError) as syntax:
        conn.execute("NOT SQL")
    assert not is_busy(syntax.value)
    other.close()
    conn.close()


def test_readonly_connections_cannot_write(tmp_path: Path) -> None:
    path = str(tmp_path / "f.sqlite3")
    conn = connect(path)
    conn.execute("CREATE TABLE t (x)")
    reader = connect_readonly(path)
    with pytest.raises(sqlite3.OperationalError, match="readonly"):
        reader.execute("INSERT INTO t VALUES (1)")
    reader.close()
    conn.close()


def test_readonly_of_a_missing_file_or_not_sqlite(tmp_path: Path) -> None:
    with pytest.raises(SqliteFileError, match="no such file"):
        connect_readonly(str(tmp_path / "missing"))
    junk = tmp_path / "junk"
    junk.write_bytes(b"\x00garbage" * 200)
    reader = connect_readonly(str(junk))
    with pytest.raises(SqliteFileError, match="not an SQLite database"):
        schema_version(reader, str(junk))
    reader.close()
