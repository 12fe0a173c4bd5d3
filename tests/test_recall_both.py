"""Facts and demonstrations in one write: CamelotConfig.recall("both"), whose span reserve ranks
its first half by the model's surprise (a scan, as recall("facts")) and its second half by the
attention single tokens received (as recall("demonstrations")), spans.HALVES["scan+shared"]."""

from __future__ import annotations

import pytest
import torch

import camelot
from camelot.memory.rules import WriteRule
from camelot.memory.spans import choose_reserve, choose_spans
from tests.conftest import tiny_llama

INF = float("-inf")


def _signals(t: int = 40) -> torch.Tensor:
    """[1, 2 heads, t, 2]: a short surprising name at 5-6 (surprise), a label one head attends
    at 30 (attention), flat elsewhere."""
    imp = torch.ones(1, 2, t, 2)
    imp[..., 1] = 0.1
    imp[0, :, 5:7, 0] = 6.0
    imp[0, 1, 30, 1] = 5.0
    return imp


def test_one_half_keeps_the_surprising_fact_the_other_the_attended_label_in_every_head():
    imp, every = _signals(), torch.ones(1, 2, 40, dtype=torch.bool)
    empty = torch.full((1, 2, 17), INF)  # 16 places: 8 per half
    held, slot, score = choose_reserve(empty, imp, every, 8, 100, 999, "scan+shared", follow=2)
    for head in range(2):
        facts = [t for t in held[0, head].nonzero().flatten().tolist() if slot[0, head, t] < 108]
        demos = [t for t in held[0, head].nonzero().flatten().tolist() if slot[0, head, t] >= 108]
        assert 5 in facts and 6 in facts and len(facts) == 8
        assert 30 in demos and 30 not in facts  # shared over heads: head 0 keeps what head 1 attended
        assert len(set(slot[0, head][held[0, head]].tolist())) == 16  # no place given twice
    # the first half is exactly recall("facts")'s choice with 8 places, on the surprise alone
    alone, alone_slot, alone_score = choose_spans(torch.full((1, 2, 9), INF), imp[..., 0], every, 8, 100, 999,
                                                  "scan", follow=2)
    first = held & (slot < 108)
    assert torch.equal(first, alone) and torch.equal(score[..., :8], alone_score[..., :8])
    # the second chooses among the tokens the first did not take, by the attention alone
    rest, _, rest_score = choose_spans(torch.full((1, 2, 9), INF), imp[..., 1], every, 1, 108, 999, "shared",
                                       eligible=~alone)
    assert torch.equal(held & (slot >= 108), rest) and torch.equal(score[..., 8:16], rest_score[..., :8])
    assert score[0, 0, 16] == INF


@pytest.mark.parametrize("how", ["relative", "shared"])
def test_an_empty_carried_context_does_not_inflate_relative_scores(how):
    """-inf windows (no token before the first write) must not count in the write's mean; they
    did (nan_to_num made them the lowest finite float) and scores came out ~1e8."""
    imp, every = torch.rand(1, 2, 12, generator=torch.Generator().manual_seed(0)), torch.ones(1, 2, 12, dtype=bool)
    empty = torch.full((1, 2, 5), INF)
    _, _, plain = choose_spans(empty, imp, every, 2, 0, 99, how)
    _, _, carried = choose_spans(empty, imp, every, 2, 0, 99, how, before=torch.full((1, 2, 7), INF))
    assert torch.equal(plain, carried) and float(plain[torch.isfinite(plain)].max()) < 10


def test_both_goes_with_the_two_halves_ranking_and_only_with_it():
    for bad in ({"importance": "both"}, {"span_score": "scan+shared"}, {"importance": "both", "span_score": "scan"}):
        with pytest.raises(ValueError, match="importance 'both' goes with span_score scan\\+shared"):
            WriteRule(span_reserve=8, **bad)
    rule = WriteRule(span_reserve=8, span=8, span_follow=12, importance="both", span_score="scan+shared")
    assert rule.signals == 2 and rule.span_carried == 19


def _first_write(kind: str, **kw) -> list:
    """Each layer's bank after one write: 2 segments of 8 with a raw tail of 8 -- the tokens written
    were read (scored, attended) before any memory existed, so every preset sees the same signals."""
    cfg = camelot.CamelotConfig.recall(kind, **{"window": 8, "slots": 12, "recent": 8, "sink": 0, **kw})
    cm = camelot.wrap(tiny_llama(), cfg)
    doc = torch.randint(0, 101, (1, 16), generator=torch.Generator().manual_seed(4))
    cm.feed(doc, progress=False)
    return [rt.state.memory for rt in cm.runtimes]


def test_the_layer_hands_both_signals_the_facts_half_chooses_as_recall_facts():
    both = _first_write("both")
    assert both[0].rule.span_reserve == 8 and not both[0].empty
    facts = _first_write("facts", span_reserve=4)  # the first half's 4 places alone
    heard = _first_write("facts", span_reserve=4, importance="attention")  # the attention the same tokens got
    for b, f, a in zip(both, facts, heard):
        assert torch.equal(b.span_before[..., 0], f.span_before)  # surprise: channel 0
        assert torch.equal(b.span_before[..., 1], a.span_before)  # attention: channel 1
        assert torch.equal(b.span_score[..., :4], f.span_score[..., :4])
        assert bool(torch.isfinite(b.span_score[..., 4:8]).all())  # the demonstrations half took the other 4
