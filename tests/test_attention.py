"""The read path: local, prefix and memory logits in one exact softmax."""

from __future__ import annotations

import pytest
import torch

from camelot.attention import LayerRuntime
from camelot.memory import RawWindow, TokenStore
from camelot.rope import RopeSpec, place_keys
from camelot.search import TorchExactSearch


def _spec(d=8):
    return RopeSpec(1.0 / (100 ** (torch.arange(0, d, 2).float() / d)))


def _manual(q, k_all, v_all, mask, scaling):
    s = (q @ k_all.transpose(-1, -2)) * scaling
    s = s.masked_fill(~mask, float("-inf"))
    return torch.softmax(s, -1) @ v_all


def test_memory_read_is_exact_attention_over_placed_slots():
    torch.manual_seed(0)
    spec, d, dist, m, n_mem = _spec(), 8, 5, 4, 6
    mem = TokenStore(torch.float32)
    k_raw, v_mem = torch.randn(1, 1, n_mem, d), torch.randn(1, 1, n_mem, d)
    mem.write(k_raw, v_mem)
    rt = LayerRuntime.build(0, spec, mem, None, TorchExactSearch(), top_k=n_mem, distance=dist, count_bias=False)
    q_raw, k_loc, v_loc = torch.randn(1, 2, m, d), torch.randn(1, 1, m, d), torch.randn(1, 1, m, d)
    pos = torch.arange(m)
    q, k = place_keys(spec, q_raw, pos), place_keys(spec, k_loc, pos)
    out = rt.attend(q, k, v_loc, scaling=0.3, softcap=None, sliding_window=None)  # [1, m, 2, d]
    k_all = torch.cat([k, place_keys(spec, k_raw, torch.full((n_mem,), -dist))], 2)
    v_all = torch.cat([v_loc, v_mem], 2)
    mask = torch.cat([torch.ones(m, m).tril().bool(), torch.ones(m, n_mem, dtype=torch.bool)], 1)
    ref = _manual(q, k_all.expand(1, 2, -1, -1), v_all.expand(1, 2, -1, -1), mask, 0.3)
    assert torch.allclose(out.transpose(1, 2), ref, atol=1e-5)


class SparseExactSearch(TorchExactSearch):
    dense = False  # exercise the gather path that index-based backends (faiss) use


@pytest.mark.parametrize("search, n", [(TorchExactSearch(), 10), (TorchExactSearch(), 64), (SparseExactSearch(), 10)],
                         ids=["torch-dense", "torch-sparse", "index-sparse"])
def test_top_k_reads_only_the_best_slots(search, n):
    """top_k 3 of 10 slots: the torch backend masks a dense read; of 64 (3 * SPARSE_BELOW <= 64)
    it gathers the 3 slots' values, like index backends always do. Same answer either way."""
    torch.manual_seed(1)
    d = 8
    mem = TokenStore(torch.float32)
    k_raw, v_mem = torch.randn(1, 1, n, d), torch.randn(1, 1, n, d)
    mem.write(k_raw, v_mem)
    q = torch.randn(1, 1, 1, d)
    rt = LayerRuntime.build(0, None, mem, None, search, top_k=3, distance=0, count_bias=False, record_reads=True)
    k_loc, v_loc = torch.randn(1, 1, 1, d), torch.randn(1, 1, 1, d)
    out = rt.attend(q, k_loc, v_loc, scaling=1.0, softcap=None, sliding_window=None)
    best = (q @ k_raw.transpose(-1, -2)).topk(3).indices.flatten()
    assert set(rt.last_read.slots.flatten().tolist()) == set(best.tolist())
    k_all = torch.cat([k_loc, k_raw[:, :, best]], 2)
    v_all = torch.cat([v_loc, v_mem[:, :, best]], 2)
    ref = _manual(q, k_all, v_all, torch.ones(1, 4, dtype=torch.bool), 1.0)
    assert torch.allclose(out.transpose(1, 2), ref, atol=1e-5)


def _bank_with(keys: torch.Tensor, values: torch.Tensor, used: int):
    """A slot bank holding keys/values [1, H, S, D] whose first `used` slots are in use."""
    from camelot.memory import SlotBank

    h, s = keys.shape[1], keys.shape[2]
    bank = SlotBank(s, 0.99)
    counts = (torch.arange(s) < used).long().expand(1, h, s).contiguous()
    bank.load_state_dict({"keys": keys, "values": values, "counts": counts, "ages": torch.zeros(1, h, s).long(),
                          "telemetry": torch.zeros(5).long()})
    return bank


