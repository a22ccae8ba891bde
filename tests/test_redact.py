from __future__ import annotations

import json
import time
from typing import Any

import pytest

from fp_core import seal_event
from fp_core.generate import generate_event, open_response_body
from fp_core.keys import DecryptionKey
from fp_core.redact import PRESETS, REDACTED, Redactor, parse_paths
from fp_core.tap import ResponseInfo, Tap, TapConfig

IP = "198.51.100.77"
CLIENT_IP = "192.0.2.55"
URL = "https://pii.example/checkout?email=someone%40example.com"


def pii_values(event: dict[str, Any], api: str) -> list[str]:
    """The personal data a generated event holds: IPs, URL, user agent, geo, linked id."""
    if api == "v4":
        geo = event["ip_info"]["v4"]["geolocation"]
        return [
            IP,
            URL,
            event["user_agent"],
            event["linked_id"],
            geo["city_name"],
            str(geo["latitude"]),
        ]
    data = event["products"]["identification"]["data"]
    geo = data["ipLocation"]
    return [
        IP,
        URL,
        data["browserDetails"]["userAgent"],
        data["linkedId"],
        geo["city"]["name"],
        str(geo["latitude"]),
    ]


def record_for(api: str, redact: list[str]) -> tuple[dict[str, Any], dict[str, Any]]:
    key = DecryptionKey.generate()
    event = generate_event(api, rng=5, ip=IP, url=URL)  # type: ignore[arg-type]
    rid = (
        event["event_id"]
        if api == "v4"
        else event["products"]["identification"]["data"]["requestId"]
    )
    body = json.dumps(open_response_body(api, rid, seal_event(event, key))).encode()  # type: ignore[arg-type]
    tap = Tap(TapConfig(keys=[key], redactor=Redactor(parse_paths(redact))))
    info = ResponseInfo(
        "f1", time.time(), "fp.example", "/", "POST", 200, body, header_client_ip=CLIENT_IP
    )
    record = tap.inspect(info)
    assert record is not None
    return record, event


@pytest.mark.parametrize("api", ["v3", "v4"])
def test_pii_preset_leaves_no_personal_data(api: str) -> None:
    record, event = record_for(api, ["pii"])
    text = json.dumps(record)
    for value in [*pii_values(event, api), CLIENT_IP]:
        assert value not in text
    assert record["client_ip"] == REDACTED
    assert record["summary"]["ip"] == REDACTED
    assert record["summary"]["url"] == REDACTED
    # What is not personal stays: ids, verdicts, bot, signals.
    assert record["summary"]["visitor_id"] == (
        event["identification"]["visitor_id"]
        if api == "v4"
        else event["products"]["identification"]["data"]["visitorId"]
    )
    assert record["request_id"]
    # Checks ran on the real values before redaction: the client IP differs from the event's.
    assert record["reasons"] == ["ip_mismatch"]
    assert record["summary"]["bot"] == "not_detected"


@pytest.mark.parametrize("api", ["v3", "v4"])
def test_without_redaction_the_values_are_there(api: str) -> None:
    """The other side of the test above: the values were there to be redacted."""
    record, event = record_for(api, [])
    text = json.dumps(record)
    assert all(value in text for value in pii_values(event, api))


def test_custom_paths_and_wildcards() -> None:
    record: dict[str, Any] = {
        "client_ip": "1.2.3.4",
        "summary": {"url": "u", "ip": None},
        "event": {"list": [{"a": 1}, {"a": 2}, {"b": 3}], "map": {"x": {"a": 1}, "y": {"a": None}}},
    }
    redactor = Redactor(
        parse_paths(
            ["event.list.*.a", "event.map.*.a", "summary.url", "summary.ip", "event.nope.x"]
        )
    )
    assert redactor.apply(record) == 4
    assert record["event"]["list"] == [{"a": REDACTED}, {"a": REDACTED}, {"b": 3}]
    assert record["event"]["map"] == {"x": {"a": REDACTED}, "y": {"a": None}}  # null stays null
    assert record["summary"] == {"url": REDACTED, "ip": None}
    assert record["client_ip"] == "1.2.3.4"
    assert redactor.apply(record) == 0  # idempotent


def test_whole_subtrees_and_scalars_in_the_way() -> None:
    record: dict[str, Any] = {"event": {"ip_info": {"v4": {"address": "x"}}, "url": 5, "s": "text"}}
    Redactor(parse_paths(["event.ip_info", "event.s.deeper", "event.url.*"])).apply(record)
    assert record["event"] == {"ip_info": REDACTED, "url": 5, "s": "text"}


@pytest.mark.parametrize(
    "bad",
    [
        "",
        "event..x",
        "visitor_id",
        "request_id",
        "checks.id_match",
        "client_ip.x",
        ".event",
        # The summary is an object the comment, the log line and the store read, and its
        # request id what the replay memory is reloaded from.
        "summary",
        "summary.request_id",
        "summary.api",
        "summary.*",
        "summary.request_id.x",
        # The webhook's body: redacted whole, it would stop every delivery.
        "event",
        " event ",
    ],
)
def test_bad_paths_are_rejected_with_the_entry_named(bad: str) -> None:
    with pytest.raises(ValueError, match=r"redaction path|empty part"):
        parse_paths([bad])


def test_preset_expansion_and_dedup() -> None:
    paths = parse_paths(["pii", "client_ip", "event.tags"])
    assert paths[: len(PRESETS["pii"])] == tuple(tuple(p.split(".")) for p in PRESETS["pii"])
    assert paths[-1] == ("event", "tags")
    assert paths.count(("client_ip",)) == 1
    assert not Redactor(parse_paths([]))


def test_error_records_are_redacted_too() -> None:
    tap = Tap(TapConfig(keys=[], redactor=Redactor(parse_paths(["pii"]))))
    body = json.dumps({"event_id": "e", "sealed_result": "AAAA"}).encode()
    record = tap.inspect(ResponseInfo("f", 1.0, "h", "/", "POST", 200, body, peer_ip="8.8.8.8"))
    assert record is not None
    assert record["client_ip"] == REDACTED


def test_the_whole_event_is_refused_with_what_to_do_instead() -> None:
    with pytest.raises(ValueError, match="the event as a whole stays") as info:
        parse_paths(["event"])
    assert "fp_include_event=false" in str(info.value)
    assert parse_paths(["event.ip_address"]) == (("event", "ip_address"),)
