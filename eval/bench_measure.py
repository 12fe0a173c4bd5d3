"""What `camelot bench` measures with: peak RSS, a recall probe around a search backend, one
timed run of a wrapped model (banks pre-filled), the plain model's run, and a profile of one
camelot segment with the source line of every host sync."""

from __future__ import annotations

import statistics
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import torch

from camelot.config import CamelotConfig
from camelot.search import SearchBase, TorchExactSearch

SYNC_OPS = ("aten::item", "aten::_local_scalar_dense", "aten::nonzero", "aten::is_nonzero", "aten::equal")


# ---------------------------------------------------------------------------- measuring
class PeakRSS:
    """Peak resident memory (bytes) while the block runs, sampled by a thread every few ms.
    ru_maxrss cannot be reset within a process, so a later, smaller run could not be measured."""

    def __init__(self, interval: float = 0.005) -> None:
        import psutil

        self._proc = psutil.Process()
        self.interval = interval
        self.peak = 0
        self._stop = threading.Event()

    def _poll(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self._proc.memory_info().rss)
            self._stop.wait(self.interval)

    def __enter__(self) -> PeakRSS:
        self.peak = self._proc.memory_info().rss
        self._thread = threading.Thread(target=self._poll, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self._proc.memory_info().rss)


class RecallProbe(SearchBase):
    """A search backend that answers with `inner` and counts how many of exact search's top-k
    it found (only where exact search found a valid slot)."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.name = f"probe({inner.name})"
        self.score_dtype = inner.score_dtype
        self.found = 0
        self.total = 0

    def reset(self) -> None:
        self.inner.reset()

    def topk(self, queries, keys, valid, k):
        scores, idx = self.inner.topk(queries, keys, valid, k)
        ref = TorchExactSearch().topk(queries, keys, valid, k)
        real = torch.isfinite(ref.values)
        hit = (ref.indices[..., :, None] == idx[..., None, :]).any(-1) & real
        self.found += int(hit.sum())
        self.total += int(real.sum())
        return scores, idx

    @property
    def recall(self) -> float:
        return self.found / self.total if self.total else float("nan")


@dataclass
class Row:
    """One measured configuration."""

    label: str
    strategy: str
    slots: int | None = None
    search: str | None = None
    tokens: int = 0
    segments: int = 0
    seconds: float = 0.0
    seg_median: float = 0.0
    peak_rss: int = 0
    state_bytes: int = 0
    extra: dict = field(default_factory=dict)
    seg_times: list[float] = field(default_factory=list)  # seconds of each segment, every round

    @property
    def tokens_per_second(self) -> float:
        return self.tokens / self.seconds if self.seconds else float("nan")


def fill_banks(cm, seed: int = 0) -> None:
    """Put every layer in its steady state: every camelot bank with all slots used (random
    keys/values, count 1, distinct ages), so the timed segments pay for a full bank and for
    evictions, and every raw cache (camelot's tail, `sliding`'s whole budget) at its full length,
    so that a short timed document does not time `sliding` with a cache it has not filled yet."""
    from camelot.memory import SlotBank

    cfg = cm.model.config
    g = torch.Generator().manual_seed(seed)
    for rt in cm.runtimes:
        attn = cm.modules[rt.layer_idx]
        h = cfg.num_key_value_heads
        d = getattr(attn, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        dev = next(attn.parameters()).device
        raw = rt.state.prefix
        if raw is not None and raw.size < raw.length:  # a raw cache (sliding's whole budget) at its full length
            raw.reset()
            raw.write(torch.randn(1, h, raw.length, d, generator=g).to(dev),
                      torch.randn(1, h, raw.length, d, generator=g).to(dev))
        if not isinstance(rt.state.memory, SlotBank):
            continue
        s = rt.state.memory.slots
        state = {"keys": torch.randn(1, h, s, d, generator=g), "values": torch.randn(1, h, s, d, generator=g),
                 "counts": torch.ones(1, h, s, dtype=torch.long),
                 "ages": torch.randperm(s, generator=g).expand(1, h, s).contiguous(),
                 "telemetry": torch.zeros(5, dtype=torch.long)}
        rt.state.memory.load_state_dict(state, device=dev)


def state_bytes(cm) -> int:
    """Bytes held by memory and prefix tensors of every layer."""
    total = 0
    for rt in cm.runtimes:
        for holder in (rt.state.memory, rt.state.prefix, rt.state.sink):
            for name in ("keys", "values", "counts", "ages", "valid"):
                t = getattr(holder, name, None)
                if isinstance(t, torch.Tensor):
                    total += t.numel() * t.element_size()
    return total


def run_wrapped(model, ids: torch.Tensor, cfg: CamelotConfig, label: str, prefill: bool = False,
                probe: bool = False, progress: bool = True) -> Row:
    """Time `ids` [1, N] through a wrapped model segment by segment (cm.step, as feed does)."""
    import camelot
    from camelot.progress import progress_bar

    cm = camelot.wrap(model, cfg)
    try:
        if prefill:
            fill_banks(cm)
        if probe:
            cm.replace_search(RecallProbe)
        spans = list(cm.segments(ids.shape[1]))
        times = []
        with PeakRSS() as rss, torch.no_grad():
            for a, e in progress_bar(spans, desc=label, enabled=progress, unit="seg"):
                t0 = time.perf_counter()
                cm.step(ids[:, a:e])
                times.append(time.perf_counter() - t0)
        row = Row(label, cfg.strategy, cfg.slots if cfg.strategy in ("camelot", "sliding") else None,
                  cfg.search if cfg.strategy in ("camelot", "knn") else None, ids.shape[1], len(spans),
                  sum(times), statistics.median(times), rss.peak, state_bytes(cm), seg_times=times)
        if probe:
            probes = [rt.search for rt in cm.runtimes if isinstance(rt.search, RecallProbe)]
            found, total = sum(p.found for p in probes), sum(p.total for p in probes)
            row.extra["recall"] = found / total if total else float("nan")
            stats = [getattr(p.inner, "stats", None) for p in probes]
            row.extra["trains"] = sum(s.trains for s in stats if s is not None)
        return row
    finally:
        cm.unwrap()


def run_full(model, ids: torch.Tensor) -> Row:
    """One plain forward over the whole document (the model's own attention)."""
    with PeakRSS() as rss, torch.no_grad():
        t0 = time.perf_counter()
        model(input_ids=ids, use_cache=False)
        sec = time.perf_counter() - t0
    return Row("full", "full", tokens=ids.shape[1], segments=1, seconds=sec, seg_median=sec, peak_rss=rss.peak)


def profile_segment(model, ids: torch.Tensor, cfg: CamelotConfig, warm: int = 2) -> dict[str, Any]:
    """Profile one camelot segment (full bank) and list host-sync ops with their camelot callers."""
    from torch.profiler import ProfilerActivity, profile

    import camelot

    cm = camelot.wrap(model, cfg)
    try:
        fill_banks(cm)
        w = cfg.window
        with torch.no_grad():
            for i in range(warm):
                cm.step(ids[:, i * w : (i + 1) * w])
            seg = ids[:, warm * w : (warm + 1) * w]
            with profile(activities=[ProfilerActivity.CPU], with_stack=True) as prof:
                cm.step(seg)
        n_layers = len(cm.runtimes)
    finally:
        cm.unwrap()
    syncs: dict[str, int] = {}
    sites: dict[str, int] = {}
    ops: dict[str, list[float]] = {}
    for ev in prof.events():
        if not ev.name.startswith("aten::"):
            continue
        o = ops.setdefault(ev.name, [0, 0.0])
        o[0] += 1
        o[1] += ev.self_cpu_time_total / 1e3
        if ev.name in SYNC_OPS and not _inside_sync_op(ev):
            syncs[ev.name] = syncs.get(ev.name, 0) + 1
            site = _caller(ev)
            sites[site] = sites.get(site, 0) + 1
    top = sorted(ops.items(), key=lambda kv: -kv[1][1])[:12]
    table = "\n".join(["| op | calls | self CPU ms |", "|---|---|---|"]
                      + [f"| {name} | {n} | {ms:.2f} |" for name, (n, ms) in top])
    total_ops = sum(n for n, _ in ops.values())
    return {"table": table, "syncs": syncs, "sync_sites": sites, "aten_ops": total_ops, "layers": n_layers,
            "aten_ops_per_layer": total_ops / max(n_layers, 1)}


def _inside_sync_op(ev) -> bool:
    """item() calls _local_scalar_dense: count the outermost sync op only."""
    p = ev.cpu_parent
    return p is not None and p.name in SYNC_OPS


def _caller(ev) -> str:
    """Nearest python frame above an op, preferring camelot's own files."""
    p, first = ev.cpu_parent, None
    while p is not None:
        if not p.name.startswith("aten::") and "(" in p.name:
            first = first or p.name
            if "/camelot/" in p.name or "/eval/" in p.name or "/adapters/" in p.name:
                return p.name if p.name == first else f"{first}, called from {p.name}"
        p = p.cpu_parent
    return f"outside camelot: {first or '?'}"


def _mib(b: int) -> str:
    return f"{b / 2**20:.0f}"
