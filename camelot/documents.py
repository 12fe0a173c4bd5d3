"""Documents for camelot (read into memory by `ask`, scored by the evaluations): where they come
from and how they become token ids.

A data spec names one of:
- `builtin:NAME`: a text packaged in camelot/data (`builtin:genesis_kjv`, `builtin:state_union_1961_kennedy`);
- a `.txt` (or any text) file: one document;
- a folder: every `*.txt` file in it (sorted by name) is one document;
- a `.jsonl` / `.json` / `.parquet` file: one document per row, read from `text_field`;
- a folder written by `datasets.Dataset.save_to_disk`: one document per row of `split`.

Plain text is read with Python rather than `datasets`: a strict UTF-8 read is what lets a
binary or mis-encoded file fail with a message naming the file, and it skips the Arrow cache
that `datasets` would write for a single file. Row formats go through `datasets`.

Text files are read in bounded chunks: a file that is not a regular file (a device such as
/dev/zero, a FIFO), that holds a NUL byte, or that is larger than `max_bytes` (default
`MAX_DATA_BYTES`, 256 MiB, about 60M tokens; `--max-data-mb` raises it) is refused before more
than one chunk past the limit is read. Row files are held to the same size limit.

Every failure the user can fix is raised as `camelot.options.UserError` (one line, no traceback).
"""

from __future__ import annotations

import argparse
import os
import stat
from dataclasses import dataclass
from importlib.resources import files
from pathlib import Path

import torch

from camelot.options import UserError

BUILTIN_PREFIX = "builtin:"
ROW_SUFFIXES = {".jsonl": "json", ".json": "json", ".parquet": "parquet"}
MAX_DATA_BYTES = 256 * 2**20  # per file and per folder of .txt files; see the module docstring
_CHUNK = 2**20


@dataclass
class Document:
    """One document: a name for reports, its text, and (after `tokenize_documents`) its ids."""

    name: str
    text: str
    ids: torch.Tensor | None = None  # [N] long

    @property
    def n_tokens(self) -> int:
        return 0 if self.ids is None else int(self.ids.numel())


def builtin_names() -> list[str]:
    """Names accepted after `builtin:`, from the texts packaged in camelot/data."""
    folder = files("camelot").joinpath("data")
    return sorted(p.name[:-4] for p in folder.iterdir() if p.name.endswith(".txt"))


def load_documents(spec: str, text_field: str = "text", split: str | None = None,
                   max_docs: int | None = None, max_bytes: int = MAX_DATA_BYTES) -> list[Document]:
    """Read the documents a data spec names (see the module docstring), at most `max_docs`,
    refusing files (and folders of .txt files) of more than `max_bytes`."""
    if max_docs is not None and max_docs < 1:
        raise UserError(f"--max-docs must be >= 1, got {max_docs}")
    if max_bytes < 1:
        raise UserError(f"--max-data-mb must be > 0, got {max_bytes / 2**20:g}")
    if spec.startswith(BUILTIN_PREFIX):
        docs = [_builtin(spec[len(BUILTIN_PREFIX):])]
    else:
        path = Path(spec).expanduser()
        if not path.exists():
            raise UserError(f"data not found: {spec} (give a text file, a folder of .txt files, a .jsonl/.parquet "
                            f"file, a saved datasets folder, or builtin:{'|'.join(builtin_names())})")
        if path.is_dir():
            docs = _dataset_folder(path, text_field, split, max_docs) if _is_saved_dataset(path) \
                else _text_folder(path, max_docs, max_bytes)
        elif path.suffix.lower() in ROW_SUFFIXES:
            _check_size(path, max_bytes)
            docs = _row_file(path, ROW_SUFFIXES[path.suffix.lower()], text_field, max_docs)
        else:
            docs = [Document(path.name, _read_text(path, max_bytes))]
    docs = docs[:max_docs] if max_docs else docs
    for d in docs:
        if not d.text.strip():
            raise UserError(f"document {d.name!r} is empty")
    return docs


def add_data_limit_arg(p: argparse.ArgumentParser) -> None:
    """`--max-data-mb`: the size limit on data files, for every command that reads them."""
    p.add_argument("--max-data-mb", type=float, default=MAX_DATA_BYTES / 2**20,
                   help="refuse data files (or a folder of .txt files) larger than this many MiB")


def data_limit(args: argparse.Namespace) -> int:
    """The byte limit `--max-data-mb` gives (the default where a command has no such flag)."""
    return int(getattr(args, "max_data_mb", MAX_DATA_BYTES / 2**20) * 2**20)


def tokenize_documents(docs: list[Document], tokenizer, max_tokens: int | None = None) -> list[Document]:
    """Fill `ids` of each document with the tokenizer's ids (special tokens as the tokenizer adds
    them by default, e.g. a BOS), keeping the first `max_tokens` (None or 0: all of them)."""
    for d in docs:
        ids = tokenizer(d.text, add_special_tokens=True, verbose=False)["input_ids"]
        if max_tokens:
            ids = ids[:max_tokens]
        if len(ids) < 2:
            raise UserError(f"document {d.name!r} has {len(ids)} token(s); perplexity needs at least 2")
        d.ids = torch.tensor(ids, dtype=torch.long)
    return docs


