"""scripts/bench.py: sections run end to end in their quick form, with results in JSON."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from scripts import bench, bench_loop


def run_quick(
    section: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> tuple[str, dict[str, Any]]:
    """``scripts/bench --quick --only SECTION``: what it printed, and its JSON results."""
    out = tmp_path / "results.json"
    argv = ["--quick", "--only", section, "--json", str(out), "--out", str(tmp_path)]
    assert bench.main(argv) == 0
    return capsys.readouterr().out, json.loads(out.read_text())


def test_quick_worker_section_reports_and_records_its_rows(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    printed, results = run_quick("worker", tmp_path, capsys)
    assert "== 5. the worker's CPU per open response" in printed
    assert "== targets" not in printed  # section 5 has none
    gaps, rates = results["worker"]["gaps"], results["worker"]["rates"]
    assert [g["gap_ms"] for g in gaps] == list(bench.QUICK.worker_gaps_ms)
    assert all(g["cpu_us"]["median"] > 0 for g in gaps)
    assert [r["rate"] for r in rates] == list(bench.QUICK.worker_rates)
    assert all(r["responses"] == bench.QUICK.worker_rate_responses for r in rates)
    assert results["targets"] == []
    assert not any(p.suffix == ".key" for p in tmp_path.iterdir())  # no key left behind


def test_quick_unseal_section_judges_every_target(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    printed, results = run_quick("unseal", tmp_path, capsys)
    # Two targets per (api, size): against the SDK and against the floor.
    assert len(results["targets"]) == 2 * len(results["unseal"]) == 12
    assert all(t["met"] in (True, False) for t in results["targets"])
    assert "== targets" in printed
    assert f"12 targets, {sum(not t['met'] for t in results['targets'])} not met" in printed


def test_quick_loop_section_reports_every_case(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    printed, results = run_quick("loop", tmp_path, capsys)
    assert "== 6. the addon's time on mitmproxy's event loop" in printed
    assert [r["name"] for r in results["loop"]] == [c.name for c in bench_loop.CASES]
    assert all(r["responses"] == bench.QUICK.loop_responses for r in results["loop"])
    assert all(r["name"] in printed for r in results["loop"])
    assert results["targets"] == []
