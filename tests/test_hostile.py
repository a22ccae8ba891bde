"""The hostile-response generator: every variant gets exactly the outcome it declares."""

from __future__ import annotations

import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fp_core import UnsealError, parse_open_response, unseal_event
from fp_core.errors import UNSEAL_ERROR_KINDS
from fp_core.hostile import VARIANTS, hostile_response
from fp_core.keys import DecryptionKey

KEY = DecryptionKey(bytes(range(32)))
NOW = int(time.time() * 1000)


def outcome(body: bytes) -> str:
    opened = parse_open_response(body)
    if opened is None:
        return "ignored"
    try:
        unseal_event(opened.sealed, [KEY])
    except UnsealError as exc:
        return exc.kind
    return "ok"


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_each_variant_has_its_declared_outcome(variant: str) -> None:
    for seed in range(6):
        body, expected, name = hostile_response(seed, KEY, NOW, variant)
        assert name == variant
        assert outcome(body) == expected, (variant, seed)


@settings(max_examples=150, deadline=None)
@given(seed=st.integers(min_value=0, max_value=2**32))
def test_any_seed(seed: int) -> None:
    body, expected, _ = hostile_response(seed, KEY, NOW)
    assert expected in {"ok", "ignored", *UNSEAL_ERROR_KINDS}
    assert outcome(body) == expected


def test_seeded_bodies_are_reproducible() -> None:
    assert hostile_response(7, KEY, NOW) == hostile_response(7, KEY, NOW)


def test_the_mix_covers_every_outcome() -> None:
    seen = {hostile_response(seed, KEY, NOW)[1] for seed in range(300)}
    assert seen >= {"ok", "ignored"} | (set(UNSEAL_ERROR_KINDS) - {"no_keys"})
