"""The snapshot file itself: its format marks, the model identity it records, reading its header
and tensors, and the checks every file must pass before anything else is looked at (no pickle,
not truncated, camelot's format, metadata of the types camelot writes, tensor bytes matching
their digest). What a file must fit in a given wrapper is checked in camelot/snapshot_checks.py."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from camelot.interfaces import Wrapper

FORMAT = "camelot-memory"
FORMAT_VERSION = 1
USER_PREFIX = "user."  # metadata keys a caller adds (e.g. `camelot ask` records its prompt format)
LAST_LOGP = "surprise.last_logp"  # the last prediction [batch, vocab]: scores the next step's first token
# the last query's final normed residual with and without memory [2, batch, 1, hidden]: the logit
# credit of the next step's first token (surprise_from="logit")
LAST_NORMED = "surprise.last_normed"
_PICKLE_MAGIC = (b"\x80", b"PK\x03\x04")  # pickle protocol 2+ / torch.save zip archive


class SnapshotError(ValueError):
    """A snapshot that cannot be loaded into this model; the live memory is unchanged."""


# ---------------------------------------------------------------------------- model identity
def architecture(cm: Wrapper) -> dict[str, Any]:
    """The facts a snapshot must agree with to be readable by this model."""
    cfg = cm.adapter.text_config(cm.model)
    heads = getattr(cfg, "num_attention_heads", None)
    head_dim = getattr(cm.modules[0], "head_dim", None) or getattr(cfg, "head_dim", None)
    if head_dim is None and heads:
        head_dim = cfg.hidden_size // heads
    return {"model_type": cfg.model_type, "num_layers": len(cm.modules), "num_heads": heads,
            "num_kv_heads": cm.adapter.num_kv_heads(cm.model), "head_dim": head_dim,
            "hidden_size": getattr(cfg, "hidden_size", None), "vocab_size": getattr(cfg, "vocab_size", None)}


def model_fingerprint(cm: Wrapper) -> str:
    """Architecture facts plus a digest of a few weight tensors: cheap, and different for
    different checkpoints of the same architecture. Weights are hashed after rounding to bf16,
    so an fp32 model and its bf16 copy share a fingerprint (the memory transfers between them)."""
    h = hashlib.sha256(json.dumps(architecture(cm), sort_keys=True).encode())
    emb = cm.model.get_input_embeddings().weight
    parts = [emb[: min(64, emb.shape[0])]]
    for m in cm.modules[:2]:
        parts += [p.flatten()[:4096] for p in list(m.parameters())[:1]]
    for p in parts:
        h.update(p.detach().to("cpu", torch.bfloat16).float().numpy().tobytes())
    return h.hexdigest()[:32]


# ---------------------------------------------------------------------------- 1. metadata
def check_metadata(path: Path, meta: dict[str, str]) -> None:
    """Types of the metadata values camelot reads (a bit flip can make `config` a number)."""
    version = meta.get("format_version", "")
    if not version.isdigit() or int(version) < 1:  # "-1", "0", " 1", "1.0": none written by camelot
        raise SnapshotError(f"{path}: bad format_version {version!r} (a positive integer)")
    for key, kind, what in (("config", dict, "a JSON object"), ("memory_layers", list, "a JSON list")):
        value = _json_or_none(meta.get(key))
        if not isinstance(value, kind):
            raise SnapshotError(f"{path}: bad {key} metadata {_short(meta.get(key))}: not {what}")
    layers = _json_or_none(meta["memory_layers"])
    if not all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in layers):
        raise SnapshotError(f"{path}: bad memory_layers metadata {_short(meta['memory_layers'])}")


# ---------------------------------------------------------------------------- reading files
def tensor_digest(tensors: dict[str, torch.Tensor]) -> str:
    """sha256 over names, dtypes, shapes and bytes: catches bit rot that leaves the file parseable."""
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def read_metadata(path: str | Path) -> dict[str, str]:
    """A snapshot's metadata, read from its header only (cheap; the tensors are not checked)."""
    from safetensors import safe_open

    path = _check_file(path)
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = dict(f.metadata() or {})
    except Exception as e:  # safetensors raises its own error types, OSError or ValueError
        raise SnapshotError(_unreadable(path, e)) from None
    _check_format(path, meta)
    return meta


def read_snapshot(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(tensors, metadata) of a snapshot file, after checking that it is one and is intact."""
    meta = read_metadata(path)
    return _read_tensors(Path(path), meta), meta


def _read_tensors(path: Path, meta: dict[str, str]) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    try:
        # copies in fresh (64-byte aligned) memory: tensors that keep the file's offsets are only
        # 8-byte aligned, where the header's length falls, and SIMD reductions over them round
        # differently, so a loaded memory would not continue bit-exactly (the metadata's length
        # decided it: a config value of 0.995 instead of 1.0 broke tests/test_snapshot_importance)
        tensors = {name: t.clone() for name, t in load_file(str(path)).items()}
    except Exception as e:
        raise SnapshotError(_unreadable(path, e)) from None
    if meta.get("digest") != tensor_digest(tensors):
        raise SnapshotError(f"{path}: corrupted: its tensor bytes do not match the digest recorded when it was saved")
    return tensors


def _check_file(path: str | Path) -> Path:
    path = Path(path)
    if not path.exists():
        raise SnapshotError(f"{path}: no such snapshot file")
    if not path.is_file():
        raise SnapshotError(f"{path}: not a file")
    with open(path, "rb") as f:
        head = f.read(9)
    # A safetensors file opens with its header length (8 bytes, little-endian) and then "{"; a
    # length whose low byte is 0x80 would otherwise look like a pickle's opcode.
    # Too short first: a cut-off snapshot whose header length starts with 0x80 is not a pickle.
    if len(head) < 8:
        raise SnapshotError(f"{path}: truncated or empty ({len(head)} bytes), not a camelot snapshot")
    safetensors_shaped = len(head) == 9 and head[8:9] == b"{"
    if not safetensors_shaped and any(head.startswith(m) for m in _PICKLE_MAGIC):
        raise SnapshotError(f"{path}: holds pickle data (torch.save / pickle); camelot loads only safetensors "
                            "snapshots and never unpickles a file")
    return path


def _unreadable(path: Path, e: Exception) -> str:
    return f"{path}: not a readable camelot snapshot (truncated, corrupted or not safetensors): {e}"


def _check_format(path: Path, meta: dict[str, str]) -> None:
    if meta.get("format") != FORMAT:
        raise SnapshotError(f"{path}: a safetensors file but not a camelot memory snapshot "
                            f"(format {meta.get('format')!r})")
    check_metadata(path, meta)
    try:
        version = int(meta.get("format_version", ""))
    except ValueError:
        raise SnapshotError(f"{path}: bad format_version {meta.get('format_version')!r}") from None
    if version > FORMAT_VERSION:
        raise SnapshotError(f"{path}: snapshot format {version} is newer than this camelot reads "
                            f"({FORMAT_VERSION}); upgrade camelot")


def metadata_value(text: str | None) -> Any:
    """A metadata entry parsed as JSON where it is JSON (else the text itself, None if absent)."""
    try:
        return json.loads(text) if text is not None else None
    except json.JSONDecodeError:
        return text


def _version() -> str:
    from camelot import __version__

    return __version__


def _json_or_none(text: str | None) -> Any:
    try:
        return json.loads(text) if text is not None else None
    except json.JSONDecodeError:
        return None


def _short(text: str | None) -> str:
    s = repr(text)
    return s if len(s) <= 40 else s[:37] + "..."

