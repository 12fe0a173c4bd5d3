"""One layer's state built from a snapshot's tensors, checked, aside from the live wrapper
(camelot/snapshot.py swaps the built states in only when every layer was built)."""

from __future__ import annotations

import copy
from typing import TYPE_CHECKING, Any

import torch

from camelot.memory import TELEMETRY_FIELDS, RawWindow, SinkTokens
from camelot.snapshot_format import SnapshotError, architecture

if TYPE_CHECKING:
    from camelot.attention import LayerRuntime
    from camelot.interfaces import Wrapper


def open_len(path, meta: dict[str, str]) -> int:
    """Tokens of the open segment the snapshot holds, refusing a malformed value."""
    try:
        n = int(meta.get("open_len", "0"))
    except ValueError:
        raise SnapshotError(f"{path}: bad open_len {meta.get('open_len')!r} in its metadata") from None
    if n < 0:
        raise SnapshotError(f"{path}: bad open_len {n} in its metadata")
    return n


def build_layer(path, rt: LayerRuntime, tensors: dict[str, torch.Tensor], meta: dict[str, str],
                 cm: Wrapper) -> tuple[Any, ...]:
    """The new (open keys, open values, memory, prefix, sink, (open, prefix) importance, question)
    of one layer, checked, on the layer's device; the live runtime is not touched. Also returns
    the tensor names it used."""
    i = rt.layer_idx
    arch = architecture(cm)
    h, d = arch["num_kv_heads"], arch["head_dim"]
    module = cm.modules[cm.runtimes.index(rt)]
    p = next(module.parameters(), None)
    dev, dtype = (p.device, p.dtype) if p is not None else (torch.device("cpu"), torch.float32)
    used: list[str] = []

    def take(name: str, dims: int, floating: bool) -> torch.Tensor:
        key = f"layer{i}.{name}"
        if key not in tensors:
            raise SnapshotError(f"{path}: layer {i} lacks {name}")
        t = tensors[key]
        if t.dim() != dims or t.is_floating_point() != floating:
            raise SnapshotError(f"{path}: layer {i} {name} has shape {tuple(t.shape)} and dtype {t.dtype}")
        if floating and not torch.isfinite(t).all():
            raise SnapshotError(f"{path}: layer {i} {name} holds non-finite values")
        if not floating and t.numel() and int(t.min()) < 0:
            raise SnapshotError(f"{path}: layer {i} {name} holds negative values")
        used.append(key)
        return t

    def check_kv(name: str, k: torch.Tensor, v: torch.Tensor) -> None:
        if k.shape[1] != h or k.shape[3] != d or v.shape[:3] != k.shape[:3]:
            raise SnapshotError(f"{path}: layer {i} {name} keys {tuple(k.shape)} / values {tuple(v.shape)} do not "
                                f"fit [batch, {h} kv heads, n, {d}]")

    open_k = open_v = None
    n_open = open_len(path, meta)
    if n_open:
        open_k, open_v = take("open.keys", 4, True), take("open.values", 4, True)
        check_kv("open segment", open_k, open_v)
        if open_k.shape[2] != n_open:
            raise SnapshotError(f"{path}: layer {i} open segment has {open_k.shape[2]} tokens, "
                                f"metadata says {n_open}")
        open_k, open_v = open_k.to(dev, dtype), open_v.to(dev, dtype)

    mem = None
    if rt.state.memory is not None:
        names = {k.split(".", 2)[2] for k in tensors if k.startswith(f"layer{i}.memory.")}
        mem = copy.copy(rt.state.memory)  # same settings; load_state_dict rebinds every tensor it sets
        mem.reset()
        if names:
            state = {"keys": take("memory.keys", 4, True), "values": take("memory.values", 4, True),
                     "counts": take("memory.counts", 3, False), "telemetry": take("memory.telemetry", 1, False)}
            if "ages" in names or hasattr(rt.state.memory, "ages"):
                state["ages"] = take("memory.ages", 3, False)
            if "span_score" in names:  # a span reserve's ranking; its shape is checked by load_state_dict
                state["span_score"] = take("memory.span_score", 3, True)
            for name, floating in (("slot_score", True), ("pinned", False)):  # the slots' ranking, where kept
                if name in names:
                    state[name] = take(f"memory.{name}", 3, floating)
            check_kv("memory", state["keys"], state["values"])
            for name in ("counts", "ages"):
                if name in state and state[name].shape != state["keys"].shape[:3]:
                    raise SnapshotError(f"{path}: layer {i} memory {name} {tuple(state[name].shape)} does not fit "
                                        f"keys {tuple(state['keys'].shape)}")
            if state["telemetry"].numel() != len(TELEMETRY_FIELDS):
                raise SnapshotError(f"{path}: layer {i} memory telemetry has {state['telemetry'].numel()} fields")
            try:
                mem.load_state_dict(state, device=dev)
            except (ValueError, RuntimeError) as e:
                raise SnapshotError(f"{path}: layer {i} memory: {e}") from None

    def take_raw(name: str, length: int) -> tuple[torch.Tensor, torch.Tensor]:
        k, v = take(f"{name}.keys", 4, True), take(f"{name}.values", 4, True)
        check_kv(name, k, v)
        if k.shape[2] > length:
            raise SnapshotError(f"{path}: layer {i} {name} holds {k.shape[2]} tokens, this wrapper keeps {length}")
        return k.to(dev), v.to(dev)

    pre = None
    if rt.state.prefix is not None:
        pre = RawWindow(rt.state.prefix.length)
        if f"layer{i}.prefix.keys" in tensors:
            pre.keys, pre.values = take_raw("prefix", pre.length)
            finite = take("prefix.finite", 3, False)
            if finite.shape != pre.keys.shape[:3] or int(finite.max()) > 1:
                raise SnapshotError(f"{path}: layer {i} prefix.finite {tuple(finite.shape)} does not fit its keys")
            pre.finite = finite.to(dev, torch.bool)

    sink = None
    if rt.state.sink is not None:
        sink = SinkTokens(rt.state.sink.length)
        if f"layer{i}.sink.keys" in tensors:
            sink.keys, sink.values = take_raw("sink", sink.length)

    def importance(part: str, like: torch.Tensor | None) -> torch.Tensor | None:
        """What the write will rank the open / raw tail tokens by; absent: they start from 0."""
        if f"layer{i}.{part}.importance" not in tensors:
            return None
        two = rt.state.tracks_two
        t = take(f"{part}.importance", 4 if two else 3, True)
        want = None if like is None else (*like.shape[:3], *((2,) if two else ()))
        if tuple(t.shape) != want:
            raise SnapshotError(f"{path}: layer {i} {part}.importance {tuple(t.shape)} does not fit its tokens {want}")
        return t.to(dev, torch.float32)

    ranked = importance("open", open_k), importance("prefix", None if pre is None else pre.keys)
    question = None  # the queries of the question the reserve ranks by (check_header checked its shape)
    if f"layer{i}.question.queries" in tensors:
        question = take("question.queries", 4, True).to(dev, torch.float32)
    return open_k, open_v, mem, pre, sink, ranked, question, used


