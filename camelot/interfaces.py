"""The contracts between the parts of a memory layer, declared once and checked at construction.

A memory kind (slot bank, token store, a block memory), a search backend or a position bias is
anything that has these members; `require` checks it when a wrapper is built, so a missing
method fails at `wrap` with its name, not deep inside a forward.
"""

from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

import torch


@runtime_checkable
class Memory(Protocol):
    """Per layer, per KV head state that keeps what left the raw window.

    version: bumped by every change, host-side, so readers may keep what they derive from it.
    telemetry: [5] counters (merged, new, evicted, dropped, skipped) or None before the first write.
    """

    version: int
    telemetry: torch.Tensor | None
    wants_received: bool  # write() also takes received= (the attention each token got in the window)
    wants_surprise: bool  # write() takes received= as each token's NLL under the model instead
    wants_question: bool  # write() takes received= as how strongly a given question attends to each token
    observes_reads: bool  # observe_reads() takes the attention mass each entry got when read
    wants_following: bool  # write() also takes following= (the importance of the tokens still raw after these)

    @property
    def allocated(self) -> bool: ...

    def observe_reads(self, mass: torch.Tensor) -> None:
        """Attention mass [B, Hkv, S] each entry received in a read (where `observes_reads`)."""

    def reset(self) -> None: ...

    def write(self, k: torch.Tensor, v: torch.Tensor) -> None:
        """Position-free keys [B, Hkv, T, D] and values [B, Hkv, T, Dv] leaving the raw window.
        A memory with `wants_received = True` also gets `received=` [B, Hkv, T]: the attention
        each token received while in the local window, summed over its KV head's query heads
        and queries (LayerState keeps it only for such a memory)."""

    def readable(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor] | None:
        """(keys [B, Hkv, S, D], values [B, Hkv, S, Dv], counts [B, Hkv, S], valid [B, Hkv, S]),
        or None while empty."""

    def positions(self) -> torch.Tensor:
        """Where each entry was last written, relative to the next token (negative)."""

    def state_dict(self) -> dict[str, torch.Tensor]: ...

    def load_state_dict(self, state: dict[str, torch.Tensor], device: torch.device | None = None) -> None: ...


@runtime_checkable
class SearchBackend(Protocol):
    """Answers "which entries score highest for these queries"; the memory state stays in torch.

    dense: it scores every entry exactly, so a read may use its scores directly (no gathers).
    score_dtype: the dtype it compares in; a slot bank picks each written token's nearest slot
        in the same dtype, so write and read agree on what is near.
    """

    name: str
    dense: bool
    score_dtype: torch.dtype

    def topk(self, queries: torch.Tensor, keys: torch.Tensor, valid: torch.Tensor,
             k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """queries [B, H, M, D], keys [B, H, N, D], valid [B, H, N] -> (scores, idx) [B, H, M, k'],
        k' = min(k, N); invalid entries score -inf."""

    def indices(self, queries: torch.Tensor, keys: torch.Tensor, valid: torch.Tensor, k: int) -> torch.Tensor:
        """Only the chosen entries [B, H, M, k'] (a backend may skip scoring them exactly)."""

    def reset(self) -> None:
        """Forget any copy of the keys it indexed."""


@runtime_checkable
class PositionBias(Protocol):
    """A position rule added to logits (ALiBi); the adapters provide it, the core only adds it."""

    def bias(self, positions: torch.Tensor, hkv: int, g: int) -> torch.Tensor:
        """positions broadcastable against [Hkv, G, 1, 1] -> bias of the same broadcast shape."""


def require(obj: Any, protocol: type, what: str) -> Any:
    """`obj` if it has every member of `protocol`; otherwise a TypeError naming what is missing."""
    if isinstance(obj, protocol):
        return obj
    members = [n for n in dir(protocol) if not n.startswith("_")]
    members += list(getattr(protocol, "__annotations__", {}))
    missing = sorted({n for n in members if not hasattr(obj, n)})
    raise TypeError(f"{what} {type(obj).__name__} does not implement {protocol.__name__}: "
                    f"missing {', '.join(missing) or '?'}")


@runtime_checkable
class Wrapper(Protocol):
    """What snapshots, checks and generation need of a wrapped model (camelot.wrapper.CamelotModel),
    so that they depend on this contract, not on the wrapper module."""

    model: Any  # the HF model
    config: Any  # CamelotConfig
    adapter: Any  # camelot.adapters.base.Adapter
    modules: list  # attention modules, by layer index
    runtimes: list  # camelot.attention.LayerRuntime per attention module
    surprise: Any  # camelot.surprise.SurpriseFeed: the last step's next-token log-probs

    @property
    def open_len(self) -> int: ...

    @property
    def device(self) -> torch.device: ...

    def step(self, ids: torch.Tensor) -> torch.Tensor: ...

    def flush(self) -> None: ...

    def segments(self, n: int) -> Any: ...