# ---------------------------------------------------------------------------- sources
def _builtin(name: str) -> Document:
    names = builtin_names()
    if name not in names:
        raise UserError(f"unknown builtin text {name!r}; available: {', '.join(BUILTIN_PREFIX + n for n in names)}")
    text = files("camelot").joinpath(f"data/{name}.txt").read_text(encoding="utf-8")
    return Document(BUILTIN_PREFIX + name, text)


def _check_size(path: Path, max_bytes: int) -> int:
    """The size of a regular file within the limit; anything else is refused before reading."""
    try:
        st = os.stat(path)
    except OSError as e:
        raise UserError(f"cannot read {path}: {e.strerror}") from None
    if not stat.S_ISREG(st.st_mode):  # /dev/zero, a FIFO, a socket: may never end
        raise UserError(f"{path} is not a regular file (a device, pipe or socket); give a text file")
    if st.st_size > max_bytes:
        raise UserError(f"{path} holds {_size(st.st_size)}, more than the {_size(max_bytes)} limit on data; "
                        "raise it with --max-data-mb")
    return st.st_size


def _size(n: int) -> str:
    return f"{n / 2**20:.1f} MiB" if n >= 2**20 else f"{n} bytes"


def _read_text(path: Path, max_bytes: int = MAX_DATA_BYTES) -> str:
    _check_size(path, max_bytes)
    raw = bytearray()
    with open(path, "rb") as f:  # chunks: a file that grows while read still stops at the limit
        while chunk := f.read(_CHUNK):
            if b"\x00" in chunk:
                raise UserError(f"{path} looks like a binary file (it holds NUL bytes), not text")
            raw += chunk
            if len(raw) > max_bytes:
                raise UserError(f"{path} grew past the {_size(max_bytes)} limit on data while read; "
                                "raise it with --max-data-mb")
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise UserError(f"{path} is not UTF-8 text (bad byte at offset {e.start})") from None


def _text_folder(path: Path, max_docs: int | None, max_bytes: int = MAX_DATA_BYTES) -> list[Document]:
    paths = sorted(p for p in path.iterdir() if p.is_file() and p.suffix.lower() == ".txt")[:max_docs]
    if not paths:
        raise UserError(f"no .txt files in folder {path}")
    total = sum(_check_size(p, max_bytes) for p in paths)
    if total > max_bytes:
        raise UserError(f"{path} holds {_size(total)} of .txt files, more than the {_size(max_bytes)} limit on "
                        "data; raise it with --max-data-mb (or use --max-docs)")
    return [Document(p.name, _read_text(p, max_bytes)) for p in paths]


def _is_saved_dataset(path: Path) -> bool:
    return (path / "dataset_info.json").exists() or (path / "dataset_dict.json").exists() \
        or (path / "state.json").exists()


def _rows_to_docs(ds, source: str, text_field: str, max_docs: int | None) -> list[Document]:
    if text_field not in ds.column_names:
        raise UserError(f"{source} has no field {text_field!r} (fields: {', '.join(ds.column_names)}); "
                        "choose one with --text-field")
    if len(ds) == 0:
        raise UserError(f"{source} has no rows")
    n = len(ds) if not max_docs else min(max_docs, len(ds))
    texts = ds.select(range(n))[text_field]
    bad = [i for i, t in enumerate(texts) if not isinstance(t, str)]
    if bad:
        raise UserError(f"{source}: field {text_field!r} of row {bad[0]} is not text")
    return [Document(f"{source}#{i}", t) for i, t in enumerate(texts)]


def _row_file(path: Path, builder: str, text_field: str, max_docs: int | None) -> list[Document]:
    from datasets import load_dataset

    if path.stat().st_size == 0:
        raise UserError(f"{path} is empty")
    try:
        ds = load_dataset(builder, data_files=str(path), split="train")
    except Exception as e:  # datasets wraps parse errors in several types; the message is what matters
        raise UserError(f"cannot read {path} as {builder}: {_first_line(e)}") from None
    return _rows_to_docs(ds, path.name, text_field, max_docs)


def _dataset_folder(path: Path, text_field: str, split: str | None, max_docs: int | None) -> list[Document]:
    from datasets import DatasetDict, load_from_disk

    try:
        ds = load_from_disk(str(path))
    except Exception as e:
        raise UserError(f"cannot load the datasets folder {path}: {_first_line(e)}") from None
    if isinstance(ds, DatasetDict):
        splits = list(ds.keys())
        if split is None:
            split = "test" if "test" in splits else (splits[0] if len(splits) == 1 else None)
        if split not in splits:
            raise UserError(f"{path} holds splits {', '.join(splits)}; choose one with --split")
        ds = ds[split]
    elif split is not None:
        raise UserError(f"{path} is a single dataset without splits; drop --split")
    return _rows_to_docs(ds, path.name, text_field, max_docs)


def _first_line(e: Exception) -> str:
    text = str(e).strip() or type(e).__name__
    return text.splitlines()[0]
