"""A real mitmdump with the addon between a real HTTP client and the stand-in endpoint."""

from __future__ import annotations

import contextlib
import functools
import json
import os
import re
import signal
import ssl
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
from mitmproxy import http
from mitmproxy import io as mitmio

from fp_core.store import read_records
from scripts.harness import (
    MitmdumpConfig,
    Service,
    addon_summary,
    children,
    make_tls_files,
    mitmproxy_ca,
    start_endpoint,
    start_mitmdump,
)
from tests.e2e.conftest import (
    Keys,
    comparable_headers,
    fetch,
    one_more_record,
    read_jsonl,
    reverse_tap,
    same_as_direct,
    secret_forms,
)

pytestmark = pytest.mark.e2e

SECRET = "e2e-proxy-secret-3c1d9a"
LINE_PROBE = Path(__file__).with_name("line_probe.py")
#: A record line as mitmproxy's terminal log prints it (no colours: not a terminal).
RECORD_LINE = re.compile(
    r"\[\d\d:\d\d:\d\d\.\d{3}\] fp v[34] \S+ "
    r"(trusted|suspicious \([a-z_,]+\)|error [a-z0-9_]+:) .+ \[flow [0-9a-f-]{36}\]"
)

# (case, api, encoding) -> what the record must say: a verdict with reasons, or an error kind.
EXPECTED: list[tuple[str, str, str, str]] = [
    ("ok", "v4", "identity", "trusted"),
    ("ok", "v3", "gzip", "trusted"),
    ("good_bot", "v4", "br", "trusted"),
    ("bad_bot", "v3", "zstd", "suspicious:bad_bot"),
    ("mismatch", "v4", "deflate", "suspicious:id_mismatch"),
    ("stale", "v4", "gzip", "suspicious:stale"),
    ("replayed", "v3", "identity", "suspicious:replayed"),
    ("wrong_key", "v4", "identity", "error:decrypt_failed"),
    ("bad_base64", "v3", "identity", "error:bad_base64"),
    ("bad_header", "v4", "br", "error:invalid_header"),
    ("truncated", "v4", "identity", "error:decrypt_failed"),
    ("not_deflate", "v3", "identity", "error:decompress_failed"),
    ("not_json", "v4", "zstd", "error:invalid_json"),
    ("not_event", "v4", "identity", "error:not_an_event"),
    ("bomb", "v4", "gzip", "error:too_large"),
    ("plain", "v4", "identity", "-"),
    ("html", "v4", "gzip", "-"),
    ("empty", "v4", "identity", "-"),
    ("huge", "v4", "gzip", "-"),
    ("garbage", "v4", "identity", "-"),
]


def expectation(record: dict[str, Any]) -> str:
    if not record["ok"]:
        return f"error:{record['error']['kind']}"
    reasons = ",".join(record["reasons"])
    return f"{record['verdict']}:{reasons}" if reasons else record["verdict"]


def no_secrets_in(paths: list[Path], keys: Keys) -> None:
    forms = [SECRET.encode(), *secret_forms(keys.key.raw())]
    for path in paths:
        data = path.read_bytes()
        for form in forms:
            assert form not in data, f"a secret leaked into {path.name}"


def run_batch(
    proxy_url: str, endpoint_url: str, opener: Any = None, direct_opener: Any = None
) -> dict[str, str]:
    """Every case direct and through the proxy; the client must get identical bytes."""
    expected_by_request_id: dict[str, str] = {}
    for seed, (case, api, enc, want) in enumerate(EXPECTED):
        now = int(time.time() * 1000)
        query = f"/agent/v4?case={case}&api={api}&encoding={enc}&seed={seed}&ts={now}&ii=x"
        direct = fetch(endpoint_url + query, opener=direct_opener)
        proxied = fetch(proxy_url + query, headers={"FPJS-Proxy-Secret": SECRET}, opener=opener)
        assert proxied.status == direct.status, case
        assert proxied.body == direct.body, f"{case}: the body changed in transit"
        assert comparable_headers(proxied.headers) == comparable_headers(direct.headers), case
        request_id = {k.lower(): v for k, v in direct.headers}.get("x-stand-in-request-id", "")
        if want != "-":
            assert request_id
            expected_by_request_id[request_id] = want
    return expected_by_request_id


def check_records(records: list[dict[str, Any]], expected: dict[str, str]) -> None:
    assert len(records) == len(expected)
    got = {r["request_id"]: expectation(r) for r in records}
    assert got == expected


