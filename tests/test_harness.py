"""scripts/harness.py: the helpers that do not start processes."""

from __future__ import annotations

from pathlib import Path

from fp_core.keys import DecryptionKey, read_key_file
from scripts import harness
from scripts.harness import addon_summary


def test_addon_summary() -> None:
    out = '[12:00:00.000] fp-tap summary: {"dropped": 3, "written": {"jsonl": 7}}\n'
    assert addon_summary(out) == {"dropped": 3, "written": {"jsonl": 7}}
    assert addon_summary("no addon here\n") == {}


def test_key_files_are_private_and_read_back(tmp_path: Path) -> None:
    key = DecryptionKey.generate()
    old = tmp_path / "k.key"
    old.write_text("left by someone else\n")
    old.chmod(0o644)
    path = harness.write_key_file(old, key, "made by a test")
    assert path.stat().st_mode & 0o777 == 0o600  # not the mode of the file it replaced
    assert path.read_text().splitlines()[0] == "# made by a test"
    assert read_key_file(path) == [key]
    with harness.temporary_key_file(tmp_path / "sub", "t.key", key) as temporary:
        assert read_key_file(temporary) == [key]
        assert temporary.stat().st_mode & 0o777 == 0o600
    assert not temporary.exists()
