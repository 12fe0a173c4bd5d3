"""The consolidated slot bank of one layer: per batch row and KV head, `slots` slots of
(key, value, count, age).

Write rule (CAMELoT): a token whose cosine similarity to its nearest slot is >= threshold
merges into it by running average (count + 1, age 0); otherwise it is novel and takes a
free slot, or evicts the slot written longest ago. Ages count write steps (tokens).

Other write rules (evict by use, pair merging, protected surprising tokens, key-and-value
merge test, per-head thresholds) are in camelot/memory/rules.py; they run in torch, but for
eviction by use alone, which the C kernel also does.

Tensors carry one extra scratch slot at index `slots`: scatters of tokens that must not
land anywhere are sent there, which keeps the write free of data-dependent shapes (and so
of host syncs). The scratch slot always has count 0 and is never read.
"""

from __future__ import annotations

import torch

from camelot.memory import reserve_write
from camelot.memory import rules as write_rules
from camelot.memory.bank_state import load_state, state_of
from camelot.memory.rules import WriteRule, free_by_pair_merge, merge_mask, place_novel, surprising_tokens
from camelot.rows import copy_rows_, finite_rows, gather_rows
from camelot.topk import native_library
from camelot.topk import topk as rowwise_topk

# merged: joined a slot; new: took a free slot; evicted: replaced the oldest slot;
# dropped: novel, but overtaken by later novel tokens of the same segment (more than the free
# places); skipped: non-finite state, never written. Each token counts once, as it arrives: one the
# span reserve later displaces into the consolidated slots (span_displaced "place", "consolidate") does not
# count again.
TELEMETRY_FIELDS = ("merged", "new", "evicted", "dropped", "skipped")
# Eviction order key: free slots first, then by age; ages beyond 2^40 tokens compare as equal.
_FREE_PRIORITY = 1 << 40
_UNIQUE_KEY_SLOTS = 1 << 22  # priority * (slots + 1) stays below 2^63 up to here


