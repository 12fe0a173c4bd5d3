"""The RULER-style retrieval suite: cases are built as specified (length, depth, needles, same
trials for every run), scoring is RULER's, prefix sharing gives the answers of reading each case
from scratch, and the CLI writes its tables, JSON and heat maps at equal budget; a short real
SmolLM2 check that full context finds what a lone window cannot see."""

from __future__ import annotations

import json
import re

import pytest
import torch
from camelot.eval.passkey import build_haystack, run_camelot
from camelot.eval.retrieval import make_judge, run_asked, wilson
from camelot.eval.retrieval_tasks import TASKS, make_cases, make_prompt, score, task_haystack

import camelot
from camelot import CamelotConfig
from camelot.cli import UserError, main
from tests.test_ask import TEXT, tiny_model_folder, tiny_tokenizer


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


def hay_for(tok, task, max_len=1400, chat=True):
    prompt = make_prompt(tok, chat_template=chat)
    return task_haystack(build_haystack(tok, max_len, TEXT), task, prompt), prompt


@pytest.mark.parametrize("task", TASKS)
def test_cases_have_the_asked_length_needles_and_question(tok, task):
    hay, prompt = hay_for(tok, task)
    cases = make_cases(hay, task, prompt, [900, 1300], [0, 50, 100], trials=2, max_new_tokens=10, seed=3)
    assert len(cases) == 2 * 3 * 2
    assert [c.expected for c in cases] == [c.expected for c in make_cases(hay, task, prompt, [900, 1300], [0, 50, 100],
                                                                         2, 10, seed=3)]
    assert len({tuple(c.expected) for c in cases}) == len(cases)  # trials differ
    for c in cases:
        ids = c.ids(hay)
        text = tok.decode(ids)
        assert len(ids) == c.length - 10  # the answer completes the length
        assert all(e in text for e in c.expected)
        assert all(at in hay.boundaries for at, _ in c.inserts)  # needles go in at sentence ends
        assert text.startswith("<|im_start|>user\n") and "<|im_end|>\n<|im_start|>assistant\n" in text
        assert text.split("<|im_start|>assistant\n")[1].startswith(("The special magic", "Answer: According"))
        first = [at for at, n in c.inserts if tok.decode(n).count(c.expected[0]) or task == "vt"][0]
        assert abs(first - c.depth / 100 * c.hay_len) <= max(len(s) for s in re.split(r"(?<=\.) ", TEXT)) + 5
    if task == "vt":  # the chain comes in reading order: each name is bound before it is used
        for c in cases:
            text = tok.decode(c.ids(hay))
            assert [text.index(f"VAR {n} =") for n in c.expected] == sorted(text.index(f"VAR {n} =")
                                                                            for n in c.expected)
    if task in ("multikey", "multiquery", "multivalue"):
        assert all(len(c.inserts) == 4 for c in cases)


def test_plain_prompt_and_tokenizer_without_template(tok):
    hay, prompt = hay_for(tok, "niah_number", chat=False)
    c = make_cases(hay, "niah_number", prompt, [400], [50], 1, 8)[0]
    text = tok.decode(c.ids(hay))
    assert "<|im_start|>" not in text and text.endswith("mentioned in the provided text is")
    with pytest.raises(UserError, match="--no-chat-template"):
        make_prompt(tiny_tokenizer(chat_template=None), chat_template=True)
    with pytest.raises(UserError, match="too short"):
        make_cases(hay, "multiquery", prompt, [60], [50], 1, 8)


