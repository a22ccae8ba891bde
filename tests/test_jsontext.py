"""fp_core.jsontext: records as JSON, with the event spliced in as the text it came from."""

from __future__ import annotations

import json
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from fp_core.jsontext import JsonObject, dumps

JSON_VALUES = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(), inner, max_size=4),
    max_leaves=20,
)
OBJECTS = st.dictionaries(st.text(), JSON_VALUES, max_size=6)
#: Ways the same object may be written: compact, spaced, escaped, padded, on many lines.
STYLES: dict[str, dict[str, Any]] = {
    "compact": {"separators": (",", ":"), "ensure_ascii": False},
    "spaced": {},
    "indented": {"indent": 2},
}


@settings(max_examples=200, deadline=None)
@given(
    event=OBJECTS,
    head=st.dictionaries(st.sampled_from(["time", "ok", "verdict"]), JSON_VALUES, max_size=3),
    style=st.sampled_from(sorted(STYLES)),
    pad=st.sampled_from(["", " ", "\t ", "  \t"]),
)
def test_a_record_reads_back_as_the_same_value_on_one_line(
    event: dict[str, Any], head: dict[str, Any], style: str, pad: str
) -> None:
    text = pad + json.dumps(event, **STYLES[style]) + pad
    record = head | {"event": JsonObject(event, text)}
    line = dumps(record)
    assert json.loads(line) == head | {"event": event}
    assert "\n" not in line, "a JSONL record stays on one line"
    assert "\r" not in line
    if style != "indented" or not event:
        assert line.endswith(f'"event":{text.strip()}}}'), "the text itself, spliced in"


def test_the_text_is_written_as_it_was_sealed() -> None:
    text = '{"b": 1.50, "a": "\\u00e9", "n": 1E2}'  # spacing, escapes and numbers kept
    event = JsonObject(json.loads(text), text)
    assert dumps(event) == text
    assert dumps({"ok": True, "event": event}) == '{"ok":true,"event":' + text + "}"
    assert dumps({"event": event}) == '{"event":' + text + "}"


def test_without_usable_text_the_object_is_encoded() -> None:
    value = {"a": [1, 2], "é": None}
    expected = '{"a":[1,2],"é":null}'
    assert dumps(JsonObject(value, None)) == expected
    assert dumps(JsonObject(value, '{"a": [1,\n2], "é": null}')) == expected  # a line break
    assert JsonObject(value, '\r\n{"a":[1,2],"é":null}').text == expected  # only around it
    assert dumps({"event": JsonObject(value, None)}) == '{"event":' + expected + "}"
    assert dumps({"event": value}) == '{"event":' + expected + "}"


def test_a_changed_object_is_encoded_once_its_text_is_dropped() -> None:
    event = JsonObject({"ip": "203.0.113.7"}, '{"ip":"203.0.113.7"}')
    event["ip"] = "[redacted]"
    event.text = None  # as JsonObject asks of whoever changes it (the Redactor does)
    assert json.loads(dumps({"event": event})) == {"event": {"ip": "[redacted]"}}


def test_a_lone_surrogate_is_written_as_its_escape() -> None:
    """Python reads a "\\ud800" escape as a character with no UTF-8 form: written as it
    is, the line (and the whole batch of lines with it) could not be encoded."""
    value = {"request_id": "a\ud800", "url": "https://příklad.cz/"}
    line = dumps(value)
    assert line == '{"request_id":"a\\ud800","url":"https://příklad.cz/"}'
    assert json.loads(line.encode("utf-8")) == value
    event = JsonObject({"x": "\udfff"}, '{"x":"\\udfff"}')
    assert dumps({"request_id": "\ud800", "event": event}) == (
        '{"request_id":"\\ud800","event":{"x":"\\udfff"}}'
    )
