"""The one place where a camelot run is configured and validated.

Each field carries its help text and, through its `Literal` type, its allowed values; the CLI
flags (`camelot.options`) and the docs are built from these fields, so an option is written
once. Defaults are the best measured on SmolLM2 (README, "At a glance"; docs/results_log.md);
`paper()` gives the paper's setting (no raw tail, no sinks, top-1 read of the slot nearest each
token's key, no count bias).
"""

from __future__ import annotations

import warnings
from dataclasses import MISSING, asdict, dataclass, field, fields
from typing import Any, Literal, get_args

import torch

from camelot.backends import BACKENDS
from camelot.guards import check_int
from camelot.memory.rules import DISPLACED, EVICTIONS, IMPORTANCES, RULE_FIELDS, WriteRule, rule_from_config
from camelot.memory.spans import SPAN_SCORES
from camelot.presets import (
    BALANCED_FOLLOW,
    CONSOLIDATING,
    CONSOLIDATING_BANK,
    RECALL_KINDS,
    RECALL_SHARES,
    TAIL,
    WRITE_AUTO,
    recall_reserve,
    resolve_auto_write,
)
from camelot.reads.base import COUNT_MODES
from camelot.surprise import SURPRISE_FROM

Strategy = Literal["camelot", "knn", "window", "recurrent", "sliding", "infllm"]
WriteMode = Literal["segment", "token"]
MemoryDtype = Literal["float32", "bfloat16", "float16"]
Placement = Literal["fixed", "recency", "mixed"]
Retrieve = Literal["query", "group", "key"]
CountMode = Literal["relative", "absolute"]  # = camelot.reads.base.COUNT_MODES, where the bias is

STRATEGIES: tuple[str, ...] = ("window", "recurrent", "sliding", "knn", "infllm", "camelot")
WRITE_MODES: tuple[str, ...] = get_args(WriteMode)
MEMORY_DTYPES: tuple[str, ...] = get_args(MemoryDtype)
PLACEMENTS: tuple[str, ...] = get_args(Placement)
RETRIEVALS: tuple[str, ...] = get_args(Retrieve)

# read_top_k="auto": every slot up to this many slots, the grouped bf16 top-k above. Was 1024: on
# Qwen2.5-0.5B (7 query heads per KV head, window 512, 1920 slots) the top-8 read made memory
# nearly useless (perplexity 42.6 vs 33.6 reading every slot, 44.6 window-only; docs/results_log.md)
AUTO_EVERY_SLOT_MAX = 8192
AUTO_TOP_K = 8

EVERY_SLOT_SEARCH = ("torch", "torch-bf16")  # backends that can score every slot (bf16: rounded scores)
# old spelling -> new; accepted with a FutureWarning for one release (0.2 drops them)
RENAMED = {"top_k": "read_top_k"}
# the fields (and flags) that shape camelot's write: the rule's own, and whose surprise it ranks by
WRITE_FIELDS: tuple[str, ...] = (*RULE_FIELDS, "surprise_from", "surprise_reach")


def option(default: Any, help: str, *, choices: tuple[str, ...] | None = None, cli: bool = True,
           sweep: bool = True) -> Any:
    """A config field with its help text. cli: it gets a flag; sweep: `camelot ppl` may sweep it
    (comma-separated values)."""
    return field(default=default, metadata={"help": help, "choices": choices, "cli": cli, "sweep": sweep})


