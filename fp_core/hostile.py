"""Hostile and malformed open responses, with the outcome each must have.

Used by the property tests, the stand-in endpoint (``case=hostile``) and the
end-to-end fuzz run, so all three agree on what "right" is. Each variant builds a
response body from a seeded RNG and says what the tap must make of it: ``"ok"``
(unsealed), ``"ignored"`` (not an open response: ordinary traffic) or the
:class:`~fp_core.errors.UnsealError` kind it must be counted under.
"""

from __future__ import annotations

import base64
import json
import random
import zlib
from collections.abc import Callable
from typing import Any

from fp_core.generate import generate_event, new_request_id
from fp_core.keys import DecryptionKey
from fp_core.sealed import HEADER, deflate_raw, seal_event, seal_raw

Built = tuple[bytes, str]
_OWN_ID = object()  # "use this response's own request id" (None is a hostile value)


def _b64(raw: bytes) -> str:
    return base64.b64encode(raw).decode("ascii")


class _Ctx:
    def __init__(self, rng: random.Random, key: DecryptionKey, now_ms: int) -> None:
        self.rng, self.key, self.now_ms = rng, key, now_ms
        self.api = rng.choice(("v3", "v4"))
        self.event = generate_event(self.api, rng=rng, timestamp_ms=now_ms)  # type: ignore[arg-type]
        self.rid = new_request_id(rng, now_ms)
        if self.api == "v4":
            self.event["event_id"] = self.rid
        else:
            self.event["products"]["identification"]["data"]["requestId"] = self.rid
            self.event["products"]["botd"]["data"]["requestId"] = self.rid

    def body(self, sealed: Any, rid: Any = _OWN_ID, **extra: Any) -> bytes:
        rid = self.rid if rid is _OWN_ID else rid
        if self.api == "v4":
            obj = {"event_id": rid, "sealed_result": sealed, **extra}
        else:
            obj = {"v": "2", "requestId": rid, "sealedResult": sealed, "products": {}, **extra}
        return json.dumps(obj).encode()

    def sealed_plaintext(self, plaintext: bytes) -> str:
        return _b64(seal_raw(plaintext, self.key, nonce=self.rng.randbytes(12)))

    def good(self) -> str:
        return seal_event(self.event, self.key, nonce=self.rng.randbytes(12))


def _ok(c: _Ctx) -> Built:
    return c.body(c.good()), "ok"


def _ok_extra_keys(c: _Ctx) -> Built:
    extra = {"notifications": [{"x": c.rng.random()}], "error": None, "v": "9", "products": []}
    return c.body(c.good(), **extra), "ok"


def _ok_huge_outer_id(c: _Ctx) -> Built:
    # Unauthenticated outer id: any string is accepted and just fails id_match.
    return c.body(c.good(), rid="x" * c.rng.choice((0, 1, 100_000))), "ok"


def _ok_surrogate_outer_id(c: _Ctx) -> Built:
    # A lone surrogate's escape: Python reads a character with no UTF-8 form, which
    # must not keep the record out of any file, column or saved flow.
    return c.body(c.good(), rid=c.rng.choice(("\ud800", "x\udfff", "\udc80\ud800"))), "ok"


def _ok_duplicate_keys(c: _Ctx) -> Built:
    # JSON parsers (Python's, the browser's) keep the last duplicate.
    good, key = c.good(), "sealed_result" if c.api == "v4" else "sealedResult"
    idk = "event_id" if c.api == "v4" else "requestId"
    text = f'{{"{key}": "bogus", "{idk}": "{c.rid}", "{key}": "{good}"}}'
    return text.encode(), "ok"


def _ok_mixed_names(c: _Ctx) -> Built:
    # requestId with sealed_result: integrations read either spelling.
    return json.dumps({"requestId": c.rid, "sealed_result": c.good()}).encode(), "ok"


def _wrong_type(c: _Ctx) -> Built:
    value = c.rng.choice((None, 1, 1.5, True, [], {}, ["noXc"], {"a": "b"}))
    if c.rng.random() < 0.5:
        return c.body(value), "ignored"
    return c.body(c.good(), rid=value), "ignored"


def _not_utf8(c: _Ctx) -> Built:
    # Read as a browser reads it, invalid bytes replaced: an open response whose sealed
    # result is not base64.
    return b'{"requestId": "\xff\xfe", "sealedResult": "\xc3\x28"}', "bad_base64"


def _deep_outer(c: _Ctx) -> Built:
    depth = c.rng.choice((10_000, 100_000))
    head = b'{"sealedResult": "x", "requestId": "y", "p": '
    return head + b"[" * depth + b"]" * depth + b"}", "ignored"


def _truncated_outer(c: _Ctx) -> Built:
    body = c.body(c.good())
    return body[: c.rng.randrange(1, len(body) - 1)], "ignored"


