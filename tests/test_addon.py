"""fp_addon.FingerprintTap inside mitmproxy's test harness (taddons / tflow)."""

from __future__ import annotations

import contextlib
import copy
import io
import json
import logging
import re
import sqlite3
import threading
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest
from _pytest.logging import LogCaptureHandler
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from mitmproxy import contentviews, exceptions, http
from mitmproxy import io as mitmio
from mitmproxy.addons.errorcheck import ErrorCheckHandler
from mitmproxy.addons.termlog import TermLogHandler
from mitmproxy.log import LegacyLogEvents, MitmFormatter
from mitmproxy.net import encoding
from mitmproxy.test import taddons, tflow, tutils

import fp_addon
from fp_core import jsontext, seal_event
from fp_core.generate import generate_event, open_response_body
from fp_core.hostile import hostile_response
from fp_core.keys import ENV_VAR, DecryptionKey
from fp_core.redact import REDACTED
from fp_core.sealed import deflate_raw, seal_raw

KEY = DecryptionKey.generate()
SECRET = "proxy-secret-value-9f8e7d"
#: The time of day in a log line, as mitmproxy's terminal log writes it.
STAMP = re.compile(r"\d\d:\d\d:\d\d\.\d{3}")


@pytest.fixture
def addon(
    keyfile: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> Iterator[tuple[fp_addon.FingerprintTap, taddons.context]]:
    monkeypatch.delenv(ENV_VAR, raising=False)
    tap = fp_addon.FingerprintTap()
    with taddons.context(tap) as tctx:
        tctx.configure(
            tap,
            fp_keys_file=str(keyfile),
            fp_jsonl=str(tmp_path / "out.jsonl"),
            fp_worker=False,  # in-process: the hooks' effects are there when they return
        )
        yield tap, tctx
        if tap.writer is not None:
            tap.writer.close()


def fp_body(
    api: str = "v4", *, key: DecryptionKey = KEY, **kw: Any
) -> tuple[bytes, dict[str, Any]]:
    event = generate_event(api, rng=kw.pop("rng", None), **kw)  # type: ignore[arg-type]
    rid = event["event_id"] if api == "v4" else event["products"]["botd"]["data"]["requestId"]
    return json.dumps(open_response_body(api, rid, seal_event(event, key))).encode(), event  # type: ignore[arg-type]


def make_flow(
    body: bytes,
    *,
    content_encoding: str | None = None,
    status: int = 200,
    request_headers: Sequence[tuple[bytes, bytes]] = (),
    when: float | None = None,
) -> http.HTTPFlow:
    raw = encoding.encode(body, content_encoding) if content_encoding else body
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(raw)).encode())]
    if content_encoding:
        headers.append((b"content-encoding", content_encoding.encode()))
    t = time.time() if when is None else when
    response = tutils.tresp(
        status_code=status,
        headers=http.Headers(headers),
        content=b"",
        timestamp_start=t,
        timestamp_end=t,
    )
    response.raw_content = raw
    request = tutils.treq(
        method=b"POST",
        host="fp.shop.example",
        port=443,
        scheme=b"https",
        path=b"/agent/v4?ii=fingerprint-pro-cloudflare%2F2.0.0",
        headers=http.Headers([(b"host", b"fp.shop.example"), *request_headers]),
    )
    return tflow.tflow(req=request, resp=response)


def response(flow: http.HTTPFlow) -> http.Response:
    assert flow.response is not None
    return flow.response


def state(flow: http.HTTPFlow) -> dict[str, Any]:
    """Everything about the flow except what the addon may set."""
    s = copy.deepcopy(flow.get_state())
    s["metadata"].pop("fp", None)
    s["metadata"].pop("fp_marked", None)
    s.pop("comment")
    s.pop("marked")
    return s


def run(tap: fp_addon.FingerprintTap, flow: http.HTTPFlow) -> http.HTTPFlow:
    before = state(flow)
    tap.responseheaders(flow)
    tap.response(flow)
    assert state(flow) == before, "the addon changed the flow"
    return flow


def records(tap: fp_addon.FingerprintTap, path: Path) -> list[dict[str, Any]]:
    assert tap.pipeline is not None
    assert tap.pipeline.writer is not None
    tap.pipeline.writer.close()
    tap.pipeline.writer = None
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.mark.parametrize("content_encoding", [None, "gzip", "deflate", "br", "zstd"])
@pytest.mark.parametrize("api", ["v3", "v4"])
def test_unseals_in_every_encoding(
    addon, tmp_path: Path, content_encoding: str | None, api: str
) -> None:
    tap, _ = addon
    body, event = fp_body(api)
    flow = run(tap, make_flow(body, content_encoding=content_encoding))
    meta = flow.metadata["fp"]
    assert (meta["ok"], meta["verdict"], meta["key_id"]) == (True, "trusted", KEY.key_id)
    assert "event" not in meta  # saved flow files must not carry the plaintext
    assert flow.comment.startswith("fp trusted")
    assert flow.marked == ""
    (record,) = records(tap, tmp_path / "out.jsonl")
    assert record["event"] == event
    assert record["api"] == api
    assert (record["host"], record["path"], record["method"]) == (
        "fp.shop.example",
        "/agent/v4",
        "POST",
    )
    assert record["checks"]["id_match"] is True


@pytest.mark.parametrize("status", [200, 400, 403, 500])
def test_any_status(addon, status: int) -> None:
    tap, _ = addon
    flow = run(tap, make_flow(fp_body()[0], status=status))
    assert flow.metadata["fp"]["ok"] is True


def hostile_bodies() -> dict[str, bytes]:
    event = generate_event("v4", rng=1)
    rid = event["event_id"]

    def wrap(sealed: str) -> bytes:
        return json.dumps({"event_id": rid, "sealed_result": sealed}).encode()

    import base64

    def b64(raw: bytes) -> str:
        return base64.b64encode(raw).decode()

    return {
        "bad_base64": wrap("%%%not base64%%%"),
        "invalid_header": wrap(b64(b"\x00" * 64)),
        "too_short": wrap(b64(bytes.fromhex("9e85dced") + b"\x00" * 8)),
        "decrypt_failed": wrap(seal_event(event, DecryptionKey.generate())),
        "decompress_failed": wrap(b64(seal_raw(b"not deflate", KEY))),
        "invalid_json": wrap(b64(seal_raw(deflate_raw(b"{nope"), KEY))),
        "not_an_event": wrap(b64(seal_raw(deflate_raw(b"[1,2,3]"), KEY))),
        "too_large": wrap(b64(seal_raw(deflate_raw(b" " * (5 * 1024 * 1024)), KEY))),
    }


@pytest.mark.parametrize("kind", list(hostile_bodies()))
def test_every_error_kind_is_recorded_logged_once_and_marked(
    addon, tmp_path: Path, caplog: pytest.LogCaptureFixture, kind: str
) -> None:
    tap, _ = addon
    caplog.set_level(logging.INFO)
    flow = run(tap, make_flow(hostile_bodies()[kind], content_encoding="gzip"))
    meta = flow.metadata["fp"]
    assert (meta["ok"], meta["verdict"], meta["error"]["kind"]) == (False, "error", kind)
    assert flow.marked == fp_addon.MARK_ERROR
    assert flow.comment == f"fp error: {kind}"
    warnings = [
        r for r in caplog.records if r.levelno == logging.WARNING and flow.id in r.getMessage()
    ]
    assert len(warnings) == 1
    assert kind in warnings[0].getMessage()
    assert tap.stats.group("errors") == {kind: 1}
    (record,) = records(tap, tmp_path / "out.jsonl")
    assert record["error"]["kind"] == kind
    assert "event" not in record


def test_no_keys_warns_once_and_records_no_keys(tmp_path: Path, monkeypatch, caplog) -> None:
    monkeypatch.delenv(ENV_VAR, raising=False)
    caplog.set_level(logging.INFO)
    tap = fp_addon.FingerprintTap()
    with taddons.context(tap) as tctx:
        tctx.configure(tap, fp_jsonl=str(tmp_path / "out.jsonl"), fp_worker=False)
        flow = run(tap, make_flow(fp_body()[0]))
        assert flow.metadata["fp"]["error"]["kind"] == "no_keys"
        warnings = [r for r in caplog.records if "no decryption keys (set" in r.getMessage()]
        assert len(warnings) == 1, "the warning, once (the record line says no_keys too)"
        tap.done()


