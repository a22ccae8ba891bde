"""``python -m fp_core report PATH``: what a tap saw, from its SQLite store or JSONL file.

Both sources go through the same :class:`Tally`, so the same records give the same
report. Either file may still be being written by a running tap: the store is read
through a read-only WAL connection (a consistent snapshot), and a JSONL line that is
not finished yet is left out rather than taken for an error.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterable, Iterator
from contextlib import closing
from dataclasses import dataclass, field
from typing import Any, BinaryIO, NamedTuple

from fp_core.errors import FpError
from fp_core.loglines import printable

SQLITE_MAGIC = b"SQLite format 3\x00"
TOP_VISITORS = 10


class ReportError(FpError):
    """The file cannot be read as a store or a JSONL file of records."""

    kind = "report"


class Fact(NamedTuple):
    """The few fields of a record a report needs."""

    time: str | None
    request_id: str | None
    ok: bool
    verdict: str | None
    error_kind: str | None
    bot: str | None
    visitor_id: str | None
    id_match: bool | None
    duplicate: bool | None


def fact_of(record: dict[str, Any]) -> Fact:
    """The report's view of one record (a JSONL line, or a store row made into one)."""
    # A line of any JSON object gives a fact: what is not of its documented type reads
    # as absent (the tallies sort and measure these as text).
    error = _object(record.get("error"))
    summary = _object(record.get("summary"))
    checks = _object(record.get("checks"))
    return Fact(
        time=_text(record.get("time")),
        request_id=_text(record.get("request_id")),
        ok=bool(record.get("ok")),
        verdict=_text(record.get("verdict")),
        error_kind=_text(error.get("kind")),
        bot=_text(summary.get("bot")),
        visitor_id=_text(summary.get("visitor_id")),
        id_match=checks.get("id_match"),
        duplicate=checks.get("duplicate"),
    )


def _text(value: object) -> str | None:
    return value if isinstance(value, str) else None


def _object(value: object) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}


@dataclass
class Tally:
    """Counts over a stream of records, in one pass."""

    records: int = 0
    unsealed: int = 0
    first: str | None = None
    last: str | None = None
    verdicts: Counter[str] = field(default_factory=Counter)
    bots: Counter[str] = field(default_factory=Counter)
    error_kinds: Counter[str] = field(default_factory=Counter)
    id_mismatches: int = 0
    duplicates: int = 0
    request_ids: Counter[str] = field(default_factory=Counter)
    visitors: Counter[str] = field(default_factory=Counter)
    suspicious_by_visitor: Counter[str] = field(default_factory=Counter)
    unreadable_lines: int = 0

    def add(self, fact: Fact) -> None:
        self.records += 1
        if fact.time:
            self.first = fact.time if self.first is None else min(self.first, fact.time)
            self.last = fact.time if self.last is None else max(self.last, fact.time)
        self.verdicts[fact.verdict or "none"] += 1
        if fact.request_id:
            self.request_ids[fact.request_id] += 1
        if not fact.ok:
            self.error_kinds[fact.error_kind or "unknown"] += 1
            return
        self.unsealed += 1
        self.bots[fact.bot or "none"] += 1
        self.id_mismatches += fact.id_match is False
        self.duplicates += fact.duplicate is True
        if fact.visitor_id:
            self.visitors[fact.visitor_id] += 1
            self.suspicious_by_visitor[fact.visitor_id] += fact.verdict == "suspicious"

    def result(self, top: int = TOP_VISITORS) -> dict[str, Any]:
        """The report as plain data (the ``--json`` output, minus ``source``)."""
        # Ties broken by id, so two reads of the same records print the same list.
        ranked = sorted(self.visitors.items(), key=lambda item: (-item[1], item[0]))[:top]
        return {
            "records": self.records,
            "unsealed": self.unsealed,
            "errors": self.records - self.unsealed,
            "first": self.first,
            "last": self.last,
            "verdicts": dict(sorted(self.verdicts.items())),
            "bots": dict(sorted(self.bots.items())),
            "error_kinds": dict(sorted(self.error_kinds.items())),
            "id_mismatches": self.id_mismatches,
            "duplicates": self.duplicates,
            "repeated_request_ids": sum(1 for n in self.request_ids.values() if n > 1),
            "visitors": len(self.visitors),
            "top_visitors": [
                {
                    "visitor_id": visitor,
                    "records": count,
                    "suspicious": self.suspicious_by_visitor[visitor],
                }
                for visitor, count in ranked
            ],
            "unreadable_lines": self.unreadable_lines,
        }


def _open(path: str) -> BinaryIO:
    try:
        return open(path, "rb")  # the caller closes it
    except OSError as exc:
        raise _unreadable(path, exc) from None


def _unreadable(path: str, exc: OSError) -> ReportError:
    return ReportError(f"{path}: cannot read ({exc.strerror or exc})")