def test_ruler_scoring_interval_and_answer_end(tok):
    assert score("It is 1234567.", ["1234567"]) == 1.0
    assert score("AAAAA, bbbbb and CCCCC", ["AAAAA", "BBBBB", "DDDDD", "EEEEE"]) == 0.5
    assert score("nothing", ["1"]) == 0.0
    m, lo, hi = wilson([1.0] * 20)
    assert m == 1.0 and 0.8 < lo < 0.85 and hi == 1.0
    m, lo, hi = wilson([0.0, 1.0] * 10)
    assert m == 0.5 and lo < 0.3 and hi > 0.7
    judge = make_judge(tok)
    hay, prompt = hay_for(tok, "niah_number")
    case = make_cases(hay, "niah_number", prompt, [400], [50], 1, 8)[0]
    ids = tok(f" {case.expected[0]}.", add_special_tokens=False).input_ids
    after = tok(f"{case.expected[0]}", add_special_tokens=False).input_ids
    trial = judge(case, ids + [tok.eos_token_id] + after, 0.0)
    assert trial.correct == 1.0 and trial.answer == f" {case.expected[0]}."
    assert judge(case, [tok.eos_token_id] + after, 0.0).correct == 0.0  # nothing after the end is scored


def test_shared_prefixes_give_the_answers_of_reading_from_scratch(tok):
    from tests.conftest import tiny_llama

    model = tiny_llama(vocab=len(tok), max_pos=1024)
    hay, prompt = hay_for(tok, "multikey", 1000)
    cases = make_cases(hay, "multikey", prompt, [600], [10, 70], trials=1, max_new_tokens=3, seed=1)
    cm = camelot.wrap(model, CamelotConfig(window=48, slots=32, threshold=0.7, placement="recency"))
    try:
        shared = run_camelot(cm, hay, cases, 3, judge=make_judge(tok))
        by_case = {(t.length, t.depth): t.answer for t in shared}
        for c in cases:
            cm.reset()
            gen = cm.generate(torch.tensor([c.ids(hay)]), max_new_tokens=3)[0].tolist()
            assert make_judge(tok)(c, gen, 0.0).answer == by_case[(c.length, c.depth)]
    finally:
        cm.unwrap()


@pytest.mark.parametrize("kind", ["question", "question+facts"])
def test_a_question_read_first_gives_the_answers_of_reading_each_case_from_scratch(tok, kind):
    """camelot-question: each case's question words (asked) are set before its document; the
    runner's answers are those of set_question + reading the whole case."""
    from tests.conftest import tiny_llama

    model = tiny_llama(vocab=len(tok), max_pos=1024)
    hay, prompt = hay_for(tok, "niah_number", 1000)
    cases = make_cases(hay, "niah_number", prompt, [600], [10, 70], trials=1, max_new_tokens=3, seed=1)
    for c in cases:  # the question and the answer's start, without the chat template around them
        asked, full = tok.decode(c.asked), tok.decode(c.question)
        assert asked.startswith("What is") and asked.endswith(full.split("assistant\n")[-1]) and "<|im" not in asked
    cm = camelot.wrap(model, CamelotConfig.recall(kind, window=48, slots=32, placement="recency"))
    try:
        got = {(t.length, t.depth): t.answer for t in run_asked(cm, hay, cases, 3, judge=make_judge(tok))}
        for c in cases:
            cm.reset()
            cm.set_question(c.asked)
            gen = cm.generate(torch.tensor([c.ids(hay)]), max_new_tokens=3)[0].tolist()
            assert make_judge(tok)(c, gen, 0.0).answer == got[(c.length, c.depth)]
    finally:
        cm.unwrap()


