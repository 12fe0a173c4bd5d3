"""Data-parallel perplexity (eval/parallel.py): documents are dealt out whole and balanced, the
gathered token-weighted result equals the single-process one, and `accelerate launch` with two
CPU processes gives the same numbers as a plain run; memory state follows its layer's device."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from camelot.eval import parallel
from camelot.eval.perplexity import Sweep, evaluate, plan_runs

import camelot
from camelot.cli import UserError, main
from camelot.documents import Document
from tests.conftest import bare, tiny_llama


def _docs(lengths: tuple[int, ...], vocab: int = 101) -> list[Document]:
    g = torch.Generator().manual_seed(7)
    return [Document(f"doc{i}", "", torch.randint(0, vocab, (n,), generator=g)) for i, n in enumerate(lengths)]


def test_assign_deals_whole_documents_balanced_and_deterministic():
    lengths = [500, 90, 300, 310, 20, 260]
    parts = parallel.assign(lengths, 2)
    assert sorted(i for p in parts for i in p) == list(range(6))  # each document exactly once
    loads = [sum(lengths[i] for i in p) for p in parts]
    assert abs(loads[0] - loads[1]) <= max(lengths)
    assert parts == parallel.assign(lengths, 2)
    assert all(p == sorted(p) for p in parts)
    assert parallel.shard(_docs((5, 6)), 0, 1)[1].name == "doc1"  # one process: everything
    with pytest.raises(UserError, match="at least one"):
        parallel.shard(_docs((5,)), 0, 2)


def test_merged_shards_equal_one_process():
    model = tiny_llama()
    docs = _docs((70, 33, 120, 41))
    specs = plan_runs(Sweep(strategies=("window", "camelot", "full"), windows=(16,), slots=(16,)))
    torch.set_num_threads(1)
    one = evaluate(model, docs, specs, bucket_size=25, progress=False)
    parts = [evaluate(model, parallel.shard(docs, r, 2), specs, bucket_size=25, progress=False) for r in range(2)]
    merged = parallel.merge(parts, [d.name for d in docs])
    for a, b in zip(one, merged):
        assert a.tokens == b.tokens == sum(d.ids.numel() - 1 for d in docs)
        assert a.nll_sum == b.nll_sum  # same additions in the same order: bitwise equal
        assert [d["name"] for d in b.docs] == [d.name for d in docs]
        assert b.bucket_tokens == a.bucket_tokens
        assert b.bucket_ppl() == pytest.approx(a.bucket_ppl(), rel=1e-12)


def test_outside_a_launcher_everything_is_local(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert parallel.world() == (0, 1) and parallel.is_main_process()
    res = [object()]
    assert parallel.gather(res, []) is res


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory) -> Path:
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


def test_accelerate_launch_two_cpu_processes_equals_single(tiny_model_dir, tmp_path, long_text):
    docs = tmp_path / "docs"
    docs.mkdir()
    for i, n in enumerate((300, 120, 200)):
        (docs / f"d{i}.txt").write_text(long_text[i * 1000 : i * 1000 + n], encoding="utf-8")
    args = ["ppl", "--model", str(tiny_model_dir), "--data", str(docs), "--strategies", "window,camelot,full",
            "--window", "16", "--slots", "32", "--no-progress", "--device", "cpu"]
    torch.set_num_threads(1)
    assert main([*args, "--out", str(tmp_path / "one")]) == 0
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    env.pop("WORLD_SIZE", None)
    proc = subprocess.run(
        [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "2", "--cpu", "--num_machines", "1",
         "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "camelot", *args, "--out", str(tmp_path / "two")],
        env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("| strategy |") == 1  # only the main process reports
    one = json.loads((tmp_path / "one" / "results.json").read_text())["runs"]
    two = json.loads((tmp_path / "two" / "results.json").read_text())["runs"]
    assert [r["strategy"] for r in two] == ["window", "camelot", "full"]
    for a, b in zip(one, two):
        assert b["tokens"] == a["tokens"] == 617
        assert b["ppl"] == a["ppl"]
        assert [d["ppl"] for d in b["documents"]] == [d["ppl"] for d in a["documents"]]


def test_memory_is_created_on_the_device_of_the_incoming_keys():
    # device_map="auto" puts layers on different devices; each layer's state must be made where its
    # keys arrive. On CPU we check the rule itself: state follows the key tensor's device and dtype
    # settings, never a global default device.
    model = tiny_llama()
    cm = camelot.wrap(model, bare(window=8, slots=8, memory_dtype="bfloat16"))
    try:
        cm.feed(torch.randint(0, 101, (1, 20)), progress=False)
        for rt in cm.runtimes:
            layer_dev = next(cm.modules[rt.layer_idx].parameters()).device
            assert rt.state.memory.keys.device == layer_dev and rt.state.memory.keys.dtype == torch.bfloat16
            assert rt.state.memory.counts.device == rt.state.memory.ages.device == layer_dev
    finally:
        cm.unwrap()
