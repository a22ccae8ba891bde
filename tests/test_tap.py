"""fp_core.tap.Tap.inspect: recognise, unseal, check and judge one response."""

from __future__ import annotations

import base64
import json
from collections.abc import Callable
from typing import Any

import pytest

from fp_core import UNSEAL_ERROR_KINDS, seal_event, summarize
from fp_core.checks import CheckConfig, parse_origins
from fp_core.events import Api
from fp_core.generate import generate_event, open_response_body
from fp_core.jsontext import JsonObject, dumps
from fp_core.keys import DecryptionKey
from fp_core.sealed import HEADER, deflate_raw, seal_raw
from fp_core.stats import Stats
from fp_core.tap import METADATA_FIELDS, ResponseInfo, Tap, TapConfig, iso_time, metadata_of

#: The response time of every flow (unless a test moves it): 2023-11-14T22:13:20.123Z.
NOW = 1_700_000_000.123
NOW_MS = 1_700_000_000_123
RID = "1700000000123.abcdef"
CHECK_KEYS = {"id_match", "fresh", "age_ms", "duplicate", "replayed", "ip_match", "origin_ok"}
EVENT_IP = "203.0.113.7"
EVENT_URL = "https://shop.example.com/checkout"


def make_event(api: Api = "v4", **fields: Any) -> dict[str, Any]:
    options: dict[str, Any] = {
        "rng": 7,
        "request_id": RID,
        "timestamp_ms": NOW_MS - 1000,
        "ip": EVENT_IP,
        "url": EVENT_URL,
    }
    options.update(fields)
    return generate_event(api, **options)


def body_of(sealed: str, api: Api = "v4", outer_id: str = RID) -> bytes:
    return json.dumps(open_response_body(api, outer_id, sealed)).encode()


def info_of(body: bytes, **fields: Any) -> ResponseInfo:
    options: dict[str, Any] = {
        "flow_id": "flow-1",
        "time": NOW,
        "host": "fp.shop.example.com",
        "path": "/fpjs/result",
        "method": "POST",
        "status_code": 200,
        "body": body,
    }
    options.update(fields)
    return ResponseInfo(**options)


def sealed_info(
    key: DecryptionKey, api: Api = "v4", *, outer_id: str = RID, **fields: Any
) -> ResponseInfo:
    return info_of(body_of(seal_event(make_event(api, **fields), key), api, outer_id))


def new_tap(key: DecryptionKey, **config: Any) -> Tap:
    return Tap(TapConfig(keys=[key], **config))


#: The snapshot of a tap that has counted and remembered nothing.
UNTOUCHED = {"replay_ids": 0, "replay_evicted": 0}


# -- not an open response ---------------------------------------------------------------


@pytest.mark.parametrize(
    "body",
    [
        b"",
        b"<html>sealedResult</html>",
        b'{"visitorId": "abc"}',
        b'{"requestId": "x", "sealedResult": 5}',
        b'{"sealedResult": "AAAA"}',  # no id
        b'["sealedResult", "requestId"]',
        b'{"requestId": "x", "sealedResult": "AAAA"',  # cut short
        b"\xff\xfe{sealedResult}",
    ],
)
def test_other_traffic_gives_none_and_counts_nothing(key: DecryptionKey, body: bytes) -> None:
    tap = new_tap(key)
    assert tap.inspect(info_of(body)) is None
    assert tap.snapshot() == UNTOUCHED


# -- the ok record ----------------------------------------------------------------------