@pytest.mark.parametrize("retrieve", ["group", "key"])
@pytest.mark.parametrize("search", ["torch", "sparse", "torch-bf16"])
@pytest.mark.parametrize("used", [64, 2])
def test_shared_reads_pick_per_kv_head_and_attend_exactly(retrieve, search, used):
    """group / key: each token's k slots are chosen once per KV head (by the sum of its query
    heads' logits, or by nearness to the token's own key) and all its query heads attend exactly
    over local keys + those slots. With 2 used slots of 64 a pick past them must read nothing."""
    from camelot.backends import make_backend

    torch.manual_seed(7)
    spec, d, hkv, g, m, n, dist, top = _spec(), 8, 2, 3, 5, 64, 6, 4
    # well separated scores, so that bfloat16 candidates pick the same slots as exact search
    k_raw = torch.randn(1, hkv, n, d) * 3
    v_mem = torch.randn(1, hkv, n, d)
    backend = SparseExactSearch() if search == "sparse" else make_backend(search)
    rt = LayerRuntime.build(0, spec, _bank_with(k_raw, v_mem, used), None, backend, top_k=top, distance=dist,
                      count_bias=False, record_reads=True, retrieve=retrieve)
    pos = torch.arange(m)
    q_raw, kl_raw, v_loc = torch.randn(1, hkv * g, m, d), torch.randn(1, hkv, m, d), torch.randn(1, hkv, m, d)
    q, k_loc = place_keys(spec, q_raw, pos), place_keys(spec, kl_raw, pos)
    out = rt.attend(q, k_loc, v_loc, scaling=0.3, softcap=None, sliding_window=None).transpose(1, 2)
    k_mem = place_keys(spec, k_raw, torch.full((n,), -dist))  # [1, Hkv, S, D]
    for h in range(hkv):
        qh = q[0, h * g : (h + 1) * g]  # [G, m, D]
        if retrieve == "group":
            score = qh.sum(0) @ k_mem[0, h].T  # [m, S]
        else:
            score = kl_raw[0, h] @ k_raw[0, h].T
        score[:, used:] = float("-inf")
        for t in range(m):
            best = score[t].topk(min(top, used)).indices
            read = rt.last_read.slots[0, h, :, t]  # [G, k]
            assert all(set(read[j][rt.last_read.weights[0, h, j, t] > 0].tolist()) == set(best.tolist())
                       for j in range(g))
            k_all = torch.cat([k_loc[0, h, : t + 1], k_mem[0, h, best]])
            v_all = torch.cat([v_loc[0, h, : t + 1], v_mem[0, h, best]])
            ref = torch.softmax(qh[:, t] @ k_all.T * 0.3, -1) @ v_all  # [G, D]
            assert torch.allclose(out[0, h * g : (h + 1) * g, t], ref, atol=1e-5)


def test_group_read_of_a_model_without_grouped_heads_is_the_query_read():
    torch.manual_seed(8)
    spec, d, h, m, n = _spec(), 8, 2, 6, 80
    bank = _bank_with(torch.randn(1, h, n, d), torch.randn(1, h, n, d), n)
    q, k, v = torch.randn(1, h, m, d), torch.randn(1, h, m, d), torch.randn(1, h, m, d)
    outs, reads = [], []
    for retrieve in ("query", "group"):
        rt = LayerRuntime.build(0, spec, bank, None, TorchExactSearch(), top_k=3, distance=4, count_bias=0.7,
                          record_reads=True, retrieve=retrieve)
        outs.append(rt.attend(q, k, v, 0.4, None, None))
        reads.append(rt.last_read.slots.sort(-1).values)
    assert torch.equal(reads[0], reads[1]) and torch.allclose(outs[0], outs[1], atol=1e-6)


