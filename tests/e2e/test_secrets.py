"""No secret in anything written: a full scenario at maximum verbosity, every byte searched."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from fp_core.keys import DecryptionKey
from scripts.harness import MitmdumpConfig, Service, start_mitmdump
from tests.e2e.conftest import Keys, fetch, secret_forms

pytestmark = pytest.mark.e2e

PROXY_SECRET = "hygiene-proxy-secret-5b2e7f01"


def forms(secret: bytes) -> list[bytes]:
    out = secret_forms(secret)
    return [*out, secret.hex().upper().encode()]


def test_nothing_written_holds_a_secret(tmp_path: Path, keys: Keys, endpoint: Service) -> None:
    env_key = DecryptionKey.generate()  # a rotated-out key, tried first, from the environment
    flows, jsonl = tmp_path / "flows.mitm", tmp_path / "events.jsonl"
    proxy = start_mitmdump(
        tmp_path,
        MitmdumpConfig(
            mode=f"reverse:http://127.0.0.1:{endpoint.port}",
            options={
                "fp_keys_file": str(keys.file),
                "fp_jsonl": str(jsonl),
                "termlog_verbosity": "debug",
                "flow_detail": 4,  # mitmdump prints full requests and responses
                "proxy_debug": True,  # ... and every byte on the wire
            },
            save_flows=flows,
            keys_env=env_key.to_base64(),
        ),
    )
    cases = ["ok", "bad_bot", "mismatch", "wrong_key", "bad_header", "not_json", "bomb", "html"]
    try:
        for i, case in enumerate(cases * 2):
            api = "v3" if i % 2 else "v4"
            reply = fetch(
                f"http://127.0.0.1:{proxy.port}/agent?case={case}&api={api}&encoding=gzip",
                headers={"FPJS-Proxy-Secret": PROXY_SECRET, "FPJS-Proxy-Client-IP": "8.8.8.8"},
            )
            assert reply.status == 200
        for seed in range(30):
            fetch(
                f"http://127.0.0.1:{proxy.port}/agent?case=hostile&seed={seed}",
                headers={"FPJS-Proxy-Secret": PROXY_SECRET},
            )
    finally:
        assert proxy.stop() == 0

    # The scenario did exercise everything: records, flows, verbose logs.
    records = [json.loads(x) for x in jsonl.read_text().splitlines()]
    assert sum(r["ok"] for r in records) >= 8
    assert flows.stat().st_size > 0
    assert "[redacted]" in proxy.output()  # flow_detail=4 printed the masked header

    secrets = {
        "proxy secret": [PROXY_SECRET.encode()],
        "file key": forms(keys.key.raw()),
        "environment key": forms(env_key.raw()),
    }
    written = [p for p in tmp_path.rglob("*") if p.is_file() and p != keys.file]
    assert len(written) >= 5
    for path in written:
        data = path.read_bytes()
        for name, variants in secrets.items():
            for form in variants:
                assert form not in data, f"the {name} leaked into {path.relative_to(tmp_path)}"