@pytest.mark.parametrize("api", ["v4", "v3"])
def test_ok_record(key: DecryptionKey, api: Api) -> None:
    tap = new_tap(key)
    event = make_event(api)
    info = info_of(body_of(seal_event(event, key), api), header_client_ip=EVENT_IP)
    record = tap.inspect(info)
    assert record is not None
    assert record["time"] == "2023-11-14T22:13:20.123Z"
    assert record["flow_id"] == "flow-1"
    assert record["host"] == "fp.shop.example.com"
    assert record["path"] == "/fpjs/result"
    assert record["method"] == "POST"
    assert record["status_code"] == 200
    assert record["client_ip"] == EVENT_IP
    assert record["api"] == api
    assert record["request_id"] == RID
    assert record["ok"] is True
    assert record["error"] is None
    assert record["key_id"] == key.key_id
    assert record["checks"] == {
        "id_match": True,
        "fresh": True,
        "age_ms": 1000,
        "duplicate": False,
        "replayed": False,
        "ip_match": True,
        "origin_ok": None,  # no origins configured
    }
    assert record["verdict"] == "trusted"
    assert record["reasons"] == []
    assert record["summary"] == summarize(event)
    assert record["summary"]["request_id"] == RID
    assert record["event"] == event
    assert type(record["event"]) is JsonObject, "not the UnsealedEvent, which has more"
    # The whole record is JSON as the sinks write it, the event as the very text sealed.
    assert json.loads(dumps(record)) == record
    sealed_text = json.dumps(event, separators=(",", ":"), ensure_ascii=False)
    assert dumps(record).endswith(f',"event":{sealed_text}}}')
    assert tap.snapshot() == {
        "open_responses": 1,
        "unsealed": 1,
        "verdicts": {"trusted": 1},
        "replay_ids": 1,
        "replay_evicted": 0,
    }


def test_include_event_false_leaves_the_event_out(key: DecryptionKey) -> None:
    with_event = new_tap(key).inspect(sealed_info(key))
    without = new_tap(key, include_event=False).inspect(sealed_info(key))
    assert with_event is not None
    assert without is not None
    assert "event" in with_event
    assert "event" not in without
    assert without == {k: v for k, v in with_event.items() if k != "event"}


def test_key_rotation_reports_the_key_that_worked(
    key: DecryptionKey, other_key: DecryptionKey
) -> None:
    tap = Tap(TapConfig(keys=[other_key, key]))
    record = tap.inspect(sealed_info(key))
    assert record is not None
    assert record["ok"] is True
    assert record["key_id"] == key.key_id


def test_iso_time() -> None:
    assert iso_time(0) == "1970-01-01T00:00:00.000Z"
    assert iso_time(1_700_000_000.5) == "2023-11-14T22:13:20.500Z"


# -- errors -----------------------------------------------------------------------------

ErrorCase = Callable[[DecryptionKey, DecryptionKey], tuple[TapConfig, str]]


def _with_key(key: DecryptionKey, sealed: str, **config: Any) -> tuple[TapConfig, str]:
    return TapConfig(keys=[key], **config), sealed


def _b64(raw: bytes) -> str:
    return base64.b64encode(raw).decode()


ERROR_CASES: dict[str, ErrorCase] = {
    "bad_base64": lambda k, o: _with_key(k, "!!! not base64 !!!"),
    "invalid_header": lambda k, o: _with_key(k, _b64(bytes(64))),
    "too_short": lambda k, o: _with_key(k, _b64(HEADER + bytes(8))),
    "no_keys": lambda k, o: (TapConfig(keys=()), seal_event(make_event(), k)),
    "decrypt_failed": lambda k, o: _with_key(k, seal_event(make_event(), o)),
    # BFINAL=1 with the reserved block type: authenticates, but is not raw DEFLATE.
    "decompress_failed": lambda k, o: _with_key(k, _b64(seal_raw(b"\xff" * 32, k))),
    "too_large": lambda k, o: _with_key(k, seal_event(make_event(), k), max_event=100),
    "invalid_json": lambda k, o: _with_key(k, _b64(seal_raw(deflate_raw(b"{not json"), k))),
    "not_an_event": lambda k, o: _with_key(k, seal_event({"hello": "world"}, k)),
}


def test_every_error_kind_is_covered() -> None:
    assert set(ERROR_CASES) == set(UNSEAL_ERROR_KINDS)


@pytest.mark.parametrize("api", ["v4", "v3"])
@pytest.mark.parametrize("kind", sorted(ERROR_CASES))
def test_error_record(key: DecryptionKey, other_key: DecryptionKey, kind: str, api: Api) -> None:
    config, sealed = ERROR_CASES[kind](key, other_key)
    tap = Tap(config)
    record = tap.inspect(info_of(body_of(sealed, api)))
    assert record is not None
    assert record["ok"] is False
    assert record["verdict"] == "error"
    assert record["reasons"] == [kind]
    assert record["error"]["kind"] == kind
    assert isinstance(record["error"]["message"], str)
    assert record["error"]["message"]
    assert record["key_id"] is None
    assert record["checks"] == dict.fromkeys(CHECK_KEYS)
    assert record["summary"] == summarize(None) | {"api": api}
    assert record["api"] == api
    assert record["request_id"] == RID
    assert record["time"] == "2023-11-14T22:13:20.123Z"
    assert "event" not in record
    assert json.loads(dumps(record)) == record
    assert tap.snapshot() == {
        "open_responses": 1,
        "errors": {kind: 1},
        "replay_ids": 0,
        "replay_evicted": 0,
    }


