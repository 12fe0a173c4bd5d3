"""Search backends against exact torch search: faiss flat gives the same top-k, the approximate
indexes reach a recall bound and stay in step with in-place slot rewrites and evictions without
rebuilding, faiss-gpu falls back with a message, and a wrapped model scores the same with faiss
as with torch."""

from __future__ import annotations

import warnings

import pytest
import torch

import camelot
from camelot import faiss_search
from camelot.backends import make_backend
from camelot.faiss_search import FaissFlatSearch, FaissIndexSearch, make_faiss_backend
from camelot.search import TorchExactSearch
from tests.conftest import tiny_llama

VOCAB = 256


def _clustered(b: int, h: int, n: int, d: int, centers: int = 32, seed: int = 0) -> torch.Tensor:
    """Keys drawn around a few centres, as attention keys are (pure noise has no neighbours)."""
    g = torch.Generator().manual_seed(seed)
    c = torch.randn(b, h, centers, d, generator=g) * 3
    pick = torch.randint(0, centers, (b, h, n), generator=g)
    return c.gather(2, pick[..., None].expand(-1, -1, -1, d)) + torch.randn(b, h, n, d, generator=g)


def _recall(idx: torch.Tensor, ref: torch.Tensor) -> float:
    return (idx[..., :, None] == ref[..., None, :]).any(-1).float().mean().item()


def test_flat_matches_torch_exactly_with_empty_slots():
    g = torch.Generator().manual_seed(1)
    q = torch.randn(2, 3, 40, 16, generator=g)
    keys = torch.randn(2, 3, 100, 16, generator=g)
    valid = torch.rand(2, 3, 100, generator=g) > 0.3
    valid[1, 2, 3:] = False  # a head with fewer valid slots than k
    ref = TorchExactSearch().topk(q, keys, valid, 5)
    s, i = FaissFlatSearch().topk(q, keys, valid, 5)
    assert s.shape == i.shape == ref.indices.shape
    fin = torch.isfinite(ref.values)
    assert torch.equal(torch.isfinite(s), fin)  # empty slots come back as -inf, like torch
    assert torch.equal(i[fin], ref.indices[fin])
    torch.testing.assert_close(s[fin], ref.values[fin], rtol=1e-5, atol=1e-4)
    assert (i >= 0).all() and (i < 100).all()


def test_k_larger_than_bank_is_clipped_like_torch():
    q, keys = torch.randn(1, 1, 4, 8), torch.randn(1, 1, 3, 8)
    valid = torch.ones(1, 1, 3, dtype=torch.bool)
    for be in (FaissFlatSearch(), FaissIndexSearch("ivf"), FaissIndexSearch("hnsw")):
        s, i = be.topk(q, keys, valid, 8)
        assert s.shape == (1, 1, 4, 3)
        assert torch.equal(i.sort(-1).values, torch.arange(3).expand(1, 1, 4, 3))


@pytest.mark.parametrize("kind,bound", [("ivf", 0.9), ("hnsw", 0.9)])
def test_approximate_recall_and_incremental_updates(kind, bound):
    b, h, n, d, k = 1, 2, 2048, 32, 8
    keys = _clustered(b, h, n, d)
    valid = torch.ones(b, h, n, dtype=torch.bool)
    valid[..., 2000:] = False
    q = _clustered(b, h, 64, d, seed=5)
    be = FaissIndexSearch(kind, nprobe=16)
    _, i = be.topk(q, keys, valid, k)
    assert _recall(i, TorchExactSearch().topk(q, keys, valid, k).indices) >= bound
    rebuilds = be.stats.rebuilds

    # a segment's worth of writes: consolidation moves keys in place, eviction replaces them,
    # novel tokens fill free slots
    keys2 = keys.clone()
    keys2[..., 10:60, :] += 0.1 * torch.randn(b, h, 50, d, generator=torch.Generator().manual_seed(2))
    keys2[..., 100:140, :] = _clustered(b, h, 40, d, seed=9)
    valid2 = valid.clone()
    valid2[..., 2000:2030] = True
    keys2[..., 2000:2030, :] = _clustered(b, h, 30, d, seed=11)
    s, i = be.topk(q, keys2, valid2, k)
    ref = TorchExactSearch().topk(q, keys2, valid2, k)
    assert _recall(i, ref.indices) >= bound
    assert be.stats.rebuilds == rebuilds  # updated in place, not rebuilt
    assert be.stats.updates >= h * 120
    assert not ((i >= 2030) & torch.isfinite(s)).any()  # never an empty slot
    # a rewritten slot is found under its new key, its old key is gone
    probe = keys2[..., 120:121, :].expand(b, h, 1, d).contiguous()
    _, top = be.topk(probe, keys2, valid2, 1)
    assert (top == 120).all()


