"""A folder of data as an ICL task: the default template, the label set, and reading its splits.

Three layouts are read, in this order of preference:

- `train.jsonl` / `test.jsonl` (JSON lines with `text` and `label`), the layout of the built-in tasks;
- a folder written by `datasets`' `save_to_disk` (it holds `dataset_dict.json`), with train/test splits;
- anything else `datasets.load_dataset(folder)` reads with train/test splits (csv, parquet, json files).

Labels: `labels.txt` (one per line) fixes their order and the words said for them; without it, a
ClassLabel column's names, else the distinct labels of the training split, sorted. A `task.json`
in the folder overrides any IclTask field of the default template (e.g. `input_template`).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

DEFAULT_INPUT = "Input: {text}\nLabel:"


def folder_task_fields(folder: Path) -> dict[str, Any]:
    """The IclTask fields a data folder describes (see the module docstring)."""
    folder = folder.resolve()
    override: dict[str, Any] = {}
    spec = folder / "task.json"
    if spec.is_file():
        try:
            override = json.loads(spec.read_text(encoding="utf-8"))
        except json.JSONDecodeError as e:
            raise ValueError(f"{spec} is not valid JSON: {e}") from None
    fields = {"name": folder.name, "input_template": DEFAULT_INPUT, "data_dir": str(folder), **override}
    if "label_words" not in fields:
        labels = _labels_txt(folder)
        if labels is None:
            column = fields.get("label_field", "label")
            ds, _ = read_split(fields["name"], folder, fields.get("train_file", "train.jsonl"), "train")
            if column not in ds.column_names:
                raise ValueError(f"task folder {folder}: the training data has no field {column!r} "
                                 f"(fields: {ds.column_names})")
            labels = _class_names(ds, column) or sorted(set(label_names(ds, column)))
        # the word said for a label is the label itself, with '_' read as a space ("entity_type")
        fields["label_words"] = {lab: lab.replace("_", " ") for lab in labels}
    return fields


def _labels_txt(folder: Path) -> list[str] | None:
    path = folder / "labels.txt"
    if not path.is_file():
        return None
    labels = [ln.strip() for ln in path.read_text(encoding="utf-8").splitlines() if ln.strip()]
    if len(labels) != len(set(labels)):
        raise ValueError(f"{path} lists a label twice: {labels}")
    return labels


def read_split(name: str, folder: Path, fname: str, split: str) -> tuple[Any, Path]:
    """(the split of task `name` as a datasets.Dataset, the path named in errors): `fname` in
    `folder` when it exists, else the folder as a dataset."""
    import datasets

    datasets.disable_progress_bars()
    path = folder / fname
    if path.is_file():
        try:
            return datasets.load_dataset("json", data_files={split: str(path)}, split=split), path
        except Exception as e:  # datasets wraps parse errors in several exception types
            raise ValueError(f"task {name!r}: cannot read {path} as JSON lines: {e}") from None
    jsonl_layout = any((folder / f).is_file() for f in ("train.jsonl", "test.jsonl", fname))
    if not folder.is_dir() or jsonl_layout:  # a jsonl task missing one split: say which file
        raise FileNotFoundError(f"task {name!r}: {split} file {path} does not exist")
    try:
        if (folder / "dataset_dict.json").is_file():
            dd = datasets.load_from_disk(str(folder))
        else:
            dd = datasets.load_dataset(str(folder))
    except Exception as e:
        raise FileNotFoundError(f"task {name!r}: {split} file {path} does not exist, and {folder} is not a "
                                f"dataset that `datasets` reads ({type(e).__name__}: {e})") from None
    if split not in dd:
        raise FileNotFoundError(f"task {name!r}: {folder} has no {split!r} split (splits: {list(dd)})")
    return dd[split], folder


def _class_names(ds: Any, column: str) -> list[str] | None:
    feature = ds.features.get(column)
    names = getattr(feature, "names", None)
    return [str(n) for n in names] if names else None


def label_names(ds: Any, column: str) -> list[str]:
    """The label of every row as text (a ClassLabel's integers become their names)."""
    values = ds[column]
    names = _class_names(ds, column)
    if names is not None:
        return [names[int(v)] for v in values]
    return [str(v) for v in values]
