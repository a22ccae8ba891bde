from __future__ import annotations

import pytest

from fp_core.keys import DecryptionKey


@pytest.fixture
def key() -> DecryptionKey:
    return DecryptionKey.generate()


@pytest.fixture
def other_key() -> DecryptionKey:
    return DecryptionKey.generate()
