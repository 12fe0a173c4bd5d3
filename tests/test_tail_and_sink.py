"""The raw recent tail (`recent`) and attention sinks (`sink`) beside memory: positions exact,
tokens reach memory exactly once, in order, as they leave the tail."""

from __future__ import annotations

import pytest
import torch

import camelot
from camelot import CamelotConfig
from camelot.memory import RawWindow, SinkTokens
from tests.conftest import tiny_llama


def _distinct(n: int, batch: int = 1, vocab: int = 101) -> torch.Tensor:
    """Token ids without repeats: at layer 0 a repeated token has an identical key, which merges
    even at threshold 1.0."""
    g = torch.Generator().manual_seed(0)
    return torch.stack([torch.randperm(vocab, generator=g)[:n] for _ in range(batch)])


def _full_nll(model, ids):
    with torch.no_grad():
        logits = model(ids).logits[:, :-1].float()
    return torch.nn.functional.cross_entropy(logits.transpose(1, 2), ids[:, 1:], reduction="none")


@pytest.mark.parametrize("cfg", [
    dict(strategy="camelot", recent=28, sink=4),
    dict(strategy="knn", recent=28, sink=4),
    dict(strategy="sliding", slots=28, sink=4),
    dict(strategy="recurrent", sink=4, window=16),
], ids=["camelot", "knn", "sliding", "recurrent"])
def test_sink_and_tail_give_full_context_while_the_document_fits(cfg):
    """sink + raw tail + open segment hold every token at its true position while the document
    fits in them (44 tokens: 32 closed = 4 sink + 28 tail, then one segment), so the losses are
    those of one plain forward."""
    model = tiny_llama(max_pos=256)
    ids = _distinct(44 if cfg["strategy"] != "recurrent" else 32, batch=2)
    cm = camelot.wrap(model, CamelotConfig(**{"window": 16, "slots": 8, "read_top_k": 2, **cfg}))
    got = cm.score(ids).token_nll
    assert (got - _full_nll(cm.unwrap(), ids)).abs().max() <= 1e-4
    if cfg["strategy"] in ("camelot", "knn"):  # and nothing reached memory yet
        assert all(rt.state.memory.empty for rt in cm.runtimes)


@pytest.mark.parametrize("strategy, extra", [("camelot", dict(threshold=1.0, slots=96, read_top_k=96, span_reserve=0)),
                                             ("camelot", dict(threshold=1.0, slots=96, read_top_k=96)),  # the default
                                             ("camelot", dict(threshold=1.0, slots=96, read_top_k=96,
                                                              span_displaced="consolidate")),
                                             ("knn", dict(read_top_k=96))])
def test_memory_behind_a_tail_sits_at_its_true_positions(strategy, extra):
    """With recency placement and nothing merged, memory + tail + segment is every past token at
    its true position: full attention, whatever the tail length."""
    model = tiny_llama(max_pos=256)
    ids = _distinct(90)
    cm = camelot.wrap(model, CamelotConfig(window=16, recent=20, sink=0, placement="recency", strategy=strategy,
                                           **extra))
    out = cm.score(ids)
    assert not cm.runtimes[1].state.memory.empty
    assert cm.memory.telemetry()["merged"] == 0
    assert (out.token_nll - _full_nll(cm.unwrap(), ids)).abs().max() <= 1e-4


def test_a_span_reserve_that_drops_what_it_displaces_is_not_full_attention():
    """The counterpart of the test above: with a span reserve (a third of the slots) and
    span_displaced="drop", tokens a better window displaces are lost although the consolidated
    slots had room, so memory + tail + segment is no longer every past token."""
    model = tiny_llama(max_pos=256)
    ids = _distinct(90)
    held, gap = {}, {}
    for displaced in ("drop", "place"):
        cm = camelot.wrap(model, CamelotConfig(window=16, recent=20, sink=0, placement="recency", threshold=1.0,
                                               slots=96, read_top_k=96, span_displaced=displaced))
        nll = cm.score(ids).token_nll
        held[displaced] = cm.runtimes[1].state.memory.counts.sum(-1)  # tokens held per head
        gap[displaced] = (nll - _full_nll(cm.unwrap(), ids)).abs().max()
    assert bool((held["drop"] < held["place"]).any()) and bool((held["drop"] <= held["place"]).all())
    assert gap["drop"] > 1e-3 and gap["place"] <= 1e-4


@pytest.mark.parametrize("placement", ["mixed", "fixed"])
def test_span_reserve_tokens_sit_at_their_true_positions_with_mixed_placement(placement):
    """A span reserve big enough for every token that leaves the tail (windows of one token) holds
    them all raw: with placement="mixed" memory + tail + segment is then every past token at its
    true position (full attention); with "fixed" they all sit at one distance and it is not."""
    model = tiny_llama(max_pos=256)
    ids = _distinct(90)
    cm = camelot.wrap(model, CamelotConfig(window=16, recent=20, sink=0, slots=100, span_reserve=96, span=1,
                                           importance="surprise", span_score="sum", placement=placement,
                                           search="torch"))  # exact read: equality claimed
    out = cm.score(ids)
    bank = cm.runtimes[1].state.memory
    assert not bank.empty and int(bank.counts[..., :4].sum()) == 0  # all in the reserve (slots 4..99)
    gap = (out.token_nll - _full_nll(cm.unwrap(), ids)).abs().max()
    assert gap <= 1e-4 if placement == "mixed" else gap > 1e-3  # the tiny model: 1.4e-3


