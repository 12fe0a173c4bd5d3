"""The span reserve's part of a slot-bank write (camelot/memory/bank.py): which tokens it takes
(spans.py ranks them), writing them raw into their places, and what becomes of the tokens they
displace.

A displaced token was surprising when it was chosen; dropping it loses what the consolidated
slots would have kept of it. With `span_displaced="place"` (the default) it joins the write's
tokens, before the segment's (it is older), and is placed like a novel token (a free slot, or
the place of a slot it outranks by score or age, or dropped), never merged, keeping its age (so
recency placement puts it where it was) and its score (what it brought and was read since);
"consolidate" lets it merge too (measured worse on perplexity and RULER multi-key: docs/memory_write.md).
"""

from __future__ import annotations

from typing import Any

import torch

from camelot.memory.rules import segment_ages
from camelot.memory.spans import choose_reserve
from camelot.rows import copy_rows_, gather_rows

SlotBank = Any  # camelot.memory.bank.SlotBank (which imports this module)


def choose(bank: SlotBank, importance: torch.Tensor, finite: torch.Tensor, after: torch.Tensor | None,
           base: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The span reserve's pick among the segment's tokens (spans.py), judged with the importance of
    the tokens written before (carried: `span_before`) and after (still raw) the segment;
    importance [B, H, T] or, for two signals, [B, H, T, 2]. Returns (held [B, H, T], slot [B, H, T],
    displaced [B, H, n]: the reserve places whose token gives way)."""
    rule = bank.rule
    old = bank.span_score
    n = rule.span_reserve
    region = None
    if rule.span_spread:  # regions one write long, by each token's age once written
        t = importance.shape[2]
        region = torch.cat([bank.ages[..., base : base + n] + t, segment_ages(t, finite)], -1) // max(t, 1)
    settings = (rule.span, base, bank.slots, rule.span_score, rule.span_follow, rule.span_apart, rule.span_spread)
    held, slot, bank.span_score = LAST_CHOICE.choose(settings, (old, importance, finite, bank.span_before, after,
                                                                region))
    mask = finite if importance.dim() == 3 else finite[..., None]
    seen = torch.cat([bank.span_before, torch.where(mask, importance, float("-inf"))], dim=2)
    bank.span_before = seen[:, :, seen.shape[2] - bank.span_before.shape[2]:]
    taken = torch.zeros_like(bank.pinned).scatter_(2, slot, held)[..., base : base + n]
    # a held place keeps its score and takes no new token; any other held place gave way
    displaced = torch.isfinite(old[..., :n]) & (taken | ~torch.isfinite(bank.span_score[..., :n]))
    return held, slot, displaced


class LastChoice:
    """The last reserve choice, for the next bank that asks the same. choose_reserve is a pure
    function of its tensors and settings, and ranked by surprise (the same for every layer and
    head) each layer's bank asks it the same question in turn every segment: an equal question
    gets the last answer (cloned: every bank owns its state) instead of one ranking per layer
    (0.23 s of 6.1 s per 1024 tokens on SmolLM2). Only on CPU, where comparing tensors syncs
    nothing; on an accelerator each comparison would stall the host, so each bank ranks."""

    share = True  # tests that count ops turn it off: a reused answer dispatches fewer

    def __init__(self) -> None:
        self.last: tuple | None = None  # (settings, inputs, answer), replaced whole (one assignment)

    def choose(self, settings: tuple, inputs: tuple) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """choose_reserve(span_score, importance, finite, span, base, scratch, how, before, after,
        follow, apart, region, spread): settings (span, base, scratch, how, follow, apart, spread),
        inputs (span_score, importance, finite, before, after, region)."""
        cpu = self.share and inputs[0].device.type == "cpu"
        last = self.last
        if cpu and last is not None and last[0] == settings and all(map(_same, last[1], inputs)):
            return tuple(x.clone() for x in last[2])
        span, base, scratch, how, follow, apart, spread = settings
        old, importance, finite, before, after, region = inputs
        answer = choose_reserve(old, importance, finite, span, base, scratch, how, before=before, after=after,
                                follow=follow, apart=apart, region=region, spread=spread)
        if cpu:
            self.last = (settings, tuple(None if x is None else x.clone() for x in inputs),
                         tuple(x.clone() for x in answer))
        return answer


def _same(a: torch.Tensor | None, b: torch.Tensor | None) -> bool:
    if a is None or b is None:
        return a is b
    return a.shape == b.shape and a.dtype == b.dtype and a.device == b.device and torch.equal(a, b)


LAST_CHOICE = LastChoice()


class Spill:
    """The displaced reserve tokens, oldest first, as `width` extra leading tokens of the write:
    the most that can give way in one write (a fixed shape, no host sync), or on CPU, where reading
    a count syncs nothing, the most any head gave way (~12 of 128 per write on SmolLM2). Columns
    past a head's own displaced tokens are padding (not finite: skipped)."""

    trim = True  # tests turn it off: the padding changes nothing

    def __init__(self, bank: SlotBank, displaced: torch.Tensor, base: int, t: int) -> None:
        p = min(displaced.shape[-1], t)
        if self.trim and displaced.device.type == "cpu":
            p = min(p, int(displaced.sum(-1).max()))
        self.width = p
        age = bank.ages[..., base : base + displaced.shape[-1]]
        order = torch.where(displaced, age, -1).argsort(dim=-1, descending=True, stable=True)[..., :p]
        self.valid = displaced.gather(-1, order)  # [B, H, p]
        idx = base + order
        self.keys, self.values = gather_rows(bank.keys, idx), gather_rows(bank.values, idx)
        self.score = bank.score.gather(2, idx)
        self.age = bank.ages.gather(2, idx) + t  # as it will be once the write has aged the bank

    def join(self, k: torch.Tensor, v: torch.Tensor, finite: torch.Tensor, importance: torch.Tensor,
             held: torch.Tensor, slot: torch.Tensor, scratch: int) -> tuple[torch.Tensor, ...]:
        """The write's tokens with the displaced ones first, and each token's age after the write."""
        lead = torch.zeros_like(self.valid)
        return (torch.cat([self.keys, k], 2), torch.cat([self.values, v], 2), torch.cat([self.valid, finite], 2),
                torch.cat([self.score, importance], 2), torch.cat([lead, held], 2),
                torch.cat([torch.full_like(self.age, scratch), slot], 2),
                torch.cat([self.age, segment_ages(k.shape[2], finite)], 2))


def write_spans(bank: SlotBank, k: torch.Tensor, v: torch.Tensor, held: torch.Tensor, slot: torch.Tensor,
                importance: torch.Tensor, age: torch.Tensor) -> None:
    """Write the span reserve's chosen tokens raw (count 1) into their slots, aged as the rest of
    the write's tokens (`age`: each token's age once written), so recency placement keeps their order."""
    copy_rows_(bank.keys, slot, k)
    copy_rows_(bank.values, slot, v)
    bank.counts.scatter_(2, slot, held.long())
    bank.ages.scatter_(2, slot, torch.where(held, age, 0))
    bank.score.scatter_(2, slot, torch.where(held, importance, 0.0).to(bank.score.dtype))
    bank.pinned.scatter_(2, slot, torch.zeros_like(held))


def native_beside_reserve(bank: SlotBank, k: torch.Tensor, v: torch.Tensor, best: torch.Tensor,
                          best_sim: torch.Tensor, finite: torch.Tensor, held: torch.Tensor, slot: torch.Tensor,
                          importance: torch.Tensor, age: torch.Tensor, grow: int, first: int = 0) -> bool:
    """The consolidated slots' rule (the paper's, or eviction by use) in the C kernel, then the span
    reserve's tokens (`held`, skipped by the kernel) into their slots; False where the kernel does
    not apply. grow: tokens of the segment (every age grows by it); first: tokens before it joined
    from the reserve and are not counted again."""
    base, s = bank.slots - bank.rule.span_reserve, bank.slots
    if not bank._native_bookkeeping(k, v, best, best_sim, finite, base,
                                    importance if bank.rule.ranks_slots else None, age, grow, first):
        return False
    bank.ages[..., base:s] += grow  # the kernel ages and decays only the slots it manages
    if bank.rule.ranks_slots and bank.rule.use_decay < 1:  # a displaced token carries its score: decayed alike
        bank.score[..., base:s] *= bank.rule.use_decay ** grow
    write_spans(bank, k, v, held, slot, importance, age)
    bank._clear_scratch()
    n = held.sum()  # the kernel counted them as skipped: they are new
    bank.telemetry[1] += n
    bank.telemetry[4] -= n
    return True
