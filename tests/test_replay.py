"""fp_core.replay.ReplayCache: first sighting, ttl, bounded memory, preload."""

from __future__ import annotations

import pytest

from fp_core.replay import ReplayCache

T0 = 1_700_000_000.0


def test_first_sighting_false_then_true() -> None:
    cache = ReplayCache(ttl=60, max_entries=10)
    assert cache.check_and_add("a", T0) is False
    assert cache.check_and_add("a", T0 + 1) is True
    assert cache.check_and_add("a", T0 + 2) is True
    # Another id is independent.
    assert cache.check_and_add("b", T0 + 2) is False
    assert len(cache) == 2


def test_ttl_expiry_counts_expired() -> None:
    cache = ReplayCache(ttl=10, max_entries=10)
    assert cache.check_and_add("a", T0) is False
    # Just inside the ttl: still a replay. Repeats do not extend the window.
    assert cache.check_and_add("a", T0 + 9.999) is True
    assert cache.expired == 0
    # At exactly the ttl the id is forgotten, and seen afresh.
    assert cache.check_and_add("a", T0 + 10) is False
    assert cache.expired == 1
    assert cache.evicted == 0
    assert len(cache) == 1


def test_expiry_drops_every_old_id_and_keeps_live_ones() -> None:
    cache = ReplayCache(ttl=10, max_entries=100)
    for i in range(5):
        cache.check_and_add(f"old{i}", T0 + i)
    cache.check_and_add("new", T0 + 8)
    # At T0+12.5: old0..old2 (ages 12.5, 11.5, 10.5) are gone, old3/old4/new live.
    assert cache.check_and_add("probe", T0 + 12.5) is False
    assert cache.expired == 3
    assert len(cache) == 4
    assert cache.check_and_add("old3", T0 + 12.5) is True
    assert cache.check_and_add("new", T0 + 12.5) is True
    assert cache.check_and_add("old0", T0 + 12.5) is False


def test_max_entries_evicts_the_oldest() -> None:
    cache = ReplayCache(ttl=3600, max_entries=3)
    for i, rid in enumerate("abc"):
        assert cache.check_and_add(rid, T0 + i) is False
    assert cache.evicted == 0
    assert cache.check_and_add("d", T0 + 3) is False
    assert len(cache) == 3
    assert cache.evicted == 1
    assert cache.expired == 0
    # "a" was the oldest: its replay is no longer detected (and the counter says so).
    assert cache.check_and_add("b", T0 + 4) is True
    assert cache.check_and_add("c", T0 + 4) is True
    assert cache.check_and_add("d", T0 + 4) is True
    assert cache.check_and_add("a", T0 + 4) is False
    assert cache.evicted == 2  # re-adding "a" pushed out "b"
    assert cache.check_and_add("b", T0 + 5) is False


def test_memory_bounded_under_many_inserts() -> None:
    cache = ReplayCache(ttl=3600, max_entries=1000)
    n = 100_000
    for i in range(n):
        cache.check_and_add(f"id{i}", T0 + i * 0.001)
        assert len(cache) <= 1000
    assert len(cache) == 1000
    assert cache.evicted == n - 1000
    assert cache.expired == 0
    # The newest 1000 are remembered; the oldest are gone.
    assert cache.check_and_add(f"id{n - 1}", T0 + n * 0.001) is True
    assert cache.check_and_add(f"id{n - 1000}", T0 + n * 0.001) is True
    assert cache.check_and_add(f"id{n - 1001}", T0 + n * 0.001) is False


@pytest.mark.parametrize("max_entries", [0, -1])
def test_max_entries_below_one_is_rejected(max_entries: int) -> None:
    with pytest.raises(ValueError, match="max_entries"):
        ReplayCache(ttl=60, max_entries=max_entries)


def test_max_entries_of_one_works() -> None:
    cache = ReplayCache(ttl=60, max_entries=1)
    assert cache.check_and_add("a", T0) is False
    assert cache.check_and_add("a", T0) is True
    assert cache.check_and_add("b", T0) is False
    assert cache.check_and_add("a", T0) is False
    assert cache.evicted == 2


# -- preload ----------------------------------------------------------------------------


def test_preload_keeps_only_ids_within_the_ttl() -> None:
    cache = ReplayCache(ttl=100, max_entries=10)
    cache.preload([("live", T0 - 50), ("dead", T0 - 100), ("older", T0 - 500)], now=T0)
    assert len(cache) == 1
    assert cache.check_and_add("live", T0) is True
    assert cache.check_and_add("dead", T0) is False
    assert cache.check_and_add("older", T0) is False


def test_preloaded_ids_keep_their_own_time() -> None:
    # An id preloaded from 90 s ago expires 10 s later, not 100 s later.
    cache = ReplayCache(ttl=100, max_entries=10)
    cache.preload([("a", T0 - 90)], now=T0)
    assert cache.check_and_add("a", T0 + 9) is True
    assert cache.check_and_add("a", T0 + 10) is False
    assert cache.expired == 1


def test_preload_sorts_by_time_so_expiry_goes_oldest_first() -> None:
    cache = ReplayCache(ttl=100, max_entries=10)
    # Given newest first: expiry must still find the oldest at the front.
    cache.preload([("c", T0 - 10), ("b", T0 - 50), ("a", T0 - 90)], now=T0)
    assert len(cache) == 3
    assert cache.check_and_add("probe", T0 + 20) is False  # "a" is 110 s old now
    assert cache.expired == 1
    assert cache.check_and_add("b", T0 + 20) is True
    assert cache.check_and_add("c", T0 + 20) is True
    assert cache.check_and_add("probe2", T0 + 60) is False  # "b" is 110 s old now
    assert cache.expired == 2
    assert cache.check_and_add("c", T0 + 60) is True


def test_preload_over_capacity_keeps_the_newest() -> None:
    cache = ReplayCache(ttl=1000, max_entries=3)
    items = [(f"id{i}", T0 - 100 + i) for i in range(10)]
    cache.preload(list(reversed(items)), now=T0)
    assert len(cache) == 3
    assert cache.evicted == 7
    for i in (7, 8, 9):
        assert cache.check_and_add(f"id{i}", T0) is True
    assert cache.check_and_add("id6", T0) is False


def test_preload_ignores_ids_already_known_and_repeats() -> None:
    cache = ReplayCache(ttl=100, max_entries=10)
    cache.check_and_add("a", T0)
    cache.preload([("a", T0 - 90), ("b", T0 - 20), ("b", T0 - 10)], now=T0)
    assert len(cache) == 2
    # "a" keeps its live sighting at T0, so the older preload time does not expire it.
    assert cache.check_and_add("a", T0 + 50) is True
    assert cache.check_and_add("b", T0 + 50) is True


def test_preload_repeats_keep_the_first_sighting() -> None:
    cache = ReplayCache(ttl=100, max_entries=10)
    cache.preload([("b", T0 - 10), ("b", T0 - 20)], now=T0)
    assert len(cache) == 1
    # The oldest sighting (T0-20) counts: gone at T0+80.
    assert cache.check_and_add("b", T0 + 79) is True
    assert cache.check_and_add("b", T0 + 80) is False


def test_preload_into_a_used_cache_still_expires_by_time() -> None:
    cache = ReplayCache(ttl=100, max_entries=10)
    cache.check_and_add("live", T0)
    cache.preload([("old", T0 - 50)], now=T0)
    # At T0+60 "old" is 110 s old: outside the ttl, so it is a first sighting again.
    assert cache.check_and_add("old", T0 + 60) is False
