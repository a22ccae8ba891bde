"""scripts/harness.py: the helpers that do not start processes."""

from __future__ import annotations

from scripts.harness import addon_summary


def test_addon_summary() -> None:
    out = '[12:00:00.000] fp-tap summary: {"dropped": 3, "written": {"jsonl": 7}}\n'
    assert addon_summary(out) == {"dropped": 3, "written": {"jsonl": 7}}
    assert addon_summary("no addon here\n") == {}
