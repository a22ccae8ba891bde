"""Log lines written straight to the one handler that shows them, past ``logging``.

A record line handed to ``logging`` costs far more than its text: the ``LogRecord``
(its look-ups of thread, process and task), the walk through loggers, handlers and
filters, the formatter. mitmdump does all of that on its event loop for every open
response; measured there, it was most of what the addon still cost per response
(BENCHMARKS.md). When the lines have exactly one reader, a terminal, and every other
handler on their way ignores them, :class:`DirectLines` writes them to that terminal's
stream itself, in that handler's own format, scrubbed as the scrubbing filter would.
Anything else (mitmweb's or the console's event log, a handler a user added, a filter,
a level) sends the line back through ``logging``: the caller's fallback.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable, Collection
from typing import IO, NamedTuple

from fp_core.scrub import Scrubber

#: What a probe line says: found in the handler's output, it shows where text goes.
_PROBE = "\x00fp-tap probe\x00"
#: The levels of the lines this writes (trusted and suspicious lines; errors).
LEVELS = (logging.INFO, logging.WARNING)


class _Format(NamedTuple):
    head: str
    middle: str
    tail: str


class _Target(NamedTuple):
    handler: logging.Handler
    stream: IO[str]
    formats: dict[int, _Format]
    #: Other handlers on the way, which ignore the lines only while their level is above.
    leveled: tuple[logging.Handler, ...]


class _Seen(NamedTuple):
    """What the target (or its absence) was found from: the handlers, and the terminal's
    filters and formatter. Any change and it is looked for again. One object, replaced
    whole, so that a thread never sees half of it."""

    handlers: list[logging.Handler]
    terminal: logging.Handler | None
    filters: list[object]
    formatter: logging.Formatter | None
    target: _Target | None


_UNSEEN = _Seen([], None, [], None, None)


def handlers_of(logger: logging.Logger) -> list[logging.Handler]:
    """The handlers a record of ``logger`` reaches, in order (as ``Logger.callHandlers``)."""
    found: list[logging.Handler] = []
    current: logging.Logger | None = logger
    while current is not None:
        found += current.handlers
        if not current.propagate:
            break
        current = current.parent
    return found


class DirectLines:
    """Writes ``logger``'s lines to the stream of its only showing handler, or says it cannot.

    ``terminal(handler)`` is that handler's stream when it is a terminal this may write
    to, else None; ``ignores(handler)`` is True for a handler that never takes these
    lines (a filter keeps them out); any other handler must have a level above the
    line's. ``own_filters`` are the filters the terminal may have (the scrubbing one,
    whose work :meth:`write` does with ``scrubber``). All of it is checked again when
    the handlers change.
    """

    def __init__(
        self,
        logger: logging.Logger,
        scrubber: Scrubber,
        *,
        terminal: Callable[[logging.Handler], IO[str] | None],
        ignores: Callable[[logging.Handler], bool],
        own_filters: Collection[object] = (),
    ) -> None:
        self.logger = logger
        self.scrubber = scrubber
        self._terminal = terminal
        self._ignores = ignores
        self._own_filters = own_filters
        self._seen: _Seen | None = None
        #: The second of the last stamp, and its ``HH:MM:SS``.
        self._clock = (-1, "")

    def write(self, level: int, text: str) -> bool:
        """Write one line of ``level`` (one of :data:`LEVELS`); False: log it instead.

        True also when the terminal's level drops the line: nothing else would show it.
        """
        logger = self.logger
        handlers = handlers_of(logger)
        seen = self._seen
        if (
            seen is None
            or handlers != seen.handlers
            or (
                seen.terminal is not None
                and (
                    seen.terminal.filters != seen.filters
                    or seen.terminal.formatter is not seen.formatter
                )
            )
        ):
            self._seen = seen = self._look(handlers)
        target = seen.target
        if target is None or logger.disabled or logger.filters:
            return False
        handler = target.handler
        for other in target.leveled:
            if level >= other.level:
                return False
        if level < handler.level:
            return True
        form = target.formats[level]
        # A record line holds no proxy secret: the values requests carried are not
        # applied (see Scrubber.scrub), the configured secrets are.
        text = self.scrubber.scrub(text, seen=False)
        line = f"{form.head}{self._stamp(time.time_ns())}{form.middle}{text}"
        try:
            with handler.lock or contextlib.nullcontext():  # whole lines from any thread
                target.stream.write(f"{line}{form.tail}\n")
        except (OSError, ValueError):
            # A closed or broken stream: the handler decides what that means.
            self._seen = None
            return False
        return True

    def _stamp(self, now_ns: int) -> str:
        """``HH:MM:SS.mmm``, as ``logging.Formatter.formatTime`` writes it by default."""
        second = now_ns // 1_000_000_000
        clock = self._clock
        if clock[0] != second:
            self._clock = clock = second, time.strftime("%H:%M:%S", time.localtime(second))
        return f"{clock[1]}.{now_ns // 1_000_000 % 1000:03d}"

    def _look(self, handlers: list[logging.Handler]) -> _Seen:
        found = self._terminal_of(handlers)
        if found is None:
            return _UNSEEN._replace(handlers=handlers)
        handler, stream, leveled = found
        seen = _Seen(handlers, handler, list(handler.filters), handler.formatter, None)
        if any(f not in self._own_filters for f in handler.filters):
            return seen
        formats = {}
        for level in LEVELS:
            form = self._format(handler, level)
            if form is None:
                return seen
            formats[level] = form
        return seen._replace(target=_Target(handler, stream, formats, leveled))

    def _terminal_of(
        self, handlers: list[logging.Handler]
    ) -> tuple[logging.Handler, IO[str], tuple[logging.Handler, ...]] | None:
        """The one terminal, its stream, and the handlers that take lines by level."""
        target: tuple[logging.Handler, IO[str]] | None = None
        leveled = []
        for handler in handlers:
            stream = self._terminal(handler)
            if stream is not None:
                if target is not None:
                    return None  # two terminals: logging writes to both
                target = handler, stream
            elif not self._ignores(handler):
                leveled.append(handler)
        if target is None:
            return None
        return target[0], target[1], tuple(leveled)

    def _format(self, handler: logging.Handler, level: int) -> _Format | None:
        """Where the handler puts the time and the text, found by formatting a probe."""
        now_ns = time.time_ns()
        probe = logging.LogRecord(self.logger.name, level, __file__, 0, _PROBE, None, None)
        probe.created = now_ns / 1e9
        probe.msecs = now_ns // 1_000_000 % 1000
        if not handler.filter(probe):
            return None
        try:
            out = handler.format(probe)
        except Exception:
            return None
        stamp = self._stamp(now_ns)
        if out.count(stamp) != 1:
            return None  # another time format, or none: only logging knows
        head, rest = out.split(stamp)
        if rest.count(_PROBE) != 1:
            return None
        middle, tail = rest.split(_PROBE)
        return _Format(head, middle, tail)


def printable(value: object) -> str:
    """``value`` as text safe for one log line or comment: control characters (a line
    break, a terminal's escape sequences) escaped. The outer JSON of a response, which
    anyone on its path may write, must not be able to forge a line of its own."""
    text = value if isinstance(value, str) else str(value)
    return text if text.isprintable() else text.encode("unicode_escape").decode("ascii")
