from __future__ import annotations

import json

import pytest

from fp_core.events import event_api, inner_request_id, summarize
from fp_core.generate import generate_event
from tests.vectors import VECTORS, require_vectors


def example(name: str) -> dict[str, object]:
    require_vectors()
    return json.loads((VECTORS / "events" / name).read_text())


@pytest.mark.parametrize(
    ("obj", "api"),
    [
        ({"event_id": "e", "timestamp": 1}, "v4"),
        ({"products": {}}, "v3"),
        ({"event_id": "e", "timestamp": 1, "products": {}}, "v4"),
        ({"event_id": "e", "timestamp": "1", "products": {}}, "v3"),
        ({"event_id": "e"}, None),
        ({"event_id": 1, "timestamp": 1}, None),
        ({"event_id": "e", "timestamp": False}, None),
        ({"products": None}, None),
        ([], None),
        ("x", None),
    ],
)
def test_event_api(obj: object, api: str | None) -> None:
    assert event_api(obj) == api


def test_v4_full_example_summary() -> None:
    s = summarize(example("v4_get_event_200_full.json"))
    assert s["api"] == "v4"
    assert s["request_id"] == "1708102555327.NLOjmg"
    assert s["visitor_id"] == "Ibk1527CUFmcnjLwIs4A9"
    assert s["confidence"] == 0.97
    assert s["visitor_found"] is False
    assert s["bot"] == "not_detected"
    assert s["ip"] == "61.127.217.15"
    assert s["timestamp"] == 1708102555327
    assert s["replayed"] is False
    assert s["signals"]["proxy"] is True
    assert s["signals"]["vpn"] is False
    assert s["signals"]["tor"] is False


def test_v3_full_example_summary() -> None:
    s = summarize(example("v3_get_event_200_full.json"))
    assert s["api"] == "v3"
    assert s["request_id"] == "1708102555327.NLOjmg"
    assert s["visitor_id"] == "Ibk1527CUFmcnjLwIs4A9"
    assert s["bot"] == "not_detected"
    assert s["timestamp"] == 1582299576512
    assert s["signals"]["proxy"] is True
    assert "tor" in s["signals"]


def test_v3_identification_failed_falls_back_to_botd() -> None:
    event = example("v3_get_event_200_bot_bad_identification_failed.json")
    assert inner_request_id(event) == "1708683625245.tuJ4nD"
    s = summarize(event)
    assert s["bot"] == "bad"
    assert s["bot_type"] == "headlessChrome"
    assert s["visitor_id"] is None
    assert s["ip"] == "94.60.143.223"
    assert s["timestamp"] == 1708683625287  # from botd's ISO time


def test_v3_errors_only() -> None:
    event = example("v3_get_event_200_minimal_errors_only.json")
    assert inner_request_id(event) is None
    assert summarize(event)["request_id"] is None


def test_v4_good_bot() -> None:
    s = summarize(example("v4_get_event_bot_good_bot_info.json"))
    assert (s["bot"], s["bot_type"]) == ("good", "chatgpt_agent")


@pytest.mark.parametrize("api", ["v3", "v4"])
@pytest.mark.parametrize("bot", ["not_detected", "good", "bad"])
def test_generated_summary(api: str, bot: str) -> None:
    event = generate_event(api, rng=7, bot=bot, ip="203.0.113.9", replayed=True)  # type: ignore[arg-type]
    s = summarize(event)
    assert s["bot"] == bot
    assert s["ip"] == "203.0.113.9"
    assert s["replayed"] is True
    assert s["request_id"] == inner_request_id(event)


@pytest.mark.parametrize(
    "event",
    [
        {"event_id": "e", "timestamp": 1, "identification": "x", "bot": 3, "ip_blocklist": []},
        {"event_id": "e", "timestamp": 1, "identification": {"confidence": {"score": True}}},
        {"products": {"identification": [], "botd": {"data": {"bot": "bad"}}}},
        {"products": {"identification": {"data": {"timestamp": "x", "time": "not a date"}}}},
        {"products": {"botd": {"data": {"time": "2024-01-01T00:00:00"}}}},
        {"products": {"vpn": {"data": {"result": "yes"}}, "tor": None}},
    ],
)
def test_summary_tolerates_wrong_types(event: dict[str, object]) -> None:
    s = summarize(event)
    assert s["api"] == event_api(event)
    json.dumps(s)  # always JSON-safe
    assert all(isinstance(v, bool) for v in s["signals"].values())


def test_summary_of_non_event() -> None:
    assert summarize({"x": 1})["api"] is None


def test_all_examples_summarise() -> None:
    require_vectors()
    for path in sorted((VECTORS / "events").glob("v*_get_event*.json")):
        s = summarize(json.loads(path.read_text()))
        assert s["api"] == path.name[:2], path.name
