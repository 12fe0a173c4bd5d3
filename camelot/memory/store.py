"""Unconsolidated memories: the baselines camelot is measured against."""

from __future__ import annotations

import torch

from camelot.memory.bank import TELEMETRY_FIELDS
from camelot.rows import finite_rows


class TokenStore:
    """Every past token's position-free key and value, unbounded (Memorizing-Transformer style
    kNN memory). Capacity doubles as it fills, so appends stay amortised O(1)."""

    wants_received = False  # keeps every token: nothing to rank
    wants_surprise = False
    wants_question = False
    observes_reads = False
    wants_following = False

    def __init__(self, dtype: torch.dtype = torch.float32) -> None:
        self.dtype = dtype
        self.version = 0  # host-side: bumped by every change, so readers may keep what they derive
        self.reset()

    def observe_reads(self, mass: torch.Tensor) -> None:
        """Not used: `observes_reads` is False."""

    def reset(self) -> None:
        self.keys: torch.Tensor | None = None
        self.values: torch.Tensor | None = None
        self.valid: torch.Tensor | None = None
        self.size = 0
        self.telemetry: torch.Tensor | None = None
        self.empty = True
        self.version += 1

    @property
    def allocated(self) -> bool:
        return self.keys is not None

    def check_batch(self, batch: int) -> None:
        if self.allocated and self.keys.shape[0] != batch:
            raise ValueError(
                f"memory holds {self.keys.shape[0]} sequence(s) but this input has {batch}; "
                "call reset() before changing the batch size"
            )

    def write(self, k: torch.Tensor, v: torch.Tensor) -> None:
        b, h, t, d = k.shape
        if t == 0:
            return
        self.check_batch(b)
        finite = finite_rows(k, v)
        k = torch.where(finite[..., None], k, 0).to(self.dtype)
        v = torch.where(finite[..., None], v, 0).to(self.dtype)
        need = self.size + t
        if not self.allocated or need > self.keys.shape[2]:
            cap = max(need, 2 * (self.keys.shape[2] if self.allocated else t))
            keys = torch.zeros(b, h, cap, d, dtype=self.dtype, device=k.device)
            values = torch.zeros(b, h, cap, v.shape[-1], dtype=self.dtype, device=k.device)
            valid = torch.zeros(b, h, cap, dtype=torch.bool, device=k.device)
            if self.allocated:
                keys[:, :, : self.size] = self.keys[:, :, : self.size]
                values[:, :, : self.size] = self.values[:, :, : self.size]
                valid[:, :, : self.size] = self.valid[:, :, : self.size]
            else:
                self.telemetry = torch.zeros(len(TELEMETRY_FIELDS), dtype=torch.long, device=k.device)
            self.keys, self.values, self.valid = keys, values, valid
        self.keys[:, :, self.size : need] = k
        self.values[:, :, self.size : need] = v
        self.valid[:, :, self.size : need] = finite
        self.size = need
        self.empty = False
        self.version += 1
        zero = torch.zeros((), dtype=torch.long, device=k.device)
        self.telemetry += torch.stack([zero, finite.sum(), zero, zero, (~finite).sum()])

    def readable(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor] | None:
        if self.empty:
            return None
        n = self.size
        valid = self.valid[:, :, :n]
        return self.keys[:, :, :n], self.values[:, :, :n], valid.long(), valid

    def positions(self) -> torch.Tensor:
        """Position of each stored token relative to the next token (-1 = just before)."""
        return torch.arange(-self.size, 0, device=self.keys.device)

    def state_dict(self) -> dict[str, torch.Tensor]:
        if not self.allocated:
            return {}
        n = self.size
        return {"keys": self.keys[:, :, :n], "values": self.values[:, :, :n],
                "counts": self.valid[:, :, :n].long(), "telemetry": self.telemetry}

    def load_state_dict(self, state: dict[str, torch.Tensor], device: torch.device | None = None) -> None:
        self.reset()
        if not state:
            return
        dev = device or state["keys"].device
        self.keys = state["keys"].to(dev, self.dtype).clone()
        self.values = state["values"].to(dev, self.dtype).clone()
        self.valid = state["counts"].to(dev) > 0
        self.size = self.keys.shape[2]
        self.telemetry = state["telemetry"].to(dev, torch.long).clone()
        self.empty = self.size == 0
        self.version += 1