@pytest.mark.parametrize("kind", sorted(ERROR_CASES))
def test_error_not_remembered_counts_nothing(
    key: DecryptionKey, other_key: DecryptionKey, kind: str
) -> None:
    config, sealed = ERROR_CASES[kind](key, other_key)
    tap = Tap(config)
    record = tap.inspect(info_of(body_of(sealed)), remember=False)
    assert record is not None
    assert record["reasons"] == [kind]
    assert tap.snapshot() == UNTOUCHED


# -- the checks through inspect ---------------------------------------------------------


def test_id_mismatch(key: DecryptionKey) -> None:
    tap = new_tap(key)
    # The sealed result of request RID, spliced into the response of another request.
    record = tap.inspect(sealed_info(key, outer_id="1700000000999.zzzzzz"))
    assert record is not None
    assert record["request_id"] == "1700000000999.zzzzzz"
    assert record["summary"]["request_id"] == RID
    assert record["checks"]["id_match"] is False
    assert record["verdict"] == "suspicious"
    assert record["reasons"] == ["id_mismatch"]
    assert tap.stats.group("reasons") == {"id_mismatch": 1}


def test_replay_memory_uses_the_sealed_id(key: DecryptionKey) -> None:
    # The genuine response first; then its sealed result spliced under another outer id
    # is still the same event: a duplicate.
    tap = new_tap(key)
    sealed = seal_event(make_event(), key)
    first = tap.inspect(info_of(body_of(sealed)))
    spliced = tap.inspect(info_of(body_of(sealed, outer_id="1700000000999.zzzzzz")))
    assert first is not None
    assert spliced is not None
    assert first["checks"]["duplicate"] is False
    assert spliced["checks"]["duplicate"] is True
    assert spliced["reasons"] == ["id_mismatch", "duplicate"]


def test_same_id_twice_is_a_duplicate(key: DecryptionKey) -> None:
    tap = new_tap(key)
    first = tap.inspect(sealed_info(key))
    # Sealed again (a new nonce): different bytes, same request id.
    second = tap.inspect(sealed_info(key, rng=8))
    assert first is not None
    assert second is not None
    assert first["checks"]["duplicate"] is False
    assert first["reasons"] == []
    assert second["checks"]["duplicate"] is True
    assert second["verdict"] == "suspicious"
    assert second["reasons"] == ["duplicate"]
    assert tap.snapshot() == {
        "open_responses": 2,
        "unsealed": 2,
        "reasons": {"duplicate": 1},
        "verdicts": {"suspicious": 1, "trusted": 1},
        "replay_ids": 1,
        "replay_evicted": 0,
    }


def test_duplicates_are_forgotten_after_the_replay_ttl(key: DecryptionKey) -> None:
    tap = new_tap(key, replay_ttl=60.0)
    body = sealed_info(key).body
    assert tap.inspect(info_of(body)) is not None
    later = tap.inspect(info_of(body, time=NOW + 61))
    assert later is not None
    assert later["checks"]["duplicate"] is False
    assert tap.replay.expired == 1


def test_remember_false_changes_nothing(key: DecryptionKey) -> None:
    tap = new_tap(key)
    info = sealed_info(key)
    reread = tap.inspect(info, remember=False)
    assert reread is not None
    assert reread["ok"] is True
    assert reread["checks"]["duplicate"] is None
    assert tap.snapshot() == UNTOUCHED
    assert len(tap.replay) == 0
    # It was not recorded either: the first remembered sighting is not a duplicate.
    first = tap.inspect(info)
    assert first is not None
    assert first["checks"]["duplicate"] is False
    after_first = tap.snapshot()
    # Re-reading a seen response neither flags it nor counts anything.
    again = tap.inspect(info, remember=False)
    assert again is not None
    assert again["checks"]["duplicate"] is None
    assert "duplicate" not in again["reasons"]
    assert tap.snapshot() == after_first
    # Only a remembered second sighting is a duplicate.
    second = tap.inspect(info)
    assert second is not None
    assert second["checks"]["duplicate"] is True


