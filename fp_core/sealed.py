"""Sealed results: ``base64(9E 85 DC ED | nonce 12 | AES-256-GCM ciphertext | tag 16)``.

The plaintext is raw DEFLATE (RFC 1951) of UTF-8 JSON. Unsealing is a pure function
of the payload and the keys; every failure is an :class:`~fp_core.errors.UnsealError`.
"""

from __future__ import annotations

import base64
import json
import math
import os
import zlib
from collections.abc import Callable, Sequence
from typing import Any

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from fp_core.errors import (
    BadBase64,
    DecompressFailed,
    DecryptFailed,
    InvalidHeader,
    InvalidJson,
    KeyFailure,
    NoKeys,
    NotAnEvent,
    TooLarge,
    TooShort,
)
from fp_core.events import event_api
from fp_core.jsontext import encodable
from fp_core.keys import KEY_SIZE, DecryptionKey, decode_base64_lenient, key_id

HEADER = bytes.fromhex("9e85dced")
NONCE_SIZE = 12
TAG_SIZE = 16
MIN_SIZE = len(HEADER) + NONCE_SIZE + TAG_SIZE
_NONCE_START = len(HEADER)
_BODY_START = len(HEADER) + NONCE_SIZE
_RAW_DEFLATE = -zlib.MAX_WBITS
#: DEFLATE's largest expansion: a 258-byte match coded in 2 bits (zlib's technical notes).
MAX_DEFLATE_RATIO = 1032
#: Default cap on the inflated JSON. Real events are a few KB; 4 MiB leaves room for
#: unusual ones while a decompression bomb stops after at most this much output.
DEFAULT_MAX_SIZE = 4 * 1024 * 1024

KeyLike = DecryptionKey | bytes


class UnsealedEvent(dict[str, Any]):
    """The event JSON object, how it was unsealed (``api``, ``key_id``, ``key_index``), and
    the JSON ``text`` it was parsed from."""

    __slots__ = ("api", "key_id", "key_index", "text")

    api: str
    key_id: str
    key_index: int
    #: The JSON text the event was parsed from (the inflated plaintext, decoded).
    text: str


def unseal_event(
    sealed: str | bytes | bytearray | memoryview,
    keys: Sequence[KeyLike],
    *,
    max_size: int = DEFAULT_MAX_SIZE,
) -> UnsealedEvent:
    """Unseal ``sealed`` (base64 text or raw bytes) with the first key that works.

    The header is checked before any key. Keys are tried in order; the first one that
    authenticates and inflates wins. The inflated JSON may not exceed ``max_size`` bytes.
    Raises only :class:`~fp_core.errors.UnsealError` subclasses for what ``sealed`` holds;
    a ``max_size`` that is not a non-negative int is the caller's ``ValueError``.
    """
    if type(max_size) is not int or max_size < 0:
        # zlib reads a limit of 0 or less as "none": a bomb would inflate in full.
        raise ValueError(f"max_size must be a non-negative int, not {max_size!r}")
    data = _sealed_bytes(sealed)
    if not data.startswith(HEADER):
        raise InvalidHeader(f"sealed data does not start with {HEADER.hex()}")
    if len(data) < MIN_SIZE:
        raise TooShort(f"sealed data is {len(data)} bytes, the minimum is {MIN_SIZE}")
    plaintext, index, kid = _open(data, keys, max_size)
    text = _utf8(plaintext)
    obj = parse_event_text(text)
    api = event_api(obj)
    if api is None:
        raise NotAnEvent(
            "valid JSON, but neither a v3 event (a 'products' object) "
            "nor a v4 event ('event_id' and 'timestamp')"
        )
    event = UnsealedEvent(obj)
    event.api, event.key_id, event.key_index, event.text = api, kid, index, text
    return event


def _sealed_bytes(sealed: object) -> bytes:
    if isinstance(sealed, str):
        try:
            return decode_base64_lenient(sealed)
        except ValueError as exc:
            raise BadBase64(f"sealed result is not base64: {exc}") from None
    if isinstance(sealed, bytes | bytearray | memoryview):
        return bytes(sealed)
    raise BadBase64(f"sealed result must be base64 text or bytes, not {type(sealed).__name__}")


