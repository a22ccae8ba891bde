"""fp_core.pipeline: the tap and its sinks, configured from plain option values."""

from __future__ import annotations

import json
import threading
import time
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

import fp_addon
from fp_core.errors import ConfigError
from fp_core.keys import ENV_VAR, DecryptionKey
from fp_core.pipeline import OPTIONS, Background, Pipeline, tap_config
from fp_core.store import read_records
from fp_core.tap import ResponseInfo
from fp_core.webhook import SECRET_ENV_VAR
from tests.test_addon import KEY, fp_body

DEFAULTS = {name: default for name, _, default, _ in fp_addon.OPTIONS}


def values(**overrides: Any) -> dict[str, Any]:
    """The pipeline's options as the addon sends them: its defaults, then ``overrides``."""
    return {name: DEFAULTS[name] for name in OPTIONS} | overrides


def opts(**overrides: Any) -> SimpleNamespace:
    return SimpleNamespace(**values(**overrides))


def info(body: bytes, n: int = 0) -> ResponseInfo:
    return ResponseInfo(f"flow-{n}", time.time(), "fp.shop.example", "/agent", "POST", 200, body)


def test_records_go_to_the_sinks_it_was_configured_with(tmp_path: Path) -> None:
    out = tmp_path / "out.jsonl"
    pipeline = Pipeline()
    pipeline.configure(opts(fp_jsonl=str(out)), OPTIONS, [KEY])
    record = pipeline.inspect(info(fp_body()[0]))
    assert record is not None
    assert record["verdict"] == "trusted"
    assert pipeline.inspect(info(b"<html></html>")) is None
    pipeline.close(0)
    pipeline.close(0)  # a second close is harmless
    (written,) = [json.loads(line) for line in out.read_text().splitlines()]
    assert written["request_id"] == record["request_id"]
    assert pipeline.snapshot()["written"] == {"jsonl": 1}


def test_fp_sqlite_keep_deletes_rows_older_than_it(tmp_path: Path) -> None:
    db = tmp_path / "events.sqlite3"
    pipeline = Pipeline()
    with pytest.raises(ConfigError, match="fp_sqlite_keep cannot be negative"):
        pipeline.configure(opts(fp_sqlite=str(db), fp_sqlite_keep=-1), OPTIONS, [KEY])
    pipeline.configure(opts(fp_sqlite=str(db), fp_sqlite_keep=3600), OPTIONS, [KEY])
    body = fp_body()[0]
    old = ResponseInfo("flow-old", time.time() - 7200, "h", "/agent", "POST", 200, body)
    assert pipeline.inspect(old) is not None
    assert pipeline.inspect(info(fp_body()[0], n=1)) is not None
    pipeline.close(0)
    assert [r["flow_id"] for r in read_records(str(db))] == ["flow-1"]
    stats = pipeline.snapshot()
    assert stats["written"] == {"sqlite": 2}
    assert stats["store"]["pruned"] == 1


def test_a_bad_value_leaves_the_running_sinks_alone(tmp_path: Path) -> None:
    out = tmp_path / "out.jsonl"
    pipeline = Pipeline()
    pipeline.configure(opts(fp_jsonl=str(out)), OPTIONS, [KEY])
    writer = pipeline.writer
    with pytest.raises(ConfigError, match="fp_jsonl: cannot open"):
        pipeline.configure(opts(fp_jsonl=str(tmp_path / "no" / "x.jsonl")), {"fp_jsonl"}, [KEY])
    assert pipeline.writer is writer
    pipeline.inspect(info(fp_body()[0]))
    pipeline.close(0)
    assert len(out.read_text().splitlines()) == 1


