"""The CLI through a real interpreter, as a user runs it from a fresh clone."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from fp_core import seal_event
from fp_core.generate import generate_event, open_response_body
from fp_core.keys import ENV_VAR, DecryptionKey

ROOT = Path(__file__).resolve().parents[1]


def run(
    args: list[str],
    stdin: bytes = b"",
    env: dict[str, str] | None = None,
    prelude: str | None = None,
) -> subprocess.CompletedProcess[bytes]:
    """``python -m fp_core ARGS`` in a fresh interpreter (``prelude`` runs first)."""
    base = {k: v for k, v in os.environ.items() if k not in (ENV_VAR, "PYTHONIOENCODING")}
    base["PYTHONPATH"] = str(ROOT)
    command = [sys.executable, "-m", "fp_core"]
    if prelude is not None:
        run_module = "import runpy; runpy.run_module('fp_core', run_name='__main__')"
        command = [
            sys.executable,
            "-c",
            f"{prelude}\nimport sys; sys.argv[0] = 'fp_core'\n{run_module}",
        ]
    return subprocess.run(
        [*command, *args],
        input=stdin,
        capture_output=True,
        env={**base, **(env or {})},
        timeout=60,
        check=False,
    )


@pytest.fixture
def keyfile(tmp_path: Path) -> tuple[Path, DecryptionKey]:
    key = DecryptionKey.generate()
    path = tmp_path / "keys"
    path.write_text(key.to_base64() + "\n")
    path.chmod(0o600)  # as keygen makes it: an open file adds a warning to stderr
    return path, key


def test_readme_pipeline(tmp_path: Path) -> None:
    """keygen -> generate -> seal -> unseal, exactly as the README shows."""
    path = tmp_path / "demo.key"
    assert run(["keygen", str(path)]).returncode == 0
    assert path.stat().st_mode & 0o777 == 0o600
    event = run(["generate", "--api", "v3", "--bot", "bad", "--seed", "4"]).stdout
    sealed = run(["seal", "--keys-file", str(path), "--open-response"], event)
    assert sealed.returncode == 0
    body = json.loads(sealed.stdout)
    assert set(body) >= {"v", "requestId", "sealedResult"}
    out = run(["unseal", "--keys-file", str(path), "--pretty"], sealed.stdout)
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout) == json.loads(event)
    assert out.stdout.startswith(b"{\n  ")


def test_bare_base64_with_env_keys(keyfile: tuple[Path, DecryptionKey]) -> None:
    _, key = keyfile
    event = generate_event("v4", rng=1)
    out = run(["unseal"], seal_event(event, key).encode() + b"\n", env={ENV_VAR: key.to_base64()})
    assert out.returncode == 0
    assert json.loads(out.stdout) == event


def test_raw_sealed_bytes_on_stdin(keyfile: tuple[Path, DecryptionKey]) -> None:
    import base64

    path, key = keyfile
    event = generate_event("v4", rng=1)
    raw = base64.b64decode(seal_event(event, key))
    assert json.loads(run(["unseal", "--keys-file", str(path)], raw).stdout) == event


def test_open_response_body_on_stdin(keyfile: tuple[Path, DecryptionKey]) -> None:
    path, key = keyfile
    event = generate_event("v4", rng=2)
    body = open_response_body("v4", event["event_id"], seal_event(event, key))
    out = run(["unseal", "--keys-file", str(path)], json.dumps(body).encode())
    assert json.loads(out.stdout) == event


@pytest.mark.parametrize(
    ("stdin", "kind"),
    [(b"not base64 !", "bad_base64"), (b"AAAAAAAA", "invalid_header"), (b"", "invalid_header")],
)
def test_failures_exit_2_with_kind(
    keyfile: tuple[Path, DecryptionKey], stdin: bytes, kind: str
) -> None:
    out = run(["unseal", "--keys-file", str(keyfile[0])], stdin)
    assert out.returncode == 2
    assert out.stdout == b""
    assert out.stderr.decode().startswith(f"error: {kind}: ")


def test_wrong_key_and_no_key(keyfile: tuple[Path, DecryptionKey]) -> None:
    sealed = seal_event(generate_event("v4", rng=1), DecryptionKey.generate()).encode()
    out = run(["unseal", "--keys-file", str(keyfile[0])], sealed)
    assert (out.returncode, out.stderr.split(b":")[0:2]) == (2, [b"error", b" decrypt_failed"])
    out = run(["unseal"], sealed)
    assert out.returncode == 2
    assert out.stderr.startswith(b"error: no_keys: ")


def test_usage_errors_exit_64(tmp_path: Path) -> None:
    assert run([]).returncode == 64
    assert run(["unseal", "--nope"]).returncode == 64
    bad = tmp_path / "bad"
    bad.write_text("AAAA\n")
    out = run(["unseal", "--keys-file", str(bad)], b"x")
    assert out.returncode == 64
    assert b"bad_key" in out.stderr
    assert b"line 1" in out.stderr
    assert run(["unseal", "--keys-file", str(tmp_path / "missing")]).returncode == 64
    assert run(["seal"], b"{}").returncode == 64


def test_keygen_refuses_to_overwrite(keyfile: tuple[Path, DecryptionKey]) -> None:
    path, key = keyfile
    assert run(["keygen", str(path)]).returncode == 64
    assert key.to_base64() in path.read_text()


def test_keygen_on_an_existing_file_is_no_key_error(keyfile: tuple[Path, DecryptionKey]) -> None:
    out = run(["keygen", str(keyfile[0])])
    assert out.returncode == 64
    assert out.stderr == f"error: cannot create {keyfile[0]}: File exists\n".encode()


@pytest.mark.parametrize("args", [["--key"], ["--keys"], ["--key="], ["--pretty", "--k"]])
def test_a_mistyped_option_neither_abbreviates_nor_echoes_its_value(
    keyfile: tuple[Path, DecryptionKey], args: list[str]
) -> None:
    """ "--key <base64>" was taken for --keys-file, whose error named the "path": the key."""
    secret = keyfile[1].to_base64()
    argv = [*args[:-1], args[-1] + secret] if args[-1].endswith("=") else [*args, secret]
    out = run(["unseal", *argv])
    assert out.returncode == 64
    assert b"unrecognized arguments: " in out.stderr
    assert secret.encode() not in out.stdout + out.stderr
    assert args[-1].rstrip("=").encode() in out.stderr


def test_a_url_safe_key_starting_with_a_dash_is_not_taken_for_an_option_name() -> None:
    # "-Q...": not "-h...", which argparse takes for -h (help, exit 0): 1 key in 64.
    key = "-Q" + DecryptionKey.generate().to_base64().replace("+", "-").replace("/", "_")[2:]
    out = run(["unseal", "--key", key])
    assert out.returncode == 64
    assert key.encode() not in out.stderr
    assert out.stderr.endswith(b"error: usage: unrecognized arguments: --key\n")


def test_an_open_key_file_warns_and_still_works(keyfile: tuple[Path, DecryptionKey]) -> None:
    path, key = keyfile
    path.chmod(0o644)
    sealed = seal_event(generate_event("v4", rng=1), key).encode()
    out = run(["unseal", "--keys-file", str(path)], sealed)
    assert out.returncode == 0
    expected = f"warning: key file {path} is readable by group or others; chmod 600 it\n"
    assert out.stderr == expected.encode()
    path.chmod(0o600)
    assert run(["unseal", "--keys-file", str(path)], sealed).stderr == b""


def test_errors_never_echo_keys(keyfile: tuple[Path, DecryptionKey]) -> None:
    path, key = keyfile
    out = run(["unseal", "--keys-file", str(path)], b"AAAA" * 20)
    assert key.to_base64().encode() not in out.stdout + out.stderr


def test_a_lone_surrogate_is_sealed_and_unsealed_as_its_escape(
    keyfile: tuple[Path, DecryptionKey],
) -> None:
    """JSON may hold a "\\ud800" escape, which has no UTF-8 form of its own."""
    event = b'{"event_id": "1700000000000.abcdef", "timestamp": 1, "x": "\\ud800"}'
    sealed = run(["seal", "--keys-file", str(keyfile[0])], event)
    assert (sealed.returncode, sealed.stderr) == (0, b"")
    back = run(["unseal", "--keys-file", str(keyfile[0])], sealed.stdout)
    assert (back.returncode, back.stderr) == (0, b"")
    assert json.loads(back.stdout)["x"] == "\ud800"


@pytest.mark.parametrize("value", [b"NaN", b"Infinity", b"1e400"])
def test_seal_refuses_what_unseal_would_refuse(
    keyfile: tuple[Path, DecryptionKey], value: bytes
) -> None:
    event = b'{"event_id": "a", "timestamp": 1, "score": ' + value + b"}"
    out = run(["seal", "--keys-file", str(keyfile[0])], event)
    assert (out.returncode, out.stderr) == (64, b"error: usage: stdin is not JSON\n")


@pytest.mark.parametrize(
    "argv",
    [
        lambda key: ["--key", key, "unseal"],  # before the subcommand: "invalid choice"
        lambda key: ["--keys", key, "unseal"],
        lambda key: ["unseal", "--pretty=" + key],  # "ignored explicit argument"
    ],
    ids=["--key-before-subcommand", "--keys-before-subcommand", "--pretty=value"],
)
def test_no_usage_error_repeats_a_value(argv: Any) -> None:
    """argparse's other messages quote the value: a key on the terminal (found by an API
    hunt)."""
    key = DecryptionKey.generate().to_base64()
    done = run(argv(key))
    assert done.returncode == 64
    assert (key.encode() in done.stdout + done.stderr) is False  # never printed, even here
    assert b"error: usage:" in done.stderr


def test_unseal_prints_utf_8_whatever_the_locale(keyfile: tuple[Path, DecryptionKey]) -> None:
    """A stdout in cp1252 (a Windows pipe) or Latin-1 ended in a traceback (found by an
    API hunt). JSON is UTF-8."""
    path, key = keyfile
    event = {"event_id": "1700000000000.abcdef", "timestamp": 1, "url": "https://例え.jp/Łódź"}
    done = run(
        ["unseal", "--keys-file", str(path)],
        seal_event(event, key).encode(),
        env={"PYTHONIOENCODING": "cp1252"},
    )
    assert done.returncode == 0, done.stderr[-300:]
    assert json.loads(done.stdout.decode("utf-8")) == event


def test_report_json_writes_a_lone_surrogate_as_its_escape(tmp_path: Path) -> None:
    path = tmp_path / "events.jsonl"
    path.write_bytes(b'{"ok": true, "summary": {"visitor_id": "v\\udfff"}}\n')
    done = run(["report", "--json", str(path)])
    assert done.returncode == 0, done.stderr[-300:]
    assert json.loads(done.stdout)["top_visitors"][0]["visitor_id"] == "v\udfff"


NO_SQLITE = """
import sys
class NoSqlite:  # as a Python built without it
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("sqlite3", "_sqlite3"):
            raise ModuleNotFoundError("No module named '_sqlite3'")
