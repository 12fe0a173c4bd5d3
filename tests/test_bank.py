"""The consolidation arithmetic of SlotBank, against a token-by-token reference and by provenance."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from camelot.memory import SlotBank, TokenStore
from tests.reference_bank import ReferenceBank

D = 4


def _keys_from_prototypes(draw_ids: list[int], noise: list[float], protos: torch.Tensor) -> torch.Tensor:
    return protos[torch.tensor(draw_ids)] + 0.05 * torch.tensor(noise).view(-1, D)


segment_plan = st.integers(min_value=1, max_value=6).flatmap(
    lambda n_protos: st.tuples(
        st.just(n_protos),
        st.lists(st.lists(st.integers(0, n_protos - 1), min_size=1, max_size=7), min_size=1, max_size=5),
        st.integers(1, 5),  # slots
        st.sampled_from([0.5, 0.9, 0.99]),
        st.integers(0, 2**16),
    ))


@settings(max_examples=60, deadline=None)
@given(segment_plan)
def test_token_mode_matches_reference_exactly(plan):
    n_protos, segments, slots, thr, seed = plan
    g = torch.Generator().manual_seed(seed)
    protos = torch.randn(n_protos, D, generator=g)
    bank = SlotBank(slots, thr, torch.float64, write_mode="token")
    ref = ReferenceBank(slots, thr)
    for seg in segments:
        k = protos[torch.tensor(seg)] + 0.05 * torch.randn(len(seg), D, generator=g, dtype=torch.float32)
        v = torch.randn(len(seg), 3, generator=g)
        bank.write(k.double()[None, None], v.double()[None, None])
        for kk, vv in zip(k.double().tolist(), v.double().tolist()):
            ref.write(kk, vv)
    state = bank.state_dict()
    assert state["counts"][0, 0].tolist() == ref.counts
    assert state["ages"][0, 0].tolist() == ref.ages
    for i in range(slots):
        if ref.counts[i]:
            assert torch.allclose(state["keys"][0, 0, i], torch.tensor(ref.keys[i], dtype=torch.float64), atol=1e-9)
            assert torch.allclose(state["values"][0, 0, i], torch.tensor(ref.values[i], dtype=torch.float64),
                                  atol=1e-9)
    assert state["telemetry"].tolist() == [ref.merged, ref.new, ref.evicted, 0, ref.skipped]


@settings(max_examples=60, deadline=None)
@given(segment_plan)
def test_segment_mode_provenance(plan):
    """Every slot's key and value are the mean of exactly the tokens merged into it since it was
    last (re)filled, its count is their number, and its age is the steps since the last one."""
    n_protos, segments, slots, thr, seed = plan
    g = torch.Generator().manual_seed(seed)
    protos = torch.randn(n_protos, D, generator=g)
    total = sum(len(s) for s in segments)
    bank = SlotBank(slots, thr, torch.float64, write_mode="segment")
    all_k, step = [], 0
    for seg in segments:
        k = (protos[torch.tensor(seg)] + 0.05 * torch.randn(len(seg), D, generator=g)).double()
        ids = torch.arange(step, step + len(seg))
        v = torch.nn.functional.one_hot(ids, total).double()  # value = which token this is
        bank.write(k[None, None], v[None, None])
        all_k.append(k)
        step += len(seg)
    all_k = torch.cat(all_k)
    st_ = bank.state_dict()
    counts, keys, values, ages = st_["counts"][0, 0], st_["keys"][0, 0], st_["values"][0, 0], st_["ages"][0, 0]
    assert int(counts.sum()) <= total and bool((counts >= 0).all())
    for i in range(slots):
        c = int(counts[i])
        if c == 0:
            continue
        members = values[i] > 0
        assert int(members.sum()) == c
        assert torch.allclose(values[i][members], torch.full((c,), 1.0 / c, dtype=torch.float64))
        assert torch.allclose(keys[i], all_k[members].mean(0), atol=1e-9)
        last = int(members.nonzero().max())
        assert int(ages[i]) == total - 1 - last
    tel = st_["telemetry"].tolist()
    assert sum(tel) == total  # each token merged, new, evicting, dropped or skipped
    assert not torch.isnan(keys).any()


def test_segment_equals_token_mode_when_tokens_are_distinct_or_repeat_memory():
    # Fast path and sequential path coincide when no two novel tokens of one segment are alike.
    g = torch.Generator().manual_seed(1)
    protos = torch.nn.functional.normalize(torch.randn(6, 16, generator=g), dim=-1)
    first = protos[:4]  # all novel, mutually far apart
    second = protos[[0, 1, 0, 4, 5, 2]] + 1e-3  # repeats merge, two new ones novel and distinct
    banks = [SlotBank(6, 0.9, torch.float64, write_mode=m) for m in ("segment", "token")]
    for bank in banks:
        for seg in (first, second):
            bank.write(seg.double()[None, None], seg.double()[None, None])
    a, b = (bk.state_dict() for bk in banks)
    for name in ("counts", "ages", "telemetry"):
        assert torch.equal(a[name], b[name]), name
    assert torch.allclose(a["keys"], b["keys"], atol=1e-12)


def test_threshold_edge_is_inclusive():
    bank = SlotBank(4, 1.0, torch.float64)
    k = torch.tensor([[[[1.0, 0.0]]]], dtype=torch.float64)
    bank.write(k, k)
    bank.write(k * 3, k)  # cosine exactly 1.0 >= threshold 1.0 -> merge
    st_ = bank.state_dict()
    assert st_["counts"][0, 0].tolist() == [2, 0, 0, 0]
    assert torch.allclose(st_["keys"][0, 0, 0], torch.tensor([2.0, 0.0], dtype=torch.float64))
    bank.write(torch.tensor([[[[1.0, 1e-3]]]], dtype=torch.float64), k)  # just below -> novel
    assert bank.state_dict()["counts"][0, 0].tolist() == [2, 1, 0, 0]


def test_eviction_takes_the_least_recently_updated_slot():
    bank = SlotBank(3, 0.99, torch.float64)
    e = torch.eye(4, dtype=torch.float64)
    for i in range(3):
        bank.write(e[i][None, None, None], e[i][None, None, None])  # fill slots 0, 1, 2
    bank.write(e[0][None, None, None], e[0][None, None, None])  # refresh slot 0 (merge)
    bank.write(e[3][None, None, None], e[3][None, None, None])  # novel: evicts slot 1 (oldest)
    st_ = bank.state_dict()
    assert torch.equal(st_["keys"][0, 0, 1], e[3])
    assert st_["counts"][0, 0].tolist() == [2, 1, 1]
    assert st_["telemetry"].tolist() == [1, 3, 1, 0, 0]


def test_more_novel_tokens_than_slots_keeps_the_latest():
    bank = SlotBank(2, 0.999, torch.float64)
    e = torch.eye(5, dtype=torch.float64)
    bank.write(e[None, None], e[None, None])
    keys = bank.state_dict()["keys"][0, 0]
    assert {tuple(r.tolist()) for r in keys} == {tuple(e[3].tolist()), tuple(e[4].tolist())}


def test_non_finite_states_are_skipped_and_never_absorbed():
    bank = SlotBank(4, 0.5, torch.float32)
    k = torch.randn(1, 2, 6, 8)
    v = torch.randn(1, 2, 6, 8)
    k[0, 0, 2, 3] = float("nan")
    v[0, 1, 4, 0] = float("inf")
    bank.write(k, v)
    bank.write(k, v)
    st_ = bank.state_dict()
    assert torch.isfinite(st_["keys"]).all() and torch.isfinite(st_["values"]).all()
    assert st_["telemetry"][4] == 4


def test_rows_and_heads_are_independent():
    g = torch.Generator().manual_seed(0)
    k = torch.randn(3, 2, 10, 8, generator=g)
    v = torch.randn(3, 2, 10, 8, generator=g)
    together = SlotBank(6, 0.3, torch.float64)
    together.write(k.double(), v.double())
    for b in range(3):
        for h in range(2):
            alone = SlotBank(6, 0.3, torch.float64)
            alone.write(k[b : b + 1, h : h + 1].double(), v[b : b + 1, h : h + 1].double())
            for name in ("keys", "counts", "ages"):
                assert torch.equal(together.state_dict()[name][b, h], alone.state_dict()[name][0, 0]), name


def test_reset_returns_to_initial_state_and_batch_change_is_refused():
    bank = SlotBank(4, 0.5)
    bank.write(torch.randn(2, 1, 3, 4), torch.randn(2, 1, 3, 4))
    try:
        bank.write(torch.randn(1, 1, 3, 4), torch.randn(1, 1, 3, 4))
        raise AssertionError("batch change must be refused")
    except ValueError as e:
        assert "reset" in str(e)
    bank.reset()
    assert bank.readable() is None and bank.state_dict() == {}


def test_token_store_keeps_everything_and_grows():
    store = TokenStore()
    for _ in range(5):
        store.write(torch.randn(1, 2, 7, 4), torch.randn(1, 2, 7, 4))
    keys, values, counts, valid = store.readable()
    assert keys.shape == (1, 2, 35, 4) and bool(valid.all())


def test_eviction_order_by_top_t_equals_the_stable_sort_of_every_slot(monkeypatch):
    """The write picks eviction targets by a top-T of a unique key; banks too large for that key
    sort every slot. Both must pick the same slots (ties: free slots by index, equal ages)."""
    import camelot.memory.bank as bank_mod

    g = torch.Generator().manual_seed(7)
    protos = torch.randn(40, D, generator=g, dtype=torch.float64)
    segments = [protos[torch.randint(0, 40, (2, 3, 9), generator=g)] for _ in range(12)]
    states = []
    for limit in (bank_mod._UNIQUE_KEY_SLOTS, 0):
        monkeypatch.setattr(bank_mod, "_UNIQUE_KEY_SLOTS", limit)
        bank = SlotBank(16, 0.99, torch.float64)
        bank.write(segments[0], segments[0])
        state = bank.state_dict()
        state["ages"][..., ::3] = 5  # equal ages: the tie rule decides
        bank.load_state_dict(state)
        for seg in segments[1:]:
            bank.write(seg, seg * 2)
        states.append(bank.state_dict())
    for name in ("keys", "values", "counts", "ages", "telemetry"):
        assert torch.equal(states[0][name], states[1][name]), name
    assert states[0]["telemetry"][2] > 0  # evictions happened


class _TorchBookkeeping(SlotBank):
    """The reference: every write's bookkeeping in torch, never the C kernel."""

    def _native_bookkeeping(self, *args) -> bool:
        return False


