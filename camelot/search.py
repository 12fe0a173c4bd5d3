"""Nearest-slot search. The memory state is authoritative in torch; a backend only answers
"which slots score highest for these queries"."""

from __future__ import annotations

from typing import Protocol

import torch


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
        return scores.topk(min(k, scores.shape[-1]), dim=-1)


# torch: exact, batched over heads (default). faiss: exact flat (CPU). faiss-gpu: exact flat on a GPU
# (CPU with a warning where faiss has no GPU support). faiss-ivf / faiss-hnsw: approximate indexes
# kept in step with slot updates. Measured in docs/speed.md.
BACKENDS = ("torch", "faiss", "faiss-gpu", "faiss-ivf", "faiss-hnsw")


def make_backend(name: str) -> SearchBackend:
    """A fresh backend (one per attention layer: index backends keep per-layer state)."""
    if name == "torch":
        return TorchExactSearch()
    from camelot.faiss_search import make_faiss_backend

    return make_faiss_backend(name)
