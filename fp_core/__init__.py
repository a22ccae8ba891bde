"""fp_core: unseal Fingerprint sealed results and read open responses.

Pure: bytes, keys and JSON in; events and typed errors out. No mitmproxy here.
"""

from fp_core.envelope import OpenResponse, parse_open_response
from fp_core.errors import (
    UNSEAL_ERROR_KINDS,
    FpError,
    KeyConfigError,
    KeyFailure,
    UnsealError,
)
from fp_core.events import event_api, inner_request_id, summarize
from fp_core.keys import DecryptionKey, load_keys, parse_key, parse_key_file, parse_key_list
from fp_core.sealed import DEFAULT_MAX_SIZE, UnsealedEvent, seal_event, unseal_event

__all__ = [
    "DEFAULT_MAX_SIZE",
    "UNSEAL_ERROR_KINDS",
    "DecryptionKey",
    "FpError",
    "KeyConfigError",
    "KeyFailure",
    "OpenResponse",
    "UnsealError",
    "UnsealedEvent",
    "event_api",
    "inner_request_id",
    "load_keys",
    "parse_key",
    "parse_key_file",
    "parse_key_list",
    "parse_open_response",
    "seal_event",
    "summarize",
    "unseal_event",
]
