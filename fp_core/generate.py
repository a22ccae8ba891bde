"""Realistic, synthetic Server API events (v3 and v4) for tests, benchmarks and the demo.

Field names and nesting follow Fingerprint's public Server API schema; every value is
made up from a seeded RNG, so no real visitor data is involved.
"""

from __future__ import annotations

import json
import random
import string
import time
from dataclasses import dataclass
from typing import Any

from fp_core.events import Api

_ALNUM = string.ascii_letters + string.digits
_CITIES = (
    ("Prague", "CZ", "Czechia", "EU", "Europe", "Europe/Prague", 50.08, 14.43),
    ("Berlin", "DE", "Germany", "EU", "Europe", "Europe/Berlin", 52.52, 13.40),
    ("Austin", "US", "United States", "NA", "North America", "America/Chicago", 30.27, -97.74),
    ("Sao Paulo", "BR", "Brazil", "SA", "South America", "America/Sao_Paulo", -23.55, -46.63),
    ("Osaka", "JP", "Japan", "AS", "Asia", "Asia/Tokyo", 34.69, 135.50),
)
_BROWSERS = (
    ("Chrome", "131", "131.0.6778", "Windows", "10"),
    ("Firefox", "133", "133.0", "Mac OS X", "14.6"),
    ("Safari", "18", "18.1", "Mac OS X", "15.1"),
    ("Edge", "131", "131.0.2903", "Windows", "11"),
)
_BAD_BOTS = ("headless_chrome", "selenium", "puppeteer", "playwright", "phantomjs")
_GOOD_BOTS = ("googlebot", "bingbot", "chatgpt_agent", "applebot")
_V3_BAD_BOTS = ("headlessChrome", "selenium", "puppeteer", "playwright", "phantomjs")


def _rng(seed_or_rng: random.Random | int | None) -> random.Random:
    if isinstance(seed_or_rng, random.Random):
        return seed_or_rng
    return random.Random(seed_or_rng)


def _token(rng: random.Random, n: int) -> str:
    return "".join(rng.choice(_ALNUM) for _ in range(n))


def _hexhash(rng: random.Random) -> str:
    return f"{rng.getrandbits(128):032x}"


def new_request_id(rng: random.Random | int | None = None, timestamp_ms: int | None = None) -> str:
    """An id shaped like Fingerprint's: ``<epoch ms>.<6 characters>``."""
    r = _rng(rng)
    ts = int(time.time() * 1000) if timestamp_ms is None else timestamp_ms
    return f"{ts}.{_token(r, 6)}"


def random_ip(rng: random.Random) -> str:
    """A public-looking IPv4 address from documentation and benchmark ranges."""
    prefix = rng.choice(("198.51.100", "203.0.113", "192.0.2"))
    return f"{prefix}.{rng.randint(1, 254)}"


def generate_event(
    api: Api = "v4",
    *,
    rng: random.Random | int | None = None,
    bot: str = "not_detected",
    request_id: str | None = None,
    timestamp_ms: int | None = None,
    visitor_id: str | None = None,
    ip: str | None = None,
    url: str | None = None,
    replayed: bool = False,
    sparse: bool = False,
    identification_failed: bool = False,
    pad_to: int | None = None,
) -> dict[str, Any]:
    """One event. ``sparse`` drops optional fields at random; ``pad_to`` grows the event
    (device attributes) until its compact JSON is about that many bytes."""
    r = _rng(rng)
    ts = int(time.time() * 1000) if timestamp_ms is None else timestamp_ms
    fields = _Fields(
        request_id=request_id or new_request_id(r, ts),
        timestamp_ms=ts,
        visitor_id=visitor_id or _token(r, 20),
        ip=ip or random_ip(r),
        url=url or f"https://shop.example.com/{r.choice(('login', 'checkout', 'signup'))}",
        bot=bot,
        replayed=replayed,
    )
    event = _v4(r, fields, sparse) if api == "v4" else _v3(r, fields, sparse, identification_failed)
    if pad_to:
        _pad(r, event, api, pad_to)
    return event


