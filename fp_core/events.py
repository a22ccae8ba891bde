"""Server API events (v3 ``{"products": ...}`` and v4 flat): shape and summary.

Every accessor tolerates any JSON: a field of the wrong type reads as absent, so a
summary can be made of whatever an authenticated payload holds.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any, Literal, TypeGuard

Api = Literal["v3", "v4"]

BOT_RESULTS = ("not_detected", "good", "bad")
_V3_BOT = {"notDetected": "not_detected", "good": "good", "bad": "bad"}

#: Boolean smart signals: summary name (the v4 field) and the v3 product holding it.
BOOLEAN_SIGNALS: tuple[tuple[str, str], ...] = (
    ("vpn", "vpn"),
    ("proxy", "proxy"),
    ("tampering", "tampering"),
    ("incognito", "incognito"),
    ("tor", "tor"),
    ("ip_blocklist", "ipBlocklist"),
    ("root_apps", "rootApps"),
    ("emulator", "emulator"),
    ("cloned_app", "clonedApp"),
    ("jailbroken", "jailbroken"),
    ("frida", "frida"),
    ("privacy_settings", "privacySettings"),
    ("virtual_machine", "virtualMachine"),
    ("high_activity_device", "highActivity"),
    ("location_spoofing", "locationSpoofing"),
    ("developer_tools", "developerTools"),
    ("mitm_attack", "mitmAttack"),
    ("remote_control", "remoteControl"),
    ("simulator", "simulator"),
)


def event_api(obj: object) -> Api | None:
    """``"v4"`` for ``event_id`` (str) + ``timestamp`` (int), ``"v3"`` for a ``products`` object."""
    if not isinstance(obj, dict):
        return None
    if isinstance(obj.get("event_id"), str) and _is_int(obj.get("timestamp")):
        return "v4"
    if isinstance(obj.get("products"), dict):
        return "v3"
    return None


def _is_int(value: object) -> TypeGuard[int]:
    return isinstance(value, int) and not isinstance(value, bool)


def _get(obj: object, *path: str) -> Any:
    for part in path:
        if not isinstance(obj, dict):
            return None
        obj = obj.get(part)
    return obj


def _str(value: object) -> str | None:
    return value if isinstance(value, str) else None


def _iso_to_ms(value: object) -> int | None:
    if not isinstance(value, str):
        return None
    try:
        parsed = datetime.fromisoformat(value)
    except ValueError:
        return None
    if parsed.tzinfo is None:
        return None
    # Exact, in integers: float seconds times 1000 truncates some instants 1 ms low.
    return (parsed - _EPOCH) // _MILLISECOND


_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_MILLISECOND = timedelta(milliseconds=1)


def inner_request_id(event: object) -> str | None:
    """The id sealed inside the event: v4 ``event_id``; v3 identification, else botd."""
    api = event_api(event)
    if api == "v4":
        return _str(_get(event, "event_id"))
    if api == "v3":
        products = _get(event, "products")
        return _str(_get(products, "identification", "data", "requestId")) or _str(
            _get(products, "botd", "data", "requestId")
        )
    return None


def summarize(event: object) -> dict[str, Any]:
    """One flat, JSON-safe summary of a v3 or v4 event (``None`` where a field is absent)."""
    # event_api's test, inlined: the v4 summary reads event_id and timestamp anyway, and
    # the v3 one starts from products (0.3 us of a 1 KB event's summary, BENCHMARKS.md).
    # test_events holds it to event_api.
    if isinstance(event, dict):
        get = event.get
        event_id = get("event_id")
        timestamp = get("timestamp")
        if isinstance(event_id, str) and _is_int(timestamp):
            return _summarize_v4(event, event_id, timestamp)
        products = get("products")
        if isinstance(products, dict):
            return _summarize_v3(products)
    return _empty_summary(None)


def _empty_summary(api: Api | None) -> dict[str, Any]:
    return {
        "api": api,
        "request_id": None,
        "visitor_id": None,
        "visitor_found": None,
        "confidence": None,
        "bot": None,
        "bot_type": None,
        "ip": None,
        "url": None,
        "timestamp": None,
        "replayed": None,
        "linked_id": None,
        "suspect_score": None,
        "signals": {},
    }


# The two summaries below run for every event the tap sees, and at 1 KB an event's
# summary costs as much as a fifth of unsealing it (BENCHMARKS.md). So they read the
# event with plain dict lookups and inline type tests instead of the generic _get() and
# a helper per field, whose calls cost more than the tests they make (_data, called three
# times per v3 event, is the one kept: 0.1 us for three near-copies): a missing or
# mistyped parent reads as this empty dict (never written to), and so its fields as
# absent.
_ABSENT: dict[str, Any] = {}
#: What a JSON number parses to. ``type(v) in`` it leaves out bools (an int subclass)
#: in one test, twice as fast as isinstance() and two identity tests.
_JSON_NUMBER = frozenset((int, float))


#: v4 signals that are top-level booleans; ``tor`` and ``ip_blocklist`` are read from
#: the ``ip_blocklist`` object.
_V4_PLAIN = tuple(name for name, _ in BOOLEAN_SIGNALS if name not in ("tor", "ip_blocklist"))
# Smart Signals are an add-on, and a v3 event without them has only a few products: then
# one C-level test over its keys replaces the 19 lookups (the summary of a 1 KB v3 event:
# 5.7 -> 5.1 us, BENCHMARKS.md). Not in v4, whose signals sit among the event's 20-40
# other top-level fields, where the same test costs more than it saves.
_V3_SIGNAL_PRODUCTS = frozenset(v3_name for _, v3_name in BOOLEAN_SIGNALS)


#: The largest time a JavaScript Date holds (ms from the epoch, either way): a timestamp
#: beyond it is no time at all, and its age would be a number of thousands of digits
#: that no JSON encoder, SQLite column or saved flow takes.
MAX_TIME_MS = 8_640_000_000_000_000


def _summarize_v4(event: dict[str, Any], event_id: str, timestamp: int) -> dict[str, Any]:
    get = event.get
    ident = get("identification")
    if not isinstance(ident, dict):
        ident = _ABSENT
    confidence = ident.get("confidence")
    confidence = confidence.get("score") if isinstance(confidence, dict) else None
    bot = get("bot")
    signals = {name: value for name in _V4_PLAIN if (value := get(name)) is True or value is False}
    blocklist = get("ip_blocklist")
    if isinstance(blocklist, dict):
        value = blocklist.get("tor_node")
        if value is True or value is False:
            signals["tor"] = value
        signals["ip_blocklist"] = any(v is True for v in blocklist.values())
    elif blocklist is True or blocklist is False:
        signals["ip_blocklist"] = blocklist
    return {
        "api": "v4",
        "request_id": event_id,
        "visitor_id": v if isinstance(v := ident.get("visitor_id"), str) else None,
        "visitor_found": v if (v := ident.get("visitor_found")) is True or v is False else None,
        "confidence": confidence if type(confidence) in _JSON_NUMBER else None,
        "bot": bot if bot in BOT_RESULTS else None,
        "bot_type": v if isinstance(v := get("bot_type"), str) else None,
        "ip": v if isinstance(v := get("ip_address"), str) else None,
        "url": v if isinstance(v := get("url"), str) else None,
        "timestamp": timestamp if -MAX_TIME_MS <= timestamp <= MAX_TIME_MS else None,
        "replayed": v if (v := get("replayed")) is True or v is False else None,
        "linked_id": v if isinstance(v := get("linked_id"), str) else None,
        "suspect_score": v if type(v := get("suspect_score")) in _JSON_NUMBER else None,
        "signals": signals,
    }


def _data(products: dict[str, Any], name: str) -> dict[str, Any]:
    """``products[name]["data"]`` when both are objects (a v3 product's payload)."""
    product = products.get(name)
    data = product.get("data") if isinstance(product, dict) else None
    return data if isinstance(data, dict) else _ABSENT


def _summarize_v3(products: dict[str, Any]) -> dict[str, Any]:
    ident = _data(products, "identification")
    botd = _data(products, "botd")
    score = _data(products, "suspectScore").get("result")
    bot = botd.get("bot")
    if not isinstance(bot, dict):
        bot = _ABSENT
    iget, bget = ident.get, botd.get
    timestamp = iget("timestamp")
    if not (_is_int(timestamp) and -MAX_TIME_MS <= timestamp <= MAX_TIME_MS):
        timestamp = _iso_to_ms(iget("time")) or _iso_to_ms(bget("time"))
    signals: dict[str, bool] = {}
    if not _V3_SIGNAL_PRODUCTS.isdisjoint(products):
        for name, v3_name in BOOLEAN_SIGNALS:
            if v3_name in products:
                product = products[v3_name]
                if isinstance(product, dict):
                    data = product.get("data")
                    if isinstance(data, dict):
                        value = data.get("result")
                        if value is True or value is False:
                            signals[name] = value
    # Each of these is the identification's value when a non-empty string, else botd's
    # when a string (_str(first) or _str(second)): inline, as four calls to a helper cost
    # 0.3 us of the 1 KB summary (BENCHMARKS.md).
    if not (isinstance(request_id := iget("requestId"), str) and request_id):
        request_id = v if isinstance(v := bget("requestId"), str) else None
    if not (isinstance(ip := iget("ip"), str) and ip):
        ip = v if isinstance(v := bget("ip"), str) else None
    if not (isinstance(url := iget("url"), str) and url):
        url = v if isinstance(v := bget("url"), str) else None
    if not (isinstance(linked_id := iget("linkedId"), str) and linked_id):
        linked_id = v if isinstance(v := bget("linkedId"), str) else None
    confidence = iget("confidence")
    confidence = confidence.get("score") if isinstance(confidence, dict) else None
    result = bot.get("result")
    return {
        "api": "v3",
        "request_id": request_id,
        "visitor_id": v if isinstance(v := iget("visitorId"), str) else None,
        "visitor_found": v if (v := iget("visitorFound")) is True or v is False else None,
        "confidence": confidence if type(confidence) in _JSON_NUMBER else None,
        "bot": _V3_BOT.get(result) if isinstance(result, str) else None,
        "bot_type": v if isinstance(v := bot.get("type"), str) else None,
        "ip": ip,
        "url": url,
        "timestamp": timestamp,
        "replayed": v if (v := iget("replayed")) is True or v is False else None,
        "linked_id": linked_id,
        "suspect_score": score if type(score) in _JSON_NUMBER else None,
        "signals": signals,
    }
