"""fp_core.worker: the worker process, and the parent's side of its pipes (no mitmproxy).

Without an event loop the client is pumped with ``poll``; the addon's use of it on a
real loop is in test_addon_worker.py and every e2e test.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import sqlite3
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fp_core.errors import ConfigError
from fp_core.keys import ENV_VAR, DecryptionKey
from fp_core.pipeline import OPTIONS
from fp_core.spool import SPOOL_FILE
from fp_core.tap import RECORD_FIELDS
from fp_core.worker import FrameReader, WorkerClient, encode
from tests.test_addon import KEY, fp_body, hostile_bodies
from tests.test_pipeline import info, values


class Answers:
    """What the client hands back: ``(context, record)`` pairs and exit codes."""

    def __init__(self) -> None:
        self.records: list[tuple[Any, dict[str, Any] | None]] = []
        self.exits: list[int | None] = []


def pump(client: WorkerClient, done: Callable[[], bool], what: str, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not done():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        client.poll(0.05)


@pytest.fixture
def start() -> Iterator[Callable[..., tuple[WorkerClient, Answers]]]:
    started: list[WorkerClient] = []

    def start(max_in_flight: int = 1000, **options: Any) -> tuple[WorkerClient, Answers]:
        """A worker configured with these option values (the rest at their defaults)."""
        answers = Answers()
        client = WorkerClient(
            on_records=answers.records.extend,
            on_exit=answers.exits.append,
            max_in_flight=max_in_flight,
        )
        client.start()
        started.append(client)
        client.configure(values(**options), OPTIONS, wait=True, timeout=60)
        return client, answers

    yield start
    for client in started:
        if client.proc is not None and client.proc.poll() is None:
            os.kill(client.proc.pid, signal.SIGCONT)  # in case a test left it stopped
        client.close(0)


def test_records_come_back_in_order_with_their_contexts(
    start: Callable[..., tuple[WorkerClient, Answers]], keyfile: Path, tmp_path: Path
) -> None:
    out = tmp_path / "out.jsonl"
    client, answers = start(fp_keys_file=str(keyfile), fp_jsonl=str(out))
    bodies = [fp_body("v4" if n % 2 else "v3")[0] for n in range(16)]
    bodies += [hostile_bodies()["decrypt_failed"], b'{"requestId": "x", "other": 1}']
    for n, body in enumerate(bodies):
        assert client.submit(info(body, n), context=("ctx", n))
    pump(client, lambda: len(answers.records) == len(bodies), "every answer")

    assert [context for context, _ in answers.records] == [("ctx", n) for n in range(18)]
    *unsealed, failed, not_open = [record for _, record in answers.records]
    assert all(r is not None and r["verdict"] == "trusted" for r in unsealed)
    assert failed is not None
    assert failed["error"]["kind"] == "decrypt_failed"
    assert not_open is None
    # The parent gets what it puts on the flow and logs: never the event itself.
    assert all(r is not None and list(r) == list(RECORD_FIELDS) for r in answers.records[0][1:])
    assert [r["flow_id"] for r in unsealed if r] == [f"flow-{n}" for n in range(16)]

    final = client.close(5)
    assert final is not None
    assert (final["open_responses"], final["unsealed"], final["written"]) == (17, 16, {"jsonl": 17})
    written = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["flow_id"] for r in written] == [f"flow-{n}" for n in range(17)]
    assert all("event" in r for r in written if r["ok"]), "the sinks get the whole record"
    assert client.proc is not None
    assert client.proc.returncode == 0


def test_the_worker_runs_the_fp_core_beside_the_addon_not_one_where_it_starts(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, start: Callable[..., Any]
) -> None:
    """``python -m`` puts the current directory first on sys.path: an fp_core in the
    directory mitmproxy was started from (an older copy, anyone's in /tmp) ran in the
    worker, with the keys in its environment (found by a worker hunt)."""
    marker = tmp_path / "shadow-imported"
    shadow = tmp_path / "cwd" / "fp_core"
    shadow.mkdir(parents=True)
    (shadow / "__init__.py").write_text(
        f"import pathlib\npathlib.Path({str(marker)!r}).write_text('imported')\n"
    )
    (shadow / "worker.py").write_text("")
    monkeypatch.chdir(shadow.parent)
    monkeypatch.setenv(ENV_VAR, KEY.to_base64())
    client, answers = start()  # the real worker answers its configuration
    assert client.submit(info(fp_body()[0]), "ctx")
    pump(client, lambda: len(answers.records) == 1, "the answer")
    assert answers.records[0][1] is not None
    assert answers.records[0][1]["verdict"] == "trusted"
    assert not marker.exists()


def test_the_child_takes_keys_from_the_environment(
    start: Callable[..., tuple[WorkerClient, Answers]], monkeypatch: pytest.MonkeyPatch
) -> None:
    key = DecryptionKey.generate()
    monkeypatch.setenv(ENV_VAR, key.to_base64())
    client, answers = start()
    client.submit(info(fp_body(key=key)[0]), context=1)
    pump(client, lambda: bool(answers.records), "the answer")
    record = answers.records[0][1]
    assert record is not None
    assert record["key_id"] == key.key_id


def test_a_refused_configuration_names_the_option_and_changes_nothing(
    start: Callable[..., tuple[WorkerClient, Answers]], keyfile: Path, tmp_path: Path
) -> None:
    client, answers = start(fp_keys_file=str(keyfile))
    bad = values(fp_keys_file=str(keyfile), fp_jsonl=str(tmp_path / "missing" / "out.jsonl"))
    with pytest.raises(ConfigError, match="fp_jsonl: cannot open"):
        client.configure(bad, {"fp_jsonl"}, wait=True, timeout=60)
    client.submit(info(fp_body()[0]), context=1)
    pump(client, lambda: bool(answers.records), "an answer after the refusal")
    assert answers.records[0][1] is not None


def test_a_refusal_nobody_waits_for_is_logged_and_not_kept(
    start: Callable[..., tuple[WorkerClient, Answers]],
    keyfile: Path,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    client, _ = start(fp_keys_file=str(keyfile))
    gone = tmp_path / "moved.txt"
    client.configure(values(fp_keys_file=str(gone)), {"fp_keys_file"}, wait=False, timeout=60)
    client.configure(values(fp_keys_file=str(keyfile)), {"fp_max_age"}, wait=False, timeout=60)
    pump(client, lambda: not client._unawaited, "both replies")
    (line,) = [r.getMessage() for r in caplog.records if "refused" in r.getMessage()]
    assert line == (
        f"fp-tap: the worker process refused the options: key file {gone}: cannot read "
        "(No such file or directory)"
    )
    assert client._replies == {}, "an accepted one is not kept either"


def test_the_keys_are_read_again_only_when_their_option_changes(
    start: Callable[..., tuple[WorkerClient, Answers]], keyfile: Path, tmp_path: Path
) -> None:
    client, answers = start(fp_keys_file=str(keyfile))
    moved = tmp_path / "moved.txt"
    keyfile.rename(moved)  # rotated away while the tap runs: other options still apply
    client.configure(
        values(fp_keys_file=str(keyfile), fp_max_age=20), {"fp_max_age"}, wait=True, timeout=60
    )
    client.submit(info(fp_body()[0]), context=1)
    pump(client, lambda: bool(answers.records), "an answer")
    record = answers.records[0][1]
    assert record is not None
    assert record["ok"] is True, "the keys read at the start are still there"


def verdict(client: WorkerClient, answers: Answers, key: DecryptionKey, n: int) -> str:
    """What the worker makes of an event sealed with ``key`` (context ``n``)."""
    client.submit(info(fp_body(key=key)[0], n), context=n)
    pump(client, lambda: any(c == n for c, _ in answers.records), "an answer")
    record = next(r for c, r in answers.records if c == n)
    assert record is not None
    return str(record["verdict"] if record["ok"] else record["error"]["kind"])


def test_the_worker_watches_the_key_file_itself(
    start: Callable[..., tuple[WorkerClient, Answers]], keyfile: Path, caplog
) -> None:
    """Each process compares the file with what it read itself: nothing the parent does
    (or misses) can leave the worker with other keys than the file's."""
    caplog.set_level(logging.INFO)
    new = DecryptionKey.generate()
    client, answers = start(fp_keys_file=str(keyfile), fp_secrets_reload=1)
    keyfile.write_text(new.to_base64()[:30] + "\n")  # half-written
    pump(client, lambda: client.stats.get("errors", {}).get("keys_reload") == 1, "a refusal")
    assert verdict(client, answers, KEY, 1) == "trusted", "the key in use stays"
    keyfile.write_text(new.to_base64() + "\n")
    pump(client, lambda: client.stats.get("reloaded") == {"keys": 1}, "the reload")
    assert verdict(client, answers, new, 2) == "trusted"
    assert verdict(client, answers, KEY, 3) == "decrypt_failed"
    pump(client, lambda: "decrypt_failed" in client.stats["errors"], "the counters")
    assert client.stats["errors"] == {"keys_reload": 1, "decrypt_failed": 1}, "reported once"
    lines = [r.getMessage() for r in caplog.records if "key file" in r.getMessage()]
    assert len(lines) == 2, lines
    assert lines[0].endswith("; keeping the 1 key(s) in use")
    assert lines[1] == f"fp-tap: key file {keyfile} changed: 1 decryption key(s): {new.key_id}"


def test_a_worker_refuses_keys_other_than_its_parents(
    start: Callable[..., tuple[WorkerClient, Answers]], keyfile: Path
) -> None:
    """The parent sends the ids of the keys it read: a file that changed in between (a
    rotation caught half-written, or emptied) is refused, not unsealed with."""
    client, answers = start(fp_keys_file=str(keyfile), fp_key_ids=[KEY.key_id])
    assert verdict(client, answers, KEY, 1) == "trusted"
    keyfile.write_text("")  # truncated for an in-place rewrite
    with pytest.raises(ConfigError, match="changed while being read"):
        client.configure(
            values(fp_keys_file=str(keyfile), fp_key_ids=[KEY.key_id]),
            {"fp_keys_file"},
            wait=True,
            timeout=60,
        )
    assert verdict(client, answers, KEY, 2) == "trusted", "the keys in use stay"


def test_counters_follow_the_answers(
    start: Callable[..., tuple[WorkerClient, Answers]], keyfile: Path
) -> None:
    client, _ = start(fp_keys_file=str(keyfile))
    for n in range(5):
        client.submit(info(fp_body()[0], n), context=n)
    # Counted here as the answers come, before the child's next report...
    pump(client, lambda: client.in_flight == 0, "the answers")
    assert client.stats["unsealed"] == 5
    # ... which brings its gauges, and the same counts.
    pump(client, lambda: client.stats.get("replay_ids") == 5, "the report")
    assert client.stats["unsealed"] == 5


def with_webhook(
    start: Callable[..., tuple[WorkerClient, Answers]], keyfile: Path, state: Path
) -> tuple[WorkerClient, Answers]:
    """A worker with a webhook nobody answers (port 9) and its spool in ``state``."""
    return start(
        fp_keys_file=str(keyfile), fp_webhook_url="http://127.0.0.1:9/hook", fp_state_dir=str(state)
    )


def test_the_childs_log_lines_reach_the_parents_logging(
    start: Callable[..., tuple[WorkerClient, Answers]],
    keyfile: Path,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO)
    client, _ = with_webhook(start, keyfile, tmp_path / "state")
    pump(client, lambda: "events are not signed" in caplog.text, "the forwarded warning")
    (line,) = [r for r in caplog.records if "events are not signed" in r.getMessage()]
    assert (line.levelno, line.name) == (logging.WARNING, "fp_core.pipeline")


def test_a_spool_command_on_a_locked_spool_is_a_warning_not_the_workers_death(
    start: Callable[..., tuple[WorkerClient, Answers]],
    keyfile: Path,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO)
    state = tmp_path / "state"
    client, answers = with_webhook(start, keyfile, state)
    shell = sqlite3.connect(state / SPOOL_FILE, isolation_level=None)
    shell.execute("BEGIN EXCLUSIVE")  # an operator's sqlite3 shell on the spool
    try:
        client.spool_command("resend")
        pump(client, lambda: "fp.resend: webhook spool" in caplog.text, "the warning", 15)
    finally:
        shell.execute("ROLLBACK")
        shell.close()
    assert "database is locked" in caplog.text
    assert answers.exits == []
    client.spool_command("resend")  # and it still answers
    pump(client, lambda: "fp.resend: 0 parked webhook event(s)" in caplog.text, "the answer")
    pump(client, lambda: client.stats.get("webhook", {}).get("spool_errors") == 1, "the count")


def test_a_dead_worker_is_reported_once_and_takes_nothing_more(
    start: Callable[..., tuple[WorkerClient, Answers]], keyfile: Path
) -> None:
    client, answers = start(fp_keys_file=str(keyfile))
    assert client.proc is not None
    os.kill(client.proc.pid, signal.SIGSTOP)
    assert client.submit(info(fp_body()[0]), context="lost")
    os.kill(client.proc.pid, signal.SIGKILL)
    pump(client, lambda: bool(answers.exits), "the exit report")
    assert answers.exits == [-signal.SIGKILL]
    assert not client.alive
    assert not client.submit(info(fp_body()[0]), context="refused")
    assert client.take_pending() == ["lost"]
    client.poll(0.1)
    assert answers.exits == [-signal.SIGKILL], "reported once"


def test_handing_over_never_blocks_on_a_stalled_worker(
    start: Callable[..., tuple[WorkerClient, Answers]], keyfile: Path
) -> None:
    client, answers = start(max_in_flight=40, fp_keys_file=str(keyfile))
    assert client.proc is not None
    os.kill(client.proc.pid, signal.SIGSTOP)
    big = info(b"x" * 300_000)  # a megabyte pipe would hold three of these
    signal.alarm(60)  # a blocking write would hang here: fail instead
    try:
        accepted = [client.submit(big, context=n) for n in range(50)]
    finally:
        signal.alarm(0)
    assert accepted == [True] * 40 + [False] * 10, "bounded by max_in_flight"
    assert client._backlog, "what the pipe could not take waits in memory"
    os.kill(client.proc.pid, signal.SIGCONT)
    pump(client, lambda: len(answers.records) == 40, "the stalled answers")
    assert [c for c, _ in answers.records] == list(range(40))
    assert not client._backlog


def test_the_child_writes_out_and_exits_when_the_parent_vanishes(
    start: Callable[..., tuple[WorkerClient, Answers]], keyfile: Path, tmp_path: Path
) -> None:
    out = tmp_path / "out.jsonl"
    client, _ = start(fp_keys_file=str(keyfile), fp_jsonl=str(out))
    for n in range(10):
        client.submit(info(fp_body()[0], n), context=n)
    client._closing = True  # what a killed parent leaves: its ends of the pipes closed
    client._detach()
    assert client.proc is not None
    assert client.proc.wait(30) == 0
    assert len(out.read_text().splitlines()) == 10


messages = st.lists(
    st.tuples(
        st.sampled_from(["record", "stats", "log"]),
        st.integers(0, 2**40),
        st.one_of(st.none(), st.binary(max_size=3000), st.dictionaries(st.text(), st.integers())),
    ),
    max_size=20,
)


@settings(max_examples=60, deadline=None)
@given(messages, st.lists(st.integers(1, 5000), min_size=1, max_size=8))
def test_frames_come_out_whole_however_the_bytes_arrive(
    sent: list[tuple[Any, ...]], cuts: list[int]
) -> None:
    data = b"".join(encode(m) for m in sent)
    read_end, write_end = os.pipe()
    os.set_blocking(read_end, False)
    reader, got, at = FrameReader(read_end), [], 0
    try:
        for size in cuts * (len(data) // sum(cuts) + 1):
            chunk = data[at : at + size]
            at += len(chunk)
            if chunk:
                os.write(write_end, chunk)
            got += reader.read_available() or []
            if at >= len(data):
                break
        os.close(write_end)
        write_end = -1
        assert reader.read_available() is None, "end of file"
    finally:
        os.close(read_end)
        if write_end >= 0:
            os.close(write_end)
    assert got == sent


def test_frames_read_together_with_the_end_of_file_are_not_lost(tmp_path: Path) -> None:
    # A read that ends exactly at a chunk boundary, then the end of file: the frames in
    # the buffer must come out before the end is reported.
    target = 2 * (1 << 18)
    n = target - len(encode(("record", 1, b"")))
    while len(encode(("record", 1, b"x" * n))) > target:
        n -= 1
    frame = encode(("record", 1, b"x" * n))
    assert len(frame) == target
    path = tmp_path / "frames"
    path.write_bytes(frame)
    fd = os.open(path, os.O_RDONLY)
    try:
        reader = FrameReader(fd)
        assert reader.read_available() == [("record", 1, b"x" * n)]
        assert reader.read_available() is None
    finally:
        os.close(fd)


def test_a_shorter_check_interval_applies_at_once(
    start: Callable[..., tuple[WorkerClient, Answers]], keyfile: Path
) -> None:
    """From an hour to a second: the worker checks within a second, not after the hour."""
    new = DecryptionKey.generate()
    client, answers = start(fp_keys_file=str(keyfile), fp_secrets_reload=3600)
    keyfile.write_text(new.to_base64() + "\n")
    client.configure(
        values(fp_keys_file=str(keyfile), fp_secrets_reload=1),
        {"fp_secrets_reload"},
        wait=True,
        timeout=60,
    )
    pump(client, lambda: client.stats.get("reloaded") == {"keys": 1}, "the reload", timeout=10)
    assert verdict(client, answers, new, 1) == "trusted"


def test_a_worker_that_cannot_get_its_pipes_is_a_config_error_and_leaks_nothing(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    real_pipe, calls = os.pipe, []

    def pipe() -> tuple[int, int]:
        calls.append(1)
        if len(calls) == 2:  # the second pipe: the first must be closed again
            raise OSError(24, "Too many open files")
        return real_pipe()

    before = set(os.listdir("/proc/self/fd"))
    monkeypatch.setattr(os, "pipe", pipe)
    client = WorkerClient(on_records=lambda _: None, on_exit=lambda _: None, max_in_flight=1)
    with pytest.raises(ConfigError, match="cannot start the worker process: Too many open"):
        client.start()
    assert client.proc is None
    assert set(os.listdir("/proc/self/fd")) == before


def test_a_spool_command_runs_beside_the_answers(monkeypatch: pytest.MonkeyPatch) -> None:
    """fp.discard on a large backlog takes a while: the child's loop, which answers the
    responses, does not wait for it."""
    import threading

    from fp_core.worker import _Child

    child = _Child()
    gate, ran = threading.Event(), threading.Event()

    def slow(name: str) -> None:
        ran.set()
        gate.wait(30)

    monkeypatch.setattr(child.pipeline, "spool_command", slow)
    loop = threading.Thread(target=child.handle, args=(("spool", "discard"), []))
    loop.start()
    try:
        assert ran.wait(10), "the command ran"
        loop.join(5)
        assert not loop.is_alive(), "the loop is free while the command is still running"
    finally:
        gate.set()
        loop.join(10)
        child.pipeline.background.join()
