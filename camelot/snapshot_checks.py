"""Checks a snapshot must pass before camelot reads or keeps any of it (see camelot/snapshot.py).

In the order `MemoryView.load` runs them:

1. `check_metadata`: the header's metadata values have the types camelot writes (`config` a
   JSON object, `memory_layers` a list of layer indices, a positive `format_version`).
2. `check_header`: every tensor's name, dtype and shape, read from the safetensors header only,
   fits this wrapper (its layers, KV heads, head dim, slots, window, raw lengths; one batch size
   >= 1), and all of them together fit in this machine's memory. A small (e.g. sparse) file
   declaring a huge tensor is refused here, before a byte of tensor data is read or hashed.
3. `check_values`: after reading, floats are finite in the dtype they will be kept in (1e300 is
   finite in float64 but inf in float32), counts, ages and telemetry lie in [0, MAX_COUNT], and a
   span reserve's scores (`memory.span_score`, only for a memory with a reserve) are >= EMPTY_SPAN
   (-1e30, an empty place; a scan's scores may be negative). A question's queries
   (`question.queries`, only for a memory ranked by a question) have a batch of 1 or the rows'
   (checked by `MemoryView.load` once every tensor's batch is known).
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from camelot.memory import TELEMETRY_FIELDS, SlotBank
from camelot.memory.bank_state import EMPTY_SPAN, span_state_len
from camelot.snapshot_format import LAST_LOGP, LAST_NORMED, SnapshotError, architecture

if TYPE_CHECKING:
    from camelot.attention import LayerRuntime
    from camelot.interfaces import Wrapper

# Counts, ages and telemetry are token counts: 2^40 (1.1e12 tokens) is far beyond any document,
# and keeps sums over slots (2^22 slots at most) far below int64's 2^63.
MAX_COUNT = 1 << 40
_NAME = re.compile(r"layer(\d+)\.(open|memory|prefix|sink|question)\."
                   r"(keys|values|counts|ages|telemetry|finite|span_score|slot_score|pinned|importance|queries)")
_DTYPE_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "F8_E4M3": 1, "F8_E5M2": 1, "I64": 8, "U64": 8,
                "I32": 4, "U32": 4, "I16": 2, "U16": 2, "I8": 1, "U8": 1, "BOOL": 1}


# ---------------------------------------------------------------------------- 2. header
def header_entries(path: Path) -> dict[str, tuple[str, list[int]]]:
    """name -> (safetensors dtype, shape), from the file's header alone (no tensor data read)."""
    with open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        if n > 100 * 2**20:  # safetensors' own limit on a header
            raise SnapshotError(f"{path}: header of {n} bytes, not a camelot snapshot")
        try:
            header = json.loads(f.read(n))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise SnapshotError(f"{path}: unreadable header: {e}") from None
    if not isinstance(header, dict):
        raise SnapshotError(f"{path}: header is not a JSON object")
    out = {}
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        shape = entry.get("shape") if isinstance(entry, dict) else None
        if not isinstance(shape, list) or not all(isinstance(s, int) and s >= 0 for s in shape):
            raise SnapshotError(f"{path}: tensor {name!r} has a malformed header entry")
        out[name] = (str(entry.get("dtype")), shape)
    return out


