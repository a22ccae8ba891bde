"""fp_addon with its worker process (the default), on a real asyncio event loop.

test_addon.py covers the hooks in-process (``fp_worker=false``), where a hook's effects
are there when it returns. Here the answer comes back through the loop a moment later,
or before the hook's awaitable completes when the response is held.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import logging
import os
import signal
import threading
import time
from collections.abc import AsyncIterator, Callable, Coroutine, Iterator
from pathlib import Path
from typing import Any

import pytest
from mitmproxy import exceptions, http, optmanager
from mitmproxy.addons import save
from mitmproxy.log import LogEntry
from mitmproxy.test import taddons

import fp_addon
from fp_core import worker as worker_module
from fp_core.keys import ENV_VAR
from fp_core.webhook import SECRET_ENV_VAR
from fp_core.worker import WorkerClient
from tests.e2e.conftest import secret_forms
from tests.test_addon import KEY, fp_body, hostile_bodies, interactive, make_flow, state
from tests.test_addon import run as run_through


async def until(condition: Callable[[], object], what: str, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.01)


def on_loop[**P](test: Callable[P, Coroutine[Any, Any, None]]) -> Callable[P, None]:
    """Run an async test function on a fresh event loop (pytest itself runs only plain
    functions, and the project does without pytest-asyncio)."""

    @functools.wraps(test)
    def run(*args: P.args, **kwargs: P.kwargs) -> None:
        asyncio.run(test(*args, **kwargs))

    return run


async def started(tap: fp_addon.FingerprintTap) -> None:
    """mitmproxy's ``running`` hook, then the wait for what it starts off the event loop:
    the worker put off until then (or, when it cannot start, work in this process)."""
    tap.running()
    await until(lambda: tap.worker is not None or tap.pipeline is not None, "the worker")


async def annotated(tap: fp_addon.FingerprintTap, flow: http.HTTPFlow) -> None:
    """Hand ``flow`` to the response hook, which must hold it (``fp_hold``), and wait
    until its annotation is there."""
    held = tap.response(flow)
    assert held is not None, "a held response"
    await asyncio.wait_for(held, 30)


def running_worker(tap: fp_addon.FingerprintTap) -> bool:
    """Whether a worker process runs (a call: the hooks change it behind mypy's back)."""
    return tap.worker is not None


def holding(tap: fp_addon.FingerprintTap) -> bool:
    return tap.hold


def worker_of(tap: fp_addon.FingerprintTap) -> WorkerClient:
    """The tap's worker, whose process runs."""
    worker = tap.worker
    assert worker is not None
    assert worker.proc is not None
    return worker


@on_loop
async def test_the_answer_reaches_the_flow_after_the_hook_returns(
    keyfile: Path, tmp_path: Path
) -> None:
    out = tmp_path / "out.jsonl"
    with tap_with(keyfile, fp_jsonl=str(out)) as (tap, _tctx):
        assert tap.worker is not None, "outputs configured: the worker runs already"
        assert tap.pipeline is None
        flows = [make_flow(fp_body()[0]), make_flow(hostile_bodies()["decrypt_failed"])]
        before = [state(f) for f in flows]
        assert [tap.response(f) for f in flows] == [None, None], "nothing to wait for"
        await until(lambda: all("fp" in f.metadata for f in flows), "the annotations")
        assert [state(f) for f in flows] == before, "only fp metadata, comment, mark"
        good, bad = flows
        assert good.metadata["fp"]["verdict"] == "trusted"
        assert good.comment.startswith("fp trusted")
        assert bad.metadata["fp"]["error"]["kind"] == "decrypt_failed"
        assert bad.marked == fp_addon.MARK_ERROR
        await until(lambda: json.loads(tap.stats_command()).get("open_responses"), "counts")
        stats = json.loads(tap.stats_command())
        assert (stats["responses"], stats["open_responses"], stats["unsealed"]) == (2, 2, 1)
        assert stats["errors"] == {"decrypt_failed": 1}
        tap.done()
        assert json.loads(tap.stats_command())["written"] == {"jsonl": 2}
    assert len(out.read_text().splitlines()) == 2


@on_loop
async def test_a_held_response_waits_for_its_annotation(keyfile: Path) -> None:
    with tap_with(keyfile, fp_hold=True) as (tap, _tctx):
        await started(tap)
        flow = make_flow(fp_body()[0])
        held = tap.response(flow)
        assert held is not None
        assert "fp" not in flow.metadata, "not before the answer"
        await asyncio.wait_for(held, 30)
        assert flow.metadata["fp"]["verdict"] == "trusted", "there once the wait is over"
        assert tap.response(make_flow(b"<html></html>")) is None, "ordinary traffic"
        tap.done()


@pytest.mark.parametrize("let_go_by", ["shutdown", "fp_worker off"])
@on_loop
async def test_a_held_response_a_dead_worker_never_answered_is_let_go_and_counted(
    keyfile: Path, caplog: pytest.LogCaptureFixture, let_go_by: str
) -> None:
    """The worker stops answering (stopped, then killed) and, before the event loop hears
    of its exit, mitmproxy shuts down or an option change stops it: the held response
    goes on, counted as dropped (never inspected), rather than waiting for ever."""
    with tap_with(keyfile, fp_hold=True, fp_drain_timeout=0) as (tap, tctx):
        await started(tap)
        pid = worker_of(tap).proc.pid
        os.kill(pid, signal.SIGSTOP)  # it cannot answer what comes now
        held = tap.response(make_flow(fp_body()[0]))
        assert held is not None
        kill_unnoticed(pid)
        if let_go_by == "fp_worker off":
            tctx.configure(tap, fp_worker=False)
            assert held.done(), "let go by the option change"
        tap.done()
        assert held.done(), "let go"
        stats: dict[str, Any] = json.loads(tap.stats_command())
        assert (stats["responses"], stats["dropped"]) == (1, 1)
        assert "open_responses" not in stats
        assert stats["errors"] == {"worker_exit": 1}
    assert "the worker process stopped (exit code -9) while writing out" in caplog.text


@on_loop
async def test_an_answer_that_cannot_be_shown_still_releases_its_held_response(
    keyfile: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A failure while annotating one answer must neither hold its response forever
    nor stop the answers after it in the same batch."""
    with tap_with(keyfile, fp_hold=True) as (tap, _tctx):
        await started(tap)
        broken, fine = make_flow(fp_body()[0]), make_flow(fp_body()[0])
        annotate = fp_addon._annotate

        def failing(flow: http.HTTPFlow, record: dict[str, Any]) -> None:
            if flow is broken:
                raise TypeError("a record the annotation cannot take")
            annotate(flow, record)

        monkeypatch.setattr(fp_addon, "_annotate", failing)
        loop = asyncio.get_running_loop()
        helds = [loop.create_future(), loop.create_future()]
        record = {"verdict": "trusted", "ok": True}
        tap._on_records([((broken, helds[0], True), record), ((fine, helds[1], True), None)])
        assert [h.done() for h in helds] == [True, True]
        assert tap.stats.group("errors") == {"internal": 1}
        # And end to end: the worker's answers for two held flows, the first broken.
        broken = make_flow(fp_body()[0])
        waits = [tap.response(broken), tap.response(fine := make_flow(fp_body()[0]))]
        assert all(w is not None for w in waits)
        await asyncio.wait_for(asyncio.gather(*[w for w in waits if w is not None]), 30)
        assert "fp" in fine.metadata
        tap.done()


@on_loop
async def test_saving_flows_holds_responses(tmp_path: Path) -> None:
    tap = fp_addon.FingerprintTap()
    with taddons.context(save.Save(), tap) as tctx:
        assert not holding(tap)
        tctx.configure(tap, save_stream_file=str(tmp_path / "flows"))
        assert holding(tap), "-w writes flows in the hook after fp-tap's"
        tctx.configure(tap, save_stream_file=None)
        assert not holding(tap)


@pytest.mark.parametrize("hold", [True, False], ids=["held", "not-held"])
@on_loop
async def test_without_outputs_the_worker_starts_with_mitmproxy_off_the_event_loop(
    keyfile: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture, hold: bool
) -> None:
    """mitmproxy listens before its running hook: the worker, which takes 100-200 ms to
    start, is started in a thread, and responses that come meanwhile wait for it."""
    caplog.set_level(logging.INFO, logger="fp_addon")
    threads: list[str] = []
    start = WorkerClient.start

    def recorded(worker: WorkerClient) -> None:
        threads.append(threading.current_thread().name)
        start(worker)

    monkeypatch.setattr(WorkerClient, "start", recorded)
    with tap_with(keyfile, fp_hold=hold) as (tap, _tctx):
        assert not running_worker(tap), "no process for an option check"
        tap.running()
        assert not running_worker(tap), "running() returned before the worker answered"
        early = make_flow(fp_body()[0])
        held = tap.response(early)
        assert (held is not None) == hold
        assert "fp" not in early.metadata
        await until(lambda: running_worker(tap), "the worker")
        assert threads == ["fp-tap-replace"], "started off the event loop, once"
        assert tap.pipeline is None
        if held is not None:
            await asyncio.wait_for(held, 30)
        await until(lambda: "fp" in early.metadata, "the early response's annotation")
        assert early.metadata["fp"]["verdict"] == "trusted"
        stats: dict[str, Any] = json.loads(tap.stats_command())
        assert "restarted" not in stats, "a first start, not a restart"
        assert "dropped" not in stats
        tap.done()
    assert "new worker" not in caplog.text


@pytest.mark.parametrize(
    "option",
    [
        "fp_sqlite_keep",
        "fp_secrets_reload",
        "fp_stats_every",
        "fp_worker_restart",
        "fp_webhook_keep_parked",
    ],
)
@on_loop
async def test_a_negative_value_is_refused_before_a_worker_could_refuse_it(
    keyfile: Path, option: str
) -> None:
    """No output set: the worker starts later, where a refusal reaches no one (and the
    in-process fallback would refuse the same value, leaving nothing to inspect)."""
    with tap_with(keyfile) as (tap, tctx):
        with pytest.raises(exceptions.OptionsError, match=f"{option} cannot be negative"):
            tctx.configure(tap, **{option: -1})
        await started(tap)
        assert running_worker(tap), "with the options rolled back, the worker runs"
        tap.done()


@on_loop
async def test_what_a_killed_worker_answered_stays_counted(keyfile: Path, tmp_path: Path) -> None:
    """It reports its counters every 0.1 s at most: the answers after its last report are
    counted here, as it counted them."""
    out = tmp_path / "out.jsonl"
    with tap_with(keyfile, fp_jsonl=str(out), fp_hold=True) as (tap, _tctx):
        await started(tap)
        worker = worker_of(tap)
        await asyncio.sleep(0.3)  # idle: its counters are reported
        flows = [make_flow(fp_body()[0]), make_flow(fp_body(bot="bad")[0])]
        held = [tap.response(flow) for flow in flows]
        assert None not in held, "held: fp_hold"
        await asyncio.wait_for(asyncio.gather(*[h for h in held if h is not None]), 30)
        os.kill(worker.proc.pid, signal.SIGKILL)  # at once: no report after the answers
        await until(lambda: tap.pipeline is not None, "in-process work")
        stats: dict[str, Any] = json.loads(tap.stats_command())
        tap.done()
    assert [f.metadata["fp"]["verdict"] for f in flows] == ["trusted", "suspicious"]
    assert (stats["open_responses"], stats["unsealed"]) == (2, 2), stats
    assert stats["verdicts"] == {"trusted": 1, "suspicious": 1}
    assert stats["reasons"] == {"bad_bot": 1}


@on_loop
async def test_a_dead_worker_is_replaced_by_in_process_work(
    keyfile: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with tap_with(keyfile, fp_hold=True) as (tap, _tctx):
        await started(tap)
        await annotated(tap, make_flow(fp_body()[0]))
        worker = worker_of(tap)
        await until(lambda: worker.stats.get("open_responses") == 1, "its counters")
        os.kill(worker.proc.pid, signal.SIGKILL)
        # Made off the event loop: the pipeline comes a moment after the worker went.
        await until(lambda: tap.pipeline is not None, "the switch to in-process work")
        assert tap.worker is None, "it ran less than fp_worker_restart: no new one"
        assert "it ran less than 60 s: unsealing in mitmproxy's process from now on" in (
            caplog.text
        )
        second = make_flow(fp_body()[0])
        assert tap.response(second) is None
        assert second.metadata["fp"]["verdict"] == "trusted", "inspected right away"
        stats: dict[str, Any] = json.loads(tap.stats_command())
        assert stats["errors"] == {"worker_exit": 1}
        assert "restarted" not in stats
        assert (stats["open_responses"], stats["unsealed"]) == (2, 2), "nothing forgotten"
        tap.done()


@on_loop
async def test_a_worker_that_dies_after_running_long_enough_is_restarted(
    keyfile: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="fp_addon")
    out = tmp_path / "out.jsonl"
    with tap_with(keyfile, fp_jsonl=str(out), fp_worker_restart=1) as (tap, _tctx):
        await started(tap)
        first = worker_of(tap)
        tap.response(make_flow(fp_body()[0]))
        await until(lambda: not first.in_flight, "the first answer")
        await asyncio.sleep(1.1)  # it has run fp_worker_restart seconds
        os.kill(first.proc.pid, signal.SIGKILL)
        await until(lambda: tap.worker not in (None, first), "a new worker")
        second = worker_of(tap)
        assert second.proc.pid != first.proc.pid
        assert tap.pipeline is None, "the work stays out of mitmproxy's process"
        flow = make_flow(fp_body()[0])
        tap.response(flow)
        await until(lambda: "fp" in flow.metadata, "the new worker's answer")
        assert flow.metadata["fp"]["verdict"] == "trusted"
        stats: dict[str, Any] = json.loads(tap.stats_command())
        assert stats["errors"] == {"worker_exit": 1}
        assert stats["restarted"] == {"worker": 1}
        tap.done()
        stats = json.loads(tap.stats_command())
        assert (stats["open_responses"], stats["written"]) == (2, {"jsonl": 2})
    assert "starting a new one" in caplog.text
    assert "fp-tap: a new worker process runs" in caplog.text
    assert len(out.read_text().splitlines()) == 2, "the new worker appends to the same file"


@on_loop
async def test_a_new_worker_that_dies_at_once_gives_way_to_in_process_work(
    keyfile: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A crash loop: the replacement dies before fp_worker_restart seconds, so the next
    replacement is a pipeline in mitmproxy's process."""
    with tap_with(keyfile, fp_worker_restart=1) as (tap, _tctx):
        await started(tap)
        first = worker_of(tap)
        await asyncio.sleep(1.1)
        os.kill(first.proc.pid, signal.SIGKILL)
        await until(lambda: tap.worker not in (None, first), "a new worker")
        os.kill(worker_of(tap).proc.pid, signal.SIGKILL)
        await until(lambda: tap.pipeline is not None, "the switch to in-process work")
        assert tap.worker is None
        flow = run_through(tap, make_flow(fp_body()[0]))
        assert flow.metadata["fp"]["verdict"] == "trusted"
        stats: dict[str, Any] = json.loads(tap.stats_command())
        assert stats["errors"] == {"worker_exit": 2}
        assert stats["restarted"] == {"worker": 1}
        tap.done()
    assert "it ran less than 1 s: unsealing in mitmproxy's process" in caplog.text


@contextlib.contextmanager
def tap_with(
    keyfile: Path, **options: Any
) -> Iterator[tuple[fp_addon.FingerprintTap, taddons.context]]:
    """The addon, configured with the key file and ``options``, in mitmproxy's test
    master."""
    tap = fp_addon.FingerprintTap()
    with taddons.context(tap) as tctx:
        tctx.configure(tap, fp_keys_file=str(keyfile), **options)
        yield tap, tctx


class Gate:
    """Holds the making of a dead worker's replacement until the test opens it, and
    says on which thread it was made."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.open = threading.Event()
        self.threads: list[threading.Thread] = []
        self.made: list[Any] = []
        make = fp_addon._in_process_pipeline

        def held(*args: Any) -> Any:
            self.threads.append(threading.current_thread())
            assert self.open.wait(30), "the test never opened the gate"
            self.made.append(make(*args))
            return self.made[-1]

        monkeypatch.setattr(fp_addon, "_in_process_pipeline", held)

    @contextlib.asynccontextmanager
    async def replacing(
        self, keyfile: Path, **options: Any
    ) -> AsyncIterator[tuple[fp_addon.FingerprintTap, Any]]:
        """A tap running with ``options`` whose worker was just killed: its replacement
        is being made, and held here until :attr:`open` is set."""
        with tap_with(keyfile, **options) as (tap, tctx):
            await started(tap)
            await self.kill_worker(tap)
            yield tap, tctx

    async def kill_worker(self, tap: fp_addon.FingerprintTap) -> None:
        """Kill the tap's worker; return once its replacement is being made (and held)."""
        os.kill(worker_of(tap).proc.pid, signal.SIGKILL)
        await until(lambda: self.threads, "the replacement being made")


@pytest.mark.parametrize("hold", [True, False], ids=["held", "not-held"])
@on_loop
async def test_responses_wait_for_the_replacement_off_the_event_loop(
    keyfile: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, hold: bool
) -> None:
    out = tmp_path / "out.jsonl"
    gate = Gate(monkeypatch)
    async with gate.replacing(keyfile, fp_jsonl=str(out), fp_hold=hold) as (tap, _tctx):
        assert gate.threads[0] is not threading.main_thread(), "not on the event loop"
        flows = [make_flow(fp_body()[0]) for _ in range(3)]
        awaitables = [tap.response(flow) for flow in flows]
        assert all((a is not None) == hold for a in awaitables)
        await asyncio.sleep(0.05)  # the event loop turns meanwhile
        assert not any("fp" in flow.metadata for flow in flows), "they wait"
        gate.open.set()
        if hold:
            await asyncio.wait_for(asyncio.gather(*[a for a in awaitables if a]), 30)
        else:
            await until(lambda: all("fp" in f.metadata for f in flows), "their records")
        assert all(f.metadata["fp"]["verdict"] == "trusted" for f in flows)
        assert tap.pipeline is not None
        tap.done()
        stats: dict[str, Any] = json.loads(tap.stats_command())
        assert (stats["open_responses"], stats["written"]) == (3, {"jsonl": 3})
        assert stats.get("dropped", 0) == 0
    assert len(out.read_text().splitlines()) == 3


@pytest.mark.parametrize("settled_by", ["shutdown", "an option change"])
@on_loop
async def test_a_replacement_being_made_is_waited_for_with_its_waiting_response(
    keyfile: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, settled_by: str
) -> None:
    out = tmp_path / "out.jsonl"
    gate = Gate(monkeypatch)
    async with gate.replacing(keyfile, fp_jsonl=str(out)) as (tap, tctx):
        flow = make_flow(fp_body()[0])
        assert tap.response(flow) is None
        threading.Timer(0.2, gate.open.set).start()
        if settled_by == "shutdown":
            tap.done()  # blocks until the replacement is made, then writes the record
            expected = 1
        else:
            # A change of fp-tap's options waits for the replacement, then applies to it:
            # in this process (the worker ran less than fp_worker_restart seconds).
            tctx.configure(tap, fp_queue_size=500)
            assert tap.worker is None
            assert tap.pipeline is gate.made[0]
            assert tap.queue_size == 500
            later = run_through(tap, make_flow(fp_body()[0]))
            assert later.metadata["fp"]["verdict"] == "trusted"
            tap.done()
            expected = 2
        assert flow.metadata["fp"]["verdict"] == "trusted", "the waiting response"
        stats: dict[str, Any] = json.loads(tap.stats_command())
        assert (stats["open_responses"], stats["written"]) == (expected, {"jsonl": expected})
    assert len(out.read_text().splitlines()) == expected


@on_loop
async def test_switching_fp_worker_off_and_on(keyfile: Path, tmp_path: Path) -> None:
    out = tmp_path / "out.jsonl"
    with tap_with(keyfile, fp_jsonl=str(out)) as (tap, tctx):
        tap.response(make_flow(fp_body()[0]))
        await until(lambda: tap.worker is not None and not tap.worker.in_flight, "answer")
        tctx.configure(tap, fp_worker=False)
        assert tap.worker is None
        assert tap.pipeline is not None
        flow = make_flow(fp_body()[0])
        tap.response(flow)
        assert "fp" in flow.metadata
        tctx.configure(tap, fp_worker=True)
        assert running_worker(tap)
        tap.response(make_flow(fp_body()[0]))
        tap.done()
        stats = json.loads(tap.stats_command())
        assert (stats["open_responses"], stats["written"]) == (3, {"jsonl": 3})
    assert len(out.read_text().splitlines()) == 3


@on_loop
async def test_record_lines_skip_the_deprecated_add_log_event(
    keyfile: Path, caplog: pytest.LogCaptureFixture
) -> None:
    class Probe:
        def __init__(self) -> None:
            self.entries: list[str] = []

        def add_log(self, entry: LogEntry) -> None:
            self.entries.append(entry.msg)

    caplog.set_level(logging.INFO)
    probe, tap = Probe(), fp_addon.FingerprintTap()
    with taddons.context(probe, tap) as tctx:
        tctx.configure(tap, fp_keys_file=str(keyfile), fp_hold=True)
        await started(tap)
        await annotated(tap, make_flow(fp_body()[0]))
        logging.getLogger("fp_addon").info("fp-tap: another line")
        await until(lambda: any("another" in e for e in probe.entries), "add_log events")
        tap.done()
    assert any(" trusted visitor=" in r.getMessage() for r in caplog.records), "logged"
    assert not any("visitor=" in e for e in probe.entries)


@pytest.mark.parametrize(
    ("command", "done", "counter"),
    [("resend", "queued again", "resent"), ("discard", "deleted", "discarded")],
)
@on_loop
async def test_spool_commands_reach_the_worker(
    keyfile: Path,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
    command: str,
    done: str,
    counter: str,
) -> None:
    caplog.set_level(logging.INFO)
    with tap_with(
        keyfile,
        fp_webhook_url="http://127.0.0.1:9/nobody-listens",
        fp_state_dir=str(tmp_path / "state"),
        fp_webhook_retry_ms=10,
        fp_webhook_retry_max=1,
        fp_webhook_give_up=1,
    ) as (tap, _tctx):
        worker = worker_of(tap)
        tap.response(make_flow(fp_body()[0]))
        await until(lambda: worker.stats.get("webhook_parked") == 1, "a parked event", 60)
        getattr(tap, f"{command}_command")()
        await until(lambda: f"fp.{command}: 1 parked webhook event(s) {done}" in caplog.text, "it")
        await until(lambda: json.loads(tap.stats_command())["webhook"].get(counter) == 1, "count")
        if command == "discard":
            await until(lambda: json.loads(tap.stats_command())["webhook_parked"] == 0, "gone")
        tap.done()


@on_loop
async def test_a_worker_too_far_behind_costs_inspections_not_the_proxy(
    keyfile: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with tap_with(keyfile, fp_queue_size=2) as (tap, _tctx):
        await started(tap)
        worker = worker_of(tap)
        os.kill(worker.proc.pid, signal.SIGSTOP)
        try:
            flows = [make_flow(fp_body()[0]) for _ in range(5)]
            assert [tap.response(f) for f in flows] == [None] * 5
        finally:
            os.kill(worker.proc.pid, signal.SIGCONT)
        await until(lambda: not worker.in_flight, "the two it took")
        assert ["fp" in f.metadata for f in flows] == [True, True, False, False, False]
        assert json.loads(tap.stats_command())["dropped"] == 3
        assert caplog.text.count("the worker process takes no more responses") == 1
        tap.done()


@on_loop
async def test_no_secret_goes_through_the_pipe(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Keys, the webhook secret and the proxy secret stay out of every frame the addon
    sends its worker; the worker still unseals and signs (it reads them itself)."""
    webhook_secret, proxy_secret = "webhook-secret-5e1f0a", "proxy-secret-77c2d9"
    monkeypatch.setenv(ENV_VAR, KEY.to_base64())
    monkeypatch.setenv(SECRET_ENV_VAR, webhook_secret)
    sent: list[bytes] = []
    encode = worker_module.encode

    def spy(message: tuple[Any, ...]) -> bytes:
        sent.append(frame := encode(message))
        return frame

    monkeypatch.setattr(worker_module, "encode", spy)
    tap = fp_addon.FingerprintTap()
    with taddons.context(tap) as tctx:
        tctx.configure(
            tap,
            fp_webhook_url="http://127.0.0.1:9/hook",
            fp_state_dir=str(tmp_path / "state"),
            fp_hold=True,
        )
        flow = make_flow(
            fp_body()[0], request_headers=[(b"FPJS-Proxy-Secret", proxy_secret.encode())]
        )
        await annotated(tap, flow)
        assert flow.metadata["fp"]["key_id"] == KEY.key_id, "the worker had the key"
        tap.done()
    assert any(b"inspect" in frame for frame in sent)
    forms = [*secret_forms(KEY.raw()), *secret_forms(webhook_secret.encode())]
    forms += secret_forms(proxy_secret.encode())
    assert not [form for form in forms for frame in sent if form in frame]


@on_loop
async def test_what_the_pipe_cannot_take_goes_when_the_event_loop_says_it_can(
    keyfile: Path,
) -> None:
    bodies = [fp_body(pad_to=600_000)[0] for _ in range(6)]  # ~180 KB each, sealed
    with tap_with(keyfile) as (tap, _tctx):
        await started(tap)
        worker = worker_of(tap)
        os.kill(worker.proc.pid, signal.SIGSTOP)
        try:
            flows = [make_flow(body) for body in bodies]
            assert [tap.response(f) for f in flows] == [None] * 6, "the hooks return at once"
            assert worker._backlog, "more than the pipe holds waits in memory"
        finally:
            os.kill(worker.proc.pid, signal.SIGCONT)
        await until(lambda: all("fp" in f.metadata for f in flows), "every annotation", 60)
        assert not worker._backlog
        assert [f.metadata["fp"]["verdict"] for f in flows] == ["trusted"] * 6
        tap.done()


@on_loop
async def test_a_replacement_that_hangs_is_given_up_at_shutdown_and_retired_later(
    keyfile: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    gate = Gate(monkeypatch)
    monkeypatch.setattr(fp_addon, "REPLACEMENT_TIMEOUT", 0.2)
    async with gate.replacing(keyfile, fp_hold=True) as (tap, _tctx):
        held = tap.response(make_flow(fp_body()[0]))
        assert held is not None
        tap.done()
        assert held.done(), "released, not left hanging"
        assert "gave up waiting for the worker process's replacement" in caplog.text
        stats: dict[str, Any] = json.loads(tap.stats_command())
        assert stats["dropped"] == 1
        gate.open.set()
        await until(lambda: gate.made and gate.made[0]._closed, "made at last, retired unused")
        assert tap.pipeline is None


@on_loop
async def test_other_options_changed_during_a_replacement_leave_it_off_the_loop(
    keyfile: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """mitmproxy calls every addon's configure for its own options too: such a change
    neither waits for the replacement nor throws it away for a worker started there."""
    gate = Gate(monkeypatch)
    monkeypatch.setattr(fp_addon, "REPLACEMENT_TIMEOUT", 0.3)  # a wait would give up
    async with gate.replacing(keyfile, fp_jsonl=str(tmp_path / "o.jsonl")) as (tap, tctx):
        tctx.configure(tap, websocket=False)  # mitmproxy's own option
        assert tap._replacing is not None, "still being made: not waited for"
        assert (tap.worker, tap.pipeline) == (None, None)
        gate.open.set()
        await until(lambda: tap.pipeline is not None, "the replacement in use")
        assert tap.pipeline is gate.made[0]
        assert tap.worker is None, "no worker against the crash-loop rule"
        tap.done()


@on_loop
async def test_a_new_worker_that_cannot_get_its_pipes_gives_way_to_in_process_work(
    keyfile: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    real_pipe = os.pipe

    def pipe() -> tuple[int, int]:
        if threading.current_thread().name == "fp-tap-replace":
            raise OSError(24, "Too many open files")
        return real_pipe()

    with tap_with(keyfile, fp_worker_restart=1) as (tap, _tctx):
        await started(tap)
        first = worker_of(tap)
        await asyncio.sleep(1.1)
        monkeypatch.setattr(os, "pipe", pipe)
        os.kill(first.proc.pid, signal.SIGKILL)
        await until(lambda: tap.pipeline is not None, "the switch to in-process work")
        monkeypatch.setattr(os, "pipe", real_pipe)
        assert tap.worker is None
        flow = run_through(tap, make_flow(fp_body()[0]))
        assert flow.metadata["fp"]["verdict"] == "trusted"
        tap.done()
        stats: dict[str, Any] = json.loads(tap.stats_command())
        assert stats.get("dropped", 0) == 0
        assert stats["errors"] == {"worker_exit": 1}
    assert "cannot start the worker process: Too many open files; unsealing in" in caplog.text


def test_a_replacement_given_up_at_shutdown_is_closed_once_made_after_the_loop_closed(
    keyfile: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """mitmproxy closes its event loop right after done(): a replacement done() gave up
    on is closed by the thread that made it."""
    gate = Gate(monkeypatch)
    monkeypatch.setattr(fp_addon, "REPLACEMENT_TIMEOUT", 0.2)

    async def mitmproxy_run() -> None:
        async with gate.replacing(keyfile, fp_jsonl=str(tmp_path / "o.jsonl")) as (tap, _tctx):
            tap.done()  # gives up after REPLACEMENT_TIMEOUT

    asyncio.run(mitmproxy_run())
    gate.open.set()
    deadline = time.monotonic() + 30
    while not (gate.made and gate.made[0]._closed):
        assert time.monotonic() < deadline, "the late replacement was never closed"
        time.sleep(0.02)


@on_loop
async def test_fp_resend_during_a_replacement_says_to_try_again(
    keyfile: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    gate = Gate(monkeypatch)
    monkeypatch.setenv(SECRET_ENV_VAR, "resend-secret")
    webhook = {"fp_webhook_url": "http://127.0.0.1:9/", "fp_state_dir": str(tmp_path / "state")}
    with tap_with(keyfile, **webhook) as (tap, _tctx):
        await started(tap)
        await gate.kill_worker(tap)
        with pytest.raises(exceptions.CommandError, match="being replaced; try again"):
            tap.resend_command()
        gate.open.set()
        await until(lambda: tap.pipeline is not None, "the replacement in use")
        tap.resend_command()  # now it goes through
        tap.done()


@pytest.mark.parametrize("change", ["accepted", "refused"])
@on_loop
async def test_an_option_change_that_gives_up_on_a_replacement_starts_one_afresh(
    keyfile: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, change: str
) -> None:
    """It takes the responses that waited for the replacement, and those after. A
    refused change leaves them to mitmproxy's rollback, which starts one afresh."""
    gate = Gate(monkeypatch)
    monkeypatch.setattr(fp_addon, "REPLACEMENT_TIMEOUT", 0.2)
    out = tmp_path / "o.jsonl"
    async with gate.replacing(keyfile, fp_jsonl=str(out), fp_hold=True) as (tap, tctx):
        early = make_flow(fp_body()[0])
        held = tap.response(early)
        assert held is not None
        if change == "accepted":
            tctx.configure(tap, fp_max_age=20)  # after giving up on the replacement
        else:
            with pytest.raises(exceptions.OptionsError):
                tctx.options.update(fp_jsonl=str(tmp_path / "no" / "such" / "dir.jsonl"))
            assert tctx.options.fp_jsonl == str(out), "rolled back"
        assert (tap.worker, tap.pipeline) != (None, None), "something inspects"
        await asyncio.wait_for(held, 30)
        assert early.metadata["fp"]["verdict"] == "trusted", "inspected by the new one"
        gate.open.set()
        await until(lambda: gate.made and gate.made[0]._closed, "the late one retired")
        assert tap.worker is not None or tap.pipeline is not gate.made[0]
        await annotated(tap, make_flow(fp_body()[0]))
        tap.done()
        stats: dict[str, Any] = json.loads(tap.stats_command())
        assert stats.get("dropped", 0) == 0
        assert stats["written"] == {"jsonl": 2}


def kill_unnoticed(pid: int) -> None:
    """SIGKILL the worker ``pid`` and wait (blocking: the event loop does not run) until
    it is dead, so that the addon has not heard of it yet."""
    os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + 10
    while Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] not in ("Z", "X"):
        assert time.monotonic() < deadline, "the worker did not die"
        time.sleep(0.01)


@on_loop
async def test_a_worker_death_during_a_refused_option_change_leaves_the_old_options_running(
    keyfile: Path, tmp_path: Path
) -> None:
    good = tmp_path / "o.jsonl"
    with tap_with(keyfile, fp_jsonl=str(good)) as (tap, tctx):
        await started(tap)
        worker = worker_of(tap)
        kill_unnoticed(worker.proc.pid)
        with pytest.raises(exceptions.OptionsError):
            # As mitmproxy's set command does: one update, rolled back once when refused.
            tctx.options.update(fp_jsonl=str(tmp_path / "no" / "such" / "dir.jsonl"))
        assert tctx.options.fp_jsonl == str(good), "rolled back"
        await until(lambda: tap._replacing is None, "the replacement settled")
        assert (tap.worker, tap.pipeline) != (None, None), "the rolled-back options run"
        flow = make_flow(fp_body()[0])
        tap.response(flow)
        await until(lambda: "fp" in flow.metadata, "the annotation")
        tap.done()
    assert len(good.read_text().splitlines()) == 1


@on_loop
async def test_a_worker_that_dies_while_writing_out_at_shutdown_is_an_error_and_counted(
    keyfile: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Killed 1 s into the drain (its delivery hanging on a receiver that never answers):
    only a WARNING, and no errors.worker_exit in the summary (found by a worker hunt)."""
    import socket

    silent = socket.create_server(("127.0.0.1", 0))  # accepts, never answers
    url = f"http://127.0.0.1:{silent.getsockname()[1]}/hook"
    try:
        with tap_with(
            keyfile,
            fp_webhook_url=url,
            fp_state_dir=str(tmp_path / "state"),
            fp_drain_timeout=20,
            fp_hold=True,
        ) as (tap, _tctx):
            await started(tap)
            await annotated(tap, make_flow(fp_body()[0]))
            process = worker_of(tap).proc
            assert process is not None
            await asyncio.sleep(0.5)  # its delivery attempt hangs on the silent receiver
            threading.Timer(1.0, os.kill, (process.pid, signal.SIGKILL)).start()
            began = time.monotonic()
            tap.done()
            assert time.monotonic() - began < 15, "done() waited on for a dead worker"
            summary = json.loads(tap.stats_command())
    finally:
        silent.close()
    assert summary["open_responses"] == 1
    assert summary["errors"] == {"worker_exit": 1}
    errors = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
    assert any("worker process stopped (exit code -9) while writing out" in m for m in errors)


class _Updates:
    """Records the flows mitmproxy's UIs are told to redraw (the update hook)."""

    def __init__(self) -> None:
        self.flows: list[http.HTTPFlow] = []

    def update(self, flows: list[http.HTTPFlow]) -> None:
        self.flows.extend(flows)


@on_loop
async def test_a_replay_the_worker_finds_no_open_response_in_updates_the_ui(
    keyfile: Path,
) -> None:
    """README: a flow inspected again and "answered by anything but an open response
    loses fp-tap's comment, mark and metadata["fp"]". With the worker (the default), a
    body that passes the cheap test (a JSON object naming sealed_result) but is no open
    response is dropped by the worker a moment after the response hook returned. The
    addon then strips the comment and mark off the flow (_forget) but, unlike for a
    record (_show), never triggers the update hook: mitmweb and the console keep showing
    the old "fp suspicious" comment and ⚠ mark (and a view filtered on them keeps the
    flow) until something else redraws it."""
    with tap_with(keyfile) as (tap, tctx):
        interactive(tap, tctx)
        updates = _Updates()
        tctx.master.addons.add(updates)
        await started(tap)
        assert tap.worker is not None
        flow = make_flow(fp_body(bot="bad")[0])
        tap.response(flow)
        await until(lambda: "fp" in flow.metadata, "the first annotation")
        assert flow.marked == fp_addon.MARK_SUSPICIOUS
        await until(lambda: flow in updates.flows, "the UI told of the annotation")
        updates.flows.clear()

        # The client replay's answer: JSON that mentions sealed_result, no open response.
        flow.response = make_flow(b'{"event_id": "x", "sealed_result": null}').response
        tap.response(flow)
        await until(lambda: "fp" not in flow.metadata, "the old annotation dropped")
        assert flow.comment == ""
        assert flow.marked == ""
        await asyncio.sleep(0.2)
        assert flow in updates.flows, (
            "the comment and mark were removed from the flow, but the UI was not told"
        )
        tap.done()


# -- found by an options hunt ---------------------------------------------------------


async def through_hooks(tap: fp_addon.FingerprintTap, flow: http.HTTPFlow) -> http.HTTPFlow:
    """Run one response through the tap and wait for its annotation (either mode)."""
    tap.responseheaders(flow)
    held = tap.response(flow)
    if held is not None:
        await asyncio.wait_for(held, 30)
    await until(lambda: "fp" in flow.metadata, "the annotation", 30)
    return flow


MODES = [pytest.param(True, id="worker"), pytest.param(False, id="in-process")]


@pytest.mark.parametrize("worker", MODES)
def test_setting_fp_worker_to_its_current_value_keeps_the_replay_memory(
    keyfile: Path, worker: bool
) -> None:
    """`:set fp_worker=<current value>` (or `options.load` of a saved options file, which
    re-sets every option it lists) is no switch: README says only *switching* fp_worker
    (or a worker's replacement) starts a new replay memory; "a change of any other option
    keeps it". Re-setting the same value must not forget the request ids seen, or a
    replayed sealed result is judged trusted."""

    @on_loop
    async def go() -> None:
        with tap_with(keyfile, fp_worker=worker, fp_hold=True) as (tap, tctx):
            await started(tap)
            body = fp_body()[0]
            first = await through_hooks(tap, make_flow(body))
            assert first.metadata["fp"]["verdict"] == "trusted"
            again = await through_hooks(tap, make_flow(body))
            assert again.metadata["fp"]["verdict"] == "suspicious", "control: a duplicate"
            tctx.configure(tap, fp_worker=worker)  # the value it already has
            await until(lambda: tap.worker is not None or tap.pipeline is not None, "pipeline")
            replayed = await through_hooks(tap, make_flow(body))
            tap.done()
            assert replayed.metadata["fp"]["verdict"] == "suspicious", (
                "a replay after re-setting fp_worker to its own value: "
                f"{replayed.metadata['fp']['verdict']}"
            )

    go()


def test_loading_a_saved_options_file_keeps_the_replay_memory(
    keyfile: Path, tmp_path: Path
) -> None:
    """mitmproxy's `options.save` / `options.load` (console and mitmweb command bar):
    loading the file a user just saved changes nothing, yet it re-sets every option in it,
    fp_worker=false included, which makes a new in-process pipeline with an empty replay
    memory: the next replay of a sealed result already seen is judged trusted."""
    saved = tmp_path / "options.yaml"

    @on_loop
    async def go() -> None:
        with tap_with(keyfile, fp_worker=False) as (tap, tctx):
            await started(tap)
            body = fp_body()[0]
            assert (await through_hooks(tap, make_flow(body))).metadata["fp"][
                "verdict"
            ] == "trusted"
            optmanager.save(tctx.options, str(saved), defaults=False)
            assert "fp_worker: false" in saved.read_text()
            optmanager.load_paths(tctx.options, str(saved))  # what `options.load` does
            replayed = await through_hooks(tap, make_flow(body))
            tap.done()
            assert replayed.metadata["fp"]["verdict"] == "suspicious", (
                f"a replay after options.load of unchanged options: {replayed.metadata['fp']}"
            )

    go()


@pytest.mark.parametrize("switch_to", [False, True], ids=["turned-off", "turned-on"])
def test_fp_log_trusted_applies_by_response_not_by_answer(
    keyfile: Path, caplog: pytest.LogCaptureFixture, switch_to: bool
) -> None:
    """With the worker, fp_log_trusted is read when the worker's answer comes back, not
    when the response came: a trusted response that came while it was true loses its
    INFO line if it is switched off before the answer (and one that came while it was
    false gets a line if switched on). In-process, and for every other option (fp_max_age,
    fp_filter, ...), the value in force when the response came decides."""
    caplog.set_level(logging.INFO)

    @on_loop
    async def go() -> None:
        with tap_with(keyfile, fp_worker=True, fp_log_trusted=not switch_to) as (tap, tctx):
            await started(tap)
            flow = make_flow(fp_body()[0])
            assert tap.response(flow) is None  # not held: answered a moment later
            tctx.configure(tap, fp_log_trusted=switch_to)  # before the answer
            await until(lambda: "fp" in flow.metadata, "the answer")
            tap.done()
        logged = [r.getMessage() for r in caplog.records if " trusted " in r.getMessage()]
        expected = 1 if not switch_to else 0  # as fp_log_trusted was when it came
        assert len(logged) == expected, logged

    go()