def test_remember_false_still_judges_the_rest(key: DecryptionKey) -> None:
    tap = new_tap(key)
    record = tap.inspect(sealed_info(key, bot="bad", replayed=True), remember=False)
    assert record is not None
    assert record["reasons"] == ["replayed", "bad_bot"]
    assert tap.snapshot() == UNTOUCHED


def test_stale_event(key: DecryptionKey) -> None:
    tap = new_tap(key)
    record = tap.inspect(sealed_info(key, timestamp_ms=NOW_MS - 60_000))
    assert record is not None
    assert record["checks"]["fresh"] is False
    assert record["checks"]["age_ms"] == 60_000
    assert record["reasons"] == ["stale"]
    assert record["verdict"] == "suspicious"


def test_event_from_the_future(key: DecryptionKey) -> None:
    tap = new_tap(key)
    record = tap.inspect(sealed_info(key, timestamp_ms=NOW_MS + 60_000))
    assert record is not None
    assert record["checks"]["fresh"] is False
    assert record["checks"]["age_ms"] == -60_000
    assert record["reasons"] == ["from_future"]


def test_freshness_follows_the_configured_max_age(key: DecryptionKey) -> None:
    tap = new_tap(key, checks=CheckConfig(max_age_ms=120_000))
    record = tap.inspect(sealed_info(key, timestamp_ms=NOW_MS - 60_000))
    assert record is not None
    assert record["checks"]["fresh"] is True
    assert record["verdict"] == "trusted"


def test_freshness_is_measured_at_the_response_time(key: DecryptionKey) -> None:
    # The same event, seen 30 s after the response time used elsewhere, is stale.
    tap = new_tap(key)
    record = tap.inspect(info_of(sealed_info(key).body, time=NOW + 30))
    assert record is not None
    assert record["checks"]["age_ms"] == 31_000
    assert record["checks"]["fresh"] is False


@pytest.mark.parametrize("api", ["v4", "v3"])
def test_replayed_flag(key: DecryptionKey, api: Api) -> None:
    record = new_tap(key).inspect(sealed_info(key, api, replayed=True))
    assert record is not None
    assert record["checks"]["replayed"] is True
    assert record["reasons"] == ["replayed"]


@pytest.mark.parametrize("api", ["v4", "v3"])
def test_bad_bot(key: DecryptionKey, api: Api) -> None:
    tap = new_tap(key)
    record = tap.inspect(sealed_info(key, api, bot="bad"))
    assert record is not None
    assert record["summary"]["bot"] == "bad"
    assert record["verdict"] == "suspicious"
    assert record["reasons"] == ["bad_bot"]
    assert tap.stats.group("reasons") == {"bad_bot": 1}


def test_good_bot_is_trusted(key: DecryptionKey) -> None:
    record = new_tap(key).inspect(sealed_info(key, bot="good"))
    assert record is not None
    assert record["summary"]["bot"] == "good"
    assert record["verdict"] == "trusted"


@pytest.mark.parametrize(
    ("header", "peer", "client_ip", "ip_match", "reasons"),
    [
        (EVENT_IP, None, EVENT_IP, True, []),
        (f"::ffff:{EVENT_IP}", "10.0.0.1", f"::ffff:{EVENT_IP}", True, []),
        ("198.51.100.9", None, "198.51.100.9", False, ["ip_mismatch"]),
        # The header wins over the connection.
        (EVENT_IP, "8.8.8.8", EVENT_IP, True, []),
        # No header: a public peer is compared, a private one is not.
        (None, "8.8.8.8", "8.8.8.8", False, ["ip_mismatch"]),
        (None, "10.0.0.1", "10.0.0.1", None, []),
        (None, None, None, None, []),
    ],
)
def test_ip_match(
    key: DecryptionKey,
    header: str | None,
    peer: str | None,
    client_ip: str | None,
    ip_match: bool | None,
    reasons: list[str],
) -> None:
    info = info_of(sealed_info(key).body, header_client_ip=header, peer_ip=peer)
    record = new_tap(key).inspect(info)
    assert record is not None
    assert record["client_ip"] == client_ip
    assert record["checks"]["ip_match"] is ip_match
    assert record["reasons"] == reasons


