"""Run the real pieces as separate processes: the stand-in endpoint, the webhook
receiver and ``mitmdump``.

Shared by the demo, the benchmarks and the end-to-end tests so that all three start,
wait for and stop processes the same way. Everything binds 127.0.0.1. ``mitmdump``
runs from a scratch directory with ``PYTHONPATH`` cleared: it finds ``fp_core`` only
beside ``fp_addon.py``, exactly as a stock or standalone mitmproxy would.
"""

from __future__ import annotations

import contextlib
import datetime
import ipaddress
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from fp_core.errors import KeyConfigError
from fp_core.keys import DecryptionKey, read_key_file
from fp_core.writer import open_private

REPO = Path(__file__).resolve().parents[1]
ADDON = REPO / "fp_addon.py"
ENDPOINT = REPO / "scripts" / "endpoint.py"
#: The proxy benchmark's stand-in: fresh open responses at a fifth of the CPU.
LEAN_ENDPOINT = REPO / "scripts" / "lean_endpoint.py"
RECEIVER = REPO / "scripts" / "receiver.py"
_ENDPOINT_READY = re.compile(r"listening on https?://127\.0\.0\.1:(\d+)")
_RECEIVER_READY = re.compile(r"receiver on (https?://127\.0\.0\.1:(\d+)\S*)")
_ADDON_SUMMARY = re.compile(r"fp-tap summary: (\{.*\})")
_MITMDUMP_READY = re.compile(r"listening at (?:127\.0\.0\.1|\*|\[::\]):(\d+)")


def stop_on_signals() -> threading.Event:
    """An event set by SIGTERM or SIGINT: how the tests, the demo and the bench stop the
    stand-in servers. Install it before announcing the port, so no signal is missed."""
    stop = threading.Event()

    def request_stop(signum: int, frame: FrameType | None) -> None:
        stop.set()

    signal.signal(signal.SIGTERM, request_stop)
    signal.signal(signal.SIGINT, request_stop)
    return stop


def sealing_key(keys_file: str, prog: str) -> DecryptionKey | None:
    """The first key of a stand-in's key file; None (after saying why on stderr) when
    there is none to seal with."""
    try:
        keys = read_key_file(keys_file)
    except KeyConfigError as error:
        print(f"{prog}: {error}", file=sys.stderr)
        return None
    if not keys:
        print(f"{prog}: no key in {keys_file}", file=sys.stderr)
        return None
    return keys[0]


def addon_summary(output: str) -> dict[str, Any]:
    """The counters fp_addon logs when mitmdump stops (empty when there is no such line)."""
    match = _ADDON_SUMMARY.search(output)
    return json.loads(match.group(1)) if match else {}


def children(pid: int) -> list[int]:
    """The live child processes of ``pid`` (mitmdump's: the addon's worker)."""
    try:
        text = Path(f"/proc/{pid}/task/{pid}/children").read_text(encoding="ascii")
    except OSError:
        return []
    return [int(child) for child in text.split()]


def venv_bin(name: str) -> Path:
    """A console script installed beside the running interpreter (e.g. mitmdump)."""
    return Path(sys.executable).parent / name


class ProcessError(RuntimeError):
    """A process did not start, or stopped in a way it should not have."""


