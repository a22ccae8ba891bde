"""fp_core.checks: origin and IP normalisation, the trust checks and the verdict."""

from __future__ import annotations

import re
from typing import Any

import pytest

from fp_core.checks import (
    CHECK_NAMES,
    CheckConfig,
    comparable_client_ip,
    evaluate,
    normalize_origin,
    parse_origins,
    verdict,
)

NOW_MS = 1_700_000_000_000
REQUEST_ID = "1700000000000.abcdef"
CHECK_KEYS = {"id_match", "fresh", "age_ms", "duplicate", "replayed", "ip_match", "origin_ok"}


# -- normalize_origin -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("url", "origin"),
    [
        ("https://example.com", "https://example.com"),
        ("HTTPS://Example.COM/Some/Path?q=1#frag", "https://example.com"),
        ("https://example.com:443/x", "https://example.com"),
        ("http://example.com:80", "http://example.com"),
        # A default port only counts for its own scheme.
        ("http://example.com:443", "http://example.com:443"),
        ("https://example.com:80", "https://example.com:80"),
        ("https://shop.example.com:8443/login", "https://shop.example.com:8443"),
        ("https://user:secret@Example.com:8443/", "https://example.com:8443"),
        ("  https://example.com/  ", "https://example.com"),
        ("https://[::1]:8443/", "https://[::1]:8443"),
        ("https://[2001:DB8::1]/", "https://[2001:db8::1]"),
        ("https://[2001:db8::1]:443", "https://[2001:db8::1]"),
        ("http://127.0.0.1:8080", "http://127.0.0.1:8080"),
        # As a browser writes them (found by an origin hunt): punycode, compressed IPv6.
        ("https://Bücher.example/cart", "https://xn--bcher-kva.example"),
        # Not IDNA 2003's "ss" and plain sigma: browsers keep sharp s and final sigma
        # (found by a README hunt).
        ("https://straße.de/checkout", "https://xn--strae-oqa.de"),
        ("https://ς.example", "https://xn--3xa.example"),
        # Fullwidth letters and ideographic full stops, mapped as UTS #46 maps them.
        ("https://\uff53\uff48\uff4f\uff50.example", "https://shop.example"),
        ("https://shop\u3002example", "https://shop.example"),
        ("https://[2001:0db8:0:0:0:0:0:1]:8443", "https://[2001:db8::1]:8443"),
    ],
)
def test_normalize_origin(url: str, origin: str) -> None:
    assert normalize_origin(url) == origin


@pytest.mark.parametrize(
    "junk",
    [
        "",
        "   ",
        "not a url",
        "example.com",
        "example.com:8080/path",  # parses as scheme "example.com" with no host
        "//example.com",  # no scheme
        "https://",
        "https:///path",
        "mailto:someone@example.com",
        "https://example.com:99999",  # port out of range
        "https://example.com:abc",
        "https://[::1",  # unclosed IPv6 bracket
    ],
)
def test_normalize_origin_junk_is_none(junk: str) -> None:
    assert normalize_origin(junk) is None


# -- parse_origins ----------------------------------------------------------------------


def test_parse_origins_normalises_and_deduplicates() -> None:
    origins = parse_origins(
        ["https://Shop.Example.com:443/", "https://shop.example.com", "http://a.b:8080"]
    )
    assert origins == frozenset({"https://shop.example.com", "http://a.b:8080"})


def test_parse_origins_empty() -> None:
    assert parse_origins([]) == frozenset()


def test_parse_origins_names_the_bad_one() -> None:
    with pytest.raises(ValueError, match=re.escape("shop.example.com/oops")) as info:
        parse_origins(["https://ok.example.com", "shop.example.com/oops", "also bad"])
    # The first bad one is named, not a later one.
    assert "also bad" not in str(info.value)


@pytest.mark.parametrize(
    "value",
    [
        "https://shop.example.com,https://www.shop.example.com",  # two in one --set
        "https://shop.example.com, https://www.shop.example.com",
        "https://*.shop.example.com",  # no wildcards
        "https://shop example.com",
    ],
)
def test_parse_origins_refuses_what_no_url_could_match(value: str) -> None:
    """Accepted, these marked every event from the site origin_mismatch (found by an
    origin hunt)."""
    with pytest.raises(ValueError, match="one per value: repeat --set fp_origins") as info:
        parse_origins([value])
    assert repr(value) in str(info.value)


def test_configured_origins_match_the_urls_browsers_report() -> None:
    configured = parse_origins(
        ["https://bücher.example", "https://[2001:0db8::0:1]:8443", "https://my_shop.example"]
    )
    assert normalize_origin("https://my_shop.example/login") in configured
    assert normalize_origin("https://xn--bcher-kva.example/cart") in configured
    assert normalize_origin("https://[2001:db8::1]:8443/") in configured


