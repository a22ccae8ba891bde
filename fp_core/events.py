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


def _summarize_v4(event: Any) -> dict[str, Any]:
    summary = _empty_summary("v4")
    ident = _get(event, "identification")
    bot = _str(event.get("bot"))
    summary.update(
        request_id=_str(event.get("event_id")),
        visitor_id=_str(_get(ident, "visitor_id")),
        visitor_found=_bool(_get(ident, "visitor_found")),
        confidence=_number(_get(ident, "confidence", "score")),
        bot=bot if bot in BOT_RESULTS else None,
        bot_type=_str(event.get("bot_type")),
        ip=_str(event.get("ip_address")),
        url=_str(event.get("url")),
        timestamp=event["timestamp"],
        replayed=_bool(event.get("replayed")),
        linked_id=_str(event.get("linked_id")),
        suspect_score=_number(event.get("suspect_score")),
    )
    signals: dict[str, bool] = {}
    for name, _v3_name in BOOLEAN_SIGNALS:
        value = event.get(name)
        if name == "tor":
            value = _get(event, "ip_blocklist", "tor_node")
        elif name == "ip_blocklist" and isinstance(value, dict):
            value = any(v is True for v in value.values())
        if isinstance(value, bool):
            signals[name] = value
    summary["signals"] = signals
    return summary


def _summarize_v3(event: Any) -> dict[str, Any]:
    summary = _empty_summary("v3")
    products = event["products"]
    ident = _get(products, "identification", "data")
    botd = _get(products, "botd", "data")
    bot = _V3_BOT.get(_str(_get(botd, "bot", "result")) or "")
    timestamp = _get(ident, "timestamp")
    summary.update(
        request_id=inner_request_id(event),
        visitor_id=_str(_get(ident, "visitorId")),
        visitor_found=_bool(_get(ident, "visitorFound")),
        confidence=_number(_get(ident, "confidence", "score")),
        bot=bot,
        bot_type=_str(_get(botd, "bot", "type")),
        ip=_str(_get(ident, "ip")) or _str(_get(botd, "ip")),
        url=_str(_get(ident, "url")) or _str(_get(botd, "url")),
        timestamp=timestamp
        if _is_int(timestamp)
        else _iso_to_ms(_get(ident, "time")) or _iso_to_ms(_get(botd, "time")),
        replayed=_bool(_get(ident, "replayed")),
        linked_id=_str(_get(ident, "linkedId")) or _str(_get(botd, "linkedId")),
        suspect_score=_number(_get(products, "suspectScore", "data", "result")),
    )
    signals: dict[str, bool] = {}
    for name, v3_name in BOOLEAN_SIGNALS:
        value = _get(products, v3_name, "data", "result")
        if isinstance(value, bool):
            signals[name] = value
    summary["signals"] = signals
    return summary