class Service:
    """A child process with its output in a file, started and stopped politely."""

    def __init__(
        self, name: str, args: Sequence[str], log: Path, *, cwd: Path, env: Mapping[str, str]
    ) -> None:
        self.name = name
        self.log = log
        self._handle = log.open("ab")
        self.proc = subprocess.Popen(
            list(args), cwd=cwd, env=dict(env), stdout=self._handle, stderr=subprocess.STDOUT
        )
        self.port = 0

    def output(self) -> str:
        return self.log.read_text(encoding="utf-8", errors="replace")

    def wait_for(self, pattern: re.Pattern[str], timeout: float = 30.0) -> re.Match[str]:
        """Wait until the output matches; fail early if the process exits."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            match = pattern.search(self.output())
            if match:
                return match
            if self.proc.poll() is not None:
                raise ProcessError(
                    f"{self.name} exited with {self.proc.returncode}:\n{self.output()[-3000:]}"
                )
            time.sleep(0.05)
        tail = self.output()[-3000:]
        raise ProcessError(f"{self.name} did not print {pattern.pattern!r} in {timeout} s:\n{tail}")

    def wait_exit(self, timeout: float = 30.0) -> int:
        """Wait for the process to end on its own; its exit status."""
        try:
            return self.proc.wait(timeout)
        finally:
            self._handle.close()

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30.0) -> int:
        """Signal the process and wait for it; SIGKILL if it overstays."""
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
                self._handle.close()
                raise ProcessError(f"{self.name} ignored signal {sig} for {timeout} s") from None
        self._handle.close()
        return self.proc.returncode

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self._handle.close()


def clean_env(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """The caller's environment without anything that would leak the repo onto sys.path
    or keys and secrets into a child that should not have them."""
    private = ("PYTHONPATH", "FP_DECRYPTION_KEYS", "FP_WEBHOOK_SECRET")
    env = {k: v for k, v in os.environ.items() if k not in private}
    env.update(extra or {})
    return env


def start_endpoint(
    workdir: Path,
    keys_file: Path,
    *,
    log: Path | None = None,
    tls: tuple[Path, Path] | None = None,
    extra_args: Sequence[str] = (),
    name: str = "endpoint",
    script: Path = ENDPOINT,
) -> Service:
    """The stand-in Fingerprint endpoint (``script``) on a free port (``service.port``)."""
    args = [sys.executable, str(script), "--keys-file", str(keys_file), "--port", "0"]
    if log is not None:
        args += ["--log", str(log)]
    if tls is not None:
        args += ["--tls-cert", str(tls[0]), "--tls-key", str(tls[1])]
    service = Service(
        name, [*args, *extra_args], workdir / f"{name}.out", cwd=workdir, env=clean_env()
    )
    service.port = int(service.wait_for(_ENDPOINT_READY).group(1))
    return service


def start_receiver(
    workdir: Path,
    *,
    log: Path | None = None,
    args: Sequence[str] = (),
    env: Mapping[str, str] | None = None,
    name: str = "receiver",
) -> tuple[Service, str]:
    """The test webhook receiver (``scripts/receiver.py``) on a free port, or on the port
    given in ``args``; returns the service and the URL to post to."""
    command = [sys.executable, str(RECEIVER), *args]
    if log is not None:
        command += ["--log", str(log)]
    service = Service(name, command, workdir / f"{name}.out", cwd=workdir, env=clean_env(env))
    match = service.wait_for(_RECEIVER_READY)
    service.port = int(match.group(2))
    return service, match.group(1)


@dataclass
class MitmdumpConfig:
    """How to run ``mitmdump -s fp_addon.py``."""

    mode: str
    options: Mapping[str, str | int | bool] = field(default_factory=dict)
    save_flows: Path | None = None
    keys_env: str | None = None
    addon: bool = True
    extra_args: Sequence[str] = ()
    #: More environment variables for the process (e.g. a webhook secret).
    env: Mapping[str, str] = field(default_factory=dict)


def start_mitmdump(
    workdir: Path, config: MitmdumpConfig, *, name: str = "mitmdump", wait: bool = True
) -> Service:
    """mitmdump on a free 127.0.0.1 port, with its own confdir (CA) under ``workdir``.

    With ``wait`` (the default) this returns once it listens; ``service.port`` is set.
    """
    return _start_tool("mitmdump", workdir, config, name=name, wait=wait)


def start_mitmweb(
    workdir: Path, config: MitmdumpConfig, *, name: str = "mitmweb"
) -> tuple[Service, str, str]:
    """mitmweb like :func:`start_mitmdump`, plus its web UI; returns (service, url, token)."""
    web_port = free_port()
    extra = ["--no-web-open-browser", "--web-host", "127.0.0.1", "--web-port", str(web_port)]
    config = MitmdumpConfig(**{**config.__dict__, "extra_args": [*config.extra_args, *extra]})
    service = _start_tool("mitmweb", workdir, config, name=name, wait=True)
    token = service.wait_for(re.compile(r"Web server listening at \S+\?token=([0-9a-f]+)")).group(1)
    return service, f"http://127.0.0.1:{web_port}", token


def free_port() -> int:
    """A port nobody listens on right now (mitmweb cannot report a port 0 it was given)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _start_tool(
    tool: str, workdir: Path, config: MitmdumpConfig, *, name: str, wait: bool
) -> Service:
    args = [
        str(venv_bin(tool)),
        "--listen-host",
        "127.0.0.1",
        "--listen-port",
        "0",
        "--mode",
        config.mode,
        "--set",
        f"confdir={workdir / 'mitmproxy-conf'}",
    ]
    if config.addon:
        args += ["-s", str(ADDON)]
    for key, value in dict(config.options).items():
        text = str(value).lower() if isinstance(value, bool) else str(value)
        args += ["--set", f"{key}={text}"]
    if config.save_flows is not None:
        args += ["-w", str(config.save_flows)]
    extra = dict(config.env)
    if config.keys_env:
        extra["FP_DECRYPTION_KEYS"] = config.keys_env
    service = Service(
        name,
        [*args, *config.extra_args],
        workdir / f"{name}.out",
        cwd=workdir,
        env=clean_env(extra),
    )
    if wait:
        service.port = int(service.wait_for(_MITMDUMP_READY, timeout=60).group(1))
    return service


def mitmproxy_ca(workdir: Path) -> Path:
    """The CA certificate mitmdump generated in its confdir (clients trust this)."""
    return workdir / "mitmproxy-conf" / "mitmproxy-ca-cert.pem"


def make_tls_files(folder: Path, host: str = "127.0.0.1") -> tuple[Path, Path, Path]:
    """A throwaway CA and a server certificate for ``host``: (ca.pem, cert.pem, key.pem)."""
    now = datetime.datetime.now(datetime.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "fp-tap test CA")])
    ca = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(
            x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False
        )
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    try:
        san: x509.GeneralName = x509.IPAddress(ipaddress.ip_address(host))
    except ValueError:
        san = x509.DNSName(host)
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, host)]))
        .issuer_name(ca_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([san]), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False
        )
        .sign(ca_key, hashes.SHA256())
    )
    folder.mkdir(parents=True, exist_ok=True)
    ca_path, cert_path, key_path = folder / "ca.pem", folder / "cert.pem", folder / "key.pem"
    ca_path.write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    key_path.chmod(0o600)
    return ca_path, cert_path, key_path


def write_key_file(path: Path, key: DecryptionKey, comment: str | None = None) -> Path:
    """``key`` in a key file (base64, after a ``# comment`` line if given) that is 0600
    from the moment it exists."""
    path.unlink(missing_ok=True)  # a file left with other permissions would keep them
    with open_private(str(path), "w") as handle:
        handle.write((f"# {comment}\n" if comment else "") + key.to_base64() + "\n")
    return path


@contextlib.contextmanager
def temporary_key_file(workdir: Path, name: str, key: DecryptionKey) -> Iterator[Path]:
    """:func:`write_key_file` in ``workdir``, removed again on the way out."""
    workdir.mkdir(parents=True, exist_ok=True)
    path = write_key_file(workdir / name, key)
    try:
        yield path
    finally:
        path.unlink(missing_ok=True)
