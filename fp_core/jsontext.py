"""The one JSON form of records, and events exported as the text Fingerprint sealed.

Encoding the event again is most of what writing a record costs (a realistic event
encodes in about as long as it took to parse), and the unsealed plaintext already is
that event's JSON. So the tap hands sinks the event as a :class:`JsonObject`, which
keeps its text, and :func:`dumps` splices that text in instead of encoding the object:
the JSONL line, the SQLite column and the webhook body carry the event byte for byte as
Fingerprint sealed it.
"""

from __future__ import annotations

import json
import re
from typing import Any

# Built once (json.dumps() builds an encoder per call when given options). Records are
# trees built from parsed JSON, never cyclic: the cycle check would only cost time.
_ENCODER = json.JSONEncoder(ensure_ascii=False, separators=(",", ":"), check_circular=False)
_WHITESPACE = " \t\r\n"


class JsonObject(dict[str, Any]):
    """A parsed JSON object that keeps the text it was parsed from.

    ``text`` is None when that text cannot stand in for the object in a JSONL line (a
    line break between its tokens). Whoever changes the object, or anything inside it,
    sets ``text`` to None first: :func:`dumps` trusts the two to agree.
    """

    __slots__ = ("text",)

    def __init__(self, obj: dict[str, Any], text: str | None) -> None:
        super().__init__(obj)
        if text is not None and not (text.startswith("{") and text.endswith("}")):
            text = text.strip(_WHITESPACE)  # surrounding whitespace is allowed in JSON
        # Raw line breaks can only be whitespace between tokens (strings cannot hold
        # them), and a JSONL record must stay on one line.
        self.text = None if text is None or "\n" in text or "\r" in text else text


def dumps(value: Any) -> str:
    """The one JSON form of a record (JSONL line, SQLite column, webhook body).

    A :class:`JsonObject` with its text, at the top or as a dict's ``event``, is written
    as that text; everything else is encoded compactly, non-ASCII kept as is.
    """
    if type(value) is JsonObject and value.text is not None:
        return value.text
    if type(value) is dict:
        event = value.get("event")
        if type(event) is JsonObject and event.text is not None:
            head = encodable(_ENCODER.encode({k: v for k, v in value.items() if k != "event"}))
            return f'{head[:-1]}{"," if len(head) > 2 else ""}"event":{event.text}}}'
    return encodable(_ENCODER.encode(value))


_SURROGATE = re.compile("[\ud800-\udfff]")


def encodable(text: str) -> str:
    """``text`` with any lone surrogate written as its ``\\uXXXX`` escape: the same JSON
    string, now with a UTF-8 form. JSON anyone may write (a response's outer JSON) can
    hold a ``"\\ud800"`` escape, which Python reads as a character no file, column or
    socket can take; written as it is, it would fail its whole batch of records.
    Nothing to do, and O(1), for ASCII text. (A sealed event's text is never touched:
    it was decoded from UTF-8, so it holds no such character.)"""
    if text.isascii():
        return text
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return _SURROGATE.sub(lambda m: f"\\u{ord(m.group()):04x}", text)
    return text
