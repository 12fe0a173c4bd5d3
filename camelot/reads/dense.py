"""Reads that score every memory entry: all of them (the default), or a top-k of them found by
masking the exact scores (cheaper than gathering while k is a large share of the entries)."""

from __future__ import annotations

import torch

from camelot.masks import softcapped
from camelot.reads.base import DenseResult, Read, ReadInput
from camelot.topk import topk as rowwise_topk


def dense_read(inp: ReadInput, k: int, scaling: float, softcap: float | None) -> DenseResult:
    """Logits of every entry; all but each query's k best masked where k < S."""
    qm, keys = inp.queries, inp.keys
    b, hkv, gm, _ = qm.shape
    n = keys.shape[2]
    # validity and count bias as one additive [B, Hkv, 1, S] term, not a fill over every query
    slot_bias = torch.where(inp.valid, 0.0 if inp.bias is None else inp.bias, float("-inf"))[:, :, None, :]
    idx = None
    if k == n and not softcap:
        # every entry: scale on the queries, bias inside the matmul (two fewer passes over the scores)
        s = torch.baddbmm(slot_bias.flatten(0, 1), (qm * scaling).flatten(0, 1),
                          keys.to(qm.dtype).flatten(0, 1).transpose(-1, -2))
        return DenseResult(s.view(b, hkv, inp.g, inp.m, -1), inp.values)
    raw = torch.matmul(qm, keys.to(qm.dtype).transpose(-1, -2))  # [B, Hkv, G*m, S]
    s = softcapped(raw * scaling, softcap)
    if k < n:
        idx = rowwise_topk(raw + torch.where(inp.valid, 0.0, float("-inf"))[:, :, None, :], k)[1]
        # exactly k per query, also where scores tie (as every top-k search backend does)
        s = s.masked_fill_(~torch.zeros_like(raw, dtype=torch.bool).scatter_(-1, idx, True), float("-inf"))
        idx = idx.reshape(b, hkv, inp.g, inp.m, k)
    s = (s + slot_bias).view(b, hkv, inp.g, inp.m, -1)
    return DenseResult(s, inp.values, idx)


class EverySlotRead(Read):
    """Every query reads every entry (`top_k=None`): exact, and with the dense matmul no dearer
    than a small top-k on CPU at a few thousand slots."""

    def select(self, inp: ReadInput, scaling: float, softcap: float | None, raw_key=None) -> DenseResult:
        return dense_read(inp, inp.keys.shape[2], scaling, softcap)