@dataclass(init=False)
class CamelotConfig:
    """How the memory beside a frozen model behaves. Every field's help: `CamelotConfig.help(name)`
    or `camelot ppl --help`."""

    strategy: Strategy = option(
        "camelot", "camelot (consolidated slots), knn (keep every token), window (no memory), recurrent "
        "(previous segment's raw KV), sliding (raw KV of the last `slots` tokens), infllm (InfLLM's blocks: every "
        "block kept, `slots` / `block_size` of them read per forward)", choices=STRATEGIES, sweep=False)
    window: int = option(128, "tokens per segment (the local attention span)")
    slots: int = option(1084, "consolidated memory slots per layer and KV head (camelot; at window 128, 1084 + the "
                              "auto tail and sinks: 2048 entries); `sliding`: the raw tokens it caches (its budget)")
    recent: int | Literal["auto"] = option(
        "auto", "raw tokens kept right before the segment (camelot, knn; infllm's local window): a token reaches "
        f"memory when it leaves this tail. auto: beside camelot's eviction by use, slots + sink - window (half of "
        f"what the last query attends raw, the window counted, as measured); else {TAIL}")
    sink: int = option(
        4, "the document's first tokens, kept raw for good right before the raw tail (recurrent, sliding, "
        "knn, camelot): StreamingLLM's attention sinks, where a model trained from position 0 parks attention")
    threshold: float = option(0.95, "cosine similarity at or above which a token merges into its nearest slot")
    read_top_k: int | None | Literal["auto"] = option(
        "auto", "memory slots each query reads (1 is the paper's mode); None ('all') reads every slot, exactly. "
        f"'auto' (the default): every slot up to {AUTO_EVERY_SLOT_MAX} slots; above, the {AUTO_TOP_K} slots "
        "each KV head's query heads weigh most together, found in bfloat16 (retrieve='group', "
        "search='torch-bf16' unless given). That fast read costs SmolLM2 0-4% perplexity at 2048 slots but "
        "Qwen2.5 (7 query heads per KV head) +27%: give it (--read-top-k 8 --retrieve group --search "
        "torch-bf16) only where measured (docs/results_log.md, 'Fast by default')")
    retrieve: Retrieve = option(
        "query", "how a top-k read picks slots. query: per query head, the k with the highest logits. group: "
        "per KV head, the k with the highest sum of its G query heads' logits, shared by them (one search "
        "instead of G; 0-1.6% perplexity against query where measured). key: the paper's rule, the k nearest "
        "the token's own position-free key (worse on SmolLM2). Ignored when every slot is read",
        choices=RETRIEVALS)
    count_bias: float = option(
        0.7, "add count_bias * max(0, log(count / mean count)) to a slot's logit: slots that merged more "
        "tokens than average weigh more, a slot of one token weighs like a raw token (the paper's absolute "
        "log(count) drifts in long runs: perplexity 16 -> 29 over 600k tokens). 0 (off) to 4")
    count_mode: CountMode = option(
        "relative", "what the count bias compares a slot's count with. relative: the head's mean count, "
        "clipped at 0 (above). absolute: the paper's count_bias * log(count), so a slot of n merged tokens "
        "takes the softmax mass of n raw copies of its key, as a vote over many demonstrations needs "
        "(docs/icl_memory.md); over very long streams memory then outweighs the window (docs/results_log.md, 'Long "
        "runs')", choices=COUNT_MODES)
    count_cap: float | None = option(
        None, "the count bias of a slot stops growing at count_bias * log(count_cap): a slot weighs at most "
        "like count_cap raw copies of its key (absolute) or count_cap times the mean (relative), so slots of "
        "frequent tokens that merge without end cannot drown the window in a long run. None: no cap")
    placement: Placement = option(
        "fixed", "where memory sits for rotary models. fixed (the paper): every slot `memory_distance` positions "
        "before the segment. recency: each slot at its last write (those beyond the model's range packed in order). "
        "mixed: one-token slots (never merged into) at their last write, where that token was, merged ones fixed",
        choices=PLACEMENTS)
    memory_distance: int | None = option(
        None, "positions between memory and the segment's first token (rotary models); None: right "
        "before the raw tail (window + recent)")
    layers: list[int] | str | None = option(
        None, "layers that own memory: a list of indices, 'all', or None, the adapter's choice (every layer, "
        "or gemma2/3's full-attention layers only)")
    search: str = option(
        "auto", "nearest-slot backend: torch (exact), torch-bf16 (bfloat16 scores: of every slot in an "
        "every-slot read, of the candidates in a top-k read), faiss, faiss-gpu, faiss-ivf, faiss-hnsw; auto: "
        "torch-bf16 where the CPU has AMX bfloat16 tiles, else torch (docs/speed.md)",
        choices=("auto", *BACKENDS), sweep=False)
    write_mode: WriteMode = option(
        "segment", "segment: a whole segment matched against memory at once (fast); token: token by token "
        "(the paper's sequential semantics, slow)", choices=WRITE_MODES, sweep=False)
    block_size: int = option(128, "infllm: tokens per memory block; `slots` (a multiple of it) is what a read attends "
                                  "to: slots / block_size blocks, chosen per KV head by their representatives")
    repr_topk: int = option(4, "infllm: a block's representative is the mean of its repr_topk keys that received "
                               "the most attention while in the local window")
    memory_dtype: MemoryDtype = option("float32", "storage dtype of slot keys and values", choices=MEMORY_DTYPES,
                                       sweep=False)
    evict: str = option("use", "camelot: which slot a novel token replaces in a full bank. age: the one written "
                        "longest ago (paper). use (default): the lowest score, its tokens' importance "
                        "plus the attention it received when read, decayed. merge: first fold mutually nearest slot "
                        "pairs together (docs/memory_write.md)", choices=EVICTIONS)
    protect: float = option(0.0, "camelot: a token that received >= protect x its head's mean attention before "
                                 "leaving the raw window never merges, takes no merges and is evicted last (0: off)")
    reserve: int | None = option(None, "camelot: at most this many protected slots per head (the raw episodic "
                                       "reserve); None: no cap")
    use_decay: float = option(WriteRule.use_decay, "camelot: decay per written token of the slot scores that "
                                                   "evict=use and protect rank by (0.995: half-life ~140 tokens)")
    value_threshold: float | None = option(None, "camelot: a token merges only where its value's cosine to the "
                                                 "slot's value also reaches this (None: keys only)")
    merge_target: float | None = option(None, "camelot: per-head thresholds, each head merging this fraction of "
                                              "a segment's tokens (None: the global threshold)")
    span_reserve: int | Literal["auto"] = option(
        "auto", "camelot: the last span_reserve slots per head hold important windows raw (0: off; auto: a "
        "third of the slots)")
    span: int = option(8, "camelot: tokens per window the span reserve ranks (a token scores as its best window)")
    span_follow: int = option(BALANCED_FOLLOW, "camelot: the reserve also keeps the N tokens after a winning window")
    span_apart: int = option(0, "camelot: a reserve window counts only if none within this many tokens beats it")
    span_spread: int = option(0, "camelot: the reserve ranks in rounds: each write-long region of the document keeps "
                                 "its best span_spread tokens before any keeps more (0: one ranking)")
    span_score: str = option("scan", "camelot: span reserve ranking. relative: importance over the segment's "
                                         "mean; sum; shared: relative, max over KV heads; peak: top token; sum+peak: "
                                         "half each; scan: best window up to span by its excess over the mean; "
                                         "scan+scan: half each, two importances; joint-scan: their scans summed in "
                                         "s.d.", choices=SPAN_SCORES)
    span_displaced: str = option("place", "camelot: a reserve token a better window displaces takes a "
                                          "consolidated slot of its own (place), may merge there too "
                                          "(consolidate) or is lost (drop)", choices=DISPLACED)
    importance: str = option("surprise", "camelot: what evict=use, protect and the span reserve rank by: attention "
                                          "received in the window; surprise: the model's NLL; question: a question's "
                                          "logit (set_question); question+surprise: both; surprise+attention: the "
                                          "reserve by surprise, the rest by attention", choices=IMPORTANCES)
    surprise_from: str = option("auto", "camelot: whose NLL importance=surprise ranks by: the model's (memory); a "
                                "forward without memory (window; 2x compute); the model's + the logit memory added to "
                                "the token (logit, ~1.05x); auto: logit where the model's output projections and final "
                                "norm are found, else memory", choices=SURPRISE_FROM)
    surprise_reach: int | None = option(128, "camelot: the logit credit counts what the raw context over N tokens "
                                             "back added to a token's logit too (None: memory's part only)")
    lazy: bool = option(False, "camelot: merge only the tokens a head has no free slot for, so memory stays raw "
                               "(exact) until full; with placement=mixed a bank larger than the document is full "
                               "attention (docs/memory_write.md)")

    def __init__(self, **values: Any) -> None:
        for old, new in RENAMED.items():
            if old in values:
                warnings.warn(f"CamelotConfig({old}=...) is now {new}=...; the old name goes in camelot 0.2",
                              FutureWarning, stacklevel=2)
                if new in values:
                    raise ValueError(f"give {new} or its old name {old}, not both")
                values[new] = values.pop(old)
        names = {f.name for f in fields(self)}
        unknown = sorted(set(values) - names)
        if unknown:
            raise TypeError(f"CamelotConfig got unknown option(s) {', '.join(unknown)}; options: "
                            f"{', '.join(sorted(names))}")
        for f in fields(self):
            default = f.default if f.default is not MISSING else f.default_factory()  # type: ignore[misc]
            object.__setattr__(self, f.name, values.get(f.name, default))
        given = {k for k, v in values.items() if not (isinstance(v, str) and v == "auto")}
        if self.search == "auto":
            object.__setattr__(self, "search", "torch-bf16" if fast_bfloat16() else "torch")
        if self.read_top_k == "auto":
            _resolve_auto_read(self, given)
        # replace() keeps these "auto" unless changed: a tail and reserve that follow the new slots
        object.__setattr__(self, "_auto", frozenset(n for n in WRITE_AUTO if getattr(self, n) == "auto"))
        resolve_auto_write(self)
        self.validate()

    def __getattr__(self, name: str) -> Any:  # only reached for names the instance lacks
        if name in RENAMED:
            warnings.warn(f"CamelotConfig.{name} is now .{RENAMED[name]}", FutureWarning, stacklevel=2)
            return getattr(self, RENAMED[name])
        raise AttributeError(name)

    def __setattr__(self, name: str, value: Any) -> None:
        if name in RENAMED:
            warnings.warn(f"CamelotConfig.{name} is now .{RENAMED[name]}", FutureWarning, stacklevel=2)
            name = RENAMED[name]
        object.__setattr__(self, name, value)

    def validate(self) -> None:
        """Raise ValueError for any setting camelot cannot run; normalises count_bias and layers."""
        _validate(self)

    @property
    def distance(self) -> int:
        return self.window + self.recent if self.memory_distance is None else self.memory_distance

    @classmethod
    def paper(cls, **changes: Any) -> CamelotConfig:
        """The CAMELoT paper's setting: consolidated slots alone, written as `consolidating()` writes,
        read top-1 by the slot nearest each token's key, fixed placement."""
        return cls.consolidating(**{"recent": 0, "sink": 0, "read_top_k": 1, "retrieve": "key", "count_bias": False,
                                    "placement": "fixed", **changes})

    @classmethod
    def consolidating(cls, **changes: Any) -> CamelotConfig:
        """The default until 2026-12-06: every slot consolidated, the one written longest ago evicted
        (the paper's write), 2048 slots beside a raw tail of 128."""
        return cls(**{**CONSOLIDATING_BANK, **CONSOLIDATING, **changes})

    @classmethod
    def recall(cls, kind: str = "facts", **changes: Any) -> CamelotConfig:
        """All slots but 128 (a third of a smaller bank; "balanced", the default write: a third) a raw
        reserve ranked as RECALL_KINDS[kind] says, the rest consolidated (facts: docs/retrieval.md;
        demonstrations: docs/icl_memory.md)."""
        if kind not in RECALL_KINDS:
            raise ValueError(f"recall kind must be one of {', '.join(RECALL_KINDS)}; got {kind!r}")
        base = {} if kind in RECALL_SHARES else CONSOLIDATING_BANK  # the bank each kind was measured in
        slots = changes.get("slots", base.get("slots", cls.__dataclass_fields__["slots"].default))
        return cls(**{**base, **RECALL_KINDS[kind], "span_reserve": recall_reserve(kind, slots), **changes})

    @classmethod
    def help(cls, name: str) -> str:
        """The help text of one option."""
        return {f.name: f.metadata["help"] for f in fields(cls)}[RENAMED.get(name, name)]

    def replace(self, **changes: Any) -> CamelotConfig:
        values = {f.name: getattr(self, f.name) for f in fields(self)}
        for old, new in RENAMED.items():
            if old in changes:
                values.pop(new)
        values.update({name: "auto" for name in self._auto}, **changes)
        return CamelotConfig(**values)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _validate(cfg: CamelotConfig) -> None:
    check_int("window", cfg.window, low=1)
    check_int("slots", cfg.slots, low=1)
    if cfg.read_top_k is not None:
        check_int("read_top_k", cfg.read_top_k, low=1)
    check_int("recent", cfg.recent, low=0)
    check_int("sink", cfg.sink, low=0)
    if isinstance(cfg.threshold, bool) or not isinstance(cfg.threshold, (int, float)):
        raise ValueError(f"threshold must be a number in [-1, 1], got {cfg.threshold!r}")
    if not -1.0 <= float(cfg.threshold) <= 1.0:
        raise ValueError(f"threshold must be in [-1, 1] (a cosine similarity), got {cfg.threshold}")
    for f in fields(cfg):
        if f.metadata.get("choices"):
            _check_choice(f.name, getattr(cfg, f.name), f.metadata["choices"])
    if cfg.read_top_k is None and cfg.search not in EVERY_SLOT_SEARCH and cfg.strategy in ("camelot", "knn"):
        raise ValueError(f"read_top_k=None (read every slot) needs search='torch' or 'torch-bf16'; the "
                         f"{cfg.search} backend returns a top-k: give read_top_k (e.g. 8)")
    if cfg.strategy == "camelot" and cfg.read_top_k is not None and cfg.read_top_k > cfg.slots:
        raise ValueError(f"read_top_k ({cfg.read_top_k}) must not exceed slots ({cfg.slots}): a query cannot "
                         "read more slots than the memory has")
    if cfg.memory_distance is not None:
        check_int("memory_distance", cfg.memory_distance, low=0)
    _check_infllm(cfg)
    rule = rule_from_config(cfg)  # the write rule's options (evict, protect, ...) are checked there
    if cfg.strategy == "camelot" and cfg.surprise_from not in ("memory", "auto") and "surprise" not in rule.wanted:
        raise ValueError(f"surprise_from={cfg.surprise_from!r} changes only a write that ranks by surprise; this "
                         f"one ranks by {' and '.join(rule.wanted) or 'nothing'} (importance={cfg.importance!r}, evict="
                         f"{cfg.evict!r}, span_reserve={cfg.span_reserve}): give importance='surprise' with "
                         "evict='use' or a span reserve, or leave surprise_from='auto'")
    if cfg.surprise_reach is not None:
        check_int("surprise_reach", cfg.surprise_reach, low=1)
        if cfg.surprise_from not in ("logit", "auto") and cfg.surprise_reach != CamelotConfig.surprise_reach:
            raise ValueError(f"surprise_reach widens the logit credit; surprise_from={cfg.surprise_from!r} has none: "
                             "give surprise_from='logit' or 'auto'")
    _check_count_bias(cfg)
    _check_layers(cfg)


