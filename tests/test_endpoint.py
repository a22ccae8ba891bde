"""scripts/endpoint.py: the pure build_response for every case, then the real process."""

from __future__ import annotations

import base64
import datetime
import gzip
import hashlib
import importlib.util
import ipaddress
import json
import os
import select
import signal
import ssl
import subprocess
import sys
import threading
import time
import urllib.request
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from http.client import HTTPConnection
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from mitmproxy.net import encoding as http_encoding

from fp_core.envelope import OpenResponse, parse_open_response
from fp_core.errors import UnsealError
from fp_core.events import inner_request_id, summarize
from fp_core.keys import DecryptionKey
from fp_core.sealed import HEADER, NONCE_SIZE, UnsealedEvent, unseal_event

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "endpoint.py"


def _load_endpoint() -> ModuleType:
    """scripts/ is not a package: import the file itself, once per test session."""
    name = "fp_tap_scripts_endpoint"
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, SCRIPT)
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up while the file runs
    spec.loader.exec_module(module)
    return module


endpoint = _load_endpoint()

APIS = ("v3", "v4")
TS = 1_760_000_000_000
MINUTE_MS = 60_000
BAD_CASES = {
    "wrong_key": "decrypt_failed",
    "bad_base64": "bad_base64",
    "bad_header": "invalid_header",
    "truncated": "decrypt_failed",
    "not_deflate": "decompress_failed",
    "not_json": "invalid_json",
    "not_event": "not_an_event",
    "bomb": "too_large",
}
BOTS = {"ok": "not_detected", "good_bot": "good", "bad_bot": "bad"}


def build(case: str, key: DecryptionKey, **kwargs: Any) -> Any:
    """build_response with the endpoint's defaults for whatever the test leaves out."""
    args: dict[str, Any] = {"api": "v4", "encoding": "identity", "seed": None, "ts": None}
    args.update(kwargs)
    status = args.pop("status", None)
    return endpoint.build_response(case, key=key, status=status, **args)


def decoded(response: Any) -> bytes:
    """The body as a client sees it after undoing Content-Encoding (with mitmproxy's code)."""
    name = response.headers.get("Content-Encoding")
    if name is None:
        return bytes(response.body)
    body = http_encoding.decode(response.body, name)
    assert isinstance(body, bytes)
    return body


def open_response(response: Any) -> OpenResponse:
    opened = parse_open_response(decoded(response))
    assert opened is not None
    return opened


def unseal(response: Any, key: DecryptionKey) -> tuple[OpenResponse, UnsealedEvent]:
    opened = open_response(response)
    return opened, unseal_event(opened.sealed, [key])


def unseal_kind(response: Any, key: DecryptionKey) -> str:
    with pytest.raises(UnsealError) as info:
        unseal(response, key)
    return info.value.kind


def now_ms() -> int:
    return int(time.time() * 1000)


# --- build_response: open responses ----------------------------------------------


@pytest.mark.parametrize("api", APIS)
@pytest.mark.parametrize("case", sorted(BOTS))
def test_valid_event_carries_the_bot_verdict(case: str, api: str, key: DecryptionKey) -> None:
    response = build(case, key, api=api)
    opened, event = unseal(response, key)
    summary = summarize(event)
    assert response.status == 200
    assert summary["bot"] == BOTS[case]
    assert summary["api"] == api == opened.api == event.api
    assert opened.version == ("2" if api == "v3" else None)
    assert summary["replayed"] is False
    ids = {opened.request_id, inner_request_id(event), response.meta.request_id}
    assert ids == {response.meta.inner_request_id, response.headers["X-Stand-In-Request-Id"]}
    assert response.headers["Content-Type"] == "application/json; charset=utf-8"
    assert response.headers["Content-Length"] == str(len(response.body))
    assert "Content-Encoding" not in response.headers
    assert abs(summary["timestamp"] - now_ms()) < 5000


@pytest.mark.parametrize("api", APIS)
def test_mismatch_seals_another_request_id(api: str, key: DecryptionKey) -> None:
    response = build("mismatch", key, api=api)
    opened, event = unseal(response, key)
    assert opened.request_id == response.meta.request_id
    assert inner_request_id(event) == response.meta.inner_request_id
    assert inner_request_id(event) != opened.request_id


