from __future__ import annotations

import json
from typing import Any

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from fp_core.events import (
    BOOLEAN_SIGNALS,
    BOT_RESULTS,
    MAX_TIME_MS,
    Api,
    _iso_to_ms,
    event_api,
    inner_request_id,
    summarize,
)
from fp_core.generate import generate_event
from tests.vectors import VECTORS, require_vectors


def vector_event(name: str) -> dict[str, object]:
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
    s = summarize(vector_event("v4_get_event_200_full.json"))
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
    s = summarize(vector_event("v3_get_event_200_full.json"))
    assert s["api"] == "v3"
    assert s["request_id"] == "1708102555327.NLOjmg"
    assert s["visitor_id"] == "Ibk1527CUFmcnjLwIs4A9"
    assert s["bot"] == "not_detected"
    assert s["timestamp"] == 1582299576512
    assert s["signals"]["proxy"] is True
    assert "tor" in s["signals"]


def test_v3_identification_failed_falls_back_to_botd() -> None:
    event = vector_event("v3_get_event_200_bot_bad_identification_failed.json")
    assert inner_request_id(event) == "1708683625245.tuJ4nD"
    s = summarize(event)
    assert s["bot"] == "bad"
    assert s["bot_type"] == "headlessChrome"
    assert s["visitor_id"] is None
    assert s["ip"] == "94.60.143.223"
    assert s["timestamp"] == 1708683625287  # from botd's ISO time


def test_v3_errors_only() -> None:
    event = vector_event("v3_get_event_200_minimal_errors_only.json")
    assert inner_request_id(event) is None
    assert summarize(event)["request_id"] is None


def test_v4_good_bot() -> None:
    s = summarize(vector_event("v4_get_event_bot_good_bot_info.json"))
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


# --- The summary against a plain reference -------------------------------------------
# events.py reads events with inlined, hand-tuned lookups because the summary runs for
# every event (BENCHMARKS.md). This reference says the same thing the obvious way, and
# the tests below hold the fast code to it on generated events whose summary fields are
# deleted or swapped for any JSON value. It shares only events.py's ISO time parser,
# which is not on the fast path (v3 events carry an integer timestamp).

_V3_BOTS = {"notDetected": "not_detected", "good": "good", "bad": "bad"}


def _at(obj: object, *path: str) -> object:
    for part in path:
        obj = obj.get(part) if isinstance(obj, dict) else None
    return obj


def _text(value: object) -> str | None:
    return value if isinstance(value, str) else None


def _flag(value: object) -> bool | None:
    return value if isinstance(value, bool) else None


def _num(value: object) -> int | float | None:
    return value if isinstance(value, int | float) and not isinstance(value, bool) else None


def reference_summary(event: object) -> dict[str, object]:
    api = event_api(event)
    signals: dict[str, bool] = {}
    fields: dict[str, object] = {}
    if api == "v4":
        ident = _at(event, "identification")
        for name, _ in BOOLEAN_SIGNALS:
            flag = _flag(_at(event, name))
            if name not in ("tor", "ip_blocklist") and flag is not None:
                signals[name] = flag
        blocklist = _at(event, "ip_blocklist")
        if isinstance(blocklist, dict):
            if (tor := _flag(blocklist.get("tor_node"))) is not None:
                signals["tor"] = tor
            signals["ip_blocklist"] = any(value is True for value in blocklist.values())
        elif isinstance(blocklist, bool):
            signals["ip_blocklist"] = blocklist
        bot = _at(event, "bot")
        fields = {
            "request_id": _text(_at(event, "event_id")),
            "visitor_id": _text(_at(ident, "visitor_id")),
            "visitor_found": _flag(_at(ident, "visitor_found")),
            "confidence": _num(_at(ident, "confidence", "score")),
            "bot": bot if isinstance(bot, str) and bot in BOT_RESULTS else None,
            "bot_type": _text(_at(event, "bot_type")),
            "ip": _text(_at(event, "ip_address")),
            "url": _text(_at(event, "url")),
            "timestamp": _time(_at(event, "timestamp")),
            "replayed": _flag(_at(event, "replayed")),
            "linked_id": _text(_at(event, "linked_id")),
            "suspect_score": _num(_at(event, "suspect_score")),
        }
    elif api == "v3":
        ident = _at(event, "products", "identification", "data")
        botd = _at(event, "products", "botd", "data")
        for name, product in BOOLEAN_SIGNALS:
            if (flag := _flag(_at(event, "products", product, "data", "result"))) is not None:
                signals[name] = flag
        timestamp = _time(_at(ident, "timestamp"))
        if timestamp is None:
            timestamp = _iso_to_ms(_at(ident, "time")) or _iso_to_ms(_at(botd, "time"))
        result = _at(botd, "bot", "result")
        fields = {
            "request_id": _text(_at(ident, "requestId")) or _text(_at(botd, "requestId")),
            "visitor_id": _text(_at(ident, "visitorId")),
            "visitor_found": _flag(_at(ident, "visitorFound")),
            "confidence": _num(_at(ident, "confidence", "score")),
            "bot": _V3_BOTS.get(result) if isinstance(result, str) else None,
            "bot_type": _text(_at(botd, "bot", "type")),
            "ip": _text(_at(ident, "ip")) or _text(_at(botd, "ip")),
            "url": _text(_at(ident, "url")) or _text(_at(botd, "url")),
            "timestamp": timestamp,
            "replayed": _flag(_at(ident, "replayed")),
            "linked_id": _text(_at(ident, "linkedId")) or _text(_at(botd, "linkedId")),
            "suspect_score": _num(_at(event, "products", "suspectScore", "data", "result")),
        }
    empty = dict.fromkeys(("request_id", "visitor_id", "visitor_found", "confidence", "bot"))
    empty |= dict.fromkeys(("bot_type", "ip", "url", "timestamp", "replayed", "linked_id"))
    return {"api": api, **empty, "suspect_score": None, **fields, "signals": signals}


