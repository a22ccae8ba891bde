"""fp_core is pure: importing every module pulls in only the stdlib and cryptography."""

from __future__ import annotations

import json
import pkgutil
import subprocess
import sys
from pathlib import Path

import fp_core

ROOT = Path(__file__).resolve().parents[1]


def test_fp_core_imports_only_stdlib_and_cryptography() -> None:
    modules = [
        f"fp_core.{m.name}" for m in pkgutil.walk_packages(fp_core.__path__) if m.name != "__main__"
    ]
    code = (
        "import importlib, json, sys\n"
        f"for m in {modules!r}: importlib.import_module(m)\n"
        "print(json.dumps(sorted(sys.modules)))\n"
    )
    out = subprocess.run(
        [sys.executable, "-I", "-c", f"import sys; sys.path.insert(0, {str(ROOT)!r})\n{code}"],
        capture_output=True,
        check=True,
        timeout=60,
    )
    loaded = json.loads(out.stdout)
    # _openssl and _cffi_backend are the compiled parts of cryptography.
    extra = {"__main__", "fp_core", "cryptography", "_cffi_backend", "_openssl"}
    allowed_roots = set(sys.stdlib_module_names) | extra
    foreign = sorted({m for m in loaded if m.split(".")[0] not in allowed_roots})
    assert foreign == []
    assert len(modules) >= 6
