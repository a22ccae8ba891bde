"""fp_core.loglines.DirectLines: the same line logging would write, or a refusal."""

from __future__ import annotations

import io
import logging
import re
import sys
import threading
import time
from typing import IO

import pytest

from fp_core.loglines import DirectLines, handlers_of
from fp_core.redact import REDACTED
from fp_core.scrub import Scrubber

SECRET = "direct-lines-secret-4c1d"
SEEN = "suspicious"
STAMP = re.compile(r"\d\d:\d\d:\d\d\.\d\d\d")


class ClockFormatter(logging.Formatter):
    """A terminal's format: time of day with milliseconds, then level and text."""

    default_time_format = "%H:%M:%S"
    default_msec_format = "%s.%03d"

    def __init__(self, fmt: str = "<%(asctime)s> %(levelname)s: %(message)s [end]") -> None:
        super().__init__(fmt)


class Terminal(logging.StreamHandler):  # type: ignore[type-arg]
    """Stands for mitmproxy's terminal log."""


class Ignoring(logging.Handler):
    """A handler whose filter keeps the lines out (as mitmproxy's add_log one)."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[str] = []
        self.addFilter(lambda record: not record.name.startswith("fp-test"))

    def emit(self, record: logging.LogRecord) -> None:
        self.seen.append(record.getMessage())


class Keep(logging.Handler):
    def __init__(self, level: int = logging.NOTSET) -> None:
        super().__init__(level)
        self.seen: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.seen.append(record.getMessage())


class Scrub(logging.Filter):
    def __init__(self, scrubber: Scrubber) -> None:
        super().__init__()
        self.scrubber = scrubber

    def filter(self, record: logging.LogRecord) -> bool:
        record.msg, record.args = self.scrubber.scrub(record.getMessage()), None
        return True


def terminal_stream(handler: logging.Handler) -> IO[str] | None:
    return handler.stream if isinstance(handler, Terminal) else None


class Setup:
    def __init__(self, name: str) -> None:
        # Outside logging's tree of loggers, where pytest puts its own handlers.
        self.logger = logging.Logger(name, logging.INFO)
        self.out = io.StringIO()
        self.terminal = Terminal(self.out)
        self.terminal.setFormatter(ClockFormatter())
        self.scrubber = Scrubber()
        self.scrubber.pin(SECRET)  # a configured secret (a key, the webhook secret)
        self.scrubber.add(SEEN)  # a value a request carried in FPJS-Proxy-Secret
        self.scrub = Scrub(self.scrubber)
        self.terminal.addFilter(self.scrub)
        self.logger.addHandler(self.terminal)
        self.lines = DirectLines(
            self.logger,
            self.scrubber,
            terminal=terminal_stream,
            ignores=lambda h: isinstance(h, Ignoring),
            own_filters=(self.scrub,),
        )

    def logged(self, level: int, text: str) -> str:
        """What logging itself writes for this line."""
        before = len(self.out.getvalue())
        self.logger.log(level, "%s", text)
        return self.out.getvalue()[before:]

    def direct(self, level: int, text: str) -> tuple[bool, str]:
        before = len(self.out.getvalue())
        done = self.lines.write(level, text)
        return done, self.out.getvalue()[before:]


@pytest.fixture
def setup(request: pytest.FixtureRequest) -> Setup:
    return Setup(f"fp-test.{request.node.name}")


@pytest.mark.parametrize("level", [logging.INFO, logging.WARNING])
def test_writes_what_logging_writes(setup: Setup, level: int) -> None:
    text = "fp v4 1.abc trusted visitor=V bot=good 100% [flow f]"
    done, direct = setup.direct(level, text)
    logged = setup.logged(level, text)
    assert done
    assert STAMP.sub("T", direct) == STAMP.sub("T", logged)
    assert STAMP.sub("T", direct) == f"<T> {logging.getLevelName(level)}: {text} [end]\n"


def test_the_time_is_the_time_of_writing(setup: Setup) -> None:
    before = time.time()
    _, out = setup.direct(logging.INFO, "x")
    after = time.time()
    written = STAMP.search(out)
    assert written is not None
    hms, ms = written.group().split(".")
    stamps = {time.strftime("%H:%M:%S", time.localtime(t)) for t in (before, after)}
    assert hms in stamps
    if len(stamps) == 1:
        assert int(before * 1000) % 1000 <= int(ms) <= int(after * 1000) % 1000


def test_stamp_matches_the_formatter_at_any_time(setup: Setup) -> None:
    formatter = ClockFormatter()
    times = (0, 999_999_999, 10**9, 1_764_240_000_123_456_789, 1_764_240_059_999_000_001)
    for now_ns in times:
        record = logging.makeLogRecord({})
        record.created, record.msecs = now_ns / 1e9, now_ns // 1_000_000 % 1000
        assert setup.lines._stamp(now_ns) == formatter.formatTime(record)


def test_secrets_are_scrubbed(setup: Setup) -> None:
    done, out = setup.direct(logging.INFO, f"fp v4 id-{SECRET} trusted")
    assert done
    assert SECRET not in out
    assert f"id-{REDACTED} trusted" in out


def test_values_requests_carried_are_not_applied_to_record_lines(setup: Setup) -> None:
    """Any client can send any value in the header: one that is a word of the record
    lines would otherwise mask it in the lines about every other visitor."""
    done, out = setup.direct(logging.INFO, "fp v4 id-1 suspicious (bad_bot) visitor=v")
    assert done
    assert "id-1 suspicious (bad_bot) visitor=v" in out


def test_another_reader_sends_the_line_through_logging(setup: Setup) -> None:
    other = Keep()
    setup.logger.addHandler(other)
    assert setup.direct(logging.INFO, "one") == (False, "")
    setup.logger.removeHandler(other)
    assert setup.direct(logging.INFO, "two")[0]


def test_a_handler_on_a_parent_logger_counts(setup: Setup) -> None:
    child = logging.Logger(f"{setup.logger.name}.child")
    child.parent = setup.logger
    lines = DirectLines(
        child,
        setup.scrubber,
        terminal=terminal_stream,
        ignores=lambda h: False,
        own_filters=(setup.scrub,),
    )
    assert handlers_of(child) == [setup.terminal]
    assert lines.write(logging.INFO, "through the parent's terminal")
    child.propagate = False
    assert not lines.write(logging.INFO, "no terminal any more")
    assert "through the parent's terminal" in setup.out.getvalue()


def test_handlers_that_ignore_the_lines_do_not_count(setup: Setup) -> None:
    ignoring = Ignoring()
    setup.logger.addHandler(ignoring)
    assert setup.direct(logging.INFO, "direct")[0]
    assert ignoring.seen == []


def test_a_handler_above_the_line_level_does_not_count_until_its_level_drops(
    setup: Setup,
) -> None:
    errors = Keep(logging.ERROR)
    setup.logger.addHandler(errors)
    assert setup.direct(logging.WARNING, "a warning")[0]
    errors.setLevel(logging.WARNING)
    assert setup.direct(logging.WARNING, "now it reads warnings") == (False, "")
    assert setup.direct(logging.INFO, "but not this")[0]


def test_the_terminal_level_drops_lines_without_logging_them(setup: Setup) -> None:
    setup.terminal.setLevel(logging.WARNING)
    assert setup.direct(logging.INFO, "dropped") == (True, "")
    done, out = setup.direct(logging.WARNING, "shown")
    assert done
    assert "shown" in out


def test_two_terminals_go_through_logging(setup: Setup) -> None:
    second = Terminal(io.StringIO())
    setup.logger.addHandler(second)
    assert setup.direct(logging.INFO, "x") == (False, "")


def test_filters_it_does_not_know_go_through_logging(setup: Setup) -> None:
    def drop(record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("fp v")  # lets the probe through

    setup.terminal.addFilter(drop)
    assert setup.direct(logging.INFO, "fp v4 x") == (False, "")
    setup.terminal.removeFilter(drop)
    assert setup.direct(logging.INFO, "fp v4 y")[0]
    # Added after the handlers were looked at: seen at the next line.
    setup.terminal.addFilter(drop)
    assert setup.direct(logging.INFO, "fp v4 z") == (False, "")
    setup.terminal.removeFilter(drop)
    setup.logger.addFilter(drop)
    assert setup.direct(logging.INFO, "fp v4 w") == (False, "")


def test_a_disabled_logger_goes_through_logging(setup: Setup) -> None:
    setup.logger.disabled = True
    try:
        assert setup.direct(logging.INFO, "x") == (False, "")
    finally:
        setup.logger.disabled = False


@pytest.mark.parametrize(
    "formatter",
    [
        logging.Formatter("%(asctime)s %(message)s"),  # a date, and a comma before the ms
        ClockFormatter("%(message)s"),  # no time
        ClockFormatter("%(asctime)s %(message)s %(message)s"),  # the text twice
        ClockFormatter("%(asctime)s %(message)s %(asctime)s"),  # the time twice
        ClockFormatter("%(message)s @ %(asctime)s"),  # the text before the time
    ],
    ids=["date", "no-time", "text-twice", "time-twice", "text-first"],
)
def test_formats_it_cannot_follow_go_through_logging(
    setup: Setup, formatter: logging.Formatter
) -> None:
    setup.terminal.setFormatter(formatter)
    assert setup.direct(logging.INFO, "x") == (False, "")
    setup.terminal.setFormatter(ClockFormatter())  # seen at the next line
    assert setup.direct(logging.INFO, "y")[0]
    setup.terminal.setFormatter(formatter)
    assert setup.direct(logging.INFO, "z") == (False, "")


def test_a_broken_stream_goes_through_logging(setup: Setup) -> None:
    assert setup.direct(logging.INFO, "first")[0]
    setup.out.close()
    assert not setup.lines.write(logging.INFO, "second")


def test_lines_from_many_threads_stay_whole(setup: Setup) -> None:
    text = "fp v4 " + "x" * 300

    def write(n: int) -> None:
        for i in range(300):
            assert setup.lines.write(logging.INFO, f"{text} {n}-{i}")

    threads = [threading.Thread(target=write, args=(n,)) for n in range(4)]
    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)  # threads take turns often: a line written in parts splits
    try:
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    finally:
        sys.setswitchinterval(interval)
    lines = setup.out.getvalue().splitlines()
    assert len(lines) == 1200
    pattern = re.compile(rf"<{STAMP.pattern}> INFO: {text} \d-\d+ \[end\]")
    assert all(pattern.fullmatch(line) for line in lines)
    written = {line.split()[-2] for line in lines}
    assert written == {f"{n}-{i}" for n in range(4) for i in range(300)}