def _empty_sealed(c: _Ctx) -> Built:
    return c.body(""), "invalid_header"


def _bad_base64(c: _Ctx) -> Built:
    good = c.good()
    i = c.rng.randrange(len(good))
    return c.body(good[:i] + c.rng.choice("!*$ é\n") + good[i + 1 :]), "bad_base64"


def _wrong_header(c: _Ctx) -> Built:
    raw = bytearray(base64.b64decode(c.good()))
    raw[c.rng.randrange(4)] ^= 1 << c.rng.randrange(8)
    return c.body(_b64(bytes(raw))), "invalid_header"


def _random_bytes(c: _Ctx) -> Built:
    raw = c.rng.randbytes(c.rng.randrange(1, 5000))
    if raw[:4] == HEADER:
        raw = b"\x00" + raw
    return c.body(_b64(raw)), "invalid_header"


def _too_short(c: _Ctx) -> Built:
    return c.body(_b64(HEADER + c.rng.randbytes(c.rng.randrange(0, 28)))), "too_short"


def _truncated(c: _Ctx) -> Built:
    raw = base64.b64decode(c.good())
    return c.body(_b64(raw[: c.rng.randrange(32, len(raw))])), "decrypt_failed"


def _tampered(c: _Ctx) -> Built:
    raw = bytearray(base64.b64decode(c.good()))
    raw[c.rng.randrange(4, len(raw))] ^= 1 << c.rng.randrange(8)
    return c.body(_b64(bytes(raw))), "decrypt_failed"


def _wrong_key(c: _Ctx) -> Built:
    stranger = DecryptionKey(c.rng.randbytes(32))
    return c.body(seal_event(c.event, stranger, nonce=c.rng.randbytes(12))), "decrypt_failed"


def _not_deflate(c: _Ctx) -> Built:
    # A leading space is never a valid first deflate block header byte sequence here.
    return c.body(c.sealed_plaintext(b" " + json.dumps(c.event).encode())), "decompress_failed"


def _zlib_wrapped(c: _Ctx) -> Built:
    wrapped = zlib.compress(json.dumps(c.event).encode())  # a zlib header: not raw DEFLATE
    return c.body(c.sealed_plaintext(wrapped)), "decompress_failed"


def _bomb(c: _Ctx) -> Built:
    zeros = zlib.compressobj(9, zlib.DEFLATED, -15)
    segment = zeros.compress(bytes(1 << 20)) + zeros.flush(zlib.Z_FULL_FLUSH)
    final = zlib.compressobj(9, zlib.DEFLATED, -15).flush()
    return c.body(c.sealed_plaintext(segment * c.rng.randrange(5, 64) + final)), "too_large"


def _plaintext_not_utf8(c: _Ctx) -> Built:
    return c.body(c.sealed_plaintext(deflate_raw(b'{"a": "\xff"}'))), "invalid_json"


def _plaintext_deep(c: _Ctx) -> Built:
    # Deeper than any JSON parser's recursion limit; shallower nesting just parses.
    depth = c.rng.choice((200_000, 1_000_000))
    return c.body(c.sealed_plaintext(deflate_raw(b"[" * depth + b"]" * depth))), "invalid_json"


def _plaintext_nan(c: _Ctx) -> Built:
    text = json.dumps(c.event)[:-1] + ', "x": NaN}'
    return c.body(c.sealed_plaintext(deflate_raw(text.encode()))), "invalid_json"


def _plaintext_not_event(c: _Ctx) -> Built:
    value = c.rng.choice(([1, 2], {"event_id": c.rid}, {"products": 1}, "text", None, {}))
    return c.body(c.sealed_plaintext(deflate_raw(json.dumps(value).encode()))), "not_an_event"


VARIANTS: dict[str, Callable[[_Ctx], Built]] = {
    f.__name__.lstrip("_"): f
    for f in (
        _ok,
        _ok_extra_keys,
        _ok_huge_outer_id,
        _ok_surrogate_outer_id,
        _ok_duplicate_keys,
        _ok_mixed_names,
        _wrong_type,
        _not_utf8,
        _deep_outer,
        _truncated_outer,
        _empty_sealed,
        _bad_base64,
        _wrong_header,
        _random_bytes,
        _too_short,
        _truncated,
        _tampered,
        _wrong_key,
        _not_deflate,
        _zlib_wrapped,
        _bomb,
        _plaintext_not_utf8,
        _plaintext_deep,
        _plaintext_nan,
        _plaintext_not_event,
    )
}


def hostile_response(
    seed: int, key: DecryptionKey, now_ms: int, variant: str | None = None
) -> tuple[bytes, str, str]:
    """(body, expected outcome, variant name) for ``seed``; the variant too if not given."""
    rng = random.Random(seed)
    name = variant or rng.choice(sorted(VARIANTS))
    body, expected = VARIANTS[name](_Ctx(rng, key, now_ms))
    return body, expected, name
