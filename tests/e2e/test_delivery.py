"""Delivery with real processes: mitmdump with the SQLite store and the webhook, the
stand-in endpoint, and the test receiver verifying every signature with the SDK.

Each fault ends the same way: every unsealed event's request id reached the receiver
at least once, correctly signed, and no record is missing from the JSONL file or the
store. What a fault cost (attempts, duplicates, the slowest proxied request) is printed
as a ``MEASURE`` line (``pytest -s`` shows them).
"""

from __future__ import annotations

import json
import os
import secrets
import signal
import sqlite3
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from fp_core.spool import SPOOL_FILE
from fp_core.store import read_records
from scripts.harness import (
    REPO,
    MitmdumpConfig,
    Service,
    children,
    make_tls_files,
    start_mitmdump,
    start_receiver,
)
from tests.e2e.conftest import Keys, fetch, read_jsonl, secret_forms
from tests.e2e.test_mitmdump import summary_of

pytestmark = pytest.mark.e2e

#: Bounds every wait; reached only when something is broken.
PATIENCE = 60.0
#: Forwarded (unsealed) cases and one that is not (an error record).
CASES = [("ok", "v4"), ("ok", "v3"), ("bad_bot", "v4"), ("good_bot", "v3"), ("mismatch", "v4")]


def wait_until(condition: Callable[[], object], what: str, timeout: float = PATIENCE) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.05)