def summary_of(log: str) -> dict[str, Any]:
    """The addon's shutdown counters; the line must be there."""
    summary = addon_summary(log)
    assert summary, "no 'fp-tap summary' line in mitmdump's output"
    return summary


@pytest.mark.parametrize("worker", [True, False], ids=["worker", "in-process"])
def test_reverse_proxy_end_to_end(
    tmp_path: Path, keys: Keys, endpoint: Service, worker: bool
) -> None:
    jsonl, flows = tmp_path / "events.jsonl", tmp_path / "flows.mitm"
    proxy = start_mitmdump(
        tmp_path,
        MitmdumpConfig(
            mode=f"reverse:http://127.0.0.1:{endpoint.port}",
            options={
                "fp_keys_file": str(keys.file),
                "fp_jsonl": str(jsonl),
                "fp_worker": worker,
                "termlog_verbosity": "debug",
            },
            save_flows=flows,
            extra_args=["-s", str(LINE_PROBE)],
        ),
    )
    try:
        workers = children(proxy.proc.pid)
        assert len(workers) == (1 if worker else 0)
        expected = run_batch(f"http://127.0.0.1:{proxy.port}", f"http://127.0.0.1:{endpoint.port}")
    finally:
        assert proxy.stop(signal.SIGTERM) == 0
    for pid in workers:  # the worker wrote out and ended with mitmdump
        assert not Path(f"/proc/{pid}").exists() or "Z" in Path(f"/proc/{pid}/stat").read_text()
    check_records(read_jsonl(jsonl), expected)
    assert jsonl.stat().st_mode & 0o777 == 0o600

    log = proxy.output()
    summary = summary_of(log)
    assert summary["open_responses"] == len(expected)
    assert summary["written"] == {"jsonl": len(expected)}
    assert summary["errors"]["decrypt_failed"] == 2
    assert summary["responses"] == len(EXPECTED)
    for request_id, want in expected.items():
        assert sum(request_id in line and "fp " in line for line in log.splitlines()) == 1, want
    # Each line as mitmproxy's terminal log prints it, written past logging.
    lines = [line for line in log.splitlines() if " fp v" in line]
    assert len(lines) == len(expected)
    assert all(RECORD_LINE.fullmatch(line) for line in lines), lines
    assert "record lines through logging: 0" in log

    # The endpoint got the proxy secret (the upstream request was untouched) ...
    answers = read_jsonl(tmp_path / "answers.jsonl")
    assert sum(a["proxy_secret_present"] for a in answers) == len(EXPECTED)
    # ... while nothing the tap or mitmproxy wrote holds it, or the key.
    no_secrets_in([jsonl, flows, proxy.log], keys)

    with flows.open("rb") as handle:
        saved = [f for f in mitmio.FlowReader(handle).stream() if isinstance(f, http.HTTPFlow)]
    assert len(saved) == len(EXPECTED)
    annotated = [f for f in saved if "fp" in f.metadata]
    assert len(annotated) == len(expected)
    assert all(f.request.headers["FPJS-Proxy-Secret"] == "[redacted]" for f in saved)
    assert all("event" not in f.metadata["fp"] for f in annotated)


def test_https_interception_in_regular_proxy_mode(tmp_path: Path, keys: Keys) -> None:
    ca, cert, key = make_tls_files(tmp_path / "tls")
    endpoint = start_endpoint(tmp_path, keys.file, tls=(cert, key), log=tmp_path / "answers.jsonl")
    jsonl = tmp_path / "events.jsonl"
    proxy = start_mitmdump(
        tmp_path,
        MitmdumpConfig(
            mode="regular",
            options={
                "fp_keys_file": str(keys.file),
                "fp_jsonl": str(jsonl),
                "ssl_verify_upstream_trusted_ca": str(ca),
            },
        ),
    )
    try:
        through_proxy = urllib.request.build_opener(
            urllib.request.ProxyHandler({"https": f"http://127.0.0.1:{proxy.port}"}),
            urllib.request.HTTPSHandler(
                context=ssl.create_default_context(cafile=mitmproxy_ca(tmp_path))
            ),
        )
        direct = urllib.request.build_opener(
            urllib.request.ProxyHandler({}),
            urllib.request.HTTPSHandler(context=ssl.create_default_context(cafile=ca)),
        )
        url = f"https://127.0.0.1:{endpoint.port}"
        expected = run_batch(url, url, opener=through_proxy, direct_opener=direct)
    finally:
        assert proxy.stop() == 0
        endpoint.kill()
    check_records(read_jsonl(jsonl), expected)
    no_secrets_in([jsonl, proxy.log], keys)


