"""The wrapper end to end on tiny random llamas: identity, causality, isolation, strategies."""

from __future__ import annotations

import pytest
import torch

import camelot
from tests.conftest import bare, tiny_llama

STRATEGIES = ["camelot", "knn", "window", "recurrent", "sliding"]


def _doc(n=300, batch=1, seed=0, vocab=101):
    return torch.randint(0, vocab, (batch, n), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("kv_heads", [4, 2, 1])  # MHA, GQA, MQA
def test_identity_with_empty_memory(kv_heads):
    model = tiny_llama(kv_heads=kv_heads)
    ids = _doc(40, batch=2)
    with torch.no_grad():
        ref = model(ids).logits
    cm = camelot.wrap(model, bare(window=64, slots=16, read_top_k=2))
    got = cm.step(ids)
    assert (got - ref).abs().max() <= 1e-5
    model = cm.unwrap()
    with torch.no_grad():
        assert torch.equal(model(ids).logits, ref)  # unwrap restores the original attention


@pytest.mark.parametrize("strategy, extra", [(s, {}) for s in STRATEGIES] + [
    ("camelot", dict(recent=40, sink=3)), ("camelot", dict(recent=40, sink=3, placement="recency")),
    ("knn", dict(recent=24, sink=2)), ("sliding", dict(sink=4))])
def test_causality_late_change_leaves_earlier_losses(llama, strategy, extra):
    cm = camelot.wrap(llama, bare(window=32, slots=24, read_top_k=3, threshold=0.3, strategy=strategy, **extra))
    ids = _doc(200)
    changed = ids.clone()
    changed[0, 150] = (changed[0, 150] + 7) % 101
    a, b = cm.score(ids).token_nll, cm.score(changed).token_nll
    assert torch.equal(a[:, :149], b[:, :149])
    assert not torch.equal(a[:, 149:], b[:, 149:])  # and the change is visible where it may be


def test_memory_is_written_and_read(llama):
    cm = camelot.wrap(llama, bare(window=32, slots=16, read_top_k=2, threshold=0.5))
    ids = _doc(96)
    cm.feed(ids[:, :64], progress=False)
    tel = cm.memory.telemetry()
    assert tel["merged"] + tel["new"] + tel["evicted"] + tel["dropped"] == 64 * 2 * 2  # tokens x layers x kv heads
    assert all(rt.state.memory.counts.sum() > 0 for rt in cm.runtimes)
    with_memory = cm.step(ids[:, 64:80])
    cm.reset()
    without = cm.step(ids[:, 64:80])
    assert (with_memory - without).abs().max() > 1e-4


def test_only_chosen_layers_get_memory():
    model = tiny_llama(layers=3)
    cm = camelot.wrap(model, bare(window=16, slots=8, read_top_k=2, layers=[1]))
    cm.feed(_doc(64), progress=False)
    assert [rt.state.memory is not None for rt in cm.runtimes] == [False, True, False]
    with pytest.raises(ValueError, match="layers"):
        cm.unwrap()
        camelot.wrap(model, bare(layers=[5]))


def test_batch_rows_have_separate_memories(llama):
    cm = camelot.wrap(llama, bare(window=32, slots=16, read_top_k=2, threshold=0.5))
    a, b, c = _doc(160, seed=1), _doc(160, seed=2), _doc(160, seed=3)
    ab = cm.score(torch.cat([a, b])).token_nll
    ac = cm.score(torch.cat([a, c])).token_nll
    alone = cm.score(a).token_nll
    assert torch.allclose(ab[0], ac[0], atol=1e-5) and torch.allclose(ab[0], alone[0], atol=1e-5)
    assert not torch.allclose(ab[1], ac[1])


def test_score_resets_unless_asked_and_reset_is_exact(llama):
    cm = camelot.wrap(llama, bare(window=32, slots=16, read_top_k=2))
    ids = _doc(100)
    first = cm.score(ids).token_nll
    assert torch.equal(cm.score(ids).token_nll, first)  # fresh memory each call: bit-identical
    kept = cm.score(ids, keep_memory=True).token_nll
    assert not torch.equal(kept, first)
    cm.reset()
    assert all(rt.state.memory.readable() is None and rt.state.local_len == 0 for rt in cm.runtimes)


def test_feeding_in_pieces_equals_feeding_at_once(llama):
    cm = camelot.wrap(llama, bare(window=32, slots=16, read_top_k=2))
    ids = _doc(150)
    cm.feed(ids, progress=False)
    once = cm.step(_doc(5, seed=9))
    cm.reset()
    for a, e in [(0, 7), (7, 50), (50, 51), (51, 150)]:
        cm.feed(ids[:, a:e], progress=False)
    assert torch.allclose(cm.step(_doc(5, seed=9)), once, atol=1e-5)


def test_score_equals_feed_then_step_losses(llama):
    cm = camelot.wrap(llama, bare(window=32, slots=16, read_top_k=2))
    ids = _doc(80)
    nll = cm.score(ids).token_nll
    cm.reset()
    cm.feed(ids[:, :64], progress=False)
    logits = cm.step(ids[:, 64:79])
    ref = torch.nn.functional.cross_entropy(logits[0].float(), ids[0, 65:80], reduction="none")
    assert torch.allclose(nll[0, 64:79], ref, atol=1e-5)


def test_generate_runs_and_flows_into_memory(llama):
    cm = camelot.wrap(llama, bare(window=16, slots=8, read_top_k=2))
    out = cm.generate(_doc(10), max_new_tokens=30)
    assert out.shape == (1, 30)
    assert cm.memory.telemetry()["merged"] + cm.memory.telemetry()["new"] > 0  # 40 tokens > window 16
    greedy = cm.generate(_doc(10), max_new_tokens=5)
    cm.reset()
    sampled = [cm.generate(_doc(10), max_new_tokens=8, do_sample=True, top_p=0.9, seed=3) for _ in range(2)]
    assert greedy.shape == (1, 5) and sampled[0].shape == (1, 8)


def test_double_wrap_and_unsupported_models_fail_clearly(llama):
    cm = camelot.wrap(llama, bare(window=16))
    with pytest.raises(ValueError, match="already wrapped"):
        camelot.wrap(llama)
    cm.unwrap()
    from transformers import BertConfig, BertForMaskedLM

    bert = BertForMaskedLM(BertConfig(vocab_size=50, hidden_size=32, num_hidden_layers=1,
                                      num_attention_heads=2, intermediate_size=64))
    impl = bert.config._attn_implementation
    with pytest.raises(ValueError, match=r"'bert'.*Supported model types: .*llama"):
        camelot.wrap(bert)
    assert bert.config._attn_implementation == impl and not hasattr(bert, "_camelot_wrapper")


def test_window_beyond_position_range_and_bad_ids_are_refused():
    model = tiny_llama(max_pos=64)
    with pytest.raises(ValueError, match="position range"):
        camelot.wrap(model, bare(window=128))
    cm = camelot.wrap(model, bare(window=32))
    for bad, needle in [(torch.tensor([[5, 200]]), "lie in"), (torch.zeros(1, 0, dtype=torch.long), "empty"),
                        (torch.ones(1, 4), "integers"), ([[[1]]], "shape")]:
        with pytest.raises((ValueError, TypeError), match=needle):
            cm.score(bad)
