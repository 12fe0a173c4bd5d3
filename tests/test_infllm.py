"""Strategy `infllm`: InfLLM's block memory and block read (camelot/memory/blocks.py,
camelot/reads/blocks.py) against a brute-force reference, and like every strategy: identity
with no memory, causality, its budget, checkpoints."""

from __future__ import annotations

import pytest
import torch
from camelot.adapters.testing import TINY_FAMILIES

import camelot
from camelot.attention import LayerRuntime
from camelot.backends import make_backend
from camelot.memory import BlockMemory, RawWindow, SinkTokens
from camelot.reads import BlockRead
from camelot.rope import RopeSpec, place_keys
from camelot.snapshot import SnapshotError
from tests.conftest import tiny_llama

W, R, S, BS, REPR, KB = 4, 4, 2, 4, 2, 2  # window, raw tail, sinks, block size, repr_topk, blocks read
HKV, G, D = 2, 2, 8
DIST = W + R


def _rot(spec: RopeSpec, x: torch.Tensor, pos: int) -> torch.Tensor:
    """x [..., D] as rotated at position pos."""
    return place_keys(spec, x[None, None, None], torch.tensor([pos]))[0, 0, 0]


class Reference:
    """InfLLM written out token by token, head by head, with Python loops."""

    def __init__(self, spec: RopeSpec, scaling: float) -> None:
        self.spec, self.scaling = spec, scaling
        self.k0: list[torch.Tensor] = []  # per token [Hkv, D], before rotation
        self.v: list[torch.Tensor] = []
        self.acc: list[torch.Tensor] = []  # per token [Hkv]: attention received in the local window
        self.flushed: list[int] = []
        self.open: list[int] = []

    def parts(self):
        sinks, rest = self.flushed[:S], self.flushed[S:]
        tail = rest[len(rest) - R:] if R else []
        mem = rest[: len(rest) - len(tail)]
        n = len(mem) // BS
        return sinks, tail, [mem[i * BS:(i + 1) * BS] for i in range(n)]

    def repr(self, block: list[int], h: int) -> torch.Tensor:
        scores = torch.stack([self.acc[t][h] for t in block])
        top = scores.topk(REPR).indices
        return torch.stack([self.k0[block[int(i)]][h] for i in top]).mean(0)

    def step(self, q0: torch.Tensor, k0: torch.Tensor, v: torch.Tensor):
        """q0 [Hq, m, D], k0/v [Hkv, m, D] -> (out [m, Hq, D], chosen blocks per KV head)."""
        m = q0.shape[1]
        l0 = len(self.open)
        for j in range(m):
            self.k0.append(k0[:, j])
            self.v.append(v[:, j])
            self.acc.append(torch.zeros(HKV))
            self.open.append(len(self.k0) - 1)
        sinks, tail, blocks = self.parts()
        plain = [(t, i) for i, t in enumerate(self.open)] + [(t, i - len(tail)) for i, t in enumerate(tail)]
        plain += [(t, i - len(tail) - len(sinks)) for i, t in enumerate(sinks)]
        out = torch.zeros(m, HKV * G, D)
        chosen = []  # [Hkv][m] blocks read
        for h in range(HKV):
            chosen.append([])
            for j in range(m):
                pick = list(range(len(blocks)))
                if len(blocks) > KB:  # the running mean query of the call, over the head's G query heads
                    score = torch.zeros(len(blocks))
                    for b, blk in enumerate(blocks):
                        rep = self.repr(blk, h)
                        for gq in range(G):
                            for jj in range(j + 1):
                                score[b] += _rot(self.spec, q0[h * G + gq, jj], DIST) @ rep
                    pick = sorted(score.topk(KB).indices.tolist())
                chosen[h].append(pick)
        updates = []
        for h in range(HKV):
            for gq in range(G):
                hq = h * G + gq
                for j in range(m):
                    mem = [t for b in chosen[h][j] for t in blocks[b]]
                    i = l0 + j
                    q_here = _rot(self.spec, q0[hq, j], i)
                    vis = [(t, p) for t, p in plain if p <= i]
                    logits = [q_here @ _rot(self.spec, self.k0[t][h], p) * self.scaling for t, p in vis]
                    q_mem = _rot(self.spec, q0[hq, j], DIST)
                    logits += [q_mem @ self.k0[t][h] * self.scaling for t in mem]
                    probs = torch.softmax(torch.stack(logits), 0)
                    keys = [t for t, _ in vis] + mem
                    out[j, hq] = sum(p * self.v[t][h] for p, t in zip(probs, keys))
                    local = set(self.open) | set(tail)
                    updates += [(t, h, p) for p, t in zip(probs, keys) if t in local]
        for t, h, p in updates:  # after the forward: representatives above saw the state before it
            self.acc[t][h] += p
        return out, chosen

    def flush(self) -> None:
        self.flushed += self.open
        self.open = []


