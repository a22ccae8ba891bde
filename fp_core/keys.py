"""Decryption keys: lenient base64 parsing, loading from the environment and a file.

A key's value never leaves this module in text form: ``repr``/``str`` show only its
public ``key_id`` and error messages name a key by its position.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import os
import re
import stat
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from fp_core.errors import KeyConfigError

KEY_SIZE = 32
ENV_VAR = "FP_DECRYPTION_KEYS"
_SEPARATORS = re.compile(r"[\s,]+")


class DecryptionKey:
    """One AES-256 key; compares by value, prints only its ``key_id``."""

    __slots__ = ("_aead", "_raw", "key_id")

    def __init__(self, raw: bytes) -> None:
        if len(raw) != KEY_SIZE:
            raise KeyConfigError(f"a key must be {KEY_SIZE} bytes, got {len(raw)}")
        self._raw = bytes(raw)
        self._aead = AESGCM(self._raw)
        self.key_id = key_id(self._raw)

    @classmethod
    def generate(cls) -> DecryptionKey:
        """A fresh random key (tests, demo)."""
        return cls(AESGCM.generate_key(bit_length=256))

    @property
    def aead(self) -> AESGCM:
        """The cipher object, built once and reused for every payload."""
        return self._aead

    def raw(self) -> bytes:
        """The key bytes. A method, not an attribute, so it is never dumped by accident."""
        return self._raw

    def to_base64(self) -> str:
        """The dashboard form of the key (standard base64)."""
        return base64.b64encode(self._raw).decode("ascii")

    def __repr__(self) -> str:
        return f"DecryptionKey(key_id={self.key_id!r})"

    __str__ = __repr__

    def __eq__(self, other: object) -> bool:
        return isinstance(other, DecryptionKey) and other._raw == self._raw

    def __hash__(self) -> int:
        return hash(self.key_id)

    def __reduce__(self) -> tuple[object, ...]:
        # Pickling would write the raw key into whatever holds the pickle.
        raise TypeError("DecryptionKey cannot be pickled")


def key_id(raw: bytes) -> str:
    """Public identifier of a key: first 8 hex characters of SHA-256 of the raw bytes."""
    return hashlib.sha256(raw).hexdigest()[:8]


def decode_base64_lenient(text: str) -> bytes:
    """Decode standard or URL-safe base64, with or without padding.

    Non-canonical trailing bits are accepted, as every official SDK accepts them.
    Raises ``ValueError`` (never with the input in the message) when it is not base64.
    """
    try:
        # Sealed results are canonical padded standard base64: one C call decodes them
        # (it accepts nothing the general path below would refuse, nor decodes it
        # differently). Anything else takes the general path.
        return binascii.a2b_base64(text, strict_mode=True)
    except (binascii.Error, ValueError):
        pass
    text = text.strip()
    if not text.isascii():
        raise ValueError("not ASCII")
    if "-" in text or "_" in text:
        text = text.replace("-", "+").replace("_", "/")
    missing = -len(text.rstrip("=")) % 4
    if missing == 3:
        raise ValueError("impossible length for base64")
    text = text.rstrip("=") + "=" * missing
    try:
        return base64.b64decode(text, validate=True)
    except binascii.Error:
        raise ValueError("characters outside the base64 alphabet") from None


def parse_key(text: str, where: str) -> DecryptionKey:
    """Parse one base64 key; ``where`` names its position for the error message."""
    try:
        raw = decode_base64_lenient(text)
    except ValueError as exc:
        raise KeyConfigError(f"{where}: not valid base64 ({exc})") from None
    if len(raw) != KEY_SIZE:
        raise KeyConfigError(f"{where}: decodes to {len(raw)} bytes, an AES-256 key is {KEY_SIZE}")
    return DecryptionKey(raw)


def parse_key_list(text: str, source: str) -> list[DecryptionKey]:
    """Keys separated by commas, whitespace or newlines (the environment variable form)."""
    parts = [p for p in _SEPARATORS.split(text) if p]
    return [parse_key(p, f"{source} key #{i}") for i, p in enumerate(parts, start=1)]


def parse_key_file(text: str, source: str) -> list[DecryptionKey]:
    """One key per line; ``#`` starts a comment; blank lines are ignored."""
    keys = []
    for lineno, line in enumerate(text.splitlines(), start=1):
        content = line.split("#", 1)[0].strip()
        if content:
            keys.append(parse_key(content, f"{source} line {lineno}"))
    return keys


def read_key_file(path: str | os.PathLike[str]) -> list[DecryptionKey]:
    """Read a key file; an unreadable file is a :class:`KeyConfigError`."""
    try:
        # utf-8-sig: a byte order mark (Notepad, PowerShell 5) is no part of the key.
        text = Path(path).read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else "not UTF-8"
        raise KeyConfigError(f"key file {os.fspath(path)}: cannot read ({reason})") from None
    return parse_key_file(text, f"key file {os.fspath(path)}")


def key_file_too_open(path: str | os.PathLike[str]) -> bool:
    """True when group or others have any permission on the file (worth a warning)."""
    try:
        mode = os.stat(path).st_mode
    except OSError:
        return False
    return bool(mode & (stat.S_IRWXG | stat.S_IRWXO))


def too_open_warning(path: str | os.PathLike[str] | None, what: str = "key file") -> str | None:
    """The warning for a secret's file that group or others may use, or None: one text
    for the addon, the worker's pipeline and the CLI."""
    if path and key_file_too_open(path):
        return f"{what} {os.fspath(path)} is readable by group or others; chmod 600 it"
    return None


def load_keys(
    keys_file: str | os.PathLike[str] | None = None,
    environ: Mapping[str, str] | None = None,
) -> list[DecryptionKey]:
    """Keys from ``FP_DECRYPTION_KEYS`` first, then from ``keys_file``; duplicates dropped."""
    return with_env_keys(read_key_file(keys_file) if keys_file else [], environ)


def with_env_keys(
    file_keys: Iterable[DecryptionKey], environ: Mapping[str, str] | None = None
) -> list[DecryptionKey]:
    """The environment's keys, then ``file_keys``; duplicates dropped (the order in which
    every reader of a key file tries them)."""
    return unique_keys([*env_keys(environ), *file_keys])


def env_keys(environ: Mapping[str, str] | None = None) -> list[DecryptionKey]:
    """The keys in ``FP_DECRYPTION_KEYS`` (none when it is unset)."""
    env = os.environ if environ is None else environ
    return parse_key_list(env.get(ENV_VAR, ""), ENV_VAR)


def describe_keys(keys: Sequence[DecryptionKey]) -> str:
    """How many keys and their ids (never their values), for a log line."""
    return f"{len(keys)} decryption key(s): {', '.join(k.key_id for k in keys)}"


def unique_keys(keys: Iterable[DecryptionKey]) -> list[DecryptionKey]:
    """Keep the first of each distinct key, in order (trying one key twice is waste)."""
    seen: set[DecryptionKey] = set()
    out = []
    for key in keys:
        if key not in seen:
            seen.add(key)
            out.append(key)
    return out
