"""Scrub secrets out of log text: the proxy secret header, keys, webhook secrets.

fp-tap never logs a secret itself, but mitmproxy at its most verbose
(``proxy_debug``, raw wire dumps) logs request bytes that carry the
``FPJS-Proxy-Secret`` header. The addon passes every log line through a scrubber so
that no secret reaches a terminal or a log file, whoever wrote the line.
"""

from __future__ import annotations

import base64
import re
import threading
from collections import OrderedDict

from fp_core.redact import REDACTED

# The header in the forms logs show it: "Name: value" on the wire (repr'd bytes stop
# at a backslash), "Name=value", and "('Name', 'value')" tuples.
_HEADER_VALUE = re.compile(
    r"""(?i)(fpjs-proxy-secret(?:['"]?\s*[:=]\s*|['"]?,\s*b?['"]))([^\\\r\n'",;\s]+)"""
)
_MIN_LITERAL = 6  # shorter values would blank out ordinary words
_STANDARD = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"
_URLSAFE = _STANDARD[:-2] + "-_"


class Scrubber:
    """Replaces known secret values, and any proxy-secret header value, with a mask.

    Safe across threads: lines are scrubbed on whatever thread logs them (the writer,
    delivery) while the event loop adds the header values requests carry.
    """

    def __init__(self, max_literals: int = 64) -> None:
        self._pinned: dict[str, None] = {}
        self._seen: OrderedDict[str, None] = OrderedDict()
        self._max = max_literals
        self._lock = threading.Lock()
        #: What scrub() reads: replaced whole, never changed in place.
        self._literals: tuple[str, ...] = ()
        self._pinned_literals: tuple[str, ...] = ()

    def pin(self, secret: str) -> None:
        """Remember a configured secret (a key, the webhook secret) for good: what
        clients send can never push it out."""
        if len(secret) < _MIN_LITERAL or secret == REDACTED:
            return
        with self._lock:
            self._pinned[secret] = None
            self._publish()

    def add(self, secret: str) -> None:
        """Remember a value seen in a request's proxy-secret header (the most recent
        ``max_literals`` are kept)."""
        if len(secret) < _MIN_LITERAL or secret == REDACTED:
            return
        with self._lock:
            if secret in self._pinned or (self._seen and next(reversed(self._seen)) == secret):
                return  # every request of a proxy integration carries the same one
            self._seen.pop(secret, None)
            self._seen[secret] = None
            while len(self._seen) > self._max:
                self._seen.popitem(last=False)
            self._publish()

    def _publish(self) -> None:
        self._literals = (*self._pinned, *self._seen)
        self._pinned_literals = tuple(self._pinned)

    def add_key(self, raw: bytes) -> None:
        """A key in every textual form it could take: base64 (both alphabets, with any
        trailing bits), hex."""
        for alphabet, encoded in (
            (_STANDARD, base64.b64encode(raw)),
            (_URLSAFE, base64.urlsafe_b64encode(raw)),
        ):
            text = encoded.decode().rstrip("=")
            # The last character of a 32-byte key's base64 holds 4 of its bits and 2
            # spare ones, which decoders (and parse_key) ignore: a key written with them
            # set is the same key, in a text of its own.
            spare = (1 << (6 - len(raw) * 8 % 6)) - 1 if len(raw) * 8 % 6 else 0
            last = alphabet.index(text[-1])
            for bits in range(spare + 1):
                self.pin(text[:-1] + alphabet[last | bits])
        self.pin(raw.hex())
        self.pin(raw.hex().upper())

    def scrub(self, text: str, *, seen: bool = True) -> str:
        """``text`` with every secret masked (unchanged, same object, when there is none).

        ``seen=False`` leaves out the values requests carried: for fp-tap's own lines
        (records, counters), which never hold one. Any client can send any value in the
        header, and a value such as ``suspicious`` would otherwise mask that word in the
        lines about every other visitor."""
        for literal in self._literals if seen else self._pinned_literals:
            if literal in text:
                text = text.replace(literal, REDACTED)
        if "ecret" in text:  # cheap test before the regular expression
            text = _HEADER_VALUE.sub(lambda m: m.group(1) + REDACTED, text)
        return text
