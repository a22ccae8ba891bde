"""Unseal throughput in one process: fp-tap against the official SDK and the floor.

Three implementations unseal the same base64 sealed result:

- ``fp-tap``: :func:`fp_core.unseal_event` (header, keys, bounded inflate, strict JSON,
  shape check) plus :func:`fp_core.summarize`, which is what the tap does per event;
- ``sdk``: Fingerprint's official Python SDK on the base64-decoded bytes (it takes
  bytes): for v4 ``fingerprint_server_sdk.sealed.unseal_event_response``, which builds
  its ``Event`` model; for v3 the SDK of that API, ``fingerprint-pro-server-api-sdk``
  (deprecated, but the one that knows v3 events), whose ``unseal_event_response``
  builds an ``EventsGetResponse``;
- ``floor``: base64 decode, ``AESGCM.decrypt`` with the key object reused,
  ``zlib.decompress(-15)`` and ``json.loads``, nothing else: the least any Python
  implementation has to do.

Samples are batches of calls timed with ``perf_counter_ns`` with the garbage collector
off (as ``timeit`` does), and the implementations take turns in a rotating order, so
noise from other processes falls on all of them alike.
"""

from __future__ import annotations

import base64
import gc
import json
import time
import warnings
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from fp_core import seal_event, summarize, unseal_event
from fp_core.events import Api
from fp_core.generate import generate_event
from fp_core.keys import DecryptionKey
from scripts.bench_stats import LinearFit, Spread, paired_ratios

APIS: tuple[Api, ...] = ("v3", "v4")
IMPLEMENTATIONS = ("fp-tap", "sdk", "floor")
#: The sizes of section 1: label and target size of the compact event JSON in bytes.
#: ``generate_event`` gives about 3.8 KB (v3) and 4.4 KB (v4) with as many fields as
#: the full examples in ../shared/vectors/events (whose pretty-printed files are 8 KB),
#: so "realistic" pads those events with device plugins to about 7 KB.
SIZES: tuple[tuple[str, int], ...] = (("1 KB", 1024), ("realistic ~7 KB", 7000), ("64 KB", 65536))
#: Section 2: 1 KB to 256 KB, doubling.
GROWTH_SIZES = tuple(1024 * 2**i for i in range(9))
SEED = 6

Unsealer = Callable[[str], object]


def sized_event(api: Api, target: int, seed: int = SEED) -> dict[str, Any]:
    """A generated event whose compact JSON is about ``target`` bytes.

    Below the generator's natural size optional parts are dropped (keeping everything
    the summary reads, and what the v3 SDK's model requires), each time the smallest
    that reaches the target or else the largest; above it, the event is padded.
    """
    if target > 3000:
        return generate_event(api, rng=seed, pad_to=target)
    event = generate_event(api, rng=seed)
    if api == "v4":
        keep = {"event_id", "timestamp", "identification", "bot", "ip_address", "url", "replayed"}
        parts = [(event, k) for k in event if k not in keep]
    else:
        products = event["products"]
        ident = products["identification"]["data"]
        # What the summary reads, and what the v3 SDK's model requires.
        keep = {
            "visitorId",
            "requestId",
            "timestamp",
            "ip",
            "url",
            "confidence",
            "visitorFound",
            "browserDetails",
            "incognito",
            "time",
            "tag",
            "firstSeenAt",
            "lastSeenAt",
            "replayed",
        }
        parts = [(products, k) for k in products if k not in ("identification", "botd")]
        parts += [(ident, k) for k in ident if k not in keep]
    while parts and (excess := _size(event) - target) > 0:
        sizes = [len(f'"{name}":') + _size(obj[name]) + 1 for obj, name in parts]
        enough = [i for i, n in enumerate(sizes) if n >= excess]
        pick = min(enough, key=sizes.__getitem__) if enough else sizes.index(max(sizes))
        obj, name = parts.pop(pick)
        del obj[name]
    return event


