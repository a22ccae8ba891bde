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


#: Snapshot entries that say how things are now (sizes of queues and memories) rather
#: than count events: adding two of them up means nothing.
GAUGES = frozenset(
    {
        "queued",
        "replay_ids",
        "replay_evicted",
        "webhook_pending",
        "webhook_parked",
        "webhook_in_flight",
    }
)


def merge_counts(*snapshots: dict[str, Any]) -> dict[str, Any]:
    """Snapshots added up, counter by counter and group by group, in sorted order."""
    counts: dict[str, int] = {}
    groups: dict[str, dict[str, int]] = {}
    for snapshot in snapshots:
        for name, value in snapshot.items():
            if isinstance(value, dict):
                group = groups.setdefault(name, {})
                for key, n in value.items():
                    group[key] = group.get(key, 0) + n
            else:
                counts[name] = counts.get(name, 0) + value
    out: dict[str, Any] = dict(sorted(counts.items()))
    for name, group in sorted(groups.items()):
        out[name] = dict(sorted(group.items()))
    return out


def without_gauges(snapshot: dict[str, Any]) -> dict[str, Any]:
    """The counters of ``snapshot`` only."""
    return {name: value for name, value in snapshot.items() if name not in GAUGES}