def _time(value: object) -> int | None:
    """A timestamp: an integer a JavaScript Date can hold."""
    if isinstance(value, int) and not isinstance(value, bool) and abs(value) <= MAX_TIME_MS:
        return value
    return None


#: Every place the summary reads, as paths from the event's root.
_V4_PATHS = [
    *[(name,) for name, _ in BOOLEAN_SIGNALS if name != "tor"],
    ("event_id",), ("timestamp",), ("identification",), ("identification", "visitor_id"),
    ("identification", "visitor_found"), ("identification", "confidence"),
    ("identification", "confidence", "score"), ("bot",), ("bot_type",), ("ip_address",),
    ("url",), ("replayed",), ("linked_id",), ("suspect_score",), ("ip_blocklist", "tor_node"),
    ("ip_blocklist", "email_spam"), ("ip_blocklist", "attack_source"),
]  # fmt: skip
_V3_IDENT = (
    "requestId", "visitorId", "visitorFound", "confidence", "timestamp", "time", "ip", "url",
    "replayed", "linkedId",
)  # fmt: skip
_V3_PATHS = [
    ("products",), ("products", "identification"), ("products", "identification", "data"),
    *[("products", "identification", "data", name) for name in _V3_IDENT],
    ("products", "identification", "data", "confidence", "score"),
    ("products", "botd"), ("products", "botd", "data"), ("products", "botd", "data", "bot"),
    *[("products", "botd", "data", name) for name in ("requestId", "ip", "url", "time")],
    ("products", "botd", "data", "linkedId"),
    ("products", "botd", "data", "bot", "result"), ("products", "botd", "data", "bot", "type"),
    ("products", "suspectScore"), ("products", "suspectScore", "data"),
    ("products", "suspectScore", "data", "result"),
    *[("products", product) for _, product in BOOLEAN_SIGNALS],
    *[("products", product, "data") for _, product in BOOLEAN_SIGNALS],
    *[("products", product, "data", "result") for _, product in BOOLEAN_SIGNALS],
]  # fmt: skip
_DELETE = object()
_any_json = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=8)
    | st.sampled_from(["", "bad", "good", "notDetected", "not_detected", "2024-05-01T10:00:00Z"]),
    lambda inner: st.lists(inner, max_size=3)
    | st.dictionaries(st.text(max_size=4), inner, max_size=3),
    max_leaves=6,
)  # fmt: skip


def _apply(event: dict[str, object], path: tuple[str, ...], value: object) -> None:
    parent = _at(event, *path[:-1])
    if not isinstance(parent, dict):
        return
    if value is _DELETE:
        parent.pop(path[-1], None)
    else:
        parent[path[-1]] = value


