"""The span reserve (WriteRule.span_reserve, camelot/memory/spans.py): whole spans of tokens
that received the most attention stay raw, together, in order."""

from __future__ import annotations

import pytest
import torch

from camelot.memory import SlotBank
from camelot.memory.rules import WriteRule


def _write(bank: SlotBank, k: torch.Tensor, imp: torch.Tensor) -> None:
    bank.write(k[None, None], k[None, None] * 2, received=imp[None, None])


def _fact(d: int = 16) -> torch.Tensor:
    return torch.nn.functional.normalize(torch.randn(4, d, generator=torch.Generator().manual_seed(7)), dim=-1)


def _flood_with_copies(bank: SlotBank, fact: torch.Tensor, segments: int = 30) -> None:
    """Low-importance segments of 8: 4 novel random keys and the 4 fact keys again (which merge
    wherever a slot may take merges)."""
    g = torch.Generator().manual_seed(1)
    for _ in range(segments):
        k = torch.cat([torch.randn(4, fact.shape[-1], generator=g), fact])
        _write(bank, k, torch.full((8,), 0.1))


@pytest.mark.parametrize("reserve", [0, 8])
def test_a_high_attention_span_survives_a_flood_contiguous_and_unmerged(reserve):
    fact = _fact()
    bank = SlotBank(12, 0.99, rule=WriteRule(span_reserve=reserve, span=4))
    noise = torch.randn(4, 16, generator=torch.Generator().manual_seed(3))
    _write(bank, torch.cat([noise, fact]), torch.tensor([0.1] * 4 + [5.0] * 4))
    _flood_with_copies(bank, fact)
    keys, counts = bank.keys[0, 0, :12], bank.counts[0, 0, :12]
    match = (keys[:, None] - fact[None]).abs().amax(-1) < 1e-6  # [slot, fact token]
    raw = match & (counts[:, None] == 1)
    if reserve == 0:  # without the reserve the fact is merged into or evicted: never kept raw in order
        assert not raw.any(0).all()
        return
    where = raw.float().argmax(0)  # the slot holding each fact token raw
    assert raw.any(0).all()
    assert torch.equal(where, where[0] + torch.arange(4))  # contiguous, in order
    assert bool((where >= 12 - reserve).all())  # inside the reserve
    pos = bank.positions()[0, 0, where]
    assert torch.equal(pos, pos[0] + torch.arange(4))  # recency placement keeps their order
    assert torch.equal(bank.values[0, 0, where], fact * 2)


def test_the_lowest_held_span_gives_way_to_a_better_one_and_ties_keep_the_held():
    bank = SlotBank(10, 0.99, rule=WriteRule(span_reserve=4, span=2, span_score="sum"))  # two spans of 2 in slots 6..9
    g = torch.Generator().manual_seed(0)
    spans = [torch.randn(2, 8, generator=g) for _ in range(4)]
    _write(bank, torch.cat(spans[:2]), torch.tensor([0.5, 0.5, 1.5, 1.5]))  # scores 1 and 3
    assert int(bank.counts[0, 0, :6].sum()) == 0  # reserved tokens skip the consolidated part
    _write(bank, torch.cat([spans[2], spans[3]]), torch.tensor([1.0, 1.0, 0.5, 0.5]))  # 2 (better), 1 (tie)
    held = bank.keys[0, 0, 6:10]
    assert torch.equal(held[2:], spans[1])  # score 3 stays where it was
    assert torch.equal(held[:2], spans[2])  # score 2 took the place of score 1
    assert sorted(bank.span_score[0, 0, :2].tolist()) == [2.0, 3.0]
    t = bank.telemetry.tolist()
    assert t[1] + t[2] + t[0] + t[3] == 8 and t[4] == 0  # every token accounted for, none skipped


def test_span_alone_changes_nothing_and_bad_reserves_are_refused():
    assert WriteRule(span=16).plain and not WriteRule(span_reserve=16, span=16).plain
    for bad in ({"span": 0}, {"span_reserve": 6, "span": 4}, {"span_reserve": -8}):
        with pytest.raises(ValueError):
            WriteRule(**bad)
    with pytest.raises(ValueError):
        SlotBank(8, 0.9, rule=WriteRule(span_reserve=8, span=4))


def test_a_shared_score_keeps_in_every_head_the_span_one_head_singled_out():
    g = torch.Generator().manual_seed(0)
    k = torch.randn(1, 2, 8, 8, generator=g)
    imp = torch.ones(1, 2, 8)
    imp[0, 0, 4:] = 9.0  # only head 0 singles out the second span
    kept = {}
    for how in ("relative", "shared"):
        bank = SlotBank(6, 0.99, rule=WriteRule(span_reserve=4, span=4, span_score=how))
        bank.write(k, k, received=imp)
        kept[how] = [torch.equal(bank.keys[0, h, 2:6], k[0, h, 4:]) for h in range(2)]
    assert kept == {"relative": [True, False], "shared": [True, True]}