def test_a_key_file_without_keys_is_named(tmp_path: Path, monkeypatch, caplog) -> None:
    monkeypatch.delenv(ENV_VAR, raising=False)
    path = tmp_path / "keys.txt"
    path.write_text("# the key goes here\n\n")
    path.chmod(0o600)
    tap = fp_addon.FingerprintTap()
    with taddons.context(tap) as tctx:
        tctx.configure(tap, fp_keys_file=str(path), fp_worker=False)
        flow = run(tap, make_flow(fp_body()[0]))
    assert flow.metadata["fp"]["error"]["kind"] == "no_keys"
    warnings = [r.getMessage() for r in caplog.records if "holds no key" in r.getMessage()]
    assert warnings == [
        f"fp-tap: key file {path} holds no key (nor does {ENV_VAR}): open responses will be "
        "recorded with error no_keys"
    ]


def test_with_nothing_left_to_inspect_with_responses_are_counted_dropped(addon) -> None:
    """The worker died and its fallback could not start: nothing unseals, but nothing
    goes uncounted either."""
    tap, _ = addon
    pipeline = tap.pipeline
    tap.pipeline = None
    flow = run(tap, make_flow(fp_body()[0]))
    assert "fp" not in flow.metadata
    assert tap.stats.get("dropped") == 1
    assert tap.stats.get("responses") == 1
    tap.pipeline = pipeline


def test_keys_from_environment(monkeypatch, tmp_path: Path) -> None:
    other = DecryptionKey.generate()
    monkeypatch.setenv(ENV_VAR, f"{other.to_base64()},{KEY.to_base64()}")
    tap = fp_addon.FingerprintTap()
    with taddons.context(tap) as tctx:
        # As at startup: keys come from the environment.
        tctx.configure(tap, fp_keys_file="", fp_worker=False)
        flow = run(tap, make_flow(fp_body()[0]))
        assert flow.metadata["fp"]["key_id"] == KEY.key_id
        tap.done()


def test_ordinary_traffic_is_ignored_silently(addon, tmp_path: Path, caplog) -> None:
    tap, _ = addon
    caplog.set_level(logging.DEBUG)
    caplog.clear()
    for body, enc in [
        (b'{"ok": true}', None),
        (b"<html>sealedResult</html>", "gzip"),
        (b"\xff\xfe\x00garbage", None),
        (b"", None),
        (b'{"requestId": "x"}', "br"),
        (b"not gzip at all", None),
    ]:
        flow = run(tap, make_flow(body, content_encoding=enc))
        assert "fp" not in flow.metadata
        assert (flow.comment, flow.marked) == ("", "")
    assert [r for r in caplog.records if r.name == "fp_addon"] == []
    assert tap.stats.get("responses") == 6
    assert tap.stats.get("open_responses") == 0
    assert records(tap, tmp_path / "out.jsonl") == []


def test_undecodable_and_too_big_bodies_are_skipped(addon) -> None:
    tap, tctx = addon
    broken = make_flow(b"", content_encoding=None)
    broken.response.headers["content-encoding"] = "gzip"
    broken.response.raw_content = b"\x1f\x8b not really gzip"
    run(tap, broken)
    tctx.configure(tap, fp_max_body=1000)
    run(tap, make_flow(fp_body()[0]))  # ~2-3 KB of JSON
    bomb = make_flow(b"{" + b" " * 10_000_000 + b"}", content_encoding="gzip")
    run(tap, bomb)
    assert tap.stats.group("skipped") == {"undecodable": 1, "too_big": 2}
    assert tap.stats.get("open_responses") == 0


def test_streamed_response_is_skipped(addon) -> None:
    tap, _ = addon
    flow = make_flow(b"")
    flow.response.stream = True
    flow.response.raw_content = None
    run(tap, flow)
    assert tap.stats.group("skipped") == {"streamed": 1}


def test_response_less_flow_and_websocket_do_not_break(addon) -> None:
    tap, _ = addon
    flow = tflow.tflow(err=True)
    tap.error(flow)
    tap.response(flow)
    assert "fp" not in flow.metadata


def test_filter_narrows(addon) -> None:
    tap, tctx = addon
    tctx.configure(tap, fp_filter="~d other.example")
    flow = run(tap, make_flow(fp_body()[0]))
    assert "fp" not in flow.metadata
    tctx.configure(tap, fp_filter="~d fp.shop.example & ~m POST")
    flow = run(tap, make_flow(fp_body()[0]))
    assert flow.metadata["fp"]["ok"] is True


@pytest.mark.parametrize(
    ("option", "value", "message"),
    [
        ("fp_filter", "~d (", "fp_filter"),
        ("fp_max_age", 0, "fp_max_age"),
        ("fp_max_body", -1, "fp_max_body"),
        ("fp_queue_size", 0, "fp_queue_size"),
        ("fp_origins", ["not an origin"], "fp_origins"),
        ("fp_jsonl", "/nonexistent-dir/x.jsonl", "fp_jsonl"),
        ("fp_redact", ["visitor_id"], "fp_redact"),
    ],
)
def test_bad_options_are_errors_at_configure_time(
    addon, option: str, value: Any, message: str
) -> None:
    tap, tctx = addon
    with pytest.raises(exceptions.OptionsError, match=message):
        tctx.configure(tap, **{option: value})


def test_a_bad_option_at_script_load_is_one_error_line(addon, tmp_path: Path, caplog) -> None:
    """mitmproxy's script loader configures every option at once and prints whatever
    escapes with a traceback: there the addon logs the message instead; a change
    still raises, so that mitmproxy refuses the value."""
    tap, tctx = addon
    path = tmp_path / "keys.txt"
    path.write_text(KEY.to_base64() + "\n")
    path.chmod(0o600)
    tctx.configure(tap, fp_keys_file=str(path))
    path.unlink()
    caplog.clear()
    tap.configure(set(tctx.options.keys()))
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert errors == [f"fp-tap: key file {path}: cannot read (No such file or directory)"]
    with pytest.raises(exceptions.OptionsError, match="cannot read"):
        tap.configure({"fp_keys_file"})


def test_bad_key_file_names_the_line_not_the_key(addon, tmp_path: Path) -> None:
    tap, tctx = addon
    bad = tmp_path / "bad.txt"
    short = "c2hvcnQga2V5"
    bad.write_text(f"{KEY.to_base64()}\n{short}\n")
    with pytest.raises(exceptions.OptionsError) as info:
        tctx.configure(tap, fp_keys_file=str(bad))
    assert "line 2" in str(info.value)
    assert short not in str(info.value)
    assert KEY.to_base64() not in str(info.value)


def test_open_key_file_warns(tmp_path: Path, caplog, monkeypatch) -> None:
    monkeypatch.delenv(ENV_VAR, raising=False)
    path = tmp_path / "keys.txt"
    path.write_text(KEY.to_base64())
    path.chmod(0o644)
    tap = fp_addon.FingerprintTap()
    with taddons.context(tap) as tctx:
        tctx.configure(tap, fp_keys_file=str(path), fp_worker=False)
    assert any("readable by group or others" in r.getMessage() for r in caplog.records)


def test_proxy_secret_is_masked_after_it_went_upstream(addon, caplog) -> None:
    tap, _ = addon
    caplog.set_level(logging.DEBUG)
    flow = make_flow(fp_body()[0], request_headers=[(b"FPJS-Proxy-Secret", SECRET.encode())])
    response_before = copy.deepcopy(flow.response.get_state())
    tap.responseheaders(flow)
    assert flow.request.headers["FPJS-Proxy-Secret"] == REDACTED
    tap.response(flow)
    assert flow.response.get_state() == response_before
    assert SECRET not in json.dumps(flow.get_state(), default=repr)
    assert SECRET not in caplog.text


def test_proxy_secret_masked_on_error_flows(addon) -> None:
    tap, _ = addon
    flow = tflow.tflow(err=True)
    flow.request.headers["FPJS-Proxy-Secret"] = SECRET
    tap.error(flow)
    assert flow.request.headers["FPJS-Proxy-Secret"] == REDACTED


def test_include_event_false(addon, tmp_path: Path) -> None:
    tap, tctx = addon
    tctx.configure(tap, fp_include_event=False)
    run(tap, make_flow(fp_body()[0]))
    (record,) = records(tap, tmp_path / "out.jsonl")
    assert "event" not in record
    assert record["summary"]["visitor_id"]


