"""scripts/bench_proxy.py: reading wrk's and the addon's output, the scenario table."""

from __future__ import annotations

import os
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from scripts import bench_proxy, harness
from scripts.bench_proxy import SCENARIOS, parse_wrk

WRK_OUTPUT = """\
Running 8s test @ http://127.0.0.1:40000/
  1 threads and 8 connections
  Thread Stats   Avg      Stdev     Max   +/- Stdev
    Latency    20.01ms    3.12ms  60.00ms   90.00%
  3200 requests in 8.00s, 20.00MB read
Requests/sec:    400.00
WRK_RESULT {"requests":3200,"duration_us":8000000,"errors":2,\
"p50_us":19500,"p90_us":23000,"p99_us":36800}
"""


def test_parse_wrk_reads_the_lua_result_line() -> None:
    result = parse_wrk(WRK_OUTPUT)
    assert (result.requests, result.seconds, result.errors) == (3200, 8.0, 2)
    assert (result.p50_ms, result.p90_ms, result.p99_ms) == (19.5, 23.0, 36.8)
    assert result.rate == 400.0


def test_parse_wrk_without_the_line_says_so() -> None:
    with pytest.raises(ValueError, match="no WRK_RESULT line"):
        parse_wrk("Running 8s test\nunable to connect\n")


def _load(requests: int, p50_ms: float) -> bench_proxy.LoadResult:
    return bench_proxy.LoadResult(requests, 1.0, 0, p50_ms, p50_ms, p50_ms)


def test_a_rows_rounds_stay_in_order_beside_its_summary() -> None:
    runs = bench_proxy.ScenarioRuns("addon")
    # Three rounds: the second's no-addon run got nothing, so it has no ratio.
    rounds = ((90, 3.5, 100, 3.0), (80, 4.0, 0, 3.5), (45, 3.2, 50, 3.0))
    for rate, p50, base_rate, base_p50 in rounds:
        runs.throughput.append(_load(rate, p50))
        runs.latency.append(_load(rate, p50))
        runs.cpu_ms.append(1.0)
        runs.worker_cpu_ms.append(0.5)
        runs.endpoint_cpu_ms.append(0.2)
        runs.paired_base.append((_load(base_rate, base_p50), _load(base_rate, base_p50)))
    row = bench_proxy._row(runs)
    assert row.round_ratios == (0.9, None, 0.9)
    assert row.round_p50_delta_ms == pytest.approx((0.5, 0.5, 0.2))
    assert row.vs_baseline.n == 2
    assert row.vs_baseline.median == pytest.approx(0.9)
    assert row.p50_delta_ms.median == pytest.approx(0.5)


def test_scenarios_start_with_the_baseline_and_need_their_options() -> None:
    assert SCENARIOS[0].name == bench_proxy.BASELINE
    assert not SCENARIOS[0].addon
    built_in = [s for s in SCENARIOS if not s.requires]
    assert all(s.available() for s in built_in)
    missing = bench_proxy.Scenario("x", requires=("fp_no_such_option",))
    assert not missing.available()


def test_lua_script_names_every_path() -> None:
    for path in bench_proxy.PATHS:
        assert f'"{path}"' in bench_proxy._WRK_LUA


def test_slow_receiver_answers_2xx_and_counts() -> None:
    receiver = bench_proxy.SlowReceiver(delay_ms=0)
    try:
        request = urllib.request.Request(receiver.url, data=b'{"ok":true}', method="POST")
        with urllib.request.urlopen(request, timeout=10) as response:
            assert response.status == 204
        assert receiver.received == [1]
    finally:
        receiver.close()