class SlotBank:
    def __init__(self, slots: int, threshold: float, dtype: torch.dtype = torch.float32,
                 write_mode: str = "segment", search_dtype: torch.dtype = torch.float32,
                 rule: WriteRule | None = None) -> None:
        self.slots = slots
        self.rule = rule or WriteRule()
        if self.rule.span_reserve >= slots:
            raise ValueError(f"span_reserve ({self.rule.span_reserve}) must be below slots ({slots})")
        # dtype of the nearest-slot scores: bfloat16 picks the nearest slot approximately (much
        # cheaper where the hardware has bf16 dot products); the threshold test stays exact fp32.
        self.search_dtype = search_dtype
        self.threshold = float(threshold)
        self.dtype = dtype
        self.write_mode = write_mode
        self.keys: torch.Tensor | None = None  # [B, H, S+1, D]
        self.values: torch.Tensor | None = None  # [B, H, S+1, Dv]
        self.counts: torch.Tensor | None = None  # [B, H, S+1] int64
        self.ages: torch.Tensor | None = None  # [B, H, S+1] int64
        self.telemetry: torch.Tensor | None = None  # [5] int64, TELEMETRY_FIELDS
        # rules beyond the paper's (rules.py): attention received, decayed; protected (kept raw)
        self.score: torch.Tensor | None = None  # [B, H, S+1] float32
        self.pinned: torch.Tensor | None = None  # [B, H, S+1] bool
        self.span_score: torch.Tensor | None = None  # [B, H, span_reserve+1] float32, -inf: empty (spans.py)
        self.span_before: torch.Tensor | None = None  # [B, H, span_context] the last written tokens' importance
        # what the layer hands `write` as `received` (WriteRule.importance), in channel order for two
        self.wanted = wanted = self.rule.wanted
        self.wants_received, self.wants_surprise, self.wants_question = (
            x in wanted for x in ("attention", "surprise", "question"))
        self.observes_reads = self.rule.ranks_slots  # reads add the mass slots got to their scores
        self.wants_following = self.rule.span_reserve > 0  # its windows reach into the raw window's tokens
        self.empty = True  # host-side: no write has happened since reset
        self.version = 0  # host-side: bumped by every change, so readers may keep what they derive

    # ---------------------------------------------------------------- state
    def reset(self) -> None:
        self.keys = self.values = self.counts = self.ages = self.telemetry = None
        self.score = self.pinned = self.span_score = self.span_before = None
        self.empty = True
        self.version += 1

    @property
    def allocated(self) -> bool:
        return self.keys is not None

    def _allocate(self, like_k: torch.Tensor, like_v: torch.Tensor) -> None:
        b, h, _, d = like_k.shape
        dv = like_v.shape[-1]
        dev = like_k.device
        n = self.slots + 1
        # Build into locals and assign at the end: a failed allocation (slots far too many for the
        # device) leaves the bank as it was, unallocated, instead of half-built.
        try:
            keys = torch.zeros(b, h, n, d, dtype=self.dtype, device=dev)
            values = torch.zeros(b, h, n, dv, dtype=self.dtype, device=dev)
            counts = torch.zeros(b, h, n, dtype=torch.long, device=dev)
            ages = torch.zeros(b, h, n, dtype=torch.long, device=dev)
        except (RuntimeError, MemoryError) as e:  # torch raises RuntimeError (cpu) or OutOfMemoryError (cuda)
            size = b * h * n * ((d + dv) * torch.finfo(self.dtype).bits // 8 + 16)
            raise MemoryError(
                f"camelot memory of {self.slots} slots x {h} KV heads x {b} row(s) needs {size / 2**30:.1f} GiB "
                f"per layer on {dev}, which could not be allocated; lower slots") from e
        self.keys, self.values, self.counts, self.ages = keys, values, counts, ages
        self.score = torch.zeros(b, h, n, dtype=torch.float32, device=dev)
        self.pinned = torch.zeros(b, h, n, dtype=torch.bool, device=dev)
        self.span_score = torch.full((b, h, self.rule.span_reserve + 1), float("-inf"), device=dev)
        carried = (b, h, self.rule.span_carried) + ((2,) if self.rule.reserve_signals == 2 else ())
        self.span_before = torch.full(carried, float("-inf"), device=dev)
        self.telemetry = torch.zeros(len(TELEMETRY_FIELDS), dtype=torch.long, device=dev)

    def check_batch(self, batch: int) -> None:
        if self.allocated and self.keys.shape[0] != batch:
            raise ValueError(
                f"memory holds {self.keys.shape[0]} sequence(s) but this input has {batch}; "
                "call reset() before changing the batch size"
            )

    def readable(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor] | None:
        """(keys, values, counts, valid) over the real slots, or None while nothing was written."""
        if self.empty:
            return None
        s = self.slots
        counts = self.counts[..., :s]
        return self.keys[..., :s, :], self.values[..., :s, :], counts, counts > 0

    def positions(self) -> torch.Tensor:
        """Position of each slot's last write relative to the next token (-1 = just before)."""
        return -(self.ages[..., : self.slots] + 1)

    # ---------------------------------------------------------------- write
    def observe_reads(self, mass: torch.Tensor) -> None:
        """Add a read's attention mass [B, H, S] per slot to the scores (where `observes_reads`)."""
        if self.observes_reads and self.allocated:
            self.score[..., : self.slots] += mass.to(self.score.dtype)

    def write(self, k: torch.Tensor, v: torch.Tensor, received: torch.Tensor | None = None,
              following: torch.Tensor | None = None) -> None:
        """Consolidate position-free keys k [B, H, T, D] and values v [B, H, T, Dv]; received
        [B, H, T]: each token's importance for rules that score (the attention it received before
        it left the raw window, or its surprise: `WriteRule.importance`); following [B, H, F]: that
        of the tokens after these, still raw (the span reserve's windows reach into them)."""
        if k.shape[2] == 0:
            return
        if not self.allocated:
            self._allocate(k, v)
        self.check_batch(k.shape[0])
        k, v = k.to(self.dtype), v.to(self.dtype)
        importance, following = (None if x is None else x.to(k.device, torch.float32) for x in (received, following))
        if self.write_mode == "token":  # the reference: one token at a time
            for t in range(k.shape[2]):
                self._write_segment(k[:, :, t : t + 1], v[:, :, t : t + 1], *_token_context(importance, following, t))
        else:
            self._write_segment(k, v, importance, following)
        self.empty = False
        self.version += 1

    def _write_segment(self, k: torch.Tensor, v: torch.Tensor, importance: torch.Tensor | None = None,
                       after: torch.Tensor | None = None) -> None:
        s, t = self.slots, k.shape[2]
        finite = finite_rows(k, v)  # [B,H,T]
        # Non-finite states are skipped, but made finite so no NaN reaches arithmetic via 0 * NaN.
        k, v = k.nan_to_num(0.0, 0.0, 0.0), v.nan_to_num(0.0, 0.0, 0.0)
        rule = self.rule
        base = s - rule.span_reserve  # slots [base, s) are the span reserve: raw, never merged into
        held = age = None
        first = 0  # tokens before it joined from the span reserve (span_displaced "place", "consolidate")
        if not rule.plain:
            signals, importance, after = _importance(rule, importance, k, after)
            if rule.span_reserve:
                held, span_slot, displaced = reserve_write.choose(self, signals, finite, after, base)
                finite = finite & ~held  # the reserve's tokens skip the consolidated part
                if rule.span_displaced != "drop":
                    spill = reserve_write.Spill(self, displaced, base, t)
                    k, v, finite, importance, held, span_slot, age = spill.join(k, v, finite, importance, held,
                                                                                span_slot, s)
                    first = spill.width
                else:
                    age = write_rules.segment_ages(t, finite)
        best, best_sim = _nearest(self, k)
        if rule.span_reserve and rule.span_displaced == "place":  # the displaced tokens take slots of their own
            best_sim[..., :first] = float("-inf")
        if rule.plain:
            if self._native_bookkeeping(k, v, best, best_sim, finite):
                return
            merge = finite & (best_sim >= self.threshold)
        else:
            if rule.use_only and self._native_bookkeeping(k, v, best, best_sim, finite, None, importance):
                return
            if held is not None and rule.kernel_beside_reserve and reserve_write.native_beside_reserve(
                    self, k, v, best, best_sim, finite, held, span_slot, importance, age, t, first):
                return
            surprising = surprising_tokens(rule, importance, finite)
            merge = merge_mask(rule, self.threshold, best_sim, finite, v, self.values, best, surprising)
            if rule.ranks_slots and rule.use_decay < 1:
                self.score *= rule.use_decay ** t
        novel = finite & ~merge
        touched = _merge(self, k, v, merge, best, importance, age, t)
        if rule.plain:
            place, was_free = _place_by_age(self, k, v, novel, touched)
        else:
            if rule.span_reserve:  # the main rule neither evicts nor merges reserve slots
                touched = touched.clone()
                touched[..., base:s] = True
            if rule.evict == "merge":
                need = novel.sum(-1) - (self.counts[..., :s] == 0).sum(-1)
                free_by_pair_merge(self.keys, self.values, self.counts, self.ages, self.score, self.pinned,
                                   touched, need)
            place, was_free = place_novel(rule, self.keys, self.values, self.counts, self.ages, self.score,
                                          self.pinned, touched, k, v, novel, surprising, importance, age)
            if held is not None:
                reserve_write.write_spans(self, k, v, held, span_slot, importance, age)
                place, was_free, finite = place | held, was_free | held, finite | held  # telemetry: as new
        self._clear_scratch()
        # the displaced tokens (the first columns) were counted when they arrived
        merge, place, was_free, novel, finite = (x[..., first:] for x in (merge, place, was_free, novel, finite))
        self.telemetry += torch.stack([merge.sum(), (place & was_free).sum(), (place & ~was_free).sum(),
                                       (novel & ~place).sum(), (~finite).sum()])

    def _native_bookkeeping(self, *args: torch.Tensor) -> bool:
        """`_native` (the C kernel) where it applies; tests replace this method to compare."""
        return _native(self, *args)

    def _clear_scratch(self) -> None:
        s = self.slots
        for t in (self.keys[..., s, :], self.values[..., s, :], self.counts[..., s], self.ages[..., s],
                  self.score[..., s], self.pinned[..., s]):
            t.zero_()

    # ---------------------------------------------------------------- views
    def state_dict(self) -> dict[str, torch.Tensor]:
        """keys, values, counts, ages, telemetry; span_score with a span reserve (EMPTY_SPAN: an empty
        place); slot_score where slots are ranked (evict="use", protect), pinned with protect."""
        return state_of(self)

    def load_state_dict(self, state: dict[str, torch.Tensor], device: torch.device | None = None) -> None:
        load_state(self, state, device)


# ------------------------------------------------ parts of the write (module level: the class stays small)


def _nearest(bank: SlotBank, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Each token's nearest slot that may take merges and its cosine ([B, H, T] each; -inf: none)."""
    b, h, t, _ = k.shape
    s = bank.slots - bank.rule.span_reserve  # the span reserve stays raw: never a merge target
    used = bank.counts[..., :s] > 0  # [B,H,S]
    kn = torch.nn.functional.normalize(k.float(), dim=-1).flatten(0, 1)
    mn = torch.nn.functional.normalize(bank.keys[..., :s, :].float(), dim=-1).flatten(0, 1)
    # unused slots enter as an additive -inf inside the matmul, not as a fill over [T, S]
    # (protected slots stay raw: they are no merge target either)
    unused = torch.where(used & ~bank.pinned[..., :s], 0.0, float("-inf")).flatten(0, 1)[:, None, :]
    sd = bank.search_dtype
    sim = torch.baddbmm(unused.to(sd), kn.to(sd), mn.to(sd).transpose(-1, -2))  # [B*H,T,S]
    best_sim, best = (x[..., 0] for x in rowwise_topk(sim.view(b, h, t, s), 1))  # [B,H,T]
    if sd != torch.float32:  # exact cosine to the chosen slot for the threshold test
        chosen = gather_rows(mn.view(b, h, s, -1), best)
        best_sim = (kn.view_as(chosen) * chosen).sum(-1).masked_fill(~used.gather(2, best), float("-inf"))
    return best, write_rules.no_merge_while_room(best_sim, used, t) if bank.rule.lazy else best_sim


def _importance(rule, importance: torch.Tensor | None, k: torch.Tensor,
                after: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """(what the reserve ranks by, what the other rules rank by, the reserve's signal of the tokens
    after the segment): the same, or for two signals [B, H, T, 2] the last of them for the other
    rules, and for the reserve both or the first (WriteRule.reserve_signals); zeros where the
    layer handed none."""
    if importance is None:
        importance = k.new_zeros(k.shape[:3] + ((2,) if rule.signals == 2 else ()), dtype=torch.float32)
    if rule.signals == 1:
        return importance, importance, after
    if rule.reserve_signals == 2:
        return importance, importance[..., -1], after
    return importance[..., 0], importance[..., -1], None if after is None else after[..., 0]


def _token_context(importance: torch.Tensor | None, following: torch.Tensor | None,
                   t: int) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """Token t's importance and that of the tokens after it (the token-by-token reference write)."""
    if importance is None:
        return None, None
    after = importance[:, :, t + 1 :]
    return importance[:, :, t : t + 1], after if following is None else torch.cat([after, following], dim=2)


def _merge(bank: SlotBank, k: torch.Tensor, v: torch.Tensor, merge: torch.Tensor, best: torch.Tensor,
           importance: torch.Tensor | None, age: torch.Tensor | None = None, grow: int | None = None) -> torch.Tensor:
    """Merge the `merge` tokens into their `best` slots; returns which slots were merged into.
    age [B, H, T]: each token's age once written (None: (T-1) - its index); grow: how much every
    age grows (None: T)."""
    b, h, t, _ = k.shape
    s = bank.slots
    # --- consolidation: weighted running average, several tokens per slot at once. Computed
    # per token (T rows) and scattered back, never over the whole bank: tokens merging into
    # the same slot see the same sums and write the same row.
    tgt = torch.where(merge, best, s)  # non-merging tokens go to the scratch slot
    same = (tgt[..., :, None] == tgt[..., None, :]) & merge[..., None, :]  # [B,H,T,T]
    n_add = same.sum(-1)  # [B,H,T] tokens merging into each token's slot
    age = write_rules.segment_ages(t, merge) if age is None else age
    youngest = torch.where(same, age[..., None, :], _FREE_PRIORITY).amin(-1)  # the latest token into that slot
    same = same.to(bank.dtype)
    sum_k, sum_v = torch.matmul(same, k), torch.matmul(same, v)
    c_old = bank.counts.gather(2, tgt)
    c_new = c_old + n_add
    denom = c_new.clamp(min=1).to(bank.dtype)[..., None]
    c_old_f = c_old.to(bank.dtype)[..., None]
    copy_rows_(bank.keys, tgt, (c_old_f * gather_rows(bank.keys, tgt) + sum_k) / denom)
    copy_rows_(bank.values, tgt, (c_old_f * gather_rows(bank.values, tgt) + sum_v) / denom)
    bank.counts.scatter_(2, tgt, c_new)
    # Ages: as if written token by token, a slot is as old as its latest token.
    bank.ages += t if grow is None else grow
    bank.ages.scatter_(2, tgt, youngest)
    touched = torch.zeros_like(bank.counts, dtype=torch.bool).scatter_(2, tgt, merge)
    touched[..., s] = False
    if importance is not None and bank.rule.scored:  # a slot's score gathers its tokens' importance
        bank.score.scatter_add_(2, tgt, torch.where(merge, importance, 0.0))
    return touched

def _place_by_age(bank: SlotBank, k: torch.Tensor, v: torch.Tensor, novel: torch.Tensor,
                  touched: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The paper's rule (reference of the C kernel): novel tokens take free slots, then the
    oldest not merged into; returns (placed, was_free) [B, H, T]."""
    b, h, t, _ = k.shape
    s = bank.slots
    dev = k.device
    steps = torch.arange(t, device=dev).expand(b, h, t)

    # --- novelty: free slots first (lowest index), then the oldest untouched slot
    free = bank.counts == 0
    priority = torch.where(free, _FREE_PRIORITY, bank.ages.clamp(max=_FREE_PRIORITY - 1))
    priority = torch.where(touched, -1, priority)
    priority[..., s] = -2  # scratch slot is never a target
    # Only the first T places can be taken: a top-T of a unique key (ties broken towards the
    # lower slot, as a stable sort would) instead of sorting all S+1.
    if s < _UNIQUE_KEY_SLOTS:
        key = priority * (s + 1) + torch.arange(s, -1, -1, device=dev)
        order = key.topk(min(t, s + 1), dim=-1).indices  # [B,H,min(T,S+1)]
    else:  # the key would overflow int64
        order = torch.sort(priority, dim=-1, descending=True, stable=True).indices
    available = (priority[..., :s] >= 0).sum(-1, keepdim=True)  # [B,H,1]
    n_novel = novel.sum(-1, keepdim=True)
    # With more novel tokens than places, the earliest would be evicted by later ones
    # within this segment anyway: keep the latest `available`.
    rank = novel.long().cumsum(-1) - 1 - (n_novel - available).clamp(min=0)
    place = novel & (rank >= 0)
    slot = torch.where(place, order.gather(2, rank.clamp(min=0)), s)  # [B,H,T]
    was_free = free.gather(2, slot) & place
    copy_rows_(bank.keys, slot, k)
    copy_rows_(bank.values, slot, v)
    bank.counts.scatter_(2, slot, torch.where(place, 1, 0))
    bank.ages.scatter_(2, slot, torch.where(place, (t - 1) - steps, 0))
    return place, was_free

def _native(bank: SlotBank, k: torch.Tensor, v: torch.Tensor, best: torch.Tensor, best_sim: torch.Tensor,
            finite: torch.Tensor, slots: int | None = None, importance: torch.Tensor | None = None,
            age: torch.Tensor | None = None, grow: int | None = None, first: int = 0) -> bool:
    """The rest of the write (merges, ages, novel tokens' places, telemetry) in the C kernel
    (camelot/csrc/consolidate.c) for a float32 bank on CPU, over its first `slots` slots (all:
    None), evicting by age, or by use where `importance` [B, H, T] is given (WriteRule.use_only);
    False where it does not apply (_merge with _place_by_age or place_novel then do it in torch:
    they are tested against each other)."""
    if bank.dtype != torch.float32 or k.device.type != "cpu" or k.requires_grad:
        return False
    lib = native_library()
    state = (bank.keys, bank.values, bank.counts, bank.ages, bank.telemetry)
    if lib is None or not all(x.is_contiguous() for x in (*state, bank.score)):
        return False
    b, h, t, d = k.shape
    inputs = (k.contiguous(), v.contiguous(), best.contiguous(), best_sim.float().contiguous(),
              finite.to(torch.uint8).contiguous())
    n = bank.slots if slots is None else slots
    grow = t if grow is None else grow
    # each token's age once written, where it is not (T-1) - its index (NULL)
    ages_in = None if age is None else age.to(torch.long).contiguous()
    aged = (None if ages_in is None else ages_in.data_ptr(), grow, first)
    if importance is None:
        rc = lib.camelot_consolidate_f32(b * h, t, n, bank.slots + 1, d, v.shape[-1], bank.threshold,
                                         *(x.data_ptr() for x in state[:4]), *(x.data_ptr() for x in inputs),
                                         bank.telemetry.data_ptr(), *aged)
    else:  # eviction by use: the slots' scores and the tokens' importance too
        imp = importance.float().contiguous()
        rc = lib.camelot_consolidate_use_f32(b * h, t, n, bank.slots + 1, d, v.shape[-1], bank.threshold,
                                             bank.rule.use_decay ** grow, *(x.data_ptr() for x in state[:4]),
                                             bank.score.data_ptr(), *(x.data_ptr() for x in inputs), imp.data_ptr(),
                                             bank.telemetry.data_ptr(), *aged)
    return rc == 0