def _cipher(key: object) -> tuple[AESGCM | None, str | None]:
    if isinstance(key, DecryptionKey):
        return key.aead, key.key_id
    if isinstance(key, bytes | bytearray) and len(key) == KEY_SIZE:
        return AESGCM(bytes(key)), key_id(bytes(key))
    if isinstance(key, bytes | bytearray):
        return None, key_id(bytes(key))
    return None, None


def _open(data: bytes, keys: Sequence[KeyLike], max_size: int) -> tuple[bytes, int, str]:
    """Decrypt and inflate with the first key that does both; else raise the aggregate."""
    if not keys:
        raise NoKeys("no decryption keys are configured")
    nonce = data[_NONCE_START:_BODY_START]
    body = data[_BODY_START:]
    first = keys[0]
    if type(first) is DecryptionKey and len(body) * MAX_DEFLATE_RATIO <= max_size:
        # The usual case, for every payload: the first key opens it, and it is too
        # short to inflate past max_size. Without the loop's bookkeeping this is 0.4 us
        # cheaper, 2 % of unsealing 1 KB (BENCHMARKS.md). A failure goes on to the loop:
        # from the next key if this one did not authenticate, else from this one, so
        # that inflate_raw says why it would not inflate.
        try:
            compressed = first.aead.decrypt(nonce, body, None)
        except InvalidTag:
            return _open_slowly(nonce, body, keys, max_size, KeyFailure(0, first.key_id, "auth"))
        except (ValueError, OverflowError):
            failure = KeyFailure(0, first.key_id, "cipher_error")
            return _open_slowly(nonce, body, keys, max_size, failure)
        try:
            return zlib.decompress(compressed, _RAW_DEFLATE), 0, first.key_id
        except zlib.error:
            pass  # inflate_raw, in the loop, says why
    return _open_slowly(nonce, body, keys, max_size, None)


def _open_slowly(
    nonce: bytes,
    body: bytes,
    keys: Sequence[KeyLike],
    max_size: int,
    first_failure: KeyFailure | None,
) -> tuple[bytes, int, str]:
    """Try ``keys`` in order, from the second if ``first_failure`` says why the first failed."""
    failures: list[KeyFailure] = []
    if first_failure is not None:
        failures.append(first_failure)
    # After a key authenticates, the reason the payload still failed matters more than
    # the other keys' plain authentication failures.
    worst: type[DecompressFailed | TooLarge | DecryptFailed] = DecryptFailed
    for index in range(len(failures), len(keys)):
        aead, kid = _cipher(keys[index])
        if aead is None or kid is None:
            failures.append(KeyFailure(index, kid, "key_size"))
            continue
        try:
            compressed = aead.decrypt(nonce, body, None)
        except InvalidTag:
            failures.append(KeyFailure(index, kid, "auth"))
            continue
        except (ValueError, OverflowError):
            failures.append(KeyFailure(index, kid, "cipher_error"))
            continue
        try:
            return inflate_raw(compressed, max_size), index, kid
        except TooLarge:
            failures.append(KeyFailure(index, kid, "too_large"))
            worst = TooLarge
        except DecompressFailed:
            failures.append(KeyFailure(index, kid, "not_deflate"))
            if worst is DecryptFailed:
                worst = DecompressFailed
    raise worst(_aggregate_message(worst, max_size, len(failures)), tuple(failures))


def _aggregate_message(
    kind: type[DecryptFailed | DecompressFailed | TooLarge], max_size: int, tried: int
) -> str:
    if kind is TooLarge:
        return f"the event inflates to more than {max_size} bytes (decompression bomb?)"
    if kind is DecompressFailed:
        return "a key authenticated, but the plaintext is not raw DEFLATE data"
    return f"none of the {tried} key(s) authenticates this payload (wrong or rotated key?)"


