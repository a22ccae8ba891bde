"""Counters shared by the proxy thread and the background writer."""

from __future__ import annotations

import threading
from collections import Counter
from typing import Any


class Stats:
    """Thread-safe named counters, some grouped by a key (error kind, skip reason)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._counts: Counter[str] = Counter()
        self._groups: dict[str, Counter[str]] = {}

    def incr(self, name: str, n: int = 1) -> None:
        with self._lock:
            self._counts[name] += n

    def incr_group(self, group: str, key: str, n: int = 1) -> None:
        with self._lock:
            counter = self._groups.get(group)
            if counter is None:  # not setdefault(): it would build a Counter every call
                counter = self._groups[group] = Counter()
            counter[key] += n

    def get(self, name: str) -> int:
        with self._lock:
            return self._counts[name]

    def group(self, group: str) -> dict[str, int]:
        with self._lock:
            return dict(self._groups.get(group, Counter()))

    def snapshot(self) -> dict[str, Any]:
        """Every counter, groups as nested objects, in a stable (sorted) order."""
        with self._lock:
            out: dict[str, Any] = dict(sorted(self._counts.items()))
            for group, counter in sorted(self._groups.items()):
                out[group] = dict(sorted(counter.items()))
            return out
