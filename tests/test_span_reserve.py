"""The span reserve (WriteRule.span_reserve, camelot/memory/spans.py): the tokens of the most
important windows stay raw, together, in order."""

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


def test_a_token_scores_as_its_best_window_and_the_lowest_held_gives_way_ties_keep_the_held():
    bank = SlotBank(10, 0.99, rule=WriteRule(span_reserve=4, span=2, span_score="sum"))  # four places, slots 6..9
    g = torch.Generator().manual_seed(0)
    w1, w2, w3 = (torch.randn(8, 8, generator=g) for _ in range(3))
    # windows of 2 sum to 3.1 6 3.1 .2 .2 1.1 2: tokens 1, 2 score 6, tokens 0, 3 score 3.1
    _write(bank, w1, torch.tensor([0.1, 3, 3, 0.1, 0.1, 0.1, 1, 1]))
    assert torch.equal(bank.keys[0, 0, 6:10], w1[0:4])  # in token order
    assert bank.span_score[0, 0, :4].tolist() == pytest.approx([3.1, 6, 6, 3.1])
    # windows 4 2 0 .5 1 .5 0: tokens 0, 1 score 4 and take the places of the held 3.1s
    _write(bank, w2, torch.tensor([2, 2, 0, 0, 0.5, 0.5, 0, 0]))
    assert torch.equal(bank.keys[0, 0, 6:10], torch.stack([w2[0], w1[1], w1[2], w2[1]]))
    assert int(bank.counts[0, 0, 6:10].sum()) == 4 and int(bank.counts[0, 0, :6].sum()) == 6  # 16 - 4 kept raw
    _write(bank, w3, torch.tensor([0, 0, 0, 2, 2, 0, 0, 0]))  # new 4s tie the held 4s: the held stay
    assert torch.equal(bank.keys[0, 0, 6:10], torch.stack([w2[0], w1[1], w1[2], w2[1]]))
    t = bank.telemetry.tolist()
    # every token accounted for once, none skipped (the two the reserve displaced, w1[0] and w1[3],
    # went on to the consolidated slots uncounted)
    assert t[1] + t[2] + t[0] + t[3] == 24 and t[4] == 0


def test_a_fact_across_two_windows_is_kept_whole_where_a_fixed_grid_cut_it():
    from camelot.memory.spans import choose_spans

    imp = torch.zeros(1, 1, 16)
    imp[0, 0, 2:8] = torch.tensor([9.0, 9, 1, 1, 1, 1])  # a surprising start, then the fact's tail
    held, slot, _ = choose_spans(torch.full((1, 1, 9), float("-inf")), imp, torch.ones_like(imp, dtype=torch.bool),
                                 4, 0, 99, "sum")
    assert held[0, 0, 2:8].all()  # token 7's best window (4..7) scores 4: above every window of zeros
    assert len(set(slot[0, 0][held[0, 0]].tolist())) == int(held[0, 0].sum())  # one slot per token
    nonfinite = torch.ones_like(imp, dtype=torch.bool)
    nonfinite[0, 0, 3] = False
    held, _, _ = choose_spans(torch.full((1, 1, 9), float("-inf")), imp, nonfinite, 4, 0, 99, "sum")
    assert not held[0, 0, 3]  # a skipped token is never kept


