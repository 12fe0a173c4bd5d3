"""Checks of the options many subcommands share, run by `camelot.cli.main` before any command
starts (before a model loads or an evaluation runs), so that a typo costs one line of error
instead of a traceback, or a whole evaluation whose results could not be written:

- `--device`: cpu, or a cuda / mps device that exists here;
- `--threads`: >= 1;
- `--out`: a folder that exists or can be created (no file in its place or on its path);
- `--save` (`camelot ask`): a file path whose folder exists and is not itself a folder.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import torch


class OptionError(ValueError):
    """A shared option the run could not use; the CLI prints it as one line (exit 2)."""


def check_common_args(args: argparse.Namespace) -> None:
    """Check whichever of device, threads, out and save the command has."""
    if getattr(args, "device", None) is not None:
        check_device(args.device)
    threads = getattr(args, "threads", None)
    if threads is not None and (isinstance(threads, bool) or not isinstance(threads, int) or threads < 1):
        raise OptionError(f"--threads must be an integer >= 1, got {threads}")
    if getattr(args, "out", None):
        check_out_dir(args.out)
    if getattr(args, "save", None):
        check_save_path(args.save)


def check_device(name: str) -> torch.device:
    """The torch device `name` names, if this machine has it."""
    try:
        dev = torch.device(name)
    except (RuntimeError, TypeError):
        raise OptionError(f"--device {name!r} is not a device (cpu, cuda, cuda:N, mps)") from None
    if dev.type == "cpu":
        return dev
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise OptionError(f"--device {name}: no CUDA GPU is available here; use --device cpu")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise OptionError(f"--device {name}: this machine has {torch.cuda.device_count()} CUDA device(s)")
        return dev
    if dev.type == "mps":
        if not torch.backends.mps.is_available():
            raise OptionError(f"--device {name}: no MPS (Apple GPU) is available here; use --device cpu")
        return dev
    raise OptionError(f"--device {name!r}: camelot runs on cpu, cuda or mps")


def check_out_dir(path: str | os.PathLike) -> Path:
    """A folder results can be written to: existing, or creatable under an existing folder."""
    p = Path(path).expanduser()
    if p.exists() and not p.is_dir():
        raise OptionError(f"--out {p} is a file, not a folder; results go into a folder")
    existing = p
    while not existing.exists():  # the nearest folder that exists: results are created under it
        existing = existing.parent
    if not existing.is_dir():
        raise OptionError(f"--out {p}: {existing} is a file, so the folder cannot be created")
    _writable(existing, f"--out {p}")
    return p


def check_save_path(path: str | os.PathLike, option: str = "--save") -> Path:
    """A file a snapshot can be written to: its folder exists and is writable."""
    p = Path(path).expanduser()
    if p.is_dir():
        raise OptionError(f"{option} {p} is a folder; give a file path (e.g. {p / 'memory.camelot'})")
    if not p.parent.is_dir():
        raise OptionError(f"{option} {p}: folder {p.parent} does not exist")
    _writable(p.parent, f"{option} {p}")
    return p


def _writable(folder: Path, what: str) -> None:
    if not os.access(folder, os.W_OK | os.X_OK):
        raise OptionError(f"{what}: folder {folder} is not writable")
