"""Command line: `mobile-moe generate | eval | calibrate | bench | quantize | serve | chat`. Entry point only: parse, call the API, print."""

from __future__ import annotations

import argparse
import importlib.util
import logging
import os
import re
import sys
from importlib import metadata
from pathlib import Path
from typing import NoReturn

from mobile_moe import __version__
from mobile_moe.errors import MobileMoeError

BROKEN_PIPE_STATUS = 128 + 13  # what a shell reports for a command killed by SIGPIPE


def version_line() -> str:
    """`mobile-moe --version`: this package's version and torch's, read without importing torch (seconds)."""
    return f"mobile-moe {__version__} (torch {_torch_version()})"


def _torch_version() -> str:
    """torch.__version__ (with its build label, e.g. +cu130) from torch/version.py, else the installed distribution's."""
    if "torch" in sys.modules:
        return sys.modules["torch"].__version__
    spec = importlib.util.find_spec("torch")  # finds the package without running it
    if spec is None or spec.origin is None:
        return "not installed"
    version_file = Path(spec.origin).parent / "version.py"
    text = version_file.read_text(errors="replace") if version_file.is_file() else ""
    found = re.search(r"^__version__\s*=\s*['\"]([^'\"]+)", text, re.M)
    return found[1] if found else metadata.version("torch")


class VersionAction(argparse.Action):
    """--version: print `version_line()` and exit."""

    def __init__(self, option_strings: list[str], dest: str = argparse.SUPPRESS, **kwargs) -> None:
        super().__init__(option_strings, dest, nargs=0, default=argparse.SUPPRESS, help="show the version (and torch's) and exit")

    def __call__(self, parser: argparse.ArgumentParser, *_args: object) -> NoReturn:
        print(version_line(), flush=True)
        parser.exit(0)


def build_parser() -> argparse.ArgumentParser:
    """The full command-line interface (the commands' modules, which load torch, are imported here, not before)."""
    from mobile_moe.cli.bench import add_bench_parser
    from mobile_moe.cli.common import Parser
    from mobile_moe.cli.evaluate import add_eval_parsers
    from mobile_moe.cli.generate import add_chat_parser, add_generate_parser
    from mobile_moe.cli.quantize import add_quantize_parser
    from mobile_moe.cli.serve import add_serve_parser

    parser = Parser(prog="mobile-moe", description="Offloaded MoE inference with MoBiLE big/little decoding.")
    parser.add_argument("--version", action=VersionAction)
    sub = parser.add_subparsers(dest="command", required=True, parser_class=Parser)
    add_generate_parser(sub)
    add_eval_parsers(sub)
    add_bench_parser(sub)
    add_quantize_parser(sub)
    add_serve_parser(sub)
    add_chat_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point: user errors become one line on stderr and exit status 2."""
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--version"]:  # before the commands' modules (and torch) load
        VersionAction(["--version"])(argparse.ArgumentParser(prog="mobile-moe"))
    args = build_parser().parse_args(_attach_negative_values(argv))
    _log_warnings_in_one_line()
    try:
        return args.handler(args)
    except MobileMoeError as e:
        print(f"mobile-moe: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("mobile-moe: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # the reader of our output left (`| head`): stop quietly, as a SIGPIPE'd command does
        _silence_stdout()
        return BROKEN_PIPE_STATUS


def _silence_stdout() -> None:
    """Point stdout at /dev/null, so the interpreter's final flush does not fail on the closed pipe again."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    os.close(devnull)


def _attach_negative_values(argv: list[str]) -> list[str]:
    """`--prompt-ids -1,2` -> `--prompt-ids=-1,2`, so the ids are checked (and named) instead of read as a flag."""
    out, i = [], 0
    while i < len(argv):
        if argv[i] == "--prompt-ids" and i + 1 < len(argv) and argv[i + 1].startswith("-") and argv[i + 1][1:2].isdigit():
            out.append(f"--prompt-ids={argv[i + 1]}")
            i += 2
        else:
            out.append(argv[i])
            i += 1
    return out


class _CurrentStderr(logging.StreamHandler):
    """A handler writing to whatever sys.stderr is at the time of each record."""

    @property
    def stream(self):  # noqa: D401 - logging reads this attribute
        """The current sys.stderr."""
        return sys.stderr

    @stream.setter
    def stream(self, _value) -> None:
        """Ignored: the stream is always the current sys.stderr."""


def _log_warnings_in_one_line() -> None:
    """The engine's warnings (e.g. pageable fallback) as `mobile-moe: warning: ...` on stderr."""
    log = logging.getLogger("mobile_moe")
    if not any(isinstance(h, _CurrentStderr) for h in log.handlers):
        handler = _CurrentStderr()
        handler.setFormatter(logging.Formatter("mobile-moe: warning: %(message)s"))
        log.addHandler(handler)
        log.setLevel(logging.WARNING)
        log.propagate = False
