"""The background writer: records leave the proxy thread through a bounded queue.

The proxy's hooks call :meth:`RecordWriter.submit`, which never blocks: when the queue
is full the record is dropped and counted. One thread drains the queue in batches and
hands each batch to every sink (webhook spool, SQLite store, JSONL file), in the order
given. A sink that fails is logged and counted; the others keep going. A sink that
holds records back (the SQLite store while another process locks its file) is given a
chance to retry them whenever the queue is idle.
"""

from __future__ import annotations

import contextlib
import logging
import os
import queue
import stat
import sys
import threading
from collections.abc import Sequence
from typing import IO, Any, Protocol, runtime_checkable

from fp_core.jsontext import dumps
from fp_core.stats import Stats
from fp_core.throttle import Throttle

log = logging.getLogger(__name__)

BATCH = 256
#: Seconds the writer lingers after a first record, gathering more into its batch.
LINGER = 0.05


class Sink(Protocol):
    """Where records end up. Called only from the writer thread."""

    name: str

    def write(self, records: Sequence[dict[str, Any]]) -> None: ...

    def close(self) -> None: ...


@runtime_checkable
class HoldsRecords(Protocol):
    """A sink that may keep records back and write them later (never drop them)."""

    def retry_held(self) -> None: ...


class WithoutEvent:
    """A sink seen through a filter that removes each record's ``event``.

    For ``fp_include_event=false`` while the webhook, whose body is the event, still
    needs the records to carry it: files get the records without it.
    """

    def __init__(self, sink: Sink) -> None:
        self.sink = sink
        self.name = sink.name

    def write(self, records: Sequence[dict[str, Any]]) -> None:
        self.sink.write([{k: v for k, v in r.items() if k != "event"} for r in records])

    def retry_held(self) -> None:
        if isinstance(self.sink, HoldsRecords):
            self.sink.retry_held()

    def close(self) -> None:
        self.sink.close()


def open_private(path: str, mode: str = "a") -> IO[str]:
    """Open for appending (``"a"``) or writing (``"w"``) text. A file created here gets
    mode 0600; so does an existing regular file of this user's opened to be rewritten:
    what it held is gone, and what it is given is private (an appended file keeps the
    mode its owner chose, e.g. for a log shipper's group)."""
    flags = os.O_WRONLY | os.O_CREAT | (os.O_APPEND if mode == "a" else 0)
    fd = os.open(path, flags, 0o600)
    try:
        if mode == "w" and stat.S_ISREG(os.fstat(fd).st_mode):
            # Made private before anything is written; a file of another user's (only
            # its owner may chmod it) keeps the mode they gave it.
            with contextlib.suppress(PermissionError):
                os.fchmod(fd, 0o600)
            os.ftruncate(fd, 0)
        return os.fdopen(fd, mode, encoding="utf-8")
    except BaseException:
        os.close(fd)
        raise


class JsonlSink:
    """One JSON object per line, appended to a file (mode 0600) or written to stdout.

    A long-running tap's file gets rotated: when the path no longer leads to the open
    file (moved away or removed, as logrotate does), the next batch starts a new file
    there, as ``logging``'s ``WatchedFileHandler`` does. Until that new file can be
    made, records keep going to the old one (which, if it was removed rather than moved,
    only the process still holds).
    """

    name = "jsonl"

    def __init__(self, path: str) -> None:
        self.path = path
        self._handle: IO[str] = sys.stdout if path == "-" else open_private(path)
        self._identity = None if path == "-" else _identity(os.fstat(self._handle.fileno()))
        # The file may end in half a line: a tap killed mid-batch, or a write that
        # failed part-way (a full disk). The next batch then starts on a line of its own,
        # so that only the broken line is unreadable, not the first record after it.
        self._torn = self._identity is not None and _ends_mid_line(self._handle, path)
        self._warnings = Throttle()

    def write(self, records: Sequence[dict[str, Any]]) -> None:
        if self._identity is None:
            self._handle.write("".join(dumps(r) + "\n" for r in records))
            self._handle.flush()
            return
        self._follow_path()
        lines = [dumps(r) + "\n" for r in records]
        start = "\n" if self._torn else ""
        # Straight to the file, not through a buffer: a failed write leaves nothing
        # behind to come out later (after the batch was counted as failed).
        self._torn = True
        done = _write_all(self._handle.fileno(), (start + "".join(lines)).encode("utf-8"))
        if done is not None:  # failed part-way: the whole lines written count as written
            written, exc = done
            whole, boundary = 0, len(start)
            for line in lines:
                size = len(line.encode("utf-8"))
                if boundary + size > written:
                    break
                boundary += size
                whole += 1
            self._torn = written != boundary
            raise PartialWrite(whole, exc) from exc
        self._torn = False

    def _follow_path(self) -> None:
        try:
            if _identity(os.stat(self.path)) == self._identity:
                return
        except FileNotFoundError:
            pass  # removed: start a new one
        except OSError:
            return  # cannot tell (a directory made unreadable): keep the file we have
        try:
            handle = open_private(self.path)
        except OSError as exc:
            if self._warnings.ready():
                log.warning(
                    "fp-tap: %s was moved or removed and cannot be made again (%s); "
                    "writing on to the file it was",
                    self.path,
                    exc.strerror or type(exc).__name__,
                )
            return
        self._handle.close()
        self._handle, self._identity = handle, _identity(os.fstat(handle.fileno()))
        self._torn = _ends_mid_line(handle, self.path)
        log.info("fp-tap: %s was moved or removed; records go to a new file there", self.path)

    def close(self) -> None:
        if self._handle is not sys.stdout:
            self._handle.close()