@settings(max_examples=80, deadline=None)
@given(seed=st.integers(0, 2**16), rows=st.integers(1, 2), heads=st.integers(1, 3), slots=st.integers(1, 12),
       thr=st.sampled_from([-1.0, 0.0, 0.5, 0.9, 0.99, 1.0]), mode=st.sampled_from(["segment", "token"]),
       bf16=st.booleans(), steps=st.integers(1, 5))
def test_the_c_bookkeeping_of_a_write_matches_the_torch_one(seed, rows, heads, slots, thr, mode, bf16, steps):
    """camelot/csrc/consolidate.c against the torch code it replaces on CPU float32 banks: the same
    counts, ages and telemetry exactly, the same keys and values to float rounding (its sums run
    in token order), through merges of several tokens into one slot, identical tokens, NaN / inf
    tokens, evictions, dropped tokens and segments longer than the bank."""
    from camelot import topk as native

    if native.native_library() is None:
        pytest.skip("no C compiler: the torch bookkeeping is the only one")
    g = torch.Generator().manual_seed(seed)
    sd = torch.bfloat16 if bf16 else torch.float32
    protos = torch.randn(3, D, generator=g)
    fast, ref = (cls(slots, thr, write_mode=mode, search_dtype=sd) for cls in (SlotBank, _TorchBookkeeping))
    calls = []
    real = SlotBank._native_bookkeeping

    def counted(self, *args):
        ok = real(self, *args)
        calls.append(ok)
        return ok

    SlotBank._native_bookkeeping = counted
    try:
        for _ in range(steps):
            t = int(torch.randint(1, 2 * slots + 4, (), generator=g))
            k = protos[torch.randint(0, 3, (rows, heads, t), generator=g)] + 0.05 * torch.randn(rows, heads, t, D,
                                                                                                 generator=g)
            if t > 2:
                k[..., 2, :] = k[..., 0, :]  # identical tokens
            v = torch.randn(rows, heads, t, 3, generator=g)
            bad = torch.rand(rows, heads, t, generator=g) < 0.1
            k[..., 1] = torch.where(bad, float("nan"), k[..., 1])
            v[..., 0] = torch.where(bad & (torch.rand(rows, heads, t, generator=g) < 0.5), float("inf"), v[..., 0])
            fast.write(k, v)
            ref.write(k, v)
            for name in ("counts", "ages", "telemetry"):
                assert torch.equal(getattr(fast, name), getattr(ref, name)), name
            for name in ("keys", "values"):
                assert torch.allclose(getattr(fast, name), getattr(ref, name), atol=1e-6, rtol=1e-5), name
    finally:
        SlotBank._native_bookkeeping = real
    assert calls and all(calls)  # the kernel did every write of `fast`


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 2**16), heads=st.integers(1, 3), slots=st.integers(3, 12), reserve=st.integers(1, 6),
       span=st.integers(1, 3), thr=st.sampled_from([0.0, 0.9, 1.0]), steps=st.integers(1, 5),
       evict=st.sampled_from(["age", "use"]), displaced=st.sampled_from(["drop", "consolidate", "place"]))