@pytest.mark.parametrize(
    ("origins", "origin_ok", "reasons"),
    [
        (["https://shop.example.com"], True, []),
        (["https://SHOP.example.com:443", "http://localhost:3000"], True, []),
        (["https://other.example.com"], False, ["origin_mismatch"]),
    ],
)
def test_origin_check(
    key: DecryptionKey, origins: list[str], origin_ok: bool, reasons: list[str]
) -> None:
    tap = new_tap(key, checks=CheckConfig(origins=parse_origins(origins)))
    record = tap.inspect(sealed_info(key))
    assert record is not None
    assert record["checks"]["origin_ok"] is origin_ok
    assert record["reasons"] == reasons


def test_v3_event_without_identification_uses_the_botd_id(key: DecryptionKey) -> None:
    record = new_tap(key).inspect(sealed_info(key, "v3", identification_failed=True))
    assert record is not None
    assert record["summary"]["request_id"] == RID
    assert record["checks"]["id_match"] is True
    assert record["checks"]["duplicate"] is False


# -- metadata and snapshot --------------------------------------------------------------


def test_metadata_of_an_ok_record(key: DecryptionKey) -> None:
    record = new_tap(key).inspect(sealed_info(key))
    assert record is not None
    meta = metadata_of(record)
    assert list(meta) == list(METADATA_FIELDS)
    assert "event" not in meta
    assert meta == {name: record[name] for name in METADATA_FIELDS}
    # What is saved with the flow must be JSON, and must not hold the plaintext event:
    # the event's device attributes appear nowhere in it.
    text = dumps(meta)
    assert json.loads(text) == meta
    assert "raw_device_attributes" not in text
    assert "user_agent" not in text


def test_metadata_of_an_error_record(key: DecryptionKey, other_key: DecryptionKey) -> None:
    record = new_tap(key).inspect(info_of(body_of(seal_event(make_event(), other_key))))
    assert record is not None
    meta = metadata_of(record)
    assert meta["ok"] is False
    assert meta["error"]["kind"] == "decrypt_failed"
    assert set(meta) == set(METADATA_FIELDS)


def test_snapshot_reports_the_replay_memory(key: DecryptionKey) -> None:
    tap = new_tap(key, replay_max_entries=2)
    for i in range(3):
        rid = f"1700000000123.id{i:04d}"
        assert tap.inspect(sealed_info(key, outer_id=rid, request_id=rid)) is not None
    snap = tap.snapshot()
    assert snap["replay_ids"] == 2
    assert snap["replay_evicted"] == 1
    assert snap["unsealed"] == 3
    assert snap["open_responses"] == 3
    assert snap["verdicts"] == {"trusted": 3}


def test_tap_uses_the_given_stats(key: DecryptionKey) -> None:
    stats = Stats()
    stats.incr("responses", 5)  # counted by the addon, outside the tap
    tap = Tap(TapConfig(keys=[key]), stats)
    tap.inspect(sealed_info(key))
    assert stats.get("unsealed") == 1
    assert tap.snapshot()["responses"] == 5


# -- lone surrogates: a "\ud800" escape has no UTF-8 form ---------------------------------


def test_a_lone_surrogate_in_the_outer_id_is_kept_as_its_escape(key: DecryptionKey) -> None:
    """No key needed to send it: the record must still go into every file and column."""
    record = new_tap(key).inspect(info_of(b'{"requestId": "\\ud800", "sealedResult": "x"}'))
    assert record is not None
    assert record["request_id"] == "\\ud800"
    assert dumps(record).encode("utf-8")


def test_a_lone_surrogate_in_the_event_is_kept_as_its_escape_in_the_summary(
    key: DecryptionKey,
) -> None:
    """flow.metadata holds the summary, and mitmproxy saves flows (-w) as UTF-8."""
    from mitmproxy.io import tnetstring

    event = make_event()
    event["linked_id"] = "a\ud800b"
    record = new_tap(key).inspect(info_of(body_of(seal_event(event, key))))
    assert record is not None
    assert record["summary"]["linked_id"] == "a\\ud800b"
    assert tnetstring.dumps(metadata_of(record))
    line = dumps(record)
    assert json.loads(line)["event"]["linked_id"] == "a\ud800b", "the event as sealed"
