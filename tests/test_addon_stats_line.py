"""fp_addon: the periodic stats line (``fp_stats_every``) of a headless tap."""

from __future__ import annotations

import asyncio
import json
import logging
from pathlib import Path

import pytest
from mitmproxy.test import taddons

import fp_addon
from tests.test_addon import fp_body, make_flow, run
from tests.test_addon_worker import on_loop, started, until

PREFIX = "fp-tap stats: "


def stats_lines(caplog: pytest.LogCaptureFixture) -> list[dict[str, object]]:
    return [
        json.loads(r.getMessage().removeprefix(PREFIX))
        for r in caplog.records
        if r.getMessage().startswith(PREFIX)
    ]


@on_loop
async def test_the_counters_are_logged_every_interval(
    keyfile: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    monkeypatch.setattr(fp_addon, "TICK", 0.02)
    tap = fp_addon.FingerprintTap()
    with taddons.context(tap) as tctx:
        tctx.configure(tap, fp_keys_file=str(keyfile), fp_worker=False, fp_stats_every=1)
        await started(tap)
        run(tap, make_flow(fp_body()[0]))
        await until(lambda: len(stats_lines(caplog)) >= 2, "two stats lines")
        first = stats_lines(caplog)[0]
        assert (first["responses"], first["open_responses"], first["unsealed"]) == (1, 1, 1)
        assert first == json.loads(tap.stats_command()), "what fp.stats says"

        tctx.configure(tap, fp_stats_every=0)
        await asyncio.sleep(0.1)  # a line in flight, if any
        seen = len(stats_lines(caplog))
        await asyncio.sleep(1.5)  # 75 ticks, and more than the old interval
        assert len(stats_lines(caplog)) == seen, "0: no more lines"
        tap.done()


@on_loop
async def test_off_by_default(keyfile: Path, monkeypatch, caplog) -> None:
    caplog.set_level(logging.INFO)
    monkeypatch.setattr(fp_addon, "TICK", 0.02)
    tap = fp_addon.FingerprintTap()
    with taddons.context(tap) as tctx:
        tctx.configure(tap, fp_keys_file=str(keyfile), fp_worker=False)
        await started(tap)
        await asyncio.sleep(0.5)
        tap.done()
    assert stats_lines(caplog) == []
