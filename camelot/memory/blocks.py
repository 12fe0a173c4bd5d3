"""InfLLM's memory (Xiao et al. 2024, thunlp/InfLLM): tokens leaving the local window are cut
into blocks of `block_size`, each block represented by the mean of its `repr_topk` keys that
received the most attention while they were in the local window. Every block is kept (unbounded,
like the kNN token store); a read attends to the few blocks whose representatives score highest
(camelot/reads/blocks.py).

A block forms only when it is full: the last tokens of a stream wait in `pending` (not readable)
until `block_size` of them have arrived, as in InfLLM.
"""

from __future__ import annotations

import torch

from camelot.memory.bank import TELEMETRY_FIELDS
from camelot.rows import finite_rows

_PENDING = ("pending_keys", "pending_values", "pending_scores")


class BlockMemory:
    """Per batch row and KV head: blocks [B, Hkv, n, block_size, D] of position-free keys and
    values, their representatives [B, Hkv, n, D] and validity (a token with a non-finite key or
    value is stored as a null, never read; a block of nulls only is never chosen).

    wants_received: the layer state hands `write` the attention each token received, summed over
    the KV head's query heads and its queries, while it was in the local window (the open segment
    and the raw tail): the score InfLLM picks representatives by.
    read_blocks: blocks a read attends to (for the stats; the read itself holds its own k).
    """

    wants_received = True
    wants_surprise = False
    wants_question = False
    observes_reads = False  # representatives come from the window's attention, not from reads
    wants_following = False

    def observe_reads(self, mass: torch.Tensor) -> None:
        """Not used: `observes_reads` is False."""

    def __init__(self, block_size: int = 128, repr_topk: int = 4, read_blocks: int = 4,
                 dtype: torch.dtype = torch.float32) -> None:
        if block_size < 1 or repr_topk < 1:
            raise ValueError(f"block_size ({block_size}) and repr_topk ({repr_topk}) must be >= 1")
        self.block_size = block_size
        self.repr_topk = min(repr_topk, block_size)
        self.read_blocks = read_blocks
        self.dtype = dtype
        self.version = 0
        self.reset()

    def reset(self) -> None:
        self.keys: torch.Tensor | None = None  # [B, H, capacity, block_size, D]
        self.values: torch.Tensor | None = None
        self.valid: torch.Tensor | None = None  # [B, H, capacity, block_size] bool
        self.reprs: torch.Tensor | None = None  # [B, H, capacity, D]
        self.n_blocks = 0
        self.pending_keys: torch.Tensor | None = None  # [B, H, < block_size, D], not yet a block
        self.pending_values: torch.Tensor | None = None
        self.pending_scores: torch.Tensor | None = None  # [B, H, < block_size], -inf for nulls
        self.telemetry: torch.Tensor | None = None
        self.version += 1

    @property
    def allocated(self) -> bool:
        return self.keys is not None or self.pending_keys is not None

    @property
    def size(self) -> int:
        """Tokens stored in full (readable) blocks."""
        return self.n_blocks * self.block_size

    @property
    def pending(self) -> int:
        return 0 if self.pending_keys is None else self.pending_keys.shape[2]

    # ------------------------------------------------------------------ write
    def write(self, k: torch.Tensor, v: torch.Tensor, received: torch.Tensor | None = None) -> None:
        """Position-free keys [B, H, T, D], values [B, H, T, Dv], attention received [B, H, T]."""
        b, h, t, _ = k.shape
        if t == 0:
            return
        if self.allocated and self.pending_keys.shape[:2] != (b, h):
            raise ValueError(f"memory holds {self.pending_keys.shape[0]} sequence(s) but this input has {b}; "
                             "call reset() before changing the batch size")
        finite = finite_rows(k, v)
        k = torch.where(finite[..., None], k, 0).to(self.dtype)
        v = torch.where(finite[..., None], v, 0).to(self.dtype)
        s = torch.zeros(b, h, t, device=k.device) if received is None else received.float()
        s = torch.where(finite, s, float("-inf"))  # a null token is never a representative
        if self.telemetry is None:
            self.telemetry = torch.zeros(len(TELEMETRY_FIELDS), dtype=torch.long, device=k.device)
        zero = torch.zeros((), dtype=torch.long, device=k.device)
        self.telemetry += torch.stack([zero, finite.sum(), zero, zero, (~finite).sum()])
        if self.pending_keys is not None:
            k = torch.cat([self.pending_keys, k], dim=2)
            v = torch.cat([self.pending_values, v], dim=2)
            s = torch.cat([self.pending_scores, s], dim=2)
        n_new = k.shape[2] // self.block_size
        cut = n_new * self.block_size
        if n_new:
            self._append_blocks(k[:, :, :cut], v[:, :, :cut], s[:, :, :cut])
        self.pending_keys, self.pending_values, self.pending_scores = k[:, :, cut:], v[:, :, cut:], s[:, :, cut:]
        self.version += 1

    def _append_blocks(self, k: torch.Tensor, v: torch.Tensor, s: torch.Tensor) -> None:
        b, h, t, d = k.shape
        bs, n = self.block_size, t // self.block_size
        k, v, s = k.view(b, h, n, bs, d), v.view(b, h, n, bs, -1), s.view(b, h, n, bs)
        ok = ~s.isneginf()
        # representative: mean of the repr_topk most attended keys of the block (nulls excluded)
        top, idx = s.topk(self.repr_topk, dim=-1)  # [B, H, n, r]
        chosen = k.gather(3, idx[..., None].expand(-1, -1, -1, -1, d))  # [B, H, n, r, D]
        w = (~top.isneginf()).to(k.dtype)[..., None]
        reprs = (chosen * w).sum(3) / w.sum(3).clamp(min=1)
        need = self.n_blocks + n
        if self.keys is None or need > self.keys.shape[2]:
            cap = max(need, 2 * (0 if self.keys is None else self.keys.shape[2]))
            grown = [torch.zeros(b, h, cap, *x.shape[3:], dtype=x.dtype, device=x.device) for x in (k, v, ok, reprs)]
            if self.keys is not None:
                for new, old in zip(grown, (self.keys, self.values, self.valid, self.reprs)):
                    new[:, :, : self.n_blocks] = old[:, :, : self.n_blocks]
            self.keys, self.values, self.valid, self.reprs = grown
        a = self.n_blocks
        self.keys[:, :, a:need], self.values[:, :, a:need] = k, v
        self.valid[:, :, a:need], self.reprs[:, :, a:need] = ok, reprs
        self.n_blocks = need

    # ------------------------------------------------------------------ read
    def blocks(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor] | None:
        """(keys [B, H, n, bs, D], values [B, H, n, bs, Dv], valid [B, H, n, bs], reprs [B, H, n, D])
        of the full blocks, or None while there is none."""
        if not self.n_blocks:
            return None
        n = self.n_blocks
        return self.keys[:, :, :n], self.values[:, :, :n], self.valid[:, :, :n], self.reprs[:, :, :n]

    def readable(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor] | None:
        """Every stored token as a flat store (Memory protocol); the InfLLM read uses `blocks`."""
        got = self.blocks()
        if got is None:
            return None
        k, v, ok, _ = got
        valid = ok.flatten(2)
        return k.flatten(2, 3), v.flatten(2, 3), valid.long(), valid

    def positions(self) -> torch.Tensor:
        """Position of each stored token relative to the next token; pending tokens are newer."""
        dev = self.keys.device if self.keys is not None else None
        return torch.arange(-self.size - self.pending, -self.pending, device=dev)

    def entries(self) -> dict[str, int]:
        """What is stored (blocks and pending tokens) and what one read attends to, per KV head."""
        return {"stored_entries": self.size + self.pending, "blocks": self.n_blocks,
                "pending_tokens": self.pending,
                "attended_entries": min(self.read_blocks, self.n_blocks) * self.block_size}

    # ------------------------------------------------------------------ persistence
    def state_dict(self) -> dict[str, torch.Tensor]:
        if not self.allocated:
            return {}
        n = self.n_blocks
        out = {name: getattr(self, name) for name in _PENDING}
        out["telemetry"] = self.telemetry
        if n:
            out.update({"keys": self.keys[:, :, :n], "values": self.values[:, :, :n],
                        "counts": self.valid[:, :, :n].flatten(2).long(), "reprs": self.reprs[:, :, :n]})
        return out

    def load_state_dict(self, state: dict[str, torch.Tensor], device: torch.device | None = None) -> None:
        self.reset()
        if not state:
            return
        dev = device or state["telemetry"].device
        for name in _PENDING:
            setattr(self, name, state[name].to(dev).clone())
        self.telemetry = state["telemetry"].to(dev, torch.long).clone()
        if "keys" in state:
            k = state["keys"].to(dev, self.dtype).clone()
            if k.dim() != 5 or k.shape[3] != self.block_size:
                raise ValueError(f"block keys {tuple(k.shape)} do not fit blocks of {self.block_size} tokens")
            self.keys, self.values = k, state["values"].to(dev, self.dtype).clone()
            self.valid = (state["counts"].to(dev) > 0).view(k.shape[:4])
            self.reprs = state["reprs"].to(dev, self.dtype).clone()
            self.n_blocks = k.shape[2]
        self.version += 1
