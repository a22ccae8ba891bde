"""Differential test: ``fp_core.unseal_event`` against the official Python SDK.

For a few hundred generated sealed payloads (v3/v4 events, payloads that are not events,
mutated bytes, random key lists) both implementations must agree: the same JSON when
they succeed, both failing otherwise, and fp_core's error ``kind`` must match the error
the SDK raised. Everything is derived from a fixed seed, so a failure reproduces; test ids
and assertion messages name the case, never a key.

The SDK is ``fingerprint_server_sdk.sealed`` (PyPI ``fingerprint-server-sdk``). Its public
``unseal_event_response`` accepts only v4 events, so the decryption itself is compared
through its module-level helper ``__unseal`` (header check, per-key AES-GCM, raw inflate,
UTF-8 decode), followed by a plain ``json.loads``. Every unsealed event also goes through
the public entry point of its API's SDK (v3: the deprecated ``fingerprint-pro-server-api-sdk``),
which must build its model from it and name the same request.
"""

from __future__ import annotations

import base64
import json
import random
import warnings
import zlib
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cache
from typing import Any, Final

import pytest
from cryptography.exceptions import InvalidTag

from fp_core import UnsealError, summarize, unseal_event
from fp_core.events import Api
from fp_core.generate import generate_event
from fp_core.keys import KEY_SIZE, DecryptionKey
from fp_core.sealed import HEADER, MIN_SIZE, NONCE_SIZE, deflate_raw, seal_raw

sdk = pytest.importorskip(
    "fingerprint_server_sdk.sealed",
    reason="the official SDK (pip install 'fp-tap[test]') is the oracle of this test",
)
with warnings.catch_warnings():
    warnings.simplefilter("ignore", DeprecationWarning)  # "migrate to Server API v4"
    sdk3 = pytest.importorskip(
        "fingerprint_pro_server_api_sdk.sealed",
        reason="the official v3 SDK (pip install 'fp-tap[test]') is the v3 events' oracle",
    )
# A module-level double-underscore name is not mangled; vars() reads it without getattr.
_sdk_unseal: Callable[[bytes, list[Any]], str] = vars(sdk)["__unseal"]

SEED: Final = 20240611
CASE_COUNT: Final = 320
# Each outcome class must show up at least this often, or the mix has degenerated.
MIN_PER_OUTCOME: Final = 4

OUTCOMES: Final = (
    "ok_v3",
    "ok_v4",
    "invalid_header",
    "too_short",
    "decrypt_failed",
    "decompress_failed",
    "invalid_json",
    "not_an_event",
)


# --- cases ----------------------------------------------------------------------------

#: Marks a plaintext that holds no JSON value (None would be JSON null).
NO_JSON: Final = object()

#: Plaintexts: a deflated event (most cases), then authentic plaintexts that are not one.
PAYLOADS: Final = (
    "event",
    "text",
    "binary",
    "bad_utf8",
    "empty",
    "stored",
    "zlib",
    "array",
    "scalar",
    "object",
    "v4_str_ts",
    "truncated",
    "trailing",
)
#: Damage to the sealed bytes: none (most cases), then one of the others.
MUTATIONS: Final = ("intact", "flip_body", "flip_nonce", "truncate", "header", "append")


@dataclass(frozen=True, slots=True)
class Case:
    """One sealed payload and a key list. Keys and bytes stay out of ``repr``."""

    label: str
    # Which plaintext (PAYLOADS) and which damage (MUTATIONS): for the coverage check.
    payload: str
    mutation: str
    sealed: bytes = field(repr=False)
    # What fp_core gets: DecryptionKey objects, or raw bytes (any length).
    keys: tuple[DecryptionKey | bytes, ...] = field(repr=False)
    # Position of the sealing key in ``keys``, or None when it is absent.
    seal_index: int | None
    # The JSON value that was sealed, or NO_JSON (for a ground-truth check).
    sealed_json: Any = field(repr=False)
    # Hand fp_core base64 text instead of bytes (the form the addon sees).
    as_text: bool

    def sdk_keys(self) -> list[Any]:
        return [sdk.DecryptionKey(_raw(k), "aes-256-gcm") for k in self.keys]

    def fp_input(self) -> str | bytes:
        return base64.b64encode(self.sealed).decode("ascii") if self.as_text else self.sealed


