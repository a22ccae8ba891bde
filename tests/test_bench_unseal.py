"""scripts/bench_unseal.py: the sized events the unseal benchmarks time."""

from __future__ import annotations

import json

import pytest

from fp_core import seal_event, summarize
from fp_core.events import Api, event_api
from fp_core.keys import DecryptionKey
from scripts.bench_unseal import check_agree, sized_event, unsealers


def size(event: object) -> int:
    return len(json.dumps(event, separators=(",", ":"), ensure_ascii=False).encode())


@pytest.mark.parametrize("api", ["v3", "v4"])
@pytest.mark.parametrize("target", [1024, 2048, 7000, 65536])
def test_sized_events_are_events_of_about_that_size(api: Api, target: int) -> None:
    event = sized_event(api, target)
    assert event_api(event) == api
    assert 0.5 * target <= size(event) <= 1.5 * target
    summary = summarize(event)
    assert all(summary[name] for name in ("request_id", "visitor_id", "timestamp"))


@pytest.mark.parametrize("api", ["v3", "v4"])
def test_every_implementation_returns_the_event(api: Api) -> None:
    key = DecryptionKey.generate()
    event = sized_event(api, 1024)
    check_agree(unsealers(key, api), seal_event(event, key), event)