@pytest.mark.parametrize("gather", [False, True], ids=["masked", "gathered"])
def test_block_read_equals_brute_force_reference(gather):
    torch.manual_seed(0)
    spec = RopeSpec(inv_freq=1.0 / (100.0 ** (torch.arange(0, D, 2).float() / D)))
    scaling = D ** -0.5
    rt = LayerRuntime.build(layer_idx=0, rope=spec, memory=BlockMemory(BS, REPR, KB), prefix=RawWindow(R),
                            sink=SinkTokens(S), search=make_backend("torch"), top_k=None, distance=DIST,
                            count_bias=0.0, record_reads=True, read=BlockRead(make_backend("torch"), KB))
    if gather:  # each token's blocks gathered (long memories) instead of masked (short ones)
        rt.read.sparse_below = 0
    ref = Reference(spec, scaling)
    calls = [[4]] * 4 + [[1, 3], [2, 2]] + [[4]] * 6 + [[1, 1, 2]] + [[4]] * 2  # tokens per call, per segment
    checked_choice = 0
    for seg in calls:
        for m in seg:
            l0 = rt.state.local_len
            q0, k0, v = torch.randn(HKV * G, m, D), torch.randn(HKV, m, D), torch.randn(HKV, m, D)
            pos = torch.arange(l0, l0 + m)
            q = place_keys(spec, q0[None], pos)
            k = place_keys(spec, k0[None], pos)
            got = rt.attend(q, k, v[None], scaling, None, None)[0]
            want, chosen = ref.step(q0, k0, v)
            torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-4)
            if rt.last_read is not None:
                for h in range(HKV):
                    for j in range(m):
                        tokens = rt.last_read.slots[0, h, 0, j]
                        expect = torch.tensor([b * BS + i for b in chosen[h][j] for i in range(BS)])
                        assert torch.equal(tokens, expect)
                checked_choice += len(ref.parts()[2]) > KB
        rt.flush()
        ref.flush()
    assert checked_choice >= 3  # the top-k choice itself was exercised, not only "every block"
    mem = rt.state.memory
    _, _, blocks = ref.parts()
    assert mem.n_blocks == len(blocks)
    for h in range(HKV):
        want = torch.stack([ref.repr(blk, h) for blk in blocks])
        torch.testing.assert_close(mem.reprs[0, h, : mem.n_blocks], want, atol=1e-5, rtol=1e-4)


def test_partial_block_waits_until_full():
    mem = BlockMemory(block_size=4, repr_topk=2, read_blocks=2)
    k, v = torch.randn(1, 2, 3, 8), torch.randn(1, 2, 3, 8)
    mem.write(k, v, received=torch.rand(1, 2, 3))
    assert mem.blocks() is None and mem.pending == 3 and mem.readable() is None
    mem.write(k, v, received=torch.rand(1, 2, 3))
    assert mem.n_blocks == 1 and mem.pending == 2
    assert torch.equal(mem.blocks()[0][0, :, 0, :3], k[0])  # the block is the first four tokens, in order
    # representative: mean of the repr_topk most attended keys
    s = torch.tensor([[[0.1, 0.9, 0.5, 0.2]]]).expand(1, 2, 4)
    m2 = BlockMemory(block_size=4, repr_topk=2, read_blocks=1)
    kk = torch.randn(1, 2, 4, 8)
    m2.write(kk, kk, received=s)
    torch.testing.assert_close(m2.reprs[0, :, 0], (kk[0, :, 1] + kk[0, :, 2]) / 2)


def test_null_tokens_never_represent_a_block():
    mem = BlockMemory(block_size=2, repr_topk=1, read_blocks=1)
    k = torch.randn(1, 1, 2, 4)
    k[0, 0, 0, 0] = float("nan")
    mem.write(k, torch.randn(1, 1, 2, 4), received=torch.tensor([[[5.0, 0.1]]]))
    assert torch.isfinite(mem.reprs[0, 0, 0]).all()
    torch.testing.assert_close(mem.reprs[0, 0, 0], k[0, 0, 1])
    assert mem.telemetry.tolist()[4] == 1  # skipped


