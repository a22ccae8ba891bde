from __future__ import annotations

import os
from pathlib import Path

import pytest

from fp_core.keys import ENV_VAR, DecryptionKey


@pytest.fixture
def key() -> DecryptionKey:
    return DecryptionKey.generate()


@pytest.fixture
def other_key() -> DecryptionKey:
    return DecryptionKey.generate()


@pytest.fixture
def keys_file(tmp_path: Path, key: DecryptionKey) -> Path:
    """A key file (mode 0600 from the start) holding ``key``, after a comment line."""
    path = tmp_path / "keys.txt"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as file:
        file.write(f"# test key\n{key.to_base64()}\n")
    return path


@pytest.fixture
def keyfile(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A key file (mode 0600) with ``tests.test_addon.KEY``, and no key in the environment."""
    from tests.test_addon import KEY

    monkeypatch.delenv(ENV_VAR, raising=False)
    path = tmp_path / "keys.txt"
    path.write_text(KEY.to_base64() + "\n")
    path.chmod(0o600)
    return path
