"""Command-line flags built from `CamelotConfig`'s fields (their help, type and choices), and the
model flags every subcommand shares, with the model loading behind them.

Two forms of the memory flags: plain (`--slots 512`: one configuration, for `ask`, `icl`,
`soak`...) and sweep (`--slots 384,512`: comma-separated values, for `ppl` and `passkey`).
"""

from __future__ import annotations

import argparse
import typing
import warnings
from dataclasses import Field, fields
from typing import Any

import torch

from camelot.config import RENAMED, WRITE_FIELDS, CamelotConfig

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class UserError(Exception):
    """An error caused by the user's input; printed without a traceback."""


# ---------------------------------------------------------------------------- value parsers
def parse_top_k(text: str) -> int | None | str:
    """--read-top-k: an integer, 'all' (None: every slot) or 'auto' (camelot.config's rule)."""
    if str(text).strip().lower() == "all":
        return None
    try:
        return parse_int_or_auto(text)
    except argparse.ArgumentTypeError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer or 'all'") from None


def parse_int_or_auto(text: str) -> int | str:
    """--recent, --span-reserve: an integer or 'auto' (camelot.config says what auto gives)."""
    if str(text).strip().lower() == "auto":
        return "auto"
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer or 'auto'") from None


parse_int_or_auto.__name__ = "integer or auto"


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


def parse_distance(text: str) -> int | None:
    """--memory-distance: an integer, or 'default' (None: window + recent)."""
    return None if str(text).strip().lower() in ("default", "none") else int(text)


def parse_layers(text: str) -> list[int] | str | None:
    """"default" -> None (the adapter's choice), "all", or a list like "0-14,20"."""
    chunk = str(text).strip()
    if chunk.lower() in ("default", "", "none"):
        return None
    if chunk.lower() == "all":
        return "all"
    layers: list[int] = []
    try:
        for part in chunk.split(","):
            a, _, b = part.partition("-")
            layers.extend(range(int(a), int(b) + 1) if b else [int(a)])
    except ValueError:
        raise argparse.ArgumentTypeError(f"{chunk!r} is not a layer list like 0-14,20 (or 'all')") from None
    return sorted(set(layers))


# how a field's text becomes its value, where its type alone does not say
PARSERS = {"read_top_k": parse_top_k, "count_bias": parse_count_bias, "memory_distance": parse_distance,
           "layers": parse_layers, "recent": parse_int_or_auto, "span_reserve": parse_int_or_auto}
# fields that read_top_k="auto" may set where the user left them: their flags default to "not given"
AUTO_SET = ("search", "retrieve")
# how a value is shown back as a flag's text (the default in --help)
SHOWN = {"read_top_k": lambda v: "all" if v is None else str(v), "memory_distance": lambda v: "default" if v is None
         else str(v), "layers": lambda v: "default" if v is None else (v if isinstance(v, str) else
                                                                     ",".join(map(str, v)))}


def _parser(f: Field) -> Any:
    if f.name in PARSERS:
        return PARSERS[f.name]
    hint = typing.get_type_hints(CamelotConfig)[f.name]
    if hint in (int, float):
        return hint
    if hint is bool:
        return _boolean
    for kind in (int, float):  # `int | None` and `float | None` fields: "None" is None
        if set(typing.get_args(hint)) == {kind, type(None)}:
            return _optional(kind)
    return str


def _boolean(text: str) -> bool:
    word = str(text).strip().lower()
    if word in ("true", "yes", "on", "1"):
        return True
    if word in ("false", "no", "off", "0"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


_boolean.__name__ = "true or false"


def _optional(kind: type) -> Any:
    def parse(text: str) -> Any:
        if str(text).strip().lower() == "none":
            return None
        try:
            return kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {'an integer' if kind is int else 'a number'} or None, "
                                             f"got {text!r}") from None

    parse.__name__ = f"{kind.__name__} or None"
    return parse


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


class _Renamed(argparse.Action):
    """An old flag name: still works, with a warning, for one release."""

    def __call__(self, parser, namespace, values, option_string=None):
        # FutureWarning (visible by default) with the source line left out: one line on stderr
        warnings.warn_explicit(f"{option_string} is now {_flag(self.dest)}; the old name goes in camelot 0.2",
                               FutureWarning, "camelot", 0)
        setattr(namespace, self.dest, values)


def config_fields(only: tuple[str, ...] | None = None, sweep: bool = False) -> list[Field]:
    out = [f for f in fields(CamelotConfig) if f.metadata.get("cli", True) and (not sweep or f.metadata["sweep"])]
    return [f for f in out if only is None or f.name in only]


