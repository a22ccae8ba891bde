"""Keys and the webhook secret rotated without a restart: noticing that their file
changed, and reading it again.

A tap sits in the traffic's path: restarting it to take a new key drops connections.
So the addon checks the key file and the webhook secret file every few seconds
(``fp_secrets_reload``) with a :class:`FileWatch` each, off the event loop, and uses
what they hold from then on.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

from fp_core.errors import FpError, KeyConfigError
from fp_core.keys import ENV_VAR, DecryptionKey, load_keys, too_open_warning
from fp_core.webhook import WebhookConfigError, WebhookSecret, load_secret


def file_digest(path: str | os.PathLike[str]) -> bytes | None:
    """SHA-256 of the file's bytes, or None when it cannot be read."""
    try:
        return hashlib.sha256(Path(path).read_bytes()).digest()
    except OSError:
        return None


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
    """Tells when a file holds something other than what the value in use came from.

    It compares the file's bytes (by digest), not its times: a new key written in the
    same timestamp tick as the old one, or with the same size, is still a change. A
    content that fails to load (or a file that cannot be read) is reported once, not at
    every check.
    """

    def __init__(
        self, path: str | os.PathLike[str], load: Callable[[str], T], warn_as: str | None
    ) -> None:
        self.path = os.fspath(path)
        self._load = load
        self._warn_as = warn_as
        # Taken before the value is read (by whoever made the watch): a change in
        # between is seen by the first check.
        self._loaded = file_digest(self.path)
        self._refused: object = _NOTHING

    def check(self) -> Reload[T] | None:
        """None when the file is as the value in use came from, or as it was when it last
        failed to load; else what it holds now. Blocking: it reads the file."""
        digest = file_digest(self.path)
        if digest == self._loaded:
            self._refused = _NOTHING  # back as it was: a later failure is news again
            return None
        if digest == self._refused:
            return None
        try:
            value = self._load(self.path)
        except FpError as exc:
            self._refused = digest
            return Reload(None, problem=exc.message)
        # The digest read before the value: if the file changed in between, the next
        # check reads it again.
        self._loaded, self._refused = digest, _NOTHING
        warning = too_open_warning(self.path, self._warn_as) if self._warn_as else None
        return Reload(value, warning=warning)


def key_file_watch(
    path: str | os.PathLike[str], environ: Mapping[str, str] | None = None
) -> FileWatch[list[DecryptionKey]]:
    """The key file's watch: its keys after the environment's, as at start. A file with
    no key, and none in the environment, is refused (as it is while being written)."""

    def load(name: str) -> list[DecryptionKey]:
        keys = load_keys(name, environ)
        if not keys:
            raise KeyConfigError(f"key file {name} holds no key (nor does {ENV_VAR})")
        return keys

    return FileWatch(path, load, "key file")


def secret_file_watch(
    path: str | os.PathLike[str], environ: Mapping[str, str] | None = None
) -> FileWatch[WebhookSecret]:
    """The webhook secret file's watch. (The webhook's own configuration, which reads the
    file again, warns about its permissions.)"""

    def load(name: str) -> WebhookSecret:
        secret = load_secret(name, environ)
        if secret is None:  # only without a file name, which a watch always has
            raise WebhookConfigError(f"webhook secret file {name}: no secret")
        return secret

    return FileWatch(path, load, None)
