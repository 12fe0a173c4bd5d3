"""The memory as a user sees it: statistics, in-process checkpoints, and snapshots saved as
safetensors (never pickle).

A snapshot holds everything the wrapper has read: per layer the memory (slot bank or token
store), the raw prefix (`recurrent` / `sliding`) and the open, not yet consolidated segment, and
for a memory that ranks tokens what it will rank the still-raw ones by, with the last
prediction (the next token's surprise). So saving changes nothing, and a wrapper that loads the
file answers exactly as the one that saved it would have. The file records which model it
belongs to (architecture facts and a digest of a few weight tensors) and a digest of its own
tensor bytes; loading it into another model, or
loading a damaged, truncated or pickle file, is refused with a `SnapshotError` before the live
memory is touched: the new state of every layer is built and checked aside, then swapped in.
"""

from __future__ import annotations

import copy
import json
import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from camelot.layer_state import LayerState
from camelot.memory import TELEMETRY_FIELDS
from camelot.ownership import exclusive_view
from camelot.snapshot_format import (  # noqa: F401  (re-exported: the snapshot API in one place)
    FORMAT,
    FORMAT_VERSION,
    LAST_LOGP,
    LAST_NORMED,
    USER_PREFIX,
    SnapshotError,
    _read_tensors,
    _version,
    architecture,
    metadata_value,
    model_fingerprint,
    read_metadata,
    read_snapshot,
    tensor_digest,
)
from camelot.snapshot_layer import build_layer, open_len

if TYPE_CHECKING:
    from camelot.interfaces import Wrapper

# ---------------------------------------------------------------------------- statistics
def layer_stats(state: dict[str, torch.Tensor]) -> dict[str, Any]:
    """Slots used, count and age summaries of one layer's memory state (all rows and heads).
    Histograms are log2-bucketed: [[lower bound, slots], ...] over used slots; an age of a is
    counted as a+1 so that "written in the last step" lands in bucket 1."""
    if not state:
        return {"slots_used": 0}
    counts = state["counts"].long()
    used = counts > 0
    row: dict[str, Any] = {
        "slots_used": int(used.sum()),
        "slots_total": int(counts.numel()),
        "tokens_merged": int(counts.sum()),
        "count_max": int(counts.max()) if counts.numel() else 0,
        "count_mean": float(counts[used].float().mean()) if used.any() else 0.0,
        "count_hist": log2_hist(counts[used]),
    }
    if "ages" in state:
        ages = state["ages"].long()[used]
        row["age_mean"] = float(ages.float().mean()) if ages.numel() else 0.0
        row["age_max"] = int(ages.max()) if ages.numel() else 0
        row["age_hist"] = log2_hist(ages + 1)
    if "telemetry" in state:
        row.update(dict(zip(TELEMETRY_FIELDS, state["telemetry"].long().tolist())))
    return row


def log2_hist(x: torch.Tensor) -> list[list[int]]:
    """[[2**e, n], ...] for every non-empty bucket [2**e, 2**(e+1)) of positive integers x."""
    if x.numel() == 0:
        return []
    b = torch.floor(torch.log2(x.clamp(min=1).double())).long()
    n = torch.bincount(b)
    return [[2**e, int(c)] for e, c in enumerate(n.tolist()) if c]


# ---------------------------------------------------------------------------- the view
@dataclass
class Checkpoint:
    """An in-process copy of the wrapper's whole state (see MemoryView.checkpoint)."""

    layers: list[LayerState]  # per runtime, a copy (the open segment's tensors shared: never written into)
    owner: Any = None  # weakref to the wrapper that took it: restoring into another one is refused
    last_logp: torch.Tensor | None = None  # the wrapper's SurpriseFeed: scores the next step's first token
    last_normed: tuple[torch.Tensor, torch.Tensor] | None = None  # and credits it (surprise_from="logit")