def _size(value: object) -> int:
    return len(json.dumps(value, separators=(",", ":"), ensure_ascii=False).encode("utf-8"))


def unsealers(key: DecryptionKey, api: Api) -> dict[str, Unsealer]:
    """The three implementations, ready to take a base64 sealed result."""
    from fingerprint_server_sdk import sealed as sdk

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # "migrate to Server API v4"
        from fingerprint_pro_server_api_sdk import sealed as sdk3

    keys = [key]
    sdk_keys = [sdk.DecryptionKey(key.raw(), "aes-256-gcm")]
    sdk3_keys = [sdk3.DecryptionKey(key.raw(), "aes-256-gcm")]
    aead = AESGCM(key.raw())

    def fp_tap(sealed: str) -> object:
        event = unseal_event(sealed, keys)
        summarize(event)
        return event

    def sdk_v4(sealed: str) -> object:
        return sdk.unseal_event_response(base64.b64decode(sealed), sdk_keys)

    def sdk_v3(sealed: str) -> object:
        with warnings.catch_warnings():
            # Some of its model classes warn that they are deprecated, on every event.
            warnings.simplefilter("ignore", DeprecationWarning)
            return sdk3.unseal_event_response(base64.b64decode(sealed), sdk3_keys)

    def floor(sealed: str) -> object:
        data = base64.b64decode(sealed)
        return json.loads(zlib.decompress(aead.decrypt(data[4:16], data[16:], None), -15))

    return {"fp-tap": fp_tap, "sdk": sdk_v4 if api == "v4" else sdk_v3, "floor": floor}


def check_agree(impls: dict[str, Unsealer], sealed: str, event: dict[str, Any]) -> None:
    """Every implementation must return this event before any of them is timed."""
    for name, fn in impls.items():
        out = fn(sealed)
        if name == "sdk" and "products" in event:
            ident = event["products"]["identification"]["data"]
            ok = out.products.identification.data.request_id == ident["requestId"]  # type: ignore[attr-defined]
        elif name == "sdk":
            ok = getattr(out, "event_id", None) == event["event_id"]
        else:
            ok = out == event
        if not ok:
            raise RuntimeError(f"{name} did not return the sealed event")


def calibrate(fn: Unsealer, sealed: str, sample_s: float) -> int:
    """How many calls make a sample of about ``sample_s`` seconds."""
    calls, elapsed = 1, 0
    while True:
        elapsed = _time_calls(fn, sealed, calls)
        if elapsed >= 0.02e9:
            break
        calls *= 4
    return max(1, int(calls * sample_s * 1e9 / elapsed))


def _time_calls(fn: Unsealer, sealed: str, calls: int) -> int:
    gc.collect()
    gc.disable()
    try:
        start = time.perf_counter_ns()
        for _ in range(calls):
            fn(sealed)
        return time.perf_counter_ns() - start
    finally:
        gc.enable()


@dataclass(frozen=True, slots=True)
class Case:
    """One sealed result and the implementations to time on it."""

    event: dict[str, Any]
    sealed: str
    impls: dict[str, Unsealer]


def make_case(key: DecryptionKey, api: Api, target: int, names: Sequence[str]) -> Case:
    """An event of about ``target`` bytes, sealed, checked against every implementation."""
    event = sized_event(api, target)
    sealed = seal_event(event, key)
    impls = {name: fn for name, fn in unsealers(key, api).items() if name in names}
    check_agree(impls, sealed, event)
    return Case(event, sealed, impls)


