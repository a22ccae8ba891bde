"""Proxy overhead and memory: a real ``mitmdump`` in front of the stand-in endpoint.

Every scenario is one entry of :data:`SCENARIOS`: mitmdump's options and environment,
and the helper it needs (the slow webhook receiver). A scenario whose option this
build of ``fp_addon.py`` does not define is skipped and said to be, so the table picks
up new sinks as soon as they exist. Load comes from ``wrk`` in its own process on
loopback (installed with apt-get when missing), or, failing that, from a small
multi-process Python client (:func:`python_load`), which the output then says.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import re
import shutil
import signal
import subprocess
import threading
import time
import urllib.parse
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from multiprocessing import get_context
from pathlib import Path
from typing import Any, Protocol

from fp_core.keys import DecryptionKey
from fp_core.replay import ReplayCache
from scripts.bench_stats import Spread
from scripts.harness import (
    ADDON,
    ENDPOINT,
    LEAN_ENDPOINT,
    MitmdumpConfig,
    Service,
    addon_summary,
    children,
    start_endpoint,
    start_mitmdump,
    write_key_file,
)

#: What the load generators send: the JS agent's POST, alternating agent v4 and v3,
#: each answered by the stand-in with a fresh open response (new id, stamped now).
PATHS = ("/agent/v4?ii=bench&case=ok&api=v4", "/agent/v3?ii=bench&case=ok&api=v3")
WEBHOOK_DELAY_MS = 500
WEBHOOK_SECRET = "bench-webhook-secret"  # noqa: S105 (a throwaway for the local receiver)

_WRK_LUA = """\
-- POST like the JS agent, alternating agent v4 and v3 open responses (scripts/bench).
-- Arguments after "--": a response limit (0: none) and a file to create on reaching it.
local paths = {@PATHS@}
local sent, received = 0, 0

function init(args)
  local limit, marker = tonumber(args[1]) or 0, args[2]
  if limit > 0 then
    -- Defined only when needed: wrk hands every response to Lua once this exists.
    response = function(status, headers, body)
      received = received + 1
      if received == limit then
        io.open(marker, "w"):close()
        wrk.thread:stop()
      end
    end
  end
end

function request()
  sent = sent + 1
  return wrk.format("POST", paths[sent % #paths + 1],
    {["Content-Type"] = "application/json"}, "{}")
end

function done(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    'WRK_RESULT {"requests":%d,"duration_us":%d,"errors":%d,' ..
    '"p50_us":%d,"p90_us":%d,"p99_us":%d}\\n',
    summary.requests, summary.duration, e.connect + e.read + e.write + e.status + e.timeout,
    latency:percentile(50), latency:percentile(90), latency:percentile(99)))