@st.composite
def changed_events(draw: st.DrawFn) -> dict[str, object]:
    """A generated event with up to six of the fields the summary reads deleted or replaced
    (each path drawn uniformly, so the shape fields are as likely as any other)."""
    api: Api = draw(st.sampled_from(["v3", "v4"]))
    event = generate_event(api, rng=draw(st.integers(0, 2**16)), sparse=draw(st.booleans()))
    paths = _V4_PATHS if api == "v4" else _V3_PATHS
    change = st.tuples(st.sampled_from(paths), st.just(_DELETE) | _any_json)
    for path, value in draw(st.lists(change, max_size=6)):
        _apply(event, path, value)
    return event


def _changed(api: Api, path: tuple[str, ...], value: object) -> dict[str, object]:
    event = generate_event(api, rng=1)
    _apply(event, path, value)
    return event


@settings(max_examples=400, deadline=None)
# An empty first choice gives way to the second: rare in random draws, so named here.
@example(_changed("v3", ("products", "identification", "data", "requestId"), ""))
@example(_changed("v3", ("products", "identification", "data", "ip"), ""))
@example(_changed("v4", ("ip_blocklist", "tor_node"), 1))
@given(event=changed_events())
def test_summary_matches_the_reference(event: dict[str, object]) -> None:
    assert summarize(event) == reference_summary(event)


#: A value of each JSON type (and one of each truthiness), for the sweep below.
_WRONG_VALUES = [_DELETE, None, True, False, 0, 2, 0.5, "", "x", [], [1], {}, {"x": 1}]


@pytest.mark.parametrize("api", ["v3", "v4"])
def test_summary_matches_the_reference_at_every_path(api: Api) -> None:
    """Every path the summary reads, deleted or set to a value of each JSON type."""
    paths = _V4_PATHS if api == "v4" else _V3_PATHS
    for path in paths:
        for value in _WRONG_VALUES:
            event = _changed(api, path, value)
            assert summarize(event) == reference_summary(event), (path, value)


def test_summary_falls_back_to_botd_like_the_reference() -> None:
    """Where the identification lacks a field, botd's value, of any type, stands in."""
    ident, botd = ("products", "identification", "data"), ("products", "botd", "data")
    for name in ("requestId", "ip", "url", "linkedId", "time"):
        for value in [*_WRONG_VALUES, "2024-05-01T10:00:00Z"]:
            event = _changed("v3", (*ident, name), _DELETE)
            _apply(event, (*ident, "timestamp"), _DELETE)  # so that the times are read
            _apply(event, (*botd, name), value)
            assert summarize(event) == reference_summary(event), (name, value)


@pytest.mark.parametrize("api", ["v3", "v4"])
def test_reference_sees_every_signal(api: Api) -> None:
    """The property test's events carry signals, so it compares them too."""
    signals = reference_summary(generate_event(api, rng=11))["signals"]
    assert isinstance(signals, dict)
    assert len(signals) >= 10


@given(st.integers(min_value=0, max_value=4_102_444_800_000))  # 1970 to 2100, in ms
@example(1_099_006_878_916)  # float seconds times 1000 truncate this one to ...915
def test_an_iso_time_is_read_to_the_exact_millisecond(ms: int) -> None:
    from datetime import UTC, datetime

    text = datetime.fromtimestamp(ms // 1000, UTC).isoformat().replace("+00:00", "")
    text += f".{ms % 1000:03d}Z"
    assert _iso_to_ms(text) == ms


@pytest.mark.parametrize("api", ["v4", "v3"])
@pytest.mark.parametrize("timestamp", [MAX_TIME_MS + 1, -MAX_TIME_MS - 1, -(10**4299)])
def test_a_timestamp_no_date_can_hold_reads_as_absent(api: Api, timestamp: int) -> None:
    """Its age would be a number no JSON encoder, SQLite column or saved flow takes: a
    4,300-digit one lost whole record batches (found by a fuzz hunt)."""
    if api == "v4":
        event: dict[str, Any] = {"event_id": "e", "timestamp": timestamp}
    else:
        event = {"products": {"identification": {"data": {"timestamp": timestamp}}}}
    assert summarize(event)["timestamp"] is None
    edge = dict(event)
    if api == "v4":
        edge["timestamp"] = -MAX_TIME_MS
    else:
        edge = {"products": {"identification": {"data": {"timestamp": MAX_TIME_MS}}}}
    assert summarize(edge)["timestamp"] in (MAX_TIME_MS, -MAX_TIME_MS)