class RawWindow:
    """The most recent `length` tokens' position-free keys and values, kept raw (no merging).
    `recurrent` is this with length = window; `sliding` with length = slots.

    A token with a non-finite key or value is kept as a null token (zero key, zero value): the
    window has no validity mask the attention could honour, and a NaN kept raw would turn every
    later query that sees it into NaN. A zero key scores 0 and adds nothing to the output beyond
    its share of the softmax; `skipped` counts such tokens."""

    def __init__(self, length: int) -> None:
        self.length = length
        self.reset()

    def reset(self) -> None:
        self.keys: torch.Tensor | None = None
        self.values: torch.Tensor | None = None
        self.finite: torch.Tensor | None = None  # [B, H, L] bool: False where a null token stands
        self.skipped: torch.Tensor | None = None  # [] int64, non-finite tokens nulled (on the state's device)

    @property
    def size(self) -> int:
        return 0 if self.keys is None else self.keys.shape[2]

    def write(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
        """Append k/v [B, H, T, D]; returns the (keys, values) pushed out of the window, oldest
        first, or None. A pushed-out null token comes back as NaN, so a memory it moves on to
        skips it instead of storing a zero key."""
        finite = finite_rows(k, v)  # [B, H, T]
        k = torch.where(finite[..., None], k, 0)
        v = torch.where(finite[..., None], v, 0)
        bad = (~finite).sum()  # stays a tensor: no host sync per segment
        self.skipped = bad if self.skipped is None else self.skipped + bad
        if self.keys is not None:
            k = torch.cat([self.keys, k.to(self.keys.dtype)], dim=2)
            v = torch.cat([self.values, v.to(self.values.dtype)], dim=2)
            finite = torch.cat([self.finite, finite], dim=2)
        self.keys = k[:, :, -self.length :].contiguous()
        self.values = v[:, :, -self.length :].contiguous()
        self.finite = finite[:, :, -self.length :]
        n_out = k.shape[2] - self.length
        if n_out <= 0:
            return None
        keep = finite[:, :, :n_out, None]
        return torch.where(keep, k[:, :, :n_out], float("nan")), torch.where(keep, v[:, :, :n_out], float("nan"))


class SinkTokens:
    """The first `length` tokens of a stream, kept raw for good: the attention sinks that a
    model trained on sequences starting at position 0 dumps attention on (StreamingLLM). Without
    them, a raw window that slides past the document's start loses the place where heads park
    their attention, and perplexity rises above that of no memory at all."""

    def __init__(self, length: int) -> None:
        self.length = length
        self.reset()

    def reset(self) -> None:
        self.keys: torch.Tensor | None = None
        self.values: torch.Tensor | None = None

    @property
    def size(self) -> int:
        return 0 if self.keys is None else self.keys.shape[2]

    @property
    def full(self) -> bool:
        return self.size >= self.length

    def write(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Keep what still fits of k/v [B, H, T, D]; return the rest (T may be 0)."""
        take = min(self.length - self.size, k.shape[2])
        if take > 0:
            head_k, head_v = k[:, :, :take], v[:, :, :take]
            finite = finite_rows(head_k, head_v)[..., None]
            head_k, head_v = torch.where(finite, head_k, 0).float(), torch.where(finite, head_v, 0).float()
            if self.keys is not None:
                head_k = torch.cat([self.keys, head_k], dim=2)
                head_v = torch.cat([self.values, head_v], dim=2)
            self.keys, self.values = head_k, head_v
        return k[:, :, max(take, 0):], v[:, :, max(take, 0):]
