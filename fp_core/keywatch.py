"""Key rotation without a restart: noticing that a key file changed, and reading it again.

A tap sits in the traffic's path: restarting it to take a new key drops connections.
So the addon checks its key file every few seconds (``fp_keys_reload``) with a
:class:`KeyFileWatch`, off the event loop, and uses what the file holds from then on.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from fp_core.errors import KeyConfigError
from fp_core.keys import ENV_VAR, DecryptionKey, load_keys, too_open_warning


def file_digest(path: str | os.PathLike[str]) -> bytes | None:
    """SHA-256 of the file's bytes, or None when it cannot be read."""
    try:
        return hashlib.sha256(Path(path).read_bytes()).digest()
    except OSError:
        return None


@dataclass(frozen=True)
class KeyReload:
    """What a changed key file gave: new ``keys``, or ``problem`` (then keep those in use).

    ``problem`` names a bad key by its position, never its value, as key errors do.
    """

    keys: list[DecryptionKey] | None
    problem: str | None = None
    #: The file's permission warning, if it has one now.
    warning: str | None = None


#: No content has failed to load (None stands for an unreadable file).
_NOTHING = object()


class KeyFileWatch:
    """Tells when a key file holds something other than what its keys were read from.

    It compares the file's bytes (by digest), not its times: a new key written in the
    same timestamp tick as the old one, or with the same size, is still a change. A
    content that fails to load (or a file that cannot be read) is reported once, not at
    every check, and the keys in use stay.
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = os.fspath(path)
        # Taken before the keys are read (by whoever made the watch): a change in
        # between is seen by the first check.
        self._loaded = file_digest(self.path)
        self._refused: object = _NOTHING

    def check(self, environ: Mapping[str, str] | None = None) -> KeyReload | None:
        """None when the file is as its keys' source was, or as it was when it last
        failed to load; else what it holds now. Blocking: it reads the file."""
        digest = file_digest(self.path)
        if digest == self._loaded:
            self._refused = _NOTHING  # back as it was: a later failure is news again
            return None
        if digest == self._refused:
            return None
        try:
            keys = load_keys(self.path, environ)
            if not keys:
                raise KeyConfigError(f"key file {self.path} holds no key (nor does {ENV_VAR})")
        except KeyConfigError as exc:
            self._refused = digest
            return KeyReload(None, problem=exc.message)
        # The digest read before the keys: if the file changed in between, the next
        # check reads it again.
        self._loaded, self._refused = digest, _NOTHING
        return KeyReload(keys, warning=too_open_warning(self.path))