def _resolve_auto_read(cfg: CamelotConfig, given: set[str]) -> None:
    """read_top_k='auto' -> a concrete read (measured: docs/results_log.md, 'Fast by default'). A small bank is
    read whole; a large one, or a backend that only answers top-k, by the grouped top-k."""
    big = type(cfg.slots) is int and cfg.slots > AUTO_EVERY_SLOT_MAX  # a bad `slots`: validate() says so
    fast = cfg.strategy == "camelot" and (big or cfg.search not in EVERY_SLOT_SEARCH)
    if cfg.strategy == "knn" and cfg.search not in EVERY_SLOT_SEARCH:
        fast = True
    if not fast:
        object.__setattr__(cfg, "read_top_k", None)
        return
    object.__setattr__(cfg, "read_top_k", AUTO_TOP_K)
    if "retrieve" not in given:
        object.__setattr__(cfg, "retrieve", "group")
    if "search" not in given:
        object.__setattr__(cfg, "search", "torch-bf16")


def fast_bfloat16() -> bool:
    """Whether this CPU has AMX tiles: there an every-slot read in bfloat16 costs a fraction of fp32
    and measured the same perplexity (docs/speed.md). With AVX512-BF16 alone (AMD EPYC) the fused
    bfloat16 read measured no faster than fp32 (0.99-1.08x its time), and without either bfloat16
    is emulated and slower, so the exact fp32 read is the default there."""
    cpu = getattr(torch, "cpu", None)
    return bool(getattr(cpu, "_is_amx_tile_supported", lambda: False)())


