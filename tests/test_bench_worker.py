"""scripts/bench_worker.py: section 5 times real, trusted work, and says so when not."""

from __future__ import annotations

from pathlib import Path

import pytest

from fp_core.keys import DecryptionKey
from fp_core.pipeline import OPTIONS, Pipeline
from fp_core.tap import ResponseInfo
from scripts import bench_worker
from scripts.bench_worker import idle_gaps, responses, worker_rates


def test_responses_are_distinct_open_responses_of_both_apis() -> None:
    key = DecryptionKey.generate()
    pipeline = Pipeline()
    pipeline.configure(bench_worker.default_options(), OPTIONS, [key])
    try:
        records = [pipeline.inspect(info) for info in responses(key, 6, seed=5)]
    finally:
        pipeline.close(0)
    assert all(r is not None and r["verdict"] == "trusted" for r in records)
    assert [r["api"] for r in records if r] == ["v4", "v3"] * 3
    assert len({r["request_id"] for r in records if r}) == 6


def test_idle_gaps_gives_a_row_per_gap_from_every_round() -> None:
    rows = idle_gaps((0, 2), count=4, rounds=2)
    assert [r.gap_ms for r in rows] == [0, 2]
    assert all(r.cpu_us.n == 2 and r.cpu_us.low > 0 for r in rows)
    assert rows[0].vs_first.median == 1.0  # the first gap against itself


def test_idle_gaps_stops_when_the_work_is_not_trusted(monkeypatch: pytest.MonkeyPatch) -> None:
    other = DecryptionKey.generate()

    def sealed_with_another_key(key: DecryptionKey, count: int, seed: int) -> list[ResponseInfo]:
        return responses(other, count, seed)

    monkeypatch.setattr(bench_worker, "responses", sealed_with_another_key)
    with pytest.raises(RuntimeError, match="not unsealed as trusted: error"):
        idle_gaps((0,), count=2, rounds=1)


def test_worker_rates_measures_the_worker_process(tmp_path: Path) -> None:
    # 200 trusted responses take the worker well over 10 ms of CPU, the resolution of
    # /proc's CPU times, so a zero would mean the wrong process was read.
    rows = worker_rates((2000,), 200, tmp_path)
    (row,) = rows
    assert (row.rate, row.responses) == (2000, 200)
    assert row.cpu_us > 0
    assert 0 < row.answer_ms_p50 <= row.answer_ms_p99
    assert list(tmp_path.iterdir()) == []  # the key file is gone
