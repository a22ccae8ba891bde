"""scripts/bench_prune.py: section 7 times real deletion steps, or stops."""

from __future__ import annotations

from pathlib import Path

import pytest

from fp_core import store as store_module
from scripts.bench_prune import prune_step


def test_each_round_writes_a_batch_and_deletes_it_in_one_step(tmp_path: Path) -> None:
    row = prune_step(2, tmp_path)
    assert row.rows == store_module.PRUNE_BATCH
    assert row.delete_ms.n == row.insert_ms.n == 2
    assert 0 < row.delete_ms.low <= row.delete_ms.high
    assert list(tmp_path.iterdir()) == [], "its stores are gone"


def test_the_section_stops_when_a_step_deletes_other_than_a_batch(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(store_module, "PRUNE_BATCH", 3)  # the store's, not the bench's
    with pytest.raises(RuntimeError, match="the step deleted"):
        prune_step(1, tmp_path)