@dataclass(frozen=True, slots=True)
class _Fields:
    request_id: str
    timestamp_ms: int
    visitor_id: str
    ip: str
    url: str
    bot: str
    replayed: bool


def _geo(r: random.Random, v4: bool) -> dict[str, Any]:
    city, cc, country, kc, continent, tz, lat, lon = r.choice(_CITIES)
    if v4:
        return {
            "accuracy_radius": r.choice((5, 10, 20, 50, 100)),
            "latitude": round(lat + r.uniform(-0.2, 0.2), 4),
            "longitude": round(lon + r.uniform(-0.2, 0.2), 4),
            "postal_code": f"{r.randint(10000, 99999)}",
            "timezone": tz,
            "city_name": city,
            "country_code": cc,
            "country_name": country,
            "continent_code": kc,
            "continent_name": continent,
            "subdivisions": [{"iso_code": f"{r.randint(10, 99)}", "name": f"{city} Region"}],
        }
    return {
        "accuracyRadius": r.choice((5, 10, 20, 50, 100)),
        "latitude": round(lat + r.uniform(-0.2, 0.2), 4),
        "longitude": round(lon + r.uniform(-0.2, 0.2), 4),
        "postalCode": f"{r.randint(10000, 99999)}",
        "timezone": tz,
        "city": {"name": city},
        "country": {"code": cc, "name": country},
        "continent": {"code": kc, "name": continent},
        "subdivisions": [{"isoCode": f"{r.randint(10, 99)}", "name": f"{city} Region"}],
    }


def _user_agent(r: random.Random, bot: str) -> tuple[str, tuple[str, str, str, str, str]]:
    browser = r.choice(_BROWSERS)
    name, _major, full, os_name, os_version = browser
    engine = "HeadlessChrome" if bot == "bad" else name
    ua = (
        f"Mozilla/5.0 ({os_name} {os_version}) AppleWebKit/537.36 "
        f"(KHTML, like Gecko) {engine}/{full} Safari/537.36"
    )
    return ua, browser


