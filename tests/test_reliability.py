"""Reliability: every bad-input case of tests/reliability_cases.py (the same list that writes the
table in docs/reliability.md), bank invariants after any sequence of writes, determinism, and
reset() returning the state exactly to what a fresh wrapper holds."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import camelot
from camelot import CamelotConfig
from camelot.memory import TELEMETRY_FIELDS, SlotBank
from tests.conftest import tiny_llama
from tests.reliability_cases import CASES, Workspace, doc, memory_state, observe, same_state


@pytest.fixture(scope="module")
def workspace(tmp_path_factory) -> Workspace:
    return Workspace(tmp_path_factory.mktemp("reliability"))


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_bad_input_case(case, workspace):
    obs = observe(case, workspace)
    assert not obs.problems, f"{case.name}: {obs.problems} (observed {obs.error_type}: {obs.message})"
    if case.watch is not None:
        assert obs.state_kept is True


def test_case_names_are_unique():
    names = [c.name for c in CASES]
    assert len(names) == len(set(names))


# ---------------------------------------------------------------------------- bank invariants
FIELD = TELEMETRY_FIELDS.index


@settings(max_examples=80, deadline=None)
@given(st.data())
def test_bank_invariants_after_any_sequence_of_writes(data):
    """Beyond tests/test_bank.py (one head, finite input): rows x heads, NaN/inf tokens, both write
    modes, any threshold. After every write: shapes fixed, no NaN, scratch slot clear, telemetry
    accounts for each token once, counts = tokens merged into held slots (tokens in evicted slots
    leave), and evictions only take slots at least as old as every untouched slot kept, and only
    once no free slot is left."""
    b, h, slots = data.draw(st.integers(1, 2)), data.draw(st.integers(1, 3)), data.draw(st.integers(1, 6))
    thr = data.draw(st.sampled_from([-1.0, 0.0, 0.5, 0.9, 1.0]))
    mode = data.draw(st.sampled_from(["segment", "token"]))
    g = torch.Generator().manual_seed(data.draw(st.integers(0, 2**16)))
    protos = torch.randn(3, 4, generator=g, dtype=torch.float64)
    bank = SlotBank(slots, thr, torch.float64, mode)
    shapes = None
    for _ in range(data.draw(st.integers(1, 6))):
        t = data.draw(st.integers(0, 7))
        k = protos[torch.randint(0, 3, (b, h, t), generator=g)] + 0.1 * torch.randn(b, h, t, 4, generator=g,
                                                                                      dtype=torch.float64)
        v = torch.randn(b, h, t, 3, generator=g, dtype=torch.float64)
        bad = torch.rand(b, h, t, generator=g) < 0.15
        k[..., 0] = torch.where(bad, float("nan"), k[..., 0])
        v[..., 1] = torch.where(bad & (torch.rand(b, h, t, generator=g) < 0.5), float("inf"), v[..., 1])
        # token mode is sequential by definition: check the invariants after every single token
        pieces = [(k[:, :, i : i + 1], v[:, :, i : i + 1]) for i in range(t)] if mode == "token" else [(k, v)]
        for kk, vv in pieces:
            _write_and_check(bank, kk, vv, slots)
            if bank.allocated:
                now = {n: tuple(getattr(bank, n).shape) for n in ("keys", "values", "counts", "ages")}
                assert shapes is None or now == shapes
                shapes = now


def _write_and_check(bank: SlotBank, k: torch.Tensor, v: torch.Tensor, s: int) -> None:
    t = k.shape[2]
    if bank.allocated:
        c0, a0, tel0 = bank.counts[..., :s].clone(), bank.ages[..., :s].clone(), bank.telemetry.clone()
    else:
        c0 = a0 = torch.zeros(k.shape[0], k.shape[1], s, dtype=torch.long)
        tel0 = torch.zeros(len(TELEMETRY_FIELDS), dtype=torch.long)
    bank.write(k, v)
    if not bank.allocated:
        assert t == 0
        return
    c1, a1, tel1 = bank.counts[..., :s], bank.ages[..., :s], bank.telemetry
    d = tel1 - tel0
    finite = torch.isfinite(k).all(-1) & torch.isfinite(v).all(-1)
    assert int(d.sum()) == finite.numel()  # every token: merged, new, evicted, dropped or skipped
    assert int(d[FIELD("skipped")]) == int((~finite).sum())
    assert torch.isfinite(bank.keys).all() and torch.isfinite(bank.values).all()
    assert bool((c1 >= 0).all()) and bool((a1 >= 0).all())
    assert int(bank.counts[..., s].abs().sum()) == 0 and float(bank.keys[..., s, :].abs().sum()) == 0.0
    if t == 0:
        return
    used0 = c0 > 0
    evicted = used0 & (c1 == 1) & (a1 < t)  # refilled: count back to 1, written during this call
    untouched = used0 & (a1 == a0 + t) & (c1 == c0)
    written = int(d[FIELD("merged")] + d[FIELD("new")] + d[FIELD("evicted")])
    assert int(c1.sum()) == int(c0.sum()) + written - int(c0[evicted].sum())
    assert int(evicted.sum()) == int(d[FIELD("evicted")])
    for row in zip(*torch.nonzero(evicted.any(-1), as_tuple=True)):
        ev, keep = evicted[row], untouched[row]
        assert bool((c1[row] > 0).all()), "a slot was evicted while a free one was left"
        if keep.any():
            assert int(a0[row][ev].min()) >= int(a0[row][keep].max()), "eviction skipped an older slot"


# ---------------------------------------------------------------------------- determinism
def _search_options() -> list[str]:
    import importlib.util

    # faiss backends live in camelot.faiss_search (optional); test them when they are there
    has = importlib.util.find_spec("faiss") and importlib.util.find_spec("camelot.faiss_search")
    return ["torch", "faiss"] if has else ["torch"]


@pytest.mark.parametrize("strategy,search", [("camelot", s) for s in _search_options()]
                         + [("knn", "torch"), ("sliding", "torch"), ("recurrent", "torch")])
def test_same_input_config_seed_gives_bit_identical_perplexity(strategy, search):
    """Two independent processes' worth of state (fresh model from the same seed, fresh wrapper):
    identical losses bit for bit on CPU, not merely close."""
    outs = []
    for _ in range(2):
        cm = camelot.wrap(tiny_llama(seed=7), CamelotConfig(window=16, slots=12, top_k=3, threshold=0.4,
                                                            strategy=strategy, search=search))
        outs.append(cm.score(doc(120, seed=11)))
    assert torch.equal(outs[0].token_nll, outs[1].token_nll)
    assert outs[0].perplexity == outs[1].perplexity


def test_seeded_sampling_is_reproducible():
    runs = []
    for _ in range(2):
        cm = camelot.wrap(tiny_llama(seed=2), CamelotConfig(window=16, slots=8, top_k=2))
        runs.append(cm.generate(doc(20), max_new_tokens=24, do_sample=True, temperature=1.3, top_p=0.9, seed=5))
    assert torch.equal(runs[0], runs[1])


@pytest.mark.parametrize("strategy", ["camelot", "knn", "recurrent", "sliding", "window"])
def test_reset_returns_state_exactly_to_a_fresh_wrappers(strategy):
    cfg = CamelotConfig(window=16, slots=8, top_k=2, threshold=0.5, strategy=strategy)
    cm = camelot.wrap(tiny_llama(seed=3), cfg)
    initial = memory_state(cm)
    cm.feed(doc(70, seed=1), progress=False)
    assert not same_state(memory_state(cm), initial)  # something was held (at least the open window)
    cm.reset()
    assert same_state(memory_state(cm), initial)
    assert set(cm.memory.telemetry().values()) == {0} and cm.open_len == 0
    after_reset = cm.score(doc(50, seed=2), keep_memory=True).token_nll
    fresh = camelot.wrap(tiny_llama(seed=3), cfg).score(doc(50, seed=2), keep_memory=True).token_nll
    assert torch.equal(after_reset, fresh)
