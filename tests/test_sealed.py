from __future__ import annotations

import base64
import json
import math
import tracemalloc
import zlib
from typing import Any

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from fp_core import UnsealError, seal_event, unseal_event
from fp_core.errors import UNSEAL_ERROR_KINDS, DecryptFailed, InvalidJson, KeyFailure
from fp_core.keys import DecryptionKey
from fp_core.sealed import (
    HEADER,
    MIN_SIZE,
    deflate_raw,
    inflate_raw,
    parse_event_text,
    seal_raw,
)

V4 = {"event_id": "1700000000000.abcdef", "timestamp": 1700000000000, "bot": "not_detected"}
V3 = {"products": {"identification": {"data": {"requestId": "1700000000000.abcdef"}}}}
GIB = 1 << 30


def kind_of(sealed: str | bytes, keys: list[DecryptionKey | bytes], **kw: int) -> str:
    with pytest.raises(UnsealError) as info:
        unseal_event(sealed, keys, **kw)
    assert info.value.kind in UNSEAL_ERROR_KINDS
    return info.value.kind


def bomb(total: int) -> bytes:
    """Raw DEFLATE that inflates to ``total`` zero bytes, built in milliseconds.

    A full flush ends a block on a byte boundary and resets the history, so the same
    compressed segment can be repeated; an empty final block ends the stream.
    """
    chunk = 1 << 20
    compressor = zlib.compressobj(9, zlib.DEFLATED, -15)
    segment = compressor.compress(bytes(chunk)) + compressor.flush(zlib.Z_FULL_FLUSH)
    final = zlib.compressobj(9, zlib.DEFLATED, -15).flush()
    return segment * (total // chunk) + final


def test_round_trip_v4_and_v3(key: DecryptionKey) -> None:
    for event, api in ((V4, "v4"), (V3, "v3")):
        out = unseal_event(seal_event(event, key), [key])
        assert out == event
        assert isinstance(out, dict)
        assert (out.api, out.key_id, out.key_index) == (api, key.key_id, 0)
        assert json.loads(out.text) == event, "the plaintext it was parsed from"


def test_accepts_raw_bytes_and_base64(key: DecryptionKey) -> None:
    sealed = seal_event(V4, key)
    raw = base64.b64decode(sealed)
    assert unseal_event(raw, [key]) == unseal_event(sealed, [key]) == V4
    assert unseal_event(bytearray(raw), [key.raw()]) == V4


def test_unpadded_and_urlsafe_base64(key: DecryptionKey) -> None:
    raw = base64.b64decode(seal_event(V4, key))
    assert unseal_event(base64.urlsafe_b64encode(raw).decode().rstrip("="), [key]) == V4


def test_fixed_nonce_is_deterministic(key: DecryptionKey) -> None:
    nonce = bytes(12)
    assert seal_event(V4, key, nonce=nonce) == seal_event(V4, key, nonce=nonce)
    assert seal_event(V4, key) != seal_event(V4, key)


def test_key_rotation_reports_which_key(key: DecryptionKey) -> None:
    wrong = [DecryptionKey.generate() for _ in range(3)]
    out = unseal_event(seal_event(V4, key), [*wrong, key])
    assert out.key_index == 3
    assert out.key_id == key.key_id


def test_every_key_failure_is_listed_without_values(key: DecryptionKey) -> None:
    wrong = DecryptionKey.generate()
    with pytest.raises(DecryptFailed) as info:
        unseal_event(seal_event(V4, key), [wrong, b"short", wrong.raw()])
    failures = info.value.failures
    assert failures == (
        KeyFailure(0, wrong.key_id, "auth"),
        KeyFailure(1, failures[1].key_id, "key_size"),
        KeyFailure(2, wrong.key_id, "auth"),
    )
    text = str(info.value) + repr(info.value.to_dict())
    assert wrong.to_base64() not in text
    assert wrong.raw().hex() not in text


def test_header_is_checked_before_keys(key: DecryptionKey) -> None:
    raw = bytearray(base64.b64decode(seal_event(V4, key)))
    raw[0] ^= 1
    assert kind_of(bytes(raw), []) == "invalid_header"
    assert kind_of(b"", [key]) == "invalid_header"
    assert kind_of("", [key]) == "invalid_header"


def test_too_short_and_no_keys(key: DecryptionKey) -> None:
    assert kind_of(HEADER + bytes(MIN_SIZE - len(HEADER) - 1), [key]) == "too_short"
    assert kind_of(seal_event(V4, key), []) == "no_keys"


@pytest.mark.parametrize("text", ["%%%%", "noXc7=A", "é", "AAAAA"])
def test_bad_base64(text: str, key: DecryptionKey) -> None:
    assert kind_of(text, [key]) == "bad_base64"


def test_wrong_argument_type_is_still_an_unseal_error(key: DecryptionKey) -> None:
    assert kind_of(12345, [key]) == "bad_base64"  # type: ignore[arg-type]


@pytest.mark.parametrize("where", [-1, -17, len(HEADER) + 12])
def test_tampering_fails_authentication(key: DecryptionKey, where: int) -> None:
    raw = bytearray(base64.b64decode(seal_event(V4, key)))
    raw[where] ^= 0x40
    assert kind_of(bytes(raw), [key]) == "decrypt_failed"


@pytest.mark.parametrize(
    ("plaintext", "kind"),
    [
        (b"not deflated at all", "decompress_failed"),
        (zlib.compress(json.dumps(V4).encode()), "decompress_failed"),  # zlib wrapper
        (deflate_raw(json.dumps(V4).encode())[:-3], "decompress_failed"),  # truncated
        (b"", "decompress_failed"),
        (deflate_raw(b"\xff\xfe{}"), "invalid_json"),
        (deflate_raw(b'{"event_id": '), "invalid_json"),
        (deflate_raw(b"[" * 100_000 + b"]" * 100_000), "invalid_json"),
        (deflate_raw(b'{"event_id": "x", "timestamp": NaN}'), "invalid_json"),
        (deflate_raw(b'{"event_id": "x", "timestamp": 1e999}'), "invalid_json"),
        (deflate_raw(b'{"event_id": "x", "timestamp": ' + b"9" * 5000 + b"}"), "invalid_json"),
        (deflate_raw(b"[1, 2]"), "not_an_event"),
        (deflate_raw(b"{}"), "not_an_event"),
        (deflate_raw(b'{"event_id": "x", "timestamp": "1"}'), "not_an_event"),
        (deflate_raw(b'{"event_id": "x", "timestamp": true}'), "not_an_event"),
        (deflate_raw(b'{"products": []}'), "not_an_event"),
    ],
    ids=[
        "raw",
        "zlib-wrapped",
        "truncated-deflate",
        "empty",
        "not-utf8",
        "truncated-json",
        "deep-nesting",
        "nan",
        "infinity",
        "huge-int",
        "array",
        "empty-object",
        "string-timestamp",
        "bool-timestamp",
        "products-not-object",
    ],
)
def test_plaintext_failures(key: DecryptionKey, plaintext: bytes, kind: str) -> None:
    assert kind_of(seal_raw(plaintext, key), [key]) == kind


def test_trailing_data_after_deflate_stream_is_ignored_like_the_sdks(key: DecryptionKey) -> None:
    plaintext = deflate_raw(json.dumps(V4).encode()) + b"trailing"
    assert unseal_event(seal_raw(plaintext, key), [key]) == V4


def test_decompress_failure_outranks_other_keys_auth_failures(key: DecryptionKey) -> None:
    sealed = seal_raw(b"plain", key)
    with pytest.raises(UnsealError) as info:
        unseal_event(sealed, [DecryptionKey.generate(), key, DecryptionKey.generate()])
    assert info.value.kind == "decompress_failed"
    assert [f.reason for f in info.value.failures] == ["auth", "not_deflate", "auth"]  # type: ignore[attr-defined]


@pytest.mark.parametrize("plaintext", [b"plain", deflate_raw(json.dumps(V4).encode())[:-3]])
def test_first_key_failing_to_inflate_is_listed_once(key: DecryptionKey, plaintext: bytes) -> None:
    # The first key has a fast path; when it authenticates but cannot inflate, the
    # general loop must still say why, and not list (or try) that key twice.
    with pytest.raises(UnsealError) as info:
        unseal_event(seal_raw(plaintext, key), [key, DecryptionKey.generate()])
    assert info.value.kind == "decompress_failed"
    assert [(f.index, f.reason) for f in info.value.failures] == [(0, "not_deflate"), (1, "auth")]  # type: ignore[attr-defined]


def test_gigabyte_bomb_fails_fast_with_bounded_memory(key: DecryptionKey) -> None:
    sealed = seal_raw(bomb(GIB), key)
    assert len(sealed) < 2 * 1024 * 1024  # ~1000:1 is deflate's best ratio
    tracemalloc.start()
    try:
        with pytest.raises(UnsealError) as info:
            unseal_event(sealed, [key], max_size=4 * 1024 * 1024)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert info.value.kind == "too_large"
    # Input copies plus one capped output buffer: nowhere near the gigabyte.
    assert peak < 32 * 1024 * 1024


def test_max_size_boundary(key: DecryptionKey) -> None:
    body = json.dumps(V4).encode()
    sealed = seal_raw(deflate_raw(body), key)
    assert unseal_event(sealed, [key], max_size=len(body)) == V4
    assert kind_of(sealed, [key], max_size=len(body) - 1) == "too_large"


def test_inflate_raw_exact_cap() -> None:
    assert inflate_raw(deflate_raw(b"x" * 10), 10) == b"x" * 10


def test_huge_input_is_handled(key: DecryptionKey) -> None:
    junk = HEADER + bytes(8 * 1024 * 1024)
    assert kind_of(junk, [key]) == "decrypt_failed"
    assert kind_of(base64.b64encode(junk).decode() + "!", [key]) == "bad_base64"


json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.text()
    | st.floats(allow_nan=False, allow_infinity=False),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(), children, max_size=4)
    ),
    max_leaves=20,
)