def check_header(path: Path, cm: Wrapper, open_len: int) -> None:
    """Every tensor the header declares fits this wrapper, and all of them fit in memory."""
    arch = architecture(cm)
    h, d = arch["num_kv_heads"], arch["head_dim"]
    dv_max = max(d or 0, arch["hidden_size"] or 0)  # value head dim: head_dim in every adapter so far
    runtimes = {rt.layer_idx: rt for rt in cm.runtimes}
    batches, total = set(), 0
    for name, (dtype, shape) in header_entries(path).items():
        if name == LAST_LOGP and any(rt.state.tracks_surprise for rt in cm.runtimes):
            if len(shape) != 2 or shape[1] != logits_size(cm) or not dtype.startswith(("F", "BF")):
                raise SnapshotError(f"{path}: {name} has shape {shape} and dtype {dtype}; this model predicts "
                                    f"[batch, {logits_size(cm)}] floats")
            batches.add(shape[0])
            total += _DTYPE_BYTES.get(dtype, 8) * _numel(shape)
            continue
        if name == LAST_NORMED:
            if cm.surprise.source != "logit":
                raise SnapshotError(f"{path}: unexpected tensors [{name!r}] (the logit credit's residuals; this "
                                    f"wrapper ranks by surprise from {cm.surprise.source!r})")
            if len(shape) != 4 or shape[0] != 2 or shape[2] != 1 or shape[3] != arch["hidden_size"] \
                    or not dtype.startswith(("F", "BF")):
                raise SnapshotError(f"{path}: {name} has shape {shape} and dtype {dtype}; this model's residuals "
                                    f"are [2, batch, 1, {arch['hidden_size']}] floats")
            batches.add(shape[1])
            total += _DTYPE_BYTES.get(dtype, 8) * _numel(shape)
            continue
        m = _NAME.fullmatch(name)
        rt = runtimes.get(int(m[1])) if m else None
        cap = _capacity(rt, m[2], cm.config.window, open_len, arch["num_heads"] // h) if rt is not None else None
        if cap is None:
            raise SnapshotError(f"{path}: unexpected tensors [{name!r}] (not written by this camelot layout)")
        field = m[3]
        if (m[2] == "question") != (field == "queries"):
            raise SnapshotError(f"{path}: unexpected tensors [{name!r}] (not written by this camelot layout)")
        reserve = _span_reserve(rt) if m[2] == "memory" else 0
        if field == "span_score" and not reserve:
            raise SnapshotError(f"{path}: unexpected tensors [{name!r}] (span reserve scores; this wrapper's "
                                f"{m[2]} of layer {m[1]} keeps no span reserve: span_reserve=0)")
        rule = getattr(rt.state.memory, "rule", None) if m[2] == "memory" else None
        if field in ("slot_score", "pinned") and not (rule and (rule.ranks_slots if field == "slot_score"
                                                                else rule.protect > 0)):
            raise SnapshotError(f"{path}: unexpected tensors [{name!r}] (slot scores; this wrapper's {m[2]} of "
                                f"layer {m[1]} ranks no slots)")
        floating = field in ("keys", "values", "span_score", "slot_score", "importance", "queries")
        if dtype not in _DTYPE_BYTES or dtype.startswith(("F", "BF")) != floating:
            raise SnapshotError(f"{path}: {name} has dtype {dtype}")
        if field == "telemetry":
            if shape != [len(TELEMETRY_FIELDS)]:
                raise SnapshotError(f"{path}: {name} has shape {shape}, expected [{len(TELEMETRY_FIELDS)}]")
        elif field == "importance":
            two = rt.state.tracks_two
            ranks = rt.state.tracks_importance
            if not ranks or m[2] not in ("open", "prefix") or len(shape) != 3 + two or shape[1] != h or \
                    shape[2] > cap or (two and shape[3] != 2):
                raise SnapshotError(f"{path}: {name} has shape {shape}; this wrapper's {m[2]} of layer {m[1]} "
                                    + (f"takes [batch, {h} kv heads, <= {cap} tokens{', 2' if two else ''}]"
                                       if ranks and m[2] in ("open", "prefix") else "ranks no tokens"))
            batches.add(shape[0])
        elif field == "queries":  # batch 1 (one question for every row) or the rows' batch: checked on load
            if len(shape) != 4 or shape[1] != h or not 1 <= shape[2] <= cap or shape[3] != d or shape[0] < 1:
                raise SnapshotError(f"{path}: {name} has shape {shape}; this wrapper takes [batch, {h} kv heads, "
                                    f"1 to {cap} question queries, {d}]")
        elif field in ("slot_score", "pinned"):
            if len(shape) != 3 or shape[1] != h or shape[2] != cap:
                raise SnapshotError(f"{path}: {name} has shape {shape}; this wrapper takes [batch, {h} kv heads, "
                                    f"{cap} slots]")
            batches.add(shape[0])
        elif field == "span_score":
            lengths = span_state_len(rt.state.memory)
            if len(shape) != 3 or shape[1] != h or shape[2] not in lengths:
                raise SnapshotError(f"{path}: {name} has shape {shape}; this wrapper takes [batch, {h} kv heads, "
                                    f"{reserve} span reserve places (+ {lengths[-1] - reserve} carried scores)]")
            batches.add(shape[0])
        else:
            last = [] if not floating else [d if field == "keys" else None]
            if len(shape) != 3 + len(last) or shape[1] != h or shape[2] > cap or \
                    (field == "keys" and shape[3] != d) or (field == "values" and not 1 <= shape[3] <= dv_max):
                raise SnapshotError(f"{path}: {name} has shape {shape}; this wrapper takes [batch, {h} kv heads, "
                                    f"<= {cap} tokens" + (f", {d}]" if floating else "]"))
            batches.add(shape[0])
        total += _DTYPE_BYTES[dtype] * _numel(shape)
    if len(batches) > 1 or 0 in batches:
        raise SnapshotError(f"{path}: bad batch size {sorted(batches)} (one size >= 1 for every tensor)")
    ram = _physical_memory()
    if ram is not None and total > ram:
        raise SnapshotError(f"{path}: declares {total / 2**30:.1f} GiB of tensors, more than this machine's "
                            f"{ram / 2**30:.1f} GiB of memory")


def logits_size(cm: Wrapper) -> int:
    """Entries of the model's next-token prediction (its output embedding's rows)."""
    head = cm.model.get_output_embeddings()
    return head.weight.shape[0] if head is not None else cm.model.config.vocab_size


def _capacity(rt: LayerRuntime, part: str, window: int, open_len: int, per_kv: int) -> float | None:
    """Most tokens per row this layer keeps in `part`; None where it keeps no such part."""
    if part == "open":
        return open_len
    if part == "question":  # a KV head's query heads times the question's tokens (at most a window)
        return per_kv * window if rt.state.tracks_question else None
    store = {"memory": rt.state.memory, "prefix": rt.state.prefix, "sink": rt.state.sink}[part]
    if store is None:
        return None
    if part == "memory":
        return store.slots if isinstance(store, SlotBank) else float("inf")  # a knn store grows with the text
    return store.length


def _span_reserve(rt: LayerRuntime) -> int:
    """Slots per head of the layer's memory kept for raw spans (WriteRule.span_reserve); 0: none."""
    return getattr(getattr(rt.state.memory, "rule", None), "span_reserve", 0)


def _numel(shape: list[int]) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def _physical_memory() -> int | None:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):  # not on this platform
        return None