class MemoryView:
    """`cm.memory`: statistics, checkpoints and snapshots of a CamelotModel's state."""

    def __init__(self, cm: Wrapper) -> None:
        self.cm = cm

    def _stores(self):
        return [(rt.layer_idx, rt.state.memory) for rt in self.cm.runtimes if rt.state.memory is not None]

    # ------------------------------------------------------------------ stats
    def telemetry(self) -> dict[str, int]:
        """Totals since reset over all memory layers: merged, new, evicted, dropped, skipped tokens."""
        tot = torch.zeros(len(TELEMETRY_FIELDS), dtype=torch.long)
        for _, mem in self._stores():
            if mem.telemetry is not None:
                tot += mem.telemetry.cpu()
        return dict(zip(TELEMETRY_FIELDS, tot.tolist()))

    def stats(self) -> dict[str, Any]:
        """Per memory layer: slots used, count and age histograms, telemetry; plus the open segment
        and raw prefix sizes. Host syncs: not for hot loops."""
        layers = [{"layer": idx, **layer_stats(mem.state_dict()), **(mem.entries() if hasattr(mem, "entries") else {})}
                  for idx, mem in self._stores()]
        prefix = [rt.state.prefix.size for rt in self.cm.runtimes if rt.state.prefix is not None]
        sink = [rt.state.sink.size for rt in self.cm.runtimes if rt.state.sink is not None]
        return {"strategy": self.cm.config.strategy, "open_tokens": self.cm.open_len,
                "prefix_tokens": max(prefix) if prefix else 0, "sink_tokens": max(sink) if sink else 0,
                "layers": layers, "telemetry": self.telemetry()}

    # ------------------------------------------------------------------ in-process checkpoints
    @exclusive_view
    def checkpoint(self) -> Checkpoint:
        """A copy of the whole state (open segment, memory, prefix) to `restore` later, e.g. to
        read several continuations of one shared prefix without re-reading it."""
        return Checkpoint([_copied(rt.state) for rt in self.cm.runtimes], weakref.ref(self.cm),
                          self.cm.surprise.last_logp, self.cm.surprise.last_normed)

    @exclusive_view
    def restore(self, cp: Checkpoint) -> None:
        """Go back to a checkpoint; the checkpoint stays valid for further restores. (The open
        segment's tensors are shared: attention replaces them, never writes into them.)"""
        if len(cp.layers) != len(self.cm.runtimes) or (cp.owner is not None and cp.owner() is not self.cm):
            raise ValueError("checkpoint belongs to another wrapper (another model, or another wrap of it); "
                             "restore it with the wrapper that took it")
        for rt, held in zip(self.cm.runtimes, cp.layers):
            rt.state.load_state_dict(_copied(held))
            rt.last_read = None
        self.cm.surprise.last_logp, self.cm.surprise.last_normed = cp.last_logp, cp.last_normed

    def open_segment(self) -> list[tuple[torch.Tensor | None, ...]]:
        """A free handle on every layer's open segment (attention never edits those tensors in
        place), for reading several continuations of one open segment without a full checkpoint.
        The memory is not part of it, except the slots' use scores, which reads raise (a copy):
        a continuation read and put back leaves no trace in what the write later evicts."""
        return [(rt.state.local_k, rt.state.local_v, _use_scores(rt)) for rt in self.cm.runtimes]

    @exclusive_view
    def restore_open_segment(self, handle: list[tuple[torch.Tensor | None, ...]]) -> None:
        """Put back the open segment (and the use scores) that `open_segment()` returned."""
        if len(handle) != len(self.cm.runtimes):
            raise ValueError("open segment handle of another wrapper")
        for rt, (k, v, scores) in zip(self.cm.runtimes, handle):
            rt.state.keep(k, v)
            if scores is not None and _use_scores(rt) is not None:
                rt.state.memory.score.copy_(scores)

    # ------------------------------------------------------------------ snapshots
    @exclusive_view
    def save(self, path: str | Path, metadata: dict[str, str] | None = None) -> Path:
        """Write the whole state to a safetensors file; the live state is not changed.
        `metadata` (str -> str) is stored under keys prefixed with 'user.'."""
        from safetensors.torch import save_file

        _check_file_layout(self.cm)
        tensors: dict[str, torch.Tensor] = {}
        for rt in self.cm.runtimes:
            tensors.update({f"layer{rt.layer_idx}.{n}": t for n, t in rt.state.state_dict().items()})
        if self.cm.surprise.last_logp is not None and any(rt.state.tracks_surprise for rt in self.cm.runtimes):
            tensors[LAST_LOGP] = self.cm.surprise.last_logp  # the next token's surprise, as if never saved
            if self.cm.surprise.last_normed is not None:
                tensors[LAST_NORMED] = torch.stack(self.cm.surprise.last_normed)
        # copies: state tensors are views into larger buffers (the bank's scratch slot, capacity)
        tensors = {k: t.detach().to("cpu", copy=True).contiguous() for k, t in tensors.items()}
        meta = {
            "format": FORMAT,
            "format_version": str(FORMAT_VERSION),
            "camelot_version": _version(),
            **{k: json.dumps(v) for k, v in architecture(self.cm).items()},
            "fingerprint": model_fingerprint(self.cm),
            "memory_layers": json.dumps([i for i, _ in self._stores()]),
            "open_len": str(self.cm.open_len),
            "config": json.dumps(self.cm.config.to_dict()),
            "digest": tensor_digest(tensors),
        }
        for k, v in (metadata or {}).items():
            if not isinstance(k, str) or not isinstance(v, str):
                raise TypeError("snapshot metadata must map str to str")
            meta[USER_PREFIX + k] = v
        path = Path(path)
        if path.is_dir():
            raise IsADirectoryError(f"{path} is a folder; save the memory to a file path")
        tmp = path.with_name(path.name + ".partial")
        try:
            save_file(tensors, str(tmp), metadata=meta)
            tmp.replace(path)  # a crash mid-write never leaves a half file under the real name
        finally:
            tmp.unlink(missing_ok=True)  # a failed write (disk full, no such folder) leaves nothing either
        return path

    @exclusive_view
    def load(self, path: str | Path) -> dict[str, str]:
        """Replace the whole state with a snapshot's; returns the snapshot's metadata. Refused
        with SnapshotError, the live state untouched, if the file does not fit this wrapper."""
        from camelot.snapshot_checks import check_header, check_values

        _check_file_layout(self.cm)
        meta = read_metadata(path)
        _check_compatible(path, meta, self.cm)
        check_header(Path(path), self.cm, open_len(path, meta))  # before any tensor byte is read
        tensors = _read_tensors(Path(path), meta)
        check_values(Path(path), tensors, self.cm)
        last_logp, last_normed = tensors.pop(LAST_LOGP, None), tensors.pop(LAST_NORMED, None)
        if last_logp is not None and not torch.isfinite(last_logp.float()).all():
            raise SnapshotError(f"{path}: {LAST_LOGP} holds non-finite values")
        if last_normed is not None and not torch.isfinite(last_normed.float()).all():  # its shape: check_header
            raise SnapshotError(f"{path}: {LAST_NORMED} holds non-finite values")
        new_state = [build_layer(path, rt, tensors, meta, self.cm) for rt in self.cm.runtimes]
        left = set(tensors) - {k for *_, used in new_state for k in used}
        if left:
            raise SnapshotError(f"{path}: unexpected tensors {sorted(left)[:4]} (not written by this camelot layout)")
        batches = {t.shape[0] for name, t in tensors.items() if t.dim() >= 3 and ".question." not in name}
        asked = {t.shape[0] for name, t in tensors.items() if ".question." in name}
        if len(batches) > 1 or asked - {1} - batches:  # one question may stand for every row
            raise SnapshotError(f"{path}: tensors disagree on the batch size ({sorted(batches | asked)})")
        for rt, (k, v, mem, pre, sink, ranked, question, _) in zip(self.cm.runtimes, new_state):  # cannot fail
            new = LayerState(mem, pre, sink)
            new.local_k, new.local_v = k, v
            new.received_open, new.received_tail = ranked
            new.question = question
            rt.state.load_state_dict(new)
            rt.last_read = None
        self.cm.surprise.reset()  # nothing of the last prediction before the load survives it
        if last_logp is not None:
            self.cm.surprise.last_logp = last_logp.float()  # SurpriseFeed moves it to the logits' device
        if last_normed is not None:
            self.cm.surprise.last_normed = last_normed[0].float(), last_normed[1].float()
        return meta


