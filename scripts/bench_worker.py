"""Section 5 of the benchmarks: the worker's CPU time per open response, busy or idle.

On the proxy bench (section 3) the addon's worker process spends 0.6-0.8 ms of CPU per
response, while the same work done back to back in one process costs about a third of
that. This section shows where the difference comes from, without mitmproxy:

- **gaps**: the tap's work for one response (``Pipeline.inspect``, default options, no
  sinks), timed with the process's own CPU clock, when responses come back to back and
  when the process sleeps a few milliseconds before each one, as the worker does
  between the requests of a proxy;
- **rates**: the worker process itself (:class:`fp_core.worker.WorkerClient`, pipes and
  all), fed responses at fixed rates: its CPU time per response (``/proc``) and how long
  each answer takes to come back.

Every answer must be a trusted record, or the section stops: it times real work.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import fp_addon
from fp_core.events import Api, inner_request_id
from fp_core.generate import generate_event, open_response_body
from fp_core.keys import DecryptionKey
from fp_core.pipeline import OPTIONS, Pipeline
from fp_core.sealed import seal_event
from fp_core.tap import ResponseInfo
from fp_core.worker import WorkerClient
from scripts.bench_proxy import cpu_seconds
from scripts.bench_stats import Spread, paired_ratios
from scripts.harness import temporary_key_file

_DEFAULTS: dict[str, Any] = {name: default for name, _, default, _ in fp_addon.OPTIONS}


def default_options(**overrides: Any) -> SimpleNamespace:
    """The pipeline's options as the addon sends them by default (no sinks), then
    ``overrides``."""
    return SimpleNamespace(**({name: _DEFAULTS[name] for name in OPTIONS} | overrides))


@dataclass(frozen=True, slots=True)
class GapRow:
    """CPU microseconds per response after sleeping ``gap_ms`` before each (per round),
    and over the first gap's (back to back) of the same round."""

    gap_ms: float
    cpu_us: Spread
    vs_first: Spread


@dataclass(frozen=True, slots=True)
class RateRow:
    """The worker process at ``rate`` responses/s: its CPU and the answers' latency."""

    rate: int
    responses: int
    cpu_us: float
    answer_ms_p50: float
    answer_ms_p99: float


def responses(key: DecryptionKey, count: int, seed: int) -> list[ResponseInfo]:
    """``count`` distinct open responses (v4 and v3 alternately), as the tap gets them."""
    out = []
    for n in range(count):
        api: Api = "v4" if n % 2 == 0 else "v3"
        event = generate_event(api, rng=seed + n)
        sealed = seal_event(event, key)
        body = json.dumps(open_response_body(api, inner_request_id(event) or "", sealed)).encode()
        out.append(
            ResponseInfo(f"bench-{seed}-{n}", time.time(), "fp.example", "/", "POST", 200, body)
        )
    return out


def _trusted(record: dict[str, Any] | None) -> None:
    if record is None or record["verdict"] != "trusted":
        got = "nothing" if record is None else f"{record['verdict']} ({record['error']})"
        raise RuntimeError(f"the bench's response was not unsealed as trusted: {got}")


def idle_gaps(gaps_ms: Sequence[float], count: int, rounds: int) -> list[GapRow]:
    """The gaps part: ``rounds`` rounds, each taking every gap (rotating order) for
    ``count`` responses; the median over rounds of each gap's CPU per response."""
    key = DecryptionKey.generate()
    pipeline = Pipeline()
    pipeline.configure(default_options(), OPTIONS, [key])
    samples: dict[float, list[float]] = {gap: [] for gap in gaps_ms}
    try:
        for warm in responses(key, 20, seed=1):
            _trusted(pipeline.inspect(warm))
        for round_no in range(rounds):
            shift = round_no % len(gaps_ms)
            for i, gap in enumerate([*gaps_ms[shift:], *gaps_ms[:shift]]):
                batch = responses(key, count, seed=100_000 * (round_no * len(gaps_ms) + i + 1))
                spent = 0.0
                for info in batch:
                    if gap:
                        time.sleep(gap / 1000)
                    started = time.process_time()
                    record = pipeline.inspect(info)
                    spent += time.process_time() - started
                    _trusted(record)
                samples[gap].append(1e6 * spent / count)
    finally:
        pipeline.close(0)
    first = samples[gaps_ms[0]]
    return [
        GapRow(gap, Spread.of(samples[gap]), paired_ratios(samples[gap], first)) for gap in gaps_ms
    ]


def worker_rates(rates: Sequence[int], count: int, workdir: Path) -> list[RateRow]:
    """The rates part: one worker process, ``count`` responses at each rate."""
    key = DecryptionKey.generate()
    sent: dict[int, float] = {}
    latencies: list[float] = []

    def answered(records: list[tuple[Any, dict[str, Any] | None]]) -> None:
        now = time.monotonic()
        for token, record in records:
            _trusted(record)
            latencies.append(now - sent[token])

    with temporary_key_file(workdir, "worker-bench.key", key) as key_file:
        client = WorkerClient(on_records=answered, on_exit=lambda code: None, max_in_flight=count)
        client.start()
        try:
            values = vars(default_options(fp_keys_file=str(key_file)))
            client.configure(values, OPTIONS, wait=True, timeout=60)
            return [
                _at_rate(
                    client,
                    responses(key, count, seed=100_000_000 + 100_000 * rate),
                    rate,
                    sent,
                    latencies,
                )
                for rate in rates
            ]
        finally:
            client.close(5)


def _at_rate(
    client: WorkerClient,
    batch: Sequence[ResponseInfo],
    rate: int,
    sent: dict[int, float],
    latencies: list[float],
) -> RateRow:
    """Send ``batch`` at ``rate`` per second and wait for every answer; the row for it.
    ``sent`` and ``latencies`` are what the client's answer handler reads and fills."""
    assert client.proc is not None
    count = len(batch)
    latencies.clear()
    before = cpu_seconds(client.proc.pid)
    start = time.monotonic()
    for n, info in enumerate(batch):
        due = start + n / rate
        while (now := time.monotonic()) < due:
            client.poll(due - now)
        sent[n] = time.monotonic()
        client.submit(info, n)
    deadline = time.monotonic() + 60
    while len(latencies) < count and time.monotonic() < deadline:
        client.poll(0.05)
    if len(latencies) < count:
        raise RuntimeError(f"the worker answered {len(latencies)} of {count} in time")
    cpu = cpu_seconds(client.proc.pid) - before
    ordered = sorted(latencies)
    return RateRow(
        rate,
        count,
        1e6 * cpu / count,
        1e3 * ordered[count // 2],
        1e3 * ordered[min(count - 1, int(count * 0.99))],
    )