def test_a_peak_score_keeps_a_rare_name_among_predictable_words_that_a_sum_drops():
    """A repeated fact: its template is predictable the second time (importance 0.5), only its
    name is surprising (one token at 10). A run of uniformly surprising haystack (3 each) beats
    it by the sum (4 x 3 = 12 against 10 + 1.5) but not by the peak (3 against 10); the peak
    keeps the name with span - 1 tokens before it and span - 1 + follow after it."""
    from camelot.memory.spans import choose_spans

    imp = torch.full((1, 1, 24), 0.5)
    imp[0, 0, 0:10] = 3.0  # haystack: every token moderately surprising
    imp[0, 0, 14] = 10.0  # the fact's rare name
    empty, every = torch.full((1, 1, 9), float("-inf")), torch.ones_like(imp, dtype=torch.bool)  # 8 places
    by_sum, _, _ = choose_spans(empty, imp, every, 4, 0, 99, "sum")
    assert by_sum[0, 0, :8].all() and not by_sum[0, 0, 14]
    by_peak, _, score = choose_spans(empty, imp, every, 4, 0, 99, "peak", follow=1)
    assert by_peak[0, 0].nonzero().flatten().tolist() == list(range(11, 19))  # 3 before, 3 + 1 after
    assert torch.equal(score[0, 0, :8], torch.full((8,), 10.0))
    imp[0, 0, 12] = float("-inf")  # a skipped token inside: no window through it counts
    held, _, _ = choose_spans(empty, imp, every & torch.isfinite(imp), 4, 0, 99, "peak")
    assert not held[0, 0, 11:13].any() and held[0, 0, 14]


def test_sum_plus_peak_keeps_the_surprising_run_in_one_half_and_the_name_in_the_other():
    from camelot.memory.spans import PEAK_SPAN, choose_reserve

    imp = torch.full((1, 1, 40), 0.5)
    imp[0, 0, 0:10] = 3.0  # a surprising run: the sum's pick
    imp[0, 0, 24] = 10.0  # a rare name among predictable words: only the peak picks it
    empty, every = torch.full((1, 1, 17), float("-inf")), torch.ones_like(imp, dtype=torch.bool)  # 16 places
    held, slot, score = choose_reserve(empty, imp, every, 4, 100, 999, "sum+peak")
    taken = held[0, 0].nonzero().flatten().tolist()
    by_sum = [t for t in taken if slot[0, 0, t] < 108]
    by_peak = [t for t in taken if slot[0, 0, t] >= 108]
    assert len(taken) == 16 and len(set(slot[0, 0][held[0, 0]].tolist())) == 16  # no token held twice
    assert by_sum == list(range(8)) and 24 in by_peak and by_peak[0] == 24 - (PEAK_SPAN - 1)
    assert torch.equal(score[0, 0, 8:16], torch.full((8,), 10.0)) and score[0, 0, 16] == float("-inf")


def test_span_alone_changes_nothing_and_bad_reserves_are_refused():
    assert WriteRule(span=16).plain and not WriteRule(span_reserve=16, span=16).plain
    for bad in ({"span": 0}, {"span_reserve": True}, {"span_reserve": -8}):
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


def test_only_rules_that_place_by_slot_scores_make_reads_report_their_mass():
    """The read's per-slot attention mass feeds evict=use and protect; a reserve alone ranks
    incoming tokens only, so its reads skip that work."""
    assert not SlotBank(12, 0.9, rule=WriteRule(span_reserve=4, importance="surprise")).observes_reads
    assert SlotBank(12, 0.9, rule=WriteRule(evict="use")).observes_reads
    assert SlotBank(12, 0.9, rule=WriteRule(protect=2.0, span_reserve=4)).observes_reads