def _raw(key: DecryptionKey | bytes) -> bytes:
    return key.raw() if isinstance(key, DecryptionKey) else key


def _compact(value: Any) -> bytes:
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False).encode("utf-8")


def _random_event(rng: random.Random) -> tuple[str, dict[str, Any]]:
    """A generated event and a short description of the generator options."""
    api: Api = "v3" if rng.random() < 0.5 else "v4"
    bot = rng.choice(("not_detected", "good", "bad"))
    sparse = rng.random() < 0.3
    failed = api == "v3" and rng.random() < 0.2
    pad_to = rng.randint(1024, 64 * 1024) if rng.random() < 0.15 else None
    event = generate_event(
        api,
        rng=rng,
        bot=bot,
        # A fixed clock keeps the case reproducible (the default is time.time()).
        timestamp_ms=rng.randint(1_600_000_000_000, 1_800_000_000_000),
        sparse=sparse,
        identification_failed=failed,
        pad_to=pad_to,
    )
    flags = "".join(
        f"-{name}" for name, on in (("sparse", sparse), ("idfail", failed), ("pad", pad_to)) if on
    )
    return f"{api}-{bot}{flags}", event


def _payload(rng: random.Random) -> tuple[str, str, bytes, Any]:
    """(kind, description, plaintext to encrypt, the JSON value it holds or ``NO_JSON``).

    Mostly a deflated event, as Fingerprint seals; otherwise a plaintext that is
    authentic but is not a deflated event JSON.
    """
    label, event = _random_event(rng)
    text = _compact(event)
    if rng.random() < 0.72:
        return "event", label, deflate_raw(text), event
    kind = rng.choice(PAYLOADS[1:])
    if kind == "text":  # deflated, but not JSON
        return kind, kind, deflate_raw(f"not json {rng.random()}".encode()), NO_JSON
    if kind == "binary":  # deflated random bytes; a lone continuation byte first: never UTF-8
        return kind, kind, deflate_raw(b"\x80" + rng.randbytes(rng.randint(0, 200))), NO_JSON
    if kind == "bad_utf8":  # JSON-looking, but one byte is not UTF-8
        return kind, kind, deflate_raw(b'{"products":{"x":"\xff"}}'), NO_JSON
    if kind == "empty":  # deflate of nothing: inflates fine to b""
        return kind, kind, deflate_raw(b""), NO_JSON
    if kind == "stored":  # the JSON itself, never compressed
        return kind, kind, text, NO_JSON
    if kind == "zlib":  # zlib-wrapped (wbits=15) instead of raw DEFLATE
        return kind, kind, zlib.compress(text, wbits=15), NO_JSON
    if kind == "array":  # valid JSON, not an object
        value: Any = [event] if rng.random() < 0.5 else [1, 2, 3]
        return kind, kind, deflate_raw(_compact(value)), value
    if kind == "scalar":
        value = rng.choice((42, "event", None, True, 1.5))
        return kind, kind, deflate_raw(_compact(value)), value
    if kind == "object":  # an object, but neither 'products' nor 'event_id'+'timestamp'
        value = {"visitorId": "abc", "data": event}
        return kind, kind, deflate_raw(_compact(value)), value
    if kind == "v4_str_ts":  # looks v4, but the timestamp is a string
        value = {"event_id": "1700000000000.abcdef", "timestamp": "1700000000000"}
        return kind, kind, deflate_raw(_compact(value)), value
    if kind == "truncated":  # a deflate stream cut short (possibly to nothing)
        stream = deflate_raw(text)
        return kind, kind, stream[: rng.randrange(0, len(stream) - 1)], NO_JSON
    # zlib.decompress (the SDK) ignores data after the end of the stream; so does fp_core.
    garbage = rng.randbytes(rng.randint(1, 64))
    return kind, f"{kind}-{label}", deflate_raw(text) + garbage, event