def test_mixed_placement_puts_merged_slots_at_the_fixed_distance_and_single_tokens_where_they_were():
    from camelot.memory import SlotBank
    from camelot.memory.rules import WriteRule

    g = torch.Generator().manual_seed(0)
    first = torch.randn(1, 1, 3, 8, generator=g)
    for rule in (WriteRule(), WriteRule(span_reserve=2, span=1)):  # the paper's write; beside a span reserve
        bank = SlotBank(12, 0.99, rule=rule)
        k = torch.randn(1, 1, 5, 8, generator=g)
        bank.write(k, k, received=torch.rand(1, 1, 5, generator=g) + 1)  # the reserve (if any) takes 2 of these
        bank.write(first, first, received=torch.full((1, 1, 3), -1.0))  # three raw tokens
        bank.write(first[:, :, :2], first[:, :, :2], received=torch.full((1, 1, 2), -1.0))  # two of them merged into
        _check_mixed_positions(bank)


def _check_mixed_positions(bank) -> None:
    from camelot.positions import Positions

    counts = bank.counts[0, 0, : bank.slots]
    merged, single = counts > 1, counts == 1
    assert int(merged.sum()) == 2 and int(single.sum()) == 6
    pos = Positions(None, distance=50, placement="mixed").memory_positions(bank, tail=7, device=torch.device("cpu"))
    recency = bank.positions() - 7
    assert bool((pos[0, 0][merged] == -50).all())
    assert torch.equal(pos[0, 0][single], recency[0, 0][single]) and bool((recency[0, 0][single] != -50).all())


def test_each_token_reaches_memory_once_when_it_leaves_the_tail():
    model = tiny_llama(layers=2, kv_heads=2)
    cm = camelot.wrap(model, CamelotConfig(window=16, slots=32, read_top_k=2, recent=24, sink=3, threshold=0.5))
    ids = torch.randint(0, 101, (1, 100), generator=torch.Generator().manual_seed(1))
    cm.feed(ids, progress=False)
    tel = cm.memory.telemetry()
    closed = 96  # 6 full segments; 4 tokens stay open
    written = tel["merged"] + tel["new"] + tel["evicted"] + tel["dropped"]
    assert written == (closed - 3 - 24) * 2 * 2  # minus sink and tail, x layers x kv heads
    st = cm.memory.stats()
    assert st["sink_tokens"] == 3 and st["prefix_tokens"] == 24 and st["open_tokens"] == 4


def test_raw_window_returns_what_it_pushes_out_in_order_with_null_tokens_as_nan():
    w = RawWindow(4)
    k = torch.arange(6, dtype=torch.float32).view(1, 1, 6, 1).repeat(1, 1, 1, 2)
    k[0, 0, 1] = float("nan")
    assert w.write(k[:, :, :3], k[:, :, :3]) is None
    out_k, out_v = w.write(k[:, :, 3:], k[:, :, 3:])
    assert out_k[0, 0, :, 0].tolist()[0] == 0.0 and torch.isnan(out_k[0, 0, 1]).all()
    assert torch.equal(w.keys[0, 0, :, 0], torch.tensor([2.0, 3.0, 4.0, 5.0]))
    assert w.skipped == 1


def test_sink_keeps_the_first_tokens_and_passes_on_the_rest():
    s = SinkTokens(3)
    k = torch.arange(5, dtype=torch.float32).view(1, 1, 5, 1)
    rest_k, rest_v = s.write(k[:, :, :2], k[:, :, :2])
    assert rest_k.shape[2] == 0 and s.size == 2
    rest_k, _ = s.write(k[:, :, 2:], k[:, :, 2:])
    assert s.full and s.keys[0, 0, :, 0].tolist() == [0.0, 1.0, 2.0]
    assert rest_k[0, 0, :, 0].tolist() == [3.0, 4.0]


def test_tail_and_sink_are_refused_where_they_make_no_sense():
    with pytest.raises(ValueError, match="recent must be an integer >= 0"):
        CamelotConfig(recent=-1)
    with pytest.raises(ValueError, match="sink must be an integer >= 0"):
        CamelotConfig(sink=-2)


@pytest.mark.parametrize("lazy", [True, False])
def test_lazy_write_with_mixed_placement_is_full_attention_while_the_bank_has_room(lazy):
    """lazy=True: no token merges while its head has a free slot for every token of the segment,
    so a bank with room for the whole document holds it raw, and with placement="mixed" (single
    tokens at their true positions) memory + tail + segment is full attention. The eager write
    merges at threshold 0.3 although slots are free, and is not."""
    model = tiny_llama(max_pos=256)
    ids = _distinct(90)
    cm = camelot.wrap(model, CamelotConfig(window=16, recent=20, sink=0, slots=100, threshold=0.3, lazy=lazy,
                                           span_reserve=0,
                                           placement="mixed", search="torch"))  # exact read: equality claimed
    out = cm.score(ids)
    counts = cm.runtimes[1].state.memory.counts
    assert bool((counts <= 1).all()) == lazy
    gap = (out.token_nll - _full_nll(cm.unwrap(), ids)).abs().max()
    assert gap <= 1e-4 if lazy else gap > 1e-3


