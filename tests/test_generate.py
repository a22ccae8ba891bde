from __future__ import annotations

import json
import random

import pytest

from fp_core import event_api, inner_request_id, summarize
from fp_core.events import Api
from fp_core.generate import generate_event, new_request_id, open_response_body
from tests.vectors import VECTORS


def compact_size(obj: object) -> int:
    return len(json.dumps(obj, separators=(",", ":")))


@pytest.mark.parametrize("api", ["v3", "v4"])
def test_shape_and_ids(api: Api) -> None:
    event = generate_event(
        api, rng=1, request_id="1700000000000.AbCdEf", timestamp_ms=1700000000000
    )
    assert event_api(event) == api
    assert inner_request_id(event) == "1700000000000.AbCdEf"
    assert summarize(event)["timestamp"] == 1700000000000


def test_seeded_is_deterministic() -> None:
    a = generate_event("v4", rng=5, timestamp_ms=1)
    assert a == generate_event("v4", rng=5, timestamp_ms=1)
    assert a != generate_event("v4", rng=6, timestamp_ms=1)


def test_request_id_format() -> None:
    rid = new_request_id(random.Random(1), 1700000000000)
    ts, suffix = rid.split(".")
    assert ts == "1700000000000"
    assert len(suffix) == 6
    assert suffix.isalnum()


@pytest.mark.parametrize("api", ["v3", "v4"])
def test_realistic_size_matches_full_examples(api: str) -> None:
    """A default event has about as many fields and bytes as the full SDK examples."""
    size = compact_size(generate_event(api, rng=3))  # type: ignore[arg-type]
    assert 3_500 <= size <= 9_000
    if (VECTORS / "events").is_dir():
        full = json.loads((VECTORS / "events" / f"{api}_get_event_200_full.json").read_text())
        assert 0.5 <= size / compact_size(full) <= 1.5


@pytest.mark.parametrize("api", ["v3", "v4"])
@pytest.mark.parametrize("target", [1024 * 8, 65536, 262144])
def test_pad_to(api: str, target: int) -> None:
    size = compact_size(generate_event(api, rng=2, pad_to=target))  # type: ignore[arg-type]
    assert target <= size <= target + 400


def test_sparse_keeps_the_essentials() -> None:
    for seed in range(20):
        v4 = generate_event("v4", rng=seed, sparse=True)
        assert event_api(v4) == "v4"
        assert {"url", "ip_address", "bot"} <= set(v4)
        v3 = generate_event("v3", rng=seed, sparse=True)
        assert inner_request_id(v3)
    full = generate_event("v4", rng=1)
    assert any(len(generate_event("v4", rng=s, sparse=True)) < len(full) for s in range(5))


def test_identification_failed_v3() -> None:
    event = generate_event("v3", rng=1, bot="bad", identification_failed=True)
    assert "error" in event["products"]["identification"]
    s = summarize(event)
    assert (s["bot"], s["visitor_id"]) == ("bad", None)
    assert s["request_id"] is not None
    assert s["timestamp"] is not None


def test_open_response_bodies() -> None:
    v3 = open_response_body("v3", "r", "s")
    assert (v3["v"], v3["requestId"], v3["sealedResult"]) == ("2", "r", "s")
    assert open_response_body("v4", "e", "s") == {"event_id": "e", "sealed_result": "s"}


def test_v4_events_satisfy_the_official_sdk_model() -> None:
    models = pytest.importorskip(
        "fingerprint_server_sdk.models.event", reason="official SDK not installed"
    )
    for seed in range(30):
        for bot in ("not_detected", "good", "bad"):
            event = generate_event("v4", rng=seed, bot=bot, sparse=seed % 2 == 0)
            parsed = models.Event.from_dict(event)
            assert parsed.event_id == event["event_id"]


# The whole v3 SDK is deprecated ("migrate to Server API v4"), and says so on import
# and for some of its model classes.
@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_v3_events_satisfy_the_official_v3_sdk_model() -> None:
    """The v3 SDK (``fingerprint-pro-server-api-sdk``) builds its model from our events."""
    client = pytest.importorskip(
        "fingerprint_pro_server_api_sdk.api_client", reason="official v3 SDK not installed"
    )
    for seed in range(30):
        for kwargs in ({"bot": "not_detected"}, {"bot": "bad"}, {"sparse": True}):
            event = generate_event("v3", rng=seed, **kwargs)
            parsed = client.ApiClientDeserializer.deserialize(event, "EventsGetResponse")
            ident = event["products"]["identification"]["data"]
            assert parsed.products.identification.data.request_id == ident["requestId"]
    failed = generate_event("v3", rng=1, bot="bad", identification_failed=True)
    parsed = client.ApiClientDeserializer.deserialize(failed, "EventsGetResponse")
    assert parsed.products.botd.data.bot.result == "bad"
