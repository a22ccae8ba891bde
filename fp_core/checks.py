"""Trust checks on an unsealed event: is it this request's, fresh, first seen, this client's?

Only the sealed event is authenticated; everything outside it (the outer id, headers,
the connection) is compared against it. ``None`` means "nothing to compare".
"""

from __future__ import annotations

import functools
import ipaddress
import unicodedata
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

_DEFAULT_PORTS = {"http": 80, "https": 443}
#: The checks of every record, in record order (all null when unsealing failed).
CHECK_NAMES = ("id_match", "fresh", "age_ms", "duplicate", "replayed", "ip_match", "origin_ok")


@dataclass(frozen=True)
class CheckConfig:
    """Limits for the checks. Ages are in milliseconds."""

    max_age_ms: int = 10_000
    #: Clocks drift: an event a little ahead of the proxy's clock is still fresh.
    max_future_ms: int = 5_000
    origins: frozenset[str] = field(default_factory=frozenset)


def normalize_origin(url: str) -> str | None:
    """``scheme://host[:port]`` in lower case, default port dropped, the host as a browser
    writes it (punycode, compressed IPv6); None if not a URL."""
    try:
        parts = urlsplit(url.strip())
        port = parts.port
    except ValueError:
        return None
    scheme = parts.scheme.lower()
    host = _canonical_host((parts.hostname or "").lower())
    if not scheme or not host:
        return None
    if ":" in host:
        host = f"[{host}]"
    if port is None or port == _DEFAULT_PORTS.get(scheme):
        return f"{scheme}://{host}"
    return f"{scheme}://{host}:{port}"


def _canonical_host(host: str) -> str:
    if ":" in host:  # an IPv6 literal: browsers write it compressed
        try:
            return ipaddress.IPv6Address(host.split("%", 1)[0]).compressed
        except ValueError:
            return host
    if not host.isascii():  # a browser's URL holds the punycode form
        try:
            return ".".join(_punycode(label) for label in host.translate(_DOTS).split("."))
        except UnicodeError:
            return host
    return host


#: The full stops a browser reads as a label's end (UTS #46).
_DOTS = {0x3002: ".", 0xFF0E: ".", 0xFF61: "."}


def _punycode(label: str) -> str:
    """A label as browsers write it (WHATWG URL: UTS #46 without the transitional
    mapping): Python's "idna" codec is IDNA 2003, which turns "ß" into "ss" and a final
    sigma into a plain one: another site's name."""
    # NFKC as UTS #46 maps (fullwidth letters are ASCII ones), lower case not casefold
    # (which would turn "ß" into "ss" too).
    label = unicodedata.normalize("NFKC", label).lower()
    if label.isascii():
        return label
    return "xn--" + unicodedata.normalize("NFC", label).encode("punycode").decode()


#: What a configured origin's host may hold: a DNS name (punycode), or an IPv6 literal.
_HOST_CHARS = frozenset("abcdefghijklmnopqrstuvwxyz0123456789.-_")


def parse_origins(values: Iterable[str]) -> frozenset[str]:
    """Normalise configured origins; raises ValueError naming the first bad one (one that
    no event's URL could ever match, such as two origins in one value)."""
    out = set()
    for value in values:
        origin = normalize_origin(value)
        if origin is None:
            raise ValueError(f"not an origin (scheme://host[:port]): {value!r}")
        host = origin.split("://", 1)[1].rsplit(":", 1)[0] if "[" not in origin else ""
        if host and not _HOST_CHARS.issuperset(host):
            raise ValueError(
                f"not an origin (scheme://host[:port], one per value: repeat "
                f"--set fp_origins=... for several): {value!r}"
            )
        out.add(origin)
    return frozenset(out)


# Parsing an address, and asking whether it is global, takes microseconds, and the same
# few clients and visitors come back again and again: remember the latest answers.
@functools.lru_cache(maxsize=4096)
def _ip(value: str | None) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    if not value:
        return None
    try:
        addr = ipaddress.ip_address(value.strip().split("%", 1)[0])
    except ValueError:
        return None
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        return addr.ipv4_mapped
    return addr


@functools.lru_cache(maxsize=4096)
def comparable_client_ip(header_ip: str | None, peer_ip: str | None) -> str | None:
    """The client address worth comparing with the event's IP.

    The proxy integration's ``FPJS-Proxy-Client-IP`` header wins; otherwise the
    connection's address, unless it is not a global address (then the tap sits behind
    something else and the browser's address is unknown).
    """
    if header_ip is not None and header_ip.strip():
        # Sent: the tap is behind the proxy integration, whose own address is the
        # connection's. A list (the header sent twice, which mitmproxy joins) or an
        # address with a port gives its first address; anything else is unknown.
        header = _ip(_first_address(header_ip))
        return None if header is None else str(header)
    peer = _ip(peer_ip)
    # Loopback, private, shared (CGNAT) and reserved addresses are not the browser's.
    if peer is None or not peer.is_global:
        return None
    return str(peer)


def _first_address(value: str) -> str:
    first = value.split(",", 1)[0].strip()
    if first.startswith("["):  # [IPv6] or [IPv6]:port
        return first[1:].split("]", 1)[0]
    if first.count(":") == 1:  # IPv4:port
        return first.split(":", 1)[0]
    return first


def evaluate(
    summary: dict[str, Any],
    outer_id: str,
    response_time_ms: int,
    *,
    duplicate: bool | None,
    client_ip: str | None,
    config: CheckConfig,
) -> dict[str, Any]:
    """All checks for one unsealed event, as a JSON-safe dict (see the README)."""
    inner_id = summary.get("request_id")
    id_match = None if inner_id is None else inner_id == outer_id
    timestamp = summary.get("timestamp")
    age_ms = None if timestamp is None else response_time_ms - int(timestamp)
    fresh = None
    if age_ms is not None:
        fresh = -config.max_future_ms <= age_ms <= config.max_age_ms
    event_ip = _ip(summary.get("ip"))
    ip_match = None
    if event_ip is not None and client_ip is not None:
        ip_match = str(event_ip) == client_ip
    origin_ok = None
    url = summary.get("url")
    if config.origins and isinstance(url, str):
        origin_ok = normalize_origin(url) in config.origins
    return {
        "id_match": id_match,
        "fresh": fresh,
        "age_ms": age_ms,
        "duplicate": duplicate,
        "replayed": summary.get("replayed"),
        "ip_match": ip_match,
        "origin_ok": origin_ok,
    }


def verdict(checks: dict[str, Any], bot: str | None) -> tuple[str, list[str]]:
    """``trusted`` or ``suspicious`` with the reasons, in a fixed order."""
    reasons = []
    if checks.get("id_match") is False:
        reasons.append("id_mismatch")
    if checks.get("fresh") is False:
        age = checks.get("age_ms") or 0
        reasons.append("stale" if age > 0 else "from_future")
    if checks.get("duplicate") is True:
        reasons.append("duplicate")
    if checks.get("replayed") is True:
        reasons.append("replayed")
    if checks.get("ip_match") is False:
        reasons.append("ip_mismatch")
    if checks.get("origin_ok") is False:
        reasons.append("origin_mismatch")
    if bot == "bad":
        reasons.append("bad_bot")
    return ("suspicious" if reasons else "trusted"), reasons
