"""Keys and the webhook secret rotated without a restart: noticing that their file
changed, and reading it again.

A tap sits in the traffic's path: restarting it to take a new key drops connections.
So whoever uses a key file or a webhook secret file reads it through a
:class:`FileWatch`, and checks it again every few seconds (``fp_secrets_reload``),
never on mitmproxy's event loop. Each process watches for itself (the worker for
unsealing and signing, the addon for its log scrubber and content view): each compares
the file with what *it* read, so no process can miss a change another one saw.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fp_core.errors import ConfigError, FpError, KeyConfigError
from fp_core.keys import DecryptionKey, parse_key_file, too_open_warning, with_env_keys
from fp_core.webhook import WebhookConfigError, WebhookSecret, env_secret


@dataclass(frozen=True)
class Reload[T]:
    """What a changed file gave: a new ``value``, or ``problem`` (then keep the one in use).

    ``problem`` is an error message, which never holds a key or a secret.
    """

    value: T | None
    problem: str | None = None
    #: The file's permission warning, if it has one now.
    warning: str | None = None


#: No content has failed to load (None stands for an unreadable file).
_NOTHING = object()


class FileWatch[T]:
    """A file's value, read by :meth:`load`, and :meth:`check` to tell when the file holds
    something else.

    It compares the file's bytes (by digest), not its times: a new key written in the
    same timestamp tick as the old one, or with the same size, is still a change. The
    digest and the value come from one read. A changed content that fails to load, or
    parses to nothing (a file caught while being written), is reported once, not at
    every check.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        parse: Callable[[str], T],
        *,
        what: str,
        error: type[FpError],
        empty: str,
    ) -> None:
        self.path = os.fspath(path)
        self.what = what
        self._parse = parse
        self._error = error
        self._empty = empty
        self._loaded: object = _NOTHING
        self._refused: object = _NOTHING

    def copy(self) -> FileWatch[T]:
        """Another watch of the same file, where this one stands: for another user of the
        same value (each check changes the watch it is made on)."""
        twin = FileWatch(
            self.path, self._parse, what=self.what, error=self._error, empty=self._empty
        )
        twin._loaded, twin._refused = self._loaded, self._refused
        return twin

    def load(self) -> T:
        """Read and parse the file now: its value is the one in use from here on. Raises
        the watch's :class:`FpError` when it cannot be read or parsed; that content then
        counts as refused (checks stay quiet until it changes, and take it once it is
        whole)."""
        try:
            data = self._read()
        except FpError:
            self._refused = None
            raise
        try:
            value = self._parse(self._text(data))
        except FpError:
            self._refused = _digest(data)
            raise
        self._loaded, self._refused = _digest(data), _NOTHING
        return value

    def check(self) -> Reload[T] | None:
        """None when the file holds what the value in use came from, or what last failed
        to load; else what it holds now, which is in use from here on if it loaded.
        Blocking: it reads the file."""
        try:
            data = self._read()
        except FpError as exc:
            return self._refuse(None, exc.message)  # None: unreadable
        digest = _digest(data)
        if digest == self._loaded:
            self._refused = _NOTHING  # back as it was: a later failure is news again
            return None
        if digest == self._refused:
            return None
        try:
            value = self._parse(self._text(data))
        except FpError as exc:
            return self._refuse(digest, exc.message)
        if not value:
            return self._refuse(digest, f"{self.what} {self.path} {self._empty}")
        self._loaded, self._refused = digest, _NOTHING
        return Reload(value, warning=too_open_warning(self.path, self.what))

    def _refuse(self, digest: bytes | None, problem: str) -> Reload[T] | None:
        if digest == self._refused:
            return None  # reported already
        self._refused = digest
        return Reload(None, problem=problem)

    def _read(self) -> bytes:
        try:
            return Path(self.path).read_bytes()
        except OSError as exc:
            why = exc.strerror or type(exc).__name__
            raise self._error(f"{self.what} {self.path}: cannot read ({why})") from None

    def _text(self, data: bytes) -> str:
        try:
            # utf-8-sig: a byte order mark (Notepad, PowerShell 5) is no part of a key
            # or of the webhook secret (which would sign every delivery wrong).
            return data.decode("utf-8-sig")
        except UnicodeDecodeError:
            raise self._error(f"{self.what} {self.path}: cannot read (not UTF-8)") from None


def _digest(data: bytes) -> bytes:
    return hashlib.sha256(data).digest()


