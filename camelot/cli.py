"""`camelot` command line: one subcommand per job, each defined next to the code it drives.

A subcommand module exposes `register(subparsers)`, which adds its parser and sets
`func(args) -> int` as the default. Errors meant for the user (bad files, bad settings) are
printed as one line, not a traceback."""

from __future__ import annotations

import argparse
import importlib
import sys

# module path -> nothing else; each module registers its own subcommand(s)
SUBCOMMAND_MODULES = (
    "camelot.eval.perplexity",
    "camelot.eval.icl",
    "camelot.eval.passkey",
    "camelot.eval.bench",
    "camelot.eval.soak",
    "camelot.ask",
    "camelot.inspect_cli",
)


class UserError(Exception):
    """An error caused by the user's input; printed without a traceback."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="camelot",
        description="Consolidated associative memory (CAMELoT) beside a frozen HF causal LM: "
        "read documents far longer than the attention window, ask about them, benchmark.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in SUBCOMMAND_MODULES:
        try:
            mod = importlib.import_module(name)
        except ModuleNotFoundError as e:
            if e.name == name:
                continue
            raise
        mod.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except (UserError, ValueError, FileNotFoundError, IsADirectoryError, UnicodeDecodeError) as e:
        print(f"camelot {args.command}: error: {_one_line(e)}", file=sys.stderr)
        return 2
    except MemoryError as e:  # e.g. --slots far beyond the machine: say so in one line, exit 3
        print(f"camelot {args.command}: out of memory: {_one_line(e)}", file=sys.stderr)
        return 3
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


def _one_line(e: BaseException) -> str:
    """The error's message on one line (some library messages span several)."""
    return " ".join(str(e).split()) or type(e).__name__


if __name__ == "__main__":
    sys.exit(main())