def test_ivf_is_exact_until_it_can_train():
    keys = _clustered(1, 2, 200, 16)
    valid = torch.ones(1, 2, 200, dtype=torch.bool)
    q = torch.randn(1, 2, 10, 16)
    be = FaissIndexSearch("ivf")  # nlist = sqrt(200) = 14 -> needs 546 keys to train
    _, i = be.topk(q, keys, valid, 4)
    assert be.stats.trains == 0
    assert torch.equal(i, TorchExactSearch().topk(q, keys, valid, 4).indices)


def test_index_starts_over_when_the_memory_does():
    be = FaissIndexSearch("hnsw")
    keys = torch.randn(1, 2, 50, 8)
    valid = torch.ones(1, 2, 50, dtype=torch.bool)
    be.topk(torch.randn(1, 2, 3, 8), keys, valid, 2)
    small = torch.eye(8)[:5].expand(2, 2, 5, 8).contiguous()  # other batch size, fewer slots (a reset store)
    _, i = be.topk(small[:, :, :1], small, torch.ones(2, 2, 5, dtype=torch.bool), 1)
    assert torch.equal(i[..., 0, 0], torch.zeros(2, 2, dtype=torch.long))
    assert len(be.heads) == 4


def test_faiss_gpu_falls_back_with_a_message(monkeypatch):
    monkeypatch.setattr(faiss_search, "faiss_has_gpu", lambda: False)
    monkeypatch.setattr(faiss_search, "_GPU_FALLBACK_WARNED", False)
    with pytest.warns(RuntimeWarning, match="faiss-gpu.*CPU"):
        be = make_faiss_backend("faiss-gpu")
    assert isinstance(be, FaissFlatSearch)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # said once, not once per layer
        make_faiss_backend("faiss-gpu")
    with pytest.raises(ValueError, match="unknown faiss"):
        make_faiss_backend("faiss-lsh")


def _ppl(model, search: str, **cfg) -> torch.Tensor:
    import camelot

    # Distinct tokens: repeated ones give identical layer-0 keys, and the dense torch read keeps
    # every slot tied with the k-th score while a top-k search keeps k (see docs/speed.md).
    ids = torch.randperm(VOCAB, generator=torch.Generator().manual_seed(3))[:120]
    cm = camelot.wrap(model, camelot.CamelotConfig(window=16, slots=64, threshold=0.5, search=search, **cfg))
    try:
        return cm.score(ids).token_nll
    finally:
        cm.unwrap()


@pytest.mark.parametrize("placement", ["fixed", "recency"])
def test_wrapped_model_same_perplexity_with_faiss_flat(placement):
    model = tiny_llama(vocab=VOCAB)
    for strategy in ("camelot", "knn"):
        ref = _ppl(model, "torch", strategy=strategy, read_top_k=4, placement=placement)
        got = _ppl(model, "faiss", strategy=strategy, read_top_k=4, placement=placement)
        torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4)
        assert not torch.equal(ref, _ppl(model, "torch", strategy="window"))  # memory was read


def test_exhaustive_ivf_through_the_wrapper_matches_torch():
    # nprobe >= nlist scans every list: exact, so the index path must reproduce torch's losses
    import camelot.faiss_search as fs

    model = tiny_llama(vocab=VOCAB)
    ref = _ppl(model, "torch", read_top_k=2, placement="fixed")
    orig = fs.make_faiss_backend
    try:
        fs.make_faiss_backend = lambda name: FaissIndexSearch("ivf", nlist=2, nprobe=2)
        got = _ppl(model, "faiss-ivf", read_top_k=2, placement="fixed")
    finally:
        fs.make_faiss_backend = orig
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4)
    assert make_backend("faiss-ivf").name == "faiss-ivf"


