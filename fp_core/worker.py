"""The pipeline in a process of its own: mitmproxy's event loop only hands bodies over.

Unsealing, checking and writing records cost mitmproxy's single event-loop thread more
than a third of what proxying a request does (BENCHMARKS.md), and a thread would not
help: the work holds the GIL. So the addon starts this module as a child process
(:class:`WorkerClient`) and sends it each candidate response; the child runs a
:class:`~fp_core.pipeline.Pipeline` and answers with the record (without the event),
which the addon puts on the flow and logs.

The two talk over pipes the parent created, in frames: a 4-byte big-endian length, then
a pickle. Nothing else can write to those pipes, so unpickling them is safe. The child
loads keys and the webhook secret itself, from the same options and environment as the
parent: no secret ever travels in a frame. It also checks those files for changes itself
(``fp_secrets_reload``), as the parent does for its own use.

Parent to child: ``("configure", seq, values, updated)``, ``("inspect", token, info)``,
``("spool", command)`` (``fp.resend``, ``fp.discard``), ``("close", seq, drain)``. Child
to parent: ``("reply", seq, ok, payload)``, ``("record", token, record_or_None)``,
``("stats", snapshot)``, ``("log", level, logger, message)``.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import itertools
import logging
import os
import pickle
import select
import signal
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Mapping
from collections.abc import Set as AbstractSet
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from fp_core.errors import ConfigError, FpError
from fp_core.pipeline import Pipeline
from fp_core.stats import Stats, merge_counts
from fp_core.tap import RECORD_FIELDS, ResponseInfo, count_record

log = logging.getLogger(__name__)

_FRAME = struct.Struct(">I")
_CHUNK = 1 << 18
STATS_EVERY = 0.1
#: How much lower the worker's CPU priority is than mitmproxy's (see ``main``).
NICENESS = 10
#: Where ``fp_core`` lives: the child imports it from there, installed or not.
ROOT = str(Path(__file__).resolve().parent.parent)

Records = list[tuple[Any, dict[str, Any] | None]]


def encode(message: tuple[Any, ...]) -> bytes:
    data = pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL)
    return _FRAME.pack(len(data)) + data


class FrameReader:
    """Frames from a file descriptor, as many as one read brings."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self._buffer = bytearray()

    def read(self) -> list[tuple[Any, ...]] | None:
        """At least one frame (blocking), or None at end of file."""
        while True:
            frames = self._split()
            if frames:
                return frames
            chunk = os.read(self.fd, _CHUNK)
            if not chunk:
                return None
            self._buffer += chunk

    def read_available(self) -> list[tuple[Any, ...]] | None:
        """The frames complete after reading what is there now (a non-blocking file
        descriptor); None at end of file."""
        while True:
            try:
                chunk = os.read(self.fd, _CHUNK)
            except BlockingIOError:
                break
            if not chunk:
                # The last complete frames first; the end of file at the next call.
                return self._split() or None
            self._buffer += chunk
            if len(chunk) < _CHUNK:
                break
        return self._split()

    def _split(self) -> list[tuple[Any, ...]]:
        frames, buffer, at = [], self._buffer, 0
        while len(buffer) - at >= _FRAME.size:
            (size,) = _FRAME.unpack_from(buffer, at)
            end = at + _FRAME.size + size
            if end > len(buffer):
                break
            # Only our own two processes write these pipes (see the module docstring).
            frames.append(pickle.loads(memoryview(buffer)[at + _FRAME.size : end]))  # noqa: S301
            at = end
        del buffer[:at]
        return frames


def _pipes() -> tuple[int, int, int, int]:
    """Two pipes (read end, write end, read end, write end), or :class:`ConfigError` (out
    of file descriptors, on a busy proxy)."""
    fds: list[int] = []
    try:
        for _ in range(2):
            fds.extend(os.pipe())
    except OSError as exc:
        for fd in fds:
            os.close(fd)
        raise ConfigError(f"cannot start the worker process: {exc.strerror}") from None
    return fds[0], fds[1], fds[2], fds[3]


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def _pack(info: ResponseInfo) -> tuple[Any, ...]:
    return (
        info.flow_id,
        info.time,
        info.host,
        info.path,
        info.method,
        info.status_code,
        info.body,
        info.peer_ip,
        info.header_client_ip,
    )


