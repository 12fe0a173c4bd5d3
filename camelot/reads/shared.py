"""Top-k reads that choose once per token and KV head, shared by its G query heads: G times less
search on grouped-query models."""

from __future__ import annotations

import torch

from camelot.reads.base import MemoryResult, ReadInput, SharedSparseResult
from camelot.reads.query import QueryTopK, finish_logits
from camelot.rows import gather_rows


class GroupTopK(QueryTopK):
    """The k entries its G query heads weigh most together (the sum of their logits); 0-1.6%
    perplexity against the per-head read where measured (docs/results_log.md, "Speed and memory")."""

    def select(self, inp: ReadInput, scaling: float, softcap: float | None, raw_key=None) -> MemoryResult:
        n = inp.keys.shape[2]
        k = self.k_of(n)
        if k >= n:  # every entry anyway: nothing to share
            return super().select(inp, scaling, softcap, raw_key)
        idx = self.search.indices(self.choosers(inp, raw_key), self.searched_keys(inp), inp.valid, k)
        return shared_result(inp, idx, scaling, softcap)

    def choosers(self, inp: ReadInput, raw_key: torch.Tensor | None) -> torch.Tensor:
        b, hkv, _, d = inp.queries.shape
        return inp.queries.view(b, hkv, inp.g, inp.m, d).sum(2)

    def searched_keys(self, inp: ReadInput) -> torch.Tensor:
        return inp.keys


class KeyTopK(GroupTopK):
    """The paper's rule: the entries whose keys are nearest the token's own key (inner product,
    position-free); searched in the raw bank, since positions do not change which slots are
    near a key. Measurably worse than the query rules on SmolLM2."""

    needs_raw_keys = True

    def choosers(self, inp: ReadInput, raw_key: torch.Tensor | None) -> torch.Tensor:
        return raw_key.to(inp.raw_keys.dtype)

    def searched_keys(self, inp: ReadInput) -> torch.Tensor:
        return inp.raw_keys


def shared_result(inp: ReadInput, idx: torch.Tensor, scaling: float, softcap: float | None) -> SharedSparseResult:
    """Exact logits of every query head against its token's chosen entries idx [B, Hkv, m, k]."""
    b, hkv, _, d = inp.queries.shape
    g, m, k = inp.g, inp.m, idx.shape[-1]
    qm = inp.queries
    chosen = gather_rows(inp.keys, idx).to(qm.dtype)  # [B, Hkv, m, k, D]
    # per token, its G query heads against its k entries: [G, D] @ [D, k] (not G*k dot products)
    scores = torch.matmul(qm.view(b, hkv, g, m, d).transpose(2, 3), chosen.transpose(-1, -2))
    found = inp.valid.gather(2, idx.flatten(2)).view(b, hkv, m, 1, k)
    scores = scores.masked_fill_(~found, float("-inf")).transpose(2, 3)  # [B, Hkv, G, m, k]
    values = gather_rows(inp.values, idx).float()  # [B, Hkv, m, k, Dv]: one set per token, for its G heads
    slots = idx.view(b, hkv, 1, m, k)  # per-entry terms broadcast over the G heads
    logits = finish_logits(scores, slots, inp, scaling, softcap)
    return SharedSparseResult(logits, slots.expand(b, hkv, g, m, k), values)
