"""A slot bank's state as tensors (SlotBank.state_dict / load_state_dict): what snapshots and
device moves carry."""

from __future__ import annotations

from typing import Any

import torch

SlotBank = Any  # camelot.memory.bank.SlotBank (which imports this module)
# A span reserve's empty place (-inf in memory) as saved: files must hold finite values, and a
# scan's scores (spans.py) may be negative, so -1 (the mark until 2026-12-05, still read as
# empty) lost the scores below it.
EMPTY_SPAN = -1e30


def state_of(bank: SlotBank) -> dict[str, torch.Tensor]:
    if not bank.allocated:
        return {}
    s = bank.slots
    state = {"keys": bank.keys[..., :s, :], "values": bank.values[..., :s, :], "counts": bank.counts[..., :s],
             "ages": bank.ages[..., :s], "telemetry": bank.telemetry}
    if bank.rule.span_reserve:  # the reserve's ranking (scratch entry dropped), then the importance of the
        # last tokens written (windows reach back over them); -inf (an empty place, no token) as EMPTY_SPAN
        spans = torch.cat([bank.span_score[..., :-1], bank.span_before.flatten(2)], dim=-1)
        state["span_score"] = torch.where(torch.isneginf(spans), EMPTY_SPAN, spans)
    # the slots' scores: without them a resumed or moved memory would evict as if nothing were read
    if bank.rule.ranks_slots:
        state["slot_score"] = bank.score[..., :s]
    if bank.rule.protect > 0:
        state["pinned"] = bank.pinned[..., :s].to(torch.uint8)
    return state


def span_state_len(bank: SlotBank) -> tuple[int, ...]:
    """Lengths a saved `span_score` may have: the reserve's places alone (snapshots before the
    carried context, which then starts empty) or followed by the carried context."""
    n = bank.rule.span_reserve
    return (n, n + bank.rule.span_carried * bank.rule.reserve_signals) if n else ()


def load_state(bank: SlotBank, state: dict[str, torch.Tensor], device: torch.device | None) -> None:
    if not state:
        bank.reset()
        return
    keys, values = state["keys"], state["values"]
    dev = device or keys.device
    b, h, s, d = keys.shape
    if s != bank.slots:
        raise ValueError(f"snapshot has {s} slots per head, this memory has {bank.slots}")
    n, spans = bank.rule.span_reserve, state.get("span_score")  # absent (older snapshot): the reserve looks empty
    lengths = span_state_len(bank)
    if spans is not None and (not n or tuple(spans.shape[:2]) != (b, h) or spans.shape[2] not in lengths):
        fits = " or ".join(map(str, lengths))
        raise ValueError(f"span_score of shape {tuple(spans.shape)} does not fit this memory's span reserve "
                         f"[{b}, {h}, {fits}]" + ("" if n else " (span_reserve=0: no reserve)"))
    bank._allocate(torch.empty(b, h, 1, d, device=dev), torch.empty(b, h, 1, values.shape[-1], device=dev))
    bank.keys[..., :s, :] = keys.to(dev, bank.dtype)
    bank.values[..., :s, :] = values.to(dev, bank.dtype)
    bank.counts[..., :s] = state["counts"].to(dev, torch.long)
    bank.ages[..., :s] = state["ages"].to(dev, torch.long)
    bank.telemetry.copy_(state["telemetry"].to(dev, torch.long))
    if spans is not None:
        spans = spans.to(dev, torch.float32)
        spans = torch.where((spans <= EMPTY_SPAN) | (spans == -1.0), float("-inf"), spans)
        bank.span_score[..., :n] = spans[..., :n]
        if spans.shape[2] > n:
            bank.span_before.copy_(spans[..., n:].reshape(bank.span_before.shape))
    for name, mine in (("slot_score", bank.score), ("pinned", bank.pinned)):  # absent (older snapshot): 0
        if name in state:
            if state[name].shape != keys.shape[:3]:
                raise ValueError(f"{name} of shape {tuple(state[name].shape)} does not fit keys {tuple(keys.shape)}")
            mine[..., :s] = state[name].to(dev, mine.dtype)
    bank.empty = not bool((bank.counts > 0).any())
    bank.version += 1