@dataclass
class Rig:
    """Paths and processes of one test run."""

    tmp: Path
    keys: Keys
    endpoint: Service
    secret: str = field(default_factory=lambda: secrets.token_urlsafe(24))
    seed: int = 0
    sent: list[tuple[str, bool]] = field(default_factory=list)  # (request id, forwarded)
    latencies: list[float] = field(default_factory=list)
    services: list[Service] = field(default_factory=list)

    @property
    def jsonl(self) -> Path:
        return self.tmp / "events.jsonl"

    @property
    def store(self) -> Path:
        return self.tmp / "events.sqlite3"

    @property
    def state(self) -> Path:
        return self.tmp / "state"

    @property
    def received_log(self) -> Path:
        return self.tmp / "received.jsonl"

    def receiver(self, *args: str, tls: tuple[Path, Path] | None = None) -> tuple[Service, str]:
        extra = [*args]
        if tls is not None:
            extra += ["--tls-cert", str(tls[0]), "--tls-key", str(tls[1])]
        service, url = start_receiver(
            self.tmp, log=self.received_log, args=extra, env={"FP_WEBHOOK_SECRET": self.secret}
        )
        self.services.append(service)
        return service, url

    def tap(self, url: str, name: str = "mitmdump", **options: str | int) -> Service:
        service = start_mitmdump(
            self.tmp,
            MitmdumpConfig(
                mode=f"reverse:http://127.0.0.1:{self.endpoint.port}",
                options={
                    "fp_keys_file": str(self.keys.file),
                    "fp_jsonl": str(self.jsonl),
                    "fp_sqlite": str(self.store),
                    "fp_webhook_url": url,
                    "fp_state_dir": str(self.state),
                    "fp_webhook_retry_ms": 200,
                    "fp_webhook_retry_max": 1,
                    **options,
                },
                env={"FP_WEBHOOK_SECRET": self.secret},
            ),
            name=name,
        )
        self.services.append(service)
        return service

    def send(self, proxy: Service, n: int, *, with_error: bool = True) -> list[str]:
        """``n`` open responses through the proxy (plus one that fails to unseal);
        the request ids of those that are forwarded."""
        ids = []
        cases = [*CASES] * (n // len(CASES) + 1)
        plan = [(case, api, True) for case, api in cases[:n]]
        if with_error:
            plan.insert(n // 2, ("wrong_key", "v4", False))
        for case, api, forwarded in plan:
            self.seed += 1
            query = f"/agent?case={case}&api={api}&seed={self.seed}&ts={int(time.time() * 1000)}"
            request_id = self.fetch(proxy, query)
            self.sent.append((request_id, forwarded))
            if forwarded:
                ids.append(request_id)
        return ids

    def fetch(self, proxy: Service, query: str) -> str:
        started = time.monotonic()
        reply = fetch(f"http://127.0.0.1:{proxy.port}{query}")
        self.latencies.append(time.monotonic() - started)
        assert reply.status == 200
        return dict(reply.headers)["X-Stand-In-Request-Id"]

    def replay_first(self, proxy: Service) -> str:
        """The very first request again, byte for byte: the same sealed result (its
        request id starts with the timestamp it was made with)."""
        first = self.sent[0][0]
        ts = int(first.split(".")[0])
        assert self.fetch(proxy, f"/agent?case=ok&api=v4&seed=1&ts={ts}") == first
        self.sent.append((first, True))
        return first

    def received(self) -> list[dict[str, Any]]:
        return read_jsonl(self.received_log)

    def delivered(self) -> Counter[str]:
        """Request ids answered 200, with how often. The receiver sees each event's
        idempotency key, the id sealed in it: mapped back to the outer id the client got
        through the records (a spliced response's two ids differ)."""
        outer = {r["summary"]["request_id"]: r["request_id"] for r in self.records() if r["ok"]}
        keys = (r["request_id"] for r in self.received() if r["status"] == 200)
        return Counter(outer.get(key, key) for key in keys)

    def records(self) -> list[dict[str, Any]]:
        return read_jsonl(self.jsonl)

    def check_nothing_lost(self) -> None:
        """Every event the client caused was recorded (both files) and delivered."""
        records = self.records()
        assert [r["request_id"] for r in records] == [rid for rid, _ in self.sent]
        assert list(read_records(str(self.store))) == records
        forwarded = {rid for rid, ok in self.sent if ok}
        assert {r["request_id"] for r in records if r["ok"]} == forwarded
        delivered = self.delivered()
        assert set(delivered) == forwarded
        # Each under the id sealed in its event, not the outer one a client may forge.
        sealed = {r["summary"]["request_id"] for r in records if r["ok"]}
        assert {r["request_id"] for r in self.received() if r["status"] == 200} == sealed
        assert any(r["summary"]["request_id"] != r["request_id"] for r in records if r["ok"])
        # Every answer the receiver gave was to a correctly signed request.
        assert {r["signature"] for r in self.received()} == {"valid"}

    def measure(self, name: str, summary: dict[str, Any], **extra: object) -> None:
        delivered = self.delivered()
        line = {
            "events": len(delivered),
            "posts": len(self.received()),
            # Deliveries beyond one per forwarded record (a replay is a record too).
            "duplicates": sum(delivered.values()) - sum(ok for _, ok in self.sent),
            "webhook": summary.get("webhook", {}),
            "failures": summary.get("webhook_failures", {}),
            "store": summary.get("store", {}),
            "max_request_s": round(max(self.latencies), 3),
            **extra,
        }
        print(f"\nMEASURE {name}: {json.dumps(line, sort_keys=True)}")


@pytest.fixture
def rig(tmp_path: Path, keys: Keys, endpoint: Service) -> Iterator[Rig]:
    rig = Rig(tmp_path, keys, endpoint)
    yield rig
    for service in rig.services:  # whatever a failing test left running
        service.kill()


def report(path: Path) -> dict[str, Any]:
    out = subprocess.run(
        [sys.executable, "-m", "fp_core", "report", "--json", str(path)],
        capture_output=True,
        check=True,
        timeout=60,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    result: dict[str, Any] = json.loads(out.stdout)
    result.pop("source")
    return result


def test_store_jsonl_webhook_and_report_agree(rig: Rig) -> None:
    """The plain run, to an https receiver: the three outputs hold the same events."""
    ca, cert, key = make_tls_files(rig.tmp / "tls")
    receiver, url = rig.receiver(tls=(cert, key))
    proxy = rig.tap(url, fp_webhook_ca=str(ca))
    try:
        ids = rig.send(proxy, 10)
        rig.replay_first(proxy)
        wait_until(lambda: sum(rig.delivered().values()) == len(ids) + 1, "all deliveries")
        # The report works on files the running tap still has open (the store comes
        # before the JSONL file in each batch: once the JSONL has it all, so has it).
        wait_until(lambda: len(rig.records()) == len(rig.sent), "the records")
        live = report(rig.store)
        assert live == report(rig.jsonl)
        assert live["records"] == len(rig.sent)
    finally:
        assert proxy.stop() == 0
        receiver.stop()
    rig.check_nothing_lost()
    records = rig.records()
    assert records[-1]["reasons"] == ["duplicate"]
    assert report(rig.store) == report(rig.jsonl)
    assert report(rig.store)["duplicates"] == 1
    # Nothing failed, so every event went exactly once (the replay is a second event).
    assert rig.delivered() == Counter(rid for rid, ok in rig.sent if ok)

    summary = summary_of(proxy.output())
    assert summary["webhook"]["sent"] == len(ids) + 1
    assert summary["store"] == {"rows": len(records)}
    assert (summary["webhook_pending"], summary["webhook_parked"]) == (0, 0)
    assert rig.state.stat().st_mode & 0o777 == 0o700
    for path in (rig.store, rig.state / SPOOL_FILE, rig.jsonl):
        assert path.stat().st_mode & 0o777 == 0o600, path.name
    leaks = [rig.secret.encode(), *secret_forms(rig.keys.key.raw())]
    for path in [proxy.log, receiver.log, rig.jsonl, rig.store, rig.received_log]:
        data = path.read_bytes()
        assert not any(form in data for form in leaks), path.name
    rig.measure("plain_https", summary)


def test_receiver_down_at_start_then_up(rig: Rig) -> None:
    gate = rig.tmp / "gate"
    receiver, url = rig.receiver("--gate", str(gate), "--closed", "refuse")
    proxy = rig.tap(url)
    try:
        ids = rig.send(proxy, 10)
        refused = "connection (Connection refused) for"
        wait_until(lambda: refused in proxy.output(), "a refused delivery attempt")
        time.sleep(2)  # down a while longer: several rounds of retries with backoff
        assert rig.received() == []
        gate.touch()
        wait_until(lambda: set(rig.delivered()) == set(ids), "deliveries once the receiver is up")
    finally:
        assert proxy.stop() == 0
        receiver.stop()
    rig.check_nothing_lost()
    summary = summary_of(proxy.output())
    assert summary["webhook_failures"]["connection"] >= 1
    assert summary["webhook"]["retried"] >= 1
    rig.measure("receiver_down_then_up", summary)


def test_a_full_spool_refuses_new_events_but_their_records_are_written(rig: Rig) -> None:
    gate = rig.tmp / "gate"
    receiver, url = rig.receiver("--gate", str(gate), "--closed", "refuse")
    proxy = rig.tap(url, fp_webhook_max_events=3)
    try:
        rig.send(proxy, 5, with_error=False)
        wait_until(lambda: len(rig.records()) == 5, "every record, spooled or not")
        gate.touch()
        wait_until(lambda: sum(rig.delivered().values()) == 3, "the three spooled events")
    finally:
        assert proxy.stop() == 0
        receiver.stop()
    summary = summary_of(proxy.output())
    assert summary["webhook"]["spooled"] == 3
    assert summary["webhook"]["spool_full"] == 2
    assert summary["webhook"]["sent"] == 3
    assert sum(rig.delivered().values()) == 3
    assert proxy.output().count("webhook spool full (fp_webhook_max_events=3") == 1


def test_receiver_answering_500_for_a_while(rig: Rig) -> None:
    gate = rig.tmp / "gate"
    receiver, url = rig.receiver("--gate", str(gate), "--closed", "fail")
    proxy = rig.tap(url)
    try:
        ids = rig.send(proxy, 10)
        # Every event is refused, and retried and refused again, before recovery.
        wait_until(
            lambda: (
                len({r["request_id"] for r in rig.received()}) == len(ids)
                and len(rig.received()) >= 2 * len(ids)
            ),
            "failed attempts for every event, and retries",
        )
        assert rig.delivered() == Counter()
        gate.touch()
        wait_until(lambda: set(rig.delivered()) == set(ids), "deliveries after the 500s")
    finally:
        assert proxy.stop() == 0
        receiver.stop()
    rig.check_nothing_lost()
    summary = summary_of(proxy.output())
    assert summary["webhook_failures"]["http_500"] >= len(ids)
    assert summary["webhook"]["sent"] == len(ids)
    rig.measure("receiver_500_for_a_while", summary)


def test_events_a_receiver_refuses_for_good_are_parked_then_expire(rig: Rig) -> None:
    """fp_webhook_keep_parked: a long-running tap's spool does not keep them for ever;
    their records stay in the JSONL file and the store."""
    receiver, url = rig.receiver("--gate", str(rig.tmp / "gate"), "--closed", "fail")
    proxy = rig.tap(url, fp_webhook_give_up=1, fp_webhook_keep_parked=2)
    try:
        ids = rig.send(proxy, 5)
        wait_until(lambda: "fp_webhook_keep_parked" in proxy.output(), "the expiry line")
        wait_until(lambda: spool_rows(rig.state) == 0, "an empty spool")
        assert {r["request_id"] for r in rig.received()} >= {
            r["summary"]["request_id"] for r in rig.records() if r["ok"]
        }, "each was tried"
    finally:
        assert proxy.stop() == 0
        receiver.stop()
    summary = summary_of(proxy.output())
    assert summary["webhook"]["parked"] == len(ids)
    assert summary["webhook"]["expired"] == len(ids)
    assert (summary["webhook_pending"], summary["webhook_parked"]) == (0, 0)
    assert rig.delivered() == Counter()
    records = rig.records()
    assert [r["request_id"] for r in records] == [rid for rid, _ in rig.sent]
    assert list(read_records(str(rig.store))) == records


def spool_rows(state: Path) -> int:
    """Rows in the spool, read while the tap runs (WAL: readers do not block it)."""
    conn = sqlite3.connect(f"file:{state / SPOOL_FILE}?mode=ro", uri=True)
    try:
        return int(conn.execute("SELECT COUNT(*) FROM events").fetchone()[0])
    finally:
        conn.close()


def test_sigterm_to_the_whole_service_still_drains(rig: Rig) -> None:
    """A service manager's stop (systemd's default KillMode=control-group) sends SIGTERM
    to every process of the service at once, the worker too: mitmproxy still has it
    deliver for up to fp_drain_timeout, and the summary still has its counts."""
    gate = rig.tmp / "gate"
    receiver, url = rig.receiver("--gate", str(gate), "--closed", "hold")
    proxy = rig.tap(url, fp_webhook_concurrency=1, fp_drain_timeout=20)
    try:
        ids = rig.send(proxy, 8, with_error=False)
        wait_until(lambda: len(rig.records()) == len(rig.sent), "the records")
        (worker,) = children(proxy.proc.pid)
        assert rig.delivered() == Counter(), "all still to deliver: the receiver holds"
        os.kill(proxy.proc.pid, signal.SIGTERM)
        time.sleep(0.3)  # the worker's a moment later, after mitmdump's shutdown began
        os.kill(worker, signal.SIGTERM)
        gate.touch()  # the receiver answers from now on, within the drain
        assert proxy.wait_exit(60) == 0
    finally:
        receiver.stop()
    rig.check_nothing_lost()
    summary = summary_of(proxy.output())
    assert "worker_exit" not in summary.get("errors", {}), summary
    assert (summary["webhook"]["sent"], summary["webhook_pending"]) == (len(ids), 0)
    assert summary["written"] == {"jsonl": len(ids), "sqlite": len(ids), "webhook": len(ids)}


def test_a_slow_receiver_does_not_slow_the_proxy(rig: Rig) -> None:
    gate = rig.tmp / "gate"
    # Until the gate opens the receiver holds every request; then it takes 300 ms each.
    receiver, url = rig.receiver("--gate", str(gate), "--closed", "hold", "--delay-ms", "300")
    proxy = rig.tap(url, fp_webhook_concurrency=2, fp_webhook_timeout=30)
    try:
        ids = rig.send(proxy, 20)
        # All traffic went through while the receiver had answered nothing at all.
        assert rig.received() == []
        held_phase_max = max(rig.latencies)
        gate.touch()
        wait_until(lambda: set(rig.delivered()) == set(ids), "deliveries from the slow receiver")
        more = rig.send(proxy, 5, with_error=False)
        wait_until(lambda: set(rig.delivered()) >= set(more), "deliveries of later events")
    finally:
        assert proxy.stop() == 0
        receiver.stop()
    rig.check_nothing_lost()
    summary = summary_of(proxy.output())
    rig.measure("slow_receiver", summary, max_request_s_while_held=round(held_phase_max, 3))


def test_sigkill_in_the_middle_and_restart(rig: Rig) -> None:
    receiver, url = rig.receiver("--delay-ms", "400")
    first = rig.tap(url, fp_webhook_concurrency=1)
    try:
        first_ids = rig.send(first, 10)
        # The spool is written before the files: once the JSONL has every record, every
        # event is in the spool, while the slow receiver has had only a few of them.
        wait_until(lambda: len(rig.records()) == len(rig.sent), "records of the first run")
        wait_until(lambda: rig.delivered(), "a first delivery")
    finally:
        first.kill()
    assert first.proc.returncode == -signal.SIGKILL
    before_restart = len(rig.delivered())
    assert before_restart < len(first_ids), "killed in the middle of delivering"

    second = rig.tap(url, name="mitmdump-2", fp_webhook_concurrency=4)
    try:
        # The first run's first event again: a duplicate, known from the store.
        rig.replay_first(second)
        second_ids = rig.send(second, 5)
        wait_until(
            lambda: set(rig.delivered()) == set(first_ids) | set(second_ids),
            "every event of both runs",
        )
    finally:
        assert second.stop() == 0
        receiver.stop()
    rig.check_nothing_lost()
    assert rig.records()[len(first_ids) + 1]["checks"]["duplicate"] is True
    assert report(rig.store) == report(rig.jsonl)
    assert "from an earlier run to send" in second.output()
    summary = summary_of(second.output())
    rig.measure("sigkill_restart", summary, delivered_before_kill=before_restart)


def test_store_locked_by_another_connection_during_writes(rig: Rig) -> None:
    receiver, url = rig.receiver()
    proxy = rig.tap(url)
    lock = sqlite3.connect(rig.store, isolation_level=None)
    try:
        lock.execute("BEGIN EXCLUSIVE")  # as a shell user's open write transaction
        locked_ids = rig.send(proxy, 10)
        # The other sinks are not held up: the JSONL file and the webhook get everything.
        wait_until(lambda: len(rig.records()) == len(rig.sent), "JSONL records")
        wait_until(lambda: set(rig.delivered()) == set(locked_ids), "deliveries")
        time.sleep(1.5)  # keep it locked a while longer: the store keeps retrying
        conn = sqlite3.connect(rig.store)
        assert conn.execute("SELECT COUNT(*) FROM records").fetchone()[0] == 0
        conn.close()
        lock.execute("ROLLBACK")
        later_ids = rig.send(proxy, 5, with_error=False)
        wait_until(lambda: set(rig.delivered()) >= set(later_ids), "later deliveries")
    finally:
        lock.close()
        assert proxy.stop() == 0
        receiver.stop()
    rig.check_nothing_lost()
    summary = summary_of(proxy.output())
    assert summary["store"]["busy"] >= 1
    assert summary["store"]["rows"] == len(rig.sent)
    assert "lost" not in summary["store"]
    assert report(rig.store) == report(rig.jsonl)
    rig.measure("store_locked", summary)