def test_verdicts_and_marks(addon) -> None:
    tap, _ = addon
    bad = run(tap, make_flow(fp_body(bot="bad")[0]))
    assert bad.metadata["fp"]["reasons"] == ["bad_bot"]
    assert bad.marked == fp_addon.MARK_SUSPICIOUS
    body, _ = fp_body()
    mismatch = json.loads(body)
    mismatch["event_id"] = "1700000000000.XXXXXX"
    flow = run(tap, make_flow(json.dumps(mismatch).encode()))
    assert flow.metadata["fp"]["reasons"] == ["id_mismatch"]
    assert flow.metadata["fp"]["checks"]["id_match"] is False
    assert flow.marked == fp_addon.MARK_SUSPICIOUS
    # The spliced copy above already used body's sealed result: a replay of it now is a
    # duplicate too, so take a fresh one.
    body, _ = fp_body()
    again = run(tap, make_flow(body))
    dup = run(tap, make_flow(body))
    assert again.metadata["fp"]["checks"]["duplicate"] is False
    assert dup.metadata["fp"]["reasons"] == ["duplicate"]
    assert tap.stats.group("reasons") == {"bad_bot": 1, "id_mismatch": 1, "duplicate": 1}


def test_user_marks_and_comments_are_kept(addon) -> None:
    tap, _ = addon
    flow = make_flow(fp_body(bot="bad")[0])
    flow.marked = ":star:"
    flow.comment = "look at this"
    tap.response(flow)
    assert flow.marked == ":star:"
    assert flow.comment.startswith("look at this\nfp suspicious")


def test_no_exception_escapes_a_hook(addon, monkeypatch, caplog) -> None:
    tap, _ = addon

    def boom(*args: Any, **kwargs: Any) -> None:
        raise RuntimeError("boom")

    assert tap.pipeline is not None
    monkeypatch.setattr(tap.pipeline.tap, "inspect", boom)
    flow = run(tap, make_flow(fp_body()[0]))
    assert "fp" not in flow.metadata
    assert tap.stats.group("errors") == {"internal": 1}
    assert "RuntimeError" in caplog.text


class BlockingSink:
    name = "blocking"

    def __init__(self) -> None:
        self.release = threading.Event()
        self.got: list[dict[str, Any]] = []

    def write(self, records: Sequence[dict[str, Any]]) -> None:
        self.release.wait(10)
        self.got.extend(records)

    def close(self) -> None:
        pass


def test_full_queue_drops_without_blocking_and_counts(addon, caplog) -> None:
    tap, tctx = addon
    tctx.configure(tap, fp_queue_size=2)
    sink = BlockingSink()
    assert tap.writer is not None
    tap.writer.sinks.insert(0, sink)
    for _ in range(10):
        tap.response(make_flow(fp_body()[0]))
    dropped = tap.stats.get("dropped")
    # Accepted: the 2 queued plus what the writer took into the blocked sink before the
    # queue filled (a batch of 0 to 2, depending on when its thread woke up).
    assert 10 - 4 <= dropped <= 10 - 2
    assert "queue full" in caplog.text
    assert json.loads(tap.stats_command())["dropped"] == dropped
    sink.release.set()
    tap.writer.close()
    assert len(sink.got) == 10 - dropped


def test_stats_command(addon) -> None:
    tap, tctx = addon
    run(tap, make_flow(fp_body()[0]))
    run(tap, make_flow(hostile_bodies()["decrypt_failed"]))
    run(tap, make_flow(b"{}"))
    stats = json.loads(tctx.command(tap.stats_command))
    assert stats["responses"] == 3
    assert stats["open_responses"] == 2
    assert stats["unsealed"] == 1
    assert stats["errors"] == {"decrypt_failed": 1}
    assert stats["verdicts"] == {"trusted": 1}


def test_export_command_keeps_the_verdict_seen_at_capture(addon, tmp_path: Path) -> None:
    tap, _ = addon
    body, event = fp_body()
    first, second = run(tap, make_flow(body)), run(tap, make_flow(body))
    other = run(tap, make_flow(b"<html></html>"))
    out = tmp_path / "export.jsonl"
    tap.export_command([first, second, other], str(out))
    tap.done()
    lines = [json.loads(x) for x in out.read_text().splitlines()]
    assert [r["checks"]["duplicate"] for r in lines] == [False, True]
    assert lines[0]["event"] == event
    assert out.stat().st_mode & 0o777 == 0o600
    assert tap.stats.get("open_responses") == 2  # exporting counted nothing


def test_done_drains_and_summarises(addon, tmp_path: Path, caplog) -> None:
    tap, _ = addon
    caplog.set_level(logging.INFO)
    for _ in range(50):
        tap.response(make_flow(fp_body()[0]))
    tap.done()
    assert len((tmp_path / "out.jsonl").read_text().splitlines()) == 50
    summary = next(r for r in caplog.records if "fp-tap summary" in r.getMessage())
    assert '"unsealed": 50' in summary.getMessage()


def test_jsonl_file_is_private(addon, tmp_path: Path) -> None:
    tap, _ = addon
    run(tap, make_flow(fp_body()[0]))
    tap.done()
    assert (tmp_path / "out.jsonl").stat().st_mode & 0o777 == 0o600


def interactive(tap: fp_addon.FingerprintTap, tctx: taddons.context) -> None:
    """As in mitmproxy's console or mitmweb: their flow list (the view addon) is there."""
    from mitmproxy.addons.view import View

    tctx.master.addons.add(View())
    tap.running()


def test_content_view(addon) -> None:
    tap, tctx = addon
    interactive(tap, tctx)
    body, event = fp_body(bot="bad")
    flow = run(tap, make_flow(body, content_encoding="gzip"))
    result = contentviews.prettify_message(response(flow), flow)
    assert result.view_name == "fingerprint"
    assert "verdict: suspicious (bad_bot)" in result.text
    assert f"unsealed with key {KEY.key_id}" in result.text
    assert event["event_id"] in result.text
    shown = json.loads(result.text.split("\n", 4)[-1])
    assert shown == event
    plain = make_flow(b'{"ok": true}')
    assert contentviews.prettify_message(response(plain), plain).view_name != "fingerprint"
    wrong = make_flow(hostile_bodies()["decrypt_failed"])
    text = contentviews.prettify_message(response(wrong), wrong).text
    assert "cannot unseal: decrypt_failed" in text


def test_view_never_offered_for_requests(addon) -> None:
    tap, tctx = addon
    interactive(tap, tctx)
    body, _ = fp_body()
    flow = make_flow(body)
    meta = contentviews.Metadata(flow=flow, http_message=flow.request)
    assert tap.view.render_priority(body, meta) < 0
    meta = contentviews.Metadata(flow=flow, http_message=flow.response)
    assert tap.view.render_priority(body, meta) > 1


def test_redaction_reaches_every_output_but_the_content_view(addon, tmp_path: Path, caplog) -> None:
    tap, tctx = addon
    caplog.set_level(logging.DEBUG)
    store = tmp_path / "out.sqlite"
    tctx.configure(
        tap,
        fp_redact=["pii", "summary.visitor_id", "event.identification.visitor_id"],
        fp_sqlite=str(store),
    )
    ip, url = "198.51.100.23", "https://shop.example/cart?user=alice"
    body, event = fp_body("v4", ip=ip, url=url, bot="bad")
    flow = run(tap, make_flow(body, request_headers=[(b"FPJS-Proxy-Client-IP", b"192.0.2.99")]))
    visitor = event["identification"]["visitor_id"]
    export = tmp_path / "export.jsonl"
    tap.export_command([flow], str(export))
    tap.done()
    outputs = {
        "jsonl": (tmp_path / "out.jsonl").read_text(),
        "export": export.read_text(),
        "metadata": json.dumps(flow.metadata),
        "comment": flow.comment,
        "log": caplog.text,
        "sqlite": _table_text(store),
    }
    for name, text in outputs.items():
        for value in (ip, url, "192.0.2.99", visitor, event["user_agent"], event["linked_id"]):
            assert value not in text, f"{value!r} leaked into the {name}"
    assert "[redacted]" in outputs["jsonl"]
    assert "[redacted]" in outputs["sqlite"]
    assert "visitor=[redacted]" in outputs["log"]
    # The interactive view shows what Fingerprint sent, unredacted.
    view = contentviews.prettify_message(response(flow), flow, view_name="fingerprint").text
    assert ip in view
    assert url in view


def _table_text(store: Path) -> str:
    """Every row of the SQLite store's records, as text (one record expected)."""
    with contextlib.closing(sqlite3.connect(store)) as db:
        rows = db.execute("SELECT * FROM records").fetchall()
    assert len(rows) == 1
    return "\n".join(str(cell) for cell in rows[0])


# -- hostile input: nothing escapes, nothing changes ---------------------------------------

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=30),
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3)
    ),
    max_leaves=10,
)
outer_objects = st.dictionaries(
    st.sampled_from(
        ["v", "requestId", "sealedResult", "event_id", "sealed_result", "products", "x"]
    ),
    json_values | st.text(alphabet="noXc7+/=AZaz09", max_size=200),
    max_size=6,
)
encodings = st.sampled_from(
    [None, "gzip", "br", "zstd", "deflate", "identity", "bogus", "gzip, br"]
)


