"""HTTP content decoding with a hard cap on the output size.

mitmproxy's own decoder inflates without limit, so a tiny gzip/br/zstd bomb could
exhaust the proxy's memory the moment an addon asks for the decoded body. This one
stops as soon as the output would exceed the cap. ``br`` and ``zstd`` use the modules
mitmproxy itself depends on (``brotli``; ``compression.zstd`` or ``backports.zstd``);
they are imported lazily, so fp_core itself needs only the standard library. The
libraries of mitmproxy 12.0-12.2 (Brotli 1.1, ``zstandard``) cannot cap their output:
with them the input goes in small steps, and a bomb costs at most one step's output.
"""

from __future__ import annotations

import sys
import zlib
from collections.abc import Callable
from typing import Any

#: Content codings one body may list, at most (real servers use one, rarely two).
MAX_CODINGS = 4
#: zstd frames one body may hold, at most (real servers send one): each costs a decoder
#: and a copy of the rest of the body, and 1 MiB of empty 9-byte frames took 4 s.
MAX_ZSTD_FRAMES = 16


class ContentError(Exception):
    """The body cannot be decoded within the limit; ``reason`` is a stable word."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


def decode_content(raw: bytes, encoding: str | None, limit: int) -> bytes:
    """Decode ``raw`` per a Content-Encoding header value; at most ``limit`` bytes out.

    Raises :class:`ContentError` with reason ``too_big``, ``undecodable`` or
    ``unsupported_encoding``.
    """
    codings = [c.strip().lower() for c in (encoding or "").split(",") if c.strip()]
    # A limit meant as "no limit" must still fit the decoders' C sizes (limit + 1).
    limit = min(limit, sys.maxsize - 1)
    # Each coding may give up to ``limit`` bytes: a small body that lists hundreds of them
    # would cost the event loop as many full decodes. No real server stacks more.
    if len(codings) > MAX_CODINGS:
        raise ContentError(
            "unsupported_encoding", f"{len(codings)} content codings (at most {MAX_CODINGS})"
        )
    data = raw
    if not data:
        # HEAD, 204 and 304 responses carry a Content-Encoding but no body.
        return data
    # Codings are listed in the order they were applied: undo them in reverse.
    for coding in reversed(codings):
        if coding in ("identity", "none"):
            continue
        decoder = _DECODERS.get(coding)
        if decoder is None:
            raise ContentError("unsupported_encoding", f"unsupported content encoding {coding!r}")
        data = decoder(data, limit)
    if len(data) > limit:
        raise ContentError("too_big", f"body exceeds {limit} bytes")
    return data


def _zlib(data: bytes, limit: int, wbits: int) -> bytes:
    inflater = zlib.decompressobj(wbits)
    try:
        out = inflater.decompress(data, limit + 1)
    except zlib.error:
        raise ContentError("undecodable", "body is not valid compressed data") from None
    return _complete(out, limit, inflater.eof, "compressed")


def _complete[T: (bytes, bytearray)](out: T, limit: int, finished: bool, what: str) -> T:
    """The decoded output, unless it overran the limit or the stream stopped short."""
    if len(out) > limit:
        raise ContentError("too_big", f"decoded body exceeds {limit} bytes")
    if not finished:
        raise ContentError("undecodable", f"{what} body is truncated")
    return out


def _gzip(data: bytes, limit: int) -> bytes:
    return _zlib(data, limit, 16 + zlib.MAX_WBITS)


def _deflate(data: bytes, limit: int) -> bytes:
    # "deflate" is meant to be zlib-wrapped, but many servers send raw DEFLATE.
    try:
        return _zlib(data, limit, zlib.MAX_WBITS)
    except ContentError as exc:
        if exc.reason == "too_big":
            raise
        return _zlib(data, limit, -zlib.MAX_WBITS)


#: Input fed per call to a decoder that cannot cap its output (Brotli 1.1, zstandard):
#: what one call returns is then bounded by what so few bytes can describe. Brotli: at
#: most a 16 MiB meta-block per 3 bytes or so (an encoder's 64 MiB bomb gives 16 MiB per
#: 16-byte step); zstd: a 128 KiB block per 4 bytes (2 MiB per 64-byte step).
BROTLI_STEP = 16
ZSTD_STEP = 64


def _brotli(data: bytes, limit: int) -> bytes:
    try:
        import brotli  # type: ignore[import-untyped,unused-ignore]
    except ImportError:
        raise ContentError("unsupported_encoding", "brotli is not installed") from None
    decompressor = brotli.Decompressor()
    try:
        if hasattr(decompressor, "can_accept_more_data"):  # Brotli 1.2+: capped in C
            out: bytes = decompressor.process(data, output_buffer_limit=limit + 1)
        else:
            # Brotli 1.1 (mitmproxy 12.0-12.2) decodes all it is given: in small steps.
            out = bytes(_in_steps(decompressor.process, data, limit, BROTLI_STEP)[0])
    except brotli.error:
        raise ContentError("undecodable", "body is not valid brotli data") from None
    return _complete(out, limit, decompressor.is_finished(), "brotli")


def _in_steps(
    decode: Callable[[bytes], bytes],
    data: bytes,
    limit: int,
    step: int,
    ended: Callable[[], bool] = lambda: False,
) -> tuple[bytearray, int]:
    """``decode`` fed ``step`` bytes at a time until the output passes ``limit`` or
    ``ended()`` (a zstd frame's end); the output, and how many bytes were fed."""
    out = bytearray()
    fed = 0
    while fed < len(data) and len(out) <= limit and not ended():
        out += decode(data[fed : fed + step])
        fed += step
    return out, min(fed, len(data))


def _zstd_module() -> Any:
    try:
        from compression import zstd  # type: ignore[import-not-found,unused-ignore]
    except ImportError:
        try:
            from backports import zstd  # type: ignore[import-not-found,no-redef,unused-ignore]
        except ImportError:
            return None
    return zstd


#: One zstd frame's decoder: (body, room) -> (output, the body's rest, whether it ended).
_Frame = Callable[[bytes, int], tuple[bytes | bytearray, bytes, bool]]


def _zstd(data: bytes, limit: int) -> bytes:
    frame = _zstd_frame()
    out = bytearray()
    # A zstd body may be several frames; the content is all of them joined (RFC 8878).
    for _ in range(MAX_ZSTD_FRAMES):
        got, data, ended = frame(data, limit - len(out))
        out += got
        _complete(out, limit, ended, "zstd")
        if not data:
            return bytes(out)
    raise ContentError("undecodable", f"more than {MAX_ZSTD_FRAMES} zstd frames")


def _zstd_frame() -> _Frame:
    """The frame decoder of the zstd module there is: the standard library's (or its
    backport) caps its output; the ``zstandard`` package (mitmproxy 12.0-12.2) cannot,
    so its input goes in small steps."""
    zstd = _zstd_module()
    if zstd is not None:

        def stdlib(data: bytes, room: int) -> tuple[bytes, bytes, bool]:
            decompressor = zstd.ZstdDecompressor()
            try:
                out = decompressor.decompress(data, max_length=room + 1)
            except zstd.ZstdError:
                raise ContentError("undecodable", "body is not valid zstd data") from None
            return out, decompressor.unused_data, decompressor.eof

        return stdlib
    try:
        import zstandard  # type: ignore[import-not-found,import-untyped,unused-ignore]
    except ImportError:
        raise ContentError("unsupported_encoding", "no zstd module is installed") from None

    def stepped(data: bytes, room: int) -> tuple[bytearray, bytes, bool]:
        frame = zstandard.ZstdDecompressor().decompressobj()
        try:
            out, fed = _in_steps(frame.decompress, data, room, ZSTD_STEP, lambda: frame.eof)
        except zstandard.ZstdError:
            raise ContentError("undecodable", "body is not valid zstd data") from None
        # The rest: what the frame's last step left over, and what was never fed.
        return out, frame.unused_data + data[fed:], bool(frame.eof)

    return stepped


_DECODERS: dict[str, Callable[[bytes, int], bytes]] = {
    "gzip": _gzip,
    "x-gzip": _gzip,
    "deflate": _deflate,
    "br": _brotli,
    "zstd": _zstd,
}
