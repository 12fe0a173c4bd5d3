"""Reliability: every bad-input case of tests/reliability_cases.py (the same list that writes the
table in docs/reliability.md), bank invariants after any sequence of writes, and the CI-sized
soak (state and RSS flat once the memory is full). Determinism: tests/test_determinism.py;
fuzzing: tests/test_fuzz.py."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import camelot
from camelot import CamelotConfig
from camelot.memory import TELEMETRY_FIELDS, SlotBank
from tests.conftest import tiny_llama
from tests.reliability_cases import CASES, Workspace, observe


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models' matmuls gain nothing from a second thread, and on a shared CPU it only waits
    (the soak below: 3 s with one thread, 40 s with two on a busy machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def workspace(tmp_path_factory) -> Workspace:
    return Workspace(tmp_path_factory.mktemp("reliability"))


def _param(case):
    marks = []
    if case.xfail:
        marks.append(pytest.mark.xfail(strict=True, reason=case.xfail))
    if case.needs_cuda:
        marks.append(pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"))
    return pytest.param(case, id=case.name, marks=marks)


@pytest.mark.parametrize("case", [_param(c) for c in CASES])
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


@settings(max_examples=60, deadline=None)
@given(st.data())
def test_bank_provenance_over_rows_heads_modes_and_faults(data):
    """Beyond test_bank.py's provenance test (one row and head, finite tokens, segment mode):
    with several rows and heads, both write modes, thresholds at the ends of [-1, 1] and NaN/inf
    tokens mixed in, every slot's key and value are the mean of exactly the tokens merged into it
    since it was last (re)filled, its count is their number, its age the steps since the last,
    and no skipped token is ever part of a slot."""
    b, h, slots = data.draw(st.integers(1, 2)), data.draw(st.integers(1, 3)), data.draw(st.integers(1, 5))
    thr = data.draw(st.sampled_from([-1.0, 0.0, 0.7, 0.95, 1.0]))
    mode = data.draw(st.sampled_from(["segment", "token"]))
    lengths = data.draw(st.lists(st.integers(0, 6), min_size=1, max_size=5))
    total = sum(lengths)
    g = torch.Generator().manual_seed(data.draw(st.integers(0, 2**16)))
    protos = torch.randn(3, 4, generator=g, dtype=torch.float64)
    bank = SlotBank(slots, thr, torch.float64, mode)
    keys, bad, step = [], [], 0
    for t in lengths:
        k = protos[torch.randint(0, 3, (b, h, t), generator=g)] + 0.05 * torch.randn(b, h, t, 4, generator=g,
                                                                                       dtype=torch.float64)
        ids = torch.arange(step, step + t)
        v = torch.nn.functional.one_hot(ids, max(total, 1)).double().expand(b, h, t, -1).clone()  # value = token id
        fault = torch.rand(b, h, t, generator=g) < 0.2
        k[..., 1] = torch.where(fault & (torch.rand(b, h, t, generator=g) < 0.5), float("nan"), k[..., 1])
        v[..., 0] = torch.where(fault & ~torch.isnan(k[..., 1]), float("inf"), v[..., 0])
        bank.write(k, v)
        keys.append(k)
        bad.append(fault)
        step += t
    if not bank.allocated:
        assert total == 0
        return
    all_k, all_bad = torch.cat(keys, dim=2), torch.cat(bad, dim=2)
    st_ = bank.state_dict()
    assert int(st_["telemetry"].sum()) == b * h * total and int(st_["telemetry"][4]) == int(all_bad.sum())
    for r in range(b):
        for hh in range(h):
            for i in range(slots):
                c = int(st_["counts"][r, hh, i])
                if c == 0:
                    continue
                members = st_["values"][r, hh, i] > 0
                assert int(members.sum()) == c
                assert not bool(all_bad[r, hh][members].any()), "a skipped token was merged"
                assert torch.allclose(st_["values"][r, hh, i][members], torch.full((c,), 1.0 / c, dtype=torch.float64))
                assert torch.allclose(st_["keys"][r, hh, i], all_k[r, hh][members].mean(0), atol=1e-9)
                assert int(st_["ages"][r, hh, i]) == total - 1 - int(members.nonzero().max())
    assert torch.isfinite(st_["keys"]).all() and torch.isfinite(st_["values"]).all()


@settings(max_examples=40, deadline=None)
@given(lengths=st.lists(st.integers(0, 9), min_size=1, max_size=6), length=st.integers(1, 12),
       seed=st.integers(0, 2**16))
def test_token_store_and_raw_window_hold_exactly_what_they_should(lengths, length, seed):
    """TokenStore: every token, valid exactly where finite, nothing non-finite stored. RawWindow
    (recurrent / sliding): exactly the last `length` tokens, never more (fixed size once full),
    non-finite ones as null tokens, counted."""
    from camelot.memory import RawWindow, TokenStore

    g = torch.Generator().manual_seed(seed)
    store, window = TokenStore(), RawWindow(length)
    ks, vs, fins = [], [], []
    for t in lengths:
        k, v = torch.randn(1, 2, t, 4, generator=g), torch.randn(1, 2, t, 3, generator=g)
        k[..., 0] = torch.where(torch.rand(1, 2, t, generator=g) < 0.2, float("nan"), k[..., 0])
        store.write(k, v)
        window.write(k, v)
        ks.append(k)
        vs.append(v)
        fins.append(torch.isfinite(k).all(-1))
        assert window.size == min(length, sum(x.shape[2] for x in ks))
    all_k, all_v, fin = torch.cat(ks, 2), torch.cat(vs, 2), torch.cat(fins, 2)
    if sum(lengths):
        keys, values, _, valid = store.readable()
        assert torch.equal(valid, fin)
        assert torch.isfinite(keys).all() and torch.equal(keys[fin], all_k[fin])
        assert torch.equal(values[fin], all_v[fin])
        assert int(store.telemetry[1]) == int(fin.sum()) and int(store.telemetry[4]) == int((~fin).sum())
        last = fin[:, :, -length:, None]  # non-finite tokens are kept as null tokens (zero key and value)
        assert torch.equal(window.keys, torch.where(last, all_k[:, :, -length:], 0))
        assert torch.equal(window.values, torch.where(last, all_v[:, :, -length:], 0))
        assert int(window.skipped) == int((~fin).sum())


# ---------------------------------------------------------------------------- CI-sized soak
def test_soak_state_and_rss_stay_flat_once_the_memory_is_full():
    """`camelot soak` in small: ~50k tokens through a tiny llama with camelot. Once the bank is
    full (threshold 0.99: nearly every token is novel, so it fills in the first interval), the
    memory's size does not move by a byte, RSS stays within noise, and no interval turns NaN.
    The knn run beside it grows by design and shows the measure would catch growth."""
    from camelot.eval.soak import run_soak, state_bytes, summarize

    window, slots, every = 64, 128, 64 * 64
    src = torch.randint(0, 101, (7919,), generator=torch.Generator().manual_seed(0))
    cm = camelot.wrap(tiny_llama(), CamelotConfig(window=window, slots=slots, read_top_k=4, threshold=0.99, recent=0,
                                                  sink=0))
    reports = run_soak(cm, src, 12 * every, every, progress=False)
    full = 2 * 2 * slots  # layers x KV heads x slots
    assert [r.slots_used for r in reports] == [full] * len(reports)
    assert len({r.state_mb for r in reports}) == 1  # not one byte of growth
    summary = summarize(reports)
    assert summary["tokens"] == 12 * every and not summary["any_nan_ppl"]
    assert summary["rss_growth_mb"] < 10, summary  # a leak of one token's KV per step would be ~25 MiB here
    assert state_bytes(cm, include_open=True) >= state_bytes(cm)
    tel = cm.memory.telemetry()
    assert sum(tel.values()) == 2 * 2 * (12 * every // window) * window  # every token accounted for, per layer x head
    cm.unwrap()

    knn = camelot.wrap(tiny_llama(), CamelotConfig(window=window, slots=slots, read_top_k=4, strategy="knn"))
    grown = run_soak(knn, src, 3 * every, every, progress=False)
    assert grown[-1].state_mb > grown[0].state_mb > 0  # unbounded by design: the check can fail