def error_delta(tap: fp_addon.FingerprintTap, before: dict[str, int]) -> dict[str, int]:
    after = tap.stats.group("errors")
    return {k: after[k] - before.get(k, 0) for k in after if after[k] != before.get(k, 0)}


# One addon per test function (mitmproxy's log handler outlives a test context), so
# each example looks at what it changed rather than at absolute counts.
@settings(
    max_examples=120, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    seed=st.integers(min_value=0, max_value=2**32), encoding=st.sampled_from([None, "gzip", "br"])
)
def test_property_hostile_responses_are_counted_right(
    addon, seed: int, encoding: str | None
) -> None:
    tap, _ = addon
    before = tap.stats.group("errors")
    body, expected, variant = hostile_response(seed, KEY, int(time.time() * 1000))
    flow = run(tap, make_flow(body, content_encoding=encoding))
    delta = error_delta(tap, before)
    if expected == "ignored":
        assert "fp" not in flow.metadata, variant
        assert delta == {}
    elif expected == "ok":
        assert flow.metadata["fp"]["ok"] is True, variant
        assert delta == {}
    else:
        assert delta == {expected: 1}, variant
        assert flow.marked == fp_addon.MARK_ERROR


@settings(
    max_examples=250, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    content=st.one_of(outer_objects.map(lambda o: json.dumps(o).encode()), st.binary(max_size=300)),
    encoding=encodings,
    encode=st.booleans(),
)
def test_property_arbitrary_bodies_never_break_the_hook(
    addon, content: bytes, encoding: str | None, encode: bool
) -> None:
    tap, _ = addon
    # The header may lie: say gzip and send plain bytes, or the other way round.
    flow = make_flow(content, content_encoding=encoding if encode and encoding in GOOD else None)
    if encoding and not encode:
        flow.response.headers["content-encoding"] = encoding
    run(tap, flow)  # asserts the flow is unchanged
    assert "internal" not in tap.stats.group("errors")


GOOD = {"gzip", "br", "zstd", "deflate", "identity"}


def test_secrets_are_scrubbed_from_every_log_line(addon, caplog) -> None:
    """Whoever logs (here: mitmproxy's wire debugging), secrets never reach a handler."""
    tap, _ = addon
    caplog.set_level(logging.DEBUG)
    tap.running()  # installs the filter on the handlers present now, caplog's included
    flow = make_flow(fp_body()[0], request_headers=[(b"FPJS-Proxy-Secret", SECRET.encode())])
    tap.requestheaders(flow)
    wire = logging.getLogger("mitmproxy.proxy.server")
    wire.debug("DataReceived(client, b'POST / HTTP/1.1\\r\\nFpjs-Proxy-Secret: %s\\r\\n')", SECRET)
    wire.debug("secret seen again, elsewhere: %s", SECRET)
    wire.debug("the key: %s", KEY.to_base64())
    assert SECRET not in caplog.text
    assert KEY.to_base64().rstrip("=") not in caplog.text
    assert caplog.text.count("[redacted]") == 3
    tap.done()
    wire.debug("after done: %s", SECRET)  # the filter is gone with the addon
    assert SECRET in caplog.text


def test_webhook_bodies_are_redacted_too(addon, tmp_path: Path) -> None:
    """The webhook gets the event after redaction, like every other output."""
    import sqlite3

    from fp_core.spool import SPOOL_FILE

    tap, tctx = addon
    state = tmp_path / "state"
    tctx.configure(
        tap,
        fp_redact=["pii"],
        fp_webhook_url="http://127.0.0.1:9/hook",  # nothing listens: events stay spooled
        fp_state_dir=str(state),
        fp_include_event=False,
        fp_drain_timeout=1,
    )
    ip = "198.51.100.61"
    run(tap, make_flow(fp_body("v4", ip=ip)[0]))
    tap.done()
    with sqlite3.connect(state / SPOOL_FILE) as db:
        (body,) = db.execute("SELECT body FROM events").fetchone()
    event = json.loads(body)
    assert event["ip_address"] == "[redacted]"
    assert ip.encode() not in body
    (record,) = [json.loads(x) for x in (tmp_path / "out.jsonl").read_text().splitlines()]
    assert "event" not in record  # fp_include_event=false still holds for the files


def test_log_trusted_false_logs_only_what_needs_attention(addon, tmp_path: Path, caplog) -> None:
    tap, tctx = addon
    caplog.set_level(logging.INFO)
    tctx.configure(tap, fp_log_trusted=False)
    trusted = run(tap, make_flow(fp_body()[0]))
    bad = run(tap, make_flow(fp_body(bot="bad")[0]))
    failed = run(tap, make_flow(hostile_bodies()["decrypt_failed"]))
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("fp v")]
    assert not any(trusted.id in line for line in lines)
    assert sum(bad.id in line for line in lines) == 1
    assert sum(failed.id in line for line in lines) == 1
    assert len(records(tap, tmp_path / "out.jsonl")) == 3  # still recorded


def expected_lines(flows: Sequence[http.HTTPFlow], path: Path, tap: Any) -> list[tuple[str, int]]:
    """The words and level of each flow's record line, from its exported record."""
    by_flow = {r["flow_id"]: r for r in records(tap, path)}
    expected = []
    for flow in flows:
        r = by_flow[flow.id]
        if r["ok"]:
            checks = " ".join(
                f"{k}={'-' if v is None else 'yes' if v is True else 'no' if v is False else v}"
                for k, v in r["checks"].items()
            )
            reasons = f" ({','.join(r['reasons'])})" if r["reasons"] else ""
            text = (
                f"fp {r['api']} {r['request_id']} {r['verdict']}{reasons} "
                f"visitor={r['summary']['visitor_id']} bot={r['summary']['bot']} "
                f"key={r['key_id']} {checks} [flow {flow.id}]"
            )
            expected.append((text, logging.INFO))
        else:
            text = (
                f"fp {r['api']} {r['request_id']} error {r['error']['kind']}: "
                f"{r['error']['message']} [flow {flow.id}]"
            )
            expected.append((text, logging.WARNING))
    return expected


def three_flows(tap: fp_addon.FingerprintTap) -> list[http.HTTPFlow]:
    """A trusted response, a suspicious one and an error."""
    return [
        run(tap, make_flow(fp_body("v4")[0])),
        run(tap, make_flow(fp_body("v3", bot="bad")[0])),
        run(tap, make_flow(hostile_bodies()["decrypt_failed"])),
    ]


def test_record_lines_say_what_the_record_says(addon, tmp_path: Path, caplog) -> None:
    """The line's exact words, for a trusted response, a suspicious one and an error."""
    tap, _ = addon
    caplog.set_level(logging.INFO)
    flows = three_flows(tap)
    lines = {r.getMessage(): r for r in caplog.records if r.name == fp_addon.record_log.name}
    expected = expected_lines(flows, tmp_path / "out.jsonl", tap)
    assert sorted((t, lines[t].levelno) for t in lines) == sorted(expected)
    assert " suspicious (bad_bot) visitor=" in expected[1][0]  # the reasons are there
    assert " id_match=yes fresh=yes " in expected[0][0]
    # Where a formatter that shows it says the lines come from.
    assert {(r.filename, r.funcName) for r in lines.values()} == {("fp_addon.py", "_log_record")}
    assert {r.lineno for r in lines.values()} == {fp_addon._log_record.__code__.co_firstlineno}


class WithoutPytests(list[logging.Handler]):
    """A logger's handlers, which pytest's capturing handlers do not join (pytest puts
    them on every logger that does not propagate; mitmdump has no such handlers)."""

    def append(self, handler: logging.Handler) -> None:
        if not isinstance(handler, LogCaptureHandler):
            super().append(handler)


@pytest.fixture
def mitmdump_logging(
    addon, monkeypatch: pytest.MonkeyPatch
) -> Iterator[tuple[io.StringIO, TermLogHandler, list[logging.LogRecord]]]:
    """The record lines' handlers as in mitmdump: its terminal, the add_log one (which
    keeps them out) and the error check, with fp-tap's filters; pytest's own handlers
    (on the root logger) out of the way. Yields the terminal's output, the terminal,
    and the record lines made through logging."""
    tap, tctx = addon
    out = io.StringIO()
    with monkeypatch.context() as m:
        # Else mitmproxy's handlers take only lines logged in this fixture (they compare
        # the test's phase, "setup" here, with that of each line).
        m.delenv("PYTEST_CURRENT_TEST")
        terminal = TermLogHandler(out)
        legacy = LegacyLogEvents(tctx.master)
        handlers = WithoutPytests([terminal, legacy, ErrorCheckHandler()])
    logger = fp_addon.record_log
    monkeypatch.setattr(logger, "propagate", False)
    monkeypatch.setattr(logger, "handlers", handlers)
    legacy.filters.insert(0, fp_addon._NOT_RECORDS)
    for handler in handlers:
        handler.addFilter(tap._log_filter)
    made: list[logging.LogRecord] = []
    make = logger.makeRecord

    def counting(*args: Any, **kw: Any) -> logging.LogRecord:
        made.append(record := make(*args, **kw))
        return record

    monkeypatch.setattr(logger, "makeRecord", counting)
    level = logger.level
    logger.setLevel(logging.DEBUG)  # mitmdump's root level
    yield out, terminal, made
    logger.setLevel(level)


