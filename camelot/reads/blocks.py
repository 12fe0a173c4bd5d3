"""InfLLM's read of a block memory (camelot/memory/blocks.py): the forward's queries, as one chunk,
pick the top-k blocks per KV head by the dot product of their mean query with each block's
representative (summed over the KV head's query heads; a running mean, so that no token's
blocks depend on later tokens), and attend to every token of those blocks in the same softmax
as the sinks and the local window.

Memory keys are position-free and every query meets them at one fixed distance, whatever its
own position (InfLLM rotates the memory query at position n_local); here that distance is the
layer's `distance` (window + recent by default: the longest local window).
"""

from __future__ import annotations

import torch

from camelot.interfaces import Memory, PositionBias, SearchBackend
from camelot.masks import softcapped
from camelot.positions import Positions
from camelot.reads.base import DenseResult, MemoryResult, Read, ReadInput
from camelot.reads.query import SPARSE_BELOW
from camelot.reads.shared import shared_result


def choose_blocks(queries: torch.Tensor, reprs: torch.Tensor, usable: torch.Tensor, g: int, k: int) -> torch.Tensor:
    """queries [B, Hkv, G*m, D] (already facing memory), reprs [B, Hkv, n, D], usable [B, Hkv, n]
    -> for each query token, the k blocks [B, Hkv, m, k] (in order) whose representatives score
    highest against the mean query of the chunk so far: the forward's queries up to and including
    this token, summed over the KV head's query heads.

    InfLLM scores with the whole chunk's mean query, so a token's blocks would depend on the
    tokens after it; the running mean keeps every prediction causal and equals InfLLM's rule for
    the chunk's last token and for one-token steps (generation)."""
    b, hkv, gm, d = queries.shape
    m = gm // g
    q = queries.view(b, hkv, g, m, d).sum(2).cumsum(2)  # [B, Hkv, m, D]; the 1/count does not change the order
    score = torch.matmul(q, reprs.to(q.dtype).transpose(-1, -2))  # [B, Hkv, m, n]
    score = score.masked_fill_(~usable[:, :, None, :], float("-inf"))
    return score.topk(k, dim=-1).indices.sort(dim=-1).values


class BlockRead(Read):
    """top_k: blocks attended per KV head (InfLLM's `topk`).
    sparse_below: gather each token's blocks once they are less than 1/sparse_below of the memory."""

    sparse_below = SPARSE_BELOW

    def __init__(self, search: SearchBackend, top_k: int | None, count_bias: float = 0.0,
                 count_mode: str = "relative", count_cap: float | None = None) -> None:
        super().__init__(search, top_k, 0.0)  # blocks carry no counts

    def read(self, query: torch.Tensor, memory: Memory, positions: Positions, tail: int, scaling: float,
             softcap: float | None, bias: PositionBias | None, raw_key: torch.Tensor | None = None,
             start: int = 0, whole: bool = False) -> MemoryResult | None:
        got = memory.blocks()
        if got is None:
            return None
        keys, values, valid, reprs = got
        b, hq, m, d = query.shape
        hkv, n, bs = keys.shape[1], keys.shape[2], keys.shape[3]
        g = hq // hkv
        qm = positions.fixed_memory_query(query, start).reshape(b, hkv, g * m, d)
        k = self.k_of(n)
        flat = ReadInput(keys.flatten(2, 3), values.flatten(2, 3), keys.flatten(2, 3), valid.flatten(2).long(),
                         valid.flatten(2), None, qm, g, m)
        tokens = None
        if k < n:
            blocks = choose_blocks(qm, reprs, valid.any(-1), g, k)  # [B, Hkv, m, k]
            tokens = (blocks[..., None] * bs + torch.arange(bs, device=blocks.device)).flatten(-2)
        if tokens is not None and k * self.sparse_below <= n:  # a small share of memory: gather it
            result: MemoryResult = shared_result(flat, tokens, scaling, softcap)
        else:
            # every stored token scored, all but each token's blocks masked: cheaper than a gather
            # of k blocks per token while they are a large share of the memory
            s = softcapped(torch.matmul(qm, flat.keys.to(qm.dtype).transpose(-1, -2)) * scaling, softcap)
            ok = flat.valid[:, :, None, None, :]
            slots = None
            if tokens is not None:
                ok = torch.zeros(b, hkv, m, n * bs, dtype=torch.bool, device=qm.device).scatter_(-1, tokens, True)
                ok = (ok & flat.valid[:, :, None])[:, :, None]
                slots = tokens[:, :, None].expand(b, hkv, g, m, -1)
            result = DenseResult(s.view(b, hkv, g, m, -1).masked_fill_(~ok, float("-inf")), flat.values, slots)
        if bias is not None:  # ALiBi: every memory token at the one fixed distance
            result.logits = result.logits + bias.bias(torch.tensor([-positions.distance], device=qm.device), hkv, g)
        return result


def infllm_parts(cfg, search: SearchBackend, dtype: torch.dtype) -> tuple[Memory, BlockRead]:
    """The memory and read of strategy `infllm` (cfg: a CamelotConfig): `slots` attended entries
    are slots / block_size blocks."""
    from camelot.memory.blocks import BlockMemory

    n = cfg.slots // cfg.block_size
    return BlockMemory(cfg.block_size, cfg.repr_topk, n, dtype), BlockRead(search, n)
