from __future__ import annotations

import base64
import threading

import pytest

from fp_core.keys import DecryptionKey, parse_key
from fp_core.redact import REDACTED as MASK
from fp_core.scrub import Scrubber

SECRET = "s3cr3t-proxy-value"


@pytest.mark.parametrize(
    "line",
    [
        # mitmproxy's proxy_debug wire dump: repr'd bytes.
        f"DataReceived(b'POST / HTTP/1.1\\r\\nFpjs-Proxy-Secret: {SECRET}\\r\\nHost: x\\r\\n')",
        f"FPJS-Proxy-Secret: {SECRET}",
        f"fpjs-proxy-secret={SECRET}; other=1",
        f"Headers[(b'FPJS-Proxy-Secret', b'{SECRET}'), (b'Host', b'x')]",
        f"[('fpjs-proxy-secret', '{SECRET}')]",
    ],
)
def test_header_values_are_masked_in_every_form(line: str) -> None:
    out = Scrubber().scrub(line)
    assert SECRET not in out
    assert MASK in out


def test_the_rest_of_the_line_survives() -> None:
    line = f"b'Fpjs-Proxy-Secret: {SECRET}\\r\\nHost: example.com\\r\\n'"
    assert Scrubber().scrub(line) == f"b'Fpjs-Proxy-Secret: {MASK}\\r\\nHost: example.com\\r\\n'"


def test_known_literals_anywhere() -> None:
    scrubber = Scrubber()
    scrubber.add(SECRET)
    assert scrubber.scrub(f"x{SECRET}y and {SECRET}") == f"x{MASK}y and {MASK}"


def test_keys_in_all_forms() -> None:
    key = DecryptionKey.generate()
    scrubber = Scrubber()
    scrubber.add_key(key.raw())
    for form in (
        key.to_base64(),
        base64.urlsafe_b64encode(key.raw()).decode(),
        key.raw().hex(),
        key.raw().hex().upper(),
    ):
        assert form not in scrubber.scrub(f"key={form}!")


def test_short_values_and_the_mask_are_not_literals() -> None:
    scrubber = Scrubber()
    scrubber.add("abc")
    scrubber.add(MASK)
    assert scrubber.scrub("abc abc") == "abc abc"


def test_literals_are_bounded_most_recent_kept() -> None:
    scrubber = Scrubber(max_literals=3)
    for i in range(5):
        scrubber.add(f"secret-value-{i}")
    text = " ".join(f"secret-value-{i}" for i in range(5))
    assert scrubber.scrub(text) == f"secret-value-0 secret-value-1 {MASK} {MASK} {MASK}"
    scrubber.add("secret-value-2")  # seen again: now the most recent
    scrubber.add("secret-value-9")
    assert "secret-value-2" not in scrubber.scrub("secret-value-2")


def test_configured_secrets_are_never_pushed_out_by_header_values() -> None:
    scrubber = Scrubber(max_literals=3)
    scrubber.pin("webhook-secret-value")
    scrubber.add_key(bytes(range(32)))
    for i in range(100):  # any client may send any header value
        scrubber.add(f"junk-header-value-{i}")
    key_b64 = base64.b64encode(bytes(range(32))).decode().rstrip("=")
    assert scrubber.scrub(f"webhook-secret-value {key_b64}") == f"{MASK} {MASK}"
    assert scrubber.scrub("junk-header-value-99 junk-header-value-96") == (
        f"{MASK} junk-header-value-96"
    )


def test_adding_while_other_threads_scrub() -> None:
    """Lines are scrubbed on the writer's and delivery's threads while the event loop
    adds header values: a scrub must never see the literals half-changed."""
    scrubber = Scrubber(max_literals=8)
    scrubber.pin("pinned-secret")
    errors: list[BaseException] = []
    stop = threading.Event()

    def scrub_lines() -> None:
        try:
            while not stop.is_set():
                assert scrubber.scrub("x pinned-secret y") == f"x {MASK} y"
        except BaseException as exc:  # reported below, on the main thread
            errors.append(exc)

    threads = [threading.Thread(target=scrub_lines) for _ in range(2)]
    for thread in threads:
        thread.start()
    for i in range(20_000):
        scrubber.add(f"header-value-{i % 50}")
    stop.set()
    for thread in threads:
        thread.join(10)
    assert errors == []


def test_ordinary_lines_are_untouched() -> None:
    line = "fp v4 1.abc trusted visitor=xyz bot=not_detected"
    assert Scrubber().scrub(line) is line


def test_a_key_with_its_spare_trailing_bits_set_is_masked_too() -> None:
    """Decoders ignore the last base64 character's 2 spare bits: a key written with them
    set (as some tools write keys) is the same key, in a text of its own."""
    alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"
    key = DecryptionKey.generate()
    scrubber = Scrubber()
    scrubber.add_key(key.raw())
    canonical = key.to_base64()
    for urlsafe in (False, True):
        for bits in range(4):
            text = canonical[:42] + alphabet[alphabet.index(canonical[42]) | bits] + "="
            if urlsafe:
                text = text.replace("+", "-").replace("/", "_")
            assert parse_key(text, "test") == key
            assert scrubber.scrub(f"FP_DECRYPTION_KEYS={text}") == f"FP_DECRYPTION_KEYS={MASK}="
