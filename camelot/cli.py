"""`camelot` command line: one subcommand per job, each defined next to the code it drives.

A subcommand module exposes `register(subparsers)`, which adds its parser and sets
`func(args) -> int` as the default. Errors meant for the user (bad files, bad settings) are
printed as one line, not a traceback."""

from __future__ import annotations

import argparse
import importlib
import sys

from camelot.cli_checks import check_common_args
from camelot.search import BACKENDS

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
    from camelot.config import PLACEMENTS, RETRIEVALS, STRATEGIES, CamelotConfig

    d = {f: getattr(CamelotConfig, f) for f in ("strategy", "window", "slots", "recent", "sink", "threshold",
                                                "top_k", "count_bias", "placement", "retrieve", "search")}
    d.update(defaults)
    if strategy:
        p.add_argument("--strategy", default=d["strategy"], choices=STRATEGIES, help="memory strategy")
    p.add_argument("--window", type=int, default=d["window"], help="segment length (local attention span)")
    p.add_argument("--slots", type=int, default=d["slots"], help="consolidated memory slots per layer and KV head")
    p.add_argument("--recent", type=int, default=d["recent"],
                   help="raw tokens kept before the segment; they reach memory as they leave this tail")
    p.add_argument("--sink", type=int, default=d["sink"], help="first tokens kept raw for good (attention sinks)")
    p.add_argument("--threshold", type=float, default=d["threshold"], help="merge threshold (cosine similarity)")
    p.add_argument("--top-k", type=parse_top_k, default=d["top_k"],
                   help="memory slots read per query ('all': every slot)")
    p.add_argument("--count-bias", type=parse_count_bias, default=d["count_bias"],
                   help="factor of the log(count / mean count) bias on slot logits: a number, on (1) or off (0)")
    p.add_argument("--placement", default=d["placement"], choices=PLACEMENTS,
                   help="where memory sits for rotary models (recency: each slot at its last write)")
    p.add_argument("--retrieve", default=d["retrieve"], choices=RETRIEVALS,
                   help="how a top-k read picks slots: query (each query head's highest logits), group (one "
                   "top-k per KV head for its query heads together: cheaper) or key (the paper's rule: the slots "
                   "nearest the token's key)")
    p.add_argument("--search", default=d["search"], help=f"search backend ({', '.join(BACKENDS)})")


def memory_config(args: argparse.Namespace, **fixed):
    """The CamelotConfig that `add_memory_args` options describe; a bad value is a UserError."""
    from camelot.config import CamelotConfig

    fields = {f: getattr(args, f) for f in ("window", "slots", "recent", "sink", "threshold", "top_k", "count_bias",
                                            "placement", "retrieve", "search") if hasattr(args, f)}
    if hasattr(args, "strategy"):
        fields["strategy"] = args.strategy
    try:
        return CamelotConfig(**{**fields, **fixed})
    except ValueError as e:
        raise UserError(str(e)) from None


def parse_count_bias(text: str) -> float:
    """--count-bias: on (1), off (0) or a factor."""
    t = str(text).strip().lower()
    named = {"on": 1.0, "true": 1.0, "yes": 1.0, "off": 0.0, "false": 0.0, "no": 0.0}
    if t in named:
        return named[t]
    try:
        return float(t)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number, on or off") from None


def parse_top_k(text: str) -> int | None:
    """--top-k: an integer, or 'all' (None: every slot)."""
    if str(text).strip().lower() == "all":
        return None
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer or 'all'") from None