def test_lazy_write_merges_once_the_bank_is_full():
    from camelot.memory import SlotBank
    from camelot.memory.rules import WriteRule

    bank = SlotBank(6, 0.99, rule=WriteRule(lazy=True))
    k = torch.randn(1, 1, 3, 8, generator=torch.Generator().manual_seed(0))
    bank.write(k, k)
    bank.write(k, k)  # 3 free slots for 3 tokens: room, so the copies take their own slots
    assert bank.counts[0, 0, :6].tolist() == [1] * 6
    bank.write(k[:, :, :1], k[:, :, :1])  # full: the copy merges
    assert sorted(bank.counts[0, 0, :6].tolist()) == [1, 1, 1, 1, 1, 2]
    assert WriteRule(lazy=True).plain  # the C kernel's bookkeeping still applies


def test_lazy_write_merges_only_what_does_not_fit():
    """3 free slots, 5 tokens of which 4 copy held keys: only 2 merge (the fewest that let the
    segment fit) and the bank ends full; the eager write merges all 4 and leaves 2 slots empty."""
    from camelot.memory import SlotBank
    from camelot.memory.rules import WriteRule

    k = torch.randn(1, 1, 3, 8, generator=torch.Generator().manual_seed(1))
    seg = torch.cat([k, k[:, :, :1], torch.randn(1, 1, 1, 8, generator=torch.Generator().manual_seed(2))], 2)
    for lazy, merged, used in ((True, 2, 6), (False, 4, 4)):
        bank = SlotBank(6, 0.99, rule=WriteRule(lazy=lazy))
        bank.write(k, k)
        bank.write(seg, seg)
        counts = bank.counts[0, 0, :6]
        assert (int(bank.telemetry[0]), int((counts > 0).sum()), int(counts.sum())) == (merged, used, 8)


def test_slots_beyond_the_models_range_keep_their_order_instead_of_one_clamped_position():
    """Recency placement of a document longer than the model's positions: a head with slots beyond
    the range gets them packed one per position behind the tail (order and adjacency kept), not
    all clamped to its edge; heads with every slot in range keep their exact positions."""
    from camelot.positions import packed_beyond

    g = torch.Generator().manual_seed(0)
    limit, tail = 100, 8
    near = -(torch.randperm(60, generator=g)[:20] + 1 + tail)  # every slot in range
    far = -(torch.randperm(5000, generator=g)[:40] + 1 + tail)  # most beyond it
    far[:5] = -torch.arange(3001 + tail, 3006 + tail)  # five tokens written side by side, long ago
    for pos in (near, far):
        got = packed_beyond(pos[None, None], limit, tail)[0, 0]
        assert int(got.max()) <= -(1 + tail) and int(got.min()) >= -limit
        order = (-pos).argsort()
        assert bool((torch.diff(-got[order]) > 0).all())  # the same order, no two at one position
        assert bool((got >= pos).all())  # never placed farther than the token was
    assert torch.equal(packed_beyond(near[None, None], limit, tail)[0, 0], near)
    packed = packed_beyond(far[None, None], limit, tail)[0, 0]
    assert torch.equal(torch.diff(-packed[:5]), torch.ones(4, dtype=packed.dtype))  # still adjacent
    assert sorted((-packed).tolist()) == list(range(tail + 1, tail + 41))  # right behind the tail
    both = packed_beyond(torch.stack([torch.cat([near, near]), far])[None], limit, tail)[0]
    assert torch.equal(both[0], torch.cat([near, near]))  # per head: the in-range one is untouched

    # on a model: every memory key a wrapped layer places is in range and at its own position
    from camelot.positions import Positions

    model = tiny_llama(max_pos=64)
    cm = camelot.wrap(model, CamelotConfig(window=16, recent=8, sink=0, slots=24, threshold=1.0,
                                           placement="recency"))
    cm.feed(_distinct(200), progress=False)
    rt = cm.runtimes[1]
    assert isinstance(rt.positions, Positions) and rt.positions.max_distance == 64 - 16
    at = rt.positions.memory_positions(rt.state.memory, tail=8, device=torch.device("cpu"))
    assert int(at.min()) >= -(64 - 16) and all(len(set(row.tolist())) == 24 for row in at.reshape(-1, 24))
    # kept while memory is unchanged (a decoded token reads it 30 times), made again after a write
    assert rt.positions.memory_positions(rt.state.memory, tail=8, device=torch.device("cpu")) is at
    cm.feed(_distinct(16), progress=False)
    cpu = torch.device("cpu")
    again = rt.positions.memory_positions(rt.state.memory, tail=8, device=cpu)
    assert again is not at and torch.equal(again, rt.positions.memory_positions(rt.state.memory, 8, cpu))
    cm.unwrap()