# ---------------------------------------------------------------------------- the memory flags
def add_config_args(p: argparse.ArgumentParser | argparse._ArgumentGroup, only: tuple[str, ...] | None = None,
                    skip: tuple[str, ...] = (), sweep: bool = False, **defaults: Any) -> None:
    """A flag for each config field (`only` / `skip` by name). Plain: the value, parsed. Sweep:
    text of comma-separated values, parsed later by `sweep_values`. `defaults` overrides a
    field's default by name."""
    for f in config_fields(only):
        if f.name in skip:
            continue
        default = defaults.get(f.name, f.default)
        help_text = f.metadata["help"].replace("%", "%%")  # argparse formats help with %
        if f.name in AUTO_SET and f.name not in defaults:
            # not given unless given: read_top_k='auto' may choose these (camelot.config)
            help_text += f" (default: {f.default}, or what read_top_k=auto chooses)"
            default = None
        shown = SHOWN.get(f.name, str)
        if sweep and f.metadata["sweep"]:
            sep = "/" if f.name == "layers" else ","
            help_text += f" ('{sep}' separates values to sweep)"
            plain_text = isinstance(default, str) and f.name not in SHOWN
            text = default if (default is None and f.name in AUTO_SET) or plain_text else shown(default)
            p.add_argument(_flag(f.name), dest=f.name, default=text, help=help_text)
        else:
            choices = f.metadata.get("choices")
            p.add_argument(_flag(f.name), dest=f.name, type=_parser(f), default=default, help=help_text,
                           choices=list(choices) if choices and f.name != "search" else None)
        for old, new in RENAMED.items():
            if new == f.name:
                p.add_argument(_flag(old), dest=f.name, action=_Renamed, type=None if sweep else _parser(f),
                               help=argparse.SUPPRESS)


def sweep_values(args: argparse.Namespace, name: str) -> tuple:
    """The values a sweep flag names, each parsed like its field; (None,) for a flag not given."""
    if getattr(args, name) is None:
        return (None,)
    text = str(getattr(args, name))
    sep = "/" if name == "layers" else ","
    f = {f.name: f for f in fields(CamelotConfig)}[name]
    parse = _parser(f)
    out = []
    for part in text.split(sep):
        try:
            out.append(parse(part.strip()))
        except argparse.ArgumentTypeError as e:  # its message names the value and what was expected
            raise UserError(f"{_flag(name)}: {e}") from None
        except ValueError:
            raise UserError(f"{_flag(name)}: {part.strip()!r} is not a valid {parse.__name__}") from None
    if not out:
        raise UserError(f"{_flag(name)}: no value given")
    return tuple(out)


def config_from_args(args: argparse.Namespace, **fixed: Any) -> CamelotConfig:
    """The CamelotConfig that the plain flags describe (with `--recall`: recall_config's); a bad
    value is a UserError."""
    values = {f.name: getattr(args, f.name) for f in fields(CamelotConfig) if hasattr(args, f.name)}
    values = {k: v for k, v in values.items() if not (k in AUTO_SET and v is None)}  # not given
    try:
        kind, given = getattr(args, "recall", None), {**values, **fixed}
        return recall_config(kind, **given) if kind else CamelotConfig(**given)
    except ValueError as e:
        raise UserError(str(e)) from None


def recall_config(kind: str = "facts", **values: Any) -> CamelotConfig:
    """CamelotConfig.recall(kind) (or .consolidating()) with these values, except write-rule values at their defaults: a
    flag the user did not move leaves the preset's choice (flags cannot tell "not given" apart)."""
    kept = {k: v for k, v in values.items() if not (k in WRITE_FIELDS and v == getattr(CamelotConfig, k))}
    if kind == "consolidating":  # not a recall kind: the write of camelot 0.1, no reserve
        return CamelotConfig.consolidating(**kept)
    return CamelotConfig.recall(kind, **kept)


# ---------------------------------------------------------------------------- the model flags
def add_model_args(p: argparse.ArgumentParser, model: str = "smollm2", device: str | None = None,
                   threads: int | None = None, dtype: bool = True) -> None:
    """--model, --device, --dtype, --threads and --no-progress, the same in every subcommand."""
    p.add_argument("--model", default=model,
                   help="bundled short name (smollm2, gemma3-270m, qwen2.5-0.5b, qwen2.5-1.5b) or a local folder")
    p.add_argument("--device", default=device,
                   help="cpu, cuda or cuda:N" + (" (default: cuda when available)" if device is None else ""))
    if dtype:
        p.add_argument("--dtype", default="float32", choices=tuple(DTYPES), help="model weights' dtype")
    p.add_argument("--threads", type=int, default=threads,
                   help="torch CPU threads" + (" (default: torch's choice)" if threads is None else ""))
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")


def load_model_from_args(args: argparse.Namespace):
    """(model, tokenizer) that the model flags name; a model that cannot load is a UserError."""
    from camelot.models import load_model

    if getattr(args, "threads", None):
        torch.set_num_threads(args.threads)
    dtype = DTYPES[getattr(args, "dtype", "float32")]
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if getattr(args, "no_progress", False):
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()  # its "Loading weights" bar too
    try:
        return load_model(args.model, dtype=dtype, device=device)
    except (OSError, ValueError) as e:  # missing folder / not a model: transformers raises these
        if isinstance(e, FileNotFoundError) and "package" in str(e):
            raise
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(f"cannot load model {args.model!r}: {first}") from None
