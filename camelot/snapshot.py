"""The memory as a user sees it: statistics, and snapshots saved as safetensors (never pickle).

A snapshot records which model it belongs to; loading it into another model, or loading a
damaged file, is refused before the live memory is touched."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from camelot.memory import TELEMETRY_FIELDS

if TYPE_CHECKING:
    from camelot.wrapper import CamelotModel

FORMAT = "camelot-memory/1"


class SnapshotError(ValueError):
    """A snapshot that cannot be loaded into this model; the live memory is unchanged."""


def model_fingerprint(cm: CamelotModel) -> str:
    """Architecture facts plus a digest of a few weight tensors: cheap, and different for
    different checkpoints of the same architecture."""
    cfg = cm.adapter.text_config(cm.model)
    h = hashlib.sha256()
    facts = [cfg.model_type, getattr(cfg, "num_hidden_layers", None), getattr(cfg, "hidden_size", None),
             cm.adapter.num_kv_heads(cm.model), getattr(cfg, "vocab_size", None)]
    h.update(json.dumps(facts).encode())
    emb = cm.model.get_input_embeddings().weight
    h.update(emb[: min(64, emb.shape[0])].detach().float().cpu().numpy().tobytes())
    for m in cm.modules[:2]:
        for p in list(m.parameters())[:1]:
            h.update(p.detach().flatten()[:4096].float().cpu().numpy().tobytes())
    return h.hexdigest()[:32]


class MemoryView:
    def __init__(self, cm: CamelotModel) -> None:
        self.cm = cm

    def _stores(self):
        return [(rt.layer_idx, rt.memory) for rt in self.cm.runtimes if rt.memory is not None]

    # ------------------------------------------------------------------ stats
    def telemetry(self) -> dict[str, int]:
        """Totals since reset over all memory layers: merged, new, evicted, skipped tokens."""
        tot = torch.zeros(len(TELEMETRY_FIELDS), dtype=torch.long)
        for _, mem in self._stores():
            if mem.telemetry is not None:
                tot += mem.telemetry.cpu()
        return dict(zip(TELEMETRY_FIELDS, tot.tolist()))

    def stats(self) -> dict[str, Any]:
        """Slots used, count and age summaries, per memory layer (host syncs: not for hot loops)."""
        layers = []
        for idx, mem in self._stores():
            state = mem.state_dict()
            if not state:
                layers.append({"layer": idx, "slots_used": 0})
                continue
            counts = state["counts"].float()
            used = counts > 0
            row: dict[str, Any] = {
                "layer": idx,
                "slots_used": int(used.sum()),
                "slots_total": int(counts.numel()),
                "tokens_merged": int(counts.sum()),
                "count_max": int(counts.max()),
                "count_mean": float(counts[used].mean()) if used.any() else 0.0,
                "count_hist": _hist(counts[used]),
            }
            if "ages" in state:
                ages = state["ages"].float()[used]
                row["age_mean"] = float(ages.mean()) if ages.numel() else 0.0
                row["age_hist"] = _hist(ages + 1)
            row.update(dict(zip(TELEMETRY_FIELDS, state["telemetry"].tolist())))
            layers.append(row)
        return {"strategy": self.cm.config.strategy, "layers": layers, "telemetry": self.telemetry()}

    # ------------------------------------------------------------------ snapshots
    def save(self, path: str | Path) -> Path:
        from safetensors.torch import save_file

        if self.cm.open_len:
            # the open segment is part of what the model has read; keep it by closing it
            self.cm.flush()
        tensors: dict[str, torch.Tensor] = {}
        for idx, mem in self._stores():
            for name, t in mem.state_dict().items():
                tensors[f"layer{idx}.{name}"] = t.detach().contiguous().cpu()
        meta = {
            "format": FORMAT,
            "camelot_version": _version(),
            "model_type": self.cm.adapter.text_config(self.cm.model).model_type,
            "fingerprint": model_fingerprint(self.cm),
            "layers": json.dumps([i for i, _ in self._stores()]),
            "num_kv_heads": str(self.cm.adapter.num_kv_heads(self.cm.model)),
            "config": json.dumps(self.cm.config.to_dict()),
        }
        path = Path(path)
        save_file(tensors, str(path), metadata=meta)
        return path

    def load(self, path: str | Path) -> None:
        """Replace the memory with a snapshot; refused (memory untouched) if it does not fit."""
        tensors, meta = read_snapshot(path)
        if meta.get("fingerprint") != model_fingerprint(self.cm):
            raise SnapshotError(
                f"{path}: snapshot was made with another model ({meta.get('model_type')}, fingerprint "
                f"{meta.get('fingerprint')}); this model is {self.cm.adapter.text_config(self.cm.model).model_type} "
                f"with fingerprint {model_fingerprint(self.cm)}")
        saved_cfg = json.loads(meta.get("config", "{}"))
        if saved_cfg.get("strategy") != self.cm.config.strategy:
            raise SnapshotError(f"{path}: snapshot holds a {saved_cfg.get('strategy')!r} memory, "
                                f"this wrapper uses {self.cm.config.strategy!r}")
        layers = json.loads(meta.get("layers", "[]"))
        mine = [i for i, _ in self._stores()]
        if layers != mine:
            raise SnapshotError(f"{path}: snapshot has memory on layers {layers}, this wrapper on {mine}")
        per_layer: dict[int, dict[str, torch.Tensor]] = {i: {} for i in mine}
        for key, t in tensors.items():
            layer, _, name = key.partition(".")
            per_layer[int(layer.removeprefix("layer"))][name] = t
        # Validate every layer before changing any, so a bad file leaves memory untouched.
        backups = {}
        for i, mem in self._stores():
            _validate_layer(path, i, per_layer[i], mem, self.cm)
        for i, mem in self._stores():
            backups[i] = mem.state_dict()
        try:
            self.cm.reset()
            for (i, mem), m in zip(self._stores(), self.cm.modules):
                dev = next(self.cm.modules[i].parameters()).device if list(m.parameters()) else None
                mem.load_state_dict(per_layer[i], device=dev)
        except Exception:
            for i, mem in self._stores():
                mem.load_state_dict({k: v.clone() for k, v in backups[i].items()})
            raise


def read_snapshot(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    from safetensors import SafetensorError, safe_open
    from safetensors.torch import load_file

    path = Path(path)
    if not path.is_file():
        raise SnapshotError(f"{path}: no such snapshot file")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = dict(f.metadata() or {})
        tensors = load_file(str(path))
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise SnapshotError(f"{path}: not a readable camelot snapshot (truncated, corrupted, or not "
                            f"safetensors): {e}") from None
    if meta.get("format") != FORMAT:
        raise SnapshotError(f"{path}: not a camelot memory snapshot (format {meta.get('format')!r})")
    return tensors, meta


def _validate_layer(path, i, state, mem, cm) -> None:
    need = {"keys", "values", "counts", "telemetry"}
    missing = need - set(state)
    if missing:
        raise SnapshotError(f"{path}: layer {i} lacks {sorted(missing)}")
    keys = state["keys"]
    h = cm.adapter.num_kv_heads(cm.model)
    if keys.dim() != 4 or keys.shape[1] != h:
        raise SnapshotError(f"{path}: layer {i} keys have shape {tuple(keys.shape)}, expected [B, {h}, S, D]")
    if hasattr(mem, "slots") and keys.shape[2] != mem.slots:
        raise SnapshotError(f"{path}: layer {i} has {keys.shape[2]} slots, this memory {mem.slots}")
    if not torch.isfinite(keys).all() or not torch.isfinite(state["values"]).all():
        raise SnapshotError(f"{path}: layer {i} holds non-finite values")


def _hist(x: torch.Tensor, bins: int = 8) -> list[tuple[int, int]]:
    """Log2-bucketed histogram: [(bucket lower bound, n)]."""
    if x.numel() == 0:
        return []
    b = torch.floor(torch.log2(x.clamp(min=1))).long()
    edges = torch.arange(int(b.max()) + 1)
    return [(int(2**e), int((b == e).sum())) for e in edges[:bins * 4].tolist() if int((b == e).sum())]


def _version() -> str:
    from camelot import __version__

    return __version__
