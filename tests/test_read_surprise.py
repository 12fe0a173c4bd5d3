"""surprise_from="read": the write ranks by the model's own NLL plus READ_CREDIT nats times the
share of attention the predicting query gave memory (camelot/surprise.py). The credit must be
exactly that share, go to the token the query predicts (across step boundaries too), be the same
whichever read computed it, be zero while the memory is empty, and stay within its own sequence."""

from __future__ import annotations

import pytest
import torch

import camelot
from camelot.surprise import READ_CREDIT
from tests.conftest import tiny_llama
from tests.test_window_surprise import SURPRISE, _ids


def _noted(cm: camelot.CamelotModel) -> list[torch.Tensor]:
    """The NLL layer 0's state is handed at each step ([B, m])."""
    st, seen = cm.runtimes[0].state, []
    note = st.note_surprise

    def recording(nll):
        seen.append(nll.clone())
        return note(nll)

    st.note_surprise = recording
    return seen


def _spans(n: int, window: int, piece: int) -> list[tuple[int, int]]:
    """Steps of at most `piece` tokens that never cross a segment boundary."""
    out, a = [], 0
    while a < n:
        e = min(n, a + piece, (a // window + 1) * window)
        out.append((a, e))
        a = e
    return out


def _run(cfg: camelot.CamelotConfig, ids: torch.Tensor, record: bool = False):
    """Step through ids in pieces of 5; per step the noted NLL, the logits and (record) the reads."""
    cm = camelot.wrap(tiny_llama(), cfg)
    cm.record_reads(record)
    seen, logits, reads = _noted(cm), [], []
    with torch.no_grad():
        for a, e in _spans(ids.shape[1], cfg.window, 5):
            logits.append(cm.step(ids[:, a:e]))
            reads.append(cm.last_reads() if record else None)
            if record:
                cm.record_reads(True)  # forget this forward's reads: a layer that reads nothing keeps none
    cm.unwrap()
    return seen, logits, reads


def _share(reads: dict, b: int, m: int) -> torch.Tensor:
    """[B, m]: the memory's share of each query's attention, over query heads, then layers."""
    per = [r.weights.float().sum(-1).reshape(b, -1, m).mean(1) for r in reads.values()]
    return torch.stack(per).mean(0) if per else torch.zeros(b, m)


def test_the_credit_is_the_memorys_share_of_the_query_that_predicted_the_token():
    ids = _ids(96)
    seen, logits, reads = _run(camelot.CamelotConfig(**SURPRISE, surprise_from="read"), ids, record=True)
    spans = _spans(ids.shape[1], 16, 5)
    prev_logits = prev_share = None
    credited = 0
    for (a, e), noted, lg, rd in zip(spans, seen, logits, reads):
        m = e - a
        own = torch.zeros(1, m)
        own[:, 1:] = torch.nn.functional.cross_entropy(lg[0, :-1].float(), ids[0, a + 1 : e], reduction="none")
        if prev_logits is not None:
            own[:, 0] = -torch.log_softmax(prev_logits[0, -1].float(), -1)[ids[0, a]]
        share = _share(rd, 1, m)
        want = own.clone()
        want[:, 1:] += READ_CREDIT * share[:, :-1]
        if prev_share is not None:
            want[:, 0] += READ_CREDIT * prev_share[:, -1]
        assert torch.allclose(noted, want, atol=1e-4), (a, e)
        credited += int(share.gt(0.01).any())
        prev_logits, prev_share = lg, share
    assert credited >= 5  # the memory was read, so the test compared real credits


def test_the_fused_read_credits_what_the_dense_read_does():
    """evict='age' reads every slot through the fused kernel (no per-entry probabilities); the
    credit it hands over is the one the dense read (record_reads) hands over."""
    cfg = camelot.CamelotConfig(**{**SURPRISE, "evict": "age"}, surprise_from="read")
    ids = _ids(96, seed=2)
    fused, _, _ = _run(cfg, ids)
    dense, _, _ = _run(cfg, ids, record=True)
    assert all(torch.allclose(f, d, atol=1e-4) for f, d in zip(fused, dense))


def test_no_credit_while_the_memory_is_empty_and_one_once_it_is_read():
    ids = _ids(96, seed=1)
    mem, _, _ = _run(camelot.CamelotConfig(**SURPRISE), ids)
    read, _, reads = _run(camelot.CamelotConfig(**SURPRISE, surprise_from="read"), ids, record=True)
    first = next(i for i, r in enumerate(reads) if r)  # the first step that read memory
    assert first > 0
    assert all(torch.equal(a, b) for a, b in zip(mem[:first], read[:first]))
    assert not torch.allclose(mem[first][:, 1:], read[first][:, 1:])


def test_one_sequence_does_not_credit_another():
    """Two documents in one batch: each row is handed what it is handed alone."""
    cfg = camelot.CamelotConfig(**SURPRISE, surprise_from="read")
    both = _ids(96, seed=4, rows=2)
    together, _, _ = _run(cfg, both)
    for row in range(2):
        alone, _, _ = _run(cfg, both[row : row + 1])
        assert all(torch.allclose(t[row : row + 1], a, atol=1e-4) for t, a in zip(together, alone))


def test_it_is_refused_where_nothing_ranks_by_surprise():
    with pytest.raises(ValueError, match="surprise_from='read' changes only a write that ranks by surprise"):
        camelot.CamelotConfig(**{**SURPRISE, "importance": "attention"}, surprise_from="read")