def test_the_c_kernel_beside_a_span_reserve_matches_the_torch_write(seed, heads, slots, reserve, span, thr, steps,
                                                                     evict, displaced):
    """The paper's rule, or eviction by use, plus a span reserve: the kernel does the consolidated
    slots, torch the reserve; the same bank as the torch write of the whole rule
    (camelot/memory/spans.py), the slots' scores included; also where displaced reserve tokens
    join the consolidated write with their own ages and scores."""
    from camelot import topk as native
    from camelot.memory.rules import WriteRule

    if native.native_library() is None:
        pytest.skip("no C compiler: the torch bookkeeping is the only one")
    reserve = min(reserve, slots - 1)
    rule = WriteRule(span_reserve=reserve, span=span, span_score="sum", importance="surprise", evict=evict,
                     span_displaced=displaced)
    g = torch.Generator().manual_seed(seed)
    protos = torch.randn(3, D, generator=g)
    calls = []

    class Counted(SlotBank):
        def _native_bookkeeping(self, *args) -> bool:
            calls.append(args[5])  # the slots the kernel manages
            return super()._native_bookkeeping(*args)

    fast, ref = Counted(slots, thr, rule=rule), _TorchBookkeeping(slots, thr, rule=rule)
    for _ in range(steps):
        t = int(torch.randint(1, 2 * slots + 4, (), generator=g))
        k, v = _clustered_segment(g, protos, 1, heads, t)
        imp = torch.rand(1, heads, t, generator=g) * 4
        fast.write(k, v, received=imp)
        ref.write(k, v, received=imp)
        _assert_same_banks(fast, ref, ("counts", "ages", "telemetry", "span_score"))
        if evict == "use":  # only eviction by use ranks slots by their scores
            assert torch.equal(fast.score[..., :slots], ref.score[..., :slots])
    assert calls == [slots - reserve] * steps  # the kernel did the consolidated part of every write



