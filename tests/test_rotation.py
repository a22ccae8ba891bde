"""fp_core.rotation: noticing a rotated key or secret file, and refusing a half-written
one once."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from fp_core.errors import KeyConfigError
from fp_core.keys import DecryptionKey
from fp_core.rotation import FileChange, FileWatch, Watches, key_file_watch, secret_file_watch
from fp_core.webhook import WebhookConfigError
from tests.e2e.conftest import secret_forms

OLD, NEW = DecryptionKey.generate(), DecryptionKey.generate()


def write(path: Path, *lines: str, mode: int = 0o600) -> None:
    path.write_text("".join(line + "\n" for line in lines))
    path.chmod(mode)


@pytest.fixture
def keyfile(tmp_path: Path) -> Path:
    path = tmp_path / "keys.txt"
    write(path, "# current", OLD.to_base64())
    return path


def loaded(path: Path) -> FileWatch[list[DecryptionKey]]:
    watch = key_file_watch(path)
    assert watch.load() == [OLD]
    return watch


def test_an_unchanged_file_is_nothing_to_do(keyfile: Path) -> None:
    watch = loaded(keyfile)
    assert watch.check() is None
    os.utime(keyfile)  # touched, not changed
    assert watch.check() is None


def test_a_rotation_gives_the_new_keys_once(keyfile: Path) -> None:
    watch = loaded(keyfile)
    write(keyfile, NEW.to_base64(), OLD.to_base64())
    reload = watch.check()
    assert reload is not None
    assert reload.value == [NEW, OLD]
    assert (reload.problem, reload.warning) == (None, None)
    assert watch.check() is None, "taken: nothing more to do"


def test_the_content_counts_not_the_times(keyfile: Path) -> None:
    """A key written over another of the same size, with the old modification time:
    a watch by size and time would miss it."""
    watch = loaded(keyfile)
    before = keyfile.stat()
    write(keyfile, "# current", NEW.to_base64())
    os.utime(keyfile, ns=(before.st_atime_ns, before.st_mtime_ns))
    assert keyfile.stat().st_size == before.st_size
    reload = watch.check()
    assert reload is not None
    assert reload.value == [NEW]


def test_the_value_and_the_digest_come_from_one_read(keyfile: Path) -> None:
    """Rewritten again while a check parses what it read: that check takes what it read,
    and the next one sees the newer content (had the digest come from a second read, the
    newer content would pass for the one in use, and never be taken)."""
    newest = DecryptionKey.generate()
    watch = loaded(keyfile)
    write(keyfile, NEW.to_base64())
    parse = watch._parse

    def rewritten_meanwhile(text: str) -> list[DecryptionKey]:
        write(keyfile, newest.to_base64())
        return parse(text)

    watch._parse = rewritten_meanwhile
    reload = watch.check()
    watch._parse = parse
    assert reload is not None
    assert reload.value == [NEW]
    reload = watch.check()
    assert reload is not None
    assert reload.value == [newest]


def test_a_bad_file_keeps_the_keys_in_use_and_is_reported_once(keyfile: Path) -> None:
    watch = loaded(keyfile)
    write(keyfile, NEW.to_base64()[:20])  # as while the new key is being written
    reload = watch.check()
    assert reload is not None
    assert reload.value is None
    assert reload.problem == f"key file {keyfile} line 1: decodes to 15 bytes, an AES-256 key is 32"
    assert watch.check() is None, "the same content: reported already"
    write(keyfile, NEW.to_base64())
    reload = watch.check()
    assert reload is not None
    assert reload.value == [NEW]


def test_problems_never_carry_a_key(keyfile: Path) -> None:
    watch = loaded(keyfile)
    write(keyfile, NEW.to_base64(), OLD.to_base64()[:-8])  # the second line cut short
    reload = watch.check()
    assert reload is not None
    assert reload.problem is not None
    assert "line 2" in reload.problem
    for key in (OLD, NEW):
        for form in secret_forms(key.raw()):
            assert form.decode("latin-1") not in reload.problem
        assert key.to_base64()[:12] not in reload.problem


def test_a_missing_file_is_reported_once_until_it_is_back(keyfile: Path) -> None:
    watch = loaded(keyfile)
    content = keyfile.read_bytes()
    keyfile.unlink()
    reload = watch.check()
    assert reload is not None
    assert reload.value is None
    assert reload.problem == f"key file {keyfile}: cannot read (No such file or directory)"
    assert watch.check() is None, "still missing: reported already"
    keyfile.write_bytes(content)
    assert watch.check() is None, "back as it was: the keys in use are its keys"
    keyfile.unlink()
    reload = watch.check()
    assert reload is not None, "gone again: news again"
    assert reload.value is None


def test_a_changed_file_with_no_key_is_refused(keyfile: Path) -> None:
    """Far likelier caught while being written than meant: refused, whatever the
    environment holds (the keys in use stay)."""
    watch = loaded(keyfile)
    write(keyfile, "# rotating")
    reload = watch.check()
    assert reload is not None
    assert reload.value is None
    assert reload.problem == f"key file {keyfile} holds no key"
    write(keyfile)
    reload = watch.check()
    assert reload is not None
    assert reload.problem == f"key file {keyfile} holds no key", "another content: news"


def test_an_open_file_warns_with_its_keys(keyfile: Path) -> None:
    watch = loaded(keyfile)
    write(keyfile, NEW.to_base64(), mode=0o644)
    reload = watch.check()
    assert reload is not None
    assert reload.value == [NEW]
    assert reload.warning == f"key file {keyfile} is readable by group or others; chmod 600 it"


def test_load_raises_what_it_cannot_use(tmp_path: Path) -> None:
    path = tmp_path / "keys.txt"
    with pytest.raises(KeyConfigError, match="cannot read"):
        key_file_watch(path).load()
    path.write_bytes(b"\xff\xfe")
    with pytest.raises(KeyConfigError, match=r"cannot read \(not UTF-8\)"):
        key_file_watch(path).load()
    write(path, "# a key file that holds no key yet is fine at start")
    assert key_file_watch(path).load() == []


def test_a_rotated_webhook_secret(tmp_path: Path) -> None:
    path = tmp_path / "webhook.secret"
    write(path, "old-secret")
    watch = secret_file_watch(path)
    assert watch.load().text() == "old-secret"
    assert watch.check() is None
    write(path, "  new-secret  ")
    reload = watch.check()
    assert reload is not None
    assert reload.value is not None
    assert reload.value.text() == "new-secret"
    assert watch.check() is None


def test_an_emptied_secret_file_keeps_the_secret_in_use(tmp_path: Path) -> None:
    path = tmp_path / "webhook.secret"
    write(path, "old-secret")
    watch = secret_file_watch(path)
    watch.load()
    write(path)
    reload = watch.check()
    assert reload is not None
    assert (reload.value, reload.problem) == (None, f"webhook secret file {path} is empty")
    assert watch.check() is None, "reported once"
    path.unlink()
    reload = watch.check()
    assert reload is not None
    assert reload.problem is not None
    assert "cannot read" in reload.problem
    assert "old-secret" not in reload.problem
    with pytest.raises(WebhookConfigError, match="cannot read"):
        watch.load()


def rotated_and_checked(keyfile: Path) -> tuple[Watches, Watches, FileChange]:
    """Watches of ``keyfile``, which is then rotated to NEW; a copy of them, and the
    change that copy found."""
    watches = Watches()
    watches.set("keys", loaded(keyfile))
    write(keyfile, NEW.to_base64())
    checked = watches.copy()
    (change,) = checked.check()
    return watches, checked, change


def test_checked_copies_leave_the_watches_in_use_until_adopted(keyfile: Path) -> None:
    watches, checked, change = rotated_and_checked(keyfile)
    assert change.reload.value == [NEW]
    # Not adopted yet: a copy made now (for a pipeline) still reports the rotation.
    twin = watches.get("keys")
    assert twin is not None
    reload = twin.copy().check()
    assert reload is not None
    assert reload.value == [NEW]
    watches.adopt_all(checked)
    assert watches.current(change)
    assert watches.get("keys") is change.watch
    assert watches.copy().check() == [], "adopted: in use with its value"


def test_a_checked_copy_is_not_adopted_over_a_newer_watch(keyfile: Path) -> None:
    watches, checked, change = rotated_and_checked(keyfile)
    newer = key_file_watch(keyfile)
    watches.set("keys", newer)  # an option change meanwhile
    watches.adopt_all(checked)
    assert not watches.current(change)
    assert watches.get("keys") is newer