def sqlite_facts(path: str) -> Iterator[Fact]:
    """Facts from a store, in one read transaction (a consistent snapshot)."""
    # Here, not at the top: a JSONL report (and the CLI) needs no sqlite3, which some
    # Pythons lack (the README: only fp_sqlite and the webhook spool need it).
    from fp_core.store import open_store

    with closing(open_store(path)) as conn:
        rows = conn.execute(
            "SELECT time, request_id, ok, verdict, error_kind, bot, visitor_id, checks "
            "FROM records ORDER BY id"
        )
        for row in rows:
            checks = json.loads(row["checks"]) if row["checks"] else {}
            yield Fact(
                time=row["time"],
                request_id=row["request_id"],
                ok=bool(row["ok"]),
                verdict=row["verdict"],
                error_kind=row["error_kind"],
                bot=row["bot"],
                visitor_id=row["visitor_id"],
                id_match=checks.get("id_match"),
                duplicate=checks.get("duplicate"),
            )


def jsonl_records(lines: Iterable[bytes], tally: Tally | None = None) -> Iterator[dict[str, Any]]:
    """Records from a JSONL file's lines. A last line without its newline is still being
    written and is skipped; other lines that are not a JSON object count as unreadable."""
    for line in lines:
        if not line.endswith(b"\n"):
            break
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except ValueError:
            record = None
        if isinstance(record, dict):
            yield record
        elif tally is not None:
            tally.unreadable_lines += 1


def _lines(head: bytes, handle: BinaryIO) -> Iterator[bytes]:
    """The lines of a file whose first bytes, ``head``, were read already: the file may
    be a pipe (``report <(zcat events.jsonl.1.gz)``), which cannot be read twice."""
    *whole, rest = head.split(b"\n")
    for line in whole:
        yield line + b"\n"
    if rest:
        yield rest + handle.readline()
    yield from handle


def build_report(path: str, top: int = TOP_VISITORS) -> dict[str, Any]:
    """The report for a store or a JSONL file (or a pipe giving one)."""
    tally = Tally()
    facts: Iterable[Fact]
    with _open(path) as handle:
        # Read once, the format told by the first bytes: a pipe cannot be opened again.
        try:
            head = handle.read(len(SQLITE_MAGIC))
        except OSError as exc:
            raise _unreadable(path, exc) from None
        fmt = "sqlite" if head == SQLITE_MAGIC else "jsonl"
        if fmt == "sqlite":
            facts = sqlite_facts(path)
        else:
            facts = (fact_of(r) for r in jsonl_records(_lines(head, handle), tally))
        try:
            for fact in facts:
                tally.add(fact)
        except FpError as exc:  # the store's file (SqliteFileError)
            raise ReportError(exc.message) from None
        except OSError as exc:
            raise _unreadable(path, exc) from None
        except Exception as exc:  # a corrupt row: say so rather than print half a report
            what = f"{type(exc).__name__}: {exc}"
            raise ReportError(f"{path}: cannot read a record ({what})") from None
    if not tally.records and tally.unreadable_lines:
        # Lines, but not one record: some other file (a tap that has written nothing
        # yet leaves an empty file, which is a report of nothing).
        raise ReportError(
            f"{path}: no record in {tally.unreadable_lines} line(s); "
            "not an fp_jsonl file or fp_sqlite store?"
        )
    return {"source": {"path": path, "format": fmt}, **tally.result(top)}


def format_report(report: dict[str, Any]) -> str:
    """The human-readable report."""
    source = report["source"]
    lines = [
        f"fp-tap report: {printable(source['path'])} ({source['format']})",
        f"records:    {report['records']} ({report['unsealed']} unsealed, "
        f"{report['errors']} errors)",
        f"time range: {printable(report['first'] or '-')} .. {printable(report['last'] or '-')}",
        "",
        _counts("verdicts", report["verdicts"]),
        _counts("bot results", report["bots"]),
        _counts("error kinds", report["error_kinds"]),
        "",
        f"id mismatches:        {report['id_mismatches']}",
        f"duplicates (flagged): {report['duplicates']}",
        f"repeated request ids: {report['repeated_request_ids']}",
        f"distinct visitors:    {report['visitors']}",
    ]
    if report["unreadable_lines"]:
        lines.append(f"unreadable lines:     {report['unreadable_lines']}")
    if report["top_visitors"]:
        lines += ["", "top visitors:"]
        # Escaped: a visitor id comes from the event, and must not print lines (or
        # terminal escapes) of its own.
        shown = [(printable(v["visitor_id"]), v) for v in report["top_visitors"]]
        width = max(len(text) for text, _ in shown)
        lines += [
            f"  {text:<{width}}  {v['records']:>6} record(s), {v['suspicious']} suspicious"
            for text, v in shown
        ]
    return "\n".join(lines) + "\n"


def _counts(title: str, counts: dict[str, int]) -> str:
    body = ", ".join(f"{printable(k)} {v}" for k, v in counts.items()) or "-"
    return f"{title + ':':<13} {body}"
