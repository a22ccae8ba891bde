"""Remember request ids for a while, in bounded memory, to spot replayed sealed results."""

from __future__ import annotations

from collections import OrderedDict


class ReplayCache:
    """Ids seen in the last ``ttl`` seconds, at most ``max_entries`` of them.

    When full, the oldest id is forgotten first and counted in ``evicted``: a replay of
    an evicted id is no longer detected, and the counter says how often that can be.
    """

    def __init__(self, ttl: float, max_entries: int) -> None:
        if max_entries < 1:
            raise ValueError("max_entries must be at least 1")
        self.ttl = ttl
        self.max_entries = max_entries
        self.evicted = 0
        self.expired = 0
        self._seen: OrderedDict[str, float] = OrderedDict()

    def __len__(self) -> int:
        return len(self._seen)

    def check_and_add(self, request_id: str, now: float) -> bool:
        """True when ``request_id`` was seen within the ttl; records it either way."""
        self._expire(now)
        first = self._seen.get(request_id)
        if first is not None:
            return True
        self._seen[request_id] = now
        if len(self._seen) > self.max_entries:
            self._seen.popitem(last=False)
            self.evicted += 1
        return False

    def preload(self, items: list[tuple[str, float]], now: float) -> None:
        """Add ids seen before (e.g. by a previous run) that are still within the ttl."""
        merged = dict(self._seen)
        for request_id, when in items:
            # A live sighting wins; among preloaded repeats the oldest counts.
            if now - when < self.ttl and request_id not in self._seen:
                merged[request_id] = min(when, merged.get(request_id, when))
        # Expiry walks the entries in time order, so keep them in time order.
        ordered = sorted(merged.items(), key=lambda item: item[1])
        overflow = max(0, len(ordered) - self.max_entries)
        self.evicted += overflow
        self._seen = OrderedDict(ordered[overflow:])

    def _expire(self, now: float) -> None:
        # Entries are in insertion order, which is time order: stop at the first live one.
        while self._seen:
            request_id, when = next(iter(self._seen.items()))
            if now - when < self.ttl:
                break
            del self._seen[request_id]
            self.expired += 1