def _check_file_layout(cm: Wrapper) -> None:
    if cm.config.strategy == "infllm":
        raise SnapshotError("an infllm memory cannot be saved to or loaded from a file yet: its blocks, "
                            "representatives, pending tokens and window scores have no snapshot layout; "
                            "memory.checkpoint() / restore() work within a process")


def _copied(state: LayerState) -> LayerState:
    """A copy of a layer's state that shares the open segment's tensors (attention replaces
    them, never writes into them) and owns its memory, prefix and sinks."""
    new = LayerState(copy.deepcopy(state.memory), copy.deepcopy(state.prefix), copy.deepcopy(state.sink))
    new.local_k, new.local_v = state.local_k, state.local_v
    new.received_open, new.received_tail = state.received_open, state.received_tail  # never written in place
    new.question = state.question
    return new


# ---------------------------------------------------------------------------- loading checks
def _check_compatible(path, meta: dict[str, str], cm: Wrapper) -> None:
    mine = architecture(cm)
    theirs = {k: metadata_value(meta.get(k)) for k in mine}
    diff = [f"{k} {theirs[k]} vs {mine[k]}" for k in mine if theirs[k] != mine[k]]
    if diff:
        raise SnapshotError(f"{path}: made with another model ({theirs['model_type']}): " + ", ".join(diff)
                            + " (snapshot vs this model)")
    if meta.get("fingerprint") != model_fingerprint(cm):
        raise SnapshotError(f"{path}: made with another {mine['model_type']} checkpoint (weights fingerprint "
                            f"{meta.get('fingerprint')} vs this model's {model_fingerprint(cm)})")
    saved = metadata_value(meta.get("config")) or {}
    cfg = cm.config
    if saved.get("strategy") != cfg.strategy:
        raise SnapshotError(f"{path}: holds a {saved.get('strategy')!r} memory, this wrapper uses {cfg.strategy!r}")
    layers = metadata_value(meta.get("memory_layers"))
    mine_layers = [rt.layer_idx for rt in cm.runtimes if rt.state.memory is not None]
    if layers != mine_layers:
        raise SnapshotError(f"{path}: has memory on layers {layers}, this wrapper on {mine_layers}")
    if cfg.strategy == "camelot" and saved.get("slots") != cfg.slots:
        raise SnapshotError(f"{path}: has {saved.get('slots')} slots per head, this wrapper {cfg.slots}")
    # part of what was read; span_reserve: which slots hold raw reserve tokens, which consolidated ones
    for name, strategies in (("recent", ("camelot", "knn")), ("sink", ("camelot", "knn", "recurrent", "sliding")),
                             ("span_reserve", ("camelot",))):
        if cfg.strategy in strategies and saved.get(name, 0) != getattr(cfg, name):
            raise SnapshotError(f"{path}: was saved with {name}={saved.get(name, 0)}, this wrapper has "
                                f"{name}={getattr(cfg, name)}; wrap with the same {name}")
    n_open = open_len(path, meta)
    if n_open >= cfg.window:
        raise SnapshotError(f"{path}: its open segment holds {n_open} tokens, more than fit this wrapper's "
                            f"window ({cfg.window}); use window > {n_open}")


def _use_scores(rt: Any) -> torch.Tensor | None:
    """A copy of the layer's slot scores where reads raise them (evict="use"); None elsewhere."""
    mem = rt.state.memory
    return mem.score.clone() if getattr(mem, "observes_reads", False) and mem.score is not None else None