def _identity(status: os.stat_result) -> tuple[int, int]:
    return status.st_dev, status.st_ino


class PartialWrite(Exception):
    """A sink wrote the first ``written`` records of a batch, then failed (``cause``)."""

    def __init__(self, written: int, cause: OSError) -> None:
        super().__init__(str(cause))
        self.written = written


def _write_all(fd: int, data: bytes) -> tuple[int, OSError] | None:
    """Write all of ``data``; else how much was written before the error, and the error."""
    view, written = memoryview(data), 0
    while written < len(data):
        try:
            written += os.write(fd, view[written:])
        except OSError as exc:
            return written, exc
    return None


def _ends_mid_line(handle: IO[str], path: str) -> bool:
    """Whether the file ``handle`` appends to is not empty and does not end in a newline
    (read through a second descriptor: the handle is write-only)."""
    fd = -1
    for name in (f"/proc/self/fd/{handle.fileno()}", path):  # the same file; else its path
        with contextlib.suppress(OSError):
            fd = os.open(name, os.O_RDONLY)
            break
    if fd < 0:
        return False  # cannot tell: as before
    try:
        size = os.fstat(fd).st_size
        return size > 0 and os.pread(fd, 1, size - 1) != b"\n"
    except OSError:
        return False
    finally:
        os.close(fd)


class RecordWriter:
    """A thread that writes records to sinks; ``submit`` never blocks."""

    def __init__(self, sinks: Sequence[Sink], stats: Stats, max_queue: int = 10_000) -> None:
        self.sinks = list(sinks)
        self.stats = stats
        self._queue: queue.Queue[dict[str, Any]] = queue.Queue(maxsize=max_queue)
        self._thread = threading.Thread(target=self._run, name="fp-tap-writer", daemon=True)
        self._stopping = threading.Event()
        self._closed = False
        self._warnings = Throttle()
        self._sink_warnings: dict[str, Throttle] = {}

    def start(self) -> None:
        self._thread.start()

    def submit(self, record: dict[str, Any]) -> bool:
        """Queue a record; False (and counted as dropped) when full or closed."""
        if self._closed:
            self.stats.incr("dropped")
            return False
        try:
            self._queue.put_nowait(record)
        except queue.Full:
            self.stats.incr("dropped")
            if self._warnings.ready():
                log.warning(
                    "fp-tap: record queue full (%d), dropping records; %d dropped so far",
                    self._queue.maxsize,
                    self.stats.get("dropped"),
                )
            return False
        return True

    def pending(self) -> int:
        return self._queue.qsize()

    def close(self, timeout: float = 10.0) -> bool:
        """Stop taking records, write what is queued (for up to ``timeout`` seconds), then
        close the sinks. False when records were still queued at the deadline: the thread
        keeps writing them in the background until the process ends.
        """
        self._closed = True
        self._stopping.set()
        if not self._thread.is_alive() and self._thread.ident is None:
            self._run()  # never started: write the queue here rather than lose it
            return True
        self._thread.join(timeout)
        if self._thread.is_alive():
            log.warning(
                "fp-tap: writer did not drain in %.0f s; %d records left", timeout, self.pending()
            )
            return False
        return True

    def _run(self) -> None:
        while True:
            try:
                batch = [self._queue.get(timeout=0.1)]
            except queue.Empty:
                if self._stopping.is_set():
                    break
                self._retry_held()
                continue
            if not self._stopping.is_set():
                # Let more records arrive: the thread then wakes, takes the GIL and
                # writes once per batch rather than once per record. Measured in
                # mitmdump (scripts/bench), per-record wake-ups cost the proxy's own
                # thread more CPU than serialising the records does.
                self._stopping.wait(LINGER)
            while len(batch) < BATCH:
                try:
                    batch.append(self._queue.get_nowait())
                except queue.Empty:
                    break
            self._write(batch)
        self._close_sinks()

    def _write(self, batch: list[dict[str, Any]]) -> None:
        for sink in self.sinks:
            try:
                sink.write(batch)
            except Exception as exc:  # a broken sink must not stop the others
                written = exc.written if isinstance(exc, PartialWrite) else 0
                if written:
                    self.stats.incr_group("written", sink.name, written)
                self.stats.incr_group("sink_errors", sink.name, len(batch) - written)
                # A full disk fails every batch: one line per sink per throttle period.
                if self._sink_warnings.setdefault(sink.name, Throttle()).ready():
                    log.warning(
                        "fp-tap: %s sink failed to write %d records: %s (%d so far)",
                        sink.name,
                        len(batch) - written,
                        exc,
                        self.stats.group("sink_errors").get(sink.name, 0),
                    )
            else:
                self.stats.incr_group("written", sink.name, len(batch))

    def _retry_held(self) -> None:
        for sink in self.sinks:
            if isinstance(sink, HoldsRecords):
                try:
                    sink.retry_held()
                except Exception as exc:
                    if self._sink_warnings.setdefault(sink.name, Throttle()).ready():
                        log.warning(
                            "fp-tap: %s sink failed to retry held records: %s", sink.name, exc
                        )

    def _close_sinks(self) -> None:
        for sink in self.sinks:
            try:
                sink.close()
            except Exception as exc:
                log.warning("fp-tap: closing the %s sink failed: %s", sink.name, exc)
