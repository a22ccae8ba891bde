from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fp_core import OpenResponse, parse_open_response


def body(obj: object) -> bytes:
    return json.dumps(obj).encode()


def test_v3_shape_with_placeholder_products() -> None:
    got = parse_open_response(
        body({"v": "2", "requestId": "r1", "sealedResult": "noXc", "products": {"x": {}}})
    )
    assert got == OpenResponse(api="v3", request_id="r1", sealed="noXc", version="2")


def test_v4_shape_and_extra_keys() -> None:
    got = parse_open_response(
        body({"event_id": "e1", "sealed_result": "noXc", "notifications": [], "error": None})
    )
    assert got == OpenResponse(api="v4", request_id="e1", sealed="noXc", version=None)


def test_leading_whitespace_and_str_input() -> None:
    text = "\n  " + json.dumps({"requestId": "r", "sealedResult": "s"})
    assert parse_open_response(text) == OpenResponse("v3", "r", "s")


@pytest.mark.parametrize(
    ("content", "sealed"),
    [
        # A browser drops a byte order mark before parsing, so the agent reads these.
        (b"\xef\xbb\xbf" + body({"event_id": "e", "sealed_result": "s"}), "s"),
        (b"\xef\xbb\xbf \n" + body({"event_id": "e", "sealed_result": "s"}), "s"),
        # An integer too long for Python's int (a float to a browser), never used.
        (b'{"n": ' + b"7" * 5000 + b', "event_id": "e", "sealed_result": "s"}', "s"),
        # Invalid UTF-8, which a browser replaces: elsewhere, or in the sealed result
        # itself (which then fails to unseal, recorded as an error).
        (b'{"note": "caf\xe9", "event_id": "e", "sealed_result": "s"}', "s"),
        (b'{"event_id": "e", "sealed_result": "s\xff"}', "s\ufffd"),
    ],
    ids=["bom", "bom-and-space", "huge-integer", "latin-1-elsewhere", "latin-1-in-sealed"],
)
def test_what_a_browser_reads_is_read(content: bytes, sealed: str) -> None:
    assert parse_open_response(content) == OpenResponse("v4", "e", sealed)


@pytest.mark.parametrize(
    "content",
    [
        b"",
        b"<html>sealedResult</html>",
        b'{"ok": true}',
        b'["sealedResult"]',
        b'{"requestId": "r"}',
        b'{"sealedResult": "s"}',
        b'{"requestId": 1, "sealedResult": "s"}',
        b'{"requestId": "r", "sealedResult": null}',
        b'{"event_id": "e", "sealed_result": {"a": 1}}',
        b'{"requestId": "r", "sealedResult": "s"',
        b"\xff\xfe{sealedResult}",
        b"[" * 50_000 + b'"sealedResult"' + b"]" * 50_000,
        b'{"a":' * 50_000 + b'"sealed_result"' + b"}" * 50_000,
    ],
    ids=[
        "empty",
        "html",
        "plain-json",
        "array",
        "no-sealed",
        "no-id",
        "id-not-string",
        "sealed-null",
        "sealed-object",
        "truncated",
        "not-utf8",
        "deep-array",
        "deep-object",
    ],
)
def test_not_an_open_response(content: bytes) -> None:
    assert parse_open_response(content) is None


@settings(max_examples=400, deadline=None)
@given(content=st.binary(max_size=400))
def test_property_any_bytes(content: bytes) -> None:
    result = parse_open_response(content)
    assert result is None or isinstance(result, OpenResponse)


@settings(max_examples=200, deadline=None)
@given(
    obj=st.dictionaries(
        st.sampled_from(["v", "requestId", "sealedResult", "event_id", "sealed_result", "x"]),
        st.none() | st.integers() | st.text(max_size=10) | st.lists(st.integers(), max_size=2),
    )
)
def test_property_shapes(obj: dict[str, object]) -> None:
    result = parse_open_response(body(obj))
    has_sealed = isinstance(obj.get("sealedResult"), str) or isinstance(
        obj.get("sealed_result"), str
    )
    has_id = isinstance(obj.get("requestId"), str) or isinstance(obj.get("event_id"), str)
    assert (result is not None) == (has_sealed and has_id)
    if result is not None:
        assert result.api == ("v3" if isinstance(obj.get("requestId"), str) else "v4")


@pytest.mark.parametrize(
    "template",
    [
        '{"requestId": %s, "sealedResult": "AAAA"}',
        '{"event_id": %s, "sealed_result": "AAAA"}',
        '{"requestId": "rid", "sealedResult": %s}',
    ],
)
def test_a_number_is_never_an_id_or_a_sealed_result_however_long(template: str) -> None:
    assert parse_open_response((template % "5").encode()) is None
    assert parse_open_response((template % ("9" * 5000)).encode()) is None