def test_keys_from_environment_and_jsonl_on_stdout(
    tmp_path: Path, keys: Keys, endpoint: Service
) -> None:
    proxy = start_mitmdump(
        tmp_path,
        MitmdumpConfig(
            mode=f"reverse:http://127.0.0.1:{endpoint.port}",
            options={"fp_jsonl": "-", "fp_include_event": False},
            keys_env=keys.key.to_base64(),
        ),
    )
    try:
        reply = fetch(f"http://127.0.0.1:{proxy.port}/?case=ok&api=v3")
        assert reply.status == 200
    finally:
        assert proxy.stop() == 0
    lines = [json.loads(x) for x in proxy.output().splitlines() if x.startswith('{"time"')]
    assert len(lines) == 1
    assert lines[0]["ok"] is True
    assert lines[0]["key_id"] == keys.key.key_id
    assert "event" not in lines[0]
    no_secrets_in([proxy.log], keys)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"fp_filter": "~d ("}, "fp_filter"),
        ({"fp_max_age": "0"}, "fp_max_age"),
        ({"fp_origins": "ftp:/nope"}, "fp_origins"),
    ],
)
def test_bad_options_stop_mitmdump_at_start(
    tmp_path: Path, options: dict[str, str], message: str
) -> None:
    output = failed_start(tmp_path, options)
    assert len([line for line in output.splitlines() if message in line]) == 1


def failed_start(tmp_path: Path, options: dict[str, str]) -> str:
    """Start mitmdump with bad options: it must exit non-zero on its own, without a
    traceback; its output."""
    proxy = start_mitmdump(tmp_path, MitmdumpConfig(mode="regular", options=options), wait=False)
    try:
        assert proxy.wait_exit(60) != 0
    finally:
        proxy.kill()
    output = proxy.output()
    assert "Traceback" not in output
    return output


def test_bad_key_file_stops_mitmdump_without_showing_the_key(tmp_path: Path) -> None:
    bad = tmp_path / "keys.txt"
    bad.write_text(
        "# one good, one short\nAAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8=\nc2hvcnQta2V5\n"
    )
    text = failed_start(tmp_path, {"fp_keys_file": str(bad)})
    assert "line 3" in text
    assert "c2hvcnQta2V5" not in text
    assert "AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8" not in text


@pytest.mark.parametrize("worker", [True, False], ids=["worker", "in-process"])
def test_a_rotated_jsonl_file_is_started_again(
    tmp_path: Path, keys: Keys, endpoint: Service, worker: bool
) -> None:
    """logrotate's way: the file is moved away while mitmdump runs; the records after
    that go to a new file at the path, and none is lost or written twice."""
    jsonl, rotated = tmp_path / "events.jsonl", tmp_path / "events.jsonl.1"
    proxy = reverse_tap(
        tmp_path, endpoint, fp_keys_file=str(keys.file), fp_jsonl=str(jsonl), fp_worker=worker
    )

    def send(seeds: range) -> list[str]:
        ids = []
        for seed in seeds:
            reply = fetch(f"http://127.0.0.1:{proxy.port}/?case=ok&seed={seed}")
            assert reply.status == 200
            ids.append({k.lower(): v for k, v in reply.headers}["x-stand-in-request-id"])
        return ids

    def ids_in(path: Path, count: int) -> list[str]:
        deadline = time.monotonic() + 30
        while len(records := read_jsonl(path)) < count:
            assert time.monotonic() < deadline, f"{path.name}: {len(records)} of {count} records"
            time.sleep(0.05)
        return [r["request_id"] for r in records]

    try:
        before = send(range(5))
        assert ids_in(jsonl, 5) == before
        jsonl.rename(rotated)
        after = send(range(5, 12))
        assert ids_in(jsonl, 7) == after
    finally:
        assert proxy.stop(signal.SIGTERM) == 0
    assert [r["request_id"] for r in read_jsonl(rotated)] == before
    assert [r["request_id"] for r in read_jsonl(jsonl)] == after
    assert jsonl.stat().st_mode & 0o777 == 0o600
    assert proxy.output().count("was moved or removed; records go to a new file there") == 1
    assert summary_of(proxy.output())["written"] == {"jsonl": 12}


