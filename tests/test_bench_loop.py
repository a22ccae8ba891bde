"""scripts/bench_loop.py: section 6 times the addon's real work on the loop, and leaves
mitmproxy's logging as it found it."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import pytest
from mitmproxy import http

from fp_core.keys import DecryptionKey
from scripts import bench_loop
from scripts.bench_loop import CASES, LoopCase, event_loop_cost, flows
from scripts.harness import children


def test_flows_are_distinct_open_responses_received_now() -> None:
    key = DecryptionKey.generate()
    batch = flows(key, CASES[1], 4, seed=3)
    bodies = [f.response.content or b"" for f in batch if f.response]
    assert len(set(bodies)) == 4
    assert all(b'"sealed' in b for b in bodies)
    page = flows(key, CASES[0], 2, seed=3)
    assert all(f.response and f.response.headers["content-type"] == "text/html" for f in page)


def test_every_case_gives_a_row_where_its_work_is(tmp_path: Path) -> None:
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    rows = event_loop_cost(count=6, rounds=2, workdir=tmp_path)
    by_name = {r.name: r for r in rows}
    assert list(by_name) == [c.name for c in CASES]
    assert all(r.responses == 6 and r.hook_us.n == 2 and r.hook_us.low > 0 for r in rows)
    # Answers come back only from a worker process; with the record line or without.
    assert by_name["open response (default: worker process)"].answer_us.low > 0
    assert by_name["open response, fp_log_trusted=false"].answer_us.low > 0
    assert by_name["open response, in-process (fp_worker=false)"].answer_us.high == 0
    assert by_name["ordinary response (5 KB HTML page)"].answer_us.high == 0
    assert list(tmp_path.iterdir()) == []  # the key file is gone
    assert root.handlers == handlers  # no test master's handler left behind
    assert root.level == level


def test_the_section_stops_when_the_work_is_not_trusted(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    other = DecryptionKey.generate()
    real = bench_loop.flows

    def sealed_with_another_key(
        key: DecryptionKey, case: LoopCase, count: int, seed: int
    ) -> list[http.HTTPFlow]:
        return real(other, case, count, seed)

    monkeypatch.setattr(bench_loop, "flows", sealed_with_another_key)
    monkeypatch.setattr(bench_loop, "CASES", (CASES[1],))
    with pytest.raises(RuntimeError, match="came out 'error'"):
        event_loop_cost(count=2, rounds=1, workdir=tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_a_worker_that_does_not_answer_stops_the_section_and_is_stopped(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # No time at all for the answers: the worker (several times slower per response than
    # the hook that feeds it) still holds most of the 200 when the wait begins.
    monkeypatch.setattr(bench_loop, "ANSWER_TIMEOUT_S", -1.0)
    monkeypatch.setattr(bench_loop, "CASES", (CASES[1],))
    with pytest.raises(RuntimeError, match=r"the worker left \d+ response\(s\) unanswered"):
        event_loop_cost(count=200, rounds=1, workdir=tmp_path)
    workers = [p for p in children(os.getpid()) if b"fp_core.worker" in _cmdline(p)]
    assert workers == []  # tap.done() ran: no worker process left behind
    assert list(tmp_path.iterdir()) == []


def test_a_worker_that_does_not_start_stops_the_section_and_is_stopped(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The worker starts off the event loop once the tap runs: no time at all for it.
    monkeypatch.setattr(bench_loop, "START_TIMEOUT_S", -1.0)
    monkeypatch.setattr(bench_loop, "CASES", (CASES[1],))
    with pytest.raises(RuntimeError, match="the worker process did not start"):
        event_loop_cost(count=2, rounds=1, workdir=tmp_path)
    workers = [p for p in children(os.getpid()) if b"fp_core.worker" in _cmdline(p)]
    assert workers == []  # tap.done() waited for it, and stopped it
    assert list(tmp_path.iterdir()) == []


def _cmdline(pid: int) -> bytes:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return b""  # gone since it was listed