# -- comparable_client_ip ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("header", "peer", "expected"),
    [
        # The proxy integration's header wins over the connection's address.
        ("8.8.4.4", "1.1.1.1", "8.8.4.4"),
        # ... even when it is private: the integration knows the browser's address.
        ("10.0.0.7", "1.1.1.1", "10.0.0.7"),
        (" 8.8.4.4 ", None, "8.8.4.4"),
        ("::ffff:8.8.4.4", None, "8.8.4.4"),
        ("2001:4860:4860::8888", None, "2001:4860:4860::8888"),
        ("2001:4860:4860:0:0:0:0:8888", None, "2001:4860:4860::8888"),
        # No header: a public peer is used.
        (None, "1.1.1.1", "1.1.1.1"),
        ("", "1.1.1.1", "1.1.1.1"),
        (None, "::ffff:1.1.1.1", "1.1.1.1"),
        (None, "2606:4700:4700::1111", "2606:4700:4700::1111"),
        # A header sent is the integration's word: never replaced by the connection's
        # address, which is the integration's own (it used to be: a false ip_mismatch,
        # found by an origin hunt). A list (the header twice, joined) or an address
        # with a port gives its first address; anything else is unknown.
        ("garbage", "1.1.1.1", None),
        ("999.1.1.1", "1.1.1.1", None),
        ("8.8.4.4, 10.0.0.1", "1.1.1.1", "8.8.4.4"),
        ("8.8.4.4, 8.8.4.4", "1.1.1.1", "8.8.4.4"),
        ("8.8.4.4:51234", "1.1.1.1", "8.8.4.4"),
        ("[2001:4860:4860::8888]:443", "1.1.1.1", "2001:4860:4860::8888"),
        ("[2001:4860:4860::8888]", None, "2001:4860:4860::8888"),
        ("  ", "1.1.1.1", "1.1.1.1"),  # blank: not sent
        # Loopback, private and link-local peers say nothing about the browser.
        (None, "127.0.0.1", None),
        (None, "::1", None),
        (None, "::ffff:127.0.0.1", None),
        (None, "10.1.2.3", None),
        (None, "172.16.0.1", None),
        (None, "192.168.1.1", None),
        (None, "::ffff:192.168.1.1", None),
        (None, "fd00::1", None),
        (None, "169.254.10.10", None),
        (None, "fe80::1", None),
        (None, "fe80::1%eth0", None),
        # Shared (carrier-grade NAT) and documentation ranges are not a browser's either.
        (None, "100.64.0.1", None),
        (None, "203.0.113.9", None),
        (None, "2001:db8::1", None),
        ("garbage", "10.0.0.1", None),
        (None, None, None),
        (None, "not an ip", None),
    ],
)
def test_comparable_client_ip(header: str | None, peer: str | None, expected: str | None) -> None:
    assert comparable_client_ip(header, peer) == expected


# -- evaluate ---------------------------------------------------------------------------


def summary(**fields: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "request_id": REQUEST_ID,
        "timestamp": NOW_MS - 1000,
        "ip": None,
        "url": None,
        "replayed": False,
    }
    base.update(fields)
    return base


def run(
    fields: dict[str, Any] | None = None,
    *,
    outer_id: str = REQUEST_ID,
    duplicate: bool | None = False,
    client_ip: str | None = None,
    config: CheckConfig | None = None,
) -> dict[str, Any]:
    return evaluate(
        summary(**(fields or {})),
        outer_id,
        NOW_MS,
        duplicate=duplicate,
        client_ip=client_ip,
        config=config or CheckConfig(),
    )


def test_evaluate_returns_every_check() -> None:
    checks = run()
    assert set(checks) == CHECK_KEYS
    assert tuple(checks) == CHECK_NAMES  # error records use the same names, in this order
    assert checks == {
        "id_match": True,
        "fresh": True,
        "age_ms": 1000,
        "duplicate": False,
        "replayed": False,
        "ip_match": None,
        "origin_ok": None,
    }


def test_id_match() -> None:
    assert run()["id_match"] is True
    assert run(outer_id="1700000000000.zzzzzz")["id_match"] is False
    assert run({"request_id": None})["id_match"] is None


@pytest.mark.parametrize(
    ("age_ms", "fresh"),
    [
        (0, True),
        (9_999, True),
        (10_000, True),  # the limits are inclusive
        (10_001, False),
        (3_600_000, False),
        (-4_999, True),  # a little ahead of the proxy's clock
        (-5_000, True),
        (-5_001, False),
        (-3_600_000, False),
    ],
)
def test_freshness_with_default_limits(age_ms: int, fresh: bool) -> None:
    checks = run({"timestamp": NOW_MS - age_ms})
    assert checks["age_ms"] == age_ms
    assert checks["fresh"] is fresh


def test_freshness_uses_the_configured_limits() -> None:
    config = CheckConfig(max_age_ms=7_000, max_future_ms=0)
    assert run({"timestamp": NOW_MS - 7_000}, config=config)["fresh"] is True
    assert run({"timestamp": NOW_MS - 7_001}, config=config)["fresh"] is False
    assert run({"timestamp": NOW_MS + 1}, config=config)["fresh"] is False


def test_missing_timestamp_is_unknown_freshness() -> None:
    checks = run({"timestamp": None})
    assert checks["fresh"] is None
    assert checks["age_ms"] is None