def test_a_childs_cpu_and_memory_count_for_its_parent() -> None:
    child = subprocess.Popen(
        [sys.executable, "-c", "import sys; x = bytearray(64 << 20); sys.stdin.read()"],
        stdin=subprocess.PIPE,
    )
    try:
        me = os.getpid()
        deadline = time.monotonic() + 30
        while bench_proxy.tree_rss_mb(me) - bench_proxy.rss_mb(me) < 60:
            assert time.monotonic() < deadline, "the child's 64 MiB never showed"
            time.sleep(0.01)
        assert child.pid in harness.children(me)
        assert bench_proxy.children_cpu_seconds(me) > 0
    finally:
        child.communicate(b"")
    assert child.pid not in harness.children(me)


@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="pinning needs two CPUs")
def test_pinning_moves_every_thread_of_a_process() -> None:
    first, rest = bench_proxy.split_cpus()
    assert first.isdisjoint(rest)
    assert first | rest == os.sched_getaffinity(0)
    # A child with a second thread, both waiting: every one of its tasks must move.
    code = (
        "import sys, threading; threading.Thread(target=sys.stdin.read).start(); sys.stdin.read()"
    )
    child = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE)
    try:
        tasks = Path(f"/proc/{child.pid}/task")
        deadline = time.monotonic() + 30
        while len(list(tasks.iterdir())) < 2:
            assert time.monotonic() < deadline, "the child's second thread never started"
            time.sleep(0.01)
        for cpus in (first, rest):
            bench_proxy.pin_process(child.pid, cpus)
            assert {int(t.name): os.sched_getaffinity(int(t.name)) for t in tasks.iterdir()} == {
                int(t.name): cpus for t in tasks.iterdir()
            }
    finally:
        child.communicate(b"\n\n")


@pytest.mark.parametrize(
    ("keep", "endpoint"), [(False, "lean"), (True, "stand-in")], ids=["cleared", "kept"]
)
def test_proxy_section_counts_records_and_keeps_them_when_asked(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, keep: bool, endpoint: str
) -> None:
    """One short round of the baseline and the JSONL scenario, through real mitmdumps,
    in front of either stand-in."""
    jsonl = next(s for s in SCENARIOS if s.name == "addon + JSONL")
    ceiling = next(s for s in SCENARIOS if s.name == bench_proxy.CEILING)
    monkeypatch.setattr(bench_proxy, "SCENARIOS", (SCENARIOS[0], ceiling, jsonl))
    folder = tmp_path / "addon-jsonl"
    records = folder / "events.jsonl"
    # What an earlier run with --keep left: not to be appended to, nor counted.
    (folder / "state").mkdir(parents=True)
    records.write_text('{"stale": true}\n')
    with bench_proxy.Bench(tmp_path, endpoint) as bench:
        assert bench.endpoint is not None
        assert list(bench.endpoint.proc.args)[1] == str(bench_proxy.ENDPOINTS[endpoint])  # type: ignore[arg-type]
        results = bench_proxy.proxy_overhead(bench, 1, 1, 1, keep=keep)
    assert results.endpoint == endpoint
    row = next(r for r in results.rows if r.name == jsonl.name)
    assert row.endpoint_cpu_ms.median > 0  # it answered every request through the proxy
    written = row.written["jsonl"]
    assert written > 0
    assert row.open_responses == written  # every open response has its record
    assert row.errors == 0
    assert row.addon_errors == {}
    assert not (folder / "state").exists()
    empty = next(r for r in results.rows if r.name == ceiling.name)
    assert not empty.fp_tap
    assert row.fp_tap
    assert empty.rate.median > 0
    assert empty.errors == 0
    assert empty.open_responses == 0
    assert empty.written == {}
    if keep:
        ceiling_out = tmp_path / "empty-script-addon-not-fp-tap-the-ceiling" / "mitmdump.out"
        output = ceiling_out.read_text()
        assert "bench_empty_addon.py" in output
        assert "fp_addon" not in output
        assert len(records.read_text().splitlines()) == written
        lines = (folder / "mitmdump.out").read_text().splitlines()
        assert sum(" fp v" in line for line in lines) == written  # one record line each
    else:
        assert not records.exists()
        assert not (folder / "mitmdump.out").exists()
