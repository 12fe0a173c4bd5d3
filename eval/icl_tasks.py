"""In-context-learning tasks: how an example is written into a prompt, which words stand for the
labels, and where the data lives.

A task is a small template. A demonstration is `input_template` filled with the example's text,
then `answer_template` filled with its label word, then `separator`. A test prompt is the
demonstrations followed by `input_template` alone; the model is then asked which label word
(`answer_template` filled with each word) is most likely to come next.

Built-in tasks: `mr`, `sst2` (movie-review polarity), `subj` (subjectivity) and `trec` (six
question types). Any folder is a task too: `train.jsonl` and `test.jsonl` with `text` and `label`
fields, an optional `labels.txt` (one label per line: the label order and words; default: the
labels of the training data, sorted) and an optional `task.json` (IclTask fields overriding the
default template). A folder written by `datasets`' `save_to_disk`, or one `datasets.load_dataset`
reads (train/test csv, parquet or json files), works the same; a ClassLabel column gives the label
names. Or write a JSON file (the fields of `IclTask`) or a Python file that defines `TASK`.
"""

from __future__ import annotations

import json
import os
import random
import runpy
from collections.abc import Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from camelot.eval.icl_folder import folder_task_fields, label_names, read_split

DATA_ENV = "CAMELOT_ICL_DATA"


@dataclass(frozen=True)
class IclTask:
    """A classification task as a prompt template.

    label_words maps each label value in the data to the word the model should say for it.
    Templates are plain `str.format` strings: `{text}` in input_template, `{label}` in
    answer_template. answer_template normally starts with a space so that the label word is a
    word of its own after the cue (e.g. "Sentiment:" then " positive")."""

    name: str
    label_words: dict[str, str]
    input_template: str = "Input: {text}\nLabel:"
    answer_template: str = " {label}"
    separator: str = "\n\n"
    text_field: str = "text"
    label_field: str = "label"
    train_file: str = "train.jsonl"
    test_file: str = "test.jsonl"
    description: str = ""
    data_dir: str | None = None  # folder of train_file/test_file; None: <--data-dir>/<name>
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.name or not isinstance(self.name, str):
            raise ValueError("a task needs a non-empty name")
        if not isinstance(self.label_words, dict) or len(self.label_words) < 2:
            raise ValueError(f"task {self.name!r}: label_words must map at least two labels to words, "
                             f"got {self.label_words!r}")
        words = [str(w) for w in self.label_words.values()]
        if len(set(words)) != len(words) or any(not w.strip() for w in words):
            raise ValueError(f"task {self.name!r}: label words must be distinct and non-empty, got {words}")
        if "{text}" not in self.input_template:
            raise ValueError(f"task {self.name!r}: input_template must contain {{text}}, got {self.input_template!r}")
        if "{label}" not in self.answer_template:
            raise ValueError(f"task {self.name!r}: answer_template must contain {{label}}, "
                             f"got {self.answer_template!r}")

    @property
    def labels(self) -> list[str]:
        """Label values in a fixed order (the order of label_words)."""
        return list(self.label_words)

    def format_input(self, text: str) -> str:
        return self.input_template.format(text=text)

    def format_answer(self, label: str) -> str:
        return self.answer_template.format(label=self.label_words[label])

    def format_demo(self, text: str, label: str) -> str:
        return self.format_input(text) + self.format_answer(label) + self.separator

    def to_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self)}


BUILTIN_TASKS: dict[str, IclTask] = {
    "mr": IclTask(
        name="mr",
        label_words={"positive": "positive", "negative": "negative"},
        input_template="Review: {text}\nSentiment:",
        description="movie-review sentence polarity (Pang & Lee sentence polarity v1.0)",
    ),
    "subj": IclTask(
        name="subj",
        label_words={"subjective": "subjective", "objective": "objective"},
        input_template="Input: {text}\nType:",
        description="subjective vs objective sentences (Pang & Lee subjectivity v1.0)",
    ),
    "sst2": IclTask(
        name="sst2",
        label_words={"positive": "positive", "negative": "negative"},
        input_template="Review: {text}\nSentiment:",
        description="Stanford Sentiment Treebank, binary (GLUE SST-2)",
    ),
    "trec": IclTask(
        name="trec",
        label_words={lab: lab for lab in ("abbreviation", "description", "entity", "human", "location", "number")},
        input_template="Question: {text}\nAnswer type:",
        description="TREC question classification, 6 coarse classes; several label words span several tokens",
    ),
}


