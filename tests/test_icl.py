"""In-context-learning harness: prompt building, label scoring, memory isolation, the CLI."""

from __future__ import annotations

import json
import random
from collections import Counter
from pathlib import Path

import pytest
import torch
from camelot.eval import icl
from camelot.eval.icl_tasks import (
    BUILTIN_TASKS,
    Example,
    IclTask,
    balanced_pool,
    balanced_test,
    load_split,
    load_task,
)

import camelot
from tests.conftest import tiny_llama

WORDS = ["[UNK]", "<s>", "Review", ":", "Sentiment", "very", "good", "bad", "film", "a", "the", ".", "plot",
         "dull", "fun", "acting", "was", "and"]
TASK = IclTask(name="toy", label_words={"pos": "very good", "neg": "bad"},
               input_template="Review: {text}\nSentiment:")


def make_tokenizer(bos: bool = True):
    """A tiny offline word-level tokenizer; with bos it puts <s> first when asked for special tokens."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    tk = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="[UNK]"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    if bos:
        tk.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="[UNK]", bos_token="<s>" if bos else None)


def toy_examples(n: int, seed: int) -> list[Example]:
    rng = random.Random(seed)
    out = []
    for i in range(n):
        label = "pos" if i % 3 else "neg"  # unbalanced on purpose: 2/3 pos
        body = ["the", "film", "was", "fun" if label == "pos" else "dull"] + rng.sample(["a", "plot", "acting"], 2)
        out.append(Example(" ".join(body[: 3 + rng.randrange(4)]), label))
    return out


def toy_data(n_train: int = 60, n_test: int = 6, bos: bool = True) -> icl.TokenizedTask:
    train, test = toy_examples(n_train, 0), toy_examples(20, 1)
    return icl.tokenize_task(TASK, make_tokenizer(bos), train, test, balanced_test(test, TASK.labels, n_test))


# ---------------------------------------------------------------------------- prompt builder
def test_balanced_pool_every_suffix_is_balanced_and_nested():
    ex = toy_examples(90, 0)  # 60 pos / 30 neg
    pool = balanced_pool(ex, ["pos", "neg"], 40, seed=3)
    assert len(pool) == len(set(pool)) == 40
    for k in range(0, 41, 2):
        c = Counter(ex[i].label for i in pool[len(pool) - k:])
        assert c["pos"] == c["neg"] == k // 2
    for k in range(1, 41, 2):
        c = Counter(ex[i].label for i in pool[len(pool) - k:])
        assert abs(c["pos"] - c["neg"]) == 1
    assert balanced_pool(ex, ["pos", "neg"], 40, seed=3) == pool  # deterministic per seed
    assert balanced_pool(ex, ["pos", "neg"], 40, seed=4) != pool
    with pytest.raises(ValueError, match="per label"):
        balanced_pool(ex, ["pos", "neg"], 62, seed=0)  # needs 31 neg, only 30


def test_balanced_test_subset_is_fixed_and_balanced():
    ex = toy_examples(90, 0)
    idx = balanced_test(ex, ["pos", "neg"], 20)
    assert idx == balanced_test(ex, ["pos", "neg"], 20) and idx == sorted(idx)
    assert Counter(ex[i].label for i in idx) == {"pos": 10, "neg": 10}
    assert balanced_test(ex, ["pos", "neg"], None) == list(range(90))


def test_templates_and_builtin_tasks():
    mr = BUILTIN_TASKS["mr"]
    assert mr.format_demo("a fine film .", "positive") == "Review: a fine film .\nSentiment: positive\n\n"
    assert mr.format_input("x") + mr.format_answer("negative") == "Review: x\nSentiment: negative"
    assert set(BUILTIN_TASKS["subj"].labels) == {"subjective", "objective"}
    with pytest.raises(ValueError, match="text"):
        IclTask(name="t", label_words={"a": "x", "b": "y"}, input_template="no slot")
    with pytest.raises(ValueError, match="distinct"):
        IclTask(name="t", label_words={"a": "x", "b": "x"})


def test_label_words_that_split_into_several_tokens():
    data = toy_data()
    tok = data.tokenizer
    assert data.label_ids == [[WORDS.index("very"), WORDS.index("good")], [WORDS.index("bad")]]
    assert data.prefix_ids == [1]  # <s>: starts the window
    ex = data.train[0]
    assert data.demo_ids(0) == icl.encode(tok, TASK.format_demo(ex.text, ex.label))
    for i, e in enumerate(data.train[:10]):  # each demonstration ends with its label's answer tokens
        lab = data.label_ids[TASK.labels.index(e.label)]
        assert data.demo_ids(i)[-len(lab):] == lab
    # reserve: longest prompt + all but the last token of the longest label
    assert data.reserve == max(len(t) for t in data.test_ids) + 1


def test_task_files_json_and_py(tmp_path: Path):
    spec = {"name": "mine", "label_words": {"1": "yes", "0": "no"}, "input_template": "Q: {text}\nA:",
            "data_dir": "data"}
    (tmp_path / "mine.json").write_text(json.dumps(spec))
    t = load_task(str(tmp_path / "mine.json"))
    assert t.labels == ["1", "0"] and Path(t.data_dir) == (tmp_path / "data").resolve()
    (tmp_path / "mine.py").write_text("TASK = dict(name='py', label_words={'a': 'x', 'b': 'y'})\n")
    assert load_task(str(tmp_path / "mine.py")).name == "py"
    (tmp_path / "bad.json").write_text(json.dumps({**spec, "colour": 1}))
    with pytest.raises(ValueError, match="unknown field"):
        load_task(str(tmp_path / "bad.json"))
    with pytest.raises(ValueError, match="unknown task"):
        load_task("nope")
    # data through `datasets`; integer labels in the file map through their string form
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "train.jsonl").write_text('{"text": "a", "label": 1}\n{"text": "b", "label": 0}\n')
    assert [(e.text, e.label) for e in load_split(t, None, "train")] == [("a", "1"), ("b", "0")]
    with pytest.raises(FileNotFoundError, match="test file"):
        load_split(t, None, "test")


def test_window_split_and_budget():
    assert icl.split_demos([5, 5, 5, 5], 11) == 2
    assert icl.split_demos([5, 5, 5, 5], 4) == 0
    assert icl.split_demos([3, 9, 2], 100) == 3
    assert icl.window_budget(64, 1, 20) == 42
    with pytest.raises(ValueError, match="too small"):
        icl.window_budget(16, 1, 20)
    data = toy_data()
    pool = balanced_pool(data.train, TASK.labels, 20, seed=0)
    mem, win = icl.plan_prompt(data, pool, 20, budget=30)
    assert mem + win == pool and sum(len(data.demo_ids(i)) for i in win) <= 30
    assert sum(len(data.demo_ids(i)) for i in [mem[-1]] + win) > 30


# ---------------------------------------------------------------------------- scorer
@pytest.mark.parametrize("mode", ["sum", "mean", "first"])
def test_label_logprobs_match_a_plain_forward(mode):
    """With empty memory camelot is exact local attention, so label log-probs must equal those of
    the unwrapped model on prompt + label."""
    model = tiny_llama(vocab=len(WORDS))
    data = toy_data()
    cm = camelot.wrap(model, camelot.CamelotConfig(window=64, strategy="camelot", slots=16))
    prompt = data.prefix_ids + data.demo_ids(0) + data.test_ids[0]
    got = icl.label_logprobs(cm, prompt, data.label_ids, mode)
    assert cm.open_len == 0  # the open window is left as found
    cm.unwrap()
    want = []
    for lab in data.label_ids:
        ids = torch.tensor([prompt + lab])
        with torch.no_grad():
            lp = torch.log_softmax(model(ids).logits[0].float(), -1)
        tok_lp = torch.stack([lp[len(prompt) - 1 + j, t] for j, t in enumerate(lab)])
        want.append(tok_lp[0] if mode == "first" else tok_lp.sum() / (len(lab) if mode == "mean" else 1))
    torch.testing.assert_close(got, torch.stack(want), atol=1e-4, rtol=1e-4)


def test_accuracy_from_known_logprobs(monkeypatch):
    data = toy_data(n_test=6)
    # label 0 wins for prompts whose length is even, label 1 otherwise
    def fake(cm, prompt, label_ids, mode="sum"):
        return torch.tensor([0.0, -1.0]) if len(prompt) % 2 == 0 else torch.tensor([-2.0, -0.5])

    monkeypatch.setattr(icl, "label_logprobs", fake)
    cm = camelot.wrap(tiny_llama(vocab=len(WORDS)), camelot.CamelotConfig(window=64, strategy="window"))
    res = icl.evaluate_prompt(cm, [], data.prefix_ids, data)
    want = [0 if len(p) % 2 == 0 else 1 for p in data.test_ids]
    assert res.predictions == want
    assert res.correct == sum(int(a == b) for a, b in zip(want, data.test_labels))
    assert res.accuracy == pytest.approx(res.correct / 6)
    assert res.logprobs.shape == (6, 2)


@pytest.mark.parametrize("strategy", ["camelot", "knn"])
def test_test_examples_do_not_leak_into_memory(strategy):
    model = tiny_llama(vocab=len(WORDS))
    data = toy_data(n_test=4)
    cm = camelot.wrap(model, camelot.CamelotConfig(window=48, strategy=strategy, slots=32, threshold=0.5))
    pool = balanced_pool(data.train, TASK.labels, 30, seed=0)
    mem, win = icl.plan_prompt(data, pool, 30, icl.window_budget(48, 1, data.reserve))
    assert mem and win
    mem_ids = [t for i in mem for t in data.demo_ids(i)]
    win_ids = data.prefix_ids + [t for i in win for t in data.demo_ids(i)]

    # memory state right after the demonstrations (the window's read the memory: with eviction by
    # use that raises the slots' scores), for comparison
    cm.reset()
    cm.feed(mem_ids, progress=False)
    cm.flush()
    icl.extend_open(cm, win_ids)
    before = [{k: v.clone() for k, v in rt.state.memory.state_dict().items()} for rt in cm.runtimes]
    for p in data.test_ids:
        icl.label_logprobs(cm, p, data.label_ids)
    for rt, st in zip(cm.runtimes, before):
        after = rt.state.memory.state_dict()
        assert after.keys() == st.keys()
        for k in st:
            assert torch.equal(after[k], st[k]), k

    # each example scored after the others equals it scored alone on fresh memory
    all_at_once = icl.evaluate_prompt(cm, mem_ids, win_ids, data).logprobs
    for j in range(len(data.test_ids)):
        alone = icl.TokenizedTask(**{**data.__dict__, "test_ids": [data.test_ids[j]],
                                     "test_labels": [data.test_labels[j]]})
        torch.testing.assert_close(icl.evaluate_prompt(cm, mem_ids, win_ids, alone).logprobs[0], all_at_once[j])
    # memory makes a difference (otherwise the test above proves nothing)
    no_mem = icl.evaluate_prompt(cm, [], win_ids, data).logprobs
    assert not torch.allclose(no_mem, all_at_once)
    cm.unwrap()


def test_scoring_never_fills_the_segment():
    cm = camelot.wrap(tiny_llama(vocab=len(WORDS)), camelot.CamelotConfig(window=8, strategy="knn"))
    with pytest.raises(RuntimeError, match="fill the open segment"):
        icl.extend_open(cm, list(range(2, 10)))
    cm.unwrap()


def test_mean_ci_and_summary():
    m, sd, ci = icl.mean_ci([0.5, 0.7])
    assert m == pytest.approx(0.6) and sd == pytest.approx(0.1414, abs=1e-3)
    assert ci == pytest.approx(12.706 * sd / 2 ** 0.5)
    assert icl.mean_ci([0.4])[2] != icl.mean_ci([0.4])[2]  # nan: no interval from one seed
    rows = [icl.RunRow("knn", s, 8, a, int(a * 10), 10, 2, 6, 30, 90, 2.0, 1.0) for s, a in enumerate([0.5, 0.7])]
    (s,) = icl.summarize(rows)
    assert s["accuracy"] == pytest.approx(0.6) and s["demos_per_second"] == pytest.approx(3.0)
    assert s["memory_tokens_per_second"] == pytest.approx(45.0)


# ---------------------------------------------------------------------------- CLI
@pytest.fixture
def toy_setup(tmp_path: Path):
    model_dir = tmp_path / "model"
    tiny_llama(vocab=len(WORDS)).save_pretrained(model_dir)
    make_tokenizer().save_pretrained(model_dir)
    data_dir = tmp_path / "data" / "toy"
    data_dir.mkdir(parents=True)
    for split, n, seed in (("train", 60, 0), ("test", 20, 1)):
        rows = [json.dumps({"text": e.text, "label": e.label}) for e in toy_examples(n, seed)]
        (data_dir / f"{split}.jsonl").write_text("\n".join(rows) + "\n")
    spec = tmp_path / "toy.json"
    spec.write_text(json.dumps({"name": "toy", "label_words": TASK.label_words,
                                "input_template": TASK.input_template}))
    return tmp_path, model_dir, spec


def test_cli_end_to_end(toy_setup, capsys):
    from camelot.cli import main

    tmp, model_dir, spec = toy_setup
    out = tmp / "out"
    rc = main(["icl", "--model", str(model_dir), "--task", str(spec), "--data-dir", str(tmp / "data"),
               "--shots", "0,2,8,24", "--window", "48", "--strategies", "window,camelot,knn", "--seeds", "2",
               "--n-test", "6", "--slots", "16", "--out", str(out), "--no-progress"])
    assert rc == 0
    table = capsys.readouterr().out
    assert "| shots | demos in window | window | camelot | knn |" in table and "0 (zero-shot)" in table
    rec = json.loads((out / "icl_toy.json").read_text())
    assert (out / "icl_toy.md").read_text().strip() == table.strip()
    assert (out / "icl_toy.png").stat().st_size > 1000
    runs = rec["runs"]
    assert len([r for r in runs if r["strategy"] == "zero-shot"]) == 1
    assert len(runs) == 1 + 3 * 2 * 3  # zero-shot + strategies x seeds x non-zero shots
    big = [r for r in runs if r["shots"] == 24]
    # 24 demos do not fit in a 48-token window: the rest go to memory for camelot/knn, are dropped by window
    assert all(r["demos_in_window"] < 24 for r in big)
    assert all(r["demos_in_memory"] == 24 - r["demos_in_window"] for r in big if r["strategy"] != "window")
    assert all(r["demos_in_memory"] == 0 for r in big if r["strategy"] == "window")
    assert all(r["demos_per_second"] > 0 for r in big if r["strategy"] != "window")
    for s in rec["summary"]:
        accs = [r["accuracy"] for r in runs if r["strategy"] == s["strategy"] and r["shots"] == s["shots"]]
        assert s["accuracy"] == pytest.approx(sum(accs) / len(accs))
        assert all(r["n_test"] == 6 and 0 <= r["accuracy"] <= 1 for r in runs)


@pytest.mark.parametrize("flag, kind", [("--recall-demos", "demonstrations"), (None, "demonstrations"),
                                        ("--recall-balanced", "balanced")])
def test_cli_recall_demos_runs_camelot_with_the_demonstrations_reserve_and_says_so(toy_setup, capsys, flag, kind):
    """camelot icl writes as --recall-demos unless another write is named (the library's default
    write: --recall-balanced)."""
    from camelot.cli import main
    from camelot.config import CamelotConfig

    tmp, model_dir, spec = toy_setup
    out = tmp / f"out-{kind}"
    rc = main(["icl", "--model", str(model_dir), "--task", str(spec), "--data-dir", str(tmp / "data"),
               "--shots", "24", "--window", "48", "--strategies", "camelot", "--seeds", "1", "--n-test", "4",
               "--slots", "16", *([flag] if flag else []), "--out", str(out), "--no-progress"])
    assert rc == 0
    assert f"camelot: recall {kind}" in capsys.readouterr().out.splitlines()[0]
    cfg = json.loads((out / "icl_toy.json").read_text())["config"]
    want = CamelotConfig.recall(kind, slots=16)
    assert (cfg["span_reserve"], cfg["importance"], cfg["span_score"], cfg["evict"]) == (
        want.span_reserve, want.importance, want.span_score, want.evict)


def test_cli_errors_are_one_line(toy_setup, capsys, tmp_path):
    from camelot.cli import main

    tmp, model_dir, spec = toy_setup
    rc = main(["icl", "--model", str(model_dir), "--task", str(spec), "--data-dir", str(tmp / "nowhere"),
               "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert rc == 2 and "does not exist" in err and "Traceback" not in err
    rc = main(["icl", "--model", str(model_dir), "--task", str(spec), "--data-dir", str(tmp / "data"),
               "--strategies", "window,magic", "--out", str(tmp_path / "o")])
    assert rc == 2 and "magic" in capsys.readouterr().err
    rc = main(["icl", "--model", str(tmp / "no-model"), "--task", str(spec), "--data-dir", str(tmp / "data")])
    assert rc == 2 and "local folder" in capsys.readouterr().err