@pytest.mark.parametrize("context", [False, True])
def test_a_window_cut_by_a_segment_boundary_is_judged_whole(context):
    """A fact whose 6 important tokens straddle two writes (3 + 3): with the importance of the
    tokens written before and still to come, its window (6 x 9 = 54) beats the held window (30)
    and all 6 tokens are kept in order; judged inside each write alone its halves score 30 at
    best, tie with the held window and are dropped (a needle cut by a segment boundary)."""
    bank = SlotBank(10, 0.99, rule=WriteRule(span_reserve=6, span=6, span_score="sum"))
    g = torch.Generator().manual_seed(0)
    held, a, b = (torch.randn(6, 8, generator=g) for _ in range(3))
    ones, nines = torch.ones(3), torch.full((3,), 9.0)
    imp_a, imp_b = torch.cat([ones, nines]), torch.cat([nines, ones])
    _write(bank, held, torch.full((6,), 5.0))
    bank.write(a[None, None], a[None, None] * 2, received=imp_a[None, None],
               following=imp_b[None, None] if context else None)
    if not context:  # forget the carried past: each write judged alone, as before the context was carried
        bank.span_before.fill_(float("-inf"))
    _write(bank, b, imp_b)
    fact = torch.cat([a[3:], b[:3]])
    kept = bank.keys[0, 0, 4:10]
    if context:
        where = 4 + (kept[:, None] - fact[None]).abs().amax(-1).argmin(0)  # the slot of each fact token
        assert torch.equal(bank.keys[0, 0, where], fact)  # all 6 kept raw
        pos = bank.positions()[0, 0, where]
        assert torch.equal(pos, pos[0] + torch.arange(6))  # each at its own place: recency placement keeps the order
    else:
        assert torch.equal(kept, held)


def test_span_follow_keeps_the_tokens_after_a_winning_window():
    """span 4, importance 1 1 9 9 9 9 1 1 1 1 into 6 places: by the window alone the fact and one
    token on each side stay (1..6, both 28); with span_follow=2 a token also scores as the windows
    ending 2 tokens before it, so the fact and the two tokens after it stay (2..7, all 36)."""
    g = torch.Generator().manual_seed(0)
    k = torch.randn(10, 8, generator=g)
    imp = torch.tensor([1, 1, 9, 9, 9, 9, 1, 1, 1, 1.0])
    for follow, kept in [(0, range(1, 7)), (2, range(2, 8))]:
        bank = SlotBank(10, 0.99, rule=WriteRule(span_reserve=6, span=4, span_score="sum", span_follow=follow))
        _write(bank, k, imp)
        assert torch.equal(bank.keys[0, 0, 4:10], k[list(kept)])
    with pytest.raises(ValueError, match="span_follow"):
        WriteRule(span_follow=-1)


def test_span_apart_keeps_a_short_fact_that_a_long_surprising_passage_would_crowd_out():
    """A 40-token passage, every window of it more surprising than a 2-token fact's best window,
    and 8 places: ranked window by window the passage fills them; with span_apart its windows
    give way to its best one within 8 tokens, and the fact gets in beside the passage's best run."""
    from camelot.memory.spans import choose_spans, span_context

    imp = 0.5 + 0.001 * torch.arange(120.0)  # no two windows tie
    imp[:40] += 2.5 + 0.01 * torch.arange(40.0)  # the passage: windows of 12-14
    imp[80:82] += 3.5  # the fact: its best window 9.3
    imp = imp[None, None]
    empty, every = torch.full((1, 1, 9), float("-inf")), torch.ones_like(imp, dtype=torch.bool)
    plain, _, _ = choose_spans(empty, imp, every, 4, 0, 99, "sum")
    apart, _, score = choose_spans(empty, imp, every, 4, 0, 99, "sum", apart=8)
    assert plain[0, 0].nonzero().flatten().tolist() == list(range(32, 40))
    kept = apart[0, 0].nonzero().flatten().tolist()
    assert kept[:4] == list(range(36, 40)) and {80, 81} <= set(kept[4:])  # the passage's best run, then the fact
    assert span_context(4, 2, "sum", apart=8) == 3 + 2 + 8  # rivals of the first window are carried too