def _keys(
    rng: random.Random, sealing: DecryptionKey
) -> tuple[list[DecryptionKey | bytes], int | None]:
    """1-4 keys; the sealing key with probability 0.8, at a random position."""
    count = rng.randint(1, 4)
    keys: list[DecryptionKey | bytes] = [
        DecryptionKey(rng.randbytes(KEY_SIZE)) for _ in range(count)
    ]
    if rng.random() < 0.15:
        # A wrong-size raw key: both implementations count it as one failed key.
        keys[rng.randrange(count)] = rng.randbytes(rng.choice((0, 16, 31)))
    seal_index = None
    if rng.random() < 0.8:
        seal_index = rng.randrange(count)
        keys[seal_index] = sealing
    # fp_core takes DecryptionKey objects or raw bytes alike; use both forms.
    keys = [k.raw() if isinstance(k, DecryptionKey) and rng.random() < 0.3 else k for k in keys]
    return keys, seal_index


def _mutate(rng: random.Random, data: bytes) -> tuple[str, bytes]:
    """Damage the sealed bytes the ways transport or tampering might."""
    roll = rng.random()
    if roll < 0.62:
        return "intact", data
    kind = rng.choice(MUTATIONS[1:])
    buf = bytearray(data)
    if kind == "flip_body":  # ciphertext or tag
        buf[rng.randrange(len(HEADER) + NONCE_SIZE, len(buf))] ^= 1 << rng.randrange(8)
    elif kind == "flip_nonce":
        buf[rng.randrange(len(HEADER), len(HEADER) + NONCE_SIZE)] ^= 1 << rng.randrange(8)
    elif kind == "truncate":
        # Below the 32-byte minimum (including inside the header, and to nothing) or not.
        cut = rng.choice((0, rng.randrange(0, MIN_SIZE), rng.randrange(MIN_SIZE, len(buf))))
        del buf[cut:]
    elif kind == "header":
        buf[rng.randrange(len(HEADER))] ^= 1 << rng.randrange(8)
    else:  # garbage after the tag: the SDK then reads the garbage as the tag
        buf += rng.randbytes(rng.randint(1, 32))
    return kind, bytes(buf)


@cache
def _case(index: int) -> Case:
    # One RNG per case: any case can be rebuilt alone from its index.
    rng = random.Random(f"{SEED}-{index}")
    sealing = DecryptionKey(rng.randbytes(KEY_SIZE))
    payload, what, plaintext, sealed_json = _payload(rng)
    sealed = seal_raw(plaintext, sealing, nonce=rng.randbytes(NONCE_SIZE))
    mutation, sealed = _mutate(rng, sealed)
    keys, seal_index = _keys(rng, sealing)
    return Case(
        label=f"{index:03d}-{what}-{mutation}-k{len(keys)}",
        payload=payload,
        mutation=mutation,
        sealed=sealed,
        keys=tuple(keys),
        seal_index=seal_index,
        sealed_json=sealed_json,
        as_text=rng.random() < 0.3,
    )


# --- the two implementations ----------------------------------------------------------


@dataclass(frozen=True, slots=True)
class SdkResult:
    """What the SDK made of a case: the parsed JSON, or the fp_core kind its error means."""

    ok: bool
    value: Any = field(default=None, repr=False)
    kind: str | None = None
    detail: str = ""


