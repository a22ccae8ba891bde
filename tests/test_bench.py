"""scripts/bench.py: sections run end to end in their quick form, with results in JSON."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from fp_core import store as store_module
from scripts import bench, bench_loop, bench_proxy
from scripts.bench_stats import Spread


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


def test_quick_prune_section_times_one_deletion_step(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    printed, results = run_quick("prune", tmp_path, capsys)
    assert "== 7. deleting rows past fp_sqlite_keep" in printed
    prune = results["prune"]
    assert prune["rows"] == store_module.PRUNE_BATCH
    assert prune["delete_ms"]["n"] == prune["insert_ms"]["n"] == bench.QUICK.prune_rounds
    assert prune["delete_ms"]["median"] > 0
    assert 3000 < prune["event_bytes"] < 6000, "realistic events, not stubs"
    assert results["targets"] == []
    assert [p.name for p in tmp_path.iterdir()] == ["results.json"], "no store left behind"


def test_quick_loop_section_reports_every_case(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    printed, results = run_quick("loop", tmp_path, capsys)
    assert "== 6. the addon's time on mitmproxy's event loop" in printed
    assert [r["name"] for r in results["loop"]] == [c.name for c in bench_loop.CASES]
    assert all(r["responses"] == bench.QUICK.loop_responses for r in results["loop"])
    assert all(r["name"] in printed for r in results["loop"])
    assert results["targets"] == []


def proxy_row(name: str, ratio: float, **kw: Any) -> bench_proxy.ProxyRow:
    one = Spread.of([1.0])
    return bench_proxy.ProxyRow(
        name=name,
        rate=one,
        vs_baseline=Spread.of([ratio]),
        cpu_ms=one,
        worker_cpu_ms=one,
        endpoint_cpu_ms=one,
        p50_ms=one,
        p99_ms=one,
        p50_delta_ms=Spread.of([0.2]),
        errors=kw.pop("errors", 0),
        dropped=0,
        written=kw.pop("written", {}),
        open_responses=kw.pop("open_responses", 100),
        addon_errors=kw.pop("addon_errors", {}),
        fp_tap=kw.pop("fp_tap", name != bench_proxy.BASELINE),
    )


def test_proxy_throughput_counts_only_scenarios_that_did_all_their_work(
    capsys: pytest.CaptureFixture[str],
) -> None:
    rows = [
        proxy_row(bench_proxy.BASELINE, 1.0),
        proxy_row("complete", 0.95, written={"jsonl": 100, "sqlite": 100}, open_responses=100),
        proxy_row("records missing", 0.95, written={"jsonl": 8}, open_responses=100),
        proxy_row("sink failed", 0.95, addon_errors={"sink_errors.jsonl": 3}),
        proxy_row("wrk errors", 0.95, errors=2),
        proxy_row("no addon summary", 0.95, open_responses=0),
        proxy_row("slow", 0.85),
        # Not fp-tap (the empty addon): measured, never a target, whatever its numbers.
        proxy_row(bench_proxy.CEILING, 0.5, open_responses=0, fp_tap=False),
    ]
    results = bench_proxy.ProxyResults("wrk", rows, [], Spread.of([1500.0]), "stand-in")
    targets = {name: (met, said) for name, met, said in bench._report_proxy(results, bench.QUICK)}
    throughput = {
        name.split(": ")[0].removeprefix("proxy "): (met, said)
        for name, (met, said) in targets.items()
        if "req/s" in name
    }
    assert {name: met for name, (met, _) in throughput.items()} == {
        "complete": True,
        "records missing": False,
        "sink failed": False,
        "wrk errors": False,
        "no addon summary": False,
        "slow": False,
    }
    assert "no open responses counted" in throughput["no addon summary"][1]
    assert "jsonl 8 of 100" in throughput["records missing"][1]
    assert "sink_errors.jsonl=3" in throughput["sink failed"][1]
    printed = capsys.readouterr().out
    assert "sink_errors.jsonl=3" in printed  # the table's addon errors column
    assert "the full stand-in without a proxy: 1,500" in printed
    assert not any(bench_proxy.CEILING in name for name in targets)
    ceiling = next(line for line in printed.splitlines() if bench_proxy.CEILING in line)
    assert "0.500" in ceiling  # in the table all the same


def test_pin_on_one_cpu_is_refused_before_any_section_runs(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    import os

    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0})
    with pytest.raises(SystemExit) as exited:
        bench.main(["--pin", "--out", str(tmp_path)])
    assert exited.value.code == 2
    assert "--pin needs at least 2 CPUs" in capsys.readouterr().err
    assert not any(tmp_path.iterdir()), "nothing ran"
