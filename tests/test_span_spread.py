"""The span reserve in rounds over the document's regions (WriteRule.span_spread): a run that was
among the best of its part of the document is not pushed out by better runs from elsewhere
until every region has kept as much."""

from __future__ import annotations

import pytest
import torch

import camelot
from camelot.memory import SlotBank
from camelot.memory.rules import WriteRule, rule_from_config
from camelot.memory.spans import _in_rounds


def _rounds_reference(score: list[float], region: list[int], spread: int) -> list[int]:
    """Candidate by candidate: rank within its region by score (ties: lower index first), round =
    rank // spread; then by round, score, index. Empty (-inf) candidates last, by index."""
    n = len(score)
    finite = [i for i in range(n) if score[i] != float("-inf")]
    rank = {}
    for reg in set(region[i] for i in finite):
        members = sorted((i for i in finite if region[i] == reg), key=lambda i: (-score[i], i))
        rank.update({i: r for r, i in enumerate(members)})
    kept = sorted(finite, key=lambda i: (rank[i] // spread, -score[i], i))
    return kept + [i for i in range(n) if i not in rank]


@pytest.mark.parametrize("seed", range(6))
def test_rounds_match_a_token_by_token_reference(seed):
    g = torch.Generator().manual_seed(seed)
    b, h, n = 2, 3, 40
    score = torch.randint(0, 6, (b, h, n), generator=g).float()  # many ties
    score[torch.rand(b, h, n, generator=g) < 0.2] = float("-inf")
    region = torch.randint(0, 5, (b, h, n), generator=g)
    spread = 1 + seed % 4
    order = score.argsort(dim=-1, descending=True, stable=True)
    got = _in_rounds(order, score, region, spread)
    for i in range(b):
        for j in range(h):
            want = _rounds_reference(score[i, j].tolist(), region[i, j].tolist(), spread)
            assert got[i, j].tolist() == want


def _write(bank: SlotBank, k: torch.Tensor, imp: list[float]) -> None:
    bank.write(k[None, None], k[None, None], received=torch.tensor(imp)[None, None])


@pytest.mark.parametrize("spread", [0, 2])
def test_a_regions_best_run_outlasts_better_runs_from_elsewhere_only_in_rounds(spread):
    """Four reserve places, windows of 2 by their sum. The first write's best run scores 5 (its
    tokens 1, 2), its second 4.5; the second write brings two runs of 6. One ranking keeps the
    second write's four tokens; in rounds of 2 each write keeps its best run first."""
    rule = WriteRule(span_reserve=4, span=2, span_score="sum", span_spread=spread)
    bank = SlotBank(10, 0.99, rule=rule)
    g = torch.Generator().manual_seed(0)
    first, second = torch.randn(8, 8, generator=g), torch.randn(8, 8, generator=g)
    _write(bank, first, [0, 2.5, 2.5, 0, 0, 2.25, 2.25, 0])
    assert torch.equal(bank.keys[0, 0, 6:10], first[[1, 2, 5, 6]])  # one region: rounds change nothing
    _write(bank, second, [0, 3, 3, 0, 0, 3, 3, 0])
    held = {tuple(x.tolist()) for x in bank.keys[0, 0, 6:10]}
    want = second[[1, 2, 5, 6]] if spread == 0 else torch.cat([first[[1, 2]], second[[1, 2]]])
    assert held == {tuple(x.tolist()) for x in want}
    assert sorted(bank.span_score[0, 0, :4].tolist()) == ([6.0] * 4 if spread == 0 else [5.0, 5.0, 6.0, 6.0])


@pytest.mark.parametrize("how", ["scan", "sum+peak"])
def test_a_spread_as_large_as_every_candidate_is_one_ranking(how):
    """...and a small one changes what is held (so the rounds reach the choice, also for the
    rankings that split the reserve in two)."""
    g = torch.Generator().manual_seed(3)
    k, imp = torch.randn(1, 2, 96, 8, generator=g), torch.rand(1, 2, 96, generator=g) * 4
    banks = [SlotBank(24, 0.99, rule=WriteRule(span_reserve=12, span=4, span_follow=2, span_score=how,
                                               importance="surprise", span_spread=s)) for s in (0, 1000, 1)]
    for bank in banks:
        for a in range(0, 96, 16):
            bank.write(k[:, :, a : a + 16], k[:, :, a : a + 16], received=imp[:, :, a : a + 16])
    for name in ("keys", "counts", "ages", "span_score"):
        assert torch.equal(getattr(banks[0], name), getattr(banks[1], name)), name
    assert not torch.equal(banks[0].span_score, banks[2].span_score)


def test_span_spread_is_a_config_field_and_bad_values_are_refused():
    cfg = camelot.CamelotConfig(window=16, slots=48, span_spread=40)
    assert rule_from_config(cfg).span_spread == 40
    for bad in (-1, 2.5, True):
        with pytest.raises((ValueError, TypeError), match="span_spread"):
            WriteRule(span_spread=bad)
