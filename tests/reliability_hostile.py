"""Hostile-user cases (issue 19) appended to tests/reliability_cases.py's CASES: snapshots that
lie (values finite only in float64, counts near 2^62, a negative format version, batch 0, a
`config` that is not an object, a small sparse file declaring a 2 GiB tensor), text files that
never end (/dev/zero) or are too large, and more (see the case names)."""

from __future__ import annotations

import json
import os
import struct
import time
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from camelot.snapshot import SnapshotError, tensor_digest
from tests.reliability_cases import WATCH_MEMORY, Case, CliRefused, Ctx, Refused, _save_other


# ---------------------------------------------------------------------------- doctored snapshots
def _doctored(name: str, tensors_edit=None, meta_edit=None):
    """Setup: a snapshot of a wrapper identical to the live one, edited, re-digested (so only the
    edit can be what a refusal is about), saved as ctx.extra['path']."""
    def setup(ctx: Ctx) -> None:
        src = _save_other(ctx, "src.safetensors")
        with safe_open(str(src), framework="pt") as f:
            meta = dict(f.metadata())
            tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open has no iteration)
        if tensors_edit:
            tensors = tensors_edit(tensors)
        meta["digest"] = tensor_digest(tensors)
        if meta_edit:
            meta_edit(meta)
        path = ctx.tmp / name
        save_file(tensors, str(path), metadata=meta)
        ctx.extra["path"] = path
    return setup


def _keys_1e300(t: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    k = t["layer0.memory.keys"].double()
    k[0, 0, 0, 0] = 1e300
    return {**t, "layer0.memory.keys": k}


def _set(name: str, value: int):
    def edit(t: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        x = t[name].clone()
        x[0, 0, 0] = value
        return {**t, name: x}
    return edit


def _batch0(t: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: (v[:0] if v.dim() >= 3 else v) for k, v in t.items()}


def _meta(key: str, value: str):
    def edit(meta: dict[str, str]) -> None:
        meta[key] = value
    return edit


def _sparse_bomb(ctx: Ctx) -> None:
    """A valid safetensors layout whose layer-0 memory keys declare 2 GiB (2^24 slots x 2 heads x
    16 floats): 4 KiB on disk, 2 GiB by its size (sparse). Metadata of a good snapshot."""
    src = _save_other(ctx, "src.safetensors")
    with safe_open(str(src), framework="pt") as f:
        meta = dict(f.metadata())
        shapes = {k: (f.get_slice(k).get_dtype(), f.get_slice(k).get_shape()) for k in f.keys()}  # noqa: SIM118
    shapes["layer0.memory.keys"] = ("F32", [1, 2, 2**24, 16])
    header: dict[str, Any] = {"__metadata__": meta}
    off = 0
    for k, (dt, shape) in shapes.items():
        n = {"F32": 4, "I64": 8, "U8": 1, "BF16": 2}[dt] * int(torch.tensor(shape).prod())
        header[k] = {"dtype": dt, "shape": shape, "data_offsets": [off, off + n]}
        off += n
    body = json.dumps(header).encode()
    body += b" " * (-len(body) % 8)
    path = ctx.tmp / "bomb.safetensors"
    with open(path, "wb") as fh:
        fh.write(struct.pack("<Q", len(body)) + body)
    os.truncate(path, 8 + len(body) + off)
    ctx.extra["path"] = path


def _timed_load(ctx: Ctx):
    """The refusal must come from the header: well under a second, not the 23 s of reading 2 GiB."""
    t0 = time.perf_counter()
    try:
        ctx.cm.memory.load(ctx.extra["path"])
    finally:
        ctx.extra["seconds"] = time.perf_counter() - t0
        if ctx.extra["seconds"] > 2.0:
            raise AssertionError(f"refusal took {ctx.extra['seconds']:.1f} s: tensors were read first")


def _inspect(ctx: Ctx):
    return ctx.cli("inspect", str(ctx.extra["path"]), "--no-plot")


def _load(ctx: Ctx):
    return ctx.cm.memory.load(ctx.extra["path"])


SNAPSHOT_CASES = [
    Case("snapshot keys in float64 holding 1e300 (finite in float64, inf in the memory's float32)", _load,
         Refused(SnapshotError, "non-finite values in torch.float32"),
         setup=_doctored("f64.safetensors", _keys_1e300), watch=WATCH_MEMORY),
    Case("snapshot counts near 2^62 (would overflow the count sum)", _load, Refused(SnapshotError, "above 2^40"),
         setup=_doctored("counts.safetensors", _set("layer0.memory.counts", 2**62)), watch=WATCH_MEMORY),
    Case("snapshot ages near 2^62", _load, Refused(SnapshotError, "above 2^40"),
         setup=_doctored("ages.safetensors", _set("layer1.memory.ages", 2**62)), watch=WATCH_MEMORY),
    Case("snapshot with format_version -1", _load, Refused(SnapshotError, "format_version"),
         setup=_doctored("v-1.safetensors", meta_edit=_meta("format_version", "-1")), watch=WATCH_MEMORY),
    Case("snapshot with batch 0 (every state tensor has 0 rows)", _load, Refused(SnapshotError, "batch size"),
         setup=_doctored("b0.safetensors", _batch0), watch=WATCH_MEMORY),
    Case("snapshot whose config metadata is not a JSON object (memory.load)", _load,
         Refused(SnapshotError, "bad config metadata"),
         setup=_doctored("cfg.safetensors", meta_edit=_meta("config", "7")), watch=WATCH_MEMORY),
    Case("snapshot whose config metadata is not a JSON object (camelot inspect)", _inspect,
         CliRefused("bad config metadata"), setup=_doctored("cfg.safetensors", meta_edit=_meta("config", "7"))),
    Case("snapshot of 4 KiB on disk declaring a 2 GiB tensor (sparse file): refused from the header in < 2 s",
         _timed_load, Refused(SnapshotError, "has shape [1, 2, 16777216, 16]"), setup=_sparse_bomb,
         watch=WATCH_MEMORY),
]

HOSTILE_CASES: list[Case] = [*SNAPSHOT_CASES]
