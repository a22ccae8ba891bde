"""The typed errors of fp_core: a stable ``kind`` to switch on, a message to act on.

Messages never contain key material or decrypted data: they are written to logs and
exports as they are.
"""

from __future__ import annotations

from dataclasses import dataclass


class FpError(Exception):
    """Base of every error fp_core raises on purpose."""

    kind: str = "error"

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    def __str__(self) -> str:
        return f"{self.kind}: {self.message}"

    def to_dict(self) -> dict[str, str]:
        """The JSON form used in records: ``{"kind": ..., "message": ...}``."""
        return {"kind": self.kind, "message": self.message}


class KeyConfigError(FpError):
    """A configured key cannot be used (bad base64, wrong length, unreadable file)."""

    kind = "bad_key"


class ConfigError(FpError):
    """An option value the tap cannot run with (the addon reports it as an option error)."""

    kind = "bad_config"


class UnsealError(FpError):
    """Unsealing failed; ``kind`` says at which step."""


class BadBase64(UnsealError):
    kind = "bad_base64"


class InvalidHeader(UnsealError):
    kind = "invalid_header"


class TooShort(UnsealError):
    kind = "too_short"


class NoKeys(UnsealError):
    kind = "no_keys"


@dataclass(frozen=True, slots=True)
class KeyFailure:
    """Why one key did not unseal the payload (never the key itself)."""

    index: int
    key_id: str | None
    reason: str

    def to_dict(self) -> dict[str, object]:
        return {"index": self.index, "key_id": self.key_id, "reason": self.reason}


class _PerKeyError(UnsealError):
    """An error that followed trying every key; keeps one reason per key."""

    def __init__(self, message: str, failures: tuple[KeyFailure, ...] = ()) -> None:
        super().__init__(message)
        self.failures = failures


class DecryptFailed(_PerKeyError):
    kind = "decrypt_failed"


class DecompressFailed(_PerKeyError):
    kind = "decompress_failed"


class TooLarge(_PerKeyError):
    kind = "too_large"


class InvalidJson(UnsealError):
    kind = "invalid_json"


class NotAnEvent(UnsealError):
    kind = "not_an_event"


#: Every kind an :class:`UnsealError` can carry, in pipeline order.
UNSEAL_ERROR_KINDS: tuple[str, ...] = (
    BadBase64.kind,
    InvalidHeader.kind,
    TooShort.kind,
    NoKeys.kind,
    DecryptFailed.kind,
    DecompressFailed.kind,
    TooLarge.kind,
    InvalidJson.kind,
    NotAnEvent.kind,
)
