"""The write presets of CamelotConfig: its default write and what `recent` and `span_reserve`
"auto" give, the consolidating write of camelot 0.1 and the paper, and the recall kinds (a raw
reserve ranked for one kind of thing to recall). Measured in docs/memory_write.md."""

from __future__ import annotations

from typing import Any

# CamelotConfig.recall: how its raw reserve ranks tokens, per kind of thing to recall.
# facts: the most surprising burst of 2, 4 or 8 tokens by a scan statistic (a fact opens with a
# name the model did not expect; 16-token sums, the preset until 2026-12-05, lost short names to
# long surprising passages: docs/retrieval.md) and the 12 tokens after it (its value).
# demonstrations: single tokens by the attention the window gave them, the largest over the
# layer's KV heads (a demonstration's label is what later ones read; surprise keeps their
# sentences instead: Qwen subj 70%, below the paper write's 73%, 2 draws)
# question: the facts' spans, ranked by the logit of a question given before the document
# (camelot/question.py): a fact in plain prose is not a burst of surprise (docs/inference.md)
# question+facts: half the reserve each, in one write (spans.HALVES["scan+scan"]); the two
# signals may instead rank jointly (span_score "joint-scan", docs/retrieval.md)
# balanced: facts in a third of the slots, the rest consolidated and evicted by recent use
# (evict="use"); with a raw tail as long as the slots (`recent`) it keeps most needles of `facts`
# (fewer at 1/8 of the document) and most of the perplexity of recent use; the default write since
# 2026-12-06 (the field defaults below). A third, not half: at
# 512 entries half cost 0.1-2% perplexity and 30 points of Qwen's RULER multi-key at 4k for one
# single needle more; at 2048 half measured 0.1-0.6% better (docs/memory_write.md)
# the write of camelot 0.1 and of the paper: every slot consolidated, the one written longest ago
# evicted, no reserve (CamelotConfig.consolidating, paper; the default until 2026-12-06)
# (span_displaced "drop": the recall kinds built on it were measured before a displaced reserve
# token went to the consolidated slots; the default's reserve, "balanced", does that)
# the default write's reserve keeps 16 tokens after a winning window, not the facts preset's 12:
# at 512 entries a fact's number was cut one digit short after a four-token name (SmolLM2's
# needle probe, 56 of 72 against 52 over six draws; docs/retrieval.md, "The logit credit as the
# default"); the other recall kinds keep the 12 they were measured with
BALANCED_FOLLOW = 16
CONSOLIDATING = {"evict": "age", "span_reserve": 0, "span_follow": 0, "span_score": "relative",
                 "importance": "attention", "span_displaced": "drop"}
_FACTS = {**CONSOLIDATING, "span": 8, "span_follow": 12, "importance": "surprise", "span_score": "scan"}
RECALL_KINDS: dict[str, dict[str, Any]] = {
    "facts": _FACTS,
    "balanced": {**_FACTS, "evict": "use", "span_displaced": "place", "span_follow": BALANCED_FOLLOW},
    "demonstrations": {**CONSOLIDATING, "span": 1, "importance": "attention", "span_score": "shared"},
    "question": {**_FACTS, "importance": "question"},
    "question+facts": {**_FACTS, "importance": "question+surprise", "span_score": "scan+scan"},
}
# the kinds whose reserve is a fixed share of the slots (1/n); the others keep all slots but 128
RECALL_SHARES: dict[str, int] = {"balanced": 3}
# recent="auto": the raw tail of everything but camelot's eviction by use (knn's tail, infllm's
# local window, the consolidating write); beside eviction by use half of what a segment's last
# query attends is raw and recent, the window counted: window + tail = sinks + slots (auto_tail;
# docs/memory_write.md: half the budget raw is what made eviction by use beat `sliding`, and at
# window 512 a tail as long as the slots, ignoring the window, cost Qwen 3% on 16k-token books)
TAIL = 128
# the bank the consolidating default had, in which the recall kinds but "balanced" were measured
CONSOLIDATING_BANK = {"slots": 2048, "recent": TAIL}
WRITE_AUTO = ("recent", "span_reserve")  # fields whose "auto" follows slots, sink, strategy and evict


def recall_reserve(kind: str, slots: Any) -> int:
    """The span reserve of CamelotConfig.recall(kind) in a bank of `slots` slots."""
    if type(slots) is not int:  # a bad `slots`: validate() says so
        return 0
    if kind in RECALL_SHARES:
        return slots // RECALL_SHARES[kind]
    return slots - min(128, max(1, slots // 3))


def auto_tail(slots: int, sink: int, window: int) -> int:
    """The raw tail beside camelot's eviction by use: window + tail = sinks + slots, half of what
    the segment's last query attends raw and recent (none where the window alone is that much)."""
    return max(0, slots + sink - window)


def resolve_auto_write(cfg: Any) -> None:
    """recent and span_reserve "auto" -> numbers: half the attended entries raw beside camelot's
    eviction by use (auto_tail; docs/memory_write.md), a third of the slots the reserve."""
    camelot, slots = cfg.strategy == "camelot", cfg.slots if type(cfg.slots) is int else 0
    if cfg.recent == "auto":
        sink = cfg.sink if type(cfg.sink) is int else 0
        window = cfg.window if type(cfg.window) is int else 0
        object.__setattr__(cfg, "recent", auto_tail(slots, sink, window) if camelot and cfg.evict == "use" else TAIL)
    if cfg.span_reserve == "auto":
        object.__setattr__(cfg, "span_reserve", recall_reserve("balanced", slots) if camelot else 0)


def slots_for_budget(budget: int, sink: int, recent: int | str = "auto", evict: str = "use", window: int = 0) -> int:
    """camelot's slots when a head keeps `budget` entries besides its segment (sinks + raw tail +
    slots), the tail as `recent` says ("auto": as resolve_auto_write gives it for this window)."""
    if recent == "auto" and evict == "use":  # budget = 2 sinks + 2 slots - window, or no tail at all
        return min((budget + window - 2 * sink) // 2, budget - sink)
    return budget - sink - (TAIL if recent == "auto" else int(recent))


def at_same_budget(cfg: Any, strategy: str) -> Any:
    """`cfg` (a camelot config) as `strategy` holding what camelot holds: `sliding` caches its slots
    and raw tail (the sinks apart, as camelot's), `infllm` its local window of TAIL tokens and, in
    the rest, the nearest whole number of blocks (as eval/plan.py gives it)."""
    if strategy == "sliding":
        return cfg.replace(strategy="sliding", slots=cfg.slots + cfg.recent)
    if strategy == "infllm":
        blocks = max(1, round((cfg.slots + cfg.recent - TAIL) / cfg.block_size))
        return cfg.replace(strategy="infllm", slots=blocks * cfg.block_size, recent=TAIL, placement="fixed")
    return cfg.replace(strategy=strategy)
