"""The default top-k read: each query head reads the k entries with its highest logits (what
its softmax would weigh most)."""

from __future__ import annotations

from camelot.masks import softcapped
from camelot.reads.base import MemoryResult, Read, ReadInput, SparseResult
from camelot.reads.dense import dense_read
from camelot.rows import gather_rows

# An exact dense backend masks its scores instead of gathering while k * SPARSE_BELOW > entries:
# below that share, softmax and values over k beat a pass over all S.
SPARSE_BELOW = 16


class QueryTopK(Read):
    def select(self, inp: ReadInput, scaling: float, softcap: float | None, raw_key=None) -> MemoryResult:
        n = inp.keys.shape[2]
        k = self.k_of(n)
        if self.search.dense and k * SPARSE_BELOW > n:
            return dense_read(inp, k, scaling, softcap)
        scores, idx = self.search.topk(inp.queries, inp.keys, inp.valid, k)  # [B, Hkv, G*m, k]
        b, hkv = idx.shape[:2]
        k = idx.shape[-1]
        scores, idx = scores.view(b, hkv, inp.g, inp.m, k), idx.view(b, hkv, inp.g, inp.m, k)
        gathered = gather_rows(inp.values, idx).float()  # [B, Hkv, G, m, k, Dv]
        return SparseResult(finish_logits(scores, idx, inp, scaling, softcap), idx, gathered)


def finish_logits(scores, idx, inp: ReadInput, scaling: float, softcap: float | None):
    """Scaled, capped, count-biased logits of chosen entries; an invalid pick stays -inf."""
    s = softcapped(scores * scaling, softcap)
    if inp.bias is not None:
        s = s + inp.bias.gather(2, idx.flatten(2)).view_as(idx)
    return s.masked_fill_(scores.isneginf(), float("-inf"))  # softcap must not revive empty slots