def test_a_writer_retired_by_a_change_finishes_before_the_spool_closes(tmp_path: Path) -> None:
    """Closing right after a change of options: the retired writer, still writing its
    queue into the webhook spool, must not find the spool closed under it."""
    out = tmp_path / "out.jsonl"
    options = {
        "fp_jsonl": str(out),
        "fp_webhook_url": "http://127.0.0.1:9/hook",  # nobody there: events stay pending
        "fp_state_dir": str(tmp_path / "state"),
        "fp_queue_size": 20_000,
    }
    pipeline = Pipeline()
    pipeline.configure(opts(**options), OPTIONS, [KEY])
    record = pipeline.inspect(info(fp_body()[0]))
    assert record is not None
    assert pipeline.writer is not None
    count = 10_000
    for _ in range(count - 1):  # queued faster than the writer writes
        assert pipeline.writer.submit(dict(record))
    pipeline.configure(opts(**options | {"fp_queue_size": 30_000}), {"fp_queue_size"}, [KEY])
    pipeline.close(0)
    stats = pipeline.snapshot()
    assert stats.get("sink_errors", {}) == {}
    assert stats["written"] == {"jsonl": count, "webhook": count}
    assert len(out.read_text().splitlines()) == count


def test_the_replay_memory_survives_option_changes_a_new_ttl_included() -> None:
    pipeline = Pipeline()
    pipeline.configure(opts(), OPTIONS, [KEY])
    body = fp_body()[0]
    pipeline.inspect(info(body))
    pipeline.configure(opts(fp_max_age=30), {"fp_max_age"}, [KEY])
    again = pipeline.inspect(info(body))
    assert again is not None
    assert again["checks"]["duplicate"] is True
    pipeline.configure(opts(fp_replay_ttl=60), {"fp_replay_ttl"}, [KEY])
    still = pipeline.inspect(info(body))
    assert still is not None
    assert still["checks"]["duplicate"] is True, "seen before the change: still seen"
    later = pipeline.inspect(replace(info(body), time=time.time() + 61))
    assert later is not None
    assert later["checks"]["duplicate"] is False, "the new ttl applies to it"


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"fp_origins": ["not an origin"]}, "fp_origins"),
        ({"fp_redact": ["no.such..path"]}, "fp_redact"),
        ({"fp_max_age": 0}, "fp_max_age must be a positive number"),
    ],
)
def test_tap_settings_are_checked(overrides: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        tap_config(opts(**overrides), [KEY])


@pytest.mark.parametrize("command", ["resend", "discard"])
def test_spool_commands_without_a_webhook_say_so(
    command: str, caplog: pytest.LogCaptureFixture
) -> None:
    with pytest.raises(ConfigError, match=f"fp.{command}: no webhook configured"):
        getattr(Pipeline(), command)()
    Pipeline().spool_command(command)  # as the worker runs it: said in a log line
    (line,) = caplog.records
    assert line.getMessage() == f"fp.{command}: no webhook configured (fp_webhook_url)"


def test_a_negative_fp_webhook_keep_parked_is_refused(tmp_path: Path) -> None:
    webhook = {"fp_webhook_url": "http://127.0.0.1:9/", "fp_state_dir": str(tmp_path / "s")}
    with pytest.raises(ConfigError, match="fp_webhook_keep_parked cannot be negative"):
        Pipeline().configure(opts(**webhook, fp_webhook_keep_parked=-1), OPTIONS, [KEY])


def test_a_spool_locked_at_start_is_an_option_error(tmp_path: Path) -> None:
    """Not SQLite's own exception, which would end the worker process (or escape
    mitmproxy's configure hook) instead of saying which option."""
    import sqlite3

    from fp_core.spool import SPOOL_FILE, Spool

    state = tmp_path / "state"
    Spool(str(state)).close()  # left by an earlier run
    shell = sqlite3.connect(state / SPOOL_FILE, isolation_level=None)
    shell.execute("BEGIN EXCLUSIVE")
    pipeline = Pipeline()
    webhook = {"fp_webhook_url": "http://127.0.0.1:9/", "fp_state_dir": str(state)}
    try:
        with pytest.raises(ConfigError, match=r"fp_state_dir: webhook spool .*locked"):
            pipeline.configure(opts(**webhook), OPTIONS, [KEY])
    finally:
        shell.execute("ROLLBACK")
        shell.close()
    pipeline.configure(opts(**webhook), OPTIONS, [KEY])  # once it is free, the same works
    assert pipeline.delivery is not None
    pipeline.close(0)


def test_background_jobs_are_joined() -> None:
    background, done = Background(), threading.Event()

    def job() -> None:
        time.sleep(0.2)
        done.set()

    background.run(job)
    background.join()
    assert done.is_set()


def test_take_uses_what_the_check_read_and_reads_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """check_files reads (off the event loop), take only uses what it read: the files may
    be gone by then, or changed again, and take neither fails nor reads them again."""
    monkeypatch.delenv(SECRET_ENV_VAR, raising=False)
    monkeypatch.delenv(ENV_VAR, raising=False)
    secret, keys = tmp_path / "webhook.secret", tmp_path / "keys.txt"
    secret.write_text("old-secret\n")
    keys.write_text(KEY.to_base64() + "\n")
    pipeline = Pipeline()
    pipeline.configure(
        opts(
            fp_keys_file=str(keys),
            fp_webhook_url="http://127.0.0.1:9/hook",
            fp_webhook_secret_file=str(secret),
            fp_state_dir=str(tmp_path / "state"),
        ),
        OPTIONS,
    )
    try:
        new_key = DecryptionKey.generate()
        secret.write_text("new-secret\n")
        keys.write_text(new_key.to_base64() + "\n")
        changes = pipeline.check_files()
        secret.unlink()
        keys.unlink()
        assert sorted(pipeline.take(changes)) == ["keys", "webhook_secret"]
        assert pipeline.delivery is not None
        assert pipeline.delivery.config.secret is not None
        assert pipeline.delivery.config.secret.text() == "new-secret"
        assert pipeline.keys == [new_key]
        assert pipeline.stats.group("reloaded") == {"keys": 1, "webhook_secret": 1}
    finally:
        pipeline.close(0)


def test_a_key_file_the_pipeline_cannot_use_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Read by the pipeline (in the worker process): a file caught half-written, or one
    whose keys are not those its parent read (``fp_key_ids``), is refused, and the keys
    in use stay."""
    monkeypatch.delenv(ENV_VAR, raising=False)
    keys = tmp_path / "keys.txt"
    keys.write_text(KEY.to_base64() + "\n")
    pipeline = Pipeline()
    pipeline.configure(opts(fp_keys_file=str(keys), fp_key_ids=[KEY.key_id]), OPTIONS)
    other = tmp_path / "other.txt"
    other.write_text(KEY.to_base64()[:10] + "\n")
    with pytest.raises(ConfigError, match="line 1"):
        pipeline.configure(opts(fp_keys_file=str(other)), {"fp_keys_file"})
    new_key = DecryptionKey.generate()
    other.write_text(new_key.to_base64() + "\n")
    with pytest.raises(ConfigError) as caught:
        pipeline.configure(opts(fp_keys_file=str(other), fp_key_ids=[KEY.key_id]), {"fp_keys_file"})
    assert caught.value.message == (
        f"key file {other} changed while being read (it holds 1 decryption key(s): "
        f"{new_key.key_id}, not the 1 key(s) expected)"
    )
    assert pipeline.keys == [KEY], "kept"
    pipeline.configure(opts(fp_keys_file=str(other), fp_key_ids=[new_key.key_id]), OPTIONS)
    assert pipeline.keys == [new_key]
    pipeline.close(0)


def test_a_secret_in_use_is_not_read_again_for_another_delivery_option(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A change of the file is the watch's to report (logged, counted), not taken in
    passing when, say, the timeout changes."""
    monkeypatch.delenv(SECRET_ENV_VAR, raising=False)
    secret = tmp_path / "webhook.secret"
    secret.write_text("first-secret\n")
    webhook = {
        "fp_webhook_url": "http://127.0.0.1:9/hook",
        "fp_webhook_secret_file": str(secret),
        "fp_state_dir": str(tmp_path / "state"),
    }
    pipeline = Pipeline()
    pipeline.configure(opts(**webhook), OPTIONS, [KEY])
    try:
        secret.write_text("second-secret\n")
        pipeline.configure(opts(**webhook, fp_webhook_timeout=3), {"fp_webhook_timeout"})
        assert pipeline.delivery is not None
        assert pipeline.delivery.config.secret is not None
        assert pipeline.delivery.config.secret.text() == "first-secret"
        assert pipeline.take(pipeline.check_files()) == ["webhook_secret"]
        assert pipeline.delivery.config.secret.text() == "second-secret"
        assert pipeline.delivery.config.timeout == 3
    finally:
        pipeline.close(0)


def test_webhook_events_held_for_a_locked_spool_outlive_a_replaced_writer(tmp_path: Path) -> None:
    """An option change replaces the record writer: what its webhook sink held goes on
    being held for the spool, not lost."""
    import sqlite3

    from fp_core.spool import SPOOL_FILE

    state = tmp_path / "state"
    common = {"fp_webhook_url": "http://127.0.0.1:9/hook", "fp_state_dir": str(state)}
    pipeline = Pipeline()
    pipeline.configure(opts(fp_jsonl=str(tmp_path / "a.jsonl"), **common), OPTIONS, [KEY])
    shell = sqlite3.connect(state / SPOOL_FILE, isolation_level=None)
    shell.execute("BEGIN EXCLUSIVE")
    try:
        assert pipeline.inspect(info(fp_body()[0])) is not None
        deadline = time.monotonic() + 30
        while pipeline.stats.group("webhook").get("spool_errors", 0) < 1:
            assert time.monotonic() < deadline, "the spool refusing the event"
            time.sleep(0.05)
        pipeline.configure(opts(fp_jsonl=str(tmp_path / "b.jsonl"), **common), {"fp_jsonl"})
        pipeline.background.join()  # the old writer retired
    finally:
        shell.execute("ROLLBACK")
        shell.close()
    deadline = time.monotonic() + 30
    while pipeline.snapshot()["webhook_pending"] != 1:
        assert time.monotonic() < deadline, f"spooled by the new writer: {pipeline.snapshot()}"
        time.sleep(0.05)
    assert "lost" not in pipeline.stats.group("webhook")
    pipeline.close(0)


@pytest.mark.parametrize("changes", [1, 3], ids=["one-change", "three-changes"])
def test_records_held_for_a_locked_store_survive_option_changes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, changes: int
) -> None:
    """An option change replaces the record writer while another connection locks the
    store: the retired writer's store gave up on what it held after CLOSE_PATIENCE, as
    at shutdown, though the new writer writes the same file (found by a files hunt).
    Several changes in a row retire their writers side by side."""
    import sqlite3

    from fp_core import store as store_module

    monkeypatch.setattr(store_module, "CLOSE_PATIENCE", 0.3)  # what is at stake: not waiting
    db = tmp_path / "events.sqlite3"
    pipeline = Pipeline()
    pipeline.configure(opts(fp_sqlite=str(db)), OPTIONS, [KEY])
    ids = []

    def respond(n: int) -> None:
        body, event = fp_body()
        ids.append(event["event_id"])
        assert pipeline.inspect(info(body, n)) is not None

    def wait_for(done: Any, what: str) -> None:
        deadline = time.monotonic() + 30
        while not done():
            assert time.monotonic() < deadline, f"{what}: {pipeline.snapshot()}"
            time.sleep(0.02)

    respond(0)
    wait_for(lambda: pipeline.stats.group("store").get("rows") == 1, "the first row")
    shell = sqlite3.connect(db, isolation_level=None)
    shell.execute("BEGIN EXCLUSIVE")
    try:
        for n in range(1, 6):
            respond(n)
        wait_for(lambda: pipeline.stats.group("store").get("deferred", 0) >= 5, "held")
        for change in range(changes):
            jsonl = str(tmp_path / f"events-{change}.jsonl")
            pipeline.configure(opts(fp_sqlite=str(db), fp_jsonl=jsonl), {"fp_jsonl"}, [KEY])
            respond(10 + change)
        time.sleep(1)  # the lock outlasts the retired writers' patience
        pipeline.background.join()
        assert "lost" not in pipeline.stats.group("store")
    finally:
        shell.execute("ROLLBACK")
        shell.close()
    respond(20)
    pipeline.close(0)
    stored = [r["request_id"] for r in read_records(str(db))]
    assert sorted(stored) == sorted(ids)
    assert "lost" not in pipeline.stats.group("store")


