"""Logits of queries against the plain keys (open segment, raw tail, sinks), with their causal /
sliding-window mask, and the per-wrapper cache of those masks.

The masks depend only on a segment's geometry, the same for every layer and segment after
segment, so each wrapper keeps them (read-only): a GPU does not get them copied over every
forward. The cache is bounded by bytes and dropped with the wrapper (`unwrap`), so a long
generation or a wide window cannot make it hold gigabytes.
"""

from __future__ import annotations

from collections import OrderedDict

import torch

from camelot.interfaces import PositionBias

Spans = tuple[tuple[int, int], ...]  # [start, end) position ranges of the plain keys, in order
DEFAULT_CACHE_BYTES = 64 << 20


class MaskCache:
    """Geometry -> tensor, least recently used first out once `max_bytes` is passed."""

    def __init__(self, max_bytes: int = DEFAULT_CACHE_BYTES) -> None:
        self.max_bytes = max_bytes
        self._items: OrderedDict[tuple, torch.Tensor] = OrderedDict()
        self.bytes = 0

    def clear(self) -> None:
        self._items.clear()
        self.bytes = 0

    def __len__(self) -> int:
        return len(self._items)

    def _get(self, key: tuple, build) -> torch.Tensor:
        t = self._items.get(key)
        if t is not None:
            self._items.move_to_end(key)
            return t
        t = build()
        size = t.numel() * t.element_size()
        while self._items and self.bytes + size > self.max_bytes:
            _, old = self._items.popitem(last=False)
            self.bytes -= old.numel() * old.element_size()
        if size <= self.max_bytes:
            self._items[key] = t
            self.bytes += size
        return t

    def positions(self, spans: Spans, n: int, device: torch.device) -> torch.Tensor:
        """[n] key positions: the spans in order, then 0 for spare columns."""
        def build() -> torch.Tensor:
            pos = torch.cat([torch.arange(a, e) for a, e in spans]) if spans else torch.zeros(0, dtype=torch.long)
            return torch.nn.functional.pad(pos, (0, n - pos.shape[0])).to(device)

        return self._get(("pos", spans, n, device), build)

    def allowed(self, l0: int, m: int, spans: Spans, n: int, sliding_window: int | None,
                device: torch.device) -> torch.Tensor:
        """[m, n] which keys each query at [l0, l0 + m) may see (causal, sliding window); spare
        columns past the spans are allowed."""
        def build() -> torch.Tensor:
            diff = torch.arange(l0, l0 + m)[:, None] - self.positions(spans, n, torch.device("cpu"))[None, :]
            ok = diff >= 0
            if sliding_window:
                ok = ok & (diff < sliding_window)
            ok[:, sum(e - a for a, e in spans):] = True
            return ok.to(device)

        return self._get(("allowed", l0, m, spans, n, sliding_window, device), build)

    def additive(self, l0: int, m: int, spans: Spans, n: int, sliding_window: int | None, g: int,
                 device: torch.device) -> torch.Tensor:
        """[1, G*m, n] float 0 / -inf: `allowed` as an additive term for the G*m query rows of a KV head."""
        def build() -> torch.Tensor:
            ok = self.allowed(l0, m, spans, n, sliding_window, torch.device("cpu"))
            return torch.zeros(m, n).masked_fill_(~ok, float("-inf")).repeat(g, 1)[None].to(device)

        return self._get(("additive", l0, m, spans, n, sliding_window, g, device), build)


def softcapped(x: torch.Tensor, softcap: float | None) -> torch.Tensor:
    return x if not softcap else torch.tanh(x / softcap) * softcap


def plain_logits(masks: MaskCache, qg: torch.Tensor, g: int, keys: torch.Tensor, l0: int, spans: Spans,
                 scaling: float, softcap: float | None, sliding_window: int | None,
                 bias: PositionBias | None, extra: int = 0) -> torch.Tensor:
    """[B, Hkv, G, m, N + extra] logits of queries at positions [l0, l0 + m) (qg: [B, Hkv, G*m, D],
    a KV head's G query heads as rows of one matrix, so keys are not expanded over G) against plain
    keys at the `spans`, and against spare columns past them (never masked: the caller fills them);
    `extra` more columns are left unwritten for the caller (memory's logits, computed into place
    instead of concatenated: a pass over every logit saved)."""
    b, hkv, gm, _ = qg.shape
    m, n = gm // g, keys.shape[2]
    if not softcap and bias is None:
        # the mask as an additive term inside the matmul: a boolean mask broadcast over every
        # head is a slow pass of its own on CPU
        add = masks.additive(l0, m, spans, n, sliding_window, g, qg.device)
        out = qg.new_empty(b * hkv, gm, n + extra)
        torch.baddbmm(add, qg.flatten(0, 1), keys.flatten(0, 1).transpose(-1, -2), alpha=scaling, out=out[..., :n])
        return out.view(b, hkv, g, m, n + extra)
    s = softcapped(torch.matmul(qg, keys.transpose(-1, -2)).view(b, hkv, g, m, n) * scaling, softcap)
    if bias is not None:
        s = s + bias.bias(masks.positions(spans, n, qg.device), hkv, g)
    s = s.masked_fill_(~masks.allowed(l0, m, spans, n, sliding_window, qg.device), float("-inf"))
    return s if not extra else torch.cat([s, s.new_empty(*s.shape[:-1], extra)], dim=-1)