sys.meta_path.insert(0, NoSqlite())
"""


def test_the_cli_needs_no_sqlite3_but_for_a_store(keyfile: tuple[Path, DecryptionKey]) -> None:
    """Every subcommand died at import on a Python without sqlite3 (found by an API
    hunt); only fp_sqlite and the webhook spool need it."""
    path, key = keyfile
    event = {"event_id": "1700000000000.abcdef", "timestamp": 1}
    done = run(
        ["unseal", "--keys-file", str(path)], seal_event(event, key).encode(), prelude=NO_SQLITE
    )
    assert done.returncode == 0, done.stderr[-500:]
    assert json.loads(done.stdout) == event
    assert run(["keygen"], prelude=NO_SQLITE).returncode == 0
    jsonl = path.parent / "events.jsonl"
    jsonl.write_text('{"ok": true, "summary": {"visitor_id": "v1"}}\n')
    report = run(["report", "--json", str(jsonl)], prelude=NO_SQLITE)
    assert json.loads(report.stdout)["records"] == 1


@pytest.mark.parametrize("locale", ["C.UTF-8", "C"])
def test_report_of_a_file_whose_name_is_not_utf_8(tmp_path: Path, locale: str) -> None:
    """A Latin-1 name (old shares): with stdout made UTF-8, the name's undecodable byte
    ended the report in a traceback (a regression of mine, found by a hunt)."""
    name = os.fsdecode(b"caf\xe9.jsonl")
    (tmp_path / name).write_bytes(b'{"ok": true, "summary": {"visitor_id": "v1"}}\n')
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONIOENCODING", "PYTHONUTF8")}
    done = subprocess.run(
        [sys.executable, "-m", "fp_core", "report", name],
        cwd=tmp_path,
        env={**env, "LC_ALL": locale, "PYTHONPATH": str(ROOT)},
        capture_output=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-400:]
    assert b"fp-tap report: caf\\udce9.jsonl (jsonl)" in done.stdout
    assert b"records:    1 (1 unsealed, 0 errors)" in done.stdout
