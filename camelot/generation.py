"""Next-token choice for CamelotModel.generate: greedy, temperature, top-k, top-p."""

from __future__ import annotations

import torch


def sample_next(logits: torch.Tensor, do_sample: bool, temperature: float, top_p: float, top_k: int,
                generator: torch.Generator) -> torch.Tensor:
    """logits [B, V] (CPU, fp32) -> token ids [B]."""
    if not do_sample:
        return logits.argmax(-1)
    if temperature <= 0:
        raise ValueError("temperature must be > 0 when sampling")
    logits = logits / temperature
    if top_k and top_k > 0:
        kth = logits.topk(min(top_k, logits.shape[-1]), dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        cum = sorted_logits.softmax(-1).cumsum(-1)
        drop = cum - sorted_logits.softmax(-1) > top_p  # keep the smallest set reaching top_p
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)
    return torch.multinomial(logits.softmax(-1), 1, generator=generator)[:, 0]
