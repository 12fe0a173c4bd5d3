"""The pass key benchmark on a tiny random llama: cases are built as specified (length, depth,
sentence boundaries, same keys for every run), prefix sharing gives exactly the answers of
reading each case from scratch, `full` equals HF generate, and the CLI writes its table + JSON."""

from __future__ import annotations

import json

import pytest
import torch
from camelot.eval.passkey import (
    FILLER,
    build_haystack,
    first_number,
    make_cases,
    parse_length,
    run_camelot,
    run_full,
)

import camelot
from camelot import CamelotConfig
from camelot.cli import UserError, main
from tests.test_ask import tiny_model_folder, tiny_tokenizer


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


def test_cases_have_the_asked_length_depth_and_key(tok):
    hay = build_haystack(tok, 2000)
    cases = make_cases(hay, [600, 1000], [10, 50, 90], trials=2, max_new_tokens=8, seed=3)
    assert len(cases) == 2 * 3 * 2 and len({c.key for c in cases}) == 12
    assert [c.key for c in cases] == [c.key for c in make_cases(hay, [600, 1000], [10, 50, 90], 2, 8, seed=3)]
    unit = len(tok(FILLER, add_special_tokens=False).input_ids)
    for c in cases:
        ids = c.ids(hay)
        assert len(ids) == c.length - 8  # the answer completes the length
        assert c.needle_at % unit == 0  # needles go in between filler sentences
        assert abs(c.needle_at - c.depth / 100 * c.hay_len) <= unit
        assert c.key in tok.decode(ids) and tok.decode(ids).endswith("The pass key is")
    with pytest.raises(UserError, match="too short"):
        make_cases(hay, [20], [50], 1, 8)


def test_book_filler_is_cut_at_sentence_ends(tok):
    text = "One fish swims. Two birds fly! Does it rain? Yes it does. " * 20
    hay = build_haystack(tok, 500, filler_text=text)
    assert len(hay.stream) >= 500 and len(hay.boundaries) > 10
    for b in hay.boundaries[1:]:
        assert tok.decode(hay.stream[:b]).rstrip().endswith((".", "!", "?"))


def test_answers_parse_and_lengths_parse():
    assert first_number(" 71432. Remember it") == "71432" and first_number(" no idea") is None
    assert [parse_length(t) for t in ("2k", "128K", "1500")] == [2048, 131072, 1500]


def test_shared_prefixes_give_the_answers_of_reading_from_scratch(tok):
    model = tiny_llama_for(tok)
    hay = build_haystack(tok, 420)
    cases = make_cases(hay, [260, 420], [10, 60], trials=2, max_new_tokens=5, seed=1)
    cm = camelot.wrap(model, CamelotConfig(window=48, slots=32, read_top_k=4, threshold=0.7, placement="recency"))
    shared = run_camelot(cm, hay, cases, 5)
    by_key = {(t.length, t.depth, t.trial): t.answer for t in shared}
    for c in cases:
        cm.reset()
        cm.feed(torch.tensor([hay.intro]), progress=False, rank=False)  # the instruction, as run_camelot reads it
        gen = cm.generate(torch.tensor([c.ids(hay)[len(hay.intro):]]), max_new_tokens=5)
        assert tok.decode(gen[0].tolist(), skip_special_tokens=True) == by_key[(c.length, c.depth, c.trial)]
    model = cm.unwrap()
    full = run_full(model, hay, cases, 5, chunk=128)
    for c, t in zip(sorted(cases, key=lambda c: c.needle_at), full):
        ref = model.generate(torch.tensor([c.ids(hay)]), max_new_tokens=5, do_sample=False, pad_token_id=0)
        assert tok.decode(ref[0, len(c.ids(hay)):].tolist(), skip_special_tokens=True) == t.answer
        assert (t.length, t.depth, t.trial) == (c.length, c.depth, c.trial)


def tiny_llama_for(tok, max_pos: int = 1024):
    from tests.conftest import tiny_llama

    return tiny_llama(vocab=len(tok), max_pos=max_pos)


def test_cli_prints_tables_and_writes_json(tmp_path, capsys):
    folder = tiny_model_folder(tmp_path / "model", max_pos=1024)
    out = tmp_path / "out"
    argv = ["passkey", "--model", str(folder), "--lengths", "300,1100", "--depths", "10,90", "--trials", "2",
            "--window", "64", "--slots", "32,64", "--read-top-k", "4", "--strategies", "window,camelot,full",
            "--max-new-tokens", "4", "--out", str(out), "--no-progress"]
    assert main(argv) == 0
    text = capsys.readouterr().out
    assert "| window | " in text and "300@10" in text
    assert "full: lengths 1100 exceed the model's 1024 positions" in text  # run where it fits, noted where not
    data = json.loads((out / "passkey.json").read_text())
    runs = {r["label"]: r for r in data["runs"]}
    # the default's tail: window + tail = sinks + slots (none beside 32 slots and a 64-token window)
    assert set(runs) == {"window", "camelot slots=32 sink=4 threshold=0.95 read_top_k=4 count_bias=0.7",
                         "camelot slots=64 recent=4 sink=4 threshold=0.95 read_top_k=4 count_bias=0.7", "full"}
    assert not runs["full"]["skipped"] and {t["length"] for t in runs["full"]["trials"]} == {300}
    trials = runs["window"]["trials"]
    assert len(trials) == 2 * 2 * 2 and all(set(t) >= {"key", "answer", "correct", "seconds"} for t in trials)
    keys = [[t["key"] for t in r["trials"]] for r in data["runs"] if r["label"] != "full"]
    assert all(sorted(k) == sorted(keys[0]) for k in keys)  # every run gets the same keys
    assert runs["window"]["accuracy"] == sum(t["correct"] for t in trials) / len(trials)


@pytest.mark.parametrize("argv, needle", [
    (["passkey", "--depths", "150"], "percentages"),
    (["passkey", "--lengths", "2x"], "--lengths"),
    (["passkey", "--strategies", "magic"], "unknown strategy"),
    (["passkey", "--trials", "0"], "--trials"),
])
def test_bad_arguments_fail_in_one_line(argv, needle, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert needle in err and len(err.strip().splitlines()) == 1