def _v4(r: random.Random, f: _Fields, sparse: bool) -> dict[str, Any]:
    ua, (bname, bmajor, bfull, os_name, os_version) = _user_agent(r, f.bot)
    seen = f.timestamp_ms - r.randint(0, 90 * 86400 * 1000)
    event: dict[str, Any] = {
        "event_id": f.request_id,
        "timestamp": f.timestamp_ms,
        "linked_id": f"user-{r.randint(1000, 99999)}",
        "tags": {},
        "source": "device",
        "incremental_identification_status": "completed",
        "url": f.url,
        "ip_address": f.ip,
        "user_agent": ua,
        "device": "Other",
        "os": os_name,
        "os_version": os_version,
        "client_referrer": "https://www.example.org/",
        "browser_details": {
            "browser_name": bname,
            "browser_major_version": bmajor,
            "browser_full_version": bfull,
            "os": os_name,
            "os_version": os_version,
            "device": "Other",
        },
        "identification": {
            "visitor_id": f.visitor_id,
            "confidence": {"score": round(r.uniform(0.5, 1.0), 2), "version": "1.1"},
            "visitor_found": r.random() < 0.7,
            "first_seen_at": seen,
            "last_seen_at": f.timestamp_ms - r.randint(0, 86400 * 1000),
        },
        "proximity": {"id": _token(r, 11), "precision_radius": 10, "confidence": 0.95},
        "bot": f.bot,
        "root_apps": False,
        "emulator": False,
        "ip_info": {
            "v4": {
                "address": f.ip,
                "geolocation": _geo(r, True),
                "asn": str(r.randint(1000, 65000)),
                "asn_name": r.choice(("EXAMPLE-NET", "TELCO-AS", "CLOUD-HOSTING")),
                "asn_network": f"{f.ip.rsplit('.', 1)[0]}.0/24",
                "asn_type": r.choice(("isp", "hosting", "business")),
                "datacenter_result": f.bot == "bad",
                "datacenter_name": "ExampleCloud" if f.bot == "bad" else "",
            }
        },
        "ip_blocklist": {"email_spam": False, "attack_source": f.bot == "bad", "tor_node": False},
        "proxy": r.random() < 0.1,
        "proxy_confidence": r.choice(("low", "medium", "high")),
        "proxy_ml_score": round(r.random(), 2),
        "vpn": r.random() < 0.1,
        "vpn_confidence": r.choice(("low", "medium", "high")),
        "vpn_ml_score": round(r.random(), 2),
        "vpn_origin_timezone": "Europe/Berlin",
        "vpn_origin_country": "unknown",
        "vpn_methods": {
            "timezone_mismatch": False,
            "public_vpn": False,
            "auxiliary_mobile": False,
            "os_mismatch": False,
            "relay": False,
            "ml_prediction": False,
        },
        "incognito": r.random() < 0.2,
        "tampering": f.bot == "bad",
        "tampering_confidence": "high",
        "tampering_ml_score": round(r.random(), 4),
        "tampering_details": {"anomaly_score": round(r.random(), 4), "anti_detect_browser": False},
        "cloned_app": False,
        "factory_reset_timestamp": 0,
        "jailbroken": False,
        "simulator": False,
        "frida": False,
        "privacy_settings": False,
        "virtual_machine": False,
        "virtual_machine_ml_score": round(r.random(), 2),
        "location_spoofing": False,
        "velocity": {
            name: {
                "5_minutes": r.randint(1, 3),
                "1_hour": r.randint(1, 9),
                "24_hours": r.randint(1, 30),
            }
            for name in (
                "distinct_ip",
                "distinct_linked_id",
                "distinct_country",
                "events",
                "ip_events",
                "distinct_ip_by_linked_id",
                "distinct_visitor_id_by_linked_id",
            )
        },
        "developer_tools": False,
        "mitm_attack": False,
        "sdk": {
            "platform": "js",
            "version": "3.12.6",
            "integrations": [{"name": "fingerprint-pro-react", "version": "2.7.0"}],
        },
        "replayed": f.replayed,
        "high_activity_device": False,
        "raw_device_attributes": _raw_attributes_v4(r, ua),
        "rare_device": False,
        "rare_device_percentile_bucket": "<p95",
        "suspect_score": r.randint(0, 30) if f.bot != "bad" else r.randint(30, 100),
    }
    if f.bot == "good":
        event["bot_type"] = r.choice(_GOOD_BOTS)
        event["bot_info"] = {
            "category": "search_engine",
            "provider": "Example",
            "provider_url": "https://example.com",
            "name": event["bot_type"],
            "identity": "verified",
            "confidence": "high",
        }
    elif f.bot == "bad":
        event["bot_type"] = r.choice(_BAD_BOTS)
    if sparse:
        _drop_optional(
            r, event, keep={"event_id", "timestamp", "url", "ip_address", "bot", "replayed"}
        )
    return event


def _raw_attributes_v4(r: random.Random, ua: str) -> dict[str, Any]:
    return {
        "math": _hexhash(r),
        "vendor": "Google Inc.",
        "plugins": [_plugin(r)],
        "webgl_extensions": {
            "context_attributes": _hexhash(r),
            "extension_parameters": _hexhash(r),
            "extensions": _hexhash(r),
            "parameters": _hexhash(r),
            "shader_precisions": _hexhash(r),
            "unsupported_extensions": [],
        },
        "cookies_enabled": True,
        "webgl_basics": {
            "renderer": "WebKit WebGL",
            "renderer_unmasked": "ANGLE (Example, ANGLE Metal Renderer, Unspecified Version)",
            "shading_language_version": "WebGL GLSL ES 1.0",
            "vendor": "WebKit",
            "vendor_unmasked": "Example Inc.",
            "version": "WebGL 1.0 (OpenGL ES 2.0 Chromium)",
        },
        "canvas": {"geometry": _hexhash(r), "text": _hexhash(r), "winding": True},
        "hardware_concurrency": r.choice((4, 8, 10, 16)),
        "languages": [["en-US"]],
        "color_depth": 24,
        "fonts": ["Arial Unicode MS", "Gill Sans", "Helvetica Neue", "Menlo"],
        "indexed_db": True,
        "touch_support": {"max_touch_points": 0, "touch_event": False, "touch_start": False},
        "device_memory": r.choice((4, 8, 16)),
        "oscpu": ua.split("(", 1)[1].split(")", 1)[0],
        "architecture": 127,
        "screen_resolution": [1920, 1080],
        "timezone": "Europe/Berlin",
        "platform": "MacIntel",
        "local_storage": True,
        "session_storage": True,
        "date_time_locale": "en-US",
        "audio": round(r.uniform(100, 130), 12),
        "keyboard_layout_hash": _hexhash(r),
        "font_hash": _hexhash(r),
    }


