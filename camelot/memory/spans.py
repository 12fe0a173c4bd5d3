"""The span reserve of the slot bank (WriteRule.span_reserve, docs/memory_write.md).

Why: on the needle probe the consolidated write keeps some digits of a fact but loses their
order (1424500 for 142450): each token is judged alone, and merging folds look-alike digit
slots together. The span reserve keeps whole runs of `span` consecutive tokens RAW: the last
`span_reserve` slots of each head hold span_reserve // span spans, each written contiguously,
one token per slot with count 1, never merged into and never evicted by the main rule. As
tokens leave the raw tail, each full span of a segment (cut from the segment's start) is
scored by the attention its tokens received while in the window (sum over the span); the
best spans among those held and the new ones stay, the lowest-scoring held span giving way
to a better new one. Tokens of a chosen span skip the consolidated part of the bank; a span
that loses its place is dropped.
"""

from __future__ import annotations

import torch

SPAN_SCORES = ("relative", "sum", "shared")


def choose_spans(span_score: torch.Tensor, importance: torch.Tensor, finite: torch.Tensor, span: int,
                 base: int, scratch: int, how: str = "relative") -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """span_score [B, H, n+1]: the held spans' scores (-inf: empty; index n is a scratch entry);
    importance, finite [B, H, T]. how: "sum", a span's score is the attention its tokens received;
    "relative", that sum over the mean of the segment's spans, so segments compare fairly (early in
    a document a token competes with few keys and receives much more: by the plain sum the first
    spans of the document filled the reserve and stayed); "shared", the relative score's max over
    the layer's KV heads, so every head keeps the spans any head singled out (the needle probe
    found the needle's digits in the reserve of a few heads only). Returns (held [B, H, T]: the
    tokens the reserve takes, slot [B, H, T]: the slot each goes to (`scratch` for the others),
    new span_score [B, H, n+1])."""
    b, h, t = importance.shape
    n = span_score.shape[-1] - 1
    m = t // span
    dev = importance.device
    cut = m * span
    imp = importance[..., :cut].reshape(b, h, m, span).float()
    whole = finite[..., :cut].reshape(b, h, m, span).all(-1)
    new = imp.sum(-1)  # [B,H,m]
    if how != "sum":
        new = new / new.mean(-1, keepdim=True).clamp(min=1e-9)
    if how == "shared":
        new = new.amax(1, keepdim=True).expand_as(new)
    new = torch.where(whole, new, float("-inf"))
    cand = torch.cat([span_score[..., :n], new], dim=-1)  # held spans first: they win ties
    order = cand.argsort(dim=-1, descending=True, stable=True)
    rank = torch.empty_like(order).scatter_(-1, order, torch.arange(n + m, device=dev).expand_as(order).contiguous())
    keep = (rank < n) & torch.isfinite(cand)
    kept_old, chosen = keep[..., :n], keep[..., n:]
    # a chosen new span takes a place not kept (empty or lost), lowest index first, in span order
    freed = kept_old.long().argsort(dim=-1, stable=True)  # [B,H,n]: places not kept come first
    r = (chosen.long().cumsum(-1) - 1).clamp(min=0)
    dest = torch.where(chosen, freed.gather(-1, r.clamp(max=max(n - 1, 0))), n)  # [B,H,m]
    score = torch.where(kept_old, span_score[..., :n], float("-inf"))
    score = torch.cat([score, span_score.new_full((b, h, 1), float("-inf"))], dim=-1)
    score.scatter_(-1, dest, torch.where(chosen, new, float("-inf")))
    score[..., n] = float("-inf")
    offs = torch.arange(span, device=dev)
    slot = torch.where(chosen[..., None], base + dest[..., None] * span + offs, scratch).reshape(b, h, cut)
    held = chosen[..., None].expand(b, h, m, span).reshape(b, h, cut)
    if cut < t:  # the ragged end of a segment is never reserved
        slot = torch.cat([slot, slot.new_full((b, h, t - cut), scratch)], dim=-1)
        held = torch.cat([held, held.new_zeros(b, h, t - cut)], dim=-1)
    return held, slot, score
