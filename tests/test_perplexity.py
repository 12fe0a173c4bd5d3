"""The perplexity harness (`camelot ppl`) on a tiny random llama: fair comparisons (same tokens
for every strategy), exact baselines (`full` = a plain HF forward, `window` = independent
segments), the CLI end to end, and clean errors for bad input."""

from __future__ import annotations

import json
import math

import pytest
import torch
from camelot.eval.perplexity import Sweep, evaluate, parse_layers, plan_runs
from torch.nn.functional import cross_entropy

from camelot.cli import UserError, main
from camelot.documents import Document, load_documents
from tests.conftest import tiny_llama

ALL = ("window", "recurrent", "sliding", "knn", "camelot", "full")


def _docs(lengths: tuple[int, ...], vocab: int = 101, seed: int = 1) -> list[Document]:
    g = torch.Generator().manual_seed(seed)
    return [Document(f"doc{i}", "", torch.randint(0, vocab, (n,), generator=g)) for i, n in enumerate(lengths)]


def _by_strategy(results) -> dict[str, list]:
    out: dict[str, list] = {}
    for r in results:
        out.setdefault(r.spec.strategy, []).append(r)
    return out


def test_plan_multiplies_only_memory_settings():
    sweep = Sweep(strategies=ALL, windows=(16, 32), slots=(32, 64), thresholds=(0.5, 0.9), top_ks=(1, 2),
                  knn_top_ks=(1, 2), count_biases=(False, True), recents=(0, 8))
    runs = _by_strategy_specs(plan_runs(sweep))
    assert len(runs["window"]) == len(runs["recurrent"]) == 2  # once per window
    assert len(runs["sliding"]) == 2 * 4  # windows x budgets (slots + recent)
    assert len(runs["knn"]) == 2 * 2 * 2  # windows x top_k x recent
    assert len(runs["camelot"]) == 2 * 2 * 2 * 2 * 2 * 2  # windows x slots x recent x threshold x top_k x bias
    assert len(runs["full"]) == 1
    assert {s.config.slots for s in runs["sliding"]} == {32, 40, 64, 72}  # the budget camelot has
    swept = _by_strategy_specs(plan_runs(Sweep(strategies=("window", "camelot"), top_ks=(2,),
                                               retrieves=("query", "group"))))
    assert [s.config.retrieve for s in swept["camelot"]] == ["query", "group"] and len(swept["window"]) == 1
    assert [s.label.split()[-1] for s in swept["camelot"]] == ["retrieve=query", "retrieve=group"]


def test_write_rule_flags_reach_the_camelot_runs_and_name_them():
    import argparse

    from camelot.eval.plan import add_sweep_args, sweep_from_args

    p = argparse.ArgumentParser()
    add_sweep_args(p)
    args = p.parse_args(["--strategies", "sliding,camelot", "--span-reserve", "0,64", "--importance", "attention",
                         "--span", "16", "--value-threshold", "0.5", "--reserve", "none"])
    runs = _by_strategy_specs(plan_runs(sweep_from_args(args)))
    cam = runs["camelot"]
    assert [(s.config.span_reserve, s.config.importance, s.config.span) for s in cam] == [(0, "attention", 16),
                                                                                         (64, "attention", 16)]
    assert "span_reserve=64" in cam[1].label and "importance=attention" in cam[1].label
    assert cam[0].config.value_threshold == 0.5 and cam[0].config.reserve is None  # `float | None` fields parsed
    with pytest.raises(UserError, match="or None"):
        sweep_from_args(p.parse_args(["--reserve", "many"]))
    assert "evict" not in cam[1].label  # a rule setting left at its default is not named
    assert len(runs["sliding"]) == 1  # the rule multiplies camelot's runs only


