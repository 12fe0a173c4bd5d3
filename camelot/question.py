"""A question known before the document is read (`camelot ask`'s question, a retrieval case): its
queries, captured per layer, rank the document's tokens for the raw reserve
(WriteRule.importance="question", CamelotConfig.recall("question")), so that what the question
will look for stays raw while the rest is consolidated. Query-aware compression (LongLLMLingua,
SnapKV's observation window) made for a stream: the document is read once, at a fixed memory,
after the question, and nothing but the question's queries is kept beside it.

A token's importance is the largest logit any of the question's tokens and query heads (of its
KV head) gives its position-free key: the content match, at distance 0, of the attention the
question will pay it."""

from __future__ import annotations

import torch

from camelot.layer_state import LayerState


def question_logits(question: torch.Tensor, keys: torch.Tensor, scaling: float) -> torch.Tensor:
    """question [B or 1, Hkv, R, D], keys [B, Hkv, m, D] position-free -> [B, Hkv, m]."""
    return torch.matmul(question, keys.float().transpose(-1, -2)).amax(-2) * scaling


def check_question_set(runtimes) -> None:
    """Before a step: a memory that ranks by a question has one (else its reserve ranks noise)."""
    if any(rt.state.tracks_question and rt.state.question is None for rt in runtimes):
        raise ValueError("this memory keeps what a question will look for (importance='question'): call "
                         "set_question(ids) before feeding the document (reset() forgets the question)")


def capture_question(cm, ids: torch.Tensor) -> list[torch.Tensor]:
    """Run ids [B, n] alone through the model (positions from 0, no memory; the document's state
    is set aside and put back untouched) and return each layer's position-free queries, a KV
    head's query heads and tokens as rows: [B, Hkv, G x n, D] fp32. Only the last `window`
    tokens are run (a question longer than the window is cut from the front)."""
    if not cm.ranks_by_question:
        raise ValueError("this memory does not rank tokens by a question; use "
                         "CamelotConfig.recall('question') (importance='question' with a span reserve)")
    ids = ids[:, -cm.config.window:]
    b, n = ids.shape
    saved = [rt.state for rt in cm.runtimes]
    try:
        for rt in cm.runtimes:
            rt.state, rt.capture = LayerState(), []
        pos = torch.arange(n, device=ids.device).expand(b, n)
        mask = torch.ones(b, n, dtype=torch.long, device=ids.device)
        cm.model(input_ids=ids, position_ids=pos, attention_mask=mask, use_cache=False)
        return [rt.capture[0] for rt in cm.runtimes]
    finally:
        for rt, st in zip(cm.runtimes, saved):
            rt.state, rt.capture = st, None