# ---------------------------------------------------------------------------- task specs
def load_task(spec: str) -> IclTask:
    """A built-in task by name, a task folder, or a task file (.json with IclTask's fields, or
    .py defining TASK)."""
    if spec in BUILTIN_TASKS:
        return BUILTIN_TASKS[spec]
    path = Path(spec)
    if path.is_dir():
        return IclTask(**folder_task_fields(path))
    if path.suffix not in (".json", ".py"):
        raise ValueError(f"unknown task {spec!r}: built-in tasks are {', '.join(BUILTIN_TASKS)}; "
                         "or give a task folder (train.jsonl, test.jsonl) or a .json / .py task file")
    if not path.is_file():
        raise FileNotFoundError(f"task file {spec} does not exist")
    if path.suffix == ".json":
        try:
            raw = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as e:
            raise ValueError(f"task file {spec} is not valid JSON: {e}") from None
    else:
        raw = runpy.run_path(str(path)).get("TASK")
        if raw is None:
            raise ValueError(f"task file {spec} must define TASK (an IclTask or a dict of its fields)")
    if isinstance(raw, IclTask):
        task = raw
    elif isinstance(raw, dict):
        known = {f.name for f in fields(IclTask)}
        unknown = sorted(set(raw) - known)
        if unknown:
            raise ValueError(f"task file {spec}: unknown field(s) {unknown}; known: {sorted(known)}")
        if "name" not in raw or "label_words" not in raw:
            raise ValueError(f"task file {spec}: needs at least 'name' and 'label_words'")
        task = IclTask(**raw)
    else:
        raise ValueError(f"task file {spec}: TASK must be an IclTask or a dict, got {type(raw).__name__}")
    if task.data_dir is not None and not Path(task.data_dir).is_absolute():
        # a relative data_dir is relative to the task file, so a spec travels with its data
        task = IclTask(**{**task.to_dict(), "data_dir": str((path.parent / task.data_dir).resolve())})
    return task


def default_data_dir() -> Path | None:
    """Where the development ICL tasks live: $CAMELOT_ICL_DATA, ../shared/data/icl from the
    current folder, or the same next to the repository; None when none exists."""
    candidates = []
    if os.environ.get(DATA_ENV):
        candidates.append(Path(os.environ[DATA_ENV]))
    candidates.append(Path.cwd().parent / "shared" / "data" / "icl")
    candidates.append(Path(__file__).resolve().parents[2] / "shared" / "data" / "icl")
    return next((c for c in candidates if c.is_dir()), None)


def task_folder(task: IclTask, data_dir: str | Path | None) -> Path:
    if task.data_dir is not None:
        return Path(task.data_dir)
    if data_dir is None:
        data_dir = default_data_dir()
        if data_dir is None:
            raise FileNotFoundError(
                f"no ICL data folder found for task {task.name!r}: pass --data-dir (a folder holding "
                f"{task.name}/{task.train_file}) or set ${DATA_ENV}")
    return Path(data_dir) / task.name


@dataclass
class Example:
    text: str
    label: str


def load_split(task: IclTask, data_dir: str | Path | None, split: str) -> list[Example]:
    """Read one split ("train" or "test") of a task through `datasets` (local JSON lines)."""
    folder = task_folder(task, data_dir)
    ds, path = read_split(task.name, folder, task.train_file if split == "train" else task.test_file, split)
    for col in (task.text_field, task.label_field):
        if col not in ds.column_names:
            raise ValueError(f"task {task.name!r}: {path} has no field {col!r} (fields: {ds.column_names})")
    texts = ds[task.text_field]
    labels = label_names(ds, task.label_field)
    unknown = sorted(set(labels) - set(task.labels))
    if unknown:
        raise ValueError(f"task {task.name!r}: {path} has labels {unknown} that label_words does not map "
                         f"(known: {task.labels})")
    return [Example(str(t), lab) for t, lab in zip(texts, labels)]


# ---------------------------------------------------------------------------- sampling
def by_label(examples: Sequence[Example], labels: Sequence[str]) -> dict[str, list[int]]:
    groups: dict[str, list[int]] = {lab: [] for lab in labels}
    for i, ex in enumerate(examples):
        groups[ex.label].append(i)
    return groups


def balanced_pool(examples: Sequence[Example], labels: Sequence[str], n: int, seed: int) -> list[int]:
    """Indices of n demonstrations, ordered so that EVERY suffix is as balanced as possible.

    The pool is built from its end in rounds of one example per label (label order shuffled in
    each round). The k-shot prompt takes the last k: so the sets are nested (k-shot demos are
    the last k of the (k')-shot demos for k < k'), each is balanced (exactly, when k is a
    multiple of the number of labels), and the demonstrations next to the test input, the ones
    that fit in the window, are the same for every k. More shots then only add older
    demonstrations, which is what tests whether memory helps."""
    if n <= 0:
        return []
    rng = random.Random(seed)
    groups = by_label(examples, labels)
    per_label = -(-n // len(labels))
    short = {lab: len(ix) for lab, ix in groups.items() if len(ix) < per_label}
    if short:
        raise ValueError(f"{n} balanced demonstrations need {per_label} per label; the training data has "
                         f"only {short}")
    picks = {lab: rng.sample(ix, per_label) for lab, ix in groups.items()}
    rev: list[int] = []
    for r in range(per_label):
        order = list(labels)
        rng.shuffle(order)
        rev.extend(picks[lab][r] for lab in order)
    return list(reversed(rev[:n]))


def balanced_test(examples: Sequence[Example], labels: Sequence[str], n: int | None, seed: int = 0) -> list[int]:
    """A fixed, label-balanced subset of the test split (the same for every seed and strategy, so
    that strategies are compared on the same examples). n=None: all, in file order."""
    if n is None or n >= len(examples):
        return list(range(len(examples)))
    rng = random.Random(seed)
    groups = by_label(examples, labels)
    base, rest = divmod(n, len(labels))
    chosen: list[int] = []
    for j, lab in enumerate(labels):
        want = base + (1 if j < rest else 0)
        chosen.extend(rng.sample(groups[lab], min(want, len(groups[lab]))))
    if len(chosen) < n:  # a label too rare for an even split: fill from the others
        left = sorted(set(range(len(examples))) - set(chosen))
        chosen.extend(rng.sample(left, n - len(chosen)))
    return sorted(chosen)