@settings(max_examples=80, deadline=None)
@given(seed=st.integers(0, 2**16), rows=st.integers(1, 2), heads=st.integers(1, 3), slots=st.integers(1, 12),
       thr=st.sampled_from([-1.0, 0.5, 0.9, 1.0]), decay=st.sampled_from([1.0, 0.995, 0.5]), lazy=st.booleans(),
       steps=st.integers(1, 5))
def test_the_c_kernel_evicting_by_use_matches_the_torch_write(seed, rows, heads, slots, thr, decay, lazy, steps):
    """Eviction by use (WriteRule.use_only) in camelot/csrc/consolidate.c against `place_novel` in
    torch: the same counts, ages, scores and telemetry, through ties of importance and score (a
    coarse grid of values), free slots, dropped tokens, reads adding mass between writes and
    non-finite tokens."""
    _compare_use_writes(seed, rows, heads, slots, thr, decay, lazy, steps)


def test_the_use_kernel_comparison_sees_evictions_and_dropped_tokens():
    telemetry = _compare_use_writes(seed=3, rows=2, heads=3, slots=4, thr=1.0, decay=0.995, lazy=False, steps=5)
    assert telemetry[2] > 0 and telemetry[3] > 0  # evicted, dropped: places were contested


def _compare_use_writes(seed: int, rows: int, heads: int, slots: int, thr: float, decay: float, lazy: bool,
                        steps: int) -> list[int]:
    from camelot import topk as native
    from camelot.memory.rules import WriteRule

    if native.native_library() is None:
        pytest.skip("no C compiler: the torch bookkeeping is the only one")
    rule = WriteRule(evict="use", use_decay=decay, lazy=lazy)
    assert rule.use_only
    g = torch.Generator().manual_seed(seed)
    protos = torch.randn(3, D, generator=g)
    calls = []

    class Counted(SlotBank):
        def _native_bookkeeping(self, *args) -> bool:
            calls.append(super()._native_bookkeeping(*args))
            return calls[-1]

    fast, ref = Counted(slots, thr, rule=rule), _TorchBookkeeping(slots, thr, rule=rule)
    for _ in range(steps):
        t = int(torch.randint(1, 2 * slots + 4, (), generator=g))
        k, v = _clustered_segment(g, protos, rows, heads, t)
        imp = torch.randint(0, 4, (rows, heads, t), generator=g).float() / 2  # ties on purpose
        fast.write(k, v, received=imp)
        ref.write(k, v, received=imp)
        _assert_same_banks(fast, ref, ("counts", "ages", "telemetry", "score"))
        mass = torch.randint(0, 3, (rows, heads, slots), generator=g).float() / 4
        fast.observe_reads(mass)
        ref.observe_reads(mass)
    assert calls and all(calls)  # the kernel did every write of `fast`
    return fast.telemetry.tolist()


