"""Hostile-user cases (issue 19) appended to tests/reliability_cases.py's CASES: snapshots that
lie (values finite only in float64, counts near 2^62, a negative format version, batch 0, a
`config` that is not an object, a small sparse file declaring a 2 GiB tensor), text files that
never end (/dev/zero) or are too large, and more (see the case names)."""

from __future__ import annotations

import io
import json
import os
import struct
import sys
import time
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

import camelot
from camelot import CamelotConfig
from camelot.masks import MaskCache
from camelot.ownership import UnwrappedError
from camelot.snapshot import SnapshotError, tensor_digest
from tests.conftest import tiny_llama
from tests.reliability_cases import (
    FED,
    LIVE,
    WATCH_MEMORY,
    Case,
    CliOutcome,
    CliRefused,
    Ctx,
    Refused,
    Returns,
    _save_other,
    doc,
    memory_state,
    model_state,
)


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
    Case("snapshot with the tokens' importance for a memory that ranks none", _load,
         Refused(SnapshotError, "ranks no tokens"), watch=WATCH_MEMORY,
         setup=_doctored("imp.safetensors", lambda t: {**t, "layer0.open.importance": torch.zeros(
             t["layer0.open.keys"].shape[:3])})),
    Case("snapshot with a question's queries for a memory that ranks by none", _load,
         Refused(SnapshotError, "unexpected tensors"), watch=WATCH_MEMORY,
         setup=_doctored("asked.safetensors", lambda t: {**t, "layer0.question.queries": t["layer0.open.keys"][:, :, :3]
                                                         .float().clone()})),
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


# ---------------------------------------------------------------------------- data files (item 6)
def _sparse_txt(ctx: Ctx) -> Path:
    """A 2 GiB text file that takes no disk (sparse): only its size says how large it is."""
    path = ctx.file("huge.txt", "hello world\n")
    os.truncate(path, 2**31)
    return path


def _late_nul(ctx: Ctx) -> Path:
    return ctx.file("late_nul.txt", "hello world. " * 10_000 + "\x00" + "more text")


def _big_under_limit(ctx: Ctx) -> CliOutcome:
    return ctx.ppl(ctx.file("doc.txt", "hello world, " * 200), "--max-data-mb", "0.001")


DATA_CASES = [
    Case("data is /dev/zero (CLI: never ends)", lambda c: c.ppl("/dev/zero"), CliRefused("not a regular file")),
    Case("data is a 2 GiB sparse .txt (CLI)", lambda c: c.ppl(_sparse_txt(c)),
         CliRefused("raise it with --max-data-mb")),
    Case("text with a NUL byte past the first 64 KiB (CLI)", lambda c: c.ppl(_late_nul(c)), CliRefused("binary")),
    Case("text larger than --max-data-mb (2.6 KB, limit 1 KB)", _big_under_limit, CliRefused("limit on data")),
]


# ---------------------------------------------------------------------------- options (items 8, 9)
def _ask(ctx: Ctx, *extra: str) -> CliOutcome:
    doc = ctx.file("doc.txt", "the cat sat on the mat. " * 20)
    return ctx.cli("ask", "--model", str(ctx.ws.model_dir), "--context-file", str(doc), "--no-progress",
                   "--no-chat-template", "--device", "cpu", "--window", "16", "--slots", "8", "--max-new-tokens", "2",
                   *extra)


def _ask_interactive_bad_save(ctx: Ctx) -> tuple[CliOutcome, Path]:
    """`/save` into a missing folder, then into a good path: the session must survive the first."""
    good = ctx.tmp / "good.camelot"
    lines = f"/save {ctx.tmp / 'missing' / 'x.camelot'}\n/save {good}\n/quit\n"
    stdin, sys.stdin = sys.stdin, io.StringIO(lines)
    try:
        return _ask(ctx, "-i"), good
    finally:
        sys.stdin = stdin


def _bad_save_check(ctx: Ctx, r) -> str | None:
    out, good = r
    if out.rc != 0:
        return f"exit {out.rc}: {out.stderr}"
    if "not saved" not in out.stderr or "does not exist" not in out.stderr:
        return f"no one-line refusal in {out.stderr!r}"
    return None if good.exists() else "the session did not go on to save after the refused /save"


