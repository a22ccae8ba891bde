"""The README is the user's manual: every option is there, with its real default."""

from __future__ import annotations

import re
from pathlib import Path

from mitmproxy.test import taddons

import fp_addon

README = (Path(__file__).resolve().parents[1] / "README.md").read_text()
ROW = re.compile(r"^\| `(fp_\w+)` \| [^|]+ \| ([^|]+) \|", re.MULTILINE)


def documented() -> dict[str, str]:
    return {name: default.strip() for name, default in ROW.findall(README)}


def addon_defaults() -> dict[str, object]:
    tap = fp_addon.FingerprintTap()
    with taddons.context(tap) as tctx:
        names = tctx.options.keys()  # Options is not a mapping: no "in" on it
        return {name: tctx.options.default(name) for name in names if name.startswith("fp_")}


def test_every_option_is_documented_and_nothing_else() -> None:
    assert set(documented()) == set(addon_defaults())


def test_documented_defaults_are_the_real_ones() -> None:
    docs = documented()
    for name, default in addon_defaults().items():
        text = docs[name]
        if default is None or default == []:
            assert text.startswith(("none", "empty")), (name, text)
        elif isinstance(default, bool):
            assert text == f"`{str(default).lower()}`", (name, text)
        else:
            assert text == f"`{default}`", (name, text)


def test_every_error_kind_and_command_is_documented() -> None:
    from fp_core.errors import UNSEAL_ERROR_KINDS

    for kind in UNSEAL_ERROR_KINDS:
        assert f"| `{kind}` |" in README, kind
    for name in ("fp.stats", "fp.export", "fp.resend"):
        assert f"`{name}" in README, name


def test_the_two_commands() -> None:
    assert "scripts/demo" in README
    assert "scripts/test" in README
    ci = (Path(__file__).resolve().parents[1] / ".ci" / "run").read_text()
    assert "exec scripts/test" in ci