def test_every_sweepable_memory_flag_reaches_the_camelot_runs():
    """A flag the parser accepts but the plan drops runs the default silently (--surprise-from did,
    2026-12-07): each field add_sweep_args offers must be a Sweep axis or a write field."""
    import argparse
    from dataclasses import fields

    from camelot.eval.plan import add_sweep_args, sweep_from_args

    from camelot.config import WRITE_FIELDS, CamelotConfig

    p = argparse.ArgumentParser()
    add_sweep_args(p)
    flags = {f.name for f in fields(CamelotConfig) if hasattr(p.parse_args([]), f.name)}
    axes = {"window", "slots", "threshold", "read_top_k", "recent", "sink", "count_bias", "count_mode", "count_cap",
            "memory_distance", "placement", "retrieve", "layers", "search", "write_mode", "block_size", "repr_topk"}
    assert flags - axes - set(WRITE_FIELDS) == set()
    runs = _by_strategy_specs(plan_runs(sweep_from_args(p.parse_args(
        ["--strategies", "sliding,camelot", "--surprise-from", "memory,window"]))))
    assert [s.config.surprise_from for s in runs["camelot"]] == ["memory", "window"]
    assert "surprise_from=window" in runs["camelot"][1].label and len(runs["sliding"]) == 1


def test_count_mode_flag_reaches_the_camelot_runs_and_names_them():
    import argparse

    from camelot.eval.plan import add_sweep_args, sweep_from_args

    p = argparse.ArgumentParser()
    add_sweep_args(p)
    runs = _by_strategy_specs(plan_runs(sweep_from_args(p.parse_args(
        ["--strategies", "camelot", "--count-mode", "relative,absolute"]))))["camelot"]
    assert [s.config.count_mode for s in runs] == ["relative", "absolute"]
    assert "count_mode=absolute" in runs[1].label
    runs = _by_strategy_specs(plan_runs(sweep_from_args(p.parse_args(
        ["--strategies", "camelot", "--count-mode", "absolute", "--count-cap", "32"]))))["camelot"]
    assert [s.config.count_cap for s in runs] == [32.0] and "count_cap=32" in runs[0].label
    one = _by_strategy_specs(plan_runs(sweep_from_args(p.parse_args(["--strategies", "camelot"]))))["camelot"]
    assert "count_mode" not in one[0].label and "count_cap" not in one[0].label  # defaults, not swept: not named


def test_the_recall_strategy_runs_the_recall_preset_beside_camelot_and_rule_flags_still_apply():
    import argparse

    from camelot.eval.plan import add_sweep_args, sweep_from_args

    from camelot.config import CamelotConfig

    p = argparse.ArgumentParser()
    add_sweep_args(p)
    runs = _by_strategy_specs(plan_runs(sweep_from_args(p.parse_args(
        ["--strategies", "camelot,camelot-recall", "--slots", "380,892", "--window", "512"]))))
    assert [s.config.span_reserve for s in runs["camelot"]] == [126, 297]  # the default write's third
    assert [s.config for s in runs["camelot-recall"]] == [CamelotConfig.recall(slots=n, window=512) for n in (380, 892)]
    assert runs["camelot-recall"][0].config.strategy == "camelot"
    assert runs["camelot-recall"][1].label.startswith("camelot-recall slots=892")
    moved = _by_strategy_specs(plan_runs(sweep_from_args(p.parse_args(
        ["--strategies", "camelot-recall", "--slots", "892", "--span-follow", "2"]))))["camelot-recall"][0]
    assert (moved.config.span_follow, moved.config.span_reserve) == (2, 764)  # a flag moved off its default wins
    balanced = _by_strategy_specs(plan_runs(sweep_from_args(p.parse_args(
        ["--strategies", "sliding,camelot-balanced", "--slots", "252", "--recent", "256"]))))
    assert balanced["camelot-balanced"][0].config == CamelotConfig.recall("balanced", slots=252, recent=256)
    assert balanced["camelot-balanced"][0].config.span_reserve == 84
    assert [s.config.slots for s in balanced["sliding"]] == [508]  # sinks + 508 = camelot's 4 + 252 + 256
    old = _by_strategy_specs(plan_runs(sweep_from_args(p.parse_args(
        ["--strategies", "sliding,camelot,camelot-consolidating", "--slots", "380"]))))
    assert old["camelot-consolidating"][0].config == CamelotConfig.consolidating(slots=380)
    assert old["camelot"][0].config == CamelotConfig(slots=380)  # tail 256: the default write's (380 + 4 - 128)
    # sliding holds what each camelot run holds besides the sinks: 380 + 128 and 380 + 256
    assert [s.config.slots for s in old["sliding"]] == [508, 636]
    alone = _by_strategy_specs(plan_runs(sweep_from_args(p.parse_args(["--strategies", "sliding", "--slots", "252"]))))
    assert [s.config.slots for s in alone["sliding"]] == [380]  # no camelot run: the default write's budget (252 + 128)
    # infllm shares what camelot holds besides the sinks between its local window (128) and its blocks
    blocks = _by_strategy_specs(plan_runs(sweep_from_args(p.parse_args(
        ["--strategies", "infllm,camelot", "--slots", "1084"]))))["infllm"]
    assert [(s.config.slots, s.config.recent) for s in blocks] == [(1920, 128)]  # 1084 + 960 - 128: 15 blocks
    assert balanced["sliding"][0].config.slots == 252 + 256  # the same budget