def _out_file(ctx: Ctx) -> CliOutcome:
    ctx.file("taken", "a file")
    return ctx.cli("ppl", "--model", str(ctx.ws.model_dir), "--data", str(ctx.file("doc.txt", "hello world " * 30)),
                   "--no-progress", "--device", "cpu", "--out", str(ctx.tmp / "taken"))


def _out_under_file(ctx: Ctx) -> CliOutcome:
    ctx.file("taken", "a file")
    return ctx.cli("ppl", "--model", str(ctx.ws.model_dir), "--data", str(ctx.file("doc.txt", "hello world " * 30)),
                   "--no-progress", "--device", "cpu", "--out", str(ctx.tmp / "taken" / "results"))


def _doc_cli(ctx: Ctx, *extra: str) -> CliOutcome:
    return ctx.cli("ppl", "--model", str(ctx.ws.model_dir), "--data", str(ctx.file("doc.txt", "hello world " * 30)),
                   "--no-progress", "--out", str(ctx.tmp / "out"), *extra)


OPTION_CASES = [
    Case("--out is a file (CLI ppl): refused before the run", _out_file, CliRefused("is a file, not a folder")),
    Case("--out under a file (CLI ppl): refused before the run", _out_under_file,
         CliRefused("is a file, so the folder cannot be created")),
    Case("--device cuda:99 (no such GPU here)", lambda c: _doc_cli(c, "--device", "cuda:99"),
         CliRefused("--device cuda:99")),
    Case("unknown device (--device tpu0)", lambda c: _doc_cli(c, "--device", "tpu0"), CliRefused("is not a device")),
    Case("--threads -3", lambda c: _doc_cli(c, "--device", "cpu", "--threads", "-3"),
         CliRefused("--threads must be an integer >= 1")),
    Case("ask --save into a missing folder: refused before the document is read",
         lambda c: _ask(c, "--save", str(c.tmp / "missing" / "x.camelot"), "who?"), CliRefused("does not exist")),
    Case("/save into a missing folder inside ask -i", _ask_interactive_bad_save,
         Returns(_bad_save_check, lambda c, r: "one line (“not saved: … does not exist”); the session goes on "
                 "and the next /save writes the snapshot")),
]


# ---------------------------------------------------------------------------- low-level API (item 11)
def _make_folder(ctx: Ctx) -> None:
    (ctx.tmp / "folder").mkdir(exist_ok=True)


def _files(ctx: Ctx) -> tuple[dict[str, Any], list[str]]:
    return memory_state(ctx.cm), sorted(os.listdir(ctx.tmp))


def _restore_other(ctx: Ctx):
    other = camelot.wrap(tiny_llama(seed=1), CamelotConfig(**LIVE))
    other.feed(doc(FED, seed=2), progress=False)
    return ctx.cm.memory.restore(other.memory.checkpoint())


API_CASES = [
    Case("cm.step with an out-of-vocabulary id", lambda c: c.cm.step(torch.tensor([[5, 500]])),
         Refused(ValueError, "must lie in"), watch=WATCH_MEMORY),
    Case("cm.step with a negative id", lambda c: c.cm.step(torch.tensor([[-1, 5]])),
         Refused(ValueError, "must lie in"), watch=WATCH_MEMORY),
    Case("cm.step with float ids", lambda c: c.cm.step(torch.ones(1, 2)), Refused(TypeError, "integers"),
         watch=WATCH_MEMORY),
    Case("cm.step with 1-D ids", lambda c: c.cm.step(torch.tensor([1, 2])), Refused(ValueError, "must be [batch, m]"),
         watch=WATCH_MEMORY),
    Case("cm.step with no ids (shape (1, 0))", lambda c: c.cm.step(torch.zeros(1, 0, dtype=torch.long)),
         Refused(ValueError, "no tokens"), watch=WATCH_MEMORY),
    Case("cm.step with ids of shape (0, 3)", lambda c: c.cm.step(torch.zeros(0, 3, dtype=torch.long)),
         Refused(ValueError, "0 rows"), watch=WATCH_MEMORY),
    Case("generate(pad_token_id=10**6): refused before the prompt is read",
         lambda c: c.cm.generate(doc(4), max_new_tokens=3, pad_token_id=10**6),
         Refused(ValueError, "pad_token_id"), watch=WATCH_MEMORY),
    Case("restore() of a checkpoint taken from another model", _restore_other,
         Refused(ValueError, "another wrapper"), watch=WATCH_MEMORY),
    Case("save onto a folder: refused, no .partial file left", lambda c: c.cm.memory.save(c.tmp / "folder"),
         Refused(IsADirectoryError, "is a folder"), setup=_make_folder, watch=_files),
]

