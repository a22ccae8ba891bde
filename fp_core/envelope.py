"""Open Client Response bodies: recognise them, never raise on anything else.

v3: ``{"v": "2", "requestId": ..., "sealedResult": ..., "products": {...}}``
v4: ``{"event_id": ..., "sealed_result": ...}``. Extra keys are tolerated; the outer
JSON is not authenticated, so only the sealed part is trusted later.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass

from fp_core.events import Api
from fp_core.jsontext import encodable

_MARKERS = (b"sealedResult", b"sealed_result")
_BOM = b"\xef\xbb\xbf"
# A byte order mark first: browsers drop it before parsing, so the agent reads the body.
_OBJECT_START = re.compile(b"(?:" + re.escape(_BOM) + rb")?[ \t\r\n]*\{")


@dataclass(frozen=True, slots=True)
class OpenResponse:
    """What the outer (unauthenticated) JSON says: api, request id, sealed base64."""

    api: Api
    request_id: str
    sealed: str
    version: str | None = None


def parse_open_response(body: bytes | bytearray | memoryview | str) -> OpenResponse | None:
    """Return the open response in ``body``, or ``None`` for any other content."""
    try:
        data = body.encode("utf-8") if isinstance(body, str) else bytes(body)
    except (UnicodeEncodeError, TypeError):
        return None
    if not might_be_open_response(data):
        return None
    # Read as the agent's browser reads it: without a byte order mark, and with any
    # invalid UTF-8 replaced (a broken byte in the sealed result then fails to unseal).
    text = data.removeprefix(_BOM).decode("utf-8", "replace")
    try:
        obj = json.loads(text)
    except RecursionError:
        return None
    except ValueError:
        # Not JSON, or an integer too long for Python's int (a browser takes it, as a
        # float): read as one (infinity), never as the text an id or result must be.
        try:
            obj = _LENIENT.decode(text)
        except (ValueError, RecursionError):
            return None
    if not isinstance(obj, dict):
        return None
    return _from_object(obj)


_LENIENT = json.JSONDecoder(parse_int=float)


def might_be_open_response(data: bytes) -> bool:
    """The cheap test that comes first: a JSON object that mentions a sealed result.

    False means certainly not an open response; most traffic stops here, before
    anything is parsed.
    """
    return _OBJECT_START.match(data) is not None and (_MARKERS[0] in data or _MARKERS[1] in data)


def _from_object(obj: dict[str, object]) -> OpenResponse | None:
    sealed = obj.get("sealedResult")
    if not isinstance(sealed, str):
        sealed = obj.get("sealed_result")
    if not isinstance(sealed, str):
        return None
    request_id = obj.get("requestId")
    api: Api = "v3"
    if not isinstance(request_id, str):
        request_id, api = obj.get("event_id"), "v4"
    if not isinstance(request_id, str):
        return None
    version = obj.get("v")
    return OpenResponse(
        api=api,
        # A "\ud800" escape someone wrote here has no UTF-8 form: written as its escape,
        # the id can go into every file, column and saved flow.
        request_id=encodable(request_id),
        sealed=sealed,
        version=version if isinstance(version, str) else None,
    )