def inflate_raw(data: bytes, max_size: int) -> bytes:
    """Inflate raw DEFLATE, stopping as soon as the output would exceed ``max_size``."""
    if len(data) * MAX_DEFLATE_RATIO <= max_size:
        # Too short to inflate past max_size: the one-shot call, cheaper for small
        # payloads (every real event), cannot be a bomb here.
        try:
            return zlib.decompress(data, _RAW_DEFLATE)
        except zlib.error as exc:
            # Z_BUF_ERROR (-5): the input ended before the stream did.
            if str(exc).startswith("Error -5 "):
                raise DecompressFailed("raw DEFLATE stream is truncated") from None
            raise DecompressFailed("plaintext is not raw DEFLATE data") from None
    inflater = zlib.decompressobj(_RAW_DEFLATE)
    try:
        out = inflater.decompress(data, max_size + 1)
    except zlib.error:
        raise DecompressFailed("plaintext is not raw DEFLATE data") from None
    if len(out) > max_size:
        raise TooLarge(f"inflated event exceeds {max_size} bytes")
    if not inflater.eof:
        raise DecompressFailed("raw DEFLATE stream is truncated")
    return out


_INFINITIES = (math.inf, -math.inf)


def _finite_float(text: str) -> float:
    value = float(text)
    if value in _INFINITIES:
        raise ValueError("number out of range")
    return value


def _reject_constant(name: str) -> None:
    raise ValueError(f"{name} is not JSON")


# Built once: json.loads() with hooks would build a decoder (and its scanner) per call.
_DECODER = json.JSONDecoder(parse_float=_finite_float, parse_constant=_reject_constant)
# The C scanner itself: JSONDecoder.decode wraps it in two Python calls and two regex
# matches for surrounding whitespace, about 7 % of unsealing a 1 KB event.
_SCAN: Callable[[str, int], tuple[Any, int]] = _DECODER.scan_once  # type: ignore[attr-defined]


def _utf8(plaintext: bytes) -> str:
    try:
        return plaintext.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise InvalidJson(f"plaintext is not UTF-8 (byte {exc.start})") from None


def parse_event_text(text: str) -> Any:
    """Strict JSON (no NaN/Infinity, no overflowing numbers) from decoded plaintext."""
    try:
        try:
            obj, end = _SCAN(text, 0)
        except StopIteration:
            end = -1  # leading whitespace, or not JSON: decode() below says which
        if end == len(text):
            return obj
        # Whitespace around the value, or something wrong: the full decoder either
        # accepts it or raises the error json.loads() would.
        if text.startswith("\ufeff"):  # as json.loads() refuses it
            raise json.JSONDecodeError("Unexpected UTF-8 BOM (decode using utf-8-sig)", text, 0)
        return _DECODER.decode(text)
    except RecursionError:
        raise InvalidJson("plaintext JSON is nested too deeply to parse") from None
    except json.JSONDecodeError as exc:
        raise InvalidJson(f"plaintext is not JSON: {exc.msg} at char {exc.pos}") from None
    except ValueError as exc:
        raise InvalidJson(f"plaintext JSON has an unusable value: {_short(exc)}") from None


def _short(exc: Exception) -> str:
    return str(exc).split(":", 1)[0][:80]


def deflate_raw(data: bytes, level: int = 6) -> bytes:
    """Raw DEFLATE (no zlib or gzip wrapper), as Fingerprint seals."""
    compressor = zlib.compressobj(level, zlib.DEFLATED, -zlib.MAX_WBITS)
    return compressor.compress(data) + compressor.flush()


def seal_raw(payload: bytes, key: KeyLike, *, nonce: bytes | None = None) -> bytes:
    """Encrypt ``payload`` as-is (no compression) into sealed bytes."""
    aead = key.aead if isinstance(key, DecryptionKey) else AESGCM(bytes(key))
    if nonce is None:
        nonce = os.urandom(NONCE_SIZE)
    if len(nonce) != NONCE_SIZE:
        raise ValueError(f"nonce must be {NONCE_SIZE} bytes")
    return HEADER + nonce + aead.encrypt(nonce, payload, None)


def seal_event(event: object, key: KeyLike, *, nonce: bytes | None = None) -> str:
    """Seal a JSON value exactly as Fingerprint does; the inverse of :func:`unseal_event`.

    Raises ``ValueError`` for what is not JSON, which unsealing would refuse: NaN or an
    infinity. A lone surrogate in a string is sealed as its ``\\uXXXX`` escape."""
    text = json.dumps(event, separators=(",", ":"), ensure_ascii=False, allow_nan=False)
    plaintext = encodable(text).encode("utf-8")
    return base64.b64encode(seal_raw(deflate_raw(plaintext), key, nonce=nonce)).decode("ascii")