def _plugin(r: random.Random) -> dict[str, Any]:
    name = f"Plugin {_token(r, 8)}"
    return {
        "description": f"{name} {_hexhash(r)}",
        "mimeTypes": [{"suffixes": "pdf", "type": "application/pdf"}],
        "name": name,
    }


def _v3(r: random.Random, f: _Fields, sparse: bool, identification_failed: bool) -> dict[str, Any]:
    ua, (bname, bmajor, bfull, os_name, os_version) = _user_agent(r, f.bot)
    iso = iso_from_ms(f.timestamp_ms)
    bot_result: dict[str, Any] = {"result": {"not_detected": "notDetected"}.get(f.bot, f.bot)}
    if f.bot == "bad":
        bot_result["type"] = r.choice(_V3_BAD_BOTS)
    products: dict[str, Any] = {}
    if identification_failed:
        products["identification"] = {
            "error": {"code": "Failed", "message": "internal server error"}
        }
    else:
        products["identification"] = {
            "data": {
                "visitorId": f.visitor_id,
                "requestId": f.request_id,
                "browserDetails": {
                    "browserName": bname,
                    "browserMajorVersion": bmajor,
                    "browserFullVersion": bfull,
                    "os": os_name,
                    "osVersion": os_version,
                    "device": "Other",
                    "userAgent": ua,
                },
                "incognito": r.random() < 0.2,
                "ip": f.ip,
                "ipLocation": _geo(r, False),
                "linkedId": f"user-{r.randint(1000, 99999)}",
                "timestamp": f.timestamp_ms,
                "time": iso,
                "url": f.url,
                "tag": {},
                "confidence": {"score": round(r.uniform(0.5, 1.0), 2), "revision": "v1.1"},
                "visitorFound": r.random() < 0.7,
                "firstSeenAt": {"global": iso, "subscription": iso},
                "lastSeenAt": {"global": iso, "subscription": iso},
                "replayed": f.replayed,
            }
        }
    products["botd"] = {
        "data": {
            "bot": bot_result,
            "url": f.url,
            "ip": f.ip,
            "time": iso,
            "userAgent": ua,
            "requestId": f.request_id,
        }
    }
    for name in (
        "rootApps", "emulator", "clonedApp", "jailbroken", "frida", "privacySettings",
        "virtualMachine", "highActivity", "locationSpoofing", "developerTools", "mitmAttack",
        "incognito", "tor",
    ):  # fmt: skip
        products[name] = {"data": {"result": False}}
    products["vpn"] = {
        "data": {
            "result": r.random() < 0.1,
            "confidence": "high",
            "originTimezone": "Europe/Berlin",
            "originCountry": "unknown",
            "methods": {
                "timezoneMismatch": False,
                "publicVPN": False,
                "auxiliaryMobile": False,
                "osMismatch": False,
                "relay": False,
            },
        }
    }
    products["proxy"] = {"data": {"result": r.random() < 0.1, "confidence": "high"}}
    products["tampering"] = {
        "data": {
            "result": f.bot == "bad",
            # Later v3 schemas (and the v3 SDK's model) require these two as well.
            "confidence": "high",
            "anomalyScore": round(r.random(), 4),
            "mlScore": round(r.random(), 4),
            "antiDetectBrowser": False,
        }
    }
    products["ipBlocklist"] = {
        "data": {
            "result": f.bot == "bad",
            "details": {"emailSpam": False, "attackSource": f.bot == "bad"},
        }
    }
    products["ipInfo"] = {
        "data": {
            "v4": {
                "address": f.ip,
                "geolocation": _geo(r, False),
                "asn": {
                    "asn": str(r.randint(1000, 65000)),
                    "name": "EXAMPLE-NET",
                    "network": f"{f.ip.rsplit('.', 1)[0]}.0/24",
                },
                "datacenter": {
                    "result": f.bot == "bad",
                    "name": "ExampleCloud" if f.bot == "bad" else "",
                },
            }
        }
    }
    products["suspectScore"] = {
        "data": {"result": r.randint(0, 30) if f.bot != "bad" else r.randint(30, 100)}
    }
    products["factoryReset"] = {"data": {"time": "1970-01-01T00:00:00Z", "timestamp": 0}}
    products["velocity"] = {
        "data": {
            name: {
                "intervals": {"5m": r.randint(1, 3), "1h": r.randint(1, 9), "24h": r.randint(1, 30)}
            }
            for name in (
                "distinctIp",
                "distinctCountry",
                "events",
                "ipEvents",
                "distinctIpByLinkedId",
                "distinctVisitorIdByLinkedId",
            )
        }
    }
    # As in the full example: no linked id was sent, so this one has no intervals.
    products["velocity"]["data"]["distinctLinkedId"] = {}
    products["rawDeviceAttributes"] = {
        "data": {
            "architecture": {"value": 127},
            "audio": {"value": round(r.uniform(100, 130), 12)},
            "canvas": {"value": {"Winding": True, "Geometry": _hexhash(r), "Text": _hexhash(r)}},
            "colorDepth": {"value": 24},
            "fonts": {"value": ["Arial Unicode MS", "Gill Sans", "Helvetica Neue", "Menlo"]},
            "math": {"value": _hexhash(r)},
            "plugins": {"value": [_plugin(r)]},
            "webGlExtensions": {"value": {"extensions": _hexhash(r), "parameters": _hexhash(r)}},
        }
    }
    if sparse:
        _drop_optional(r, products, keep={"identification", "botd"})
    return {"products": products}


