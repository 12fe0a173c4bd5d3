"""Write rules of the slot bank beyond the paper's (which merges at a global cosine threshold
and evicts the slot written longest ago). docs/memory_write.md has their ablation.

Why they exist: eviction by recency removes first the slots written once and never merged into
(rare facts), while frequent tokens keep merging and stay young; with a budget below the
document the bank then behaves like a recent-token cache. Each rule here changes who merges,
who is evicted, or what is kept raw, and each is measured on a needle probe and on perplexity.

Token importance: the attention a token received while it sat in the raw tail (summed over
the queries of its KV head's query heads), handed to the write by the raw window. A slot's
score is what its tokens brought plus the attention mass the slot received when read,
decayed per written token (`use_decay`).
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch

from camelot.guards import check_int
from camelot.memory.spans import SPAN_SCORES, TWO_SIGNALS, span_context
from camelot.rows import copy_rows_, gather_rows

EVICTIONS = ("age", "use", "merge")
DISPLACED = ("drop", "consolidate", "place")  # WriteRule.span_displaced
IMPORTANCES = ("attention", "surprise", "question", "question+surprise", "surprise+attention")
TWO_IMPORTANCES = ("question+surprise", "surprise+attention")  # [..., 2] per token, in the order named
# the two-signal importances the span reserve ranks by both of (span_score "scan+scan", "joint-scan");
# beside the others it ranks by the first alone, and the rest of the write by the last
RESERVE_TWO = ("question+surprise",)
# fields that change nothing while no rule ranks tokens (span, span_score, importance...), lazy
# (it only hides merge targets before the bookkeeping) and use_decay (only where slots are ranked)
_PAPER_FREE = ("span", "span_follow", "span_apart", "span_spread", "span_score", "importance", "lazy",
               "span_displaced", "use_decay")
# order levels of the candidates for a place (ascending: lost first)
_FREE, _PLAIN, _PINNED, _NEVER = -1, 0, 1, 3


@dataclass(frozen=True)
class WriteRule:
    """evict: which slot gives way to a novel token when the bank is full. "age": the one written
        longest ago (paper); "use": the lowest score (attention received, decayed), and a novel
        token whose own importance is lower than every slot's is dropped instead (H2O-like);
        "merge": first fold mutually nearest slot pairs together (count-weighted) to free
        places, then by age.
    protect: a token whose importance is >= protect x its head's mean over the segment is
        surprising: it never merges, its slot takes no merges (stays raw) and is evicted last,
        lowest importance first. 0: off.
    reserve: at most this many protected slots per head (the raw episodic reserve); beyond it
        the least important lose their protection. None: no cap.
    use_decay: factor per written token on slot scores (evict="use", protect); 0.995, a half-life of
        ~140 tokens, measured best (docs/memory_write.md): undecayed scores keep old heavy hitters for good.
    value_threshold: a token merges only where its value's cosine to the slot's value also
        reaches this. None: keys only.
    merge_target: per-head thresholds from the similarity distribution: each head merges this
        fraction of the segment's tokens (its threshold is the matching quantile of the tokens'
        best similarities) instead of one global threshold. None: the global threshold.
    span_reserve: the last span_reserve slots of each head keep tokens raw, one per slot: those
        in the most important windows of `span` consecutive tokens (camelot/memory/spans.py).
        0: off.
    span: tokens per window the span reserve ranks (a token scores as its best window).
    span_follow: a token also scores as the windows that end up to this many tokens before it,
        so the reserve keeps what follows a surprising run (the fact a surprising name opens).
    span_apart: a window counts only where no window within this many tokens either side scores
        higher (non-maximum suppression; 0: every window), so one long surprising passage keeps
        its best run instead of filling the reserve, and short facts elsewhere keep their places.
        Rivals after a window are seen as far as the raw tail reaches (`recent`).
    span_spread: the reserve ranks in rounds over the document's regions (one write's length
        each, by age): every region first keeps its best `span_spread` tokens, then every region
        its next `span_spread`, and so on, the higher score first within a round (0: one ranking
        over the whole document). Why: with one ranking the reserve's cutoff only rises as a
        document goes on, and a fact that was among the best of its part of the document is
        pushed out, token by token, by a tide of slightly better runs from elsewhere (Qwen
        multi-key 16k, docs/retrieval.md). Opt-in: where the regions' first rounds ask far more
        than the reserve holds (1/8 of a document) rounds only cap each region, and lost there.
    span_score: how spans are ranked, "relative" (importance over the segment's mean), "sum"
        (importance), "shared" (relative, max over the layer's KV heads), "peak" (its most
        important token) or "sum+peak" (half the reserve each: sum with span / span_follow,
        peak with spans.PEAK_SPAN / PEAK_FOLLOW) or "scan" (the best window of any length 2, 4, ...
        span, by its excess over the context's mean token over sqrt(length): a short burst and a
        long passage on one scale) or "scan+scan" (half the reserve each, the scan of each of two
        importances) or "joint-scan" (one ranking, the sum of the two scans in standard
        deviations); the last two need importance "question+surprise"; spans.py.
    importance: what a token's importance is, for every rule above that ranks by it. "attention":
        the attention it received while in the window and raw tail (per KV head); "surprise": the
        model's own NLL of the token (the same for every head and layer, so all keep the same
        tokens; EM-LLM's signal), handed to the write by the wrapper; "question": how strongly a
        question given before the document (`CamelotModel.set_question`) attends to the token: the
        largest logit of its queries on the token's position-free key (per KV head; question.py);
        "question+surprise": the two, for span_score "scan+scan" (the rules other than the reserve
        rank by the surprise); "surprise+attention": the reserve ranks by surprise (facts), the
        consolidated slots by the attention their tokens received (use), each what it is for.
    span_displaced: what becomes of a reserve token a better window displaces: "place" (it joins
        the write of the consolidated slots as a token of its own, never merged, placed or dropped
        as a new token is, keeping its age and score; camelot/memory/reserve_write.py),
        "consolidate" (the same, but it may merge) or "drop" (lost; the only way until 2026-12-07,
        and the recall kinds but "balanced" were measured so).
    lazy: a head with f free slots lets only the t - f most similar tokens of a t-token segment
        merge; while there is room every token keeps a slot of its own, so a bank that is not yet
        full holds the past exactly, as a raw cache would.
    """

    evict: str = "age"
    protect: float = 0.0
    reserve: int | None = None
    use_decay: float = 0.995
    value_threshold: float | None = None
    merge_target: float | None = None
    span_reserve: int = 0
    span: int = 8
    span_follow: int = 0
    span_apart: int = 0
    span_spread: int = 0
    span_score: str = "relative"
    importance: str = "attention"
    lazy: bool = False
    span_displaced: str = "place"

    def __post_init__(self) -> None:
        if self.evict not in EVICTIONS:
            raise ValueError(f"evict must be one of {', '.join(EVICTIONS)}; got {self.evict!r}")
        if not isinstance(self.protect, (int, float)) or isinstance(self.protect, bool) or self.protect < 0:
            raise ValueError(f"protect must be a number >= 0 (0: off), got {self.protect!r}")
        if self.reserve is not None and (isinstance(self.reserve, bool) or not isinstance(self.reserve, int)
                                         or self.reserve < 0):
            raise ValueError(f"reserve must be None or an integer >= 0, got {self.reserve!r}")
        if not isinstance(self.use_decay, (int, float)) or not 0 < self.use_decay <= 1:
            raise ValueError(f"use_decay must be in (0, 1], got {self.use_decay!r}")
        if self.value_threshold is not None and not -1 <= self.value_threshold <= 1:
            raise ValueError(f"value_threshold must be None or a cosine in [-1, 1], got {self.value_threshold!r}")
        if self.merge_target is not None and not 0 <= self.merge_target <= 1:
            raise ValueError(f"merge_target must be None or a fraction in [0, 1], got {self.merge_target!r}")
        for name in ("span", "span_follow", "span_apart", "span_spread", "span_reserve"):
            check_int(name, getattr(self, name), low=1 if name == "span" else 0)
        if self.importance not in IMPORTANCES:
            raise ValueError(f"importance must be one of {', '.join(IMPORTANCES)}; got {self.importance!r}")
        if self.span_score not in SPAN_SCORES:
            raise ValueError(f"span_score must be one of {', '.join(SPAN_SCORES)}; got {self.span_score!r}")
        if (self.importance in RESERVE_TWO) != (self.span_score in TWO_SIGNALS):
            raise ValueError(f"importance {' or '.join(RESERVE_TWO)} goes with span_score "
                             f"{' or '.join(TWO_SIGNALS)} and only with it (they rank by two importances at once); "
                             f"got importance {self.importance!r}, span_score {self.span_score!r}")
        if self.span_displaced not in DISPLACED:
            raise ValueError(f"span_displaced must be one of {', '.join(DISPLACED)}; got {self.span_displaced!r}")
        if not isinstance(self.lazy, bool):
            raise ValueError(f"lazy must be True or False, got {self.lazy!r}")

        # what kind of rule this is, asked by every write of every layer: worked out once (frozen)
        use = self.evict == "use"
        beside_reserve = self.span_reserve > 0 and (_paper_like(self, "span_reserve")
                                                    or use and _paper_like(self, "span_reserve", "evict"))
        object.__setattr__(self, "_kinds", (_paper_like(self), use and _paper_like(self, "evict"), beside_reserve))

    @property
    def plain(self) -> bool:
        """The paper's rule: the C kernel and the reference torch code do it."""
        return self._kinds[0]

    @property
    def use_only(self) -> bool:
        """Eviction by use and otherwise the paper's rule: the C kernel does it too."""
        return self._kinds[1]

    @property
    def wanted(self) -> tuple[str, ...]:
        """The importances the write takes, in channel order (none for a rule that ranks nothing)."""
        return tuple(self.importance.split("+")) if self.scored else ()

    @property
    def signals(self) -> int:
        """Importance values per token the write takes: 2 for a two-signal importance."""
        return 2 if self.importance in TWO_IMPORTANCES else 1

    @property
    def reserve_signals(self) -> int:
        """Importance values per token the span reserve ranks by (and carries across writes)."""
        return 2 if self.importance in RESERVE_TWO else 1

    @property
    def span_carried(self) -> int:
        """Importance values of the last written tokens the span reserve carries into the next write."""
        return span_context(self.span, self.span_follow, self.span_score, self.span_apart)

    @property
    def kernel_beside_reserve(self) -> bool:
        """The paper's rule, or eviction by use alone, plus a span reserve: the C kernel does the
        consolidated part."""
        return self._kinds[2]

    @property
    def scored(self) -> bool:
        """Whether slots need a score (attention received)."""
        return self.evict == "use" or self.protect > 0 or self.span_reserve > 0

    @property
    def ranks_slots(self) -> bool:
        """Whether places go by the slots' scores, which reads add their attention mass to (the
        span reserve alone ranks incoming tokens only)."""
        return self.evict == "use" or self.protect > 0


def merge_mask(rule: WriteRule, threshold: float, best_sim: torch.Tensor, finite: torch.Tensor,
               v: torch.Tensor, slot_values: torch.Tensor, best: torch.Tensor,
               surprising: torch.Tensor) -> torch.Tensor:
    """[B, H, T] which tokens merge into their nearest slot."""
    thr = torch.as_tensor(threshold, device=best_sim.device)
    if rule.merge_target is not None:
        # the per-head quantile of this segment's best similarities (non-finite tokens and an
        # empty bank count as -1, the lowest cosine)
        sims = torch.where(finite, best_sim.clamp(min=-1.0), -1.0).float()
        thr = torch.quantile(sims, 1.0 - rule.merge_target, dim=-1, keepdim=True)
    merge = finite & (best_sim >= thr) & ~surprising
    if rule.value_threshold is not None:
        chosen = gather_rows(slot_values, best).float()
        vsim = torch.nn.functional.cosine_similarity(v.float(), chosen, dim=-1)
        merge &= vsim >= rule.value_threshold
    return merge


def surprising_tokens(rule: WriteRule, importance: torch.Tensor | None, finite: torch.Tensor) -> torch.Tensor:
    """[B, H, T] tokens whose importance is >= protect x their head's mean over the segment."""
    if rule.protect <= 0 or importance is None:
        return torch.zeros_like(finite)
    imp = torch.where(finite, importance, 0.0)
    mean = imp.sum(-1, keepdim=True) / finite.sum(-1, keepdim=True).clamp(min=1)
    return finite & (imp >= rule.protect * mean) & (imp > 0)


def free_by_pair_merge(keys: torch.Tensor, values: torch.Tensor, counts: torch.Tensor, ages: torch.Tensor,
                       score: torch.Tensor, pinned: torch.Tensor, touched: torch.Tensor,
                       need: torch.Tensor) -> torch.Tensor:
    """Free up to `need` [B, H] places per head by merging mutually nearest slot pairs (most
    similar first), count-weighted, into the lower-index slot of each pair; the other slot is
    freed (count 0). Pinned slots and those merged into this segment take no part. In place;
    returns [B, H] how many were freed."""
    b, h, n, d = keys.shape
    s = n - 1
    ok = (counts[..., :s] > 0) & ~pinned[..., :s] & ~touched[..., :s]  # [B,H,S]
    kn = torch.nn.functional.normalize(keys[..., :s, :].float(), dim=-1)
    sim = torch.matmul(kn, kn.transpose(-1, -2))
    bad = ~(ok[..., :, None] & ok[..., None, :]) | torch.eye(s, dtype=torch.bool, device=keys.device)
    sim = sim.masked_fill_(bad, float("-inf"))
    nn_sim, nn = sim.max(-1)  # [B,H,S]
    idx = torch.arange(s, device=keys.device)
    mutual = (nn.gather(-1, nn) == idx) & (idx < nn) & torch.isfinite(nn_sim)
    pair_sim = torch.where(mutual, nn_sim, float("-inf"))
    rank = torch.empty_like(nn).scatter_(-1, pair_sim.argsort(dim=-1, descending=True, stable=True),
                                         idx.expand_as(nn).contiguous())
    sel = mutual & (rank < need[..., None])  # [B,H,S]: slot j absorbs its partner nn[j]
    partner = torch.where(sel, nn, s)
    c_j, c_p = counts[..., :s], counts.gather(2, partner)
    tot = (c_j + c_p).clamp(min=1)
    w_j = (c_j / tot)[..., None].to(keys.dtype)
    w_p = (c_p / tot)[..., None].to(keys.dtype)
    new_k = w_j * keys[..., :s, :] + w_p * gather_rows(keys, partner)
    new_v = w_j * values[..., :s, :] + w_p * gather_rows(values, partner)
    keys[..., :s, :] = torch.where(sel[..., None], new_k, keys[..., :s, :])
    values[..., :s, :] = torch.where(sel[..., None], new_v, values[..., :s, :])
    counts[..., :s] = torch.where(sel, c_j + c_p, c_j)
    ages[..., :s] = torch.where(sel, torch.minimum(ages[..., :s], ages.gather(2, partner)), ages[..., :s])
    score[..., :s] = torch.where(sel, score[..., :s] + score.gather(2, partner), score[..., :s])
    counts.scatter_(2, partner, torch.zeros_like(partner))
    counts[..., s] = 0
    return sel.sum(-1)


def place_novel(rule: WriteRule, keys: torch.Tensor, values: torch.Tensor, counts: torch.Tensor,
                ages: torch.Tensor, score: torch.Tensor, pinned: torch.Tensor, touched: torch.Tensor,
                k: torch.Tensor, v: torch.Tensor, novel: torch.Tensor, surprising: torch.Tensor,
                importance: torch.Tensor, age: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Novel tokens and the slots they may take compete for places: the S best of (slots not
    merged into this segment, novel tokens) stay, ordered by (level, keep): free slots go
    first, then plain slots and plain tokens by age (or score, evict="use"), then protected
    ones by importance; ties go to the lower slot index, slots before tokens. With the paper's
    rule this is exactly the reference write's order. age [B,H,T]: each token's age once written
    (None: (T-1) - its index). Returns (placed [B,H,T], was_free [B,H,T])."""
    b, h, t, _ = k.shape
    s = counts.shape[-1] - 1
    dev = k.device
    age = segment_ages(t, novel) if age is None else age
    free = counts == 0
    never = touched.clone()
    never[..., s] = True
    slot_level = torch.where(never, _NEVER, torch.where(free, _FREE, torch.where(pinned, _PINNED, _PLAIN)))
    tok_level = torch.where(novel, torch.where(surprising, _PINNED, _PLAIN), _NEVER)
    if rule.evict == "use":
        slot_keep, tok_keep = score.double(), importance.double()
    else:
        slot_keep, tok_keep = -ages.double(), -age.double()
    # protected ones leave lowest importance first, whatever the eviction rule
    slot_keep = torch.where(pinned & ~free, score.double(), slot_keep)
    tok_keep = torch.where(surprising, importance.double(), tok_keep)
    slot_keep = torch.where(free, 0.0, slot_keep)
    level = torch.cat([slot_level, tok_level], dim=-1)
    keep = torch.cat([slot_keep, tok_keep], dim=-1)
    o1 = keep.argsort(dim=-1, stable=True)
    order = o1.gather(-1, level.gather(-1, o1).argsort(dim=-1, stable=True))  # [B,H,S+1+T]
    n_novel = novel.sum(-1, keepdim=True)
    pos = torch.empty_like(order).scatter_(-1, order, torch.arange(order.shape[-1], device=dev).expand_as(order)
                                           .contiguous())
    lost = pos < n_novel
    placed = novel & ~lost[..., s + 1:]
    # the losing slots in their order, taken by the placed tokens in token order
    head = order[..., :t]
    is_lost_slot = (head <= s) & (torch.arange(t, device=dev) < n_novel)
    lost_slots = head.gather(-1, torch.where(is_lost_slot, 0, 1).argsort(dim=-1, stable=True))
    rank = (placed.long().cumsum(-1) - 1).clamp(min=0)
    slot = torch.where(placed, lost_slots.gather(-1, rank), s)
    was_free = free.gather(2, slot) & placed
    copy_rows_(keys, slot, k)
    copy_rows_(values, slot, v)
    counts.scatter_(2, slot, torch.where(placed, 1, 0))
    ages.scatter_(2, slot, torch.where(placed, age, 0))
    score.scatter_(2, slot, torch.where(placed, importance, 0.0).to(score.dtype))
    pinned.scatter_(2, slot, placed & surprising)
    pinned[..., s] = False
    if rule.reserve is not None and rule.reserve < s:
        # the raw episodic reserve: only the `reserve` most important protected slots stay protected
        top = torch.where(pinned[..., :s], score[..., :s], float("-inf")).topk(rule.reserve, dim=-1).indices
        keep_pin = torch.zeros_like(pinned[..., :s]).scatter_(-1, top, True)
        pinned[..., :s] &= keep_pin
    return placed, was_free


def segment_ages(t: int, like: torch.Tensor) -> torch.Tensor:
    """Each of a T-token segment's tokens' age once the segment is written: (T-1) - its index,
    as if written token by token; shaped like `like` [B, H, T]."""
    return (t - 1) - torch.arange(t, device=like.device).expand(like.shape[:2] + (t,))


def no_merge_while_room(best_sim: torch.Tensor, used: torch.Tensor, t: int) -> torch.Tensor:
    """The lazy write: a head with f free slots lets only its t - f most similar tokens merge (none
    while f >= t), so every free slot is taken before tokens fold together. A mask, not a host-side
    test: no sync. (Until 2026-12-06 any shortfall let the whole segment merge at the threshold,
    and heads whose keys are alike, Qwen2.5's early layers, kept 80% of their slots empty.)"""
    rank = best_sim.argsort(-1, descending=True).argsort(-1)
    return best_sim.masked_fill(rank >= t - (~used).sum(-1, keepdim=True), float("-inf"))


def rule_from_config(cfg: object) -> WriteRule:
    """The write rule a CamelotConfig names (its fields of the same names, RULE_FIELDS); raises
    ValueError on a bad one."""
    return WriteRule(**{name: getattr(cfg, name) for name in RULE_FIELDS})


# the CamelotConfig fields (and CLI flags) that make the write rule: WriteRule's own fields
RULE_FIELDS: tuple[str, ...] = tuple(f.name for f in fields(WriteRule))


def _paper_like(rule: WriteRule, *ignored: str) -> bool:
    """The paper's rule (WriteRule's defaults: no reserve either) up to _PAPER_FREE and `ignored`."""
    free = (*_PAPER_FREE, *ignored)
    return all(getattr(rule, f.name) == f.default for f in fields(rule) if f.name not in free)