@pytest.mark.parametrize("duplicate", [True, False, None])
def test_duplicate_is_passed_through(duplicate: bool | None) -> None:
    assert run(duplicate=duplicate)["duplicate"] is duplicate


@pytest.mark.parametrize("replayed", [True, False, None])
def test_replayed_comes_from_the_event(replayed: bool | None) -> None:
    assert run({"replayed": replayed})["replayed"] is replayed


@pytest.mark.parametrize(
    ("event_ip", "client_ip", "expected"),
    [
        ("8.8.4.4", "8.8.4.4", True),
        ("8.8.4.4", "1.1.1.1", False),
        # The event's address is normalised the same way as the client's.
        ("::ffff:8.8.4.4", "8.8.4.4", True),
        ("2001:4860:4860:0:0:0:0:8888", "2001:4860:4860::8888", True),
        (" 8.8.4.4 ", "8.8.4.4", True),
        # Nothing to compare on either side.
        (None, "8.8.4.4", None),
        ("not an ip", "8.8.4.4", None),
        ("8.8.4.4", None, None),
    ],
)
def test_ip_match(event_ip: str | None, client_ip: str | None, expected: bool | None) -> None:
    assert run({"ip": event_ip}, client_ip=client_ip)["ip_match"] is expected


def test_ip_match_end_to_end_with_comparable_client_ip() -> None:
    client = comparable_client_ip("::ffff:8.8.4.4", "10.0.0.1")
    assert run({"ip": "8.8.4.4"}, client_ip=client)["ip_match"] is True


def test_origin_ok_is_none_without_configured_origins() -> None:
    assert run({"url": "https://evil.example.net/"})["origin_ok"] is None


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("https://shop.example.com/checkout?x=1", True),
        ("HTTPS://SHOP.example.com:443/", True),
        ("http://localhost:3000/", True),
        ("https://shop.example.com:8443/", False),
        ("http://shop.example.com/", False),
        ("https://evil.example.net/", False),
        ("not a url", False),
        (None, None),  # no URL in the event: nothing to compare
        (12345, None),  # a URL of the wrong type reads as absent
    ],
)
def test_origin_ok_with_configured_origins(url: object, expected: bool | None) -> None:
    config = CheckConfig(
        origins=parse_origins(["https://shop.example.com", "http://localhost:3000"])
    )
    assert run({"url": url}, config=config)["origin_ok"] is expected


def test_evaluate_does_not_change_the_summary() -> None:
    fields = summary(ip="8.8.4.4", url="https://a.b/")
    before = dict(fields)
    evaluate(fields, REQUEST_ID, NOW_MS, duplicate=None, client_ip="8.8.4.4", config=CheckConfig())
    assert fields == before


# -- verdict ----------------------------------------------------------------------------

CLEAN: dict[str, Any] = {
    "id_match": True,
    "fresh": True,
    "age_ms": 1000,
    "duplicate": False,
    "replayed": False,
    "ip_match": True,
    "origin_ok": True,
}


def test_trusted_when_nothing_is_wrong() -> None:
    assert verdict(CLEAN, "not_detected") == ("trusted", [])
    assert verdict(CLEAN, "good") == ("trusted", [])
    assert verdict(CLEAN, None) == ("trusted", [])


def test_unknown_checks_are_not_reasons() -> None:
    # None means "nothing to compare", never a failure.
    unknown = dict.fromkeys(CLEAN)
    assert verdict(unknown, None) == ("trusted", [])


@pytest.mark.parametrize(
    ("change", "reason"),
    [
        ({"id_match": False}, "id_mismatch"),
        ({"fresh": False, "age_ms": 60_000}, "stale"),
        ({"fresh": False, "age_ms": -60_000}, "from_future"),
        ({"duplicate": True}, "duplicate"),
        ({"replayed": True}, "replayed"),
        ({"ip_match": False}, "ip_mismatch"),
        ({"origin_ok": False}, "origin_mismatch"),
    ],
)
def test_each_reason_alone(change: dict[str, Any], reason: str) -> None:
    assert verdict(CLEAN | change, "not_detected") == ("suspicious", [reason])


def test_bad_bot_alone_is_suspicious() -> None:
    assert verdict(CLEAN, "bad") == ("suspicious", ["bad_bot"])


def test_all_reasons_in_the_documented_order() -> None:
    everything = {
        "id_match": False,
        "fresh": False,
        "age_ms": 60_000,
        "duplicate": True,
        "replayed": True,
        "ip_match": False,
        "origin_ok": False,
    }
    assert verdict(everything, "bad") == (
        "suspicious",
        [
            "id_mismatch",
            "stale",
            "duplicate",
            "replayed",
            "ip_mismatch",
            "origin_mismatch",
            "bad_bot",
        ],
    )


def test_verdict_of_evaluate_output() -> None:
    # The two functions are used together: a stale, spliced event from the wrong IP.
    checks = run(
        {"timestamp": NOW_MS - 60_000, "ip": "8.8.4.4"},
        outer_id="other",
        client_ip="1.1.1.1",
    )
    assert verdict(checks, "good") == ("suspicious", ["id_mismatch", "stale", "ip_mismatch"])