def slim(record: dict[str, Any] | None) -> dict[str, Any] | None:
    """What the addon needs of a record: everything but the event."""
    return None if record is None else {name: record[name] for name in RECORD_FIELDS}


# -- the parent's side ------------------------------------------------------------------


class WorkerExited(ConfigError):
    """The worker process exited while an answer was waited for."""


class WorkerClient:
    """Starts the worker process and talks to it, all on the caller's thread.

    In mitmproxy that thread is the event loop's: :meth:`submit` writes without
    blocking (what the pipe cannot take waits in memory until the loop says it can),
    and the loop reads the answers as they come, handing them to ``on_records`` (a list
    of ``(context, record)``, in order). No helper threads: each wake-up of a thread
    costs the event loop a GIL hand-over, which measured more than the work moved away.
    :meth:`configure` and :meth:`close` block for the child's answer; they are for
    start-up, option changes and shutdown, not for each flow.
    """

    def __init__(
        self,
        *,
        on_records: Callable[[Records], None],
        on_exit: Callable[[int | None], None],
        max_in_flight: int,
        python: str = sys.executable,
    ) -> None:
        self.on_records = on_records
        self.on_exit = on_exit
        self.max_in_flight = max_in_flight
        #: The child's last report of its counters, and the records it answered since.
        self._reported: dict[str, Any] = {}
        self._unreported: list[dict[str, Any]] = []
        self.alive = False
        self.proc: subprocess.Popen[bytes] | None = None
        self._python = python
        self._pending: dict[int, Any] = {}
        self._tokens = itertools.count()
        self._seq = itertools.count()
        self._replies: dict[int, tuple[bool, Any]] = {}
        #: Configurations sent without waiting: their replies are logged, not kept.
        self._unawaited: set[int] = set()
        self._backlog: collections.deque[memoryview] = collections.deque()
        #: The event loop calls _flush when the pipe can take more (a backlog waits).
        self._writing = False
        self._loop: asyncio.AbstractEventLoop | None = None
        self._reader: FrameReader | None = None
        self._to_child = -1
        self._closing = False
        #: The child died while :meth:`close` waited for it to write out (not a timeout).
        self.died_closing = False

    def start(self) -> None:
        """Start the child; raises :class:`ConfigError` when it cannot be started."""
        answers, to_parent, requests, to_child = _pipes()
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(filter(None, (ROOT, env.get("PYTHONPATH"))))
        try:
            self.proc = subprocess.Popen(
                # -P: not the current directory first on sys.path, as -m puts it: an
                # fp_core there (an older copy, anyone's in /tmp) would run with the keys.
                [self._python, "-P", "-m", "fp_core.worker", str(to_parent)],
                stdin=requests,
                pass_fds=(to_parent,),
                env=env,
                # Its own session: a Ctrl-C meant for mitmproxy must not stop the worker
                # before mitmproxy has asked it to write out what it holds.
                start_new_session=True,
            )
        except OSError as exc:
            os.close(answers)
            os.close(to_child)
            raise ConfigError(f"cannot start the worker process: {exc.strerror}") from None
        finally:
            os.close(to_parent)
            os.close(requests)
        os.set_blocking(to_child, False)
        os.set_blocking(answers, False)
        self._to_child = to_child
        self._reader = FrameReader(answers)
        self.alive = True
        self.attach()

    @property
    def in_flight(self) -> int:
        return len(self._pending)

    def submit(self, info: ResponseInfo, context: Any) -> bool:
        """Queue ``info``; False when the worker is gone or ``max_in_flight`` are queued."""
        if not self.alive or len(self._pending) >= self.max_in_flight:
            return False
        if self._loop is None:
            self.attach()
        token = next(self._tokens)
        self._pending[token] = context
        # A tuple: pickling the dataclass itself costs the event loop twice as much.
        self._send(encode(("inspect", token, _pack(info))))
        return True

    def configure(
        self, values: Mapping[str, Any], updated: AbstractSet[str], *, wait: bool, timeout: float
    ) -> None:
        """Send option values; with ``wait``, raise :class:`ConfigError` if the child refuses
        them (otherwise a refusal is logged when it comes)."""
        seq = next(self._seq)
        if not wait:
            self._unawaited.add(seq)
        self._send(encode(("configure", seq, dict(values), sorted(updated))))
        if wait:
            ok, payload = self._wait(seq, timeout)
            if not ok:
                raise ConfigError(payload)

    def spool_command(self, name: str) -> None:
        """Run ``fp.<name>`` on the parked webhook events (the child logs what it did)."""
        self._send(encode(("spool", name)))

    def poll(self, timeout: float) -> None:
        """Without an event loop: write what waits and take the answers there are, waiting up
        to ``timeout`` seconds for either."""
        reader = self._reader
        if reader is None or not self.alive:
            return
        writing = [self._to_child] if self._backlog else []
        readable, writable, _ = select.select([reader.fd], writing, [], timeout)
        if writable:
            self._flush()
        if readable:
            self._on_readable()

    def close(self, drain: float) -> dict[str, Any] | None:
        """Let the child write out and deliver (for up to ``drain`` seconds) and stop; its
        final counters, or None when it did not answer in time (it is then killed)."""
        if self.proc is None:
            return None
        self._closing = True
        final: dict[str, Any] | None = None
        if self.alive:
            seq = next(self._seq)
            self._send(encode(("close", seq, drain)))
            try:
                ok, payload = self._wait(seq, drain + 30)
                final = payload if ok else None
            except WorkerExited:  # died while writing out: for the caller to report
                self.died_closing = True
            except ConfigError as exc:  # it did not answer in time: killed below
                log.warning("fp-tap: %s", exc.message)
        self._detach()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.alive = False
        if final is not None:
            self._reported, self._unreported = final, []
        return final

    @property
    def stats(self) -> dict[str, Any]:
        """The child's counters as far as this side knows them: its last report (at most
        ``STATS_EVERY`` old), plus the responses it answered since, counted here as it
        counted them. A child killed between two reports takes only its writes' and
        deliveries' latest counts with it, not its answers'."""
        if not self._unreported:
            return self._reported
        answered = Stats()
        for record in self._unreported:
            count_record(answered, record)
        return merge_counts(self._reported, answered.snapshot())

    def take_pending(self) -> list[Any]:
        """Forget every queued response (the worker is gone); their contexts."""
        contexts = list(self._pending.values())
        self._pending.clear()
        return contexts

    # -- the pipes ---------------------------------------------------------------------

    def attach(self) -> None:
        """Have the running event loop (if any) read answers and drain the backlog."""
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return
        assert self._reader is not None
        self._loop = loop
        loop.add_reader(self._reader.fd, self._on_readable)
        if self._backlog:
            loop.add_writer(self._to_child, self._flush)
            self._writing = True

    def _detach(self) -> None:
        if self._loop is not None and not self._loop.is_closed():
            if self._reader is not None:
                self._loop.remove_reader(self._reader.fd)
            self._loop.remove_writer(self._to_child)
        self._loop, self._writing = None, False
        for fd in (self._to_child, self._reader.fd if self._reader else -1):
            if fd >= 0:
                with contextlib.suppress(OSError):
                    os.close(fd)
        self._to_child = -1
        self._reader = None

    def _send(self, data: bytes) -> None:
        self._backlog.append(memoryview(data))
        if len(self._backlog) == 1:
            self._flush()

    def _flush(self) -> None:
        """Write what waits, as far as the pipe takes it; the event loop (if any) calls
        again when the pipe can take the rest."""
        while self._backlog:
            head = self._backlog[0]
            try:
                written = os.write(self._to_child, head)
            except BlockingIOError:
                written = 0
            except OSError:
                self._backlog.clear()  # the child is gone; reading its end says so
                break
            if written < len(head):
                self._backlog[0] = head[written:]
                if self._loop is not None and not self._writing:
                    self._loop.add_writer(self._to_child, self._flush)
                    self._writing = True
                return
            self._backlog.popleft()
        if self._writing:
            assert self._loop is not None
            self._loop.remove_writer(self._to_child)
            self._writing = False

    def _wait(self, seq: int, timeout: float) -> tuple[bool, Any]:
        """Block (event loop included) until the child answers ``seq``."""
        deadline = time.monotonic() + timeout
        while seq not in self._replies:
            left = deadline - time.monotonic()
            if not self.alive or self._reader is None:
                raise WorkerExited("the worker process exited")
            if left <= 0:
                raise ConfigError(f"the worker process did not answer in {timeout:.0f} s")
            self.poll(min(left, 3600.0))  # a drain meant as "for ever" fits select()
        return self._replies.pop(seq)

    def _on_readable(self) -> None:
        assert self._reader is not None
        try:
            frames = self._reader.read_available()
        except (OSError, pickle.UnpicklingError, EOFError, struct.error) as exc:
            log.error("fp-tap: lost the worker process's answers: %s", exc)
            frames = None
        if frames is None:
            self._gone()
            return
        records: Records = []
        pending = self._pending
        for frame in frames:
            kind = frame[0]
            if kind == "record":
                records.append((pending.pop(frame[1], None), frame[2]))
                if frame[2] is not None:
                    self._unreported.append(frame[2])
            elif kind == "stats":
                # It counts every answer sent before it (the child reports between
                # batches of answers, in the same pipe).
                self._reported, self._unreported = frame[1], []
            elif kind == "log":
                logging.getLogger(frame[2]).log(frame[1], "%s", frame[3])
            elif kind == "reply":
                if frame[1] not in self._unawaited:
                    self._replies[frame[1]] = (frame[2], frame[3])
                else:  # nobody waits for it: say here what was refused, and forget it
                    self._unawaited.discard(frame[1])
                    if not frame[2]:
                        log.error("fp-tap: the worker process refused the options: %s", frame[3])
        if records:
            self.on_records(records)

    def _gone(self) -> None:
        self.alive = False
        closing = self._closing
        self._detach()
        if not closing and self.proc is not None:
            # Its end of the pipe closes as it exits: the wait is for the exit status.
            try:
                code: int | None = self.proc.wait(5)
            except subprocess.TimeoutExpired:
                code = None
            self.on_exit(code)