def test_ppl_and_passkey_take_one_budget_for_every_strategy():
    """`--budget 512`: every strategy holds 512 entries per head besides the segment, each camelot
    write split by its own tail; without it --slots sizes the runs as before."""
    from camelot.eval.passkey import SLOTS_DEFAULT
    from camelot.eval.plan import sweep_at_budget

    from camelot.cli import build_parser
    from camelot.config import CamelotConfig

    every = "window,sliding,knn,infllm,camelot,camelot-consolidating,full"
    args = build_parser().parse_args(["ppl", "--data", "x", "--budget", "512", "--strategies", every])
    runs = {s.strategy: s.config for s in plan_runs(sweep_at_budget(args, str(CamelotConfig.slots)))}
    assert (runs["camelot"].slots, runs["camelot"].recent) == (316, 192)  # window + tail = sinks + slots
    assert (runs["camelot-consolidating"].slots, runs["camelot-consolidating"].recent) == (380, 128)
    assert runs["sliding"].slots + runs["sliding"].sink == 512
    assert (runs["infllm"].slots, runs["infllm"].recent) == (384, 128)  # 3 whole blocks of 128
    assert all(c.slots + c.recent + c.sink == 512 for s, c in runs.items() if s.startswith("camelot"))
    swept = build_parser().parse_args(["ppl", "--data", "x", "--budget", "512,2048", "--strategies", "sliding,camelot"])
    assert sorted(s.config.slots for s in plan_runs(sweep_at_budget(swept, str(CamelotConfig.slots)))
                  if s.strategy == "camelot") == [316, 1084]
    plain = build_parser().parse_args(["ppl", "--data", "x", "--strategies", "camelot"])
    assert [s.config.slots for s in plan_runs(sweep_at_budget(plain, str(CamelotConfig.slots)))] == [1084]
    key = build_parser().parse_args(["passkey", "--budget", "1024", "--strategies", "sliding,camelot"])
    keyed = {s.strategy: s.config for s in plan_runs(sweep_at_budget(key, SLOTS_DEFAULT))}
    assert keyed["camelot"].slots + keyed["camelot"].recent + keyed["camelot"].sink == 1024
    assert keyed["sliding"].slots + keyed["sliding"].sink == 1024


def _by_strategy_specs(specs) -> dict[str, list]:
    out: dict[str, list] = {}
    for s in specs:
        out.setdefault(s.strategy, []).append(s)
    return out


def test_plan_rejects_bad_settings_before_running():
    with pytest.raises(UserError, match="top_k"):
        plan_runs(Sweep(strategies=("camelot",), slots=(2,), top_ks=(4,)))
    with pytest.raises(UserError, match="unknown strategy"):
        plan_runs(Sweep(strategies=("window", "magic")))
    with pytest.raises(UserError, match="retrieve"):
        plan_runs(Sweep(strategies=("camelot",), retrieves=("nearest",)))
    assert parse_layers("default/all/0-2,5") == (None, "all", [0, 1, 2, 5])
    with pytest.raises(UserError, match="layer list"):
        parse_layers("a-b")


def test_every_strategy_scores_the_same_tokens():
    model = tiny_llama()
    docs = _docs((70, 45))
    sweep = Sweep(strategies=ALL, windows=(16,), slots=(32,), thresholds=(0.5,), top_ks=(2,))
    results = evaluate(model, docs, plan_runs(sweep), bucket_size=20, progress=False)
    by = _by_strategy(results)
    assert set(by) == set(ALL)
    expected = sum(d.n_tokens - 1 for d in docs)
    for r in results:
        assert r.skipped is None
        assert r.tokens == expected, r.spec.label
        assert sum(r.bucket_tokens) == expected
        assert math.isfinite(r.ppl) and r.ppl > 1
    # memory must change something on a 70-token doc read in 16-token segments
    assert by["camelot"][0].ppl != by["window"][0].ppl
    assert model.config._attn_implementation != "camelot"  # unwrapped afterwards


