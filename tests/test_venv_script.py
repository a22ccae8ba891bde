"""scripts/venv.sh: finding a Python >= 3.12 by running it, and the .venv it makes."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

from scripts.harness import REPO

#: What venv.sh runs besides Python (PATH holds only these and the test's Pythons).
TOOLS = ("dirname", "ls", "sort", "cat", "rm", "sha256sum", "cut", "grep")


def tools(tmp_path: Path, *names: str) -> Path:
    """A folder of only these commands (links to the real ones), for a PATH of its own."""
    folder = tmp_path / "tools"
    folder.mkdir(exist_ok=True)
    for name in names:
        real = shutil.which(name)
        assert real is not None, name
        (folder / name).symlink_to(real)
    return folder


def fake(folder: Path, name: str, script: str) -> Path:
    path = folder / name
    path.write_text("#!/bin/sh\n" + script)
    path.chmod(0o755)
    return path


def bash(script: str, path: list[Path], tmp_path: Path) -> subprocess.CompletedProcess[str]:
    env = {
        "PATH": ":".join(map(str, path)),
        "HOME": str(tmp_path),
        "PYENV_ROOT": str(tmp_path / "no-pyenv"),
    }
    return subprocess.run(
        ["/bin/bash", "-c", script], env=env, capture_output=True, text=True, timeout=300
    )


def test_a_candidate_that_fails_when_run_is_skipped(tmp_path: Path) -> None:
    """A pyenv shim exists on PATH and fails unless its version is selected."""
    shims, real = tmp_path / "shims", tmp_path / "real"
    shims.mkdir()
    real.mkdir()
    fake(shims, "python3.14", "echo 'pyenv: python3.14: command not found' >&2; exit 127\n")
    (real / "python3.13").symlink_to(sys.executable)
    found = bash(
        f'source "{REPO}/scripts/venv.sh"; find_python',
        [shims, real, tools(tmp_path, *TOOLS)],
        tmp_path,
    )
    assert (found.returncode, found.stdout.strip()) == (0, str(real / "python3.13"))


def test_without_a_python_that_works_it_says_what_to_install(tmp_path: Path) -> None:
    shims = tmp_path / "shims"
    shims.mkdir()
    for name in ("python3.14", "python3.13", "python3.12", "python"):
        fake(shims, name, "exit 127\n")  # a shim of a version not selected
    fake(shims, "python3", "exit 1\n")  # runs, and says it is older than 3.12
    root = tmp_path / "repo"
    (root / "scripts").mkdir(parents=True)
    shutil.copy(REPO / "scripts" / "venv.sh", root / "scripts")
    result = bash(
        f'source "{root}/scripts/venv.sh"; ensure_venv',
        [shims, tools(tmp_path, *TOOLS)],
        tmp_path,
    )
    assert result.returncode == 1
    assert "needs Python 3.12 or newer" in result.stderr
    assert "apt-get install python3.12 python3.12-venv" in result.stderr
    assert not (root / ".venv").exists()


def test_a_venv_left_without_pip_is_not_reused(tmp_path: Path) -> None:
    """Debian's python3.X without python3.X-venv: `-m venv` fails half-way, leaving a
    .venv whose python runs but has no pip."""
    root = tmp_path / "repo"
    (root / "scripts").mkdir(parents=True)
    shutil.copy(REPO / "scripts" / "venv.sh", root / "scripts")
    shutil.copy(REPO / "pyproject.toml", root)
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    fake(
        bin_dir,
        "python3.14",
        'if [ "$1" = "-m" ] && [ "$2" = "venv" ]; then\n'
        f'  "{sys.executable}" -m venv --without-pip "$3"\n'
        "  echo 'ensurepip is not available: apt install python3.14-venv' >&2\n"
        "  exit 1\n"
        "fi\n"
        f'exec "{sys.executable}" "$@"\n',
    )
    script = f'source "{root}/scripts/venv.sh"; cd "$ROOT"; ensure_venv'
    path = [bin_dir, tools(tmp_path, *TOOLS)]
    first = bash(script, path, tmp_path)
    assert first.returncode == 1
    assert "ensurepip is not available" in first.stderr
    assert not (root / ".venv").exists(), "removed, not left half-made"
    # Half-made by other means (a run killed half-way): said, and removed.
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(root / ".venv")], check=True)
    second = bash(script, path, tmp_path)
    assert second.returncode == 1
    assert "has no pip" in second.stderr
    assert "No module named pip" not in second.stderr
    assert not (root / ".venv").exists()