def _clustered_segment(g: torch.Generator, protos: torch.Tensor, rows: int, heads: int,
                       t: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Keys near one of the prototypes (merges), a tenth of them NaN (skipped); random values."""
    k = protos[torch.randint(0, 3, (rows, heads, t), generator=g)] + 0.05 * torch.randn(rows, heads, t, D, generator=g)
    k[..., 1] = torch.where(torch.rand(rows, heads, t, generator=g) < 0.1, float("nan"), k[..., 1])
    return k, torch.randn(rows, heads, t, 3, generator=g)


def _assert_same_banks(fast: SlotBank, ref: SlotBank, exact: tuple[str, ...]) -> None:
    """`exact` equal; keys and values to float rounding (the kernel sums in token order)."""
    for name in exact:
        assert torch.equal(getattr(fast, name), getattr(ref, name)), name
    for name in ("keys", "values"):
        assert torch.allclose(getattr(fast, name), getattr(ref, name), atol=1e-6, rtol=1e-5), name


@pytest.mark.parametrize("evict", ["age", "use"])
def test_trimming_the_displaced_tokens_padding_changes_nothing(monkeypatch, evict):
    """On CPU the displaced reserve tokens join the write as wide as the most any head displaced;
    the fixed width (a segment, what a GPU uses: no host sync) pads more and gives the same bank."""
    from camelot.memory import reserve_write
    from camelot.memory.rules import WriteRule

    rule = WriteRule(span_reserve=4, span=2, span_score="sum", importance="surprise", evict=evict)
    banks = []
    for trim in (True, False):
        monkeypatch.setattr(reserve_write.Spill, "trim", trim)
        g = torch.Generator().manual_seed(3)
        protos = torch.randn(3, D, generator=g)
        bank, widths = SlotBank(10, 0.9, rule=rule), []
        real = reserve_write.Spill.__init__

        def spy(self, *args, real=real, widths=widths):
            real(self, *args)
            widths.append(self.width)

        monkeypatch.setattr(reserve_write.Spill, "__init__", spy)
        for _ in range(6):
            k, v = _clustered_segment(g, protos, 1, 2, 8)
            bank.write(k, v, received=torch.rand(1, 2, 8, generator=g) * 4)
        monkeypatch.setattr(reserve_write.Spill, "__init__", real)
        banks.append((bank, widths))
    (trimmed, w_trim), (padded, w_pad) = banks
    assert w_pad == [4] * 6 and min(w_trim) < 4 and max(w_trim) > 0  # both widths were exercised
    _assert_same_banks(trimmed, padded, ("counts", "ages", "telemetry", "span_score", "score"))
