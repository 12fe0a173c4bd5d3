"""The one place where a camelot run is configured and validated."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from typing import Any

from camelot.search import BACKENDS

STRATEGIES = ("window", "recurrent", "sliding", "knn", "camelot")
WRITE_MODES = ("segment", "token")
MEMORY_DTYPES = ("float32", "bfloat16", "float16")
PLACEMENTS = ("fixed", "recency")
RETRIEVALS = ("query", "group", "key")


@dataclass
class CamelotConfig:
    """How the memory beside a frozen model behaves.

    Defaults are the best measured on SmolLM2 (README, "Perplexity"); `paper()` gives the
    paper's setting (no raw tail, no sinks, top-1 read, no count bias).

    window: tokens per segment (the local attention span).
    slots: consolidated memory slots per layer and KV head (camelot); cached raw tokens for `sliding`.
    recent: raw tokens kept right before the segment (camelot, knn): a token reaches memory when it
        leaves this tail, so the nearest context stays exact and only older context is consolidated.
    sink: the document's first tokens, kept raw for good and placed right before the raw tail
        (recurrent, sliding, knn, camelot): the attention sinks of StreamingLLM. A model trained on
        sequences that start at position 0 parks attention there; without them raw-KV baselines
        lose more than they gain.
    threshold: cosine similarity at or above which a token merges into its nearest slot.
    top_k: memory slots each query reads (1 is the paper's mode); None reads every slot (the
        exact dense read scores every slot anyway, so this costs no more than a small top_k).
    layers: indices of the layers that own memory; "all"; or None, the adapter's choice: every layer
        except where sliding-window and full layers interleave (gemma2/3), there only the full ones.
    strategy: camelot (consolidated slots), knn (keep every token), window (no memory),
        recurrent (previous segment's raw KV), sliding (raw KV of the last `slots` tokens).
    search: nearest-slot backend: "torch" (exact, default), "torch-bf16" (bfloat16 candidates,
        exact scores of the chosen; also picks each written token's nearest slot that way;
        fastest at 2048+ slots where the CPU has bf16 dot products), "faiss", "faiss-gpu",
        "faiss-ivf", "faiss-hnsw" (docs/speed.md).
    count_bias: add count_bias * max(0, log(count / mean count)) to a slot's attention logit, the
        mean over the head's used slots: slots that merged more tokens than average weigh more,
        a slot of one token weighs like a raw token. (The paper's absolute log(count) grows
        without bound: a 600k-token soak with it went from perplexity 16 to 29; without the clip
        at 0, a rare fact's count-1 slot sinks under the window: pass key at 4k 33% vs 100%.)
        0.7 is the measured default; 0 (False) is off.
    memory_distance: memory is presented `memory_distance` positions before the segment's first
        token (rotary models); None means right before the raw tail (window + recent).
    placement: where memory sits for rotary models. "fixed" (the paper): every slot at
        `memory_distance` positions before the segment. "recency": each slot at the position of
        its last write (age + 1 tokens before the segment), clamped to the model's range, so the
        model sees an order among slots like it sees one among raw tokens.
    retrieve: how a top_k read picks each token's slots. "query": per query head, the k slots
        with the highest attention logits (what its softmax would weigh most). "group": per KV
        head, the k slots with the highest sum of its G query heads' logits, shared by them: one
        search instead of G, for 0-1.6% perplexity against "query" where measured (README, "Speed
        and memory"). "key": the paper's rule, the k slots whose keys are nearest the token's own key
        (inner product, position-free), also one search per KV head; measurably worse on SmolLM2.
        Ignored when every slot is read.
    write_mode: "segment" matches a whole segment against memory at once (fast path);
        "token" writes token by token (the paper's sequential semantics, slow).
    memory_dtype: storage dtype of slot keys and values.
    """

    window: int = 128
    slots: int = 2048
    threshold: float = 0.95
    top_k: int | None = None
    layers: list[int] | str | None = None
    strategy: str = "camelot"
    search: str = "torch"
    count_bias: float = 0.7
    memory_distance: int | None = None
    placement: str = "fixed"
    retrieve: str = "query"
    write_mode: str = "segment"
    recent: int = 128
    sink: int = 4
    memory_dtype: str = "float32"
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        _check_int("window", self.window, low=1)
        _check_int("slots", self.slots, low=1)
        if self.top_k is not None:
            _check_int("top_k", self.top_k, low=1)
        _check_int("recent", self.recent, low=0)
        _check_int("sink", self.sink, low=0)
        if isinstance(self.threshold, bool) or not isinstance(self.threshold, (int, float)):
            raise ValueError(f"threshold must be a number in [-1, 1], got {self.threshold!r}")
        if not -1.0 <= float(self.threshold) <= 1.0:
            raise ValueError(
                f"threshold must be in [-1, 1] (a cosine similarity), got {self.threshold}"
            )
        if self.top_k is None and self.search != "torch" and self.strategy in ("camelot", "knn"):
            raise ValueError(f"top_k=None (read every slot) needs search='torch'; the {self.search} backend "
                             "returns a top-k: give top_k (e.g. 8)")
        if self.strategy == "camelot" and self.top_k is not None and self.top_k > self.slots:
            raise ValueError(
                f"top_k ({self.top_k}) must not exceed slots ({self.slots}): a query cannot "
                "read more slots than the memory has"
            )
        _check_choice("strategy", self.strategy, STRATEGIES)
        _check_choice("search", self.search, BACKENDS)
        _check_choice("write_mode", self.write_mode, WRITE_MODES)
        _check_choice("placement", self.placement, PLACEMENTS)
        _check_choice("retrieve", self.retrieve, RETRIEVALS)
        _check_choice("memory_dtype", self.memory_dtype, MEMORY_DTYPES)
        if self.memory_distance is not None:
            _check_int("memory_distance", self.memory_distance, low=0)
        # A truthy string ("no") would silently switch the bias on: demand a real bool.
        if not isinstance(self.count_bias, (bool, int, float)) or not 0 <= self.count_bias <= 4:
            raise ValueError(f"count_bias must be a number in [0, 4] or True/False (1/0), got {self.count_bias!r}")
        self.count_bias = float(self.count_bias)
        if not isinstance(self.extra, dict):
            raise ValueError(f"extra must be a dict, got {type(self.extra).__name__}")
        if self.layers is not None and self.layers != "all":
            if not isinstance(self.layers, (list, tuple)) or not self.layers:
                raise ValueError(f"layers must be None, 'all' or a non-empty list of ints, got {self.layers!r}")
            for i in self.layers:
                _check_int("layers[]", i, low=0)
            self.layers = sorted(set(int(i) for i in self.layers))

    @property
    def distance(self) -> int:
        return self.window + self.recent if self.memory_distance is None else self.memory_distance

    @classmethod
    def paper(cls, **changes: Any) -> CamelotConfig:
        """The CAMELoT paper's setting: consolidated slots alone, a top-1 read of the slot nearest
        each token's key, fixed placement."""
        return cls(**{"recent": 0, "sink": 0, "top_k": 1, "retrieve": "key", "count_bias": False,
                      "placement": "fixed", **changes})

    def replace(self, **changes: Any) -> CamelotConfig:
        values = {f.name: getattr(self, f.name) for f in fields(self)}
        values.update(changes)
        return CamelotConfig(**values)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _check_int(name: str, value: Any, low: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")
    if value < low:
        raise ValueError(f"{name} must be an integer >= {low}, got {value}")


def _check_choice(name: str, value: Any, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ValueError(f"{name} must be one of {', '.join(allowed)}; got {value!r}")
