"""Section 6 of the benchmarks: what the addon costs mitmproxy's event loop per response.

mitmproxy handles every flow on one event-loop thread, and on the proxy bench (section 3)
requests per second follow that thread's CPU time per request. Section 3 measures it
through the whole machine's noise; this section times the addon's own work on that
thread, in the two places it runs:

- the ``response`` hook: for an open response, the cheap test, the pickle and the pipe
  write to the worker (in-process, ``fp_worker=false``: the whole unseal, checks and
  record); for anything else, the cheap test alone;
- the answer: when the worker's record comes back, the flow annotation and the record
  line (the pipe read and the unpickling before it are not in this column).

``FingerprintTap`` runs in mitmproxy's own test master (``mitmproxy.test.taddons``), with
mitmdump's terminal log handler (``TermLog``, writing to ``/dev/null``) beside it, so
that every record line goes through the handlers it goes through in mitmdump. Flows come
one at a time, the loop turning between two, as a busy proxy's would (``perf_counter``
around each call: nothing in them waits). Every open response must end up with a trusted
record on its flow, or the section stops: it times real work.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mitmproxy import http
from mitmproxy.addons.termlog import TermLog
from mitmproxy.test import taddons, tflow

import fp_addon
from fp_core.keys import DecryptionKey
from scripts.bench_stats import Spread
from scripts.bench_worker import responses
from scripts.harness import temporary_key_file

#: How long the worker may take to answer a batch (it takes well under a second).
ANSWER_TIMEOUT_S = 60.0
#: How long the worker may take to start (100-200 ms here).
START_TIMEOUT_S = 60.0


@dataclass(frozen=True, slots=True)
class LoopCase:
    """One row: which responses, and the addon's options beyond the key file."""

    name: str
    open_response: bool = True
    options: dict[str, Any] = field(default_factory=dict)


CASES: tuple[LoopCase, ...] = (
    LoopCase("ordinary response (5 KB HTML page)", open_response=False),
    LoopCase("open response (default: worker process)"),
    LoopCase("open response, fp_log_trusted=false", options={"fp_log_trusted": False}),
    LoopCase("open response, in-process (fp_worker=false)", options={"fp_worker": False}),
)


@dataclass(frozen=True, slots=True)
class LoopRow:
    """Microseconds of the loop thread per response: in the hook, and in the answer."""

    name: str
    responses: int
    hook_us: Spread
    answer_us: Spread


def _flow(body: bytes, content_type: str) -> http.HTTPFlow:
    flow = tflow.tflow(resp=True)
    flow.request.method, flow.request.path = "POST", "/agent?ii=bench"
    assert flow.response is not None
    flow.response.headers = http.Headers(
        [(b"content-type", content_type.encode()), (b"content-length", str(len(body)).encode())]
    )
    flow.response.content = body
    # Received now, as the events are stamped (the test flow's clock is fixed).
    flow.response.timestamp_start = flow.response.timestamp_end = time.time()
    return flow


def flows(key: DecryptionKey, case: LoopCase, count: int, seed: int) -> list[http.HTTPFlow]:
    """``count`` fresh flows for ``case``: distinct open responses (v4 and v3
    alternately) or the same ordinary page."""
    if not case.open_response:
        page = ("<!doctype html><p>" + "an ordinary page, not Fingerprint's. " * 135).encode()
        return [_flow(page, "text/html") for _ in range(count)]
    return [_flow(info.body, "application/json") for info in responses(key, count, seed)]


def _check(case: LoopCase, batch: Sequence[http.HTTPFlow]) -> None:
    for flow in batch:
        shown = flow.metadata.get(fp_addon.METADATA_KEY, {})
        if shown.get("verdict") != ("trusted" if case.open_response else None):
            raise RuntimeError(
                f"{case.name}: a bench flow came out {shown.get('verdict')!r}: "
                f"{shown.get('reasons')}"
            )


async def _measure(
    case: LoopCase, key_file: Path, key: DecryptionKey, count: int, rounds: int
) -> tuple[list[float], list[float]]:
    """Per round: seconds per response in the hook, and in the answers."""
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    with open(os.devnull, "w", encoding="utf-8") as devnull:
        termlog = TermLog(out=devnull)  # mitmdump's log handler, printing nowhere
        tap = fp_addon.FingerprintTap()
        try:
            with taddons.context(termlog, tap) as tctx:  # type: ignore[no-untyped-call]
                tctx.configure(tap, fp_keys_file=str(key_file), **case.options)
                tap.running()
                await _started(tap)
                root.setLevel(logging.INFO)  # as mitmdump has it
                try:
                    return await _rounds(tap, case, key, count, rounds)
                finally:
                    tap.done()  # stops the worker process, whatever happened
        finally:
            # The test master leaves its handler (mitmproxy's add_log events) behind:
            # the next case would pay for two, and this one's loop is closed.
            for handler in [h for h in root.handlers if h not in handlers]:
                root.removeHandler(handler)
            root.setLevel(level)


async def _started(tap: fp_addon.FingerprintTap) -> None:
    """Wait for what the running hook starts off the event loop (the worker, or work in
    this process if it cannot start)."""
    deadline = time.monotonic() + START_TIMEOUT_S
    while tap.worker is None and tap.pipeline is None:
        if time.monotonic() > deadline:
            raise RuntimeError("the worker process did not start")
        await asyncio.sleep(0.005)


async def _rounds(
    tap: fp_addon.FingerprintTap, case: LoopCase, key: DecryptionKey, count: int, rounds: int
) -> tuple[list[float], list[float]]:
    await _take(tap, flows(key, case, 20, seed=1))  # the worker starts; caches warm up
    hooks, answers = [], []
    for round_no in range(rounds):
        batch = flows(key, case, count, seed=1_000_000 * (round_no + 1))
        hook, answer = await _take(tap, batch)
        _check(case, batch)
        hooks.append(hook / count)
        answers.append(answer / count)
    return hooks, answers


async def _take(tap: fp_addon.FingerprintTap, batch: list[http.HTTPFlow]) -> tuple[float, float]:
    """Seconds spent in the hook and in the answers, for ``batch`` one flow at a time."""
    spent = 0.0
    worker = tap.worker
    if worker is not None:
        handle = worker.on_records

        def timed(records: Any) -> None:
            nonlocal spent
            started = time.perf_counter()
            handle(records)
            spent += time.perf_counter() - started

        worker.on_records = timed
    hook = 0.0
    try:
        for flow in batch:
            started = time.perf_counter()
            tap.response(flow)
            hook += time.perf_counter() - started
            await asyncio.sleep(0)
        deadline = time.monotonic() + ANSWER_TIMEOUT_S
        while worker is not None and worker.in_flight:
            if time.monotonic() > deadline:
                raise RuntimeError(f"the worker left {worker.in_flight} response(s) unanswered")
            await asyncio.sleep(0.005)
    finally:
        if worker is not None:
            worker.on_records = handle
    return hook, spent


def event_loop_cost(count: int, rounds: int, workdir: Path) -> list[LoopRow]:
    """Every case of :data:`CASES`, ``rounds`` times ``count`` responses each."""
    key = DecryptionKey.generate()
    rows = []
    with temporary_key_file(workdir, "loop-bench.key", key) as key_file:
        for case in CASES:
            hooks, answers = asyncio.run(_measure(case, key_file, key, count, rounds))
            rows.append(
                LoopRow(
                    case.name,
                    count,
                    Spread.of([1e6 * s for s in hooks]),
                    Spread.of([1e6 * s for s in answers]),
                )
            )
    return rows