def test_a_headless_tap_logs_its_counters_every_interval(
    tmp_path: Path, keys: Keys, endpoint: Service
) -> None:
    proxy = reverse_tap(tmp_path, endpoint, fp_keys_file=str(keys.file), fp_stats_every=1)
    try:
        for seed in range(3):
            assert fetch(f"http://127.0.0.1:{proxy.port}/?case=ok&seed={seed}").status == 200
        line = proxy.wait_for(re.compile(r'fp-tap stats: (\{.*"open_responses": 3.*\})'))
    finally:
        assert proxy.stop(signal.SIGTERM) == 0
    counters = json.loads(line.group(1))
    assert (counters["responses"], counters["unsealed"]) == (3, 3)
    assert counters["verdicts"] == {"trusted": 3}
    assert summary_of(proxy.output())["open_responses"] == 3


def test_a_killed_worker_is_replaced_and_no_response_is_lost(
    tmp_path: Path, keys: Keys, endpoint: Service
) -> None:
    """The worker is killed between two responses: a new one takes over, made while the
    proxy goes on serving, and every response after it has its record."""
    jsonl = tmp_path / "events.jsonl"
    proxy = reverse_tap(
        tmp_path, endpoint, fp_keys_file=str(keys.file), fp_jsonl=str(jsonl), fp_worker_restart=1
    )
    try:
        for seed in range(3):
            same_as_direct(proxy, endpoint, seed)
        one_more_record(jsonl, 2)  # the worker holds nothing: none lost with it
        (first,) = children(proxy.proc.pid)
        time.sleep(1)  # it has run fp_worker_restart seconds
        os.kill(first, signal.SIGKILL)
        for seed in range(3, 10):  # the first ones while the new worker is being made
            same_as_direct(proxy, endpoint, seed)
        one_more_record(jsonl, 9)
        (second,) = children(proxy.proc.pid)
        assert second != first
    finally:
        assert proxy.stop(signal.SIGTERM) == 0
    records = read_jsonl(jsonl)
    assert len({r["request_id"] for r in records}) == len(records) == 10
    assert all(r["verdict"] == "trusted" for r in records)
    log = proxy.output()
    assert (
        "the worker process stopped (exit code -9) with 0 response(s) not inspected; "
        "starting a new one" in log
    )
    summary = summary_of(log)
    assert summary["errors"] == {"worker_exit": 1}
    assert summary["restarted"] == {"worker": 1}
    assert (summary["open_responses"], summary["written"]) == (10, {"jsonl": 10})
    assert summary.get("dropped", 0) == 0


#: A sitecustomize that holds the worker process (not mitmdump) at its start, then says
#: when it let go.
SLOW_START = """
import pathlib, sys, time
if "fp_core.worker" in sys.orig_argv:
    time.sleep({delay})
    pathlib.Path({marker!r}).write_text("the worker goes on starting")
"""


def test_without_outputs_the_worker_starts_while_mitmdump_serves(
    tmp_path: Path, keys: Keys, endpoint: Service
) -> None:
    """No output set: the worker starts once mitmdump listens, off its event loop. A
    worker slow to start (held 3 s here) does not stop mitmdump from serving meanwhile;
    open responses that come meanwhile, held since flows are saved, wait for it and get
    their records. None is inspected in mitmdump's process or lost."""
    site, marker, flows = tmp_path / "site", tmp_path / "worker-started", tmp_path / "flows"
    site.mkdir()
    (site / "sitecustomize.py").write_text(SLOW_START.format(delay=3, marker=str(marker)))
    proxy = start_mitmdump(
        tmp_path,
        MitmdumpConfig(
            mode=f"reverse:http://127.0.0.1:{endpoint.port}",
            options={"fp_keys_file": str(keys.file)},
            save_flows=flows,
            env={"PYTHONPATH": str(site)},
        ),
    )
    try:
        plain = fetch(f"http://127.0.0.1:{proxy.port}/?case=plain&api=v4&seed=0")
        assert plain.status == 200
        assert not marker.exists(), "served while the worker was still starting"
        with ThreadPoolExecutor(4) as pool:
            list(pool.map(functools.partial(same_as_direct, proxy, endpoint), range(8)))
        assert marker.exists()
        assert len(children(proxy.proc.pid)) == 1, "the worker runs"
    finally:
        assert proxy.stop(signal.SIGTERM) == 0
    log = proxy.output()
    assert "unsealing in mitmproxy's process" not in log
    summary = summary_of(log)
    assert (summary["responses"], summary["open_responses"], summary["unsealed"]) == (9, 8, 8)
    assert summary.get("dropped", 0) == 0
    assert "restarted" not in summary
    with flows.open("rb") as handle:
        saved = [f for f in mitmio.FlowReader(handle).stream() if isinstance(f, http.HTTPFlow)]
    assert len(saved) == 9
    opened = [f for f in saved if "fp" in f.metadata]
    assert len(opened) == 8, "each open response held for its record"
    assert all(f.metadata["fp"]["verdict"] == "trusted" for f in opened)


