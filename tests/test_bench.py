"""`camelot bench` on a tiny random model: every table comes out with the rows it promises, the
recall probe measures what it says, and one camelot segment has no host syncs in camelot's own
code (not a timing test: no assertion on speed)."""

from __future__ import annotations

import json

import pytest
import torch
from camelot.eval import bench

import camelot
from camelot.cli import main
from camelot.config import CamelotConfig
from camelot.search import TorchExactSearch
from tests.test_parallel import tiny_model_dir  # noqa: F401  (fixture)


def test_bench_cli_prints_every_table(tiny_model_dir, tmp_path, capsys, long_text):  # noqa: F811
    text = tmp_path / "t.txt"
    text.write_text(long_text[:600], encoding="utf-8")
    out = tmp_path / "bench.json"
    rc = main(["bench", "--model", str(tiny_model_dir), "--data", str(text), "--window", "16", "--read-top-k", "2",
               "--recent", "0", "--sink", "0",
               "--tokens", "64", "--rounds", "2", "--slots", "16,32", "--backends", "torch,faiss,faiss-ivf",
               "--lengths", "48,96", "--knn-max", "48", "--full-max", "96", "--no-progress", "--json", str(out),
               "--decode-lengths", "40", "--decode-tokens", "3"])
    assert rc == 0
    printed = capsys.readouterr().out
    for head in ("## Speed", "## Growth", "## Search recall", "## Profile", "## The default config", "## Decoding"):
        assert head in printed
    report = json.loads(out.read_text())
    assert f"CPU top-k: {report['top_k_selection']}" in printed  # which selection the figures are from
    labels = [r["label"] for r in report["speed"]]
    assert labels[0] == "window" and labels[-1] == "window (again)"
    assert "camelot slots=32 faiss-ivf" in labels and "knn faiss" in labels and "recurrent" in labels
    assert "infllm 1x128" in labels
    assert "camelot slots=32 torch by group" in labels and "camelot slots=32 faiss by group" in labels
    # two interleaved rounds pooled: every row holds both rounds' segments
    assert all(r["segments"] == 8 and r["tokens"] == 128 and len(r["seg_times"]) == 8 for r in report["speed"])
    # a full bank of 32 slots x kv heads x layers is what camelot holds, whatever the document
    held = {r["label"]: r["state_bytes"] for r in report["speed"]}
    # the default config against window-only and against sliding with the same KV budget
    search = CamelotConfig().search  # bfloat16 scores where this CPU has them natively; then the exact row too
    exact = [] if search == "torch" else ["camelot defaults, search=torch (exact)"]
    assert [r["label"] for r in report["defaults"]] == [  # at this test's window 16: the tail 1084 + 4 - 16
        "window", f"camelot defaults (1084 slots + 1072 tail, search={search})", *exact,
        "camelot consolidating (2028 slots + 128 tail; the default until 2026-12-06)", "sliding 2156 (same budget)"]
    assert "cannot cost less than" in printed and 0 < report["read_share"] < 10
    (dec,) = report["decode"]
    assert dec["tokens_read"] == 40 and dec["camelot_tps"] > 0 and dec["hf_tps"] > 0 and dec["full_first_s"] > 0
    # 2 layers x 2 KV heads x (slots + 1 scratch) x (16-dim fp32 key + value, int64 count + age)
    assert held["camelot slots=32 torch"] == 2 * 2 * 33 * (2 * 16 * 4 + 2 * 8)
    growth = {(r["label"], r["tokens"]) for r in report["growth"]}
    assert ("camelot", 96) in growth and ("knn", 48) in growth and ("knn", 96) not in growth
    assert ("full", 96) in growth
    assert all(r["peak_rss"] > 0 for r in report["growth"])
    assert [(r["search"], r["slots"]) for r in report["recall"]] == [("faiss-ivf", 16), ("faiss-ivf", 32)]
    assert all(0.0 <= r["extra"]["recall"] <= 1.0 for r in report["recall"])