def test_key_read_keeps_position_free_keys_for_the_write_and_drops_them_when_local_k_is_replaced():
    """The key read un-rotates each new key once; flush writes those same keys to memory, unless
    the open segment was replaced from outside (a checkpoint or snapshot restore)."""
    from camelot.memory import SlotBank

    torch.manual_seed(9)
    spec, d = _spec(), 8
    runtimes = {r: LayerRuntime.build(0, spec, SlotBank(32, 0.9), None, TorchExactSearch(), top_k=2, distance=3,
                                count_bias=False, retrieve=r) for r in ("query", "key")}
    k_raw, v = torch.randn(1, 1, 7, d), torch.randn(1, 1, 7, d)
    k_rot = place_keys(spec, k_raw, torch.arange(7))
    for rt in runtimes.values():
        for a, e in ((0, 3), (3, 4), (4, 7)):  # an open segment filled in steps, as generation does
            rt.attend(torch.randn(1, 1, e - a, d), k_rot[:, :, a:e], v[:, :, a:e], 0.5, None, None)
        rt.flush()
    banks = [rt.state.memory.state_dict() for rt in runtimes.values()]
    assert torch.allclose(banks[0]["keys"], banks[1]["keys"], atol=1e-6)
    assert torch.equal(banks[0]["counts"], banks[1]["counts"])
    assert torch.allclose(banks[1]["keys"][0, 0, :7], k_raw[0, 0], atol=1e-5)  # threshold 0.9: all novel

    rt = runtimes["key"]
    rt.attend(torch.randn(1, 1, 2, d), k_rot[:, :, :2], v[:, :, :2], 0.5, None, None)
    other = torch.randn(1, 1, 2, d)
    rt.state.local_k = place_keys(spec, other, torch.arange(2))  # replaced: the cached raw keys are stale
    assert torch.allclose(rt.state.raw_open(rt.positions.unplaced), other, atol=1e-5)


def test_count_bias_lifts_slots_above_the_mean_count_and_leaves_the_rest_like_raw_tokens():
    from camelot.memory import SlotBank

    torch.manual_seed(4)
    d = 8
    bank = SlotBank(4, 0.99, torch.float32)
    key, val = torch.randn(1, 1, 1, d), torch.randn(1, 1, 1, d)
    other, val2 = -key, torch.randn(1, 1, 1, d)  # cosine -1: a second slot
    for _ in range(3):  # 3 identical tokens -> one slot, c = 3
        bank.write(key, val)
    bank.write(other, val2)  # c = 1; mean count over the used slots = 2
    assert bank.state_dict()["counts"][0, 0].tolist() == [3, 1, 0, 0]
    rt = LayerRuntime.build(0, None, bank, None, TorchExactSearch(), top_k=None, distance=0, count_bias=True)
    q, k_loc, v_loc = torch.randn(1, 1, 1, d), torch.randn(1, 1, 1, d), torch.randn(1, 1, 1, d)

    def expected(b):
        w_loc = torch.exp(q @ k_loc.transpose(-1, -2))
        w1 = (3 / 2) ** b * torch.exp(q @ key.transpose(-1, -2))
        w2 = torch.exp(q @ other.transpose(-1, -2))  # below the mean: no penalty, weighs like one token
        return (w_loc * v_loc + w1 * val + w2 * val2) / (w_loc + w1 + w2)

    for b in (1.0, 0.5, 0.0):  # factor 1: slot 1 weighs like 3/2 tokens (3 over a mean of 2)
        rt.read.count_bias.factor, rt.state.local_k, rt.state.local_v = b, None, None  # a fresh open segment
        out = rt.attend(q, k_loc, v_loc, 1.0, None, None)
        assert torch.allclose(out.transpose(1, 2), expected(b), atol=1e-5)