def test_bf16_candidates_get_exact_scores_and_high_recall():
    b, h, m, n, d, k = 1, 3, 64, 512, 64, 8
    keys = _clustered(b, h, n, d, seed=3)
    q = _clustered(b, h, m, d, seed=4)
    valid = torch.ones(b, h, n, dtype=torch.bool)
    valid[0, 1, 100:] = False  # fewer valid slots in one head than elsewhere
    valid[0, 2, k - 3:] = False  # and fewer than k in another
    ref = TorchExactSearch().topk(q, keys, valid, k)
    s, i = make_backend("torch-bf16").topk(q, keys, valid, k)
    assert s.shape == i.shape == ref.indices.shape
    fin = torch.isfinite(s)
    assert torch.equal(fin, torch.isfinite(ref.values))  # never an invalid slot while valid ones remain
    # the chosen slots' scores are the exact fp32 inner products, not their bf16 estimates
    chosen = keys.gather(2, i.flatten(2)[..., None].expand(-1, -1, -1, d)).view(b, h, m, k, d)
    exact = (chosen * q[..., None, :]).sum(-1)
    torch.testing.assert_close(s[fin], exact[fin], rtol=1e-6, atol=1e-5)
    assert _recall(i[:, :2], ref.indices[:, :2]) >= 0.9


def test_bf16_nearest_slot_write_matches_fp32_where_neighbours_are_clear():
    from camelot.memory import SlotBank

    g = torch.Generator().manual_seed(5)
    centres = torch.nn.functional.normalize(torch.randn(1, 2, 16, 32, generator=g), dim=-1)
    banks = [SlotBank(24, 0.9), SlotBank(24, 0.9, search_dtype=torch.bfloat16)]
    for bank in banks:  # one slot per centre, so every later token has one clear nearest slot
        bank.write(centres, torch.zeros(1, 2, 16, 8))
    for step in range(6):
        pick = torch.randint(0, 16, (1, 2, 20), generator=g)
        k = centres.gather(2, pick[..., None].expand(-1, -1, -1, 32)) + 0.01 * torch.randn(1, 2, 20, 32, generator=g)
        if step == 3:
            k[0, 0, 0] = torch.randn(32, generator=g)  # a novel token
        v = torch.randn(1, 2, 20, 8, generator=g)
        for bank in banks:
            bank.write(k, v)
    ref, got = banks[0].state_dict(), banks[1].state_dict()
    assert int(ref["counts"].max()) > 1 and bool((ref["counts"] == 1).any())  # merges and new slots happened
    for name in ("counts", "ages"):
        assert torch.equal(got[name], ref[name])
    torch.testing.assert_close(got["keys"], ref["keys"])
    torch.testing.assert_close(got["values"], ref["values"])


def test_bf16_search_through_the_wrapper_is_close_to_exact():
    model = tiny_llama(vocab=VOCAB)
    ref = _ppl(model, "torch", read_top_k=4)
    got = _ppl(model, "torch-bf16", read_top_k=4)
    assert (got - ref).abs().mean() < 0.05 * ref.abs().mean()
    assert not torch.equal(ref, _ppl(model, "torch", strategy="window"))
    cm = camelot.wrap(model, camelot.CamelotConfig(window=16, slots=64, read_top_k=4, search="torch-bf16"))
    try:  # the write's nearest-slot search follows the read backend
        assert {rt.state.memory.search_dtype for rt in cm.runtimes if rt.state.memory is not None} == {torch.bfloat16}
    finally:
        cm.unwrap()
    assert camelot.CamelotConfig(search="torch-bf16", read_top_k=None).read_top_k is None  # bf16 scores of every slot
    with pytest.raises(ValueError, match="read_top_k=None"):
        camelot.CamelotConfig(search="faiss", read_top_k=None)  # a backend that only answers a top-k
