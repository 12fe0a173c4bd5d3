"""Nearest-slot search. The memory state is authoritative in torch; a backend only answers
"which slots score highest for these queries"."""

from __future__ import annotations

from typing import Protocol

import torch

from camelot.rows import gather_rows
from camelot.topk import topk as rowwise_topk


class SearchBackend(Protocol):
    name: str

    def topk(self, queries: torch.Tensor, keys: torch.Tensor, valid: torch.Tensor,
             k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """queries [B, H, M, D], keys [B, H, N, D], valid [B, H, N] -> (scores, idx) [B, H, M, k'].

        Scores are inner products; invalid slots score -inf. k' = min(k, N)."""
        ...


class TorchExactSearch:
    """Exact inner-product top-k, all batch rows and KV heads of a layer in one matmul."""

    name = "torch"
    dense = True  # the attention reads scores for every slot directly (see attention._memory_read)

    def topk(self, queries: torch.Tensor, keys: torch.Tensor, valid: torch.Tensor,
             k: int) -> tuple[torch.Tensor, torch.Tensor]:
        scores = torch.matmul(queries, keys.to(queries.dtype).transpose(-1, -2))
        scores = scores + torch.where(valid, 0.0, float("-inf"))[:, :, None, :]  # one add, not a fill per query
        return rowwise_topk(scores, min(k, scores.shape[-1]))


class TorchBf16Search:
    """Candidates by bfloat16 scores, exact fp32 scores for the chosen: approximate (the choice
    can differ from exact search among near-ties), recall measured by `camelot bench`. Where
    the CPU has bfloat16 dot products (AVX512-BF16, AMX) or on a GPU, scoring a large bank this
    way is several times cheaper than in fp32 (docs/speed.md)."""

    name = "torch-bf16"
    dense = False  # always a sparse top-k read: the attention must see exact logits
    score_dtype = torch.bfloat16  # the slot bank picks each written token's nearest slot in it too

    def indices(self, queries: torch.Tensor, keys: torch.Tensor, valid: torch.Tensor, k: int) -> torch.Tensor:
        """The chosen slots alone [B, H, M, k'], for callers that score them their own way."""
        b, h, m, d = queries.shape
        n, sd = keys.shape[2], self.score_dtype
        # the validity term rides inside the matmul (baddbmm): a separate add over [M, N] in bf16 costs more
        unused = torch.where(valid, 0.0, float("-inf")).to(sd).view(b * h, 1, n)
        rough = torch.baddbmm(unused, queries.to(sd).view(b * h, m, d), keys.to(sd).view(b * h, n, d).transpose(-1, -2))
        return rowwise_topk(rough.view(b, h, m, n), min(k, n))[1]

    def topk(self, queries: torch.Tensor, keys: torch.Tensor, valid: torch.Tensor,
             k: int) -> tuple[torch.Tensor, torch.Tensor]:
        idx = self.indices(queries, keys, valid, k)  # [B, H, M, k]
        chosen = gather_rows(keys, idx)  # [B, H, M, k, D]
        # elementwise, not a batch of M*k tiny matmuls (those are slower on CPU)
        scores = (chosen.to(queries.dtype) * queries[..., None, :]).sum(-1)
        scores = scores.masked_fill(~valid.gather(2, idx.flatten(2)).view_as(idx), float("-inf"))
        return scores, idx


def top_indices(search: SearchBackend, queries: torch.Tensor, keys: torch.Tensor, valid: torch.Tensor,
                k: int) -> torch.Tensor:
    """Only the slots a backend picks [B, H, M, k'] (it may skip scoring them exactly); picks past
    the valid slots, where fewer than k are valid, are invalid slots: check `valid` at them."""
    if hasattr(search, "indices"):
        return search.indices(queries, keys, valid, k)
    return search.topk(queries, keys, valid, k)[1]


# torch: exact, batched over heads (default). torch-bf16: bfloat16 candidates, exact scores of the
# chosen (approximate; also picks each written token's nearest slot that way). faiss: exact flat
# (CPU). faiss-gpu: exact flat on a GPU (CPU with a warning where faiss has no GPU support).
# faiss-ivf / faiss-hnsw: approximate indexes kept in step with slot updates. Measured in docs/speed.md.
BACKENDS = ("torch", "torch-bf16", "faiss", "faiss-gpu", "faiss-ivf", "faiss-hnsw")


def make_backend(name: str) -> SearchBackend:
    """A fresh backend (one per attention layer: index backends keep per-layer state)."""
    if name == "torch":
        return TorchExactSearch()
    if name == "torch-bf16":
        return TorchBf16Search()
    from camelot.faiss_search import make_faiss_backend

    return make_faiss_backend(name)