@pytest.mark.parametrize("colours", [False, True], ids=["plain", "colours"])
def test_mitmdump_terminal_gets_the_lines_directly(
    addon, tmp_path: Path, mitmdump_logging, colours: bool
) -> None:
    """Past logging, but what mitmproxy's terminal log would have printed."""
    tap, _ = addon
    out, terminal, made = mitmdump_logging
    if colours:
        terminal.formatter = MitmFormatter(colorize=True)
    flows = three_flows(tap)
    expected = expected_lines(flows, tmp_path / "out.jsonl", tap)
    assert made == []  # no LogRecord: written directly
    printed = out.getvalue().splitlines()
    assert len(printed) == 3
    for line, (text, level) in zip(printed, expected, strict=True):
        record = logging.LogRecord(fp_addon.record_log.name, level, "", 0, text, None, None)
        want = terminal.format(record)
        assert STAMP.sub("T", line) == STAMP.sub("T", want)  # the same but for the time
    assert ("\x1b[33m" in printed[2]) is colours  # the error's line, in yellow


def test_mitmdump_terminal_lines_follow_termlog_verbosity(
    addon, tmp_path: Path, mitmdump_logging
) -> None:
    tap, _ = addon
    out, terminal, made = mitmdump_logging
    terminal.setLevel(logging.WARNING)  # termlog_verbosity=warn
    flows = three_flows(tap)
    printed = out.getvalue().splitlines()
    assert [flow.id in printed[0] for flow in flows] == [False, False, True]
    assert len(printed) == 1
    assert made == []
    terminal.setLevel(logging.ERROR)  # -q
    three_flows(tap)
    assert len(out.getvalue().splitlines()) == 1


def test_mitmdump_terminal_lines_are_scrubbed(addon, mitmdump_logging) -> None:
    """Of the configured secrets (here a key, in the outer id a response may hold). The
    values requests carried in FPJS-Proxy-Secret are not applied to record lines: any
    client can send any value there (test_a_clients_header_value_cannot_rewrite_...)."""
    tap, _ = addon
    out, _, made = mitmdump_logging
    flow = make_flow(
        json.dumps({"requestId": f"x{KEY.to_base64()}", "sealedResult": "AAAA"}).encode(),
        request_headers=[(b"FPJS-Proxy-Secret", SECRET.encode())],
    )
    tap.requestheaders(flow)
    tap.responseheaders(flow)
    tap.response(flow)
    printed = out.getvalue()
    assert f"x{REDACTED}" in printed
    assert flow.id in printed
    assert KEY.to_base64()[:42] not in printed
    assert made == []


def test_another_handler_gets_the_lines_through_logging(addon, mitmdump_logging) -> None:
    """As in mitmweb or the console, whose event log is a handler of its own."""
    tap, _ = addon
    out, _, made = mitmdump_logging

    class EventLog(logging.Handler):
        def __init__(self) -> None:
            super().__init__()
            self.lines: list[str] = []

        def emit(self, record: logging.LogRecord) -> None:
            self.lines.append(record.getMessage())

    event_log = EventLog()
    fp_addon.record_log.handlers.append(event_log)
    flow = run(tap, make_flow(fp_body()[0]))
    assert len(made) == 1
    assert [flow.id in line for line in event_log.lines] == [True]
    assert flow.id in out.getvalue()  # the terminal too, through logging
    fp_addon.record_log.handlers.remove(event_log)
    run(tap, make_flow(fp_body()[0]))
    assert len(made) == 1
    assert len(event_log.lines) == 1
    assert len(out.getvalue().splitlines()) == 2


def test_record_lines_follow_their_logger_level(addon, caplog) -> None:
    """Made without Logger.info, the lines still obey the level set on their logger."""
    tap, _ = addon
    caplog.set_level(logging.INFO)  # the capturing handler takes INFO lines
    logger = logging.getLogger(fp_addon.record_log.name)
    old_level = logger.level
    logger.setLevel(logging.WARNING)  # but their logger does not make them
    try:
        trusted = run(tap, make_flow(fp_body()[0]))
        failed = run(tap, make_flow(hostile_bodies()["decrypt_failed"]))
    finally:
        logger.setLevel(old_level)
    lines = [r.getMessage() for r in caplog.records if r.name == fp_addon.record_log.name]
    assert not any(trusted.id in line for line in lines)
    assert sum(failed.id in line for line in lines) == 1


def test_scrubbed_lines_read_the_same_in_every_handler(addon) -> None:
    """The filter formats each line once; the handlers after it read that same text,
    a literal '%' in it included."""
    tap, _ = addon
    seen: list[list[str]] = [[], []]

    class Keep(logging.Handler):
        def __init__(self, into: list[str]) -> None:
            super().__init__(logging.DEBUG)
            self.into = into

        def emit(self, record: logging.LogRecord) -> None:
            self.into.append(self.format(record))

    handlers = [Keep(seen[0]), Keep(seen[1])]
    root = logging.getLogger()
    for handler in handlers:
        root.addHandler(handler)
    old_level = root.level
    root.setLevel(logging.DEBUG)
    try:
        tap.running()  # the filter goes on every handler there is
        probe = logging.getLogger("mitmproxy.probe")
        probe.info("100%% of %s, key %s", "it", KEY.to_base64().rstrip("="))
        probe.info("no arguments, %s stays")
    finally:
        root.setLevel(old_level)
        for handler in handlers:
            root.removeHandler(handler)
    assert seen[0] == seen[1] == ["100% of it, key [redacted]", "no arguments, %s stays"]


# -- found by a bug hunt: secrets, fp.export, the log line, re-inspected flows ---------


def test_a_reverted_edit_does_not_bring_the_proxy_secret_back(
    addon: tuple[fp_addon.FingerprintTap, taddons.context],
) -> None:
    """mitmweb and the console back a flow up before an edit (an intercepted request):
    "revert" must not put the secret back into the flow they show and save."""
    tap, _ = addon
    flow = make_flow(fp_body()[0], request_headers=[(b"FPJS-Proxy-Secret", SECRET.encode())])
    tap.requestheaders(flow)
    flow.backup()
    flow.request.headers["x-edited"] = "1"
    tap.responseheaders(flow)
    tap.response(flow)
    assert flow.request.headers["FPJS-Proxy-Secret"] == REDACTED
    flow.revert()
    assert "x-edited" not in flow.request.headers, "reverted"
    assert flow.request.headers["FPJS-Proxy-Secret"] == REDACTED
    assert SECRET not in json.dumps(flow.get_state(), default=repr)


def test_requests_in_flight_at_shutdown_are_masked_by_done(
    addon: tuple[fp_addon.FingerprintTap, taddons.context],
) -> None:
    """-w saves them at shutdown, with neither a response nor an error (e2e:
    test_secrets)."""
    tap, tctx = addon
    flow = make_flow(b"{}", request_headers=[(b"FPJS-Proxy-Secret", SECRET.encode())])
    flow.response = None
    tap.requestheaders(flow)
    assert flow.request.headers["FPJS-Proxy-Secret"] == SECRET, "still to go upstream"
    tctx.master.should_exit.set()  # what mitmproxy does before its done hooks
    tap.done()
    assert flow.request.headers["FPJS-Proxy-Secret"] == REDACTED


def test_a_script_reload_leaves_requests_not_yet_sent_upstream_alone(
    addon: tuple[fp_addon.FingerprintTap, taddons.context],
) -> None:
    """mitmproxy runs done() when it reloads a script, and goes on serving."""
    tap, tctx = addon
    flow = make_flow(b"{}", request_headers=[(b"FPJS-Proxy-Secret", SECRET.encode())])
    flow.response = None
    tap.requestheaders(flow)
    tctx.master.addons.remove(tap)  # what a reload does first
    assert flow.request.headers["FPJS-Proxy-Secret"] == SECRET


