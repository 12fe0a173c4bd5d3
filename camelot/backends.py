"""Search backends by name: the one registry `CamelotConfig.search` and the CLI choose from."""

from __future__ import annotations

from camelot.interfaces import SearchBackend, require
from camelot.search import TorchBf16Search, TorchExactSearch

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

    return require(make_faiss_backend(name), SearchBackend, "search backend")
