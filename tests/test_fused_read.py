"""The every-slot read through torch's fused CPU attention: joined with the plain keys by
log-sum-exp, it is the same attention as the explicit [queries x slots] softmax."""

from __future__ import annotations

import pytest
import torch

import camelot.reads.dense as dense
from camelot.attention import LayerRuntime
from camelot.memory import RawWindow, SlotBank
from camelot.reads.base import AttendedResult, DenseResult
from camelot.search import TorchBf16Search, TorchExactSearch

pytestmark = pytest.mark.skipif(dense._FLASH_CPU is None, reason="this torch has no fused CPU attention op")


def _runtime(search, record_reads=False, seed=0, b=2, hkv=2, s=40, d=16):
    g = torch.Generator().manual_seed(seed)
    bank = SlotBank(s, 0.99, torch.float32)
    counts = torch.randint(1, 6, (b, hkv, s), generator=g)
    counts[1, 1] = 0  # row 1, head 1: an empty bank beside full ones
    counts[0, 0, s // 2:] = 0  # row 0, head 0: half used
    bank.load_state_dict({"keys": torch.randn(b, hkv, s, d, generator=g),
                          "values": torch.randn(b, hkv, s, d, generator=g), "counts": counts,
                          "ages": torch.zeros(b, hkv, s).long(), "telemetry": torch.zeros(5).long()})
    tail = RawWindow(6)
    tail.write(torch.randn(b, hkv, 6, d, generator=g), torch.randn(b, hkv, 6, d, generator=g))
    return LayerRuntime.build(0, None, bank, tail, search, top_k=None, distance=0, count_bias=0.7,
                              record_reads=record_reads)


def _attend(rt, seed=1, b=2, hq=6, hkv=2, m=5, d=16):
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(b, h, m, d, generator=g) * 2 for h in (hq, hkv, hkv))
    return rt.attend(q, k, v, d ** -0.5, None, None)


def test_fused_every_slot_read_equals_the_explicit_softmax(monkeypatch):
    rt = _runtime(TorchExactSearch())
    seen = []
    original = rt.read.select
    rt.read.select = lambda *a, **kw: seen.append(original(*a, **kw)) or seen[-1]
    fused = _attend(rt)
    assert isinstance(seen[-1], AttendedResult)
    monkeypatch.setattr(dense, "_FLASH_CPU", None)
    rt.state.local_k = rt.state.local_v = None  # the same open segment again
    explicit = _attend(rt)
    assert isinstance(seen[-1], DenseResult)
    assert torch.allclose(fused, explicit, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(fused[1], _window_only(), atol=1e-2)  # memory did change the output


def _window_only():
    rt = LayerRuntime.build(0, None, None, None, TorchExactSearch(), top_k=None, distance=0, count_bias=0.7)
    return _attend(rt)[1]


def test_a_head_with_an_empty_bank_gets_no_weight_from_memory():
    """Row 1, head 1 has no used slot: the fused kernel returns 0 and a log-sum-exp of 0 there,
    which must not take any of the softmax mass."""
    with_mem = _attend(_runtime(TorchExactSearch()))
    rt = _runtime(TorchExactSearch())
    rt.state.memory = None
    tail_only = _attend(rt)
    # [B, m, Hq, D]: query heads 3..5 belong to KV head 1
    assert torch.allclose(with_mem[1, :, 3:], tail_only[1, :, 3:], atol=1e-6)
    assert not torch.allclose(with_mem[1, :, :3], tail_only[1, :, :3], atol=1e-3)


def test_attribution_asks_for_per_slot_probabilities_and_gets_the_same_output():
    fused = _attend(_runtime(TorchExactSearch()))
    rt = _runtime(TorchExactSearch(), record_reads=True)
    recorded = _attend(rt)
    assert torch.allclose(fused, recorded, atol=1e-5)
    share = rt.last_read.weights.sum(-1)  # memory's share of each query's mass, empty head 0
    assert share[1, 1].abs().max() == 0 and share[0, 0].min() > 0


def test_bfloat16_every_slot_read_rounds_scores_but_attends_the_same_slots(monkeypatch):
    exact = _attend(_runtime(TorchExactSearch()))
    fast = _attend(_runtime(TorchBf16Search()))
    err = (fast - exact).norm() / exact.norm()
    assert 0 < err < 2e-2
    monkeypatch.setattr(dense, "_FLASH_CPU", None)  # elsewhere (GPU): bf16 scores, explicit softmax
    explicit = _attend(_runtime(TorchBf16Search()))
    assert 0 < (explicit - exact).norm() / exact.norm() < 2e-2


def test_the_explicit_read_makes_memory_logits_in_place_and_equal_to_the_concatenation(monkeypatch):
    """DenseResult.deferred: every slot's logits go by one baddbmm into the columns the plain
    logits leave for them; bit-identical to making them apart and concatenating."""
    monkeypatch.setattr(dense, "_FLASH_CPU", None)
    rt = _runtime(TorchExactSearch(), record_reads=True)
    seen = []
    original = rt.read.select
    rt.read.select = lambda *a, **kw: seen.append(original(*a, **kw)) or seen[-1]
    in_place = _attend(rt)
    assert seen[-1].deferred is not None and seen[-1].logits is None
    reads = rt.last_read.weights.clone()
    rt.read.select = lambda *a, **kw: seen.append(original(*a, **kw).materialized()) or seen[-1]
    rt.state.local_k = rt.state.local_v = None  # the same open segment again
    joined = _attend(rt)
    assert seen[-1].deferred is None
    assert torch.equal(in_place, joined) and torch.equal(rt.last_read.weights, reads)
