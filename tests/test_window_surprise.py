"""surprise_from="window": the write ranks by the NLL of a second forward that reads no memory
(camelot/surprise.py). It must hand the write what the raw context alone predicts, leave the
wrapper's state exactly as it was, and be refused where nothing ranks by surprise."""

from __future__ import annotations

import pytest
import torch

import camelot
from camelot.surprise import window_only
from tests.conftest import tiny_llama

SURPRISE = {"window": 16, "slots": 12, "recent": 16, "sink": 2, "span_reserve": 8, "span": 4, "span_score": "sum",
            "importance": "surprise", "evict": "use"}


def _ids(n: int = 90, seed: int = 0, rows: int = 1) -> torch.Tensor:
    return torch.randint(0, 101, (rows, n), generator=torch.Generator().manual_seed(seed))


def _handed(cm: camelot.CamelotModel) -> list[torch.Tensor]:
    """Record the importance layer 0's bank is handed at each write (its first head)."""
    bank, seen = cm.runtimes[0].state.memory, []
    write = bank.write

    def recording(k, v, received=None, following=None):
        seen.append(received[0, 0].clone())
        return write(k, v, received=received, following=following)

    bank.write = recording
    return seen


def test_the_write_is_handed_what_the_raw_context_alone_predicts():
    """One layer, so the raw tail's keys do not depend on what the memory read gave earlier
    layers: the NLL handed over is then exactly `sliding`'s over the same sinks and tail, and
    not the wrapped model's own, which reads the memory."""
    model, ids = tiny_llama(layers=1), _ids()
    sliding = camelot.wrap(model, camelot.CamelotConfig(strategy="sliding", window=16, slots=16, sink=2))
    alone = sliding.score(ids).token_nll[0]
    sliding.unwrap()
    cm = camelot.wrap(model, camelot.CamelotConfig(**SURPRISE, surprise_from="window"))
    seen = _handed(cm)
    own = cm.score(ids).token_nll[0]
    handed = torch.cat(seen)
    assert handed.numel() == 90 - 2 - 16 - 10  # sinks, raw tail and the open segment never written
    # token i's NLL is nll[i - 1]; the first written token is the one after the sinks
    assert torch.allclose(handed, alone[1 : 1 + handed.numel()], atol=1e-5)
    assert not torch.allclose(handed, own[1 : 1 + handed.numel()], atol=1e-3)  # the memory changed predictions
    cm.unwrap()


def test_the_window_forward_keeps_nothing():
    """A window-only forward in the middle of a document changes no state: the document's NLL
    and the memory afterwards are bit-identical to a run without it."""
    model, ids = tiny_llama(), _ids()
    cfg = camelot.CamelotConfig(**SURPRISE)
    cm = camelot.wrap(model, cfg)
    cm.feed(ids[:, :40], progress=False)
    plain = cm.score(ids[:, 40:], keep_memory=True).token_nll
    keys = cm.runtimes[1].state.memory.keys.clone()
    cm.reset()
    cm.feed(ids[:, :40], progress=False)
    pos = torch.arange(8)[None]
    with window_only(cm.runtimes), torch.no_grad():
        cm.model(input_ids=ids[:, 40:48], position_ids=pos, attention_mask=torch.ones(1, 8, dtype=torch.long),
                 use_cache=False)
    assert not any(rt.shadow for rt in cm.runtimes)
    again = cm.score(ids[:, 40:], keep_memory=True).token_nll
    assert torch.equal(plain, again)
    assert torch.equal(keys, cm.runtimes[1].state.memory.keys)
    cm.unwrap()


def test_it_changes_what_the_reserve_keeps_and_nothing_else_of_the_forward():
    """Same document, the two sources: the reads see the same model (the logits of the first
    writes agree) but the write ranks by different numbers, so the memories part."""
    model, ids = tiny_llama(), _ids(120, seed=3)
    runs = {}
    for source in ("memory", "window"):
        cm = camelot.wrap(model, camelot.CamelotConfig(**SURPRISE, surprise_from=source))
        runs[source] = (cm.score(ids).token_nll[0], [h.clone() for h in _handed_after(cm, ids)])
        cm.unwrap()
    (nll_m, seen_m), (nll_w, seen_w) = runs["memory"], runs["window"]
    assert torch.equal(nll_m[:48], nll_w[:48])  # nothing in memory yet beyond the tail: the same forward
    assert torch.equal(seen_m[0], seen_w[0])  # the first write: the memory was empty, both NLLs agree
    assert not all(torch.allclose(a, b) for a, b in zip(seen_m[1:], seen_w[1:]))


def _handed_after(cm: camelot.CamelotModel, ids: torch.Tensor) -> list[torch.Tensor]:
    seen = _handed(cm)
    cm.score(ids)
    return seen


@pytest.mark.parametrize("cfg", [{"importance": "attention"}, {"evict": "age", "span_reserve": 0}])
def test_it_is_refused_where_nothing_ranks_by_surprise(cfg):
    with pytest.raises(ValueError, match="surprise_from='window' changes only a write that ranks by surprise"):
        camelot.CamelotConfig(**{**SURPRISE, **cfg}, surprise_from="window")
    with pytest.raises(ValueError, match="surprise_from must be one of auto, memory, window"):
        camelot.CamelotConfig(surprise_from="nll")
    assert camelot.CamelotConfig(strategy="sliding", surprise_from="window").strategy == "sliding"
