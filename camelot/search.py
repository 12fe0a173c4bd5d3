"""Nearest-slot search. The memory state is authoritative in torch; a backend only answers
"which slots score highest for these queries"."""

from __future__ import annotations

import torch

from camelot.interfaces import SearchBackend
from camelot.rows import gather_rows
from camelot.topk import topk as rowwise_topk

__all__ = ["SearchBackend", "SearchBase", "TorchExactSearch", "TorchBf16Search"]


class SearchBase:
    """What most backends share: sparse, fp32, stateless; `indices` is the top-k's second half.
    A backend overrides what differs (the contract: camelot.interfaces.SearchBackend)."""

    name = "?"
    dense = False
    score_dtype = torch.float32

    def topk(self, queries: torch.Tensor, keys: torch.Tensor, valid: torch.Tensor,
             k: int) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    def indices(self, queries: torch.Tensor, keys: torch.Tensor, valid: torch.Tensor, k: int) -> torch.Tensor:
        return self.topk(queries, keys, valid, k)[1]

    def reset(self) -> None:
        """Stateless: nothing indexed to forget."""


class TorchExactSearch(SearchBase):
    """Exact inner-product top-k, all batch rows and KV heads of a layer in one matmul."""

    name = "torch"
    dense = True  # the read may use its scores of every slot directly (camelot.reads)

    def topk(self, queries: torch.Tensor, keys: torch.Tensor, valid: torch.Tensor,
             k: int) -> tuple[torch.Tensor, torch.Tensor]:
        scores = torch.matmul(queries, keys.to(queries.dtype).transpose(-1, -2))
        scores = scores + torch.where(valid, 0.0, float("-inf"))[:, :, None, :]  # one add, not a fill per query
        return rowwise_topk(scores, min(k, scores.shape[-1]))


class TorchBf16Search(SearchBase):
    """Candidates by bfloat16 scores, exact fp32 scores for the chosen: approximate (the choice
    can differ from exact search among near-ties), recall measured by `camelot bench`. Where
    the CPU has bfloat16 dot products (AVX512-BF16, AMX) or on a GPU, scoring a large bank this
    way is several times cheaper than in fp32 (docs/speed.md)."""

    name = "torch-bf16"
    # dense stays False: always a sparse top-k read, the attention must see exact logits
    score_dtype = torch.bfloat16  # the slot bank picks each written token's nearest slot in it too

    def indices(self, queries: torch.Tensor, keys: torch.Tensor, valid: torch.Tensor, k: int) -> torch.Tensor:
        """The chosen slots alone [B, H, M, k'], for callers that score them their own way."""
        b, h, m, d = queries.shape
        n, sd = keys.shape[2], self.score_dtype
        # the validity term rides inside the matmul (baddbmm): a separate add over [M, N] in bf16 costs more
        unused = torch.where(valid, 0.0, float("-inf")).to(sd).view(b * h, 1, n)
        rough = torch.baddbmm(unused, queries.to(sd).reshape(b * h, m, d),
                              keys.to(sd).reshape(b * h, n, d).transpose(-1, -2))
        return rowwise_topk(rough.view(b, h, m, n), min(k, n))[1]

    def topk(self, queries: torch.Tensor, keys: torch.Tensor, valid: torch.Tensor,
             k: int) -> tuple[torch.Tensor, torch.Tensor]:
        idx = self.indices(queries, keys, valid, k)  # [B, H, M, k]
        chosen = gather_rows(keys, idx)  # [B, H, M, k, D]
        # elementwise, not a batch of M*k tiny matmuls (those are slower on CPU)
        scores = (chosen.to(queries.dtype) * queries[..., None, :]).sum(-1)
        scores = scores.masked_fill(~valid.gather(2, idx.flatten(2)).view_as(idx), float("-inf"))
        return scores, idx