def test_tracebacks_in_log_lines_are_scrubbed_too(
    addon: tuple[fp_addon.FingerprintTap, taddons.context],
) -> None:
    """mitmproxy logs an addon's exception as "Addon error: <value>" with its traceback,
    whose last line repeats <value>: another script's error message holding the
    request's headers."""
    from mitmproxy.addonmanager import safecall

    tap, _ = addon
    out: list[str] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            out.append(self.format(record))

    handler = Keep(logging.DEBUG)
    handler.setFormatter(MitmFormatter(colorize=False))
    root = logging.getLogger()
    root.addHandler(handler)
    try:
        tap.running()  # the scrubbing filter goes on every handler there is
        flow = make_flow(b"{}", request_headers=[(b"FPJS-Proxy-Secret", SECRET.encode())])
        tap.requestheaders(flow)
        with safecall():
            fail_with(f"unexpected request headers: {flow.request.headers}")
    finally:
        root.removeHandler(handler)
        tap.done()
    text = "\n".join(out)
    assert "Addon error" in text
    assert "Traceback (most recent call last)" in text
    assert "ValueError: unexpected request headers" in text
    assert SECRET not in text


def fail_with(message: str) -> None:
    """Another addon's bug (mypy sees through a bare raise in a with block)."""
    raise ValueError(message)


def test_the_outer_request_id_cannot_forge_log_lines_or_comments(
    addon: tuple[fp_addon.FingerprintTap, taddons.context], caplog: pytest.LogCaptureFixture
) -> None:
    """The outer JSON is anyone's to write: a line break or a terminal escape in it is
    shown escaped."""
    tap, _ = addon
    caplog.set_level(logging.INFO)
    forged = "1.x\nfp v4 1700000000000.abcdef trusted visitor=ZZZ bot=not_detected\x1b[2K"
    body = json.dumps({"event_id": forged, "sealed_result": "AAAA"}).encode()
    flow = run(tap, make_flow(body))
    assert flow.metadata["fp"]["verdict"] == "error"
    (line,) = [r.getMessage() for r in caplog.records if flow.id in r.getMessage()]
    assert line.startswith("fp v4 1.x\\nfp v4 1700000000000.abcdef trusted visitor=ZZZ")
    assert "\n" not in line
    assert "\x1b" not in line
    view = tap.view.prettify(body, contentviews.Metadata(flow=flow, http_message=flow.response))
    assert view.splitlines()[0].endswith(
        "request id 1.x\\nfp v4 1700000000000.abcdef trusted visitor=ZZZ bot=not_detected\\x1b[2K"
    )


@pytest.mark.parametrize("mine_after", [False, True], ids=["mine-before", "mine-after"])
def test_a_replayed_flow_gets_the_new_verdicts_comment_and_mark(
    addon: tuple[fp_addon.FingerprintTap, taddons.context], mine_after: bool
) -> None:
    """mitmproxy's client replay runs the same flow through the hooks again: the new
    comment line replaces fp-tap's old one wherever it is among the user's."""
    tap, _ = addon
    flow = make_flow(fp_body(bot="bad")[0])
    flow.comment = "" if mine_after else "mine"
    run(tap, flow)
    assert flow.marked == fp_addon.MARK_SUSPICIOUS
    if mine_after:
        flow.comment += "\nmine"
    flow.response = make_flow(fp_body()[0]).response  # the replay's response
    run(tap, flow)
    assert flow.metadata["fp"]["verdict"] == "trusted"
    assert flow.marked == "", "the :warning: was fp-tap's, for the old response"
    (mine, fp_line) = flow.comment.split("\n")
    assert mine == "mine"
    assert fp_line.startswith("fp trusted · visitor ")


def test_a_mark_of_the_users_own_stays_through_a_replay(
    addon: tuple[fp_addon.FingerprintTap, taddons.context],
) -> None:
    tap, _ = addon
    flow = make_flow(fp_body()[0])
    flow.marked = ":star:"
    run(tap, flow)
    flow.response = make_flow(fp_body()[0]).response
    run(tap, flow)
    assert flow.marked == ":star:"


def test_flows_read_back_from_a_file_are_annotated_once(
    addon: tuple[fp_addon.FingerprintTap, taddons.context],
) -> None:
    """mitmdump -r runs every loaded flow through the hooks again."""
    tap, _ = addon
    flow = run(tap, make_flow(fp_body()[0]))
    loaded = http.HTTPFlow.from_state(flow.get_state())  # what -w, then -r, gives
    assert isinstance(loaded, http.HTTPFlow)
    run(tap, loaded)
    assert "\n" not in loaded.comment
    # Seen by this same tap before: a duplicate now.
    assert loaded.comment.startswith("fp suspicious (duplicate) · visitor ")
    assert loaded.marked == fp_addon.MARK_SUSPICIOUS


def export(tap: fp_addon.FingerprintTap, flow: http.HTTPFlow, out: Path) -> dict[str, Any]:
    tap.export_command([flow], str(out))
    tap._join_exports()
    (record,) = [json.loads(x) for x in out.read_text().splitlines()]
    return record


def test_export_without_the_key_keeps_the_record_as_it_was_captured(
    addon: tuple[fp_addon.FingerprintTap, taddons.context], tmp_path: Path
) -> None:
    """A flow captured trusted, exported by a tap without its key (a flow file read by
    another tap)."""
    tap, tctx = addon
    flow = run(tap, make_flow(fp_body()[0]))
    captured = flow.metadata["fp"]
    empty = tmp_path / "empty.txt"
    empty.write_text("# none\n")
    empty.chmod(0o600)
    tctx.configure(tap, fp_keys_file=str(empty))
    record = export(tap, flow, tmp_path / "export.jsonl")
    assert (record["ok"], record["error"], record["verdict"]) == (True, None, "trusted")
    assert record["summary"] == captured["summary"]
    assert record["key_id"] == captured["key_id"]
    assert "event" not in record, "it cannot be opened now"


def test_export_after_the_key_arrived_keeps_the_record_as_it_was_captured(
    addon: tuple[fp_addon.FingerprintTap, taddons.context], tmp_path: Path
) -> None:
    tap, tctx = addon
    other = DecryptionKey.generate()
    flow = run(tap, make_flow(fp_body(key=other)[0]))
    assert flow.metadata["fp"]["verdict"] == "error"
    both = tmp_path / "both.txt"
    both.write_text(f"{KEY.to_base64()}\n{other.to_base64()}\n")
    both.chmod(0o600)
    tctx.configure(tap, fp_keys_file=str(both))
    record = export(tap, flow, tmp_path / "export.jsonl")
    assert (record["ok"], record["verdict"]) == (False, "error")
    assert record["error"]["kind"] == "decrypt_failed"
    assert "event" not in record