@settings(max_examples=150, deadline=None)
@given(
    extra=st.dictionaries(st.text(), json_values, max_size=5), event_id=st.text(), ts=st.integers()
)
def test_property_round_trip_v4(extra: dict[str, object], event_id: str, ts: int) -> None:
    key = DecryptionKey(bytes(range(32)))
    event = {**extra, "event_id": event_id, "timestamp": ts}
    assert unseal_event(seal_event(event, key), [key]) == event


@settings(max_examples=100, deadline=None)
@given(products=st.dictionaries(st.text(), json_values, max_size=5))
def test_property_round_trip_v3(products: dict[str, object]) -> None:
    key = DecryptionKey(bytes(range(32)))
    event = {"products": products}
    assert unseal_event(seal_event(event, key), [key]) == event


KEY = DecryptionKey(bytes(range(32)))
OUTCOMES = {"ok", *UNSEAL_ERROR_KINDS}


def outcome(sealed: str | bytes) -> str:
    """ "ok" or the error kind; any other exception fails the test."""
    try:
        unseal_event(sealed, [KEY])
    except UnsealError as exc:
        return exc.kind
    return "ok"


@settings(max_examples=300, deadline=None)
@given(data=st.binary(max_size=512) | st.builds(lambda b: HEADER + b, st.binary(max_size=512)))
def test_property_any_bytes_give_event_or_unseal_error(data: bytes) -> None:
    assert outcome(data) in OUTCOMES


