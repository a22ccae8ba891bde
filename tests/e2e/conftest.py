"""Fixtures for end-to-end tests: real processes, real sockets, all on 127.0.0.1."""

from __future__ import annotations

import json
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import pytest

from fp_core.keys import DecryptionKey
from scripts.harness import MitmdumpConfig, Service, start_endpoint, start_mitmdump, write_key_file

pytestmark = pytest.mark.e2e


@dataclass
class Keys:
    key: DecryptionKey
    file: Path


@pytest.fixture
def keys(tmp_path: Path) -> Keys:
    key = DecryptionKey.generate()
    return Keys(key, write_key_file(tmp_path / "keys.txt", key, "test key"))


@pytest.fixture
def endpoint(tmp_path: Path, keys: Keys) -> Iterator[Service]:
    service = start_endpoint(tmp_path, keys.file, log=tmp_path / "answers.jsonl")
    yield service
    service.kill()


class Upstream(Protocol):
    port: int


def reverse_tap(workdir: Path, endpoint: Upstream, **options: str | int | bool) -> Service:
    """mitmdump with the addon, as a reverse proxy in front of the stand-in endpoint (or
    any server on 127.0.0.1 with a ``port``)."""
    config = MitmdumpConfig(mode=f"reverse:http://127.0.0.1:{endpoint.port}", options=options)
    return start_mitmdump(workdir, config)


@dataclass
class Reply:
    status: int
    headers: list[tuple[str, str]]
    body: bytes


def fetch(
    url: str,
    *,
    data: bytes | None = b"{}",
    headers: dict[str, str] | None = None,
    opener: Any = None,
) -> Reply:
    """One request, with the raw (undecoded) body and every header as received."""
    request = urllib.request.Request(
        url, data=data, headers=headers or {}, method="POST" if data is not None else "GET"
    )
    open_ = opener.open if opener is not None else urllib.request.urlopen
    try:
        with open_(request, timeout=30) as response:
            return Reply(response.status, list(response.headers.items()), response.read())
    except urllib.error.HTTPError as exc:
        return Reply(exc.code, list(exc.headers.items()), exc.read())


def same_as_direct(proxy: Service, endpoint: Service, seed: int) -> None:
    """An ok v4 open response (``seed`` picks the event, stamped now) through the tap and
    straight from the endpoint: the client gets the same status, body and headers."""
    query = f"/?case=ok&api=v4&seed={seed}&ts={int(time.time() * 1000)}"
    through = fetch(f"http://127.0.0.1:{proxy.port}{query}")
    straight = fetch(f"http://127.0.0.1:{endpoint.port}{query}")
    assert through.status == straight.status == 200
    assert through.body == straight.body, "the body changed in transit"
    assert comparable_headers(through.headers) == comparable_headers(straight.headers)


def one_more_record(path: Path, count: int, timeout: float = 30) -> dict[str, Any]:
    """Wait for record number ``count + 1`` in the JSONL file; return it."""
    deadline = time.monotonic() + timeout
    while len(records := read_jsonl(path)) <= count:
        assert time.monotonic() < deadline, f"no record #{count + 1} in {timeout} s"
        time.sleep(0.05)
    return records[count]


def comparable_headers(headers: list[tuple[str, str]]) -> list[tuple[str, str]]:
    """Headers minus Date, which the endpoint stamps per response."""
    return [(k.lower(), v) for k, v in headers if k.lower() != "date"]


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    """The complete lines of a JSONL file (one being written may end mid-line: tests
    poll files that a tap or a receiver is still writing)."""
    if not path.exists():
        return []
    *complete, _partial = path.read_text().split("\n")
    return [json.loads(line) for line in complete if line.strip()]


def secret_forms(secret: bytes) -> list[bytes]:
    """The ways a secret could leak into output: raw, base64 (std and url), hex."""
    import base64

    forms = [
        secret,
        base64.b64encode(secret),
        base64.urlsafe_b64encode(secret),
        secret.hex().encode(),
    ]
    return [f.rstrip(b"=") for f in forms]