end
""".replace("@PATHS@", ", ".join(f'"{p}"' for p in PATHS))
_WRK_RESULT = re.compile(r"^WRK_RESULT (\{.*\})$", re.MULTILINE)


@dataclass(frozen=True, slots=True)
class LoadResult:
    """One bounded load run: responses, how long, failures, latency percentiles (ms)."""

    requests: int
    seconds: float
    errors: int
    p50_ms: float
    p90_ms: float
    p99_ms: float

    @property
    def rate(self) -> float:
        return self.requests / self.seconds if self.seconds else 0.0


def parse_wrk(output: str) -> LoadResult:
    """The result line our Lua ``done`` prints (wrk's own summary is not parsed)."""
    match = _WRK_RESULT.search(output)
    if match is None:
        raise ValueError(f"no WRK_RESULT line in wrk's output:\n{output[-2000:]}")
    data = json.loads(match.group(1))
    return LoadResult(
        requests=int(data["requests"]),
        seconds=data["duration_us"] / 1e6,
        errors=int(data["errors"]),
        p50_ms=data["p50_us"] / 1000,
        p90_ms=data["p90_us"] / 1000,
        p99_ms=data["p99_us"] / 1000,
    )


class LoadGenerator(Protocol):
    name: str

    def run(self, url: str, connections: int, seconds: int, limit: int = 0) -> LoadResult:
        """Load ``url`` for ``seconds`` (or until ``limit`` responses, when not 0)."""
        ...


class Wrk:
    """``wrk`` with :data:`_WRK_LUA`, one thread (the proxy under test needs the cores)."""

    name = "wrk"

    def __init__(self, workdir: Path) -> None:
        self.script = workdir / "bench.lua"
        self.script.write_text(_WRK_LUA, encoding="utf-8")

    def run(self, url: str, connections: int, seconds: int, limit: int = 0) -> LoadResult:
        marker = self.script.with_name("wrk-limit-reached")
        marker.unlink(missing_ok=True)
        args = [
            shutil.which("wrk") or "wrk",
            "-t1",
            f"-c{connections}",
            f"-d{seconds}s",
            "--timeout",
            "10s",
        ]
        args += ["-s", str(self.script), url, "--", str(limit), str(marker)]
        with subprocess.Popen(
            args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        ) as proc:
            # wrk sleeps out its whole duration even when its thread has stopped; SIGINT
            # ends the sleep and it reports as usual.
            while limit and proc.poll() is None and not marker.exists():
                time.sleep(0.02)
            if proc.poll() is None and limit:
                proc.send_signal(signal.SIGINT)
            out, err = proc.communicate(timeout=seconds + 60)
        if proc.returncode != 0:
            raise RuntimeError(f"wrk failed ({proc.returncode}): {err[-2000:]}")
        return parse_wrk(out)


def version_of_wrk() -> str | None:
    """``wrk``'s version line, or None when it is not installed."""
    wrk = shutil.which("wrk")
    if wrk is None:
        return None
    done = subprocess.run([wrk, "--version"], capture_output=True, text=True, check=False)
    return (done.stdout or done.stderr).splitlines()[0].split(" Copyright")[0].strip()


def ensure_wrk() -> bool:
    """Install Debian's ``wrk`` when it is missing and apt-get can; True when it is there."""
    if shutil.which("wrk"):
        return True
    apt = shutil.which("apt-get")
    if apt is None:
        return False
    print("bench: wrk is missing; trying apt-get install -y wrk", flush=True)
    quiet = {"stdout": subprocess.DEVNULL, "stderr": subprocess.DEVNULL, "check": False}
    if subprocess.run([apt, "install", "-y", "wrk"], **quiet).returncode != 0:  # type: ignore[call-overload]
        subprocess.run([apt, "update"], **quiet)  # type: ignore[call-overload]
        subprocess.run([apt, "install", "-y", "wrk"], **quiet)  # type: ignore[call-overload]
    return shutil.which("wrk") is not None


class PythonLoad:
    """The fallback: one process per connection, each a keep-alive ``http.client`` loop."""

    name = "python (fallback: wrk unavailable)"

    def run(self, url: str, connections: int, seconds: int, limit: int = 0) -> LoadResult:
        parts = urllib.parse.urlsplit(url)
        share = -(-limit // connections) if limit else 0
        # spawn, not fork: the bench process may run the receiver's threads.
        with ProcessPoolExecutor(connections, mp_context=get_context("spawn")) as pool:
            jobs = [
                pool.submit(_client, parts.hostname or "", parts.port or 80, seconds, share)
                for _ in range(connections)
            ]
            results = [job.result() for job in jobs]
        latencies = sorted(ns for lats, _, _ in results for ns in lats)
        elapsed = max((s for _, _, s in results), default=0.0)
        if not latencies:
            return LoadResult(0, elapsed, sum(e for _, e, _ in results), 0.0, 0.0, 0.0)

        def pct(q: float) -> float:
            return latencies[min(len(latencies) - 1, int(q * len(latencies)))] / 1e6

        errors = sum(e for _, e, _ in results)
        return LoadResult(len(latencies), elapsed, errors, pct(0.5), pct(0.9), pct(0.99))


def _client(host: str, port: int, seconds: int, limit: int) -> tuple[list[int], int, float]:
    """One connection's loop: latencies (ns) of 2xx answers, failures, seconds taken."""
    conn = http.client.HTTPConnection(host, port, timeout=10)
    latencies: list[int] = []
    errors = 0
    start = time.monotonic()
    while time.monotonic() - start < seconds and not (limit and len(latencies) >= limit):
        began = time.perf_counter_ns()
        try:
            path = PATHS[(len(latencies) + errors) % len(PATHS)]
            conn.request("POST", path, b"{}", {"Content-Type": "application/json"})
            response = conn.getresponse()
            response.read()
        except (OSError, http.client.HTTPException):
            errors += 1
            conn.close()
            continue
        if 200 <= response.status < 300:
            latencies.append(time.perf_counter_ns() - began)
        else:
            errors += 1
    conn.close()
    return latencies, errors, time.monotonic() - start


def load_generator(workdir: Path) -> LoadGenerator:
    """wrk if it is (or can be) installed, else the Python fallback."""
    if ensure_wrk():
        return Wrk(workdir)
    print("bench: wrk unavailable; using the slower Python load generator", flush=True)
    return PythonLoad()


class SlowReceiver:
    """A webhook receiver on 127.0.0.1 that takes ``delay_ms`` per request, then 204s."""

    def __init__(self, delay_ms: int) -> None:
        delay = delay_ms / 1000
        received = self.received = [0]

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_POST(self) -> None:
                self.rfile.read(int(self.headers.get("Content-Length") or 0))
                time.sleep(delay)
                received[0] += 1
                self.send_response(204)
                self.end_headers()

            def log_request(self, code: int | str = "-", size: int | str = "-") -> None:
                pass  # one line per delivery would only be noise

        class Server(ThreadingHTTPServer):
            daemon_threads = True

            def handle_error(self, request: Any, client_address: Any) -> None:
                pass  # mitmdump dropping its connections when it stops is expected

        self.server = Server(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/webhook"
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self._thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@dataclass(frozen=True)
class Scenario:
    """One row of the proxy table: how mitmdump runs, and what it needs.

    Option values may hold ``{out}`` (the scenario's scratch folder) and ``{receiver}``
    (the slow receiver's URL).
    """

    name: str
    addon: bool = True
    options: dict[str, str] = field(default_factory=dict)
    env: dict[str, str] = field(default_factory=dict)
    #: Options that this build of the addon must define, else the scenario is skipped.
    requires: tuple[str, ...] = ()
    receiver_delay_ms: int | None = None
    #: Another script than fp_addon.py (with ``addon`` False): not fp-tap, no target.
    script: Path | None = None

    @property
    def fp_tap(self) -> bool:
        return self.addon

    def available(self) -> bool:
        source = ADDON.read_text(encoding="utf-8")
        return all(f'"{option}"' in source for option in self.requires)


BASELINE = "no addon"
#: What any script addon with fp-tap's per-flow hooks costs before doing any work.
EMPTY_ADDON = Path(__file__).with_name("bench_empty_addon.py")
CEILING = "empty script addon (not fp-tap: the ceiling)"
SCENARIOS: tuple[Scenario, ...] = (
    Scenario(BASELINE, addon=False),
    Scenario(CEILING, addon=False, script=EMPTY_ADDON),
    Scenario("addon, no sinks"),
    Scenario(
        "addon, no sinks, in-process (fp_worker=false)",
        options={"fp_worker": "false"},
        requires=("fp_worker",),
    ),
    Scenario("addon + JSONL", options={"fp_jsonl": "{out}/events.jsonl"}),
    Scenario(
        "addon + JSONL, trusted not logged",
        options={"fp_jsonl": "{out}/events.jsonl", "fp_log_trusted": "false"},
        requires=("fp_log_trusted",),
    ),
    Scenario(
        "addon + JSONL + SQLite",
        options={"fp_jsonl": "{out}/events.jsonl", "fp_sqlite": "{out}/events.sqlite"},
        requires=("fp_sqlite",),
    ),
    Scenario(
        f"addon + slow webhook ({WEBHOOK_DELAY_MS} ms)",
        options={"fp_webhook_url": "{receiver}", "fp_state_dir": "{out}/state"},
        env={"FP_WEBHOOK_SECRET": WEBHOOK_SECRET},
        requires=("fp_webhook_url",),
        receiver_delay_ms=WEBHOOK_DELAY_MS,
    ),
)


@dataclass
class ScenarioRuns:
    """Everything measured for one scenario, one entry per round."""

    name: str
    #: False for a scenario that runs another addon (no records, no target).
    fp_tap: bool = True
    throughput: list[LoadResult] = field(default_factory=list)
    latency: list[LoadResult] = field(default_factory=list)
    #: mitmdump's CPU time (all threads, user + system) per request at 8 connections.
    cpu_ms: list[float] = field(default_factory=list)
    #: The same for its worker process (fp_worker), 0 without one.
    worker_cpu_ms: list[float] = field(default_factory=list)
    #: The same for the stand-in endpoint (which shares the machine's CPUs).
    endpoint_cpu_ms: list[float] = field(default_factory=list)
    #: The baseline's (throughput, latency) measured next to each of this scenario's.
    paired_base: list[tuple[LoadResult, LoadResult]] = field(default_factory=list)
    addon_summaries: list[dict[str, Any]] = field(default_factory=list)


@dataclass(frozen=True, slots=True)
class ProxyRow:
    """The proxy table: rates at 8 connections, latency at 1, compared with no addon."""

    name: str
    rate: Spread
    vs_baseline: Spread
    cpu_ms: Spread
    worker_cpu_ms: Spread
    endpoint_cpu_ms: Spread
    p50_ms: Spread
    p99_ms: Spread
    p50_delta_ms: Spread
    errors: int
    dropped: int
    written: dict[str, int]
    #: Open responses the addon counted (its shutdown summary), to hold ``written`` to.
    open_responses: int = 0
    #: The addon's own errors and failed sink writes, by kind (its shutdown summary).
    addon_errors: dict[str, int] = field(default_factory=dict)
    #: Each round's ratio to no addon and p50 difference, in round order (only in the
    #: ``--json`` output): two scenarios' samples of one round ran within a minute of
    #: each other, so they can be compared pair by pair, as each is with no addon.
    round_ratios: tuple[float | None, ...] = ()
    round_p50_delta_ms: tuple[float, ...] = ()
    #: False for a scenario that runs another addon than fp-tap (no target).
    fp_tap: bool = True


@dataclass
class ProxyResults:
    loadgen: str
    rows: list[ProxyRow]
    skipped: list[str]
    endpoint_direct: Spread | None
    #: Which stand-in answered (``ENDPOINTS``).
    endpoint: str = "lean"


#: The stand-ins the proxy section can put behind mitmdump. The lean one (the default)
#: answers the benchmark's requests at a fifth of the full one's CPU, which on a
#: two-CPU machine competes with mitmdump and its worker (BENCHMARKS.md, "An eleventh
#: pass"); the full one is how runs before it were made.
ENDPOINTS = {"lean": LEAN_ENDPOINT, "stand-in": ENDPOINT}


class Bench:
    """The shared setup: scratch folder, key file, stand-in endpoint, load generator."""

    def __init__(self, out: Path, endpoint: str = "lean") -> None:
        if endpoint not in ENDPOINTS:
            raise ValueError(f"endpoint must be one of {', '.join(ENDPOINTS)}")
        self.endpoint_name = endpoint
        self.out = out
        out.mkdir(parents=True, exist_ok=True)
        # Services append to their logs and are found by the port they print: a log
        # left by an earlier run would point at a port nobody listens on any more.
        for stale in out.glob("**/*.out"):
            stale.unlink()
        self.key_file = write_key_file(out / "bench.key", DecryptionKey.generate())
        self.loadgen = load_generator(out)
        self.endpoint: Service | None = None

    def __enter__(self) -> Bench:
        self.endpoint = start_endpoint(
            self.out, self.key_file, script=ENDPOINTS[self.endpoint_name]
        )
        return self

    def __exit__(self, *exc: object) -> None:
        if self.endpoint is not None:
            self.endpoint.stop()

    @property
    def upstream(self) -> str:
        assert self.endpoint is not None
        return f"http://127.0.0.1:{self.endpoint.port}"

    def start_proxy(self, scenario: Scenario, receiver: SlowReceiver | None) -> Service:
        folder = self.out / re.sub(r"[^a-z0-9]+", "-", scenario.name.lower()).strip("-")
        # Records, spool and output an earlier run left (with --keep, or killed) would be
        # appended to, counted with this run's, or resent by the webhook at start.
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir()
        places = {"out": str(folder), "receiver": receiver.url if receiver else ""}
        options: dict[str, str | int | bool] = {}
        if scenario.addon:
            options["fp_keys_file"] = str(self.key_file)
        options |= {name: value.format(**places) for name, value in scenario.options.items()}
        config = MitmdumpConfig(
            mode=f"reverse:{self.upstream}",
            options=options,
            addon=scenario.addon,
            env=scenario.env,
            extra_args=("-s", str(scenario.script)) if scenario.script else (),
        )
        return start_mitmdump(folder, config)


def _clear(folder: Path) -> None:
    # Records of a throughput run are hundreds of MB: drop them once counted.
    for pattern in ("events.*", "*.out"):
        for path in folder.glob(pattern):
            path.unlink()


def proxy_overhead(
    bench: Bench,
    rounds: int,
    seconds: int,
    warmup_s: int,
    *,
    pin: bool = False,
    keep: bool = False,
) -> ProxyResults:
    """Section 3: every available scenario against no addon, in adjacent pairs.

    The machine's speed drifts by tens of percent within minutes (a shared VM), so each
    scenario's slice is paired with a slice of the baseline run right before or right
    after it (the order alternating), and every proxy runs for the whole section: a
    ratio compares two measurements a few seconds apart, not two rounds minutes apart.

    With ``pin``, each mitmdump runs alone on the first CPU and everything else (its
    worker, the endpoint, the load generator, the slow receiver) on the others: the
    proxy's event loop as on a machine with a core to spare for the rest. With ``keep``,
    each scenario's records and mitmdump output stay in its folder (hundreds of MB).
    """
    proxy_cpu, other_cpus = split_cpus() if pin else (None, None)
    allowed = os.sched_getaffinity(0)  # given back at the end, for the sections after
    assert bench.endpoint is not None
    endpoint = bench.endpoint.proc.pid
    if other_cpus is not None:
        pin_process(endpoint, other_cpus)
        os.sched_setaffinity(0, other_cpus)  # this process, and what it starts from now on
    active = [s for s in SCENARIOS if s.available()]
    skipped = [s.name for s in SCENARIOS if not s.available()]
    runs = {s.name: ScenarioRuns(s.name, fp_tap=s.fp_tap) for s in active}
    receivers = {s.name: SlowReceiver(s.receiver_delay_ms) for s in active if s.receiver_delay_ms}
    proxies: dict[str, Service] = {}
    direct: list[float] = []
    try:
        for scenario in active:
            proxy = bench.start_proxy(scenario, receivers.get(scenario.name))
            proxies[scenario.name] = proxy
            bench.loadgen.run(_url(proxy), 8, warmup_s)  # imports, caches, first connections
            if proxy_cpu is not None and other_cpus is not None:
                # After the warm-up, which started the worker: mitmdump's threads move to
                # the first CPU (threads it starts later inherit it), its worker away.
                pin_process(proxy.proc.pid, proxy_cpu)
                for child in children(proxy.proc.pid):
                    pin_process(child, other_cpus)
        base = proxies[BASELINE]
        others = [s for s in active if s.name != BASELINE]
        for round_no in range(rounds):
            for scenario in others[round_no % len(others) :] + others[: round_no % len(others)]:
                pair = [(base, runs[BASELINE]), (proxies[scenario.name], runs[scenario.name])]
                if round_no % 2:
                    pair.reverse()
                for proxy, into in pair:
                    _throughput_slice(bench, proxy, into, seconds)
                for proxy, into in pair:
                    into.latency.append(bench.loadgen.run(_url(proxy), 1, seconds))
                runs[scenario.name].paired_base.append(
                    (runs[BASELINE].throughput[-1], runs[BASELINE].latency[-1])
                )
            direct.append(bench.loadgen.run(bench.upstream + "/", 8, seconds).rate)
            print(f"  round {round_no + 1}/{rounds} done", flush=True)
    finally:
        for proxy in proxies.values():
            proxy.stop()
        for receiver in receivers.values():
            receiver.close()
        if other_cpus is not None:
            os.sched_setaffinity(0, allowed)
            pin_process(endpoint, allowed)
    for scenario in active:
        if scenario.name in proxies:
            runs[scenario.name].addon_summaries.append(
                addon_summary(proxies[scenario.name].output())
            )
            if not keep:
                _clear(proxies[scenario.name].log.parent)
    rows = [_row(runs[s.name]) for s in active]
    return ProxyResults(
        bench.loadgen.name,
        rows,
        skipped,
        Spread.of(direct) if direct else None,
        bench.endpoint_name,
    )


def split_cpus() -> tuple[set[int], set[int]]:
    """The first CPU this process may use, and the rest (``RuntimeError`` with fewer than 2)."""
    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) < 2:
        raise RuntimeError(f"pinning needs at least 2 CPUs, this process may use {len(cpus)}")
    return {cpus[0]}, set(cpus[1:])


def pin_process(pid: int, cpus: set[int]) -> None:
    """Move every thread of ``pid`` to ``cpus`` (``sched_setaffinity`` is per thread)."""
    for task in os.listdir(f"/proc/{pid}/task"):
        with contextlib.suppress(ProcessLookupError):  # a thread that just ended
            os.sched_setaffinity(int(task), cpus)


def _url(proxy: Service) -> str:
    return f"http://127.0.0.1:{proxy.port}/"


def _throughput_slice(bench: Bench, proxy: Service, runs: ScenarioRuns, seconds: int) -> None:
    pid = proxy.proc.pid
    assert bench.endpoint is not None
    endpoint = bench.endpoint.proc.pid
    cpu, worker, upstream = cpu_seconds(pid), children_cpu_seconds(pid), cpu_seconds(endpoint)
    result = bench.loadgen.run(_url(proxy), 8, seconds)
    # The writer may still be busy with the last records: count its CPU too.
    time.sleep(0.3)
    per_request = 1000 / result.requests if result.requests else 0.0
    runs.throughput.append(result)
    runs.cpu_ms.append((cpu_seconds(pid) - cpu) * per_request)
    runs.worker_cpu_ms.append((children_cpu_seconds(pid) - worker) * per_request)
    runs.endpoint_cpu_ms.append((cpu_seconds(endpoint) - upstream) * per_request)


def _row(runs: ScenarioRuns) -> ProxyRow:
    rates = [r.rate for r in runs.throughput]
    p50 = [r.p50_ms for r in runs.latency]
    written: dict[str, int] = {}
    addon_errors: dict[str, int] = {}
    for summary in runs.addon_summaries:
        for sink, count in summary.get("written", {}).items():
            written[sink] = written.get(sink, 0) + count
        for group in ("errors", "sink_errors"):
            for kind, count in summary.get(group, {}).items():
                name = f"{group}.{kind}"
                addon_errors[name] = addon_errors.get(name, 0) + count
    base_rates = [b.rate for b, _ in runs.paired_base] or rates
    base_p50 = [b.p50_ms for _, b in runs.paired_base] or p50
    deltas = [a - b for a, b in zip(p50, base_p50, strict=True)]
    # None for a round whose no-addon run got no response: left out of the spread.
    ratios = [a / b if b else None for a, b in zip(rates, base_rates, strict=True)]
    return ProxyRow(
        name=runs.name,
        rate=Spread.of(rates),
        vs_baseline=Spread.of([r for r in ratios if r is not None]),
        cpu_ms=Spread.of(runs.cpu_ms),
        worker_cpu_ms=Spread.of(runs.worker_cpu_ms),
        endpoint_cpu_ms=Spread.of(runs.endpoint_cpu_ms),
        p50_ms=Spread.of(p50),
        p99_ms=Spread.of([r.p99_ms for r in runs.latency]),
        p50_delta_ms=Spread.of(deltas),
        errors=sum(r.errors for r in runs.throughput + runs.latency),
        dropped=sum(int(s.get("dropped", 0)) for s in runs.addon_summaries),
        written=written,
        open_responses=sum(int(s.get("open_responses", 0)) for s in runs.addon_summaries),
        addon_errors=addon_errors,
        round_ratios=tuple(ratios),
        round_p50_delta_ms=tuple(deltas),
        fp_tap=runs.fp_tap,
    )


def cpu_seconds(pid: int) -> float:
    """CPU time a process has used so far (user + system, all threads)."""
    # /proc/<pid>/stat: fields 14 and 15 (utime, stime) after the ")" ending the name.
    fields = Path(f"/proc/{pid}/stat").read_text(encoding="ascii").rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def children_cpu_seconds(pid: int) -> float:
    """CPU time the live children of ``pid`` have used so far."""
    return sum(cpu_seconds(child) for child in children(pid))


def tree_rss_mb(pid: int) -> float:
    """RSS of ``pid`` and its children together (mitmdump and its worker)."""
    return rss_mb(pid) + sum(rss_mb(child) for child in children(pid))


def rss_mb(pid: int) -> float:
    """Resident set size of a process, in MiB, from ``/proc/<pid>/status``."""
    status = Path(f"/proc/{pid}/status").read_text(encoding="ascii")
    match = re.search(r"^VmRSS:\s+(\d+) kB", status, re.MULTILINE)
    if match is None:
        raise RuntimeError(f"no VmRSS for pid {pid}")
    return int(match.group(1)) / 1024


@dataclass
class MemoryResults:
    scenario: str
    baseline_mb: float
    warmup: int
    #: (open responses so far, RSS in MiB of mitmdump and its worker together)
    checkpoints: list[tuple[int, float]]
    #: The worker's share at each checkpoint (MiB).
    worker_mb: list[float]
    errors: int
    dropped: int
    replay_cache_mb: float


def memory(bench: Bench, checkpoints: Sequence[int], warmup: int) -> MemoryResults:
    """Section 4: RSS of one mitmdump (addon + JSONL), its worker process included, as
    open responses pile up."""
    scenario = next(s for s in SCENARIOS if s.name == "addon + JSONL")
    proxy = bench.start_proxy(scenario, None)
    points: list[tuple[int, float]] = []
    errors = 0
    try:
        url = f"http://127.0.0.1:{proxy.port}/"
        errors += bench.loadgen.run(url, 8, 600, limit=warmup).errors
        time.sleep(1)  # let the writer drain before the baseline
        baseline = tree_rss_mb(proxy.proc.pid)
        sent = warmup
        worker: list[float] = []
        for target in checkpoints:
            result = bench.loadgen.run(url, 8, 1200, limit=target - sent)
            sent += result.requests
            errors += result.errors
            time.sleep(1)
            points.append((sent, tree_rss_mb(proxy.proc.pid)))
            worker.append(points[-1][1] - rss_mb(proxy.proc.pid))
            print(f"  {sent:,} open responses: RSS {points[-1][1]:.1f} MiB", flush=True)
    finally:
        proxy.stop()
    summary = addon_summary(proxy.output())
    _clear(proxy.log.parent)
    return MemoryResults(
        scenario=scenario.name,
        baseline_mb=baseline,
        warmup=warmup,
        checkpoints=points,
        worker_mb=worker,
        errors=errors,
        dropped=int(summary.get("dropped", 0)),
        replay_cache_mb=replay_cache_mb(max(checkpoints)),
    )


def replay_cache_mb(ids: int) -> float:
    """What the replay memory holds at ``ids`` request ids (it keeps at most 100,000)."""
    import tracemalloc

    tracemalloc.start()
    cache = ReplayCache(3600, 100_000)
    now = time.time()
    for i in range(ids):
        cache.check_and_add(f"{1795730334960 + i}.{i % 1_000_000:06d}", now)
    size = tracemalloc.get_traced_memory()[0]
    tracemalloc.stop()
    return size / 2**20