def test_an_export_that_cannot_be_written_says_so(
    addon: tuple[fp_addon.FingerprintTap, taddons.context],
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    tap, _ = addon
    flow = run(tap, make_flow(fp_body()[0]))
    out = tmp_path / "no-such-dir" / "x.jsonl"
    tap.export_command([flow], str(out))
    tap._join_exports()
    (warning,) = [r for r in caplog.records if r.getMessage().startswith("fp.export")]
    assert warning.levelno == logging.WARNING
    assert warning.getMessage() == f"fp.export: cannot write {out}: No such file or directory"


def test_an_export_over_an_existing_file_makes_it_private(
    addon: tuple[fp_addon.FingerprintTap, taddons.context], tmp_path: Path
) -> None:
    tap, _ = addon
    flow = run(tap, make_flow(fp_body()[0]))
    out = tmp_path / "export.jsonl"
    out.write_text("old\n")
    out.chmod(0o644)
    assert export(tap, flow, out)["verdict"] == "trusted"
    assert out.stat().st_mode & 0o777 == 0o600


def _with_member(body: bytes, member: bytes) -> bytes:
    return body[:-1] + b", " + member + b"}"


@pytest.mark.parametrize(
    "make",
    [
        pytest.param(lambda b: b"\xef\xbb\xbf" + b, id="byte-order-mark"),
        pytest.param(lambda b: _with_member(b, b'"n": ' + b"7" * 5000), id="huge-integer"),
        pytest.param(lambda b: _with_member(b, b'"note": "caf\xe9"'), id="latin-1-byte"),
    ],
)
def test_open_responses_the_agent_reads_are_inspected(
    addon: tuple[fp_addon.FingerprintTap, taddons.context], make: Any
) -> None:
    """A browser's JSON reading takes these (test_envelope has the details)."""
    tap, _ = addon
    flow = run(tap, make_flow(make(fp_body()[0])))
    assert tap.stats.get("open_responses") == 1
    assert flow.metadata["fp"]["verdict"] == "trusted"


def test_mitmdumps_flow_dump_never_shows_the_unsealed_event(
    addon: tuple[fp_addon.FingerprintTap, taddons.context],
) -> None:
    """At flow_detail 3 and 4 mitmdump prints bodies in the view mitmproxy picks: the
    fingerprint view would put every unsealed event (fp_redact or not) into its output,
    often a log file."""
    from mitmproxy.addons import dumper

    tap, tctx = addon
    tap.running()  # mitmdump: no flow list (view addon)
    body, event = fp_body(ip="198.51.100.23")
    flow = run(tap, make_flow(body))
    out = io.StringIO()
    dump = dumper.Dumper(out)
    tctx.master.addons.add(dump)
    tctx.configure(dump, flow_detail=3)
    dump.response(flow)
    printed = out.getvalue()
    assert "sealed_result" in printed, "the outer JSON is shown"
    assert "198.51.100.23" not in printed
    assert event["identification"]["visitor_id"] not in printed


def test_the_view_shows_an_event_with_a_lone_surrogate(
    addon: tuple[fp_addon.FingerprintTap, taddons.context],
) -> None:
    """The UIs' highlighter takes only text with a UTF-8 form."""
    from mitmproxy_rs import syntax_highlight

    tap, tctx = addon
    interactive(tap, tctx)
    event = generate_event("v4")
    event["linked_id"] = "\ud800"  # sealed as its escape
    body = json.dumps(open_response_body("v4", event["event_id"], seal_event(event, KEY)))
    flow = run(tap, make_flow(body.encode()))
    result = contentviews.prettify_message(response(flow), flow)
    assert result.view_name == "fingerprint"
    assert '"linked_id": "\\ud800"' in result.text
    assert syntax_highlight.highlight(result.text, "yaml")


def test_a_replay_answered_by_something_else_drops_the_old_annotation(
    addon: tuple[fp_addon.FingerprintTap, taddons.context],
) -> None:
    tap, _ = addon
    flow = make_flow(fp_body(bot="bad")[0])
    flow.comment = "mine"
    run(tap, flow)
    flow.response = make_flow(b"<html>maintenance</html>").response
    run(tap, flow)
    assert "fp" not in flow.metadata
    assert (flow.marked, flow.comment) == ("", "mine")


def test_an_export_by_a_tap_without_the_key_applies_its_redaction(
    addon: tuple[fp_addon.FingerprintTap, taddons.context], tmp_path: Path
) -> None:
    tap, tctx = addon
    ip, url = "198.51.100.23", "https://shop.example/cart?user=alice"
    flow = run(tap, make_flow(fp_body(ip=ip, url=url)[0]))
    assert flow.metadata["fp"]["summary"]["ip"] == ip
    empty = tmp_path / "empty.txt"
    empty.write_text("# none\n")
    empty.chmod(0o600)
    tctx.configure(tap, fp_keys_file=str(empty), fp_redact=["pii"])
    before = copy.deepcopy(flow.metadata["fp"])
    record = export(tap, flow, tmp_path / "export.jsonl")
    assert record["verdict"] == "trusted", "as captured"
    assert (record["summary"]["ip"], record["summary"]["url"]) == (REDACTED, REDACTED)
    # An export only reads the flow: its annotation (saved with -w, read when the flow
    # is inspected again) was redacted in place (found by a trust hunt).
    assert flow.metadata["fp"] == before


def test_a_flow_exported_then_inspected_again_keeps_one_fp_comment_line(
    addon: tuple[fp_addon.FingerprintTap, taddons.context], tmp_path: Path
) -> None:
    tap, tctx = addon
    flow = run(tap, make_flow(fp_body()[0]))
    assert flow.comment.startswith("fp trusted")
    key_file = tctx.options.fp_keys_file
    empty = tmp_path / "empty.txt"
    empty.write_text("# none\n")
    empty.chmod(0o600)
    tctx.configure(tap, fp_keys_file=str(empty), fp_redact=["summary.visitor_id"])
    export(tap, flow, tmp_path / "export.jsonl")
    tctx.configure(tap, fp_keys_file=key_file, fp_redact=[])
    run(tap, flow)  # a client replay
    assert flow.comment.split("\n") == [flow.comment]
    assert flow.comment.startswith("fp suspicious (duplicate)")


def test_the_export_of_a_failed_flow_keeps_its_error_with_its_reasons(
    addon: tuple[fp_addon.FingerprintTap, taddons.context], tmp_path: Path
) -> None:
    """Failed then (not our key), exported by a tap with no key: the error was the one
    of now (no_keys), the reasons those of then (decrypt_failed)."""
    tap, tctx = addon
    flow = run(tap, make_flow(fp_body(key=DecryptionKey.generate())[0]))
    assert flow.metadata["fp"]["reasons"] == ["decrypt_failed"]
    empty = tmp_path / "empty.txt"
    empty.write_text("# none\n")
    empty.chmod(0o600)
    tctx.configure(tap, fp_keys_file=str(empty))
    record = export(tap, flow, tmp_path / "export.jsonl")
    assert record["error"]["kind"] == "decrypt_failed"
    assert record["reasons"] == ["decrypt_failed"]
    assert "event" not in record


def test_a_huge_fp_max_body_still_inspects_compressed_responses(
    addon: tuple[fp_addon.FingerprintTap, taddons.context],
) -> None:
    tap, tctx = addon
    tctx.configure(tap, fp_max_body=2**63 - 1)
    flow = run(tap, make_flow(fp_body()[0], content_encoding="gzip"))
    assert tap.stats.group("errors") == {}
    assert flow.metadata["fp"]["verdict"] == "trusted"


@pytest.mark.parametrize("sent", ["verdicts", "suspicious", "not_detected"])
def test_a_clients_header_value_cannot_rewrite_fp_taps_own_lines(
    addon: tuple[fp_addon.FingerprintTap, taddons.context],
    caplog: pytest.LogCaptureFixture,
    sent: str,
) -> None:
    """Any client can send any value in FPJS-Proxy-Secret; the scrubber masks the values
    it saw in other lines (mitmproxy's, at proxy_debug), but not in the record lines
    about other visitors, nor in the counters' JSON, which never hold one."""
    tap, _ = addon
    caplog.set_level(logging.INFO)
    tap.running()
    client = make_flow(b"{}", request_headers=[(b"FPJS-Proxy-Secret", sent.encode())])
    tap.requestheaders(client)
    tap.responseheaders(client)  # masks the value in the stored flow
    tap.response(client)
    other = run(tap, make_flow(fp_body(bot="bad")[0]))
    (line,) = [r.getMessage() for r in caplog.records if other.id in r.getMessage()]
    assert " suspicious (bad_bot) " in line
    assert " bot=bad " in line
    logging.getLogger("mitmproxy.proxy").info(f"raw bytes: x={sent}")  # not fp-tap's
    assert f"x={REDACTED}" in caplog.text, "still masked where it may be the secret"
    tap.done()
    (summary,) = [r.getMessage() for r in caplog.records if "fp-tap summary" in r.getMessage()]
    assert summary == f"fp-tap summary: {tap.stats_command()}"  # the JSON fp.stats returns
    assert json.loads(summary.split(": ", 1)[1])["verdicts"] == {"suspicious": 1}


def test_exports_to_one_path_run_in_the_order_asked(
    addon: tuple[fp_addon.FingerprintTap, taddons.context],
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Each export wrote on a thread of its own: the earlier, larger one often finished
    last, or both wrote into the one truncated file (found by a long-running hunt)."""
    tap, _ = addon
    caplog.set_level(logging.INFO)
    out = tmp_path / "export.jsonl"
    many = [run(tap, make_flow(fp_body("v4")[0])) for _ in range(40)]
    one = [run(tap, make_flow(fp_body("v3")[0]))]
    expected = [json.loads(jsontext.dumps(tap.record_for(one[0])))]
    for n in range(1, 11):
        tap.export_command(many, out)
        tap.export_command(one, out)
        deadline = time.monotonic() + 15
        while sum("fp.export: wrote" in r.getMessage() for r in caplog.records) < 2 * n:
            assert time.monotonic() < deadline, "both exports"
            time.sleep(0.01)
        assert [json.loads(line) for line in out.read_text().splitlines()] == expected


def test_the_client_ip_header_sent_twice_is_still_the_visitors(
    addon: tuple[fp_addon.FingerprintTap, taddons.context],
) -> None:
    """mitmproxy joins the two lines ("a, a"); the connection is the integration's own
    public address. It was compared instead: a false ip_mismatch (found by a hunt)."""
    tap, _ = addon
    visitor = "81.2.69.142"
    flow = make_flow(
        fp_body(ip=visitor)[0],
        request_headers=[(b"FPJS-Proxy-Client-IP", visitor.encode())] * 2,
    )
    flow.client_conn.peername = ("8.8.8.8", 40000)
    run(tap, flow)
    record = flow.metadata["fp"]
    assert record["checks"]["ip_match"] is True
    assert record["verdict"] == "trusted"


def test_an_event_whose_timestamp_has_thousands_of_digits_leaves_a_savable_flow(
    addon: tuple[fp_addon.FingerprintTap, taddons.context], caplog: pytest.LogCaptureFixture
) -> None:
    """Its age, on the flow, could not be saved with -w, and the record line's text of it
    was an internal error (found by a fuzz hunt)."""
    tap, _ = addon
    caplog.set_level(logging.INFO)
    sealed = seal_event({"event_id": "huge", "timestamp": -(10**4299)}, KEY)
    flow = run(tap, make_flow(json.dumps({"event_id": "huge", "sealed_result": sealed}).encode()))
    assert flow.metadata["fp"]["ok"] is True
    assert flow.metadata["fp"]["checks"]["age_ms"] is None
    mitmio.FlowWriter(io.BytesIO()).add(flow)  # what -w does with every flow
    assert "errors" not in tap.snapshot()
    assert any(" huge " in r.getMessage() for r in caplog.records)  # its record line


# -- found by an interactive hunt ----------------------------------------------------


def _splice_outer_id(body: bytes, new_id: str) -> str:
    """The open response with another outer request id (what a user types into the
    response editor of mitmweb or the console; or the very splice id_match exists for)."""
    obj = json.loads(body)
    obj["event_id"] = new_id
    return json.dumps(obj)


def test_export_of_an_edited_response_does_not_claim_the_old_verdict(
    addon: tuple[fp_addon.FingerprintTap, taddons.context], tmp_path: Path
) -> None:
    """A flow captured trusted; its response is then edited (mitmweb's PUT /flows/<id>
    or the console's editor: flow.backup(), then the new body; no hook runs again) so
    that its outer request id no longer matches the sealed event's. fp.export re-reads
    the body and writes its request id and summary, but the checks and verdict of the
    old body: "trusted, id_match=true" next to a request_id that differs from
    summary.request_id -- a record that contradicts itself, the very splice id_match is
    there to catch."""
    tap, tctx = addon
    interactive(tap, tctx)
    body, _ = fp_body()
    flow = run(tap, make_flow(body))
    assert flow.metadata["fp"]["verdict"] == "trusted"
    flow.backup()
    assert flow.response is not None
    flow.response.text = _splice_outer_id(body, "spliced-by-the-user")

    record = export(tap, flow, tmp_path / "export.jsonl")
    assert record["request_id"] == "spliced-by-the-user"
    consistent = record["checks"]["id_match"] is (
        record["request_id"] == record["summary"]["request_id"]
    )
    assert consistent, (
        f"exported verdict={record['verdict']} id_match={record['checks']['id_match']} "
        f"for request_id={record['request_id']!r} whose event says "
        f"{record['summary']['request_id']!r}"
    )


def test_the_content_view_of_an_edited_response_does_not_show_the_old_verdict(
    addon: tuple[fp_addon.FingerprintTap, taddons.context],
) -> None:
    """The same edited flow in the fingerprint view: its first line names the new
    request id, the next two the old body's verdict and checks (trusted, id_match=true),
    then the event whose id differs."""
    tap, tctx = addon
    interactive(tap, tctx)
    body, event = fp_body()
    flow = run(tap, make_flow(body))
    flow.backup()
    assert flow.response is not None
    flow.response.text = _splice_outer_id(body, "spliced-by-the-user")

    text = contentviews.prettify_message(response(flow), flow).text
    assert "request id spliced-by-the-user" in text
    assert event["event_id"] in text  # the event, with its own id
    assert "id_match=true" not in text, text.split("\n{", 1)[0]
    assert "# verdict: trusted" not in text, text.split("\n{", 1)[0]


def test_a_warning_mark_the_user_set_survives_replays(
    addon: tuple[fp_addon.FingerprintTap, taddons.context],
) -> None:
    """README, Marks: "a flow you marked yourself keeps your mark". A flow captured
    trusted (no mark); the user marks it :warning: themselves (console:
    `flow.mark @focus :warning:`, or mitmweb's marker menu). A client replay answered
    suspicious keeps that mark (it is the user's). A second replay answered trusted
    removes it: _unannotate takes any mark equal to the one fp-tap would have given the
    previous verdict for fp-tap's own."""
    tap, _ = addon
    flow = run(tap, make_flow(fp_body()[0]))
    assert flow.metadata["fp"]["verdict"] == "trusted"
    assert flow.marked == ""
    flow.marked = fp_addon.MARK_SUSPICIOUS  # the user's own
    flow.response = make_flow(fp_body(bot="bad")[0]).response  # a replay's answer
    run(tap, flow)
    assert flow.metadata["fp"]["verdict"] == "suspicious"
    assert flow.marked == fp_addon.MARK_SUSPICIOUS
    flow.response = make_flow(fp_body()[0]).response  # another replay's answer
    run(tap, flow)
    assert flow.metadata["fp"]["verdict"] == "trusted"
    assert flow.marked == fp_addon.MARK_SUSPICIOUS, "the user's own mark was removed"


@pytest.mark.parametrize(
    "stored",
    [
        {"verdict": "trusted", "reasons": [], "checks": ["id_match"]},
        {"verdict": "suspicious", "reasons": 5, "checks": {}},
        {"verdict": "trusted", "reasons": [None], "checks": {}},
    ],
    ids=["checks-a-list", "reasons-a-number", "reasons-with-null"],
)
def test_the_view_of_a_flow_with_odd_fp_metadata_still_shows_the_event(
    addon: tuple[fp_addon.FingerprintTap, taddons.context], stored: dict[str, Any]
) -> None:
    """Flows loaded without the hooks (the console's `view.flows.load`, which keeps
    flow.metadata as the file has it; a file from another tool or version, or one made
    to) can carry a metadata["fp"] of another shape. _unannotate tolerates that
    ("metadata from an older or odd file"); FingerprintView.prettify does not: it
    raises (AttributeError / TypeError), and mitmproxy falls back to the raw view, so the
    unsealed event, which the keys in memory do open, is not shown at all."""
    tap, tctx = addon
    interactive(tap, tctx)
    body, event = fp_body()
    flow = make_flow(body)
    flow.metadata["fp"] = stored
    meta = contentviews.Metadata(flow=flow, http_message=flow.response)
    text = tap.view.prettify(body, meta)
    assert event["event_id"] in text
    result = contentviews.prettify_message(response(flow), flow)
    assert result.view_name == "fingerprint"


def test_an_export_of_a_flow_with_odd_fp_metadata_says_what_went_wrong(
    addon: tuple[fp_addon.FingerprintTap, taddons.context],
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The same kind of flow (metadata["fp"] as a flow file had it; tnetstring, the
    format of flow files, holds bytes as readily as str) in fp.export: record_for copies
    the stored fields into the record, the JSON encoding fails in the export thread with
    a TypeError, which nothing catches or logs -- the file is left created and empty and
    no line says anything (README: a path that cannot be written is a WARNING line; an
    export otherwise says "wrote N record(s)")."""
    tap, tctx = addon
    interactive(tap, tctx)
    good = run(tap, make_flow(fp_body()[0]))
    odd = make_flow(fp_body()[0])
    odd.metadata["fp"] = {"ok": False, "verdict": b"error", "reasons": [b"no_keys"]}
    out = tmp_path / "export.jsonl"
    caplog.set_level("INFO", logger="fp_addon")
    tap.export_command([good, odd], str(out))
    tap._join_exports()
    said = [r.getMessage() for r in caplog.records if "fp.export" in r.getMessage()]
    assert said, f"fp.export said nothing; the file holds {out.stat().st_size} bytes"


def test_a_response_whose_sealed_result_was_edited_is_shown_as_it_reads_now(
    addon: tuple[fp_addon.FingerprintTap, taddons.context], tmp_path: Path
) -> None:
    """The outer id kept, another event sealed in: the annotation is the old event's."""
    tap, tctx = addon
    interactive(tap, tctx)
    body, _ = fp_body()
    flow = run(tap, make_flow(body))
    outer = json.loads(body)
    other = generate_event("v4")
    outer["sealed_result"] = seal_event(other, KEY)
    flow.backup()
    assert flow.response is not None
    flow.response.text = json.dumps(outer)
    text = contentviews.prettify_message(response(flow), flow).text
    assert "# verdict: (the annotation is for an earlier version of this response)" in text
    record = export(tap, flow, tmp_path / "export.jsonl")
    assert record["summary"]["request_id"] == other["event_id"]
    assert record["checks"]["id_match"] is False
    assert record["verdict"] == "suspicious"
