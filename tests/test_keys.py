from __future__ import annotations

import base64
import os
import pickle
from pathlib import Path

import pytest

from fp_core.errors import KeyConfigError
from fp_core.keys import (
    ENV_VAR,
    DecryptionKey,
    decode_base64_lenient,
    key_file_too_open,
    key_id,
    load_keys,
    parse_key,
    parse_key_file,
    parse_key_list,
    read_key_file,
    too_open_warning,
)

RAW = bytes(range(32))
B64 = base64.b64encode(RAW).decode()


def test_key_id_is_first_8_hex_of_sha256() -> None:
    import hashlib

    assert key_id(RAW) == hashlib.sha256(RAW).hexdigest()[:8]
    assert DecryptionKey(RAW).key_id == key_id(RAW)


def test_repr_and_str_never_show_the_key() -> None:
    key = DecryptionKey(RAW)
    for text in (repr(key), str(key), f"{key}", repr([key])):
        assert B64 not in text
        assert RAW.hex() not in text
        assert key.key_id in text


def test_key_cannot_be_pickled() -> None:
    with pytest.raises(TypeError):
        pickle.dumps(DecryptionKey(RAW))


def test_non_canonical_trailing_bits_are_accepted() -> None:
    # The official SDK test key ends in "...Tq53=": its last character has non-zero
    # trailing bits, which strict decoders reject.
    canonical = "p2PA7MGy5tx56cnyJaFZMr96BCFwZeHjZV2EqMvTq50="
    non_canonical = "p2PA7MGy5tx56cnyJaFZMr96BCFwZeHjZV2EqMvTq53="
    assert parse_key(non_canonical, "k").raw() == parse_key(canonical, "k").raw()


@pytest.mark.parametrize(
    "text",
    [B64, B64.rstrip("="), base64.urlsafe_b64encode(RAW).decode(), f"  {B64}\n"],
    ids=["padded", "unpadded", "urlsafe", "whitespace"],
)
def test_lenient_forms(text: str) -> None:
    assert parse_key(text, "k").raw() == RAW


@pytest.mark.parametrize("text", ["not base64!", "ab=c", "é" * 44, "A"])
def test_bad_base64_names_position_not_value(text: str) -> None:
    with pytest.raises(KeyConfigError) as info:
        parse_key(text, "key #3")
    assert info.value.kind == "bad_key"
    assert "key #3" in str(info.value)
    assert text not in str(info.value)


@pytest.mark.parametrize("size", [1, 16, 31, 33, 64])
def test_wrong_length_is_a_clear_error(size: int) -> None:
    text = base64.b64encode(os.urandom(size)).decode()
    with pytest.raises(KeyConfigError, match=rf"key #2: decodes to {size} bytes") as info:
        parse_key_list(f"{B64},{text}", "env")
    assert text not in str(info.value)


def test_empty_key() -> None:
    with pytest.raises(KeyConfigError, match="decodes to 0 bytes"):
        parse_key("", "key #1")


def test_env_list_separators() -> None:
    keys = [DecryptionKey.generate() for _ in range(4)]
    b = [k.to_base64() for k in keys]
    text = f" {b[0]},{b[1]}\n{b[2]} ,\t{b[3]}\n"
    assert parse_key_list(text, "env") == keys


def test_key_file_comments_and_blank_lines() -> None:
    keys = [DecryptionKey.generate() for _ in range(2)]
    text = f"# current key\n{keys[0].to_base64()}  # rotated in May\n\n   \n{keys[1].to_base64()}\n"
    assert parse_key_file(text, "file") == keys


def test_key_file_error_names_file_and_line(tmp_path: Path) -> None:
    path = tmp_path / "keys"
    path.write_text(f"{B64}\n# fine\nAAAA\n")
    with pytest.raises(KeyConfigError, match=r"line 3: decodes to 3 bytes"):
        read_key_file(path)


def test_unreadable_key_file(tmp_path: Path) -> None:
    with pytest.raises(KeyConfigError, match="cannot read"):
        read_key_file(tmp_path / "missing")


def test_load_keys_env_first_then_file_without_duplicates(tmp_path: Path) -> None:
    a, b, c = (DecryptionKey.generate() for _ in range(3))
    path = tmp_path / "keys"
    path.write_text(f"{b.to_base64()}\n{c.to_base64()}\n")
    env = {ENV_VAR: f"{a.to_base64()},{b.to_base64()}"}
    assert load_keys(path, environ=env) == [a, b, c]
    assert load_keys(None, environ={}) == []


def test_key_file_permissions(tmp_path: Path) -> None:
    path = tmp_path / "keys"
    path.write_text(B64)
    path.chmod(0o600)
    assert not key_file_too_open(path)
    path.chmod(0o640)
    assert key_file_too_open(path)
    assert not key_file_too_open(tmp_path / "missing")
    assert too_open_warning(path, "webhook secret file") == (
        f"webhook secret file {path} is readable by group or others; chmod 600 it"
    )
    path.chmod(0o620)  # writable only: still a warning (any permission for the group)
    assert too_open_warning(path) is not None
    path.chmod(0o600)
    assert too_open_warning(path) is None
    assert too_open_warning(None) is None


def test_decode_base64_lenient_rejects_non_ascii() -> None:
    with pytest.raises(ValueError, match="ASCII"):
        decode_base64_lenient("AAAA\u00e9")


def test_a_key_file_with_a_byte_order_mark_is_read(tmp_path: Path) -> None:
    """Notepad and PowerShell 5 save UTF-8 with one: the key was refused as "not valid
    base64" (found by an API hunt)."""
    key = DecryptionKey.generate()
    path = tmp_path / "keys.txt"
    path.write_bytes(b"\xef\xbb\xbf" + key.to_base64().encode() + b"\r\n")
    assert load_keys(str(path), environ={}) == [key]