def _sdk_kind_for_aggregate(case: Case, errors: list[Any]) -> tuple[str, str]:
    """Map the SDK's per-key errors to the fp_core kind they correspond to."""
    causes = [e.exception for e in errors]
    names = ",".join(sorted({type(c).__name__ for c in causes}))
    # UnicodeDecodeError is a ValueError: test it before the ValueError branch.
    if any(isinstance(c, UnicodeDecodeError) for c in causes):
        return "invalid_json", names
    if any(isinstance(c, zlib.error) for c in causes):
        return "decompress_failed", names
    # InvalidTag: authentication failed. ValueError: a key of the wrong size, or (for data
    # under 32 bytes) a nonce or tag too short for the GCM mode object.
    if causes and all(isinstance(c, InvalidTag | ValueError) for c in causes):
        return ("too_short" if len(case.sealed) < MIN_SIZE else "decrypt_failed"), names
    raise AssertionError(f"{case.label}: unexpected SDK per-key errors: {names}")


def _run_sdk(case: Case) -> SdkResult:
    try:
        text = _sdk_unseal(case.sealed, case.sdk_keys())
    except sdk.UnsealAggregateError as exc:
        kind, names = _sdk_kind_for_aggregate(case, exc.errors)
        return SdkResult(ok=False, kind=kind, detail=f"aggregate({names})")
    except ValueError as exc:
        if str(exc) != "Invalid sealed data header":
            raise  # not an outcome this test knows: a test error, not an agreement
        return SdkResult(ok=False, kind="invalid_header", detail="ValueError(header)")
    try:
        return SdkResult(ok=True, value=json.loads(text))
    except json.JSONDecodeError:
        return SdkResult(ok=False, kind="invalid_json", detail="JSONDecodeError")


def _looks_like_event(value: Any) -> bool:
    """REFERENCE.md section 3, restated independently of fp_core.events: a v3 event has a
    'products' object; a v4 event has a string 'event_id' and an integer 'timestamp'."""
    if not isinstance(value, dict):
        return False
    timestamp = value.get("timestamp")
    if isinstance(value.get("event_id"), str) and type(timestamp) is int:
        return True
    return isinstance(value.get("products"), dict)


def _canonical(value: Any) -> str:
    # Stricter than ==, which would equate True, 1 and 1.0.
    return json.dumps(value, sort_keys=True, ensure_ascii=False)


# --- the comparison -------------------------------------------------------------------


@cache
def _check(index: int) -> str:
    """Run both implementations on one case, assert they agree, return the outcome class.

    Cached so the mix test reuses the parametrized runs (and still works alone).
    """
    case = _case(index)
    theirs = _run_sdk(case)
    try:
        ours = unseal_event(case.fp_input(), case.keys)
    except UnsealError as exc:
        kind = exc.kind
        if theirs.ok:
            # By design fp_core also rejects authentic JSON that is not an event; the SDK's
            # __unseal never looks at the shape. Agreement on the decryption is all we ask.
            assert kind == "not_an_event", f"{case.label}: SDK decrypted it, fp_core: {kind}"
            assert not _looks_like_event(theirs.value), f"{case.label}: rejected a real event"
            assert case.sealed_json is not NO_JSON, f"{case.label}: garbage decrypted to JSON"
            assert _canonical(theirs.value) == _canonical(case.sealed_json), case.label
            return kind
        assert kind == theirs.kind, f"{case.label}: fp_core {kind}, SDK {theirs.detail}"
        return kind
    assert theirs.ok, f"{case.label}: fp_core unsealed it, SDK failed with {theirs.detail}"
    assert _canonical(ours) == _canonical(theirs.value), f"{case.label}: decrypted JSON differs"
    # Ground truth: what was sealed, and with which key.
    assert case.sealed_json is not NO_JSON, f"{case.label}: garbage decrypted to an event"
    assert _canonical(ours) == _canonical(case.sealed_json), case.label
    assert ours.key_index == case.seal_index, case.label
    assert ours.api == ("v4" if "event_id" in ours else "v3"), case.label
    _check_sdk_model(case, ours)
    return f"ok_{ours.api}"


