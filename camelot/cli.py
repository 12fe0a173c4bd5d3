"""`camelot` command line: one subcommand per job, each defined next to the code it drives.

Subcommands register themselves in one place, the `camelot.commands` entry points of
pyproject.toml (name = module): a module there exposes `register(subparsers)`, which adds its
parser and sets `func(args) -> int` as the default. So the core names no evaluation module, and
a plugin package can add a subcommand the same way. Errors meant for the user (bad files, bad
settings) are printed as one line, not a traceback."""

from __future__ import annotations

import argparse
import importlib
import sys
from importlib.metadata import entry_points

from camelot.cli_checks import check_common_args
from camelot.config import WRITE_FIELDS
from camelot.options import (  # noqa: F401  (re-exported: the subcommands' shared helpers)
    UserError,
    add_config_args,
    config_from_args,
    parse_count_bias,
    parse_top_k,
)

COMMAND_GROUP = "camelot.commands"
# the flags of one memory configuration (`ask`, `icl`, `soak`); the rest are for sweeps and experts
MEMORY_FLAGS = ("strategy", "window", "slots", "recent", "sink", "threshold", "read_top_k", "count_bias", "count_mode",
                "count_cap", "placement", "retrieve", "search", *WRITE_FIELDS)


def command_modules() -> list[str]:
    """Modules that define subcommands, in their registered order."""
    return [ep.value for ep in entry_points(group=COMMAND_GROUP)]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="camelot",
        description="Consolidated associative memory (CAMELoT) beside a frozen HF causal LM: "
        "read documents far longer than the attention window, ask about them, benchmark.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in command_modules():
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
        check_common_args(args)  # --device, --threads, --out, --save: before any slow work
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


def add_memory_args(p: argparse.ArgumentParser | argparse._ArgumentGroup, strategy: bool = True,
                    **defaults) -> None:
    """The options of one memory configuration, for commands that run a single one (`ask`,
    `icl`, `soak`); `defaults` overrides CamelotConfig's defaults by field name."""
    add_config_args(p, only=MEMORY_FLAGS, skip=() if strategy else ("strategy",), **defaults)
    p.set_defaults(recall=None)
    for flag, kind, help_text in PRESET_FLAGS:
        p.add_argument(flag, dest="recall", action="store_const", const=kind, help=help_text)


# the write presets a single-config command takes (options.recall_config builds them)
PRESET_FLAGS = (
    ("--recall", "facts", "camelot: CamelotConfig.recall's write, for finding facts again: all slots but 128 a raw "
                          "reserve of the windows the model found most surprising (docs/retrieval.md); write-rule "
                          "flags moved off their defaults still apply"),
    ("--recall-demos", "demonstrations", "camelot: CamelotConfig.recall('demonstrations'), for many-shot in-context "
                                         "learning: the reserve keeps the tokens the window attended most (a "
                                         "demonstration's label), not the surprising ones (docs/icl_memory.md)"),
    ("--recall-balanced", "balanced", "camelot: CamelotConfig.recall('balanced'), the default write (kept for "
                                      "scripts): a third of the slots a reserve of surprising windows (facts), the "
                                      "rest consolidated and evicted by recent use, beside a raw tail as long as "
                                      "the slots (docs/memory_write.md)"),
    ("--consolidating", "consolidating", "camelot: CamelotConfig.consolidating()'s write, the default until "
                                         "2026-12-06: every slot consolidated, the oldest evicted, a raw tail of 128 "
                                         "(give --slots 2048 for its old budget)"),
)


def memory_config(args: argparse.Namespace, **fixed):
    """The CamelotConfig that `add_memory_args` options describe; a bad value is a UserError."""
    return config_from_args(args, **fixed)