def test_bench_rejects_bad_options(tiny_model_dir, capsys):  # noqa: F811
    rc = main(["bench", "--model", str(tiny_model_dir), "--backends", "torch,annoy"])
    assert rc == 2 and "annoy" in capsys.readouterr().err
    rc = main(["bench", "--model", str(tiny_model_dir), "--rounds", "0"])
    assert rc == 2 and "--rounds" in capsys.readouterr().err
    rc = main(["bench", "--model", str(tiny_model_dir), "--slots", "12x"])
    assert rc == 2 and "--slots" in capsys.readouterr().err


def test_recall_probe_counts_misses():
    from camelot.search import SearchBase

    class Wrong(SearchBase):
        name = "wrong"

        def topk(self, q, keys, valid, k):  # always slots 0..k-1
            idx = torch.arange(k).expand(*q.shape[:3], k)
            return torch.zeros(idx.shape), idx

    keys = torch.eye(8)[None, None]  # slot i answers query e_i
    q = torch.eye(8)[None, None]
    valid = torch.ones(1, 1, 8, dtype=torch.bool)
    probe = bench.RecallProbe(Wrong())
    probe.topk(q, keys, valid, 1)
    assert probe.recall == pytest.approx(1 / 8)  # only query e_0 is answered right
    exact = bench.RecallProbe(TorchExactSearch())
    exact.topk(q, keys, valid, 1)
    assert exact.recall == 1.0


def test_one_camelot_segment_has_no_host_sync_in_camelot_code(monkeypatch):
    from camelot.memory import reserve_write
    from tests.conftest import tiny_llama

    # the fixed width the displaced reserve tokens have on a GPU: trimmed to what was displaced
    # (CPU), the op count follows the data (empty tensors dispatch fewer ops), not the window
    monkeypatch.setattr(reserve_write.Spill, "trim", False)
    monkeypatch.setattr(reserve_write.LastChoice, "share", False)  # likewise: a reused ranking is fewer ops
    for placement in ("fixed", "recency"):
        cfg = camelot.CamelotConfig(window=16, slots=32, read_top_k=2, placement=placement)
        prof = bench.profile_segment(tiny_llama(), torch.randint(0, 101, (1, 64)), cfg)
        own = [s for s in prof["sync_sites"] if "/camelot/" in s.split(", called from")[0]]
        assert own == [], own
        assert prof["aten_ops"] > 0
        # no per-token or per-head loop: op count per layer does not grow with the window
        cfg2 = cfg.replace(window=32)
        prof2 = bench.profile_segment(tiny_llama(), torch.randint(0, 101, (1, 128)), cfg2)
        assert prof2["aten_ops"] == prof["aten_ops"]


def test_fill_banks_puts_every_layer_in_its_steady_state():
    """The speed tables time a short document: a `sliding` cache it has not filled yet would
    be timed at a fraction of its budget, flattering it against a pre-filled camelot bank."""
    from camelot.eval.bench_measure import fill_banks

    from tests.conftest import tiny_llama

    model = tiny_llama()
    with camelot.wrap(model, camelot.CamelotConfig(window=16, slots=40, strategy="sliding")) as cm:
        fill_banks(cm)
        assert {rt.state.prefix.size for rt in cm.runtimes} == {40}
        cm.step(torch.randint(0, 101, (1, 16)))  # and it still runs, at full length
        assert {rt.state.prefix.size for rt in cm.runtimes} == {40}
    with camelot.wrap(model, camelot.CamelotConfig(window=16, slots=32, recent=8)) as cm:
        fill_banks(cm)
        assert {rt.state.prefix.size for rt in cm.runtimes} == {8}
        assert all(bool((rt.state.memory.counts[..., :32] > 0).all()) for rt in cm.runtimes)


def test_read_share_counts_the_reads_and_the_models_multiply_adds():
    """tiny_llama: 2 layers, 4 heads of 16 dims, hidden 64, MLP 128, vocabulary 101, by hand."""
    from camelot.eval.bench_decode import read_share

    from tests.conftest import tiny_llama

    linear = 2 * (64 * 64 + 2 * 64 * 32 + 64 * 64 + 3 * 64 * 128) + 64 * 101  # q, k+v (2 KV heads), o, MLP; head
    per_entry = 2 * 4 * 16 * 2  # layers x heads x head dim x (key, value)
    cfg = CamelotConfig(window=16, slots=24, recent=8, sink=2)
    assert read_share(tiny_llama(), cfg) == pytest.approx(per_entry * 34 / (linear + per_entry * 16))
