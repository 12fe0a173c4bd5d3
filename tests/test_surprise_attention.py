"""importance "surprise+attention": the span reserve ranks tokens by the model's surprise (the
facts it keeps), the consolidated slots by the attention their tokens received (recent use), in
one bank; the layer hands both, [..., 2] in that order. And the surprise reserve's ranking,
which is the same for every layer, made once per segment (reserve_write.LAST_CHOICE)."""

from __future__ import annotations

import pytest
import torch

import camelot
from camelot.memory import SlotBank
from camelot.memory.rules import WriteRule
from tests.conftest import tiny_llama

RULE = {"span_reserve": 6, "span": 4, "span_follow": 2, "span_score": "scan", "evict": "use"}


def _segments(n: int = 6, t: int = 10, d: int = 8, seed: int = 0) -> list[tuple[torch.Tensor, ...]]:
    """n writes of t tokens into 2 heads: keys, values, surprise, attention, and the same for the
    4 tokens still raw after them."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        k = torch.randn(1, 2, t, d, generator=g)
        s, a = torch.rand(1, 2, t + 4, generator=g) * 6, torch.rand(1, 2, t + 4, generator=g) * 3
        out.append((k, k.flip(-1), s, a))
    return out


def _feed(rule: dict, signals: str, segments: list) -> SlotBank:
    """signals: which importance each write is handed ("s", "a", "sa": both channels, "ss": the
    surprise in both)."""
    bank = SlotBank(14, 0.5, rule=WriteRule(**RULE, **rule))
    pick = {"s": lambda s, a: s, "a": lambda s, a: a, "sa": lambda s, a: torch.stack([s, a], -1),
            "ss": lambda s, a: torch.stack([s, s], -1)}[signals]
    for k, v, s, a in segments:
        imp = pick(s, a)
        bank.write(k, v, received=imp[:, :, : k.shape[2]], following=imp[:, :, k.shape[2]:])
    return bank


def test_it_goes_with_one_signal_scans_and_the_layer_hands_both():
    rule = WriteRule(**RULE, importance="surprise+attention")
    assert rule.signals == 2 and rule.reserve_signals == 1
    with pytest.raises(ValueError, match="importance question\\+surprise goes with span_score"):
        WriteRule(**{**RULE, "span_score": "scan+scan"}, importance="surprise+attention")
    bank = SlotBank(14, 0.5, rule=rule)
    assert bank.wants_surprise and bank.wants_received and not bank.wants_question
    assert bank.wanted == ("surprise", "attention")


def test_the_same_signal_in_both_channels_is_the_surprise_write_exactly():
    segs = _segments()
    both, one = _feed({"importance": "surprise+attention"}, "ss", segs), _feed({"importance": "surprise"}, "s", segs)
    for name in ("keys", "values", "counts", "ages", "score", "span_score", "span_before", "telemetry"):
        assert torch.equal(getattr(both, name), getattr(one, name)), name


def test_the_reserve_ranks_by_the_surprise_and_the_slots_score_by_the_attention():
    segs = _segments()
    both = _feed({"importance": "surprise+attention"}, "sa", segs)
    by_surprise = _feed({"importance": "surprise"}, "s", segs)
    base = both.slots - both.rule.span_reserve
    # the reserve holds what the surprise alone would hold: the same windows, the same tokens
    assert torch.equal(both.span_score, by_surprise.span_score)
    assert torch.equal(both.keys[..., base : both.slots, :], by_surprise.keys[..., base : both.slots, :])
    # each reserve token scores its attention, decayed since it was written (the surprise write: its NLL)
    k, v, s, a = segs[-1]
    last = both.keys[0, :, None, base : both.slots, :] == k[0, :, :, None, :]  # [H, T, places, D]
    h, tok, place = last.all(-1).nonzero(as_tuple=True)
    assert len(h) > 0
    assert torch.allclose(both.score[0, h, base + place], a[0, h, tok])
    assert torch.allclose(by_surprise.score[0, h, base + place], s[0, h, tok])


def _first_importance(importance: str, monkeypatch) -> list[torch.Tensor]:
    """What each layer's bank is handed at its first write (read before any memory existed, so
    every setting sees the same model)."""
    got: list[torch.Tensor] = []
    write = SlotBank.write

    def spy(self, k, v, received=None, following=None):
        got.append(received.clone())
        return write(self, k, v, received, following)

    monkeypatch.setattr(SlotBank, "write", spy)
    cm = camelot.wrap(tiny_llama(), camelot.CamelotConfig(window=8, slots=12, recent=8, sink=0,
                                                          importance=importance))
    cm.feed(torch.randint(0, 101, (1, 17), generator=torch.Generator().manual_seed(4)), progress=False)
    monkeypatch.undo()
    return got[: len(cm.runtimes)]


def test_the_layer_hands_the_surprise_then_the_attention_each_as_alone(monkeypatch):
    both = _first_importance("surprise+attention", monkeypatch)
    surprise = _first_importance("surprise", monkeypatch)
    attention = _first_importance("attention", monkeypatch)
    assert len(both) == len(surprise) == len(attention) > 0
    for b, s, a in zip(both, surprise, attention):
        assert b.shape == (*s.shape, 2)
        assert torch.equal(b[..., 0], s) and torch.allclose(b[..., 1], a)
        assert bool((a > 0).any()) and not torch.allclose(s, a)


def test_the_layers_share_one_reserve_ranking_by_surprise_and_get_what_each_would_rank(monkeypatch):
    """reserve_write.LAST_CHOICE: ranked by surprise every layer asks the same; the answer is
    reused, exactly what each layer's own ranking gives, and no bank shares a tensor."""
    from camelot.memory import reserve_write

    ids = torch.randint(0, 101, (1, 70), generator=torch.Generator().manual_seed(2))
    calls = []
    rank = reserve_write.choose_reserve
    monkeypatch.setattr(reserve_write, "choose_reserve", lambda *a, **k: calls.append(1) or rank(*a, **k))

    def run(share: bool) -> tuple[torch.Tensor, list, int]:
        calls.clear()
        monkeypatch.setattr(reserve_write.LAST_CHOICE, "last", None)
        if not share:
            monkeypatch.setattr(reserve_write, "_same", lambda a, b: False)
        cm = camelot.wrap(tiny_llama(), camelot.CamelotConfig(window=8, slots=12, recent=8, sink=2))
        nll = cm.score(ids, keep_memory=True).token_nll
        banks = [rt.state.memory for rt in cm.runtimes]
        return nll, banks, len(calls)

    shared, banks, n_shared = run(True)
    alone, own, n_alone = run(False)
    assert n_shared * len(banks) == n_alone > 0  # one ranking per segment instead of one per layer
    assert torch.equal(shared, alone)
    for a, b in zip(banks, own):
        assert torch.equal(a.span_score, b.span_score) and torch.equal(a.keys, b.keys)
    scores = [b.span_score for b in banks]
    assert len({s.data_ptr() for s in scores}) == len(scores)
