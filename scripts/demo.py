"""The local demo: a stand-in Fingerprint endpoint, mitmdump with the addon in front of
it, and a handful of real requests through it. No Fingerprint account needed.

Run it with ``scripts/demo`` (which sets up .venv first). Everything it writes goes to
``demo-out/`` in the repository: the demo key, the JSONL export, the saved flows and
both processes' logs.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a plain script

from fp_core.keys import DecryptionKey
from scripts.harness import (
    REPO,
    MitmdumpConfig,
    Service,
    start_endpoint,
    start_mitmdump,
    write_key_file,
)

OUT = REPO / "demo-out"

# What the demo sends, and the verdict it expects fp-tap to reach for each.
STEPS: list[tuple[str, str, str]] = [
    ("a good visitor (agent v4)", "case=ok&api=v4", "trusted"),
    ("a good visitor (agent v3, gzip-encoded response)", "case=ok&api=v3&encoding=gzip", "trusted"),
    ("a bad bot (headless browser)", "case=bad_bot&api=v4&encoding=br", "suspicious"),
    (
        "a spliced response: the outer id is not the sealed one",
        "case=mismatch&api=v3",
        "suspicious",
    ),
    ("a response sealed with a key the tap does not have", "case=wrong_key&api=v4", "error"),
    ("the same sealed response a second time (a replay)", "REPLAY", "suspicious"),
    ("ordinary traffic: an HTML page", "case=html", "ignored"),
]


#: Straight to the local proxy, whatever http_proxy says (behind a corporate proxy with no
#: no_proxy for 127.0.0.1, urlopen would send the demo's requests there).
_DIRECT = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def send(url: str) -> bytes:
    request = urllib.request.Request(url, data=b"{}", headers={"Content-Type": "application/json"})
    with _DIRECT.open(request, timeout=30) as response:
        return bytes(response.read())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="fp-tap's local demo (see the README).")
    parser.add_argument("--out", type=Path, default=OUT, help=f"output folder (default {rel(OUT)})")
    out: Path = parser.parse_args(argv).out.resolve()
    if out.exists() and any(out.iterdir()) and not (out / "demo.key").exists():
        parser.error(f"{out} is not empty and not an earlier demo's folder: not clearing it")
    shutil.rmtree(out, ignore_errors=True)  # a fresh run: nothing left from the last one
    out.mkdir(parents=True)
    key = DecryptionKey.generate()
    key_file = write_key_file(out / "demo.key", key, "demo key, made by scripts/demo")
    jsonl, flows = out / "events.jsonl", out / "flows.mitm"

    print(f"fp-tap demo: key {key.key_id} in {rel(key_file)}")
    endpoint = start_endpoint(out, key_file, log=out / "endpoint-answers.jsonl")
    print(f"  stand-in Fingerprint endpoint at http://127.0.0.1:{endpoint.port}")
    proxy: Service | None = None
    try:
        proxy = start_mitmdump(
            out,
            MitmdumpConfig(
                mode=f"reverse:http://127.0.0.1:{endpoint.port}",
                options={"fp_keys_file": str(key_file), "fp_jsonl": str(jsonl)},
                save_flows=flows,
            ),
        )
        print(f"  mitmdump -s fp_addon.py (reverse proxy) at http://127.0.0.1:{proxy.port}\n")
        base = f"http://127.0.0.1:{proxy.port}/agent/v4?ii=demo"
        replay_url = f"{base}&case=ok&api=v4&seed=7&ts={int(time.time() * 1000)}"
        for label, query, _ in STEPS:
            url = replay_url if query == "REPLAY" else f"{base}&{query}"
            if query == "REPLAY":
                send(url)  # first sighting; the next one is the replay
            body = send(url)
            print(f"  -> sent {label}: client got {len(body)} bytes, unchanged")
        time.sleep(0.2)
    finally:
        code = proxy.stop() if proxy is not None else 1
        endpoint.stop()

    lines = [x for x in proxy.output().splitlines() if "] fp " in x or "fp-tap" in x]
    print("\nWhat fp-tap logged:")
    for line in lines:
        print("  " + line)
    records = [json.loads(x) for x in jsonl.read_text().splitlines()] if jsonl.exists() else []
    print(f"\n{len(records)} records in {rel(jsonl)}; saved flows in {rel(flows)}")
    print(f"process logs in {rel(out)}/")
    if records:
        print("One record (event shortened):")
        print(indent(json.dumps(shorten(records[2]), indent=2)))
    verdicts = sorted(r["verdict"] for r in records)
    # The replay step sends twice: its first sighting is trusted.
    expected = sorted([*(v for _, _, v in STEPS if v != "ignored"), "trusted"])
    ok = code == 0 and verdicts == expected
    print("\ndemo " + ("finished: every verdict as expected" if ok else f"FAILED: got {verdicts}"))
    return 0 if ok else 1


def shorten(record: dict[str, Any]) -> dict[str, Any]:
    out = dict(record)
    if "event" in out:
        out["event"] = {k: out["event"][k] for k in list(out["event"])[:6]} | {"...": "..."}
    return out


def indent(text: str) -> str:
    return "\n".join("  " + line for line in text.splitlines())


def rel(path: Path) -> str:
    """Short paths for what the demo prints: relative to the repository when inside it."""
    return str(path.relative_to(REPO)) if path.is_relative_to(REPO) else str(path)


if __name__ == "__main__":
    sys.exit(main())