@pytest.mark.parametrize("api", APIS)
def test_stale_and_replayed_events(api: str, key: DecryptionKey) -> None:
    _, stale = unseal(build("stale", key, api=api), key)
    assert abs(summarize(stale)["timestamp"] - (now_ms() - 10 * MINUTE_MS)) < 5000
    _, replayed = unseal(build("replayed", key, api=api), key)
    assert summarize(replayed)["replayed"] is True
    _, fixed_stale = unseal(build("stale", key, api=api, ts=TS), key)
    assert summarize(fixed_stale)["timestamp"] == TS - 10 * MINUTE_MS


@pytest.mark.parametrize("api", APIS)
def test_ts_fixes_the_event_time_and_request_id(api: str, key: DecryptionKey) -> None:
    opened, event = unseal(build("ok", key, api=api, ts=TS), key)
    assert summarize(event)["timestamp"] == TS
    assert opened.request_id.startswith(f"{TS}.")


@pytest.mark.parametrize("api", APIS)
@pytest.mark.parametrize(("case", "kind"), sorted(BAD_CASES.items()))
def test_broken_case_fails_with_its_error_kind(
    case: str, kind: str, api: str, key: DecryptionKey
) -> None:
    response = build(case, key, api=api)
    assert response.status == 200
    assert open_response(response).request_id == response.meta.request_id
    assert response.headers["X-Stand-In-Request-Id"] == response.meta.request_id
    assert unseal_kind(response, key) == kind


@pytest.mark.parametrize("seed", range(20))
def test_not_deflate_and_truncated_fail_the_same_way_for_any_event(
    seed: int, key: DecryptionKey
) -> None:
    for api in APIS:
        for ts in (0, 7, TS, 9_999_999_999_999):
            args = {"api": api, "seed": seed, "ts": ts}
            assert unseal_kind(build("not_deflate", key, **args), key) == "decompress_failed"
            assert unseal_kind(build("truncated", key, **args), key) == "decrypt_failed"


def test_bomb_is_small_on_the_wire_and_inflates_to_64_mib_of_zeros(key: DecryptionKey) -> None:
    response = build("bomb", key)
    assert len(response.body) < 128 * 1024
    raw = base64.b64decode(open_response(response).sealed)
    assert raw[: len(HEADER)] == HEADER
    nonce = raw[len(HEADER) : len(HEADER) + NONCE_SIZE]
    compressed = key.aead.decrypt(nonce, raw[len(HEADER) + NONCE_SIZE :], None)
    inflater = zlib.decompressobj(-zlib.MAX_WBITS)
    total, pending = 0, compressed
    while not inflater.eof:
        chunk = inflater.decompress(pending, 1 << 20)
        pending = inflater.unconsumed_tail
        assert chunk.count(0) == len(chunk)
        total += len(chunk)
    assert total == 64 * 1024 * 1024


# --- build_response: ordinary traffic ---------------------------------------------


def test_plain_html_and_garbage_are_not_open_responses(key: DecryptionKey) -> None:
    plain = build("plain", key)
    assert json.loads(plain.body) == {"ok": True}
    html = build("html", key)
    assert html.headers["Content-Type"] == "text/html; charset=utf-8"
    assert html.body.lstrip().lower().startswith(b"<!doctype html>")
    garbage = build("garbage", key)
    assert garbage.headers["Content-Type"].startswith("application/json")
    with pytest.raises(UnicodeDecodeError):
        garbage.body.decode("utf-8")
    for response in (plain, html, garbage):
        assert response.status == 200
        assert parse_open_response(response.body) is None
        assert response.headers["X-Stand-In-Request-Id"] == ""
        assert response.headers["Content-Length"] == str(len(response.body))
        assert response.meta.request_id is None


def test_huge_is_about_two_mib_of_json(key: DecryptionKey) -> None:
    response = build("huge", key)
    assert 2 * 1024 * 1024 <= len(response.body) < 3 * 1024 * 1024
    assert json.loads(response.body)["ok"] is True
    assert parse_open_response(response.body) is None


def test_empty_is_204_without_body_or_content_length(key: DecryptionKey) -> None:
    response = build("empty", key, encoding="gzip")
    assert response.status == 204
    assert response.body == b""
    assert "Content-Length" not in response.headers
    assert "Content-Encoding" not in response.headers
    assert response.meta.encoding == "identity"
    as_200 = build("empty", key, status=200)
    assert (as_200.status, as_200.headers["Content-Length"], as_200.body) == (200, "0", b"")