def test_cli_runs_every_strategy_at_equal_budget(tmp_path, capsys):
    folder = tiny_model_folder(tmp_path / "model", max_pos=1024)
    book = tmp_path / "book.txt"
    book.write_text(TEXT * 4)
    out = tmp_path / "out"
    argv = ["retrieval", "--model", str(folder), "--tasks", "niah_number,vt", "--lengths", "700,1100",
            "--depths", "50", "--trials", "1", "--window", "128", "--budget", "300", "--recent", "128",
            "--max-new-tokens", "4", "--haystack", str(book), "--out", str(out), "--no-progress",
            "--strategies", "window,sliding,knn,camelot,camelot-recall,camelot-question,camelot-question-facts,full"]
    assert main(argv) == 0
    text = capsys.readouterr().out
    assert "**niah_number**" in text and "**all tasks**" in text and "not run" in text
    assert "full: lengths 1100 exceed the model's 1024 positions" in text
    data = json.loads((out / "retrieval.json").read_text())
    runs = {r["strategy"]: r for r in data["runs"]}
    recalls = ("camelot-recall", "camelot-question", "camelot-question-facts")
    assert set(runs) == {"window", "sliding", "knn", "camelot", *recalls, "full"}
    cfg = {s: r["config"] for s, r in runs.items() if r["config"]}
    budget = {s: c["slots"] + c["sink"] + (c["recent"] if s != "sliding" else 0) for s, c in cfg.items()
              if s in ("sliding", "camelot", *recalls)}
    assert budget == {"sliding": 300, "camelot": 300, **{s: 300 for s in recalls}}
    assert cfg["camelot-recall"]["span_reserve"] == 168 - 56 and cfg["camelot"]["span_reserve"] == 56
    assert cfg["camelot-question"]["importance"] == "question" and cfg["camelot-question"]["span_reserve"] == 112
    assert cfg["camelot-question-facts"]["importance"] == "question+surprise"
    keys = {s: sorted((t["task"], t["length"], t["depth"], tuple(t["expected"])) for t in r["trials"])
            for s, r in runs.items()}
    assert all(len(k) == 2 * 2 and k == keys["window"] for s, k in keys.items() if s != "full")
    assert {t["length"] for t in runs["full"]["trials"]} == {700}
    assert runs["window"]["by_task_length"]["vt@700"]["n"] == 1
    assert len(list(out.glob("heatmap_*.png"))) == 8 and (out / "retrieval.md").exists()


def test_a_stopped_run_keeps_its_trials_and_resume_runs_only_the_rest(tmp_path, capsys):
    folder = tiny_model_folder(tmp_path / "model", max_pos=1024)
    book = tmp_path / "book.txt"
    book.write_text(TEXT * 4)
    out = tmp_path / "out"
    argv = ["retrieval", "--model", str(folder), "--tasks", "niah_number", "--lengths", "700", "--depths", "30,70",
            "--trials", "1", "--window", "128", "--budget", "300", "--max-new-tokens", "4", "--haystack", str(book),
            "--out", str(out), "--no-progress", "--strategies", "sliding,camelot"]
    assert main(argv) == 0 and main(argv) == 0  # a finished journal is simply started over
    journal = (out / "trials.jsonl").read_text().splitlines()
    rows = [json.loads(line) for line in journal]
    assert "settings" in rows[0] and rows[-1] == {"done": True} and len(rows) == 2 + 2 * 2
    whole = json.loads((out / "retrieval.json").read_text())["runs"]

    # stopped after three trials, the last line cut short by the kill; the kept trial's answer
    # marked, to see that it is taken as it is and not read again
    kept = rows[:4]
    kept[1] = {**kept[1], "answer": "KEPT"}
    (out / "trials.jsonl").write_text("".join(json.dumps(r) + "\n" for r in kept) + '{"run": "cam')
    capsys.readouterr()
    assert main(argv) == 2
    assert "did not finish: add --resume" in capsys.readouterr().err
    stopped = (out / "trials.jsonl").read_text()
    assert main([*argv, "--report"]) == 0  # read only: a run may still be appending
    assert re.search(r"not finished; cases judged: sliding[^,]* 2 of 2, camelot[^,]* 1 of 2", capsys.readouterr().out)
    assert (out / "trials.jsonl").read_text() == stopped
    assert main([*argv, "--resume", "--seed", "1"]) == 2
    assert "seed differ" in capsys.readouterr().err
    assert main([*argv, "--resume"]) == 0
    resumed = json.loads((out / "retrieval.json").read_text())["runs"]

    def answers(runs):
        return {(r["label"], t["depth"], t["trial"]): t["answer"] for r in runs for t in r["trials"]}

    first = (kept[1]["run"], kept[1]["depth"], kept[1]["trial"])
    assert answers(resumed) == {**answers(whole), first: "KEPT"}
    rows = [json.loads(line) for line in (out / "trials.jsonl").read_text().splitlines()]
    assert rows[-1] == {"done": True} and sum("run" in r for r in rows) == 4


