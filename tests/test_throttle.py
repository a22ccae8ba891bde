"""fp_core.throttle: one warning per problem per period."""

from __future__ import annotations

from fp_core.throttle import Throttle


def test_once_per_period_per_topic() -> None:
    now = [100.0]
    throttle = Throttle(every=10, clock=lambda: now[0])
    assert throttle.ready("a")
    assert not throttle.ready("a")
    assert throttle.ready("b"), "topics are apart"
    now[0] += 9.9
    assert not throttle.ready("a")
    now[0] += 0.1
    assert throttle.ready("a")
    assert not throttle.ready("a")