def test_absolute_count_bias_makes_a_merged_slot_weigh_like_its_raw_copies():
    """count_mode="absolute", factor 1: a slot of n identical merged tokens takes exactly the
    softmax mass n raw copies of that token would (the vote many-shot ICL needs); the relative
    mode does not, which shows the check can fail."""
    from camelot.memory import SlotBank

    torch.manual_seed(6)
    d, n = 8, 5
    key, val = torch.randn(1, 1, 1, d), torch.randn(1, 1, 1, d)
    other, val2 = -key, torch.randn(1, 1, 1, d)
    q, k_loc, v_loc = torch.randn(1, 1, 1, d), torch.randn(1, 1, 1, d), torch.randn(1, 1, 1, d)
    raw = TokenStore(torch.float32)  # n copies of key, one of other, each its own entry
    raw.write(torch.cat([key] * n + [other], 2), torch.cat([val] * n + [val2], 2))
    rt_raw = LayerRuntime.build(0, None, raw, None, TorchExactSearch(), top_k=None, distance=0, count_bias=False)
    want = rt_raw.attend(q, k_loc, v_loc, 1.0, None, None)

    def merged(mode):
        bank = SlotBank(4, 0.99, torch.float32)
        for _ in range(n):  # a segment's tokens match the bank as it was: one write per copy
            bank.write(key, val)
        bank.write(other, val2)
        assert bank.state_dict()["counts"][0, 0].tolist() == [n, 1, 0, 0]
        rt = LayerRuntime.build(0, None, bank, None, TorchExactSearch(), top_k=None, distance=0, count_bias=1.0,
                                count_mode=mode)
        return rt.attend(q, k_loc, v_loc, 1.0, None, None)

    torch.testing.assert_close(merged("absolute"), want, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(merged("relative"), want, atol=1e-3)
    with pytest.raises(ValueError, match="relative or absolute"):
        LayerRuntime.build(0, None, raw, None, TorchExactSearch(), top_k=None, distance=0, count_bias=1.0,
                           count_mode="log")


def test_count_cap_makes_a_merged_slot_weigh_like_cap_raw_copies():
    """count_cap=c (absolute, factor 1): a slot of n > c merged tokens takes the softmax mass of
    c raw copies of its key, not n; below the cap the slot is untouched. The uncapped read
    differs, which shows the check can fail."""
    from camelot.memory import SlotBank

    torch.manual_seed(7)
    d, n, cap = 8, 6, 3
    key, val = torch.randn(1, 1, 1, d), torch.randn(1, 1, 1, d)
    other, val2 = -key, torch.randn(1, 1, 1, d)
    q, k_loc, v_loc = torch.randn(1, 1, 1, d), torch.randn(1, 1, 1, d), torch.randn(1, 1, 1, d)

    def raw_copies(c):
        raw = TokenStore(torch.float32)
        raw.write(torch.cat([key] * c + [other], 2), torch.cat([val] * c + [val2], 2))
        rt = LayerRuntime.build(0, None, raw, None, TorchExactSearch(), top_k=None, distance=0, count_bias=False)
        return rt.attend(q, k_loc, v_loc, 1.0, None, None)

    bank = SlotBank(4, 0.99, torch.float32)
    for _ in range(n):
        bank.write(key, val)
    bank.write(other, val2)

    def read(count_cap):
        rt = LayerRuntime.build(0, None, bank, None, TorchExactSearch(), top_k=None, distance=0, count_bias=1.0,
                                count_mode="absolute", count_cap=count_cap)
        return rt.attend(q, k_loc, v_loc, 1.0, None, None)

    torch.testing.assert_close(read(cap), raw_copies(cap), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(read(None), raw_copies(n), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(read(n + 10), raw_copies(n), rtol=1e-5, atol=1e-5)  # a cap above every count
    assert not torch.allclose(read(cap), read(None), atol=1e-3)
    with pytest.raises(ValueError, match="cap must be None or >= 1"):
        LayerRuntime.build(0, None, bank, None, TorchExactSearch(), top_k=None, distance=0, count_bias=1.0,
                           count_cap=0.5)


def test_count_bias_follows_every_change_of_the_memory():
    """The bias is kept between reads of an unchanged memory: a write, a reset or a load must
    each be seen by the next read."""
    from camelot.memory import SlotBank

    torch.manual_seed(5)
    d = 8
    bank = SlotBank(4, 0.99, torch.float32)
    key, other = torch.randn(1, 1, 1, d), torch.randn(1, 1, 1, d)
    bank.write(key, torch.randn(1, 1, 1, d))
    bank.write(torch.cat([key, other], 2), torch.randn(1, 1, 2, d))  # counts 2 and 1
    rt = LayerRuntime.build(0, None, bank, None, TorchExactSearch(), top_k=None, distance=0, count_bias=1.0)
    state = bank.state_dict()
    state = {n: t.clone() for n, t in state.items()}

    def bias_now():
        rt.state.local_k = rt.state.local_v = None
        rt.attend(torch.randn(1, 1, 1, d), torch.randn(1, 1, 1, d), torch.randn(1, 1, 1, d), 1.0, None, None)
        return rt.read.count_bias.cached[0, 0, :2]  # the bias the read used

    assert torch.allclose(bias_now(), torch.tensor([2 / 1.5, 1.0]).log().clamp(min=0))
    bank.write(torch.cat([key] * 4, 2), torch.randn(1, 1, 4, d))  # counts 6 and 1, mean 3.5
    assert torch.allclose(bias_now(), torch.tensor([6 / 3.5, 1.0]).log().clamp(min=0))
    bank.load_state_dict(state)  # back to counts 2 and 1
    assert torch.allclose(bias_now(), torch.tensor([2 / 1.5, 1.0]).log().clamp(min=0))


def test_read_does_not_drift_as_counts_grow_with_the_document():
    """A long run multiplies every count; the read must not change with it, or memory outweighs
    the window more and more (the absolute log(count) bias took a 600k-token soak from
    perplexity 16 to 29). Counts that grow unevenly do change it, which shows the check can fail."""
    import camelot
    from tests.conftest import tiny_llama

    model = tiny_llama(vocab=64)
    ids = torch.randint(0, 64, (1, 96), generator=torch.Generator().manual_seed(0))

    def logits_after(cfg, scale):
        cm = camelot.wrap(model, cfg)
        try:
            cm.feed(ids[:, :64], progress=False)
            for rt in cm.runtimes:
                if rt.state.memory is not None:
                    rt.state.memory.counts = rt.state.memory.counts * scale
            return cm.step(ids[:, 64:80])
        finally:
            cm.unwrap()

    cfg = camelot.CamelotConfig(window=16, slots=16, recent=8, sink=2, threshold=0.2)
    assert cfg.count_bias == 0.7  # the default
    base = logits_after(cfg, 1)
    torch.testing.assert_close(logits_after(cfg, 100), base, rtol=1e-5, atol=1e-5)
    uneven = torch.ones(17, dtype=torch.long)
    uneven[::2] = 100  # every other slot grows 100x
    assert not torch.allclose(logits_after(cfg, uneven), base, atol=1e-3)


def test_prefix_keys_sit_at_their_true_negative_positions():
    torch.manual_seed(2)
    spec, d, p, m = _spec(), 8, 5, 3
    prefix = RawWindow(p)
    k_pre, v_pre = torch.randn(1, 1, p, d), torch.randn(1, 1, p, d)
    prefix.write(k_pre, v_pre)
    rt = LayerRuntime.build(0, spec, None, prefix, TorchExactSearch(), top_k=1, distance=0, count_bias=False)
    q_raw, k_raw, v = torch.randn(1, 1, m, d), torch.randn(1, 1, m, d), torch.randn(1, 1, m, d)
    pos = torch.arange(m)
    out = rt.attend(place_keys(spec, q_raw, pos), place_keys(spec, k_raw, pos), v, 0.5, None, None)
    # Reference: one sequence [prefix; segment] at positions [0, p+m) (RoPE is relative).
    all_pos = torch.arange(p + m)
    k_all = place_keys(spec, torch.cat([k_pre, k_raw], 2), all_pos)
    v_all = torch.cat([v_pre, v], 2)
    q_ref = place_keys(spec, q_raw, all_pos[p:])
    mask = torch.ones(p + m, p + m).tril().bool()[p:]
    ref = _manual(q_ref, k_all, v_all, mask, 0.5)
    assert torch.allclose(out.transpose(1, 2), ref, atol=1e-5)


def test_sliding_window_and_softcap_are_honoured():
    torch.manual_seed(3)
    d, m = 8, 6
    rt = LayerRuntime.build(0, None, None, None, TorchExactSearch(), top_k=1, distance=0, count_bias=False)
    q, k, v = torch.randn(1, 1, m, d), torch.randn(1, 1, m, d), torch.randn(1, 1, m, d)
    out = rt.attend(q, k, v, 1.0, softcap=2.0, sliding_window=2)
    s = torch.tanh((q @ k.transpose(-1, -2)) / 2.0) * 2.0
    i = torch.arange(m)
    mask = (i[:, None] >= i[None]) & (i[:, None] - i[None] < 2)
    ref = torch.softmax(s.masked_fill(~mask, float("-inf")), -1) @ v
    assert torch.allclose(out.transpose(1, 2), ref, atol=1e-5)