def interleaved_rates(
    cases: Sequence[Case], rounds: int, sample_s: float
) -> list[dict[str, list[float]]]:
    """Events per second of each implementation on each case, one sample per round.

    Each round visits every case and implementation, in an order that rotates from
    round to round: a burst of noise from another process lands on one round of
    many cases rather than on every round of one case, and the medians shrug it off.
    """
    slots = [(i, name) for i, case in enumerate(cases) for name in case.impls]
    calls = {
        (i, name): calibrate(cases[i].impls[name], cases[i].sealed, sample_s) for i, name in slots
    }
    rates: list[dict[str, list[float]]] = [{name: [] for name in case.impls} for case in cases]
    for round_no in range(rounds):
        shift = round_no % len(slots)
        for i, name in slots[shift:] + slots[:shift]:
            elapsed = _time_calls(cases[i].impls[name], cases[i].sealed, calls[i, name])
            rates[i][name].append(calls[i, name] * 1e9 / elapsed)
    return rates


@dataclass(frozen=True, slots=True)
class ThroughputRow:
    """Section 1, one API and size: rates and paired ratios."""

    api: Api
    label: str
    json_bytes: int
    sealed_chars: int
    rates: dict[str, Spread]
    vs_sdk: Spread
    vs_floor: Spread


def throughput(rounds: int, sample_s: float) -> list[ThroughputRow]:
    """Section 1: every API and size of :data:`SIZES`."""
    key = DecryptionKey.generate()
    labels = [(label, api) for label, target in SIZES for api in APIS]
    cases = [make_case(key, api, target, IMPLEMENTATIONS) for _, target in SIZES for api in APIS]
    rows = []
    for (label, api), case, rates in zip(
        labels, cases, interleaved_rates(cases, rounds, sample_s), strict=True
    ):
        rows.append(
            ThroughputRow(
                api=api,
                label=label,
                json_bytes=_size(case.event),
                sealed_chars=len(case.sealed),
                rates={name: Spread.of(samples) for name, samples in rates.items()},
                vs_sdk=paired_ratios(rates["fp-tap"], rates["sdk"]),
                vs_floor=paired_ratios(rates["fp-tap"], rates["floor"]),
            )
        )
    return rows


@dataclass(frozen=True, slots=True)
class GrowthRow:
    """Section 2, one size: microseconds per event."""

    api: Api
    json_bytes: int
    fp_us: Spread
    floor_us: Spread


@dataclass(frozen=True, slots=True)
class GrowthFit:
    """Section 2, one API: the straight line through fp-tap's cost."""

    api: Api
    fit: LinearFit
    #: Cost per byte at the largest size over that at the one before: about 1.0 (or a
    #: little less, the fixed cost spreading thinner) when cost grows linearly.
    last_step: float


def growth(
    rounds: int, sample_s: float, sizes: Sequence[int] = GROWTH_SIZES
) -> tuple[list[GrowthRow], list[GrowthFit]]:
    """Section 2: fp-tap (and the floor, for reference) from 1 KB to 256 KB."""
    key = DecryptionKey.generate()
    cases = [make_case(key, api, target, ("fp-tap", "floor")) for api in APIS for target in sizes]
    all_rates = interleaved_rates(cases, rounds, sample_s)
    rows: list[GrowthRow] = []
    fits: list[GrowthFit] = []
    for n, api in enumerate(APIS):
        api_rows = [
            GrowthRow(
                api=api,
                json_bytes=_size(case.event),
                fp_us=Spread.of([1e6 / r for r in rates["fp-tap"]]),
                floor_us=Spread.of([1e6 / r for r in rates["floor"]]),
            )
            for case, rates in zip(
                cases[n * len(sizes) : (n + 1) * len(sizes)],
                all_rates[n * len(sizes) : (n + 1) * len(sizes)],
                strict=True,
            )
        ]
        fit = LinearFit.of(
            [row.json_bytes / 1024 for row in api_rows], [row.fp_us.median for row in api_rows]
        )
        big, before = api_rows[-1], api_rows[-2]
        last = (big.fp_us.median / big.json_bytes) / (before.fp_us.median / before.json_bytes)
        rows += api_rows
        fits.append(GrowthFit(api, fit, last))
    return rows, fits
