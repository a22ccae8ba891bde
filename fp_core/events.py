"""Server API events (v3 ``{"products": ...}`` and v4 flat): shape and summary.

Every accessor tolerates any JSON: a field of the wrong type reads as absent, so a
summary can be made of whatever an authenticated payload holds.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any, Literal

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


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _get(obj: object, *path: str) -> Any:
    for part in path:
        if not isinstance(obj, dict):
            return None
        obj = obj.get(part)
    return obj


def _str(value: object) -> str | None:
    return value if isinstance(value, str) else None


def _bool(value: object) -> bool | None:
    return value if isinstance(value, bool) else None


def _number(value: object) -> float | int | None:
    if isinstance(value, int | float) and not isinstance(value, bool):
        return value
    return None


def _iso_to_ms(value: object) -> int | None:
    if not isinstance(value, str):
        return None
    try:
        parsed = datetime.fromisoformat(value)
    except ValueError:
        return None
    if parsed.tzinfo is None:
        return None
    return int(parsed.timestamp() * 1000)


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
    api = event_api(event)
    if api == "v4":
        return _summarize_v4(event)
    if api == "v3":
        return _summarize_v3(event)
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


# The two summaries below run for every event the tap sees, so they read the event
# with plain dict lookups instead of the generic _get(): a missing or mistyped parent
# reads as this empty dict (never written to), and so its fields as absent.
_ABSENT: dict[str, Any] = {}


def _obj(value: object) -> dict[str, Any]:
    return value if isinstance(value, dict) else _ABSENT


def _data(products: dict[str, Any], name: str) -> dict[str, Any]:
    """``products[name]["data"]`` when both are objects (a v3 product's payload)."""
    product = products.get(name)
    return _obj(product.get("data")) if isinstance(product, dict) else _ABSENT


def _summarize_v4(event: Any) -> dict[str, Any]:
    ident = _obj(event.get("identification"))
    bot = event.get("bot")
    blocklist = event.get("ip_blocklist")
    signals: dict[str, bool] = {}
    for name, _v3_name in BOOLEAN_SIGNALS:
        if name == "tor":
            value = blocklist.get("tor_node") if isinstance(blocklist, dict) else None
        elif name == "ip_blocklist":
            value = blocklist
            if isinstance(value, dict):
                value = any(v is True for v in value.values())
        elif name in event:
            value = event[name]
        else:
            continue
        if value is True or value is False:
            signals[name] = value
    return {
        "api": "v4",
        "request_id": _str(event.get("event_id")),
        "visitor_id": _str(ident.get("visitor_id")),
        "visitor_found": _bool(ident.get("visitor_found")),
        "confidence": _number(_obj(ident.get("confidence")).get("score")),
        "bot": bot if bot in BOT_RESULTS else None,
        "bot_type": _str(event.get("bot_type")),
        "ip": _str(event.get("ip_address")),
        "url": _str(event.get("url")),
        "timestamp": event["timestamp"],
        "replayed": _bool(event.get("replayed")),
        "linked_id": _str(event.get("linked_id")),
        "suspect_score": _number(event.get("suspect_score")),
        "signals": signals,
    }


def _summarize_v3(event: Any) -> dict[str, Any]:
    products = event["products"]
    ident = _data(products, "identification")
    botd = _data(products, "botd")
    bot = _obj(botd.get("bot"))
    timestamp = ident.get("timestamp")
    if not _is_int(timestamp):
        timestamp = _iso_to_ms(ident.get("time")) or _iso_to_ms(botd.get("time"))
    signals: dict[str, bool] = {}
    for name, v3_name in BOOLEAN_SIGNALS:
        if v3_name in products:
            value = _data(products, v3_name).get("result")
            if value is True or value is False:
                signals[name] = value
    return {
        "api": "v3",
        "request_id": _str(ident.get("requestId")) or _str(botd.get("requestId")),
        "visitor_id": _str(ident.get("visitorId")),
        "visitor_found": _bool(ident.get("visitorFound")),
        "confidence": _number(_obj(ident.get("confidence")).get("score")),
        "bot": _V3_BOT.get(_str(bot.get("result")) or ""),
        "bot_type": _str(bot.get("type")),
        "ip": _str(ident.get("ip")) or _str(botd.get("ip")),
        "url": _str(ident.get("url")) or _str(botd.get("url")),
        "timestamp": timestamp,
        "replayed": _bool(ident.get("replayed")),
        "linked_id": _str(ident.get("linkedId")) or _str(botd.get("linkedId")),
        "suspect_score": _number(_data(products, "suspectScore").get("result")),
        "signals": signals,
    }