# -- the child's side -------------------------------------------------------------------


class _Out:
    """Frames to the parent, whole, from any thread of the child."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.gone = False
        self._lock = threading.Lock()

    def send(self, *messages: tuple[Any, ...]) -> None:
        if self.gone:
            return
        data = b"".join(encode(m) for m in messages)
        with self._lock:
            try:
                _write_all(self.fd, data)
            except OSError:
                # The parent is gone: nobody to answer, but what it sent before still
                # goes to the sinks (the loop reads on to the end of its requests).
                self.gone = True


class _ForwardLogs(logging.Handler):
    def __init__(self, out: _Out) -> None:
        super().__init__(logging.INFO)
        self.out = out

    def emit(self, record: logging.LogRecord) -> None:
        try:
            message = record.getMessage()
            if record.exc_info:
                message += "\n" + logging.Formatter().formatException(record.exc_info)
            self.out.send(("log", record.levelno, record.name, message))
        except Exception:  # noqa: S110 (the parent is gone: nobody to tell)
            pass


class _Child:
    def __init__(self) -> None:
        self.pipeline = Pipeline()

    def handle(self, frame: tuple[Any, ...], answers: list[tuple[Any, ...]]) -> bool:
        """Act on one frame; False once told to close."""
        kind = frame[0]
        if kind == "inspect":
            answers.append(("record", frame[1], slim(self._inspect(ResponseInfo(*frame[2])))))
        elif kind == "configure":
            answers.append(("reply", frame[1], *self._configure(frame[2], set(frame[3]))))
        elif kind == "spool":
            # In the background, as in mitmproxy's process: a large backlog takes a while,
            # and the answers to responses must not wait for it.
            pipeline, name = self.pipeline, frame[1]
            pipeline.background.run(lambda: pipeline.spool_command(name))
        elif kind == "close":
            self.pipeline.close(frame[2])
            answers.append(("reply", frame[1], True, self.pipeline.snapshot()))
            return False
        return True

    def _inspect(self, info: ResponseInfo) -> dict[str, Any] | None:
        try:
            return self.pipeline.inspect(info)
        except Exception as exc:
            self.pipeline.stats.incr_group("errors", "internal")
            log.warning("fp-tap: internal error on flow %s: %s", info.flow_id, type(exc).__name__)
            return None

    def _configure(self, values: dict[str, Any], updated: set[str]) -> tuple[bool, Any]:
        try:
            # As the parent does: the same file and environment. The pipeline reads the
            # key file again only when the option changes (a key file moved since must
            # not refuse other options).
            self.pipeline.configure(SimpleNamespace(**values), updated)
        except FpError as exc:
            return False, exc.message
        return True, None

    def check_files(self) -> None:
        """Take what changed in the key file and the webhook secret file (blocking: here,
        in the worker, that only delays the next response a little)."""
        try:
            self.pipeline.take(self.pipeline.check_files())
        except Exception as exc:  # the worker must outlive a bug
            self.pipeline.stats.incr_group("errors", "internal")
            log.warning("fp-tap: internal error checking files: %s", type(exc).__name__)


def main(argv: list[str] | None = None) -> int:
    """The child: ``python -m fp_core.worker FD`` (FD: where its answers go)."""
    args = sys.argv[1:] if argv is None else argv
    # The parent says when to stop. A service manager's stop (systemd's default
    # KillMode=control-group) signals every process of the service at once: the worker
    # must go on writing and delivering until mitmproxy has it drain. It ends when the
    # parent's pipe closes, however the parent went.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    with contextlib.suppress(OSError):
        # Background work: when the CPUs are short, proxying goes first. Measured in
        # scripts/bench on two cores, where the worker otherwise takes CPU time from
        # mitmproxy and from the upstream on the request's path.
        os.nice(NICENESS)
    out = _Out(int(args[0]))
    root = logging.getLogger()
    root.addHandler(_ForwardLogs(out))
    root.setLevel(logging.INFO)
    child, reader = _Child(), FrameReader(sys.stdin.fileno())
    running, reported, next_report = True, None, 0.0
    checked = time.monotonic()
    while running:
        now = time.monotonic()
        # From the last check, with the interval as it is now: a shorter one applies at
        # once, not after the longer one ran out.
        next_check = checked + (every := child.pipeline.reload_every)
        if every and now >= next_check:
            child.check_files()
            checked, next_check = now, now + every
        # Counters go out every STATS_EVERY seconds when they changed (the delivery's
        # change with no response coming in): one snapshot per answer would cost the
        # parent more than the answer.
        if now >= next_report:
            snapshot = child.pipeline.snapshot()
            if snapshot != reported:
                out.send(("stats", snapshot))
                reported = snapshot
            next_report = now + STATS_EVERY
        wake = min(next_report, next_check) if every else next_report
        if not select.select([reader.fd], [], [], max(0.0, wake - time.monotonic()))[0]:
            continue
        frames = reader.read()
        if frames is None:
            # The parent is gone (killed?): write out what is queued and let go of the
            # spool quickly, as the parent itself would have, for the next tap to start.
            child.pipeline.close(0)
            break
        answers: list[tuple[Any, ...]] = []
        for frame in frames:
            if not (running := child.handle(frame, answers)):
                break
        if answers:
            out.send(*answers)
    return 0


if __name__ == "__main__":
    sys.exit(main())