@pytest.mark.parametrize("apart", [0, 6])
def test_the_reserve_ends_with_the_same_scores_written_at_once_or_segment_by_segment(apart):
    """The carried context (span - 1 + follow + apart tokens before, the raw tokens after) makes
    each token's score, rivals included, independent of where segments are cut: the reserve
    ends with the same scores."""
    g = torch.Generator().manual_seed(0)
    k, imp = torch.randn(96, 8, generator=g), torch.rand(96, generator=g) * 4
    rule = WriteRule(span_reserve=12, span=4, span_follow=3, span_apart=apart, span_score="sum")
    held = []
    for cuts in ([0, 96], [0, 10, 35, 36, 64, 96], list(range(0, 97, 8))):
        bank = SlotBank(16, 0.99, rule=rule)
        for a, e in zip(cuts, cuts[1:]):
            bank.write(k[None, None, a:e], k[None, None, a:e], received=imp[None, None, a:e],
                       following=imp[None, None, e:] if e < 96 else None)
        held.append(bank.span_score[0, 0, :12].sort().values)  # (tied tokens may differ: a window's share its score)
    assert torch.isfinite(held[0]).all() and torch.equal(held[0], held[1]) and torch.equal(held[0], held[2])


def _scan_reference(imp: list[float], span: int, follow: int) -> list[float]:
    """Token by token: the best (sum - length * mean) / sqrt(length) over the windows of each
    length in 2, 4, ... span that keep the token (start up to length - 1 + follow before it)."""
    from camelot.memory.spans import scan_lengths

    mean, t, out = sum(imp) / len(imp), len(imp), []
    for x in range(t):
        best = float("-inf")
        for w in scan_lengths(span):
            for s in range(max(0, x - w + 1 - follow), min(x, t - w) + 1):
                best = max(best, (sum(imp[s : s + w]) - w * mean) / w**0.5)
        out.append(best)
    return out


def test_scan_lengths_are_powers_of_two_up_to_the_span():
    from camelot.memory.spans import scan_lengths

    assert scan_lengths(8) == [2, 4, 8] and scan_lengths(12) == [2, 4, 8, 12] and scan_lengths(2) == [2]


def test_a_scan_score_is_each_tokens_best_excess_window_of_any_length():
    from camelot.memory.spans import choose_spans

    imp = torch.rand(40, generator=torch.Generator().manual_seed(5)) * 6
    empty = torch.full((1, 1, 41), float("-inf"))
    held, _, score = choose_spans(empty, imp[None, None], torch.ones(1, 1, 40, dtype=torch.bool), 8, 0, 99, "scan",
                                  follow=3)
    assert held.all()  # room for every token: each one's score is kept as computed
    assert score[0, 0, :40].tolist() == pytest.approx(_scan_reference(imp.tolist(), 8, 3), abs=1e-5)


def test_a_scan_keeps_a_short_surprising_name_and_its_value_that_a_sum_of_long_windows_drops():
    """A rare two-token name (8 nats each) with its value after it (tokens as surprising as the
    text), against a 40-token passage a little more surprising than the text throughout: a long
    window of the passage sums to more than any window holding the name, so "sum" (same span and
    follow) fills the reserve with the passage; the scan compares the name's two-token burst with the passage on
    one scale, and the name wins with the value after it."""
    from camelot.memory.spans import choose_spans

    imp = torch.full((200,), 3.0) + 0.001 * torch.arange(200.0)  # no two windows tie
    imp[20:60] += 1.5  # the passage
    imp[130:132] = 8.0  # the name; 132..143 its value, ordinary tokens
    empty, every = torch.full((1, 1, 15), float("-inf")), torch.ones(1, 1, 200, dtype=torch.bool)
    by_sum, _, _ = choose_spans(empty, imp[None, None], every, 8, 0, 99, "sum", follow=12)
    by_scan, _, _ = choose_spans(empty, imp[None, None], every, 8, 0, 99, "scan", follow=12)
    assert not by_sum[0, 0, 130:144].any()
    assert by_scan[0, 0, 130:144].all()


