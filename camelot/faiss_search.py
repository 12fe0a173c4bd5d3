"""faiss search backends: exact flat (CPU, or GPU with a faiss GPU build) and approximate IVF /
HNSW indexes for large banks.

The memory state stays authoritative in torch (camelot.memory); a backend only answers "which
slots score highest". Each attention layer gets its own backend object (wrapper._runtime), so
the approximate ones may keep per-layer state: one faiss index per (batch row, KV head), kept
in step with the bank by diffing the keys they are handed against the copy they indexed.
Consolidation rewrites a slot's key in place and eviction replaces it; either way only the
changed slots are removed and re-added (IVF: `remove_ids` + `add_with_ids`; HNSW cannot remove,
so a changed slot's old entry is masked out at search time and the graph is rebuilt once stale
entries outnumber live ones). With `placement="recency"` every slot's presented key rotates each
segment, so every slot reads as changed and the indexes rebuild every segment (see docs/speed.md).

Invalid (empty) slots never come back: the flat search appends one coordinate (0 for a valid
key, -1e30 for an invalid one; 1 on the query), so they sort last without a data-dependent
`k`, and scores at that level are reported as -inf like the torch backend does.

faiss indexes are per head, so these backends loop over (batch row, KV head) at the faiss call
boundary; the torch backend is one batched matmul and is the default on CPU (docs/speed.md).
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

import numpy as np
import torch

from camelot.search import SearchBase

try:
    import faiss
except ImportError as e:  # faiss is an optional dependency
    raise ImportError(
        "the faiss search backends need faiss; install `faiss-cpu` (or `faiss-gpu`), or use search='torch'"
    ) from e

_INVALID = -1e30  # score of an invalid slot through the appended coordinate
_NEG_CUTOFF = -1e29  # anything below is an invalid slot


def faiss_has_gpu() -> bool:
    """True when this faiss build has GPU support and sees a GPU."""
    return hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0


@dataclass
class IndexStats:
    """What keeping an index in step cost: for docs/speed.md and the benchmark."""

    updates: int = 0  # slots removed + re-added incrementally
    rebuilds: int = 0  # full rebuilds of one head's index
    trains: int = 0  # IVF trainings


def _to_numpy(x: torch.Tensor) -> np.ndarray:
    return np.ascontiguousarray(x.detach().to("cpu", torch.float32).numpy())


def _augment(x: np.ndarray, extra: np.ndarray) -> np.ndarray:
    """Append one coordinate `extra` [..., N] to vectors x [..., N, D]."""
    return np.ascontiguousarray(np.concatenate([x, extra[..., None].astype(np.float32)], axis=-1))


def _results(scores: np.ndarray, labels: np.ndarray, shape: tuple, device: torch.device
             ) -> tuple[torch.Tensor, torch.Tensor]:
    """faiss (scores, labels) -> torch (scores, idx): missing or invalid hits become (-inf, 0)."""
    s = torch.from_numpy(scores).view(shape)
    i = torch.from_numpy(labels).view(shape)
    bad = (i < 0) | (s < _NEG_CUTOFF)
    s = s.masked_fill(bad, float("-inf"))
    i = i.masked_fill(bad, 0)
    return s.to(device), i.to(device)


class FaissFlatSearch(SearchBase):
    """Exact inner-product search with faiss brute force, per (batch row, KV head). Stateless:
    a flat scan reads every key anyway, so there is nothing to keep in step."""

    name = "faiss"

    def __init__(self) -> None:
        self.stats = IndexStats()

    def topk(self, queries: torch.Tensor, keys: torch.Tensor, valid: torch.Tensor,
             k: int) -> tuple[torch.Tensor, torch.Tensor]:
        b, h, m, d = queries.shape
        n = keys.shape[2]
        k = min(k, n)
        q = _augment(_to_numpy(queries).reshape(b * h, m, d), np.ones((b * h, m), np.float32))
        kv = _to_numpy(valid).reshape(b * h, n)
        x = _augment(_to_numpy(keys).reshape(b * h, n, d), np.where(kv, 0.0, _INVALID))
        scores = np.empty((b * h, m, k), np.float32)
        labels = np.empty((b * h, m, k), np.int64)
        for i in range(b * h):  # faiss searches one head's bank at a time
            scores[i], labels[i] = self._knn(q[i], x[i], k)
        return _results(scores, labels, (b, h, m, k), queries.device)

    def _knn(self, q: np.ndarray, x: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        return faiss.knn(q, x, k, metric=faiss.METRIC_INNER_PRODUCT)


class FaissGpuFlatSearch(FaissFlatSearch):
    """Exact search on the GPU through faiss's brute-force kernel (`faiss.knn_gpu`). Only built
    by make_faiss_backend when faiss_has_gpu(); otherwise the CPU flat search runs instead."""

    name = "faiss-gpu"

    def __init__(self) -> None:
        super().__init__()
        self.res = faiss.StandardGpuResources()

    def _knn(self, q: np.ndarray, x: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        return faiss.knn_gpu(self.res, q, x, k, metric=faiss.METRIC_INNER_PRODUCT)


class _HeadIndex:
    """One (batch row, KV head)'s approximate index over slot ids; subclasses say how."""

    def __init__(self, d: int, n: int, stats: IndexStats) -> None:
        self.d, self.n, self.stats = d, n, stats

    def update(self, ids: np.ndarray, keys: np.ndarray, valid: np.ndarray) -> None:
        raise NotImplementedError

    def search(self, q: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        raise NotImplementedError


class _IVFHead(_HeadIndex):
    """IndexIVFFlat keyed by slot id. Until the bank holds enough keys to train the coarse
    quantizer (39 per list, faiss's own minimum), searches are exact over the valid keys."""

    def __init__(self, d: int, n: int, stats: IndexStats, nlist: int, nprobe: int) -> None:
        super().__init__(d, n, stats)
        self.nlist, self.nprobe = nlist, nprobe
        self.index: faiss.IndexIVFFlat | None = None
        self.keys = np.zeros((0, d), np.float32)  # last indexed keys, by slot id
        self.valid = np.zeros(0, bool)

    def update(self, ids: np.ndarray, keys: np.ndarray, valid: np.ndarray) -> None:
        self.keys, self.valid = keys, valid
        n_valid = int(valid.sum())
        if self.index is None:
            if n_valid >= 39 * self.nlist:
                self._train_and_fill()
            return
        if len(ids) > 0.5 * max(self.index.ntotal, 1):  # most changed: refill (and refit the lists)
            self._train_and_fill()
            return
        self.index.remove_ids(ids.astype(np.int64))
        add = ids[valid[ids]]
        if len(add):
            self.index.add_with_ids(keys[add], add.astype(np.int64))
        self.stats.updates += len(ids)

    def _train_and_fill(self) -> None:
        ids = np.flatnonzero(self.valid)
        quantizer = faiss.IndexFlatIP(self.d)
        index = faiss.IndexIVFFlat(quantizer, self.d, self.nlist, faiss.METRIC_INNER_PRODUCT)
        index.train(self.keys[ids])
        index.set_direct_map_type(faiss.DirectMap.Hashtable)  # remove_ids by id, no list scan
        index.add_with_ids(self.keys[ids], ids.astype(np.int64))
        index.nprobe = self.nprobe
        self.index = index
        self.stats.trains += 1
        self.stats.rebuilds += 1

    def search(self, q: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        if self.index is None:  # too few keys to train: exact over the valid ones
            x = _augment(self.keys, np.where(self.valid, 0.0, _INVALID))
            qa = _augment(q, np.ones(len(q), np.float32))
            return faiss.knn(qa, x, k, metric=faiss.METRIC_INNER_PRODUCT)
        return self.index.search(q, k)


class _HNSWHead(_HeadIndex):
    """IndexHNSWFlat, which cannot remove entries: a changed slot gets a fresh entry and its old
    one is masked out at search time (IDSelectorBitmap); the graph is rebuilt from the live keys
    once stale entries outnumber live ones."""

    def __init__(self, d: int, n: int, stats: IndexStats, m_links: int, ef_search: int,
                 ef_construction: int) -> None:
        super().__init__(d, n, stats)
        self.m_links, self.ef_search, self.ef_construction = m_links, ef_search, ef_construction
        self.index: faiss.IndexHNSWFlat | None = None
        self.slot_of = np.zeros(0, np.int64)  # index entry -> slot id
        self.alive = np.zeros(0, bool)  # index entry -> still current

    def update(self, ids: np.ndarray, keys: np.ndarray, valid: np.ndarray) -> None:
        if self.index is None or (self.alive.size - self.alive.sum()) + len(ids) > self.alive.sum() + 1:
            self._rebuild(keys, valid)
            return
        self.alive[np.isin(self.slot_of, ids)] = False
        add = ids[valid[ids]]
        if len(add):
            self.index.add(keys[add])
            self.slot_of = np.concatenate([self.slot_of, add.astype(np.int64)])
            self.alive = np.concatenate([self.alive, np.ones(len(add), bool)])
        self.stats.updates += len(ids)

    def _rebuild(self, keys: np.ndarray, valid: np.ndarray) -> None:
        ids = np.flatnonzero(valid)
        index = faiss.IndexHNSWFlat(self.d, self.m_links, faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efConstruction = self.ef_construction
        index.add(keys[ids])
        self.index, self.slot_of, self.alive = index, ids.astype(np.int64), np.ones(len(ids), bool)
        self.stats.rebuilds += 1

    def search(self, q: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        if self.index is None or self.index.ntotal == 0:
            return np.full((len(q), k), -np.inf, np.float32), np.full((len(q), k), -1, np.int64)
        bitmap = np.packbits(self.alive, bitorder="little")
        params = faiss.SearchParametersHNSW(sel=faiss.IDSelectorBitmap(self.alive.size, faiss.swig_ptr(bitmap)),
                                            efSearch=max(self.ef_search, k))
        scores, entries = self.index.search(q, k, params=params)
        labels = np.where(entries >= 0, self.slot_of[np.clip(entries, 0, None)], -1)
        return scores, labels


class FaissIndexSearch(SearchBase):
    """Approximate search with one IVF or HNSW index per (batch row, KV head), kept in step with
    the bank incrementally (see the module docstring)."""

    def __init__(self, kind: str, nlist: int | None = None, nprobe: int = 8, hnsw_m: int = 32,
                 ef_search: int = 64, ef_construction: int = 64) -> None:
        if kind not in ("ivf", "hnsw"):
            raise ValueError(f"unknown faiss index kind {kind!r}; use ivf or hnsw")
        self.kind = kind
        self.name = f"faiss-{kind}"
        self.nlist, self.nprobe = nlist, nprobe
        self.hnsw_m, self.ef_search, self.ef_construction = hnsw_m, ef_search, ef_construction
        self.stats = IndexStats()
        self.reset()

    def reset(self) -> None:
        self.heads: list[_HeadIndex] = []
        self.keys: torch.Tensor | None = None  # [B*H, N, D] what the indexes hold, by slot id
        self.valid: torch.Tensor | None = None  # [B*H, N]

    def _new_head(self, d: int, n: int) -> _HeadIndex:
        if self.kind == "ivf":
            nlist = self.nlist or max(1, int(round(math.sqrt(n))))
            return _IVFHead(d, n, self.stats, nlist, min(self.nprobe, nlist))
        return _HNSWHead(d, n, self.stats, self.hnsw_m, self.ef_search, self.ef_construction)

    def sync(self, keys: torch.Tensor, valid: torch.Tensor) -> None:
        """Bring the indexes in step with keys [B, H, N, D] / valid [B, H, N]: only slots whose
        key or validity changed since the last call are re-indexed."""
        b, h, n, d = keys.shape
        keys = keys.detach().to("cpu", torch.float32).reshape(b * h, n, d)
        valid = valid.detach().to("cpu").reshape(b * h, n)
        old = self.keys
        if old is None or old.shape[0] != b * h or old.shape[2] != d or old.shape[1] > n:
            self.reset()  # new memory (reset, other batch size, a store that shrank): start over
            self.heads = [self._new_head(d, n) for _ in range(b * h)]
            changed = torch.ones(b * h, n, dtype=torch.bool)
        else:
            n_old = old.shape[1]
            changed = torch.ones(b * h, n, dtype=torch.bool)  # slots beyond n_old are new (knn store grew)
            changed[:, :n_old] = (keys[:, :n_old] != old).any(-1) | (valid[:, :n_old] != self.valid)
        self.keys, self.valid = keys.clone(), valid.clone()
        keys_np, valid_np = keys.numpy(), valid.numpy()
        changed_np = changed.numpy()
        for i in np.flatnonzero(changed_np.any(-1)):  # only heads with changes touch faiss
            self.heads[i].update(np.flatnonzero(changed_np[i]), keys_np[i], valid_np[i])

    def topk(self, queries: torch.Tensor, keys: torch.Tensor, valid: torch.Tensor,
             k: int) -> tuple[torch.Tensor, torch.Tensor]:
        b, h, m, d = queries.shape
        k = min(k, keys.shape[2])
        self.sync(keys, valid)
        q = _to_numpy(queries).reshape(b * h, m, d)
        scores = np.empty((b * h, m, k), np.float32)
        labels = np.empty((b * h, m, k), np.int64)
        for i, head in enumerate(self.heads):
            scores[i], labels[i] = head.search(q[i], k)
        return _results(scores, labels, (b, h, m, k), queries.device)


_GPU_FALLBACK_WARNED = False


def make_faiss_backend(name: str, **options):
    """faiss backend by config name: faiss (exact flat), faiss-gpu (exact flat on a GPU; falls
    back to CPU flat with a warning when faiss has no GPU support), faiss-ivf, faiss-hnsw.
    `options` go to the index (nlist, nprobe, hnsw_m, ef_search, ef_construction)."""
    global _GPU_FALLBACK_WARNED
    if name == "faiss":
        return FaissFlatSearch()
    if name == "faiss-gpu":
        if faiss_has_gpu():
            return FaissGpuFlatSearch()
        if not _GPU_FALLBACK_WARNED:
            why = ("this faiss build has no GPU support (install faiss-gpu)"
                   if not hasattr(faiss, "StandardGpuResources") else "faiss sees no GPU")
            warnings.warn(f"search='faiss-gpu': {why}; using exact faiss search on the CPU instead",
                          RuntimeWarning, stacklevel=2)
            _GPU_FALLBACK_WARNED = True
        return FaissFlatSearch()
    if name == "faiss-ivf":
        return FaissIndexSearch("ivf", **options)
    if name == "faiss-hnsw":
        return FaissIndexSearch("hnsw", **options)
    raise ValueError(f"unknown faiss search backend {name!r}; use faiss, faiss-gpu, faiss-ivf or faiss-hnsw")