def key_file_watch(path: str | os.PathLike[str]) -> FileWatch[list[DecryptionKey]]:
    """The keys of a key file (without the environment's). A changed file with no key
    of its own is refused: it is far likelier caught while being written than meant."""
    name = os.fspath(path)
    return FileWatch(
        name,
        lambda text: parse_key_file(text, f"key file {name}"),
        what="key file",
        error=KeyConfigError,
        empty="holds no key",
    )


def secret_file_watch(path: str | os.PathLike[str]) -> FileWatch[WebhookSecret]:
    """The secret of a webhook secret file (surrounding whitespace removed)."""
    name = os.fspath(path)

    def parse(text: str) -> WebhookSecret:
        if not (secret := text.strip()):
            raise WebhookConfigError(f"webhook secret file {name} is empty")
        return WebhookSecret(secret)

    return FileWatch(
        name, parse, what="webhook secret file", error=WebhookConfigError, empty="is empty"
    )


@dataclass(frozen=True)
class FileChange:
    """A watched file that holds something else now (:meth:`Watches.check`)."""

    name: str
    watch: FileWatch[Any]
    reload: Reload[Any]


class Watches:
    """One user's watched files, by what they hold: "keys", "webhook_secret"."""

    def __init__(self) -> None:
        self._by_name: dict[str, FileWatch[Any]] = {}
        #: For a :meth:`copy`: the watch each of its watches was copied from.
        self._origins: dict[str, FileWatch[Any]] = {}

    def get(self, name: str) -> FileWatch[Any] | None:
        return self._by_name.get(name)

    def set(self, name: str, watch: FileWatch[Any] | None) -> None:
        """Watch ``watch`` for ``name`` from now on (None: nothing to watch)."""
        if watch is None:
            self._by_name.pop(name, None)
        else:
            self._by_name[name] = watch

    def check(self) -> list[FileChange]:
        """What the files hold now, where it changed. Blocking: it reads them."""
        changes = []
        for name, watch in list(self._by_name.items()):
            if (reload := watch.check()) is not None:
                changes.append(FileChange(name, watch, reload))
        return changes

    def copy(self) -> Watches:
        """Copies of the watches, where each stands, to :meth:`check` in another thread
        while these stay as they are: a watch moves on as it checks, and one that has
        moved on before its new value is in use (which happens on another thread) would
        make a copy of it, taken meanwhile, never report that value. :meth:`adopt` puts
        a checked copy in use, together with its value."""
        twin = Watches()
        for name, watch in self._by_name.items():
            twin._by_name[name], twin._origins[name] = watch.copy(), watch
        return twin

    def adopt_all(self, checked: Watches) -> None:
        """Put every watch of ``checked`` (a :meth:`copy` of these, checked) in use in
        place of the one it was copied from, where that one is still in use: those that
        found no change too, whose memory may have moved (a bad content followed by the
        good one again makes the bad one news again)."""
        for name, watch in checked._by_name.items():
            if self._by_name.get(name) is checked._origins.get(name):
                self._by_name[name] = watch

    def current(self, change: FileChange) -> bool:
        """Whether ``change`` comes from the watch in use (not one an option change
        replaced while it was being checked)."""
        return self._by_name.get(change.name) is change.watch


def load_keys_watched(
    keys_file: str | None,
) -> tuple[list[DecryptionKey], FileWatch[list[DecryptionKey]] | None]:
    """The environment's keys, then the key file's, read through its watch (returned);
    :class:`ConfigError` when either is unusable."""
    try:
        if not keys_file:
            return with_env_keys([]), None
        watch = key_file_watch(keys_file)
        return with_env_keys(watch.load()), watch
    except FpError as exc:
        raise ConfigError(exc.message) from None


SecretInUse = tuple[WebhookSecret | None, FileWatch[WebhookSecret] | None]


def load_secret_watched(secret_file: str | None, in_use: Iterable[SecretInUse] = ()) -> SecretInUse:
    """The webhook secret (the environment's, or the file's) and the watch of its file.

    The first of ``in_use`` whose watch is of this very file is kept as it is: a change
    of the file is for that watch to report, not for whoever reads the options next.
    Otherwise the file is read. Raises :class:`FpError` (never holding the secret).
    """
    secret = env_secret(secret_file)
    if secret is not None or not secret_file:
        return secret, None
    for kept in in_use:
        if kept[1] is not None and kept[1].path == secret_file:
            return kept
    watch = secret_file_watch(secret_file)
    return watch.load(), watch