@pytest.mark.parametrize("how", ["relative", "shared"])
def test_an_empty_carried_context_does_not_inflate_relative_scores(how):
    """-inf windows (no token before a document's first write) must not count in the write's mean;
    they did (nan_to_num made them the lowest finite float) and scores came out ~1e8, so the first
    write's tokens held their places for good."""
    from camelot.memory.spans import choose_spans

    imp = torch.rand(1, 2, 12, generator=torch.Generator().manual_seed(0))
    every, empty = torch.ones(1, 2, 12, dtype=torch.bool), torch.full((1, 2, 5), float("-inf"))
    _, _, plain = choose_spans(empty, imp, every, 2, 0, 99, how)
    _, _, carried = choose_spans(empty, imp, every, 2, 0, 99, how, before=torch.full((1, 2, 7), float("-inf")))
    assert torch.equal(plain, carried) and float(plain[torch.isfinite(plain)].max()) < 10


class _TorchOnly(SlotBank):
    def _native_bookkeeping(self, *args) -> bool:
        return False


@pytest.mark.parametrize("bank_type", [SlotBank, _TorchOnly])
@pytest.mark.parametrize("displaced", ["drop", "consolidate", "place"])
def test_a_displaced_reserve_token_joins_the_consolidated_slots_with_its_age_and_score(bank_type, displaced):
    """A better window takes the reserve's one place: "consolidate" writes the token it displaces
    into a free consolidated slot (count 1, its key and value, as old as it is, the score it
    held; "place" too, never merged); "drop" loses it. Kernel and torch write alike."""
    rule = WriteRule(span_reserve=1, span=1, span_score="sum", importance="surprise", evict="use", use_decay=1.0,
                     span_displaced=displaced)
    bank = bank_type(4, 1.0, rule=rule)
    x, y, z = _fact()[:3]
    _write(bank, x[None], torch.tensor([5.0]))  # the reserve takes x
    assert torch.equal(bank.keys[0, 0, 3], x) and int(bank.counts[0, 0, :3].sum()) == 0
    bank.observe_reads(torch.tensor([[[0.0, 0.0, 0.0, 0.25]]]))  # x was read: its score is 5.25
    _write(bank, torch.stack([z, y]), torch.tensor([0.5, 9.0]))  # y displaces x; z is plain
    assert torch.equal(bank.keys[0, 0, 3], y)
    where = [j for j in range(3) if int(bank.counts[0, 0, j]) and torch.equal(bank.keys[0, 0, j], x)]
    if displaced == "drop":
        assert not where and int(bank.counts[0, 0, :3].sum()) == 1  # only z
        return
    (j,) = where
    assert torch.equal(bank.values[0, 0, j], 2 * x) and int(bank.counts[0, 0, :3].sum()) == 2
    assert int(bank.ages[0, 0, j]) == 2  # written one write (1 token) and two tokens ago
    assert float(bank.score[0, 0, j]) == pytest.approx(5.25)
    assert bank.telemetry.tolist() == [0, 3, 0, 0, 0]  # x, z, y: x counted as it arrived, not as it moved


@pytest.mark.parametrize("bank_type", [SlotBank, _TorchOnly])
def test_a_displaced_token_merges_with_consolidate_and_keeps_a_slot_of_its_own_with_place(bank_type):
    """The displaced x has a twin in the consolidated slots: "consolidate" merges it there (count
    2), "place" (the default) gives it a slot of its own beside the twin."""
    x, y, z = _fact()[:3]
    counts = {}
    for displaced in ("consolidate", "place"):
        rule = WriteRule(span_reserve=1, span=1, span_score="sum", importance="surprise", evict="use",
                         span_displaced=displaced)
        bank = bank_type(4, 0.99, rule=rule)
        _write(bank, torch.stack([x, z]), torch.tensor([5.0, 0.1]))  # x to the reserve, z consolidated
        _write(bank, x[None], torch.tensor([0.2]))  # x's twin, not surprising: consolidated
        _write(bank, y[None], torch.tensor([9.0]))  # y displaces x
        assert torch.equal(bank.keys[0, 0, 3], y)
        counts[displaced] = sorted(int(c) for c in bank.counts[0, 0, :3])
    assert counts == {"consolidate": [0, 1, 2], "place": [1, 1, 1]}
