"""At most one log line per problem per period: a flood of the same failure (a receiver
down for hours, a store locked for minutes, a full queue) must not flood the log. The
counters in :mod:`fp_core.stats` keep the totals."""

from __future__ import annotations

import time
from collections.abc import Callable

#: Seconds between two warnings about the same problem.
WARN_EVERY = 10.0


class Throttle:
    """``ready(topic)`` is true at most once per ``every`` seconds for each topic."""

    def __init__(
        self, every: float = WARN_EVERY, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.every = every
        self._clock = clock
        self._last: dict[str, float] = {}

    def ready(self, topic: str = "") -> bool:
        now = self._clock()
        if now - self._last.get(topic, float("-inf")) < self.every:
            return False
        self._last[topic] = now
        return True