def test_sqlite_rows_older_than_fp_sqlite_keep_are_deleted_as_it_runs(
    tmp_path: Path, keys: Keys, endpoint: Service
) -> None:
    db = tmp_path / "events.sqlite3"
    proxy = reverse_tap(
        tmp_path,
        endpoint,
        fp_keys_file=str(keys.file),
        fp_sqlite=str(db),
        fp_sqlite_keep=2,
        fp_stats_every=1,
    )
    try:
        for seed in range(3):
            same_as_direct(proxy, endpoint, seed)
        proxy.wait_for(re.compile(r'fp-tap stats: \{.*"pruned": 3'))  # 2 s old, and gone
        assert list(read_records(str(db))) == []
        same_as_direct(proxy, endpoint, 3)
        deadline = time.monotonic() + 30
        while not (rows := list(read_records(str(db)))):
            assert time.monotonic() < deadline, "the new record never came"
            time.sleep(0.05)
        assert len(rows) == 1, "a new row next to none of the old ones"
    finally:
        assert proxy.stop(signal.SIGTERM) == 0
    summary = summary_of(proxy.output())
    assert summary["written"] == {"sqlite": 4}
    assert summary["store"]["pruned"] >= 3


class UntilCloseUpstream:
    """Answers one request with a fresh open response framed by the end of the
    connection (HTTP/1.0, no Content-Length), and keeps the connection open until closed:
    mitmproxy has the whole body but the response ends only with the connection."""

    def __init__(self, key: Any) -> None:
        import threading
        from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

        from scripts.endpoint import build_response

        self.release = threading.Event()
        self.sent = threading.Event()
        upstream = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                self.rfile.read(int(self.headers.get("Content-Length") or 0))
                status, headers, body, _ = build_response("ok", "v4", "identity", None, None, key)
                self.send_response(status)
                for name, value in headers.items():
                    if name.lower() != "content-length":
                        self.send_header(name, value)
                self.end_headers()
                self.wfile.write(body)
                self.wfile.flush()
                upstream.sent.set()
                upstream.release.wait(60)

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.port = self.server.server_address[1]
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.release.set()
        self.server.shutdown()
        self.server.server_close()


def test_an_open_response_mitmproxy_finishes_after_the_summary_is_said_and_counted(
    tmp_path: Path, keys: Keys
) -> None:
    """At shutdown mitmproxy cancels its connections after the addons' done hooks, which
    finishes a response whose end is the connection's: fp-tap's hook then runs with its
    outputs closed. Such a response was counted where nobody would see it (found by a
    hunt); now it is said on stderr."""
    import threading

    upstream = UntilCloseUpstream(keys.key)
    jsonl = tmp_path / "events.jsonl"
    proxy = reverse_tap(tmp_path, upstream, fp_keys_file=str(keys.file), fp_jsonl=str(jsonl))
    try:
        replies: list[Any] = []

        def ask() -> None:
            with contextlib.suppress(OSError):  # the client may see the proxy go first
                replies.append(fetch(f"http://127.0.0.1:{proxy.port}/agent"))

        client = threading.Thread(target=ask)
        client.start()
        assert upstream.sent.wait(60)
        time.sleep(0.5)  # mitmdump has the body, and waits for the connection to end
        os.kill(proxy.proc.pid, signal.SIGTERM)
        assert proxy.wait_exit(60) == 0
        client.join(60)
    finally:
        proxy.kill()
        upstream.close()
    after = proxy.output().split("fp-tap summary:")[-1]
    assert "<< HTTP/1.0 200 OK" in after, "precondition: finished after fp-tap's done hook"
    assert read_jsonl(jsonl) == []
    assert "fp-tap: an open response mitmproxy finished after fp-tap's summary" in after
    assert "counted as dropped" in after
