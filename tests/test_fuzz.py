"""A bounded run of the coverage-guided fuzz target (tests/fuzz/fuzz_core.py)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

FUZZ = Path(__file__).resolve().parent / "fuzz"
SECONDS = 12


def test_fuzz_target_runs_clean(tmp_path: Path) -> None:
    pytest.importorskip("atheris", reason="atheris has no wheel for this Python/machine")
    corpus = FUZZ / "corpus"
    assert len(list(corpus.iterdir())) >= 20, "the checked-in seed corpus is missing"
    # New inputs go to tmp_path (first directory); the checked-in corpus is only read.
    result = subprocess.run(
        [
            sys.executable,
            str(FUZZ / "fuzz_core.py"),
            f"-max_total_time={SECONDS}",
            "-timeout=10",
            "-rss_limit_mb=2048",
            "-print_final_stats=1",
            str(tmp_path),
            str(corpus),
        ],
        capture_output=True,
        text=True,
        timeout=SECONDS + 120,
        check=False,
    )
    log = result.stderr
    assert result.returncode == 0, log[-4000:]
    runs = int(re.search(r"Done (\d+) runs", log).group(1))
    assert runs > 10_000, f"the fuzzer barely ran ({runs} runs)"
    assert "stat::number_of_executed_units" in log


def test_corpus_is_what_make_corpus_writes(tmp_path: Path) -> None:
    """The checked-in seeds are reproducible from the project's own generators."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("make_corpus", FUZZ / "make_corpus.py")
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    import hashlib

    expected = {hashlib.sha1(s, usedforsecurity=False).hexdigest() for s in module.seeds()}
    assert expected == {p.name for p in (FUZZ / "corpus").iterdir()}
