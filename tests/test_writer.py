"""fp_core.writer: the JSONL sink, private files and the background RecordWriter."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest

from fp_core import writer as writer_module
from fp_core.jsontext import dumps
from fp_core.stats import Stats
from fp_core.writer import BATCH, JsonlSink, RecordWriter, WithoutEvent, open_private

#: How long a test waits for something that should happen at once. Only ever reached
#: when the code under test is broken (a hang), so it bounds the runtime, nothing else.
PATIENCE = 10.0


def record(i: int) -> dict[str, Any]:
    return {"i": i, "request_id": f"1700000000000.{i:06d}", "note": "žluťoučký kůň", "n": None}


def read_jsonl(path: Path) -> list[Any]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


class RecordingSink:
    """Keeps every batch it is given; can be told to block or to fail."""

    def __init__(self, name: str = "recording") -> None:
        self.name = name
        self.batches: list[list[dict[str, Any]]] = []
        self.closed = threading.Event()
        self.close_calls = 0

    @property
    def records(self) -> list[dict[str, Any]]:
        return [r for batch in self.batches for r in batch]

    def write(self, records: Sequence[dict[str, Any]]) -> None:
        self.batches.append(list(records))

    def close(self) -> None:
        self.close_calls += 1
        self.closed.set()


class BlockingSink(RecordingSink):
    """write() waits until released: the writer thread is stuck inside it."""

    def __init__(self) -> None:
        super().__init__("blocking")
        self.entered = threading.Event()
        self.release = threading.Event()

    def write(self, records: Sequence[dict[str, Any]]) -> None:
        self.entered.set()
        assert self.release.wait(PATIENCE), "the test never released the sink"
        super().write(records)


class FailingSink(RecordingSink):
    def __init__(self) -> None:
        super().__init__("failing")

    def write(self, records: Sequence[dict[str, Any]]) -> None:
        raise OSError("disk full")

    def close(self) -> None:
        super().close()
        raise OSError("cannot close either")


# -- dumps ------------------------------------------------------------------------------


def test_dumps_is_compact_and_keeps_non_ascii() -> None:
    rec = {"a": "žluťoučký", "b": [1, 2, {"c": None}], "d": True, "e": "日本"}
    text = dumps(rec)
    assert text == '{"a":"žluťoučký","b":[1,2,{"c":null}],"d":true,"e":"日本"}'
    assert json.loads(text) == rec


def test_dumps_escapes_newlines_so_one_record_is_one_line() -> None:
    text = dumps({"a": "line1\nline2\r\n"})
    assert "\n" not in text
    assert "\r" not in text
    assert json.loads(text) == {"a": "line1\nline2\r\n"}


# -- open_private and JsonlSink ---------------------------------------------------------


def test_open_private_creates_mode_0600(tmp_path: Path) -> None:
    path = tmp_path / "new.jsonl"
    with open_private(str(path)) as handle:
        handle.write("x\n")
    assert path.stat().st_mode & 0o777 == 0o600


def test_open_private_write_mode_truncates_and_makes_the_file_private(tmp_path: Path) -> None:
    path = tmp_path / "export.jsonl"
    path.write_text("old content that must go\n", encoding="utf-8")
    path.chmod(0o644)
    with open_private(str(path), "w") as handle:
        handle.write("new\n")
    assert path.read_text(encoding="utf-8") == "new\n"
    assert path.stat().st_mode & 0o777 == 0o600


def test_open_private_append_mode_keeps_an_existing_files_mode(tmp_path: Path) -> None:
    path = tmp_path / "records.jsonl"
    path.write_text("", encoding="utf-8")
    path.chmod(0o640)  # e.g. for a log shipper's group
    with open_private(str(path)) as handle:
        handle.write("x\n")
    assert path.stat().st_mode & 0o777 == 0o640


def test_jsonl_sink_writes_one_line_per_record_mode_0600(tmp_path: Path) -> None:
    path = tmp_path / "records.jsonl"
    sink = JsonlSink(str(path))
    records = [record(i) for i in range(5)]
    sink.write(records[:2])
    sink.write(records[2:])
    sink.close()
    assert path.stat().st_mode & 0o777 == 0o600
    assert read_jsonl(path) == records
    lines = path.read_text(encoding="utf-8").split("\n")
    assert lines[-1] == "", "the file ends with a newline"
    assert lines[:-1] == [dumps(r) for r in records]


def test_jsonl_sink_flushes_each_batch(tmp_path: Path) -> None:
    # Readers (tail -f, another process) see a batch as soon as write() returns.
    path = tmp_path / "records.jsonl"
    sink = JsonlSink(str(path))
    sink.write([record(1)])
    assert read_jsonl(path) == [record(1)]
    sink.close()


def test_jsonl_sink_appends_to_an_existing_file(tmp_path: Path) -> None:
    path = tmp_path / "records.jsonl"
    path.write_text('{"earlier":"run"}\n', encoding="utf-8")
    path.chmod(0o640)
    sink = JsonlSink(str(path))
    sink.write([record(1)])
    sink.close()
    assert read_jsonl(path) == [{"earlier": "run"}, record(1)]
    # The mode is only chosen for a file this code creates.
    assert path.stat().st_mode & 0o777 == 0o640


def test_jsonl_sink_follows_a_rotation(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """Moved away (logrotate's create mode), then removed: each time the next batch
    starts a new file at the path, and the old file keeps what it had."""
    caplog.set_level(logging.INFO)
    path, rotated = tmp_path / "records.jsonl", tmp_path / "records.jsonl.1"
    sink = JsonlSink(str(path))
    sink.write([record(1)])
    path.rename(rotated)
    sink.write([record(2), record(3)])
    sink.write([record(4)])
    assert read_jsonl(rotated) == [record(1)]
    assert read_jsonl(path) == [record(2), record(3), record(4)]
    assert path.stat().st_mode & 0o777 == 0o600
    path.unlink()
    sink.write([record(5)])
    sink.close()
    assert read_jsonl(path) == [record(5)]
    moved = [r for r in caplog.records if "was moved or removed" in r.getMessage()]
    assert [r.getMessage() for r in moved] == [
        f"fp-tap: {path} was moved or removed; records go to a new file there"
    ] * 2


def test_jsonl_sink_appends_to_a_file_rotation_made(tmp_path: Path) -> None:
    path = tmp_path / "records.jsonl"
    sink = JsonlSink(str(path))
    sink.write([record(1)])
    path.rename(tmp_path / "old.jsonl")
    path.write_text("")  # logrotate's create: an empty file with its own mode
    path.chmod(0o640)
    sink.write([record(2)])
    sink.close()
    assert read_jsonl(path) == [record(2)]
    assert path.stat().st_mode & 0o777 == 0o640


def test_jsonl_sink_loses_nothing_when_no_new_file_can_be_made(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    path, rotated = tmp_path / "records.jsonl", tmp_path / "records.jsonl.1"
    sink = JsonlSink(str(path))
    sink.write([record(1)])
    path.rename(rotated)

    def refused(name: str, mode: str = "a") -> None:
        raise PermissionError(13, "Permission denied", name)

    with monkeypatch.context() as patch:
        patch.setattr(writer_module, "open_private", refused)  # as in a read-only folder
        sink.write([record(2)])
        sink.write([record(3)])
    sink.write([record(4)])
    sink.close()
    assert read_jsonl(rotated) == [record(1), record(2), record(3)]
    assert read_jsonl(path) == [record(4)]
    warnings = [r.getMessage() for r in caplog.records if "cannot be made again" in r.getMessage()]
    assert warnings == [
        f"fp-tap: {path} was moved or removed and cannot be made again (Permission denied); "
        "writing on to the file it was"
    ]


def test_jsonl_sink_to_stdout(capsys: pytest.CaptureFixture[str]) -> None:
    sink = JsonlSink("-")
    sink.write([record(1), record(2)])
    sink.close()
    print("stdout still open")  # close() must not close the process's stdout
    out = capsys.readouterr().out.splitlines()
    assert [json.loads(line) for line in out[:2]] == [record(1), record(2)]
    assert out[2] == "stdout still open"


# -- RecordWriter -----------------------------------------------------------------------


def test_records_are_all_written_and_read_back_equal(tmp_path: Path) -> None:
    path = tmp_path / "records.jsonl"
    stats = Stats()
    writer = RecordWriter([JsonlSink(str(path))], stats)
    writer.start()
    records = [record(i) for i in range(1000)]
    for rec in records:
        assert writer.submit(rec) is True
    assert writer.close() is True
    assert read_jsonl(path) == records
    assert stats.group("written") == {"jsonl": 1000}
    assert stats.get("dropped") == 0
    assert writer.pending() == 0


def test_many_records_go_out_in_batches() -> None:
    sink = RecordingSink()
    writer = RecordWriter([sink], Stats())
    n = 3 * BATCH + 10
    records = [record(i) for i in range(n)]
    # Queued before the thread starts, so the batch sizes are deterministic.
    for rec in records:
        writer.submit(rec)
    assert writer.pending() == n
    writer.start()
    assert writer.close() is True
    assert [len(b) for b in sink.batches] == [BATCH, BATCH, BATCH, 10]
    assert sink.records == records


def test_close_closes_every_sink_once() -> None:
    first, second = RecordingSink("first"), RecordingSink("second")
    writer = RecordWriter([first, second], Stats())
    writer.start()
    writer.submit(record(1))
    assert writer.close() is True
    assert (first.close_calls, second.close_calls) == (1, 1)
    assert first.records == second.records == [record(1)]


def test_close_without_records() -> None:
    sink = RecordingSink()
    writer = RecordWriter([sink], Stats())
    writer.start()
    assert writer.close() is True
    assert sink.batches == []
    assert sink.close_calls == 1


def test_close_of_a_writer_never_started_closes_the_sinks() -> None:
    sink = RecordingSink()
    writer = RecordWriter([sink], Stats())
    assert writer.close() is True
    assert sink.close_calls == 1


def test_submit_never_blocks_and_counts_drops(caplog: pytest.LogCaptureFixture) -> None:
    sink = BlockingSink()
    stats = Stats()
    writer = RecordWriter([sink], stats, max_queue=2)
    writer.start()
    assert writer.submit(record(0)) is True
    # The thread has taken record 0 and is stuck in write(): the queue is empty.
    assert sink.entered.wait(PATIENCE)
    results: list[bool] = []

    def submit_more() -> None:
        results.extend(writer.submit(record(i)) for i in range(1, 6))

    # Submitted from another thread so that a blocking submit() fails the test rather
    # than hanging it.
    submitter = threading.Thread(target=submit_more)
    with caplog.at_level(logging.WARNING, logger="fp_core.writer"):
        submitter.start()
        submitter.join(PATIENCE)
        assert not submitter.is_alive(), "submit() blocked on a full queue"
    assert results == [True, True, False, False, False]
    assert stats.get("dropped") == 3
    assert writer.pending() == 2
    # One warning for the burst, not one per dropped record.
    warnings = [r for r in caplog.records if "queue full" in r.getMessage()]
    assert len(warnings) == 1
    sink.release.set()
    assert writer.close() is True
    assert sink.records == [record(0), record(1), record(2)]
    assert stats.group("written") == {"blocking": 3}


def test_a_failing_sink_is_counted_and_does_not_stop_the_others(
    caplog: pytest.LogCaptureFixture,
) -> None:
    failing, good = FailingSink(), RecordingSink("good")
    stats = Stats()
    writer = RecordWriter([failing, good], stats)
    records = [record(i) for i in range(10)]
    for rec in records:
        writer.submit(rec)
    with caplog.at_level(logging.WARNING, logger="fp_core.writer"):
        writer.start()
        assert writer.close() is True
    assert good.records == records
    assert stats.group("sink_errors") == {"failing": 10}
    assert stats.group("written") == {"good": 10}
    # The failing sink's close() raised too; the good one was still closed.
    assert failing.close_calls == 1
    assert good.close_calls == 1
    messages = " ".join(r.getMessage() for r in caplog.records)
    assert "failing sink failed to write 10 records" in messages
    assert "closing the failing sink failed" in messages


def test_close_with_a_stuck_sink_gives_up_after_its_timeout() -> None:
    sink = BlockingSink()
    writer = RecordWriter([sink], Stats())
    writer.start()
    writer.submit(record(0))
    assert sink.entered.wait(PATIENCE)
    writer.submit(record(1))
    try:
        assert writer.close(timeout=0.5) is False
        assert writer.pending() >= 1, "record 1 (and the stop marker) are still queued"
        assert sink.close_calls == 0, "sinks are not closed under a thread still using them"
    finally:
        sink.release.set()
    # Released, the thread finishes what was queued, stops, and closes the sink.
    assert sink.closed.wait(PATIENCE)
    assert sink.records == [record(0), record(1)]


def test_close_of_a_writer_never_started_does_not_claim_queued_records_drained() -> None:
    sink = RecordingSink()
    writer = RecordWriter([sink], Stats())
    writer.submit(record(1))
    drained = writer.close(timeout=0.5)
    # Either the records reach the sink, or close() reports they could not.
    assert sink.records == [record(1)] or drained is False


def test_records_with_non_ascii_round_trip_through_the_file(tmp_path: Path) -> None:
    path = tmp_path / "records.jsonl"
    writer = RecordWriter([JsonlSink(str(path))], Stats())
    writer.start()
    rec = {"url": "https://příklad.cz/košík", "emoji": "🙂", "nested": {"x": [1.5, None]}}
    writer.submit(rec)
    assert writer.close() is True
    raw = path.read_bytes()
    assert "košík".encode() in raw, "non-ASCII is written as UTF-8, not \\u escapes"
    assert read_jsonl(path) == [rec]
    assert os.stat(path).st_mode & 0o777 == 0o600


def test_submit_after_close_is_refused_and_counted() -> None:
    stats = Stats()
    sink = RecordingSink()
    writer = RecordWriter([sink], stats)
    writer.start()
    assert writer.close() is True
    assert writer.submit(record(1)) is False
    assert stats.get("dropped") == 1
    assert sink.records == []


def test_close_after_a_timeout_still_finishes_in_the_background() -> None:
    """A writer that missed its close deadline keeps writing, then closes its sinks."""
    release = threading.Event()

    class SlowSink(RecordingSink):
        def write(self, records: Sequence[dict[str, Any]]) -> None:
            release.wait(10)
            super().write(records)

    sink = SlowSink()
    writer = RecordWriter([sink], Stats())
    writer.start()
    for i in range(3):
        writer.submit(record(i))
    assert writer.close(timeout=0.2) is False
    release.set()
    writer._thread.join(10)
    assert [r["i"] for r in sink.records] == [0, 1, 2]
    assert sink.close_calls == 1


# -- sinks that hold records back, and WithoutEvent -------------------------------------


class HoldingSink(RecordingSink):
    """Keeps records back until told to let them through, like a locked SQLite store."""

    def __init__(self) -> None:
        super().__init__("holding")
        self.held: list[dict[str, Any]] = []
        self.open = threading.Event()
        self.retried = threading.Event()

    def write(self, records: Sequence[dict[str, Any]]) -> None:
        self.held.extend(records)
        self.retry_held()

    def retry_held(self) -> None:
        self.retried.set()
        if self.open.is_set() and self.held:
            super().write(self.held)
            self.held = []


def test_an_idle_writer_gives_held_records_another_chance() -> None:
    sink = HoldingSink()
    writer = RecordWriter([sink], Stats())
    writer.start()
    writer.submit(record(1))
    deadline = time.monotonic() + PATIENCE
    while not sink.held and time.monotonic() < deadline:
        time.sleep(0.01)
    assert sink.held == [record(1)]
    sink.retried.clear()
    sink.open.set()
    # No new record: only the idle tick can call retry_held now.
    assert sink.retried.wait(PATIENCE)
    assert writer.close() is True
    assert sink.records == [record(1)]


def test_without_event_strips_the_event_and_keeps_the_rest() -> None:
    inner = HoldingSink()
    inner.open.set()
    sink = WithoutEvent(inner)
    assert sink.name == "holding"
    with_event = {**record(1), "event": {"event_id": "x"}}
    sink.write([with_event, record(2)])
    assert inner.records == [record(1), record(2)]
    assert "event" in with_event, "the caller's record is not changed"
    inner.retried.clear()
    sink.retry_held()
    assert inner.retried.is_set()
    sink.close()
    assert inner.close_calls == 1


def test_a_lone_surrogate_does_not_cost_its_batch_the_jsonl_line(tmp_path: Path) -> None:
    path = tmp_path / "records.jsonl"
    sink = JsonlSink(str(path))
    sink.write([{"request_id": "a\ud800"}, {"request_id": "b"}])  # one batch
    sink.close()
    lines = path.read_text(encoding="utf-8").splitlines()
    assert [json.loads(line)["request_id"] for line in lines] == ["a\ud800", "b"]


def test_open_private_rewrites_a_file_it_may_not_chmod(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Another user's file, writable by this one: only its owner may chmod it. It is
    written all the same, in the mode its owner gave it (and nothing is lost first)."""
    path = tmp_path / "shared.jsonl"
    path.write_text("old content\n", encoding="utf-8")
    path.chmod(0o666)

    def not_the_owner(fd: int, mode: int) -> None:
        raise PermissionError(1, "Operation not permitted")

    monkeypatch.setattr(os, "fchmod", not_the_owner)
    with open_private(str(path), "w") as handle:
        handle.write("new\n")
    assert path.read_text(encoding="utf-8") == "new\n"
    assert path.stat().st_mode & 0o777 == 0o666


def readable_lines(path: Path) -> tuple[list[Any], int]:
    """The JSON lines of ``path``, and how many lines are not JSON."""
    good: list[Any] = []
    bad = 0
    for line in path.read_bytes().split(b"\n")[:-1]:
        try:
            good.append(json.loads(line))
        except ValueError:
            bad += 1
    return good, bad


def test_a_file_ending_in_half_a_line_gets_the_next_record_on_a_line_of_its_own(
    tmp_path: Path,
) -> None:
    """What a tap killed mid-batch leaves: the next tap's first record was glued to the
    half line, and lost to every JSONL reader with it."""
    path = tmp_path / "records.jsonl"
    path.write_text('{"earlier":"run"}\n{"request_id":"half","ok":tr', encoding="utf-8")
    sink = JsonlSink(str(path))
    sink.write([record(1)])
    sink.write([record(2)])
    sink.close()
    assert readable_lines(path) == ([{"earlier": "run"}, record(1), record(2)], 1)
    whole = tmp_path / "whole.jsonl"
    whole.write_text('{"earlier":"run"}\n', encoding="utf-8")
    sink = JsonlSink(str(whole))
    sink.write([record(1)])
    sink.close()
    assert whole.read_bytes().count(b"\n") == 2  # no blank line where nothing was torn


@pytest.mark.parametrize("whole", [0, 1])
def test_a_write_that_fails_part_way_leaves_only_its_own_half_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, whole: int
) -> None:
    """A full disk: the kernel writes what fits, then refuses. The records written whole
    count as written, the rest as failed; nothing of them may come out later (from a
    buffer), and the first batch once there is room again starts on a line of its own."""
    path = tmp_path / "records.jsonl"
    sink = JsonlSink(str(path))
    sink.write([record(1)])
    real_write = os.write
    fits = whole * len(dumps(record(2)) + "\n") + 10
    calls: list[int] = []

    def full_disk(fd: int, data: Any) -> int:
        calls.append(len(data))
        if len(calls) == 1:
            return real_write(fd, bytes(data[:fits]))
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "write", full_disk)
    with pytest.raises(writer_module.PartialWrite, match="No space") as failed:
        sink.write([record(2), record(3)])
    assert failed.value.written == whole
    monkeypatch.setattr(os, "write", real_write)
    sink.write([record(4)])
    sink.close()
    assert readable_lines(path) == ([record(1), *[record(2)] * whole, record(4)], 1)


