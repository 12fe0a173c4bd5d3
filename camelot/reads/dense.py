"""Reads that score every memory entry: all of them (the default), or a top-k of them found by
masking the exact scores (cheaper than gathering while k is a large share of the entries)."""

from __future__ import annotations

import torch

from camelot.masks import softcapped
from camelot.reads.base import AttendedResult, DenseResult, MemoryResult, Read, ReadInput
from camelot.topk import topk as rowwise_topk


def _flash_cpu():
    """torch's fused CPU attention that also returns the log-sum-exp (private, so looked up, not
    assumed); None where this torch lacks it (then the explicit read runs)."""
    try:
        return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
    except (AttributeError, RuntimeError):
        return None


_FLASH_CPU = _flash_cpu()


def dense_read(inp: ReadInput, k: int, scaling: float, softcap: float | None,
               score_dtype: torch.dtype = torch.float32) -> DenseResult:
    """Logits of every entry; all but each query's k best masked where k < S. score_dtype: of
    the every-entry scores (bfloat16: rounded like a bf16 model's attention scores)."""
    qm, keys = inp.queries, inp.keys
    b, hkv, gm, _ = qm.shape
    n = keys.shape[2]
    # validity and count bias as one additive [B, Hkv, 1, S] term, not a fill over every query
    slot_bias = torch.where(inp.valid, 0.0 if inp.bias is None else inp.bias, float("-inf"))[:, :, None, :]
    idx = None
    if k == n and not softcap:
        # every entry: scale on the queries, bias inside the matmul (two fewer passes over the scores)
        sd = score_dtype
        parts = (slot_bias.flatten(0, 1).to(sd), (qm * scaling).flatten(0, 1).to(sd),
                 keys.to(sd).flatten(0, 1).transpose(-1, -2))
        if sd == qm.dtype:  # made straight into the joined logits' columns (DenseResult.join)
            return DenseResult(None, inp.values, deferred=parts, g=inp.g)
        return DenseResult(torch.baddbmm(*parts).to(qm.dtype).view(b, hkv, inp.g, inp.m, -1), inp.values)
    raw = torch.matmul(qm, keys.to(qm.dtype).transpose(-1, -2))  # [B, Hkv, G*m, S]
    s = softcapped(raw * scaling, softcap)
    if k < n:
        idx = rowwise_topk(raw + torch.where(inp.valid, 0.0, float("-inf"))[:, :, None, :], k)[1]
        # exactly k per query, also where scores tie (as every top-k search backend does)
        s = s.masked_fill_(~torch.zeros_like(raw, dtype=torch.bool).scatter_(-1, idx, True), float("-inf"))
        idx = idx.reshape(b, hkv, inp.g, inp.m, k)
    s = (s + slot_bias).view(b, hkv, inp.g, inp.m, -1)
    return DenseResult(s, inp.values, idx)


def fused_read(inp: ReadInput, scaling: float, dtype: torch.dtype) -> AttendedResult:
    """Every entry through torch's fused CPU attention (blocked: the [queries x entries] scores
    never leave cache; softmax statistics in fp32 whatever `dtype`)."""
    qm, keys = inp.queries, inp.keys
    b, hkv = qm.shape[:2]
    bias = torch.where(inp.valid, 0.0 if inp.bias is None else inp.bias, float("-inf"))[:, :, None, :]
    out, lse = _FLASH_CPU(qm.to(dtype), keys.to(dtype), inp.values.to(dtype), 0.0, False,
                          attn_mask=bias.to(dtype), scale=scaling)
    # a head with no used entry: the kernel returns 0 and a log-sum-exp of 0, which would take mass
    lse = lse.masked_fill_(~inp.valid.any(-1, keepdim=True), float("-inf"))
    return AttendedResult(out.to(qm.dtype).view(b, hkv, inp.g, inp.m, -1), lse.view(b, hkv, inp.g, inp.m))


def fusable(inp: ReadInput, softcap: float | None) -> bool:
    return inp.whole and not softcap and _FLASH_CPU is not None and inp.queries.device.type == "cpu"


class EverySlotRead(Read):
    """Every query reads every entry (`top_k=None`): exact with the torch backend (bfloat16 scores
    with `torch-bf16`), and with one dense matmul or the fused kernel no dearer than a small top-k
    on CPU at a few thousand slots."""

    def select(self, inp: ReadInput, scaling: float, softcap: float | None, raw_key=None) -> MemoryResult:
        if fusable(inp, softcap):
            return fused_read(inp, scaling, self.search.score_dtype)
        return dense_read(inp, inp.keys.shape[2], scaling, softcap, self.search.score_dtype)