# ---------------------------------------------------------------------------- 3. values
def check_values(path: Path, tensors: dict[str, torch.Tensor], cm: Wrapper) -> None:
    """Floats finite in the dtype they will be kept in; counts, ages, telemetry in [0, MAX_COUNT];
    span scores >= -1 (-1: an empty place)."""
    layer_dtypes = {}
    for module, rt in zip(cm.modules, cm.runtimes):
        p = next(module.parameters(), None)
        layer_dtypes[rt.layer_idx] = (p.dtype if p is not None else torch.float32,
                                      getattr(rt.state.memory, "dtype", None))
    for name, t in tensors.items():
        m = _NAME.fullmatch(name)
        if m is None or int(m[1]) not in layer_dtypes:
            continue  # check_header refused these; the layer build reports any left
        if m[3] == "queries":  # a question's queries are kept in float32
            if not torch.isfinite(t.float()).all():
                raise SnapshotError(f"{path}: {name} holds non-finite values in float32 (the dtype it is kept in)")
        elif m[3] == "span_score":  # kept in float32 whatever the memory's dtype
            # the mark as the file's float32 holds it (-1.00000002e30): compared in the tensor's dtype
            if t.numel() and not (torch.isfinite(t.float()).all() and bool((t.float() >= EMPTY_SPAN).all())):
                raise SnapshotError(f"{path}: {name} holds non-finite values or values below {EMPTY_SPAN:g} "
                                    "(which marks an empty place)")
        elif t.is_floating_point():
            model_dtype, memory_dtype = layer_dtypes[int(m[1])]
            for dt in {model_dtype, memory_dtype if m[2] == "memory" else model_dtype} - {None}:
                if t.numel() and not torch.isfinite(t.to(dt)).all():
                    raise SnapshotError(f"{path}: {name} holds non-finite values in {dt} "
                                        "(the dtype it is kept or read in)")
        elif t.numel() and int(t.min()) < 0:
            raise SnapshotError(f"{path}: {name} holds negative values")
        elif t.numel() and int(t.max()) > MAX_COUNT:  # bounded: see MAX_COUNT
            raise SnapshotError(f"{path}: {name} holds values above 2^40 (max {int(t.max())})")