# --- build_response: encodings, determinism, status ---------------------------------


@pytest.mark.parametrize("encoding", ["gzip", "deflate", "br", "zstd"])
@pytest.mark.parametrize("case", ["ok", "huge", "garbage"])
def test_encoding_round_trips_to_the_identity_body(
    case: str, encoding: str, key: DecryptionKey
) -> None:
    plain = build(case, key, seed=3, ts=TS)
    encoded = build(case, key, seed=3, ts=TS, encoding=encoding)
    assert encoded.headers["Content-Encoding"] == encoding
    assert encoded.headers["Content-Length"] == str(len(encoded.body))
    assert encoded.body != plain.body
    assert decoded(encoded) == plain.body
    assert encoded.meta.encoding == encoding


def test_gzip_is_the_standard_format(key: DecryptionKey) -> None:
    response = build("ok", key, encoding="gzip")
    opened = parse_open_response(gzip.decompress(response.body))
    assert opened is not None
    assert unseal_event(opened.sealed, [key])


def test_missing_compression_module_is_501(
    key: DecryptionKey, monkeypatch: pytest.MonkeyPatch
) -> None:
    def no_module(name: str, package: str | None = None) -> ModuleType:
        raise ImportError(name)

    monkeypatch.setattr(importlib, "import_module", no_module)
    for name in ("br", "zstd"):
        with pytest.raises(endpoint.RequestError) as info:
            build("ok", key, encoding=name)
        assert info.value.status == 501
        assert f"encoding={name}" in info.value.message


@pytest.mark.parametrize("case", endpoint.CASES)
def test_seed_and_ts_make_identical_bytes(case: str, key: DecryptionKey) -> None:
    first = build(case, key, api="v3", encoding="gzip", seed=11, ts=TS)
    again = build(case, key, api="v3", encoding="gzip", seed=11, ts=TS)
    assert (first.status, first.headers, first.body) == (again.status, again.headers, again.body)
    assert first.meta == again.meta
    other = build(case, key, api="v3", encoding="gzip", seed=12, ts=TS)
    unseeded = build(case, key, api="v3", encoding="gzip", ts=TS)
    if case in ("plain", "html", "empty", "huge"):  # constant bodies by design
        assert other.body == first.body == unseeded.body
    else:
        assert other.body != first.body
        assert unseeded.body != first.body


def test_same_seed_keeps_event_but_not_time_without_ts(key: DecryptionKey) -> None:
    _, first = unseal(build("ok", key, seed=5), key)
    time.sleep(0.002)
    _, again = unseal(build("ok", key, seed=5), key)
    assert summarize(first)["visitor_id"] == summarize(again)["visitor_id"]
    assert first["timestamp"] != again["timestamp"]


def test_status_is_any_final_code(key: DecryptionKey) -> None:
    response = build("ok", key, status=503)
    assert response.status == 503
    assert unseal(response, key)[1]
    for bad in (100, 199, 600):
        with pytest.raises(endpoint.RequestError) as info:
            build("ok", key, status=bad)
        assert info.value.status == 400
    with pytest.raises(endpoint.RequestError, match="cannot carry a body"):
        build("ok", key, status=204)


def test_unknown_values_are_400_listing_the_valid_ones(key: DecryptionKey) -> None:
    with pytest.raises(endpoint.RequestError) as info:
        build("nope", key)
    assert info.value.status == 400
    assert all(case in info.value.message for case in endpoint.CASES)
    for field, args in (("api", {"api": "v5"}), ("encoding", {"encoding": "lzma"})):
        with pytest.raises(endpoint.RequestError, match=f"unknown {field}"):
            build("ok", key, **args)
    for ts in (-1, endpoint.MAX_TS + 1):
        with pytest.raises(endpoint.RequestError, match="ts must be"):
            build("ok", key, ts=ts)


