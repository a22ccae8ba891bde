"""A mitmdump script for the end-to-end tests: counts fp-tap's record lines that went
through ``logging`` (a ``LogRecord`` made for them) and prints the count at the end.
In mitmdump they are written straight to the terminal (fp_core.loglines): none should."""

from __future__ import annotations

import logging
from typing import Any

#: The end of the record lines' logger name (mitmproxy names a script's module
#: ``__mitmproxy_script__.fp_addon``).
RECORD_LOG = "fp_addon.records"
_made = 0
_make_record = logging.Logger.makeRecord


def _counting(self: logging.Logger, name: str, *args: Any, **kw: Any) -> logging.LogRecord:
    global _made
    if name.endswith(RECORD_LOG):
        _made += 1
    return _make_record(self, name, *args, **kw)


logging.Logger.makeRecord = _counting  # type: ignore[method-assign]


class LineProbe:
    def done(self) -> None:
        print(f"record lines through logging: {_made}", flush=True)


addons = [LineProbe()]
