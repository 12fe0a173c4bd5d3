"""A question and the model's surprise rank one reserve: CamelotConfig.recall("question+facts"),
whose first half ranks by the scan of the question's logits (as recall("question")) and whose
second half, among the tokens the first did not take, by the scan of the surprise (as
recall("facts")): spans.HALVES["scan+scan"]."""

from __future__ import annotations

import pytest
import torch

import camelot
from camelot.memory import SlotBank
from camelot.memory.rules import WriteRule
from camelot.memory.spans import choose_reserve, choose_spans
from tests.conftest import tiny_llama

INF = float("-inf")
QUESTION = [5, 17, 33, 8, 60, 2]


def _signals(t: int = 40) -> torch.Tensor:
    """[1, 2 heads, t, 2]: the question singles out 20-21 in head 1 only; the surprise a name at
    5-6 in both heads; flat elsewhere."""
    imp = torch.ones(1, 2, t, 2)
    imp[0, 1, 20:22, 0] = 9.0
    imp[0, :, 5:7, 1] = 6.0
    return imp


def test_each_half_scans_its_own_signal_and_the_second_takes_only_what_the_first_left():
    imp, every = _signals(), torch.ones(1, 2, 40, dtype=torch.bool)
    empty = torch.full((1, 2, 17), INF)  # 16 places: 8 per half
    held, slot, score = choose_reserve(empty, imp, every, 8, 100, 999, "scan+scan", follow=2)
    first, alone_score = choose_spans(torch.full((1, 2, 9), INF), imp[..., 0], every, 8, 100, 999, "scan",
                                      follow=2)[0::2]
    assert torch.equal(held & (slot < 108), first) and torch.equal(score[..., :8], alone_score[..., :8])
    assert bool(first[0, 1, 20:22].all()) and not bool(first[0, 1, 5:7].any())  # head 1: the question's tokens
    rest, _, rest_score = choose_spans(torch.full((1, 2, 9), INF), imp[..., 1], every, 8, 108, 999, "scan",
                                       follow=2, eligible=~first)
    assert torch.equal(held & (slot >= 108), rest) and torch.equal(score[..., 8:16], rest_score[..., :8])
    assert bool(held[0, :, 5:7].all())  # the surprising name in both heads, from one half or the other
    for head in range(2):
        assert len(set(slot[0, head][held[0, head]].tolist())) == int(held[0, head].sum()) == 16
    assert score[0, 0, 16] == INF


def test_two_importances_go_with_the_two_scans_and_only_with_them():
    for bad in ({"importance": "question+surprise"}, {"span_score": "scan+scan"},
                {"importance": "question+surprise", "span_score": "scan"}):
        with pytest.raises(ValueError, match="importance question\\+surprise goes with span_score scan\\+scan"):
            WriteRule(span_reserve=8, **bad)
    rule = WriteRule(span_reserve=8, span=8, span_follow=12, importance="question+surprise", span_score="scan+scan")
    assert rule.signals == 2 and rule.span_carried == 19
    bank = SlotBank(16, 0.9, rule=rule)
    assert bank.wants_question and bank.wants_surprise and not bank.wants_received


def _first_write(kind: str, **kw) -> list:
    """Each layer's bank after its first write (2 segments of 8, a raw tail of 8): the tokens
    written were read before any memory existed, so every preset is handed the same signals."""
    cfg = camelot.CamelotConfig.recall(kind, **{"window": 8, "slots": 12, "recent": 8, "sink": 0, **kw})
    cm = camelot.wrap(tiny_llama(), cfg)
    if cm.ranks_by_question:
        cm.set_question(QUESTION)
    cm.feed(torch.randint(0, 101, (1, 16), generator=torch.Generator().manual_seed(4)), progress=False)
    return [rt.state.memory for rt in cm.runtimes]


def test_the_layer_hands_the_question_then_the_surprise_and_the_first_half_chooses_as_recall_question():
    both = _first_write("question+facts")
    assert both[0].rule.span_reserve == 8 and not both[0].empty
    asked = _first_write("question", span_reserve=4)  # the first half's 4 places alone
    surprised = _first_write("facts", span_reserve=4)
    for b, q, s in zip(both, asked, surprised):
        assert torch.equal(b.span_before[..., 0], q.span_before)  # the question's logits: channel 0
        assert torch.equal(b.span_before[..., 1], s.span_before)  # the NLL: channel 1
        assert torch.equal(b.span_score[..., :4], q.span_score[..., :4])
        assert bool(torch.isfinite(b.span_score[..., 4:8]).all())  # the surprise half took 4 others


def test_feeding_without_a_question_is_refused_before_any_change():
    cm = camelot.wrap(tiny_llama(), camelot.CamelotConfig.recall("question+facts", window=16, slots=12))
    with pytest.raises(ValueError, match="set_question"):
        cm.feed(torch.randint(0, 101, (1, 40)), progress=False)
    assert cm.open_len == 0 and all(not rt.state.memory.allocated for rt in cm.runtimes)


def test_two_signals_roundtrip_through_the_banks_state():
    rule = WriteRule(span_reserve=6, span=2, importance="question+surprise", span_score="scan+scan")
    bank = SlotBank(12, 0.99, rule=rule)
    g = torch.Generator().manual_seed(0)
    k = torch.randn(1, 2, 5, 8, generator=g)
    bank.write(k, k, received=torch.rand(1, 2, 5, 2, generator=g))
    state = bank.state_dict()
    assert state["span_score"].shape == (1, 2, 6 + rule.span_carried * 2)
    loaded = SlotBank(12, 0.99, rule=rule)
    loaded.load_state_dict(state)
    assert torch.equal(loaded.span_score, bank.span_score) and torch.equal(loaded.span_before, bank.span_before)
    assert loaded.span_before.shape == (1, 2, rule.span_carried, 2)


def test_joint_scan_ranks_windows_by_their_two_scans_in_standard_deviations():
    """One ranking of both signals: a window's scan of each signal over that signal's spread in
    the context, summed; a pair of tokens high on both beats pairs high on one alone."""
    g = torch.Generator().manual_seed(1)
    imp = torch.ones(1, 2, 40, 2) + 0.1 * torch.rand(1, 2, 40, 2, generator=g)
    imp[0, :, 10:12, 0] = 5.0  # the question alone
    imp[0, :, 25:27, 1] = 5.0  # the surprise alone
    imp[0, :, 33:35, :] = 3.5  # both, each lower
    every = torch.ones(1, 2, 40, dtype=torch.bool)
    held, _, score = choose_spans(torch.full((1, 2, 3), INF), imp, every, 2, 0, 99, "joint-scan")
    assert held[0, :].nonzero()[:, 1].tolist() == [33, 34, 33, 34]
    z = (imp - imp.mean(2, keepdim=True)) / imp.std(2, unbiased=False, keepdim=True)
    pair = z[0, :, 33] + z[0, :, 34]  # the window of 2 at 33, per head and signal
    assert torch.allclose(score[0, :, :2].amax(-1), pair.sum(-1) / 2 ** 0.5, atol=1e-5)
    with pytest.raises(ValueError, match="goes with span_score scan\\+scan or joint-scan"):
        WriteRule(span_reserve=8, span_score="joint-scan")
    rule = WriteRule(span_reserve=8, importance="question+surprise", span_score="joint-scan")
    assert rule.signals == 2