def _check_layers(cfg: CamelotConfig) -> None:
    """layers: None, 'all', or a non-empty list of layer indices (normalised sorted, unique)."""
    if cfg.layers is None or cfg.layers == "all":
        return
    if not isinstance(cfg.layers, (list, tuple)) or not cfg.layers:
        raise ValueError(f"layers must be None, 'all' or a non-empty list of ints, got {cfg.layers!r}")
    for i in cfg.layers:
        check_int("layers[]", i, low=0)
    object.__setattr__(cfg, "layers", sorted(set(int(i) for i in cfg.layers)))


def _check_count_bias(cfg: CamelotConfig) -> None:
    """count_bias and count_cap as floats, or ValueError."""
    # A truthy string ("no") would silently switch the bias on: demand a real number or bool.
    if not isinstance(cfg.count_bias, (bool, int, float)) or not 0 <= cfg.count_bias <= 4:
        raise ValueError(f"count_bias must be a number in [0, 4] or True/False (1/0), got {cfg.count_bias!r}")
    object.__setattr__(cfg, "count_bias", float(cfg.count_bias))
    if cfg.count_cap is not None:
        if isinstance(cfg.count_cap, bool) or not isinstance(cfg.count_cap, (int, float)) \
                or not 1 <= cfg.count_cap < float("inf"):
            raise ValueError(f"count_cap must be None or a number >= 1, got {cfg.count_cap!r}")
        object.__setattr__(cfg, "count_cap", float(cfg.count_cap))


def _check_infllm(cfg: CamelotConfig) -> None:
    check_int("block_size", cfg.block_size, low=1)
    check_int("repr_topk", cfg.repr_topk, low=1)
    if cfg.strategy != "infllm":
        return
    if cfg.slots % cfg.block_size:
        raise ValueError(f"infllm reads whole blocks: slots ({cfg.slots}) must be a multiple of block_size "
                         f"({cfg.block_size}), e.g. {max(1, cfg.slots // cfg.block_size) * cfg.block_size}")
    if cfg.repr_topk > cfg.block_size:
        raise ValueError(f"repr_topk ({cfg.repr_topk}) must not exceed block_size ({cfg.block_size})")
    if cfg.placement != "fixed":
        raise ValueError("infllm places every memory key at one fixed distance: placement must be 'fixed'")


def _check_choice(name: str, value: Any, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ValueError(f"{name} must be one of {', '.join(allowed)}; got {value!r}")