def test_parse_params_reads_the_query() -> None:
    params = endpoint.parse_params("ii=x%2Fy&case=bomb&case=ok&api=v3&seed=4&ts=9&status=201", "v4")
    assert (params.case, params.api, params.encoding) == ("bomb", "v3", "identity")
    assert (params.seed, params.ts, params.status) == (4, 9, 201)
    defaults = endpoint.parse_params("", "v3")
    assert (defaults.case, defaults.api, defaults.seed, defaults.status) == ("ok", "v3", None, None)
    with pytest.raises(endpoint.RequestError, match="seed must be an integer"):
        endpoint.parse_params("seed=abc", "v4")


# --- the server glue, in this process -------------------------------------------------


def test_a_failure_while_building_answers_500_and_keeps_serving(
    key: DecryptionKey, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    config = endpoint.ServerConfig(key, "v4", 0.0, None)
    server = endpoint.StandInServer(("127.0.0.1", 0), config, None)
    serving = threading.Thread(
        target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
    )
    serving.start()
    real_build = endpoint.build_response

    def flaky_build(case: str, *args: Any, **kwargs: Any) -> Any:
        if case == "bomb":
            raise RuntimeError("simulated bug")
        return real_build(case, *args, **kwargs)

    monkeypatch.setattr(endpoint, "build_response", flaky_build)
    try:
        conn = HTTPConnection("127.0.0.1", server.server_port, timeout=5)
        conn.request("POST", "/?case=bomb", body=b"x" * 100_000)
        failed = conn.getresponse()
        assert (failed.status, failed.read()) == (
            500,
            b"stand-in failure: RuntimeError('simulated bug')\n",
        )
        conn.request("GET", "/?case=plain")
        assert conn.getresponse().read() == b'{"ok":true}'
        conn.close()
    finally:
        server.shutdown()
        server.server_close()
    assert "simulated bug" in capsys.readouterr().err


# --- the real process ---------------------------------------------------------------


@contextmanager
def running(tmp_path: Path, *args: str) -> Iterator[tuple[subprocess.Popen[str], str]]:
    """Start the endpoint; yield it and its base URL; always stop it."""
    with (tmp_path / "endpoint.stderr").open("w") as stderr:
        proc = subprocess.Popen(
            [sys.executable, str(SCRIPT), "--port", "0", *args],
            stdout=subprocess.PIPE,
            stderr=stderr,
            text=True,
        )
        try:
            assert proc.stdout is not None
            ready, _, _ = select.select([proc.stdout], [], [], 10)
            assert ready, "endpoint did not print its address within 10 s"
            line = proc.stdout.readline().strip()
            assert line.startswith("listening on "), line
            yield proc, line.removeprefix("listening on ")
        finally:
            if proc.poll() is None:
                proc.kill()
            proc.wait(timeout=5)
            assert proc.stdout is not None
            proc.stdout.close()


def stop(proc: subprocess.Popen[str], signum: int) -> int:
    proc.send_signal(signum)
    return proc.wait(timeout=5)


@pytest.mark.e2e
def test_process_answers_keeps_alive_logs_and_stops_on_sigterm(
    tmp_path: Path, keys_file: Path, key: DecryptionKey
) -> None:
    log = tmp_path / "answers.jsonl"
    secret = "s3cr3t-proxy-value-" + os.urandom(8).hex()
    with running(tmp_path, "--keys-file", str(keys_file), "--log", str(log)) as (proc, url):
        assert url.startswith("http://127.0.0.1:")
        conn = HTTPConnection(url.removeprefix("http://"), timeout=5)
        requests = [
            ("POST", "/a/b/c?ii=fpjs%2Fx&case=ok&seed=1", {"FPJS-Proxy-Secret": secret}),
            ("POST", "/?case=bad_bot&api=v3&encoding=gzip", {"FPJS-Proxy-Client-IP": "192.0.2.7"}),
            ("GET", "/page?case=plain", {}),
            ("GET", "/?case=nope", {}),
            ("GET", "/?case=empty", {}),
        ]
        received = []
        sockets = []
        for method, path, headers in requests:
            body = b"agent payload" if method == "POST" else None
            conn.request(method, path, body=body, headers=headers)
            answer = conn.getresponse()
            received.append((answer.status, dict(answer.getheaders()), answer.read()))
            sockets.append(conn.sock)
        conn.close()
        # One keep-alive connection served every request, the 400 included.
        assert all(sock is sockets[0] for sock in sockets)

        with urllib.request.urlopen(f"{url}/x?case=ok&api=v3", data=b"{}", timeout=5) as answer:
            urllib_body = answer.read()
        assert stop(proc, signal.SIGTERM) == 0

    (ok_status, ok_headers, ok_body), (_, gz_headers, gz_body) = received[:2]
    assert ok_status == 200
    ok = parse_open_response(ok_body)
    assert ok is not None
    assert ok.request_id == ok_headers["X-Stand-In-Request-Id"]
    assert inner_request_id(unseal_event(ok.sealed, [key])) == ok.request_id
    assert gz_headers["Content-Encoding"] == "gzip"
    gz = parse_open_response(gzip.decompress(gz_body))
    assert gz is not None
    assert summarize(unseal_event(gz.sealed, [key]))["bot"] == "bad"
    assert received[2][0] == 200
    assert json.loads(received[2][2]) == {"ok": True}
    assert received[3][0] == 400
    assert b"valid: ok, good_bot" in received[3][2]
    assert received[4][0] == 204
    assert received[4][2] == b""
    urllib_open = parse_open_response(urllib_body)
    assert urllib_open is not None
    assert urllib_open.api == "v3"

    text = log.read_text()
    records = [json.loads(line) for line in text.splitlines()]
    assert len(records) == len(requests) + 1
    bodies = [body for _, _, body in received] + [urllib_body]
    for record, body in zip(records, bodies, strict=True):
        assert record["body_sha256"] == hashlib.sha256(body).hexdigest()
        assert record["body_len"] == len(body)
    assert [r["case"] for r in records] == ["ok", "bad_bot", "plain", "nope", "empty", "ok"]
    assert [r["status"] for r in records] == [200, 200, 200, 400, 204, 200]
    assert [r["proxy_secret_present"] for r in records] == [True] + [False] * 5
    assert [r["client_ip_header"] for r in records[:3]] == [None, "192.0.2.7", None]
    assert records[0]["path"] == "/a/b/c?ii=fpjs%2Fx&case=ok&seed=1"
    assert records[0]["request_id"] == records[0]["inner_request_id"] == ok.request_id
    assert records[1]["encoding"] == "gzip"
    assert records[2]["request_id"] is None
    datetime.datetime.fromisoformat(records[0]["time"])
    output = text + (tmp_path / "endpoint.stderr").read_text()
    assert secret not in output
    assert key.to_base64() not in output


@pytest.mark.e2e
def test_process_serves_https_and_stops_on_sigint(
    tmp_path: Path, keys_file: Path, key: DecryptionKey
) -> None:
    cert, private_key = self_signed_certificate(tmp_path)
    tls = ("--tls-cert", str(cert), "--tls-key", str(private_key))
    args = ("--keys-file", str(keys_file), "--api", "v3", "--delay-ms", "200", *tls)
    with running(tmp_path, *args) as (proc, url):
        assert url.startswith("https://127.0.0.1:")
        context = ssl.create_default_context(cafile=str(cert))
        started = time.monotonic()
        with urllib.request.urlopen(f"{url}/?case=good_bot", context=context, timeout=5) as answer:
            body = answer.read()
        assert time.monotonic() - started >= 0.2
        opened = parse_open_response(body)
        assert opened is not None
        assert opened.api == "v3"  # --api sets the default shape
        assert summarize(unseal_event(opened.sealed, [key]))["bot"] == "good"
        assert stop(proc, signal.SIGINT) == 0


@pytest.mark.e2e
def test_process_refuses_a_key_file_without_keys(tmp_path: Path) -> None:
    empty = tmp_path / "empty-keys.txt"
    empty.write_text("# no keys yet\n")
    result = subprocess.run(
        [sys.executable, str(SCRIPT), "--keys-file", str(empty)],
        capture_output=True,
        text=True,
        timeout=10,
        check=False,
    )
    assert result.returncode == 2
    assert result.stdout == ""
    assert "no key" in result.stderr


def self_signed_certificate(folder: Path) -> tuple[Path, Path]:
    """A certificate for 127.0.0.1 that Python's strict default verification accepts."""
    private_key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = datetime.datetime.now(datetime.UTC)
    public_key = private_key.public_key()
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(public_key), critical=False
        )
        .sign(private_key, hashes.SHA256())
    )
    cert_path = folder / "cert.pem"
    key_path = folder / "cert-key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        private_key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return cert_path, key_path