def _check_sdk_model(case: Case, ours: dict[str, Any]) -> None:
    """The SDKs' public entry points: each parses its API's events into its model and
    refuses the other API's."""
    v3_keys = [sdk3.DecryptionKey(_raw(k), "aes-256-gcm") for k in case.keys]
    if "event_id" not in ours:
        with pytest.raises(ValueError, match="not valid event response"):
            sdk.unseal_event_response(case.sealed, case.sdk_keys())
        _check_v3_sdk_model(case, ours, v3_keys)
        return
    # A generated v4 event the SDK model rejects is a generator bug: let it fail loudly.
    model = sdk.unseal_event_response(case.sealed, case.sdk_keys())
    assert model.event_id == ours["event_id"], case.label
    assert model.timestamp == ours["timestamp"], case.label
    with pytest.raises(ValueError, match="not valid event response"):
        sdk3.unseal_event_response(case.sealed, v3_keys)


def _check_v3_sdk_model(case: Case, ours: dict[str, Any], keys: list[Any]) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # some of its model classes
        model = sdk3.unseal_event_response(case.sealed, keys)
    summary = summarize(ours)
    ident = model.products.identification
    if ident is not None and ident.data is not None:
        assert ident.data.request_id == summary["request_id"], case.label
        assert ident.data.visitor_id == summary["visitor_id"], case.label
    else:  # identification failed: the bot detection still names the request
        assert model.products.botd.data.request_id == summary["request_id"], case.label


# Building the cases here costs a fraction of a second; the ids carry no key material.
_IDS: Final = [_case(i).label for i in range(CASE_COUNT)]


@pytest.mark.parametrize("index", range(CASE_COUNT), ids=_IDS)
def test_fp_core_agrees_with_sdk(index: int) -> None:
    assert _check(index) in OUTCOMES


def test_outcome_mix_exercises_every_class() -> None:
    """Guard against the generator drifting into (say) all successes."""
    mix = Counter(_check(i) for i in range(CASE_COUNT))
    starved = {o: mix[o] for o in OUTCOMES if mix[o] < MIN_PER_OUTCOME}
    assert not starved, f"outcome classes hit too rarely: {starved}; full mix {dict(mix)}"


def test_generated_inputs_cover_the_input_space() -> None:
    """Every payload kind, mutation and key-list shape is generated, not just possible."""
    cases = [_case(i) for i in range(CASE_COUNT)]
    seen = Counter(c.payload for c in cases) + Counter(c.mutation for c in cases)
    assert {name for name in PAYLOADS + MUTATIONS if seen[name] < 2} == set(), dict(seen)
    shapes: Counter[str] = Counter()
    for c in cases:
        shapes["sealing_key_absent"] += c.seal_index is None
        shapes["sealing_key_not_first"] += bool(c.seal_index)
        shapes["several_keys"] += len(c.keys) > 1
        shapes["bad_size_key"] += any(len(_raw(k)) != KEY_SIZE for k in c.keys)
        shapes["raw_bytes_key"] += any(isinstance(k, bytes) for k in c.keys)
        shapes["base64_text_input"] += c.as_text
        shapes["under_32_bytes"] += len(c.sealed) < MIN_SIZE
        shapes["v3_identification_failed"] += "-idfail" in c.label
        shapes["padded"] += "-pad" in c.label
    assert {k for k, v in shapes.items() if v < MIN_PER_OUTCOME} == set(), dict(shapes)


def test_empty_key_list_fails_in_both() -> None:
    """No keys: fp_core says no_keys, the SDK raises an aggregate with no errors."""
    sealed = seal_raw(deflate_raw(b'{"products":{}}'), DecryptionKey(bytes(KEY_SIZE)))
    with pytest.raises(sdk.UnsealAggregateError) as info:
        _sdk_unseal(sealed, [])
    assert info.value.errors == []
    with pytest.raises(UnsealError) as ours:
        unseal_event(sealed, [])
    assert ours.value.kind == "no_keys"