def test_a_budget_gives_each_camelot_write_its_own_tail_and_sliding_the_same_entries():
    """--budget 1024: the default write splits it in halves, the window counted (572 slots + 448
    tail + 4 sinks: window + tail = sinks + slots), the
    facts preset keeps its 128 tail (892 slots), infllm the nearest whole number of blocks to its
    share, and sliding holds what each of them holds."""
    import dataclasses

    from camelot.eval.plan import Sweep, plan_runs

    sweep = dataclasses.replace(Sweep(strategies=("sliding", "knn", "infllm", "camelot", "camelot-recall")),
                                budgets=(1024,))
    runs = {s.strategy: s.config for s in plan_runs(sweep)}
    assert (runs["camelot"].slots, runs["camelot"].recent, runs["camelot"].span_reserve) == (572, 448, 190)
    assert (runs["camelot-recall"].slots, runs["camelot-recall"].recent) == (892, 128)
    assert (runs["infllm"].slots, runs["infllm"].recent) == (896, 128) and runs["knn"].recent == 128  # 892: 7 blocks
    assert runs["sliding"].slots + runs["sliding"].sink == 1024
    assert all(c.slots + c.recent + c.sink == 1024 for s, c in runs.items() if s.startswith("camelot"))


@pytest.mark.parametrize("argv, needle", [
    (["retrieval", "--tasks", "magic"], "unknown task"),
    (["retrieval", "--budget", "100", "--slots", "64"], "not both"),
    (["retrieval", "--budget", "100", "--recent", "128"], "leaves no slots"),
    (["retrieval", "--budget", "4", "--strategies", "camelot"], "leaves no slots"),
    (["retrieval", "--depths", "120"], "percentages"),
    (["ppl", "--data", "x.txt", "--budget", "512", "--slots", "64"], "not both"),
    (["ppl", "--data", "x.txt", "--budget", "0"], "--budget must be >= 1"),
    (["passkey", "--budget", "many"], "--budget: 'many' is not a valid int"),
    (["ppl", "--data", "x.txt", "--strategies", "camelot-question"], "retrieval` only"),
    (["passkey", "--strategies", "camelot,camelot-question"], "retrieval` only"),
    (["ppl", "--data", "x.txt", "--strategies", "camelot-question-facts"], "retrieval` only"),
])
def test_bad_arguments_fail_in_one_line(argv, needle, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert needle in err and len(err.strip().splitlines()) == 1


@pytest.mark.slow
def test_smollm2_full_context_finds_what_a_window_cannot_see(smollm2, long_text):
    from camelot.eval.perplexity import RunSpec
    from camelot.eval.retrieval import evaluate

    model, tok = smollm2
    prompt = make_prompt(tok, chat_template=True)
    hay = task_haystack(build_haystack(tok, 640, long_text[:8000]), "niah_number", prompt)
    cases = make_cases(hay, "niah_number", prompt, [640], [10], trials=1, max_new_tokens=10)
    specs = [RunSpec("window", 128, {}, CamelotConfig(window=128, strategy="window")), RunSpec("full", None, {}, None)]
    res = {r.spec.strategy: r for r in evaluate(model, {"niah_number": hay}, {"niah_number": cases}, specs,
                                                {"niah_number": 10}, progress=False)}
    assert res["full"].scores() == [1.0], [t.answer for t in res["full"].trials]
    assert res["window"].scores() == [0.0]  # the needle is ~450 tokens before the window
