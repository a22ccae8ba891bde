"""fp_core.report: one report for a store or a JSONL file, even while a tap writes it."""

from __future__ import annotations

import io
import json
import sqlite3
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from fp_core.cli import EXIT_USAGE, main
from fp_core.jsontext import dumps
from fp_core.report import ReportError, build_report, format_report
from fp_core.stats import Stats
from fp_core.store import SqliteStore
from tests.test_store import error_record, ok_record


def records() -> list[dict[str, Any]]:
    """A small run: visitors 0..2, a bad bot, a splice, a duplicate, two errors."""
    out = [ok_record(i, when=1_790_000_000 + i) for i in range(6)]  # visitors 0,1,2,0,1,2
    out[1]["summary"]["bot"] = "bad"
    out[1]["verdict"], out[1]["reasons"] = "suspicious", ["bad_bot"]
    out[2]["checks"]["id_match"] = False
    out[2]["verdict"], out[2]["reasons"] = "suspicious", ["id_mismatch"]
    again = ok_record(3, when=1_790_000_100, duplicate=True)
    errors = [error_record(7, when=1_790_000_050), error_record(8)]
    errors[1]["error"]["kind"] = "invalid_json"
    errors[1]["time"] = "2026-09-22T00:00:00.000Z"
    return [*out, again, *errors]


def write_jsonl(path: Path, recs: list[dict[str, Any]], tail: str = "") -> None:
    path.write_text("".join(dumps(r) + "\n" for r in recs) + tail, encoding="utf-8")


def write_store(path: Path, recs: list[dict[str, Any]]) -> SqliteStore:
    store = SqliteStore(str(path), Stats())
    store.write(recs)
    return store


def without_source(report: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in report.items() if k != "source"}


def test_the_numbers(tmp_path: Path) -> None:
    path = tmp_path / "events.jsonl"
    write_jsonl(path, records())
    report = build_report(str(path))
    assert report["source"] == {"path": str(path), "format": "jsonl"}
    assert (report["records"], report["unsealed"], report["errors"]) == (9, 7, 2)
    assert report["first"] == ok_record(0, when=1_790_000_000)["time"]
    assert report["last"] == "2026-09-22T00:00:00.000Z"
    assert report["verdicts"] == {"error": 2, "suspicious": 3, "trusted": 4}
    assert report["bots"] == {"bad": 1, "not_detected": 6}
    assert report["error_kinds"] == {"decrypt_failed": 1, "invalid_json": 1}
    assert (report["id_mismatches"], report["duplicates"]) == (1, 1)
    assert report["repeated_request_ids"] == 1
    assert report["visitors"] == 3
    assert report["top_visitors"] == [
        {"visitor_id": "visitor-0", "records": 3, "suspicious": 1},
        {"visitor_id": "visitor-1", "records": 2, "suspicious": 1},
        {"visitor_id": "visitor-2", "records": 2, "suspicious": 1},
    ]
    assert build_report(str(path), top=1)["top_visitors"] == report["top_visitors"][:1]


def test_store_and_jsonl_of_the_same_records_agree(tmp_path: Path) -> None:
    jsonl, db = tmp_path / "events.jsonl", tmp_path / "events.sqlite3"
    write_jsonl(jsonl, records())
    write_store(db, records()).close()
    from_store = build_report(str(db))
    assert from_store["source"]["format"] == "sqlite"
    assert without_source(from_store) == without_source(build_report(str(jsonl)))


def test_a_store_still_being_written(tmp_path: Path) -> None:
    db = tmp_path / "events.sqlite3"
    store = write_store(db, records()[:3])
    assert build_report(str(db))["records"] == 3
    store.write(records()[3:])
    assert build_report(str(db))["records"] == 9
    # A writer in the middle of a transaction: the report sees the last committed state.
    other = sqlite3.connect(db, isolation_level=None)
    other.execute("BEGIN IMMEDIATE")
    other.execute("DELETE FROM records")
    assert build_report(str(db))["records"] == 9
    other.execute("ROLLBACK")
    other.close()
    store.close()


def test_a_jsonl_line_being_written_is_left_out(tmp_path: Path) -> None:
    path = tmp_path / "events.jsonl"
    half = dumps(ok_record(9))[:40]
    write_jsonl(path, records(), tail=half)
    report = build_report(str(path))
    assert report["records"] == 9
    assert report["unreadable_lines"] == 0


def test_broken_lines_in_the_middle_are_counted(tmp_path: Path) -> None:
    path = tmp_path / "events.jsonl"
    recs = records()
    text = dumps(recs[0]) + "\n" + "not json\n" + "\n" + "[1, 2]\n" + dumps(recs[1]) + "\n"
    path.write_text(text, encoding="utf-8")
    report = build_report(str(path))
    assert (report["records"], report["unreadable_lines"]) == (2, 2)
    assert "unreadable lines:     2" in format_report(report)


def test_an_empty_file(tmp_path: Path) -> None:
    path = tmp_path / "events.jsonl"
    path.write_text("")
    report = build_report(str(path))
    assert report["records"] == 0
    assert (report["first"], report["top_visitors"]) == (None, [])
    assert "time range: - .. -" in format_report(report)


