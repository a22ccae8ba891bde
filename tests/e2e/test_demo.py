"""The README's main command: the demo runs end to end and gets every verdict right."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from scripts.harness import REPO, clean_env

pytestmark = pytest.mark.e2e


def run_demo(out: Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(REPO / "scripts" / "demo.py"), "--out", str(out)],
        capture_output=True,
        text=True,
        env=clean_env(env),
        timeout=180,
        check=False,
    )


def test_demo(tmp_path: Path) -> None:
    out = tmp_path / "demo"
    for _ in range(2):  # a second run clears the first one's folder
        result = run_demo(out)
        assert result.returncode == 0, result.stdout + result.stderr
    assert "demo finished: every verdict as expected" in result.stdout
    assert "suspicious (bad_bot)" in result.stdout
    assert "error decrypt_failed" in result.stdout
    records = [json.loads(x) for x in (out / "events.jsonl").read_text().splitlines()]
    assert sorted(r["verdict"] for r in records).count("suspicious") == 3
    key = (out / "demo.key").read_text().splitlines()[-1]
    assert key not in result.stdout + result.stderr


def test_demo_refuses_to_clear_a_foreign_folder(tmp_path: Path) -> None:
    (tmp_path / "precious.txt").write_text("keep me")
    result = run_demo(tmp_path)
    assert result.returncode != 0
    assert (tmp_path / "precious.txt").read_text() == "keep me"


def test_the_demo_talks_to_its_own_proxy_whatever_http_proxy_says(tmp_path: Path) -> None:
    """A newcomer behind a corporate proxy, with no no_proxy for 127.0.0.1."""
    proxy = "http://127.0.0.1:9"  # nothing listens there
    result = run_demo(
        tmp_path / "demo",
        {"http_proxy": proxy, "HTTP_PROXY": proxy, "no_proxy": "", "NO_PROXY": ""},
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "demo finished: every verdict as expected" in result.stdout
