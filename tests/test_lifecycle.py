"""The wrapper's lifecycle: `unwrap()` gives back the model exactly as it was, every patch undone
(the swapped attention forwards of falcon and bloom included), and `with` unwraps at the end."""

from __future__ import annotations

import pytest
import torch
from camelot.adapters.testing import tiny_family

import camelot
from camelot import CamelotConfig


@pytest.mark.parametrize("name", ["falcon", "falcon_alibi", "bloom", "llama"])
def test_unwrap_restores_every_patch(name):
    model = tiny_family(name).build()
    ids = torch.randint(0, 101, (1, 24), generator=torch.Generator().manual_seed(0))
    before = model(ids).logits
    patched_before = {id(m): dict(vars(m)).keys() for m in model.modules()}
    cm = camelot.wrap(model, CamelotConfig(window=8, slots=8))
    cm.score(ids)
    if name != "llama":  # forward-hook families: the adapter swapped their attention forwards
        assert any("_camelot_original_forward" in vars(m) for m in model.modules())
    back = cm.unwrap()
    assert back is model
    assert not any(k.startswith("_camelot") for m in model.modules() for k in vars(m)), name
    assert {id(m): dict(vars(m)).keys() for m in model.modules()} == patched_before
    assert len(cm.masks) == 0  # the wrapper's cached masks are freed with it
    torch.testing.assert_close(model(ids).logits, before, rtol=0, atol=0)


def test_context_manager_unwraps_at_the_end_even_on_error():
    model = tiny_family("llama").build()
    with camelot.wrap(model, CamelotConfig(window=8, slots=8)) as cm:
        cm.feed(list(range(20)), progress=False)
        assert model.config._attn_implementation == "camelot"
    assert model.config._attn_implementation == "eager"
    with pytest.raises(RuntimeError, match="boom"), camelot.wrap(model, window=8, slots=8):
        raise RuntimeError("boom")
    assert getattr(model, "_camelot_wrapper", None) is None
    camelot.wrap(model, window=8).unwrap()  # wrappable again


def test_public_hooks_replace_the_backend_and_attribute_reads():
    from camelot.search import TorchExactSearch

    class Counting(TorchExactSearch):
        calls = 0

        def topk(self, *a, **k):
            Counting.calls += 1
            return super().topk(*a, **k)

    model = tiny_family("llama").build()
    with camelot.wrap(model, CamelotConfig(window=8, slots=64, read_top_k=2, recent=0, sink=0)) as cm:
        cm.replace_search(lambda old: Counting())
        cm.record_reads()
        cm.feed(list(range(40)), progress=False)
        assert Counting.calls > 0
        reads = cm.last_reads()
        assert set(reads) == {rt.layer_idx for rt in cm.runtimes}
        r = next(iter(reads.values()))
        assert r.slots.shape == r.weights.shape and r.slots.shape[-1] == 2
        with pytest.raises(TypeError, match="SearchBackend"):
            cm.replace_search(lambda old: object())