def iso_from_ms(timestamp_ms: int) -> str:
    seconds, ms = divmod(timestamp_ms, 1000)
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(seconds)) + f".{ms:03d}Z"


def _drop_optional(r: random.Random, obj: dict[str, Any], keep: set[str]) -> None:
    for name in [k for k in obj if k not in keep]:
        if r.random() < 0.5:
            del obj[name]


def _pad(r: random.Random, event: dict[str, Any], api: Api, target: int) -> None:
    """Add device plugins until the compact JSON reaches about ``target`` bytes."""
    if api == "v4":
        attrs = event.setdefault("raw_device_attributes", {})
        plugins = attrs.setdefault("plugins", [])
    else:
        raw = event["products"].setdefault("rawDeviceAttributes", {"data": {}})
        plugins = raw["data"].setdefault("plugins", {"value": []})["value"]
    size = len(json.dumps(event, separators=(",", ":")))
    while size < target:
        plugin = _plugin(r)
        plugins.append(plugin)
        size += len(json.dumps(plugin, separators=(",", ":"))) + 1


def open_response_body(api: Api, request_id: str, sealed: str) -> dict[str, Any]:
    """The JSON the agent receives with Open Client Response enabled."""
    if api == "v4":
        return {"event_id": request_id, "sealed_result": sealed}
    return {
        "v": "2",
        "requestId": request_id,
        "sealedResult": sealed,
        "products": {
            "identification": {
                "data": {
                    "visitorToken": "",
                    "result": {
                        "visitorId": "",
                        "visitorFound": False,
                        "meta": {"version": "v1.1"},
                        "confidence": {"score": 0},
                    },
                }
            }
        },
    }