def test_rows_handed_over_just_before_shutdown_get_the_close_patience(tmp_path: Path) -> None:
    """The tap stops right after the change: the new writer closed first (holding
    nothing), and the retired store's rows, handed to it once closed, were counted lost
    at once, where the README gives what is held at shutdown 5 s more (a regression of
    the handover, found by a hunt)."""
    import sqlite3

    db = tmp_path / "events.sqlite3"
    pipeline = Pipeline()
    pipeline.configure(opts(fp_sqlite=str(db)), OPTIONS, [KEY])
    ids = []
    shell = sqlite3.connect(db, isolation_level=None, check_same_thread=False)
    shell.execute("BEGIN EXCLUSIVE")
    released = threading.Event()

    def release_later() -> None:
        time.sleep(1.0)
        shell.execute("ROLLBACK")
        shell.close()
        released.set()

    try:
        for n in range(3):
            body, event = fp_body()
            ids.append(event["event_id"])
            assert pipeline.inspect(info(body, n)) is not None
        deadline = time.monotonic() + 30
        while pipeline.stats.group("store").get("deferred", 0) < 3:
            assert time.monotonic() < deadline, pipeline.snapshot()
            time.sleep(0.02)
        jsonl = str(tmp_path / "e.jsonl")
        pipeline.configure(opts(fp_sqlite=str(db), fp_jsonl=jsonl), {"fp_jsonl"}, [KEY])
        threading.Thread(target=release_later, daemon=True).start()
        pipeline.close(0)
    finally:
        released.wait(10)
    assert "lost" not in pipeline.stats.group("store")
    assert sorted(r["request_id"] for r in read_records(str(db))) == sorted(ids)