def test_the_human_report(tmp_path: Path) -> None:
    path = tmp_path / "events.jsonl"
    write_jsonl(path, records())
    text = format_report(build_report(str(path)))
    for expected in (
        "records:    9 (7 unsealed, 2 errors)",
        "verdicts:     error 2, suspicious 3, trusted 4",
        "bot results:  bad 1, not_detected 6",
        "error kinds:  decrypt_failed 1, invalid_json 1",
        "id mismatches:        1",
        "duplicates (flagged): 1",
        "repeated request ids: 1",
        "visitor-0       3 record(s), 1 suspicious",
    ):
        assert expected in text, expected


@pytest.mark.parametrize("content", [b"# a README\n\nNot records.\n", b"\x00\xff binary\n\x01\n"])
def test_a_file_of_lines_without_a_record_is_refused(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "other.txt"
    path.write_bytes(content)
    with pytest.raises(ReportError, match=r"no record in 2 line\(s\); not an fp_jsonl file"):
        build_report(str(path))


@pytest.mark.parametrize("content", [None, "sqlite-not-a-store"])
def test_unreadable_sources(tmp_path: Path, content: str | None) -> None:
    path = tmp_path / "x"
    if content == "sqlite-not-a-store":
        conn = sqlite3.connect(path)
        conn.execute("CREATE TABLE other (x)")
        conn.close()
    with pytest.raises(ReportError):
        build_report(str(path))


def run_cli(args: list[str]) -> tuple[int, str]:
    out = io.StringIO()
    return main(args, stdout=out), out.getvalue()


def test_cli_report_text_and_json(tmp_path: Path) -> None:
    db = tmp_path / "events.sqlite3"
    write_store(db, records()).close()
    status, text = run_cli(["report", str(db)])
    assert status == 0
    assert text.startswith(f"fp-tap report: {db} (sqlite)")
    status, out = run_cli(["report", "--json", "--top", "2", str(db)])
    assert status == 0
    report = json.loads(out)
    assert report["records"] == 9
    assert len(report["top_visitors"]) == 2


def test_cli_report_errors_exit_64(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert run_cli(["report", str(tmp_path / "missing.sqlite3")])[0] == EXIT_USAGE
    assert "cannot read" in capsys.readouterr().err
    path = tmp_path / "e.jsonl"
    path.write_text("")
    assert run_cli(["report", "--top", "-1", str(path)])[0] == EXIT_USAGE
    with pytest.raises(SystemExit) as info:
        run_cli(["report"])
    assert info.value.code == EXIT_USAGE


def test_lines_with_values_of_other_types_read_as_absent(tmp_path: Path) -> None:
    """Any JSON object on a line gives a fact: the tallies sort and measure text."""
    path = tmp_path / "odd.jsonl"
    path.write_text(
        '{"verdict": 1, "summary": {"visitor_id": 7, "bot": ["x"]}, "error": "boom"}\n'
        '{"verdict": "trusted", "ok": true, "summary": [1], "checks": "no", "time": 5}\n'
    )
    report = build_report(str(path))
    assert report["records"] == 2
    assert report["verdicts"] == {"none": 1, "trusted": 1}  # as a line without one
    assert format_report(report)


def test_a_pipe_is_read_once(tmp_path: Path) -> None:
    """``report <(zcat events.jsonl.1.gz)``: a pipe read once for its format and again for
    its lines reported 0 records (found by a files hunt)."""
    jsonl = tmp_path / "events.jsonl"
    write_jsonl(jsonl, records())
    done = subprocess.run(
        [sys.executable, "-m", "fp_core", "report", "--json", "/dev/stdin"],
        input=jsonl.read_bytes(),
        capture_output=True,
        timeout=60,
        check=False,
        cwd=Path(__file__).resolve().parent.parent,
    )
    assert done.returncode == 0, done.stderr
    assert without_source(json.loads(done.stdout)) == without_source(build_report(str(jsonl)))


def test_lines_shorter_than_the_format_check_are_all_read(tmp_path: Path) -> None:
    """The first bytes read to tell the format may hold several lines, or end mid-line."""
    path = tmp_path / "events.jsonl"
    path.write_bytes(b'{}\n[]\n{"a":\n1}\n{"request_id":"r1","ok":true}\n{"b"')
    report = build_report(str(path))
    assert (report["records"], report["unreadable_lines"]) == (2, 3)


def test_the_human_report_escapes_what_records_say(tmp_path: Path) -> None:
    """A visitor id comes from the event: a line break in it forged a report line, and
    an escape sequence reached the analyst's terminal (found by a fuzz hunt)."""
    forged = "v1\nid mismatches:        0\x1b]0;pwned\x07"
    recs = records()
    recs[0]["summary"]["visitor_id"] = forged
    recs[0]["time"] = "2026\n-01"
    path = tmp_path / "events.jsonl"
    write_jsonl(path, recs)
    report = build_report(str(path))
    text = format_report(report)
    assert "\x1b" not in text
    assert [line for line in text.splitlines() if line.startswith("id mismatches:")] == [
        f"id mismatches:        {report['id_mismatches']}"
    ]
    assert "v1\\nid mismatches:" in text  # escaped, on the visitor's own line
    assert any(v["visitor_id"] == forged for v in report["top_visitors"])  # --json as is
