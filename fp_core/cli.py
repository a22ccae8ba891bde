"""Command line: ``python -m fp_core {unseal,seal,keygen,generate,report} ...``.

Exit status: 0 success, 2 the input could not be unsealed, 64 usage or configuration
(including a file ``report`` cannot read).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
from collections.abc import Sequence
from typing import IO, Any, NoReturn

from fp_core.envelope import parse_open_response
from fp_core.errors import FpError, InvalidJson, KeyConfigError
from fp_core.events import event_api, inner_request_id
from fp_core.generate import generate_event, open_response_body
from fp_core.jsontext import encodable
from fp_core.keys import ENV_VAR, DecryptionKey, load_keys, too_open_warning
from fp_core.report import TOP_VISITORS, ReportError, build_report, format_report
from fp_core.sealed import HEADER, parse_event_text, seal_event, unseal_event

EXIT_FAILED = 2
EXIT_USAGE = 64


class _Parser(argparse.ArgumentParser):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        # No abbreviations: "--key <base64>" must not be taken for --keys-file, whose
        # errors name the path it was given (here: the key).
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)

    def error(self, message: str) -> NoReturn:
        self.print_usage(sys.stderr)
        self.exit(EXIT_USAGE, f"error: usage: {_unechoed(message)}\n")


def _unechoed(message: str) -> str:
    """argparse's message without the values of unknown arguments (a mistyped option's
    value may well be a key): only what looks like an option name is repeated."""
    prefix = "unrecognized arguments: "
    if not message.startswith(prefix):
        # "invalid choice: '<a key>'", "ignored explicit argument '<a key>'", ...: the
        # quoted values go, but for the names this parser itself offers.
        return _QUOTED.sub(_named_or_hidden, message)
    words = (word.split("=", 1)[0] for word in message[len(prefix) :].split())
    # An option's name, not a URL-safe base64 key that happens to start with "-".
    names = [word for word in words if _OPTION_NAME.fullmatch(word)]
    return prefix + (" ".join(names) or "(values not repeated)")


_OPTION_NAME = re.compile(r"--?[A-Za-z][A-Za-z0-9-]{0,30}")
_QUOTED = re.compile(r"'([^']*)'")
#: Quoted words an error may repeat: the subcommands (argparse lists them as choices).
_COMMANDS = frozenset({"unseal", "seal", "keygen", "generate", "report"})


def _named_or_hidden(match: re.Match[str]) -> str:
    word = match.group(1)
    return match.group(0) if word in _COMMANDS or _OPTION_NAME.fullmatch(word) else "(value)"


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="python -m fp_core", description="Fingerprint sealed results.")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    unseal = sub.add_parser(
        "unseal",
        help="unseal stdin (bare base64 or an open-response JSON body)",
        description=f"Read a sealed result from stdin and print the event JSON. Keys come "
        f"from {ENV_VAR} (comma/space separated) and/or --keys-file.",
    )
    _keys_file_arg(unseal)
    unseal.add_argument("--pretty", action="store_true", help="indent the JSON output")

    seal = sub.add_parser(
        "seal",
        help="seal an event JSON from stdin with the first key",
        description="Read an event JSON on stdin and print it sealed (base64), as "
        "Fingerprint would, with the first configured key.",
    )
    _keys_file_arg(seal)
    seal.add_argument(
        "--open-response",
        action="store_true",
        help="print a whole open-response JSON body instead of the bare sealed string",
    )

    keygen = sub.add_parser("keygen", help="make a random AES-256 key (base64)")
    keygen.add_argument(
        "path", nargs="?", help="write the key to this new file (mode 0600) instead of stdout"
    )

    generate = sub.add_parser("generate", help="print a synthetic event JSON")
    generate.add_argument("--api", choices=("v3", "v4"), default="v4")
    generate.add_argument("--bot", choices=("not_detected", "good", "bad"), default="not_detected")
    generate.add_argument("--seed", type=int, default=None)
    generate.add_argument("--request-id", default=None)

    report = sub.add_parser(
        "report",
        help="summarise a tap's SQLite store or JSONL file",
        description="Time range, counts by verdict, bot result and error kind, id "
        "mismatches, duplicates and top visitors of the records in PATH (an fp_sqlite "
        "store or an fp_jsonl file); works while a tap is still writing it.",
    )
    report.add_argument("path", metavar="PATH", help="SQLite store or JSONL file")
    report.add_argument("--json", action="store_true", help="print the report as JSON")
    report.add_argument(
        "--top",
        type=int,
        default=TOP_VISITORS,
        metavar="N",
        help=f"how many top visitors to list ({TOP_VISITORS})",
    )
    return parser


def _keys_file_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--keys-file", metavar="PATH", help="one base64 key per line")


def main(
    argv: Sequence[str] | None = None, stdin: IO[bytes] | None = None, stdout: IO[str] | None = None
) -> int:
    """Run the CLI; returns the exit status."""
    args = build_parser().parse_args(argv)
    inp = stdin if stdin is not None else sys.stdin.buffer
    if stdout is None and hasattr(sys.stdout, "reconfigure"):
        # JSON is UTF-8 (RFC 8259), whatever the locale: an event's text is not refused
        # by a Latin-1 terminal or a Windows pipe.
        # backslashreplace: what is not text (a file name's undecodable bytes) is shown
        # as escapes, not a traceback.
        sys.stdout.reconfigure(encoding="utf-8", errors="backslashreplace")
    out = stdout if stdout is not None else sys.stdout
    try:
        if args.command == "unseal":
            return _unseal(args, inp, out)
        if args.command == "seal":
            return _seal(args, inp, out)
        if args.command == "keygen":
            return _keygen(args.path, out)
        if args.command == "report":
            return _report(args, out)
        return _generate(args, out)
    except (KeyConfigError, ReportError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except FpError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_FAILED


def _keys(keys_file: str | None) -> list[DecryptionKey]:
    keys = load_keys(keys_file)
    if warning := too_open_warning(keys_file):
        print(f"warning: {warning}", file=sys.stderr)
    return keys


def _unseal(args: argparse.Namespace, inp: IO[bytes], out: IO[str]) -> int:
    keys = _keys(args.keys_file)
    data = inp.read()
    opened = parse_open_response(data)
    sealed: str | bytes
    if opened is not None:
        sealed = opened.sealed
    elif data.startswith(HEADER):
        sealed = data
    else:
        sealed = data.decode("ascii", errors="replace").strip()
    event = unseal_event(sealed, keys)
    indent = 2 if args.pretty else None
    print(encodable(json.dumps(event, indent=indent, ensure_ascii=False)), file=out)
    return 0


def _seal(args: argparse.Namespace, inp: IO[bytes], out: IO[str]) -> int:
    keys = _keys(args.keys_file)
    if not keys:
        raise KeyConfigError(f"no key to seal with: set {ENV_VAR} or pass --keys-file")
    try:
        # As strict as unsealing it would be: no NaN, no numbers that overflow.
        event = parse_event_text(inp.read().decode("utf-8"))
    except (UnicodeDecodeError, InvalidJson):
        print("error: usage: stdin is not JSON", file=sys.stderr)
        return EXIT_USAGE
    sealed = seal_event(event, keys[0])
    if not args.open_response:
        print(sealed, file=out)
        return 0
    api = event_api(event) or "v4"
    body = open_response_body(api, inner_request_id(event) or "", sealed)
    print(json.dumps(body), file=out)
    return 0


def _keygen(path: str | None, out: IO[str]) -> int:
    key = DecryptionKey.generate().to_base64()
    if path is None:
        print(key, file=out)
        return 0
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except OSError as exc:
        # Not a bad key: a path keygen will not write (it never overwrites a key).
        print(f"error: cannot create {path}: {exc.strerror}", file=sys.stderr)
        return EXIT_USAGE
    with os.fdopen(fd, "w") as handle:
        handle.write(f"# fp-tap decryption key (made by python -m fp_core keygen)\n{key}\n")
    print(f"wrote a new key to {path}", file=sys.stderr)
    return 0


def _generate(args: argparse.Namespace, out: IO[str]) -> int:
    event = generate_event(args.api, rng=args.seed, bot=args.bot, request_id=args.request_id)
    print(json.dumps(event), file=out)
    return 0


def _report(args: argparse.Namespace, out: IO[str]) -> int:
    if args.top < 0:
        raise ReportError("--top cannot be negative")
    report = build_report(args.path, top=args.top)
    if args.json:
        print(encodable(json.dumps(report, indent=2, ensure_ascii=False)), file=out)
    else:
        out.write(format_report(report))
    return 0