def test_records_held_for_a_store_the_change_moved_elsewhere_are_given_up_on_close(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Another file: the new writer cannot take them; the retired store gives them its
    patience, then counts them lost, as before."""
    import sqlite3

    from fp_core import store as store_module

    monkeypatch.setattr(store_module, "CLOSE_PATIENCE", 0.3)
    db = tmp_path / "events.sqlite3"
    pipeline = Pipeline()
    pipeline.configure(opts(fp_sqlite=str(db)), OPTIONS, [KEY])
    shell = sqlite3.connect(db, isolation_level=None)
    shell.execute("BEGIN EXCLUSIVE")
    try:
        pipeline.inspect(info(fp_body()[0]))
        deadline = time.monotonic() + 30
        while not pipeline.stats.group("store").get("deferred"):
            assert time.monotonic() < deadline
            time.sleep(0.02)
        other = str(tmp_path / "other.sqlite3")
        pipeline.configure(opts(fp_sqlite=other), {"fp_sqlite"}, [KEY])
        pipeline.background.join()
    finally:
        shell.execute("ROLLBACK")
        shell.close()
    pipeline.close(0)
    assert pipeline.stats.group("store")["lost"] == 1


def test_fp_state_dir_changed_to_another_path_of_the_same_directory_is_no_change(
    tmp_path: Path,
) -> None:
    """A symlink to the directory in use: a second spool was opened there, waited 5 s for
    the lock this tap holds itself, and the change was refused as "in use by another
    fp-tap" (found by a sharing hunt)."""
    state, alias = tmp_path / "state", tmp_path / "alias"
    state.mkdir(mode=0o700)
    alias.symlink_to(state)
    url = "http://127.0.0.1:9/hook"
    pipeline = Pipeline()
    try:
        pipeline.configure(opts(fp_webhook_url=url, fp_state_dir=str(state)), OPTIONS, [KEY])
        delivery = pipeline.delivery
        began = time.monotonic()
        pipeline.configure(opts(fp_webhook_url=url, fp_state_dir=str(alias)), {"fp_state_dir"})
        assert time.monotonic() - began < 2
        assert pipeline.delivery is delivery
        other = tmp_path / "other"
        pipeline.configure(opts(fp_webhook_url=url, fp_state_dir=str(other)), {"fp_state_dir"})
        assert pipeline.delivery is not delivery  # a real change still moves the spool
        assert (other / "webhook-spool.sqlite3").exists()
    finally:
        pipeline.close(0)


def test_webhook_events_the_spool_never_took_are_lost_when_it_closes(tmp_path: Path) -> None:
    import sqlite3

    from fp_core.spool import SPOOL_FILE

    state = tmp_path / "state"
    pipeline = Pipeline()
    webhook = {"fp_webhook_url": "http://127.0.0.1:9/hook", "fp_state_dir": str(state)}
    pipeline.configure(opts(**webhook), OPTIONS, [KEY])
    shell = sqlite3.connect(state / SPOOL_FILE, isolation_level=None)
    shell.execute("BEGIN EXCLUSIVE")
    try:
        pipeline.inspect(info(fp_body()[0]))
        pipeline.close(0)
    finally:
        shell.execute("ROLLBACK")
        shell.close()
    assert pipeline.stats.group("webhook")["lost"] == 1


def test_an_event_with_a_timestamp_of_thousands_of_digits_is_written_with_its_batch(
    tmp_path: Path,
) -> None:
    """Authenticated (it takes the key), so the tap accepts it; its age had 4,301 digits,
    which no sink could encode: the whole batch was lost in JSONL, SQLite and the
    webhook spool (found by a fuzz hunt)."""
    from fp_core.sealed import seal_event

    def body(request_id: str, timestamp: int) -> bytes:
        sealed = seal_event({"event_id": request_id, "timestamp": timestamp}, KEY)
        return json.dumps({"event_id": request_id, "sealed_result": sealed}).encode()

    now = int(time.time() * 1000)
    jsonl, db = tmp_path / "out.jsonl", tmp_path / "store.db"
    pipeline = Pipeline()
    hook = {"fp_webhook_url": "http://127.0.0.1:9/hook", "fp_state_dir": str(tmp_path / "s")}
    pipeline.configure(opts(fp_jsonl=str(jsonl), fp_sqlite=str(db), **hook), OPTIONS, [KEY])
    try:
        assert pipeline.inspect(info(body("before", now), 1)) is not None
        huge = pipeline.inspect(info(body("huge", -(10**4299) - 1), 2))
        assert pipeline.inspect(info(body("after", now), 3)) is not None
    finally:
        pipeline.close(0)
    assert huge is not None
    assert huge["ok"] is True
    assert (huge["summary"]["timestamp"], huge["checks"]["age_ms"]) == (None, None)
    assert huge["checks"]["fresh"] is None
    assert "sink_errors" not in pipeline.snapshot()
    assert [json.loads(line)["request_id"] for line in jsonl.read_text().splitlines()] == [
        "before",
        "huge",
        "after",
    ]
    assert len(list(read_records(str(db)))) == 3
    assert pipeline.stats.group("webhook")["spooled"] == 3