def test_the_writer_counts_the_records_a_failed_write_got_out(tmp_path: Path) -> None:
    class HalfDone(RecordingSink):
        def write(self, records: Sequence[dict[str, Any]]) -> None:
            raise writer_module.PartialWrite(1, OSError(28, "No space left on device"))

    stats = Stats()
    writer = RecordWriter([HalfDone()], stats)
    for i in range(3):
        writer.submit(record(i))
    assert writer.close(PATIENCE)
    assert (stats.group("written"), stats.group("sink_errors")) == (
        {"recording": 1},
        {"recording": 2},
    )


@pytest.mark.skipif(sys.platform != "linux", reason="a short write at RLIMIT_FSIZE, as Linux does")
def test_records_written_after_a_real_full_disk_stay_readable(tmp_path: Path) -> None:
    """The same with the kernel's own short write: RLIMIT_FSIZE in a child process (with
    SIGXFSZ ignored, a write past it fails as on a full disk) through the real writer."""
    path = tmp_path / "events.jsonl"
    script = textwrap.dedent(
        """
        import json, os, resource, signal, sys, time
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        from fp_core.stats import Stats
        from fp_core.writer import JsonlSink, RecordWriter

        stats = Stats()
        writer = RecordWriter([JsonlSink(sys.argv[1])], stats)
        writer.start()

        def wait_for(done):
            deadline = time.monotonic() + 20
            while not done():
                assert time.monotonic() < deadline, "timed out"
                time.sleep(0.01)

        def rec(i, pad):
            return {"request_id": f"r{i}", "ok": True, "pad": pad * 1000}

        for i in range(3):
            writer.submit(rec(i, "a"))
        wait_for(lambda: stats.group("written").get("jsonl", 0) == 3)
        soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
        resource.setrlimit(resource.RLIMIT_FSIZE, (os.path.getsize(sys.argv[1]) + 2500, hard))
        for i in range(3, 23):
            writer.submit(rec(i, "b"))
        wait_for(lambda: stats.group("sink_errors").get("jsonl", 0) > 0)
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        for i in range(100, 103):
            writer.submit(rec(i, "c"))
        assert writer.close(20)
        print(json.dumps(stats.group("written")))
        """
    )
    root = Path(__file__).resolve().parent.parent
    done = subprocess.run(
        [sys.executable, "-c", script, str(path)],
        cwd=root,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    written = json.loads(done.stdout.splitlines()[-1])["jsonl"]
    ids = [r["request_id"] for r in readable_lines(path)[0]]
    assert ids[:3] == ["r0", "r1", "r2"]
    assert ids[-3:] == ["r100", "r101", "r102"]
    assert len(ids) == written  # every record counted as written is readable, no other


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs /dev/full (Linux)")
def test_a_sink_failing_every_batch_is_warned_about_once_per_period(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A full disk fails every batch: one WARNING each, up to 20 lines a second, where
    every other repeated failure warns once per 10 s (found by a long-running hunt)."""
    caplog.set_level(logging.WARNING, logger="fp_core.writer")
    stats = Stats()
    writer = RecordWriter([JsonlSink("/dev/full")], stats)  # every write: ENOSPC
    writer.start()
    try:
        for n in range(1, 11):
            writer.submit(record(n))
            deadline = time.monotonic() + PATIENCE
            while stats.group("sink_errors").get("jsonl") != n:
                assert time.monotonic() < deadline, f"batch {n} to fail"
                time.sleep(0.01)
    finally:
        writer.close()
    warnings = [r.getMessage() for r in caplog.records if "jsonl sink failed" in r.getMessage()]
    assert len(warnings) == 1
    assert "(1 so far)" in warnings[0]
