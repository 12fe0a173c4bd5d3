"""Everything one attention layer has read: the open segment (keys still at their positions),
the sinks, the raw tail (or the `recurrent` / `sliding` prefix) and the memory.

The contract follows transformers' cache layers: `extend` (the open segment plus new keys),
`keep` (commit them), `flush` (close the segment: its keys lose their positions and move on to
sinks, tail and memory), `reset`, `state_dict` / `load_state_dict`, `to`.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from camelot.interfaces import Memory
from camelot.memory import RawWindow, SinkTokens


class LayerState:
    def __init__(self, memory: Memory | None = None, prefix: RawWindow | None = None,
                 sink: SinkTokens | None = None) -> None:
        self.memory = memory
        self.prefix = prefix  # the raw tail before the segment (camelot, knn) or the raw cache (recurrent, sliding)
        self.sink = sink
        self.local_k: torch.Tensor | None = None  # open segment, rotated at positions [0, local_len), model dtype
        self.local_v: torch.Tensor | None = None
        # position-free open keys where a read needed them (fp32); valid while local_k is `_raw_for`
        # (checkpoints and snapshots set local_k directly)
        self.local_raw: torch.Tensor | None = None
        self._raw_for: torch.Tensor | None = None
        # attention received per KV head by each open / raw-tail token (summed over its query
        # heads and the queries), kept only for a memory that `wants_received` (InfLLM picks
        # block representatives by it); fp32 [B, Hkv, local_len] and [B, Hkv, tail]. For a memory
        # that `wants_surprise` they hold each token's NLL instead (`note_surprise`), for one that
        # `wants_question` how strongly the question attends to it (`note_question`), for one that
        # wants both [..., 2]: (question, surprise).
        self.received_open: torch.Tensor | None = None
        self.received_tail: torch.Tensor | None = None
        # [B or 1, Hkv, R, D] fp32: position-free queries of a question set before the document
        # (camelot/question.py), for a memory that `wants_question`
        self.question: torch.Tensor | None = None

    @property
    def local_len(self) -> int:
        return 0 if self.local_k is None else self.local_k.shape[2]

    @property
    def tail(self) -> int:
        return 0 if self.prefix is None else self.prefix.size

    @property
    def tracks_received(self) -> bool:
        """The memory wants the attention its tokens received while in the local window."""
        return self.memory is not None and self.memory.wants_received

    @property
    def tracks_surprise(self) -> bool:
        """The memory wants each token's NLL under the model (the wrapper hands it over)."""
        return self.memory is not None and self.memory.wants_surprise

    @property
    def tracks_question(self) -> bool:
        """The memory ranks tokens by how strongly a question given beforehand attends to them."""
        return self.memory is not None and self.memory.wants_question

    @property
    def tracks_importance(self) -> bool:
        """The memory ranks tokens by something the layer hands it (attention, surprise, a question)."""
        return self.tracks_received or self.tracks_surprise or self.tracks_question

    @property
    def tracks_two(self) -> bool:
        """The memory ranks by two signals at once ("question+surprise", "surprise+attention")."""
        return self.tracks_received + self.tracks_surprise + self.tracks_question == 2

    def _signals_like(self, x: torch.Tensor) -> torch.Tensor:
        """x [B, H, n]: shaped as the importance of those n tokens ([B, H, n, 2] when tracking two)."""
        return x[..., None].expand(*x.shape, 2) if self.tracks_two else x

    def note_surprise(self, nll: torch.Tensor) -> None:
        """nll [B, m]: the model's NLL of the open segment's last m tokens (kept already)."""
        self._note(nll[:, None, :], "surprise")

    def note_question(self, score: torch.Tensor) -> None:
        """score [B, Hkv, m]: the question's attention logits on the open segment's last m tokens."""
        self._note(score, "question")

    def _note(self, importance: torch.Tensor, signal: str) -> None:
        like = self._signals_like(self.local_k[:, :, :, 0])
        got = _fit(self.received_open, like, at_end=False).clone()
        into = got[..., self.memory.wanted.index(signal)] if self.tracks_two else got  # the memory's order
        into[:, :, like.shape[2] - importance.shape[-1]:] = importance.to(got.device, torch.float32)
        self.received_open = got

    # ------------------------------------------------------------------ the open segment
    def extend(self, key: torch.Tensor, value: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The open segment with key/value [B, Hkv, m, D] appended (not yet kept)."""
        if self.local_k is None:
            return key, value
        if self.local_k.shape[0] != key.shape[0]:
            raise ValueError(f"the open segment holds {self.local_k.shape[0]} sequence(s), this input has "
                             f"{key.shape[0]}; call reset() before changing the batch size")
        return torch.cat([self.local_k, key], dim=2), torch.cat([self.local_v, value], dim=2)

    def keep(self, k: torch.Tensor, v: torch.Tensor, raw: torch.Tensor | None = None,
             received: torch.Tensor | None = None) -> None:
        """Commit the extended open segment; `raw`: its position-free keys where they were made;
        `received` [B, Hkv, open + tail]: attention this forward gave the open segment (new
        tokens included) then the raw tail, added to what they received before."""
        if received is not None:
            n_open = k.shape[2]
            if self.tracks_two:  # attention is one of two signals: the other channel gets nothing here
                received = _in_channel(received, self.memory.wanted.index("attention"))
            self.received_open = _fit(self.received_open, received[:, :, :n_open], at_end=False).add(
                received[:, :, :n_open])
            self.received_tail = _fit(self.received_tail, received[:, :, n_open:], at_end=True).add(
                received[:, :, n_open:])
        self.local_k, self.local_v = k, v
        self.local_raw, self._raw_for = (raw, k) if raw is not None else (None, None)

    def raw_open(self, unplace: Callable[[torch.Tensor, int], torch.Tensor]) -> torch.Tensor | None:
        """The open segment's keys, position-free."""
        if self.local_k is None:
            return None
        if self.local_raw is not None and self._raw_for is self.local_k:
            return self.local_raw
        return unplace(self.local_k, 0)

    def flush(self, unplace: Callable[[torch.Tensor, int], torch.Tensor]) -> None:
        """Close the open segment: its keys go to the sinks, then the raw tail, then memory."""
        if self.local_k is None:
            return
        if self.memory is not None or self.prefix is not None or self.sink is not None:
            raw, v = self.raw_open(unplace), self.local_v
            got = None
            if self.tracks_importance:
                got = _fit(self.received_open, self._signals_like(raw[..., 0]), at_end=False)
            if self.sink is not None and not self.sink.full:
                raw, v = self.sink.write(raw, v)
                got = None if got is None else got[:, :, got.shape[2] - raw.shape[2]:]
            if self.prefix is None:
                if self.memory is not None:
                    _write(self.memory, raw, v, got)
            else:  # with both, tokens reach memory as they leave the raw tail
                if got is not None and self.tail:  # [tail ; open] in the order the window pushes out
                    tail = _fit(self.received_tail, self._signals_like(self.prefix.finite), at_end=True)
                    got = torch.cat([tail, got], dim=2)
                out = self.prefix.write(raw, v.float())
                if got is not None:
                    self.received_tail = got[:, :, got.shape[2] - self.prefix.size:]
                if self.memory is not None and out is not None:
                    n = out[0].shape[2]
                    _write(self.memory, *out, None if got is None else got[:, :, :n],
                           None if got is None else got[:, :, n:])
        self.local_k = self.local_v = self.local_raw = self._raw_for = self.received_open = None

    def reset(self) -> None:
        self.local_k = self.local_v = self.local_raw = self._raw_for = None
        self.received_open = self.received_tail = self.question = None
        for part in (self.memory, self.prefix, self.sink):
            if part is not None:
                part.reset()

    # ------------------------------------------------------------------ persistence
    def state_dict(self) -> dict[str, torch.Tensor]:
        """Every tensor the layer holds, by name ("open.keys", "memory.counts", "prefix.finite"...;
        "open.importance" / "prefix.importance" for a memory that ranks tokens, "question.queries"
        for one that ranks them by a question)."""
        out: dict[str, torch.Tensor] = {}
        if self.local_k is not None:
            out["open.keys"], out["open.values"] = self.local_k, self.local_v
            if self.tracks_importance:  # what the write will rank these tokens by (snapshots continue exactly)
                out["open.importance"] = _fit(self.received_open, self._signals_like(self.local_k[..., 0]), False)
        if self.memory is not None:
            out.update({f"memory.{n}": t for n, t in self.memory.state_dict().items()})
        if self.prefix is not None and self.prefix.size:
            out["prefix.keys"], out["prefix.values"] = self.prefix.keys, self.prefix.values
            out["prefix.finite"] = self.prefix.finite.to(torch.uint8)
            if self.tracks_importance:
                out["prefix.importance"] = _fit(self.received_tail, self._signals_like(self.prefix.finite), True)
        if self.sink is not None and self.sink.size:
            out["sink.keys"], out["sink.values"] = self.sink.keys, self.sink.values
        if self.tracks_question and self.question is not None:  # what the reserve ranks the rest by
            out["question.queries"] = self.question
        return out

    def load_state_dict(self, other: LayerState) -> None:
        """Take over a state built and checked aside (camelot.snapshot builds it from a file);
        nothing here can fail, so a refused load leaves this state as it was. The other state's
        question replaces the one set here; where it carries none, the one set here stays."""
        self.local_k, self.local_v, self.local_raw, self._raw_for = other.local_k, other.local_v, None, None
        self.memory, self.prefix, self.sink = other.memory, other.prefix, other.sink
        self.received_open, self.received_tail = other.received_open, other.received_tail
        self.question = self.question if other.question is None else other.question

    def to(self, device: torch.device | str) -> LayerState:
        """Move the open segment and raw context (memories move through their state dicts)."""
        for owner, names in ((self, ("local_k", "local_v", "local_raw", "received_open", "received_tail",
                                      "question")),
                             (self.prefix, ("keys", "values", "finite")),
                             (self.sink, ("keys", "values"))):
            for n in names:
                t = getattr(owner, n, None) if owner is not None else None
                if isinstance(t, torch.Tensor):
                    setattr(owner, n, t.to(device))
        self._raw_for = self.local_k if self.local_raw is not None else None
        if self.memory is not None and self.memory.allocated:
            self.memory.load_state_dict(self.memory.state_dict(), device=torch.device(device))
        return self

    def device(self) -> torch.device | None:
        """Device of the first tensor held (open segment, memory or prefix), if any."""
        for t in (self.local_k, getattr(self.memory, "keys", None), getattr(self.prefix, "keys", None)):
            if isinstance(t, torch.Tensor):
                return t.device
        return None


def _fit(held: torch.Tensor | None, like: torch.Tensor, at_end: bool) -> torch.Tensor:
    """What was received so far by the tokens `like` [B, H, n] stands for: `held` cut or padded
    with zeros to n (from the front, or from the end for the tail, which keeps its last tokens).
    Lengths differ only where someone replaced the open segment or the tail directly (a
    checkpoint, a snapshot, eval/icl's restore of the open segment): those tokens start from 0."""
    n = like.shape[2]
    if held is None or held.shape[:2] != like.shape[:2] or held.shape[3:] != like.shape[3:]:
        return torch.zeros(like.shape, dtype=torch.float32, device=like.device)
    if held.shape[2] >= n:
        return held[:, :, held.shape[2] - n:] if at_end else held[:, :, :n]
    zeros = held.new_zeros(*held.shape[:2], n - held.shape[2], *held.shape[3:])
    return torch.cat([zeros, held] if at_end else [held, zeros], dim=2)


def _write(memory: Memory, k: torch.Tensor, v: torch.Tensor, received: torch.Tensor | None,
           following: torch.Tensor | None = None) -> None:
    """following: the importance of the tokens still in the raw window, for a memory that ranks
    windows reaching into them (`wants_following`: the span reserve)."""
    if received is None:
        memory.write(k, v)
    elif following is not None and memory.wants_following:
        memory.write(k, v, received=received, following=following)
    else:
        memory.write(k, v, received=received)


def _in_channel(x: torch.Tensor, channel: int) -> torch.Tensor:
    """x [B, H, n] as channel `channel` of [B, H, n, 2], the other channel 0."""
    out = x.new_zeros(*x.shape, 2)
    out[..., channel] = x
    return out
