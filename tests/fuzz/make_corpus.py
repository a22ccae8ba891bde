"""Write the fuzz corpus seeds (tests/fuzz/corpus) from the project's own generators.

    python tests/fuzz/make_corpus.py

Deterministic: the same files every run, so the checked-in corpus can be rebuilt and
reviewed. Each seed starts with the mode byte fuzz_core.py reads.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import sys
import zlib
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from fp_core.generate import generate_event, open_response_body
from fp_core.hostile import VARIANTS, hostile_response
from fp_core.keys import DecryptionKey
from fp_core.sealed import deflate_raw, seal_event, seal_raw

KEY = DecryptionKey(hashlib.sha256(b"fp-tap fuzz key").digest())
CORPUS = Path(__file__).resolve().parent / "corpus"
NOW = 1_790_000_000_000
LIMIT = 64 * 1024  # big seeds slow every fuzz iteration down


def seeds() -> list[bytes]:
    out: list[bytes] = []
    for api in ("v3", "v4"):
        event = generate_event(api, rng=1, timestamp_ms=NOW, sparse=True)
        text = json.dumps(event).encode()
        rid = event["event_id"] if api == "v4" else event["products"]["botd"]["data"]["requestId"]
        sealed = seal_event(event, KEY, nonce=bytes(12))
        out.append(b"\x00" + json.dumps(open_response_body(api, rid, sealed)).encode())
        out.append(b"\x01" + seal_raw(deflate_raw(text), KEY, nonce=bytes(12)))
        out.append(b"\x02" + deflate_raw(text))
        out.append(b"\x03" + text)
    for name in sorted(VARIANTS):
        body, _, _ = hostile_response(3, KEY, NOW, name)
        out.append(b"\x00" + body)
    body = b'{"sealedResult": "x", "requestId": "y"}'
    out.append(b"\x04\x00" + gzip.compress(body, mtime=0))  # CODINGS[0]: gzip
    out.append(b"\x04\x01" + zlib.compress(body))  # CODINGS[1]: deflate
    return [s for s in out if len(s) <= LIMIT]


def main() -> None:
    CORPUS.mkdir(exist_ok=True)
    for old in CORPUS.iterdir():
        old.unlink()
    for seed in seeds():
        (CORPUS / hashlib.sha1(seed, usedforsecurity=False).hexdigest()).write_bytes(seed)
    print(f"{len(list(CORPUS.iterdir()))} seeds in {CORPUS}")


if __name__ == "__main__":
    main()
