"""Redaction: replace chosen parts of a record with ``"[redacted]"`` before it leaves.

A path is dotted and starts at the record: ``event.ip_address``,
``event.products.*.data.ip``, ``summary.url``, ``client_ip``. ``*`` stands for every key
of an object or every item of a list at that level. A preset name (``pii``) stands for
its list of paths. Paths that are absent in a record are simply skipped.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from fp_core.jsontext import JsonObject

REDACTED = "[redacted]"

#: Where a path may start. Ids, verdicts and checks stay: sinks and the replay check
#: depend on them, and they say nothing about the visitor as a person.
ROOTS = ("event", "summary", "client_ip", "host", "path")
#: Summary fields no redaction path may reach ("*" would reach them all).
_SUMMARY_KEPT = frozenset(("request_id", "api", "*"))

_V3 = "event.products"
PRESETS: dict[str, tuple[str, ...]] = {
    # IP addresses, URLs, user agents, geolocation and linked ids, in v3 and v4 events.
    "pii": (
        "client_ip",
        "summary.ip",
        "summary.url",
        "summary.linked_id",
        # v4
        "event.ip_address",
        "event.ip_info",
        "event.url",
        "event.client_referrer",
        "event.user_agent",
        "event.linked_id",
        "event.proximity",
        "event.vpn_origin_timezone",
        "event.vpn_origin_country",
        "event.raw_device_attributes.timezone",
        # v3
        f"{_V3}.*.data.ip",
        f"{_V3}.*.data.url",
        f"{_V3}.*.data.userAgent",
        f"{_V3}.*.data.linkedId",
        f"{_V3}.*.data.clientReferrer",
        f"{_V3}.identification.data.ipLocation",
        f"{_V3}.identification.data.browserDetails.userAgent",
        f"{_V3}.ipInfo",
        f"{_V3}.proximity",
        f"{_V3}.vpn.data.originTimezone",
        f"{_V3}.vpn.data.originCountry",
        f"{_V3}.rawDeviceAttributes.data.timezone",
    ),
}

Path = tuple[str, ...]


def parse_paths(values: Iterable[str]) -> tuple[Path, ...]:
    """Expand presets and split paths; ValueError (naming the entry) for a bad one."""
    out: list[Path] = []
    for value in values:
        text = value.strip()
        if text in PRESETS:
            out.extend(tuple(p.split(".")) for p in PRESETS[text])
            continue
        parts = tuple(text.split("."))
        if not text or any(not p for p in parts):
            raise ValueError(f"empty part in redaction path {value!r}")
        if parts[0] not in ROOTS:
            raise ValueError(
                f"redaction path {value!r} must start with one of {', '.join(ROOTS)} "
                f"(or be a preset: {', '.join(PRESETS)})"
            )
        if parts[0] in ("client_ip", "host", "path") and len(parts) > 1:
            raise ValueError(f"redaction path {value!r}: {parts[0]} has no parts")
        if parts == ("event",):
            # The webhook's body is the event, and records' event field an object.
            raise ValueError(
                f"redaction path {value!r}: the event as a whole stays (name its fields, "
                "e.g. event.ip_address, or leave it out of records with fp_include_event=false)"
            )
        if parts[0] == "summary" and (len(parts) == 1 or parts[1] in _SUMMARY_KEPT):
            # The replay memory is reloaded from stored summaries' request ids, and the
            # comment, the log line and the store read the summary as an object.
            raise ValueError(
                f"redaction path {value!r}: the summary itself, its request_id and api "
                "stay (name its fields, e.g. summary.visitor_id)"
            )
        out.append(parts)
    return tuple(dict.fromkeys(out))  # keep order, drop repeats


class Redactor:
    """Applies a fixed list of paths to records, in place."""

    def __init__(self, paths: Iterable[Path] = ()) -> None:
        self.paths = tuple(paths)

    def __bool__(self) -> bool:
        return bool(self.paths)

    def apply(self, record: dict[str, Any]) -> int:
        """Redact ``record`` in place; returns how many values were replaced."""
        count = 0
        for path in self.paths:
            changed = _redact(record, path)
            if changed and path[0] == "event" and isinstance(event := record["event"], JsonObject):
                event.text = None  # its text still holds what was redacted
            count += changed
        return count


def _redact(obj: Any, parts: Path) -> int:
    head, rest = parts[0], parts[1:]
    if head == "*":
        if isinstance(obj, dict):
            children = list(obj)
        elif isinstance(obj, list):
            children = list(range(len(obj)))
        else:
            return 0
    elif isinstance(obj, dict) and head in obj:
        children = [head]
    else:
        return 0
    count = 0
    for child in children:
        if rest:
            count += _redact(obj[child], rest)
        elif obj[child] is not None and obj[child] != REDACTED:
            obj[child] = REDACTED
            count += 1
    return count