@settings(max_examples=300, deadline=None)
@given(text=st.text(max_size=512))
def test_property_any_text_gives_event_or_unseal_error(text: str) -> None:
    assert outcome(text) in OUTCOMES


@settings(max_examples=200, deadline=None)
@given(plaintext=st.binary(max_size=256), compress=st.booleans())
def test_property_any_authenticated_plaintext(plaintext: bytes, compress: bool) -> None:
    sealed = seal_raw(deflate_raw(plaintext) if compress else plaintext, KEY)
    assert outcome(sealed) in OUTCOMES


# What json.loads() accepts around and after a value, and what it refuses: the parser's
# fast path (the C scanner alone) must agree with it on all of these.
_JSON_TEXTS = st.one_of(
    st.sampled_from(
        [
            '{"a": 1}',
            ' {"a": 1}',
            '{"a": 1} ',
            '\n\t{"a": [1, 2.5, "x"]}\r\n',
            '{"a": 1}}',
            '{"a": 1} x',
            '{"a": 1}{"b": 2}',
            "\ufeff{}",
            "",
            "   ",
            "[]",
            '"x"',
            "1",
            "1 2",
            "nul",
        ]
    ),
    st.builds(
        lambda pre, value, post: pre + json.dumps(value) + post,
        st.text(" \t\r\nx{}[]1\ufeff", max_size=3),
        st.recursive(
            st.none()
            | st.booleans()
            | st.integers()
            | st.floats(allow_nan=False, allow_infinity=False)
            | st.text(),
            lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(), inner),
            max_leaves=8,
        ),
        st.text(" \t\r\nx{}[]1\ufeff", max_size=3),
    ),
)


def _has_infinity(value: object) -> bool:
    if isinstance(value, float):
        return math.isinf(value)
    if isinstance(value, list):
        return any(map(_has_infinity, value))
    if isinstance(value, dict):
        return any(map(_has_infinity, value.values()))
    return False


@given(text=_JSON_TEXTS)
@example(text="1e+311")  # json.loads reads infinity here; fp-tap refuses it
@example(text='[0, {"a": -1e400}]')
@settings(max_examples=300, deadline=None)
def test_json_parsing_agrees_with_json_loads(text: str) -> None:
    """As json.loads, except that a number too large for a float is an error."""
    try:
        expected = json.loads(text)
    except ValueError:
        expected = ValueError
    if expected is ValueError or _has_infinity(expected):
        with pytest.raises(InvalidJson):
            parse_event_text(text)
    else:
        assert parse_event_text(text) == expected


@pytest.mark.parametrize("max_size", [-1, 2.5, None, "5"])
def test_a_max_size_that_is_not_a_non_negative_int_is_refused(max_size: Any) -> None:
    """zlib reads a limit of 0 or less as "none": -1 inflated a bomb in full (found by an
    API hunt)."""
    key = DecryptionKey.generate()
    sealed = seal_event({"event_id": "e", "timestamp": 1}, key)
    with pytest.raises(ValueError, match="max_size must be a non-negative int"):
        unseal_event(sealed, [key], max_size=max_size)