HOSTILE_CASES += [*DATA_CASES, *OPTION_CASES, *API_CASES]


# ---------------------------------------------------------------------------- ownership (items 1, 2, 4)
def _rewrapped(ctx: Ctx) -> None:
    """The live wrapper unwrapped, its model wrapped anew (and fed): ctx.extra['new']."""
    model = ctx.cm.unwrap()
    ctx.extra["new"] = camelot.wrap(model, CamelotConfig(**LIVE))
    ctx.extra["new"].feed(doc(FED, seed=7), progress=False)


def _new_state(ctx: Ctx) -> tuple[dict[str, Any], Any, bool]:
    new = ctx.extra["new"]
    return memory_state(new), new.model.config._attn_implementation, new.model._camelot_wrapper is new


def _window_zero(ctx: Ctx):
    cfg = CamelotConfig(**LIVE)
    cfg.window = 0  # after construction: the dataclass does not check assignments
    return camelot.wrap(ctx.extra.setdefault("model", tiny_llama()), cfg)


def _two_threads(ctx: Ctx):
    """Two threads scoring different documents on one wrapper, 3 rounds, against sequential runs."""
    import threading

    cm = ctx.cm
    docs = [doc(200, seed=s) for s in (11, 12)]
    sequential = [cm.score(d).token_nll for d in docs]
    got: dict[int, list[torch.Tensor]] = {0: [], 1: []}

    def run(i: int) -> None:
        for _ in range(3):
            got[i].append(cm.score(docs[i]).token_nll)

    threads = [threading.Thread(target=run, args=(i,)) for i in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return sequential, got


def _two_threads_check(ctx: Ctx, r) -> str | None:
    sequential, got = r
    bad = [(i, j) for i in (0, 1) for j, nll in enumerate(got[i]) if not torch.equal(nll, sequential[i])]
    return None if not bad and all(len(v) == 3 for v in got.values()) else f"results differ from sequential: {bad}"


def _masks_freed(ctx: Ctx) -> tuple[int, int, int]:
    """(masks cached, their bytes) after scoring at window 128, and masks cached after unwrap."""
    cm = camelot.wrap(tiny_llama(), CamelotConfig(**{**LIVE, "window": 128}))
    cm.score(doc(300, seed=4))
    cached, size = len(cm.masks), cm.masks.bytes
    cm.unwrap()
    return cached, size, len(cm.masks)


def _masks_check(ctx: Ctx, r) -> str | None:
    cached, size, after = r
    ok = cached > 0 and 0 < size <= MaskCache().max_bytes and after == 0
    return None if ok else f"masks cached {cached} ({size} bytes), after unwrap {after}"


OWNERSHIP_CASES = [
    Case("unwrap, wrap the model anew, then old.unwrap() again", lambda c: c.cm.unwrap(),
         Refused(UnwrappedError, "was unwrapped"), setup=_rewrapped, watch=_new_state),
    Case("old.feed() after its model was wrapped anew", lambda c: c.cm.feed(doc(8), progress=False),
         Refused(UnwrappedError, "was unwrapped"), setup=_rewrapped, watch=_new_state),
    Case("old.memory.stats() after unwrap", lambda c: c.cm.memory.stats(),
         Refused(UnwrappedError, "was unwrapped"), setup=_rewrapped, watch=_new_state),
    Case("cfg.window = 0 set after construction, then wrap", _window_zero,
         Refused(ValueError, "window must be an integer >= 1"),
         watch=lambda c: model_state(c.extra.setdefault("model", tiny_llama()))),
    Case("one wrapper scoring from two threads (3 rounds each)", _two_threads,
         Returns(_two_threads_check, lambda c, r: "calls are serialised by the wrapper's lock: every result "
                 "equals the sequential one bit for bit")),
    Case("mask caches after scoring at a window 8x the tiny one's, then unwrap (item 7)", _masks_freed,
         Returns(_masks_check, lambda c, r: f"the masks are the wrapper's own: {r[0]} cached ({r[1] / 2**10:.0f} "
                 f"KiB, bound {MaskCache().max_bytes >> 20} MiB), 0 after unwrap; nothing module-level")),
]

HOSTILE_CASES += OWNERSHIP_CASES
