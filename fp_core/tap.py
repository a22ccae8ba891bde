"""The tap: one HTTP response in, at most one record out. No mitmproxy here.

The addon turns a flow into a :class:`ResponseInfo`; :meth:`Tap.inspect` recognises an
open response, unseals it, runs the trust checks and returns the export record (see
the README's "Record format"), counting everything in :class:`~fp_core.stats.Stats`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from fp_core.checks import CHECK_NAMES, CheckConfig, comparable_client_ip, evaluate, verdict
from fp_core.envelope import OpenResponse, parse_open_response
from fp_core.errors import UnsealError
from fp_core.events import summarize
from fp_core.jsontext import JsonObject, encodable
from fp_core.keys import DecryptionKey
from fp_core.redact import Redactor
from fp_core.replay import ReplayCache
from fp_core.sealed import DEFAULT_MAX_SIZE, unseal_event
from fp_core.stats import Stats

#: A record's fields in the order the tap writes them (README "Record format"); the full
#: unsealed ``event`` comes last when the record carries it.
RECORD_FIELDS = (
    "time",
    "flow_id",
    "host",
    "path",
    "method",
    "status_code",
    "client_ip",
    "api",
    "request_id",
    "ok",
    "error",
    "key_id",
    "checks",
    "verdict",
    "reasons",
    "summary",
)
#: What the addon may keep on the flow (saved with it): no event, no plaintext, and
#: nothing the flow itself already says.
METADATA_FIELDS = RECORD_FIELDS[RECORD_FIELDS.index("api") :]


@dataclass(frozen=True, slots=True)
class ResponseInfo:
    """The parts of one HTTP exchange the tap looks at."""

    flow_id: str
    time: float
    host: str
    path: str
    method: str
    status_code: int
    body: bytes
    peer_ip: str | None = None
    header_client_ip: str | None = None


@dataclass
class TapConfig:
    keys: Sequence[DecryptionKey] = ()
    include_event: bool = True
    max_event: int = DEFAULT_MAX_SIZE
    checks: CheckConfig = field(default_factory=CheckConfig)
    replay_ttl: float = 3600.0
    replay_max_entries: int = 100_000
    redactor: Redactor = field(default_factory=Redactor)


def iso_time(epoch: float) -> str:
    """ISO 8601 UTC with milliseconds, e.g. ``2026-11-26T21:45:23.123Z``."""
    return (
        datetime.fromtimestamp(epoch, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")
    )


class Tap:
    """Recognise, unseal and judge open responses; keeps the replay memory and counters."""

    def __init__(self, config: TapConfig, stats: Stats | None = None) -> None:
        self.config = config
        self.stats = stats or Stats()
        self.replay = ReplayCache(config.replay_ttl, config.replay_max_entries)

    def inspect(self, info: ResponseInfo, *, remember: bool = True) -> dict[str, Any] | None:
        """The record for ``info``, or None when it is not an open response.

        ``remember=False`` re-reads a response already inspected (exports, the content
        view): no counters change and the replay memory is neither consulted nor updated.
        The configured redaction is applied to the record before it is returned, so
        every consumer (log line, flow metadata, sinks, exports) sees the same record.
        """
        opened = parse_open_response(info.body)
        if opened is None:
            return None
        try:
            event = unseal_event(opened.sealed, self.config.keys, max_size=self.config.max_event)
        except UnsealError as exc:
            record = self._error_record(info, opened, exc)
        else:
            record = self._event_record(info, opened, event, remember)
        if remember:
            count_record(self.stats, record)
        if self.config.redactor:
            self.config.redactor.apply(record)
        return record

    def snapshot(self) -> dict[str, Any]:
        """Counters plus the replay memory's size and losses."""
        return self.stats.snapshot() | {
            "replay_ids": len(self.replay),
            "replay_evicted": self.replay.evicted,
        }

    def _base(self, info: ResponseInfo, opened: OpenResponse) -> dict[str, Any]:
        return {
            "time": iso_time(info.time),
            "flow_id": info.flow_id,
            "host": info.host,
            "path": info.path,
            "method": info.method,
            "status_code": info.status_code,
            "client_ip": info.header_client_ip or info.peer_ip,
            "api": opened.api,
            "request_id": opened.request_id,
        }

    def _error_record(
        self, info: ResponseInfo, opened: OpenResponse, exc: UnsealError
    ) -> dict[str, Any]:
        record = self._base(info, opened)
        record.update(
            ok=False,
            error=exc.to_dict(),
            key_id=None,
            checks=dict.fromkeys(CHECK_NAMES),
            verdict="error",
            reasons=[exc.kind],
            summary=summarize(None) | {"api": opened.api},
        )
        return record

    def _event_record(
        self, info: ResponseInfo, opened: OpenResponse, event: Any, remember: bool
    ) -> dict[str, Any]:
        summary = summarize(event)
        text = event.text
        # A backslash first, found by memchr (0.06 us for 4 KB, where the two 3-character
        # searches alone took 5.7): events rarely hold one at all.
        if "\\" in text and ("\\ud" in text or "\\uD" in text):
            # A lone surrogate's escape, maybe: no UTF-8 form, so none in what the flow
            # keeps either (mitmproxy could not save it with -w).
            summary = {k: encodable(v) if type(v) is str else v for k, v in summary.items()}
        seen_id = summary["request_id"] or opened.request_id
        duplicate = self.replay.check_and_add(seen_id, info.time) if remember else None
        checks = evaluate(
            summary,
            opened.request_id,
            int(info.time * 1000),
            duplicate=duplicate,
            client_ip=comparable_client_ip(info.header_client_ip, info.peer_ip),
            config=self.config.checks,
        )
        judged, reasons = verdict(checks, summary["bot"])
        record = self._base(info, opened)
        record.update(
            ok=True,
            error=None,
            key_id=event.key_id,
            checks=checks,
            verdict=judged,
            reasons=reasons,
            summary=summary,
        )
        if self.config.include_event:
            # With its text: sinks write that instead of encoding the event again.
            record["event"] = JsonObject(event, event.text)
        return record


def count_record(stats: Stats, record: dict[str, Any]) -> None:
    """Count an inspected open response: what the tap counts of each one, and what the
    addon adds for those a worker answered and died before reporting."""
    stats.incr("open_responses")
    if record["ok"]:
        stats.incr("unsealed")
        stats.incr_group("verdicts", record["verdict"])
        for reason in record["reasons"]:
            stats.incr_group("reasons", reason)
    else:
        stats.incr_group("errors", record["error"]["kind"])


def metadata_of(record: dict[str, Any]) -> dict[str, Any]:
    """The JSON-safe part of a record kept on the flow (never the event itself)."""
    return {name: record[name] for name in METADATA_FIELDS}
