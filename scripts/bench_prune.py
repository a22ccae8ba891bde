"""Section 7 of the benchmarks: deleting rows past ``fp_sqlite_keep`` from the store.

The record writer thread, which also feeds the JSONL file and the webhook spool, deletes
old rows in steps of :data:`fp_core.store.PRUNE_BATCH` between batches of records: each
step is a pause in that thread. This times one step on a store of real records (those of
generated open responses, v4 and v3 alternately, each with its event), next to writing
as many records in one transaction, the writer's usual work.
"""

from __future__ import annotations

import statistics
import tempfile
import time
from dataclasses import dataclass, replace
from pathlib import Path

from fp_core.jsontext import dumps
from fp_core.keys import DecryptionKey
from fp_core.pipeline import OPTIONS, Pipeline
from fp_core.stats import Stats
from fp_core.store import PRUNE_BATCH, SqliteStore
from scripts.bench_stats import Spread
from scripts.bench_worker import default_options, responses


@dataclass(frozen=True, slots=True)
class PruneRow:
    """One deletion step and one write of as many records, in milliseconds per round."""

    rows: int
    event_bytes: int
    delete_ms: Spread
    insert_ms: Spread


def prune_step(rounds: int, workdir: Path) -> PruneRow:
    """``rounds`` rounds, each on a fresh store of :data:`PRUNE_BATCH` records two hours
    old: write them (one transaction), then one deletion step with a keep of one hour."""
    key = DecryptionKey.generate()
    pipeline = Pipeline()
    pipeline.configure(default_options(), OPTIONS, [key])
    old = time.time() - 7200
    records = [pipeline.inspect(replace(r, time=old)) for r in responses(key, PRUNE_BATCH, 7)]
    pipeline.close(0)
    if any(r is None or not r["ok"] for r in records):
        raise RuntimeError("a bench response was not unsealed: the rows would not be real")
    kept = [r for r in records if r is not None]
    inserts, deletes = [], []
    workdir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=workdir) as tmp:
        for n in range(rounds):
            path = str(Path(tmp) / f"round-{n}.sqlite3")
            store = SqliteStore(path, Stats())
            started = time.perf_counter()
            store.write(kept)
            inserts.append((time.perf_counter() - started) * 1000)
            store.close()
            stats = Stats()
            store = SqliteStore(path, stats, keep=3600)
            started = time.perf_counter()
            store.retry_held()  # the writer's idle tick: the first step is due at once
            deletes.append((time.perf_counter() - started) * 1000)
            store.close()
            if stats.group("store").get("pruned") != PRUNE_BATCH:
                raise RuntimeError(f"the step deleted {stats.group('store')}, not {PRUNE_BATCH}")
    size = round(statistics.fmean(len(dumps(r["event"])) for r in kept))
    return PruneRow(PRUNE_BATCH, size, Spread.of(deletes), Spread.of(inserts))