def test_full_equals_plain_forward_loss():
    model = tiny_llama()
    docs = _docs((90,))
    res = evaluate(model, docs, plan_runs(Sweep(strategies=("full",))), progress=False)[0]
    with torch.no_grad():
        ref = model(input_ids=docs[0].ids[None], labels=docs[0].ids[None]).loss
    assert res.tokens == 89
    assert res.nll_sum / res.tokens == pytest.approx(float(ref), rel=1e-5)


@pytest.mark.parametrize("family", ["llama", "mistral", "gemma3_text", "gpt2"])
def test_full_in_chunks_through_the_cache_equals_one_forward(family):
    """`full` feeds long documents in chunks through the model's KV cache (one 16k-token forward
    made 10 GB of logits for Qwen and was killed); per token it must equal one plain forward,
    sliding-window and absolute-position families included."""
    from camelot.adapters.testing import tiny_family
    from camelot.eval.perplexity import token_nll_full

    model = tiny_family(family).build()
    ids = torch.randint(3, 64, (70,), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        whole = token_nll_full(model, ids, chunk=10**6)
        chunked = token_nll_full(model, ids, chunk=16)
        ref = cross_entropy(model(input_ids=ids[None]).logits[0, :-1], ids[1:], reduction="none")
    torch.testing.assert_close(whole, ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(chunked, ref, rtol=1e-4, atol=1e-4)
    assert chunked.shape == (69,)


def test_full_is_skipped_when_the_document_does_not_fit():
    model = tiny_llama(max_pos=64)
    res = evaluate(model, _docs((80,)), plan_runs(Sweep(strategies=("full",))), progress=False)[0]
    assert res.skipped and "64 positions" in res.skipped and res.tokens == 0


def test_window_equals_independent_segment_losses():
    """Reference: the unwrapped model on each segment alone. The boundary token (first token of
    the next segment) is predicted by the last position of the previous segment, so segment
    [a, a+w) scores targets a+1 .. a+w and every one of the N-1 targets is counted once."""
    model = tiny_llama()
    docs = _docs((75,))
    w, ids = 16, docs[0].ids
    res = evaluate(model, docs, plan_runs(Sweep(strategies=("window",), windows=(w,))), progress=False)[0]
    total, count = 0.0, 0
    with torch.no_grad():
        for a in range(0, ids.numel(), w):
            seg = ids[a : a + w]
            tgt = ids[a + 1 : a + w + 1]
            logits = model(input_ids=seg[None]).logits[0, : tgt.numel()]
            total += float(cross_entropy(logits, tgt, reduction="sum"))
            count += tgt.numel()
    assert count == res.tokens == 74
    assert res.nll_sum / res.tokens == pytest.approx(total / count, rel=1e-5)


# ---------------------------------------------------------------------------- data
def test_data_sources(tmp_path):
    folder = tmp_path / "docs"
    folder.mkdir()
    (folder / "b.txt").write_text("second document", encoding="utf-8")
    (folder / "a.txt").write_text("first document", encoding="utf-8")
    (folder / "notes.md").write_text("ignored", encoding="utf-8")
    assert [d.text for d in load_documents(str(folder))] == ["first document", "second document"]
    assert len(load_documents(str(folder), max_docs=1)) == 1

    rows = tmp_path / "rows.jsonl"
    rows.write_text('{"body": "one"}\n{"body": "two"}\n', encoding="utf-8")
    assert [d.text for d in load_documents(str(rows), text_field="body")] == ["one", "two"]
    with pytest.raises(UserError, match="no field 'text'.*body"):
        load_documents(str(rows))

    from datasets import Dataset, DatasetDict

    saved = tmp_path / "saved"
    DatasetDict({"test": Dataset.from_dict({"text": ["x y", "z"]})}).save_to_disk(str(saved))
    assert [d.text for d in load_documents(str(saved))] == ["x y", "z"]
    pq = tmp_path / "rows.parquet"
    Dataset.from_dict({"text": ["p", "q", "r"]}).to_parquet(str(pq))
    assert len(load_documents(str(pq), max_docs=2)) == 2

    kennedy = load_documents("builtin:state_union_1961_kennedy")
    assert len(kennedy) == 1 and len(kennedy[0].text) > 10_000


# ---------------------------------------------------------------------------- CLI
@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory):
    """A tiny llama saved with a character-level tokenizer, loadable by `--model PATH`."""
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<s>": 1}
    for c in [chr(i) for i in range(32, 127)] + ["\n"]:
        vocab[c] = len(vocab)
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Split(Regex("."), "isolated")
    path = tmp_path_factory.mktemp("tiny_model")
    PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="<unk>", bos_token="<s>").save_pretrained(path)
    tiny_llama(vocab=len(vocab)).save_pretrained(path)
    return path