def _cfg(**kw):
    return dict(strategy="infllm", window=16, recent=16, sink=4, slots=32, block_size=8, **kw)


def test_identity_with_empty_memory():
    model = tiny_llama()
    ids = torch.randint(0, 101, (1, 40))
    with torch.no_grad():
        logits = model(ids).logits
    want = torch.nn.functional.cross_entropy(logits[0, :-1], ids[0, 1:], reduction="none")
    with camelot.wrap(model, window=64, **{k: v for k, v in _cfg().items() if k != "window"}) as cm:
        got = cm.score(ids).token_nll[0]
        assert all(rt.state.memory.blocks() is None for rt in cm.runtimes)
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)


def test_causality_bit_identical():
    model = tiny_llama()
    ids = torch.randint(0, 101, (1, 200))
    late = ids.clone()
    late[0, 170] = (late[0, 170] + 1) % 101
    with camelot.wrap(model, **_cfg()) as cm:
        a = cm.score(ids).token_nll[0]
        b = cm.score(late).token_nll[0]
        assert cm.runtimes[0].state.memory.n_blocks >= 10  # memory was in play
    assert torch.equal(a[:169], b[:169])
    assert not torch.equal(a[169:], b[169:])


def test_budget_all_blocks_stored_few_attended():
    model = tiny_llama()
    n = 300
    ids = torch.randint(0, 101, (1, n))
    with camelot.wrap(model, **_cfg()) as cm:
        cm.record_reads()
        cm.feed(ids, progress=False)
        stored = n - cm.open_len - 16 - 4  # all but the open segment, the raw tail and the sinks
        for row in cm.memory.stats()["layers"]:
            assert row["stored_entries"] == stored
            assert row["blocks"] == stored // 8 and row["pending_tokens"] == stored % 8
            assert row["attended_entries"] == 32
        for read in cm.last_reads().values():
            assert read.slots.shape[-1] == 32  # the attended memory entries: 4 blocks of 8
            assert int(read.slots.max()) < (stored // 8) * 8  # pending tokens are not readable


def test_memory_changes_the_prediction():
    model = tiny_llama()
    ids = torch.randint(0, 101, (1, 200))
    with camelot.wrap(model, **_cfg()) as cm:
        a = cm.score(ids).token_nll[0]
    with camelot.wrap(model, **{**_cfg(), "strategy": "sliding", "slots": 16}) as cm:
        b = cm.score(ids).token_nll[0]
    assert torch.equal(a[:32], b[:32])  # before the first block forms: the same sinks + tail + segment
    assert not torch.allclose(a[100:], b[100:])


def test_checkpoint_round_trip_and_file_snapshot_refused(tmp_path):
    model = tiny_llama()
    ids = torch.randint(0, 101, (1, 150))
    more = torch.randint(0, 101, (1, 40))
    with camelot.wrap(model, **_cfg()) as cm:
        cm.feed(ids, progress=False)
        cp = cm.memory.checkpoint()
        a = cm.score(more, keep_memory=True).token_nll
        cm.memory.restore(cp)
        b = cm.score(more, keep_memory=True).token_nll
        assert torch.equal(a, b)
        with pytest.raises(SnapshotError, match="infllm"):
            cm.memory.save(tmp_path / "m.safetensors")
        assert not (tmp_path / "m.safetensors").exists()


def test_config_checks():
    with pytest.raises(ValueError, match="multiple of block_size"):
        camelot.CamelotConfig(strategy="infllm", slots=100, block_size=64)
    with pytest.raises(ValueError, match="fixed"):
        camelot.CamelotConfig(strategy="infllm", slots=128, placement="recency")
    cfg = camelot.CamelotConfig(strategy="infllm", slots=384)
    assert cfg.block_size == 128 and cfg.repr_topk == 4 and cfg.sink == 4


def test_icl_test_examples_do_not_leak_into_memory():
    from camelot.eval import icl
    from camelot.eval.icl_tasks import balanced_pool

    from tests.test_icl import TASK, WORDS, toy_data

    cm = camelot.wrap(tiny_llama(vocab=len(WORDS)), strategy="infllm", window=48, recent=16, sink=4, slots=16,
                      block_size=8)
    data = toy_data(n_test=3)
    pool = balanced_pool(data.train, TASK.labels, 30, seed=0)
    mem, win = icl.plan_prompt(data, pool, 30, icl.window_budget(48, 1, data.reserve))
    mem_ids = [t for i in mem for t in data.demo_ids(i)]
    win_ids = data.prefix_ids + [t for i in win for t in data.demo_ids(i)]
    all_at_once = icl.evaluate_prompt(cm, mem_ids, win_ids, data).logprobs
    for j in range(len(data.test_ids)):  # each example scored after the others equals it scored alone
        alone = icl.TokenizedTask(**{**data.__dict__, "test_ids": [data.test_ids[j]],
                                     "test_labels": [data.test_labels[j]]})
        torch.testing.assert_close(icl.evaluate_prompt(cm, mem_ids, win_ids, alone).logprobs[0], all_at_once[j])
    assert not torch.allclose(icl.evaluate_prompt(cm, [], win_ids, data).logprobs, all_at_once)
    cm.unwrap()


def test_ppl_plans_infllm_at_camelot_budget():
    from camelot.eval.plan import Sweep, plan_runs

    specs = plan_runs(Sweep(strategies=("sliding", "infllm", "camelot"), slots=(384,), recents=(128,),
                            placements=("recency",)))
    inf = [s for s in specs if s.strategy == "infllm"]
    assert len(inf) == 1 and inf[0].config.slots == 384 and inf[0].config.placement == "fixed"
    assert inf[0].label == "infllm slots=384 recent=128 sink=4"


def test_passkey_shared_prefixes_equal_reading_from_scratch():
    """The pass key run shares prefixes through checkpoints: with infllm too (window scores
    included) they give exactly the answers of reading each case from scratch."""
    from camelot.eval.passkey import build_haystack, make_cases, run_camelot

    from tests.test_ask import tiny_tokenizer

    tok = tiny_tokenizer()
    hay = build_haystack(tok, 420)
    cases = make_cases(hay, [260, 420], [10, 60], trials=1, max_new_tokens=4, seed=1)
    cm = camelot.wrap(tiny_llama(vocab=len(tok)), strategy="infllm", window=32, recent=32, sink=4, slots=32,
                      block_size=16)
    shared = {(t.length, t.depth, t.trial): t.answer for t in run_camelot(cm, hay, cases, 4)}
    for c in cases:
        cm.reset()
        gen = cm.generate(torch.tensor([c.ids(hay)]), max_new_tokens=4)
        assert tok.decode(gen[0].tolist(), skip_special_tokens=True) == shared[(c.length, c.depth, c.trial)]
    cm.unwrap()


@pytest.mark.parametrize("fam", TINY_FAMILIES, ids=[f.name for f in TINY_FAMILIES])
def test_every_family_runs_causally(fam):
    """Rotary, ALiBi and absolute-position families, two rows at once: finite, and a late change
    leaves every earlier loss bit-identical."""
    model = fam.build()
    ids = torch.randint(3, 101, (2, 80), generator=torch.Generator().manual_seed(0))
    late = ids.clone()
    late[:, 70] = (late[:, 70] + 1) % 101
    with camelot.wrap(model, strategy="infllm", window=16, recent=16, sink=2, slots=16, block_size=8) as cm:
        a = cm.score(ids).token_nll
        b = cm.score(late).token_nll
        assert any(rt.state.memory.n_blocks > 2 for rt in cm.runtimes if rt.state.memory is not None)
    assert torch.isfinite(a).all()
    assert torch.equal(a[:, :69], b[:, :69])


def test_state_dict_round_trip_keeps_blocks_and_pending():
    """LayerState.to(device) moves a memory through its state dict: nothing may be lost."""
    mem = BlockMemory(block_size=4, repr_topk=2, read_blocks=1)
    mem.write(torch.randn(1, 2, 10, 8), torch.randn(1, 2, 10, 8), received=torch.rand(1, 2, 10))
    copy = BlockMemory(block_size=4, repr_topk=2, read_blocks=1)
    copy.load_state_dict(mem.state_dict())
    for a, b in zip(mem.blocks(), copy.blocks()):
        assert torch.equal(a, b)
    assert copy.pending == 2 and torch.equal(copy.pending_scores, mem.pending_scores)
    more = (torch.randn(1, 2, 2, 8), torch.randn(1, 2, 2, 8), torch.rand(1, 2, 2))
    mem.write(*more[:2], received=more[2])
    copy.write(*more[:2], received=more[2])
    assert copy.n_blocks == mem.n_blocks == 3 and torch.equal(copy.reprs[:, :, :3], mem.reprs[:, :, :3])
