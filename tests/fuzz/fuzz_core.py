"""Coverage-guided fuzz target (atheris/libFuzzer) for fp_core's untrusted-input paths.

    python tests/fuzz/fuzz_core.py -max_total_time=60 NEW_CORPUS_DIR tests/fuzz/corpus

The first byte picks the path, the rest is the input:
0 an HTTP response body through the whole tap (parser, unseal, checks, redaction);
1 raw sealed bytes; 2 an authenticated plaintext (sealed here, so mutations reach
inflate and JSON); 3 deflated text (reaches the JSON parser and the event summary,
which must accept any event-shaped JSON);
4 a Content-Encoding body (the second byte picks the coding).
Any exception other than fp_core's own typed errors is a crash.
"""

from __future__ import annotations

import hashlib
import sys
from pathlib import Path

import atheris

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

with atheris.instrument_imports():
    from fp_core.content import ContentError, decode_content
    from fp_core.errors import UnsealError
    from fp_core.events import inner_request_id, summarize
    from fp_core.keys import DecryptionKey
    from fp_core.redact import Redactor, parse_paths
    from fp_core.sealed import deflate_raw, seal_raw, unseal_event
    from fp_core.tap import ResponseInfo, Tap, TapConfig

#: A key made from a fixed label: the corpus is sealed with it (no real key anywhere).
KEY = DecryptionKey(hashlib.sha256(b"fp-tap fuzz key").digest())
NONCE = bytes(12)
CODINGS = ("gzip", "deflate", "br", "zstd", "identity", "gzip, br", "x-unknown")
TAP = Tap(TapConfig(keys=[KEY], redactor=Redactor(parse_paths(["pii"])), max_event=1 << 20))


def one_input(data: bytes) -> None:
    if not data:
        return
    mode, rest = data[0] % 5, data[1:]
    try:
        if mode == 0:
            TAP.inspect(ResponseInfo("f", 1.7e9, "h", "/", "POST", 200, rest, "8.8.8.8", None))
        elif mode == 1:
            unseal_event(rest, [KEY], max_size=1 << 20)
        elif mode == 2:
            unseal_event(seal_raw(rest, KEY, nonce=NONCE), [KEY], max_size=1 << 20)
        elif mode == 3:
            event = unseal_event(seal_raw(deflate_raw(rest), KEY, nonce=NONCE), [KEY])
            # Any JSON that passes as an event must summarise without raising.
            summary = summarize(event)
            assert summary["api"] == event.api
            assert summary["request_id"] == inner_request_id(event)
        elif rest:
            decode_content(rest[1:], CODINGS[rest[0] % len(CODINGS)], 1 << 16)
    except (UnsealError, ContentError):
        pass


def main() -> None:
    atheris.Setup(sys.argv, one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
