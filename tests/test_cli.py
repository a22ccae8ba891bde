"""The CLI through a real interpreter, as a user runs it from a fresh clone."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from fp_core import seal_event
from fp_core.generate import generate_event, open_response_body
from fp_core.keys import ENV_VAR, DecryptionKey

ROOT = Path(__file__).resolve().parents[1]


def run(
    args: list[str], stdin: bytes = b"", env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[bytes]:
    base = {k: v for k, v in os.environ.items() if k != ENV_VAR}
    base["PYTHONPATH"] = str(ROOT)
    return subprocess.run(
        [sys.executable, "-m", "fp_core", *args],
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
    key = "-" + DecryptionKey.generate().to_base64().replace("+", "-").replace("/", "_")[1:]
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
