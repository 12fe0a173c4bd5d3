"""Any folder of train/test data is an ICL task: labels.txt or the data's labels, a default
template, several label words of several tokens, built-in names for the shared task folders, a
`datasets` folder; run end to end by `camelot icl --task FOLDER` on a tiny random model."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from camelot.eval.icl_tasks import BUILTIN_TASKS, default_data_dir, load_split, load_task

from tests.conftest import tiny_llama
from tests.test_icl import make_tokenizer

# three classes; "very good" is two tokens of the toy tokenizer's vocabulary
ROWS = [("the film was fun", "very_good"), ("the plot was dull", "bad"), ("a film", "plot"),
        ("the acting was fun and the plot was fun", "very_good"), ("dull acting", "bad"), ("the plot", "plot")]


def _write_task(folder: Path, labels_txt: list[str] | None = None, n: int = 8) -> Path:
    folder.mkdir(parents=True)
    for split, k in (("train", n), ("test", 4)):
        rows = [json.dumps({"text": t, "label": lab}) for t, lab in (ROWS * k)]
        (folder / f"{split}.jsonl").write_text("\n".join(rows) + "\n")
    if labels_txt is not None:
        (folder / "labels.txt").write_text("\n".join(labels_txt) + "\n")
    return folder


def test_a_folder_is_a_task(tmp_path: Path):
    task = load_task(str(_write_task(tmp_path / "toy3", ["plot", "bad", "very_good"])))
    assert task.name == "toy3" and task.labels == ["plot", "bad", "very_good"]  # labels.txt order
    assert task.label_words["very_good"] == "very good"
    assert task.format_demo("the film", "very_good") == "Input: the film\nLabel: very good\n\n"
    test = load_split(task, None, "test")
    assert len(test) == 24 and {e.label for e in test} == {"plot", "bad", "very_good"}
    bare = load_task(str(_write_task(tmp_path / "nolabels")))
    assert bare.labels == ["bad", "plot", "very_good"]  # sorted labels of the training data
    (tmp_path / "nolabels" / "task.json").write_text(json.dumps({"input_template": "Review: {text}\nSentiment:"}))
    assert load_task(str(tmp_path / "nolabels")).input_template == "Review: {text}\nSentiment:"


def test_unknown_label_and_missing_split_are_clear(tmp_path: Path):
    folder = _write_task(tmp_path / "t", ["bad", "plot"])  # very_good is not listed
    task = load_task(str(folder))
    with pytest.raises(ValueError, match="very_good"):
        load_split(task, None, "train")
    (folder / "test.jsonl").unlink()
    with pytest.raises(FileNotFoundError, match="test"):
        load_split(task, None, "test")


def test_a_datasets_folder_with_class_labels(tmp_path: Path):
    import datasets

    feats = datasets.Features({"text": datasets.Value("string"),
                               "label": datasets.ClassLabel(names=["bad", "very_good"])})
    rows = {"text": ["the film was fun", "dull acting"] * 3, "label": [1, 0] * 3}
    dd = datasets.DatasetDict({s: datasets.Dataset.from_dict(rows, features=feats) for s in ("train", "test")})
    dd.save_to_disk(str(tmp_path / "hfds"))
    task = load_task(str(tmp_path / "hfds"))
    assert task.labels == ["bad", "very_good"]
    assert [e.label for e in load_split(task, None, "test")][:2] == ["very_good", "bad"]


def test_builtin_names_cover_the_shared_folders():
    assert {"mr", "subj", "sst2", "trec"} <= set(BUILTIN_TASKS)
    root = default_data_dir()
    if root is None:
        pytest.skip("the shared ICL data folder is not on this machine")
    for name in ("mr", "subj", "sst2", "trec"):
        task = load_task(name)
        listed = (root / name / "labels.txt").read_text().split()
        assert sorted(task.labels) == sorted(listed), name
        assert {e.label for e in load_split(task, None, "test")} <= set(task.labels)
    assert len(load_task("trec").labels) == 6


def test_cli_on_a_task_folder(tmp_path: Path, capsys):
    from camelot.cli import main

    model_dir = tmp_path / "model"
    tiny_llama(vocab=18).save_pretrained(model_dir)
    make_tokenizer().save_pretrained(model_dir)
    folder = _write_task(tmp_path / "toy3", ["plot", "bad", "very_good"], n=12)
    out = tmp_path / "out"
    rc = main(["icl", "--model", str(model_dir), "--task", str(folder), "--shots", "0,3,24", "--window", "48",
               "--strategies", "window,camelot,knn", "--seeds", "1", "--n-test", "6", "--slots", "16",
               "--out", str(out), "--no-progress"])
    assert rc == 0
    assert "| shots | demos in window | window | camelot | knn |" in capsys.readouterr().out
    rec = json.loads((out / "icl_toy3.json").read_text())
    assert [len(x) for x in rec["label_token_ids"]] == [1, 1, 2]  # "very good": two tokens, all scored
    assert {r["shots"] for r in rec["runs"]} == {0, 3, 24}
    assert any(r["demos_in_memory"] > 0 for r in rec["runs"] if r["strategy"] == "camelot")