def test_cli_end_to_end(tiny_model_dir, tmp_path, capsys, long_text):
    text = tmp_path / "doc.txt"
    text.write_text(long_text[:400], encoding="utf-8")
    out = tmp_path / "out"
    rc = main(["ppl", "--model", str(tiny_model_dir), "--data", str(text), "--window", "16", "--slots", "16,32",
               "--threshold", "0.5,0.9", "--read-top-k", "2", "--count-bias", "off", "--max-tokens", "300",
               "--bucket-size", "50",
               "--out", str(out), "--no-progress", "--device", "cpu"])
    assert rc == 0
    table = capsys.readouterr().out
    row = "| camelot | 16 | slots=32 recent=20 sink=4 threshold=0.9 read_top_k=2 count_bias=off |"
    assert "| strategy |" in table and row in table
    payload = json.loads((out / "results.json").read_text())
    runs = payload["runs"]
    assert {r["strategy"] for r in runs} == set(ALL)
    assert len({r["tokens"] for r in runs}) == 1 and runs[0]["tokens"] == 299
    assert payload["config"]["documents"] == [{"name": "doc.txt", "tokens": 300}]
    window = next(r for r in runs if r["strategy"] == "window")
    assert window["compare"][0]["delta_pct"] == pytest.approx(0.0)
    # every (run, document) was logged as it finished, with the figures the report has
    partial = [json.loads(line) for line in (out / "partial.jsonl").read_text().splitlines()]
    assert len(partial) == len(runs) and all(p["name"] == "doc.txt" and p["tokens"] == 299 for p in partial)
    assert sorted(p["ppl"] for p in partial) == pytest.approx(sorted(r["ppl"] for r in runs))
    for png in ("ppl_by_position_w16.png", "ppl_vs_slots_w16.png", "ppl_vs_threshold_w16.png"):
        assert (out / png).read_bytes()[:4] == b"\x89PNG"


@pytest.mark.parametrize("case, message", [
    ("missing", "data not found"),
    ("empty_folder", "no .txt files"),
    ("binary", "binary"),
    ("latin1", "not UTF-8"),
    ("one_token", "at least 2"),
    ("builtin", "unknown builtin"),
    ("bad_window", "not a valid int"),
])
def test_bad_input_gives_one_clean_line(case, message, tiny_model_dir, tmp_path, capsys):
    data = tmp_path / "x.txt"
    extra: list[str] = []
    if case == "missing":
        data = tmp_path / "nope.txt"
    elif case == "empty_folder":
        data = tmp_path / "empty"
        data.mkdir()
    elif case == "binary":
        data.write_bytes(b"\x7fELF\x00\x00\x01")
    elif case == "latin1":
        data.write_bytes("caf\xe9 au lait".encode("latin-1"))
    elif case == "one_token":
        data.write_text("a", encoding="utf-8")
    elif case == "builtin":
        data = "builtin:nothing"
    elif case == "bad_window":
        data.write_text("hello world", encoding="utf-8")
        extra = ["--window", "12x"]
    rc = main(["ppl", "--model", str(tiny_model_dir), "--data", str(data), "--no-progress",
               "--out", str(tmp_path / "o"), *extra])
    err = capsys.readouterr().err.strip()
    assert rc == 2
    assert err.startswith("camelot ppl: error:") and message in err
    assert len(err.splitlines()) == 1 and "Traceback" not in err
