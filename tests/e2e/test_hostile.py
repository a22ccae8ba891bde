"""Hundreds of hostile responses mixed with good ones, through a real mitmdump."""

from __future__ import annotations

import hashlib
import json
import time
from collections import Counter
from pathlib import Path

import pytest

from scripts.harness import Service
from tests.e2e.conftest import Keys, fetch, read_jsonl, reverse_tap
from tests.e2e.test_mitmdump import summary_of

pytestmark = pytest.mark.e2e

HOSTILE, GOOD = 220, 40
ENCODINGS = ("identity", "gzip", "br", "zstd")


def test_hostile_batch(tmp_path: Path, keys: Keys, endpoint: Service) -> None:
    jsonl = tmp_path / "events.jsonl"
    proxy = reverse_tap(tmp_path, endpoint, fp_keys_file=str(keys.file), fp_jsonl=str(jsonl))
    expected: Counter[str] = Counter()
    received: list[str] = []
    try:
        base = f"http://127.0.0.1:{proxy.port}/agent"
        for i in range(HOSTILE + GOOD):
            enc = ENCODINGS[i % len(ENCODINGS)]
            if i % 6 == 5 and i // 6 < GOOD:
                query = f"case=ok&api={'v3' if i % 2 else 'v4'}&encoding={enc}"
                want = "ok"
            else:
                query = f"case=hostile&seed={i}&encoding={enc}"
                want = ""
            reply = fetch(f"{base}?{query}&ts={int(time.time() * 1000)}")
            headers = {k.lower(): v for k, v in reply.headers}
            expected[want or headers["x-stand-in-expect"]] += 1
            received.append(hashlib.sha256(reply.body).hexdigest())
    finally:
        assert proxy.stop() == 0

    # The client got exactly the bytes the endpoint sent, every time.
    sent = [a["body_sha256"] for a in read_jsonl(tmp_path / "answers.jsonl")]
    assert received == sent

    assert sum(expected.values()) == HOSTILE + GOOD
    kinds = {k: n for k, n in expected.items() if k not in ("ok", "ignored")}
    assert len(kinds) >= 8, f"the mix is too thin: {expected}"
    assert expected["ignored"] >= 10

    summary = summary_of(proxy.output())
    assert summary.get("errors", {}) == kinds
    assert summary["unsealed"] == expected["ok"]
    assert summary["open_responses"] == HOSTILE + GOOD - expected["ignored"]
    assert summary["responses"] == HOSTILE + GOOD

    records = read_jsonl(jsonl)
    assert Counter(r["error"]["kind"] for r in records if not r["ok"]) == kinds
    assert sum(r["ok"] for r in records) == expected["ok"]
    assert "Traceback" not in proxy.output()
    assert json.dumps(summary).count("internal") == 0
