"""The user's entry point: `wrap(model, config)` returns a CamelotModel that reads input in
segments of `window` tokens, with each memory layer reading and consolidating its memory."""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
from torch import nn

from camelot import attention
from camelot.adapters import get_adapter
from camelot.adapters.base import Adapter, param_device
from camelot.config import CamelotConfig
from camelot.guards import as_batch, check_state_devices, check_step_ids
from camelot.interfaces import SearchBackend, require
from camelot.layers import build_runtime, memory_layers
from camelot.masks import MaskCache
from camelot.ownership import check_owner, exclusive
from camelot.progress import progress_bar
from camelot.question import capture_question, check_question_set
from camelot.reads import ReadAttribution
from camelot.surprise import SurpriseFeed


@dataclass
class ScoreOutput:
    token_nll: torch.Tensor  # [B, N-1]: NLL of token t+1 given tokens <= t
    seconds: float
    segments: int

    @property
    def n_tokens(self) -> int:
        return self.token_nll.numel()

    @property
    def nll(self) -> float:
        return float(self.token_nll.double().mean()) if self.n_tokens else float("nan")

    @property
    def perplexity(self) -> float:
        return math.exp(self.nll) if self.n_tokens else float("nan")

    @property
    def tokens_per_second(self) -> float:
        return (self.token_nll.shape[-1] + 1) * self.token_nll.shape[0] / max(self.seconds, 1e-9)


class CamelotModel:
    """A frozen HF causal LM with a consolidated associative memory beside it."""

    def __init__(self, model: nn.Module, config: CamelotConfig, adapter: Adapter) -> None:
        self._lock, self._unwrapped = threading.RLock(), False  # camelot/ownership.py
        self.model, self.config, self.adapter = model, config, adapter
        self.max_positions = adapter.max_positions(model)
        if self.max_positions is not None and config.window > self.max_positions:
            raise ValueError(f"window ({config.window}) exceeds the model's position range ({self.max_positions})")
        self.modules = modules = adapter.attention_modules(model)
        layers = memory_layers(adapter, model, config, len(modules))
        self.masks = MaskCache()  # causal masks by segment geometry, shared by this wrapper's layers
        self.runtimes = [build_runtime(adapter, model, config, m.layer_idx, m.layer_idx in layers, self.masks,
                                       self.max_positions) for m in modules]
        self.surprise = SurpriseFeed.built(model, modules, config.surprise_from, self.runtimes, config.surprise_reach)
        attention.register()
        self._previous_impl = model.config._attn_implementation
        for m, rt in zip(modules, self.runtimes):
            m._camelot_runtime = rt
        if adapter.hook == "registry":  # falcon, bloom: swapped forwards, and their ALiBi needs HF's own mask
            model.set_attn_implementation(attention.ATTN_NAME)
        model.eval()
        model._camelot_wrapper = self

    # ------------------------------------------------------------------ lifecycle
    @exclusive
    def reset(self) -> None:
        """Forget everything: memory, prefixes and the open segment."""
        for rt in self.runtimes:
            rt.reset()
        self.surprise.reset()

    @exclusive
    def unwrap(self) -> nn.Module:
        """Detach camelot and give the model back as it was: attention implementation, swapped
        forwards (falcon, bloom) and cached masks included."""
        for m in self.modules:
            if hasattr(m, "_camelot_runtime"):
                del m._camelot_runtime
        self.model.set_attn_implementation(self._previous_impl)
        self.adapter.restore(self.model)
        self.masks.clear()
        if getattr(self.model, "_camelot_wrapper", None) is self:
            del self.model._camelot_wrapper
        self._unwrapped = True  # every later call raises (camelot/ownership.py)
        return self.model

    def __enter__(self) -> CamelotModel:
        return self

    def __exit__(self, *exc) -> None:
        """`with camelot.wrap(model) as cm:` gives the model back unwrapped at the end."""
        if not self._unwrapped:
            self.unwrap()

    # ------------------------------------------------------------------ public hooks (eval uses only these)
    def replace_search(self, make: Callable[[SearchBackend], SearchBackend]) -> None:
        """Swap every layer's search backend for `make(old)` (e.g. a probe that records recall)."""
        for rt in self.runtimes:
            rt.search = require(make(rt.search), SearchBackend, "search backend")

    def record_reads(self, on: bool = True) -> None:
        """Keep, per layer, which memory entries each query read and with what weight
        (`last_reads()`): retrieval attribution, e.g. to cite sources."""
        for rt in self.runtimes:
            rt.record_reads, rt.last_read = on, None

    def last_reads(self) -> dict[int, ReadAttribution]:
        """layer index -> what the last forward read (see `record_reads`)."""
        return {rt.layer_idx: rt.last_read for rt in self.runtimes if rt.last_read is not None}

    @property
    def device(self) -> torch.device:
        return param_device(self.model)

    @property
    def open_len(self) -> int:
        """Tokens in the open (not yet consolidated) segment."""
        return self.runtimes[0].state.local_len

    @property
    def memory(self):
        from camelot.snapshot import MemoryView

        check_owner(self)
        return MemoryView(self)

    # ------------------------------------------------------------------ core step
    @exclusive
    @torch.no_grad()
    def step(self, ids: torch.Tensor) -> torch.Tensor:
        """Run ids [B, m] (m <= room left in the open segment); returns logits [B, m, V].
        When the segment fills up it is closed and written to memory."""
        check_state_devices(self.modules, self.runtimes)
        check_step_ids(ids, self.model.get_input_embeddings().num_embeddings)
        check_question_set(self.runtimes)
        b, m = ids.shape
        start = self.open_len
        room = self.config.window - start
        if m > room:
            raise ValueError(f"step got {m} tokens but the open segment has room for {room}")
        pos = torch.arange(start, start + m, device=ids.device).expand(b, m)
        # An explicit all-ones mask: without one, HF inspects position_ids for packed sequences,
        # a device-to-host sync every segment. camelot's mask function ignores it anyway.
        mask = torch.ones(b, m, dtype=torch.long, device=ids.device)
        logits = self.surprise.run(self.runtimes, ids, lambda: self.model(
            input_ids=ids, position_ids=pos, attention_mask=mask, use_cache=False).logits)
        if start + m == self.config.window:
            self.flush()
        return logits

    @exclusive
    def flush(self) -> None:
        """Close the open segment now (write it to memory)."""
        for rt in self.runtimes:
            rt.flush()

    def segments(self, n: int) -> Iterator[tuple[int, int]]:
        """Spans that fill the open segment exactly to its boundary, so segmentation is the same
        whether a document arrives at once or in pieces."""
        a = 0
        room = self.config.window - self.open_len
        while a < n:
            e = min(n, a + room)
            yield a, e
            a = e
            room = self.config.window

    # ------------------------------------------------------------------ public API
    @exclusive
    @torch.no_grad()
    def score(self, ids: torch.Tensor | list[int], keep_memory: bool = False,
              progress: bool = False, desc: str = "score") -> ScoreOutput:
        """Per-token NLL of a document of any length, read segment by segment with memory.

        Unless keep_memory, the memory is reset first so nothing from an earlier document leaks
        in. Token t+1 is always predicted from tokens <= t only (memory is written after a
        segment's forward and read by later segments)."""
        ids = self._as_batch(ids)
        if not keep_memory:
            self.reset()
        b, n = ids.shape
        nll = torch.empty(b, max(n - 1, 0), dtype=torch.float32)
        t0 = time.perf_counter()
        spans = list(self.segments(n))
        for a, e in progress_bar(spans, desc=desc, enabled=progress, unit="seg"):
            logits = self.step(ids[:, a:e])
            tgt_end = min(e + 1, n)
            if tgt_end - (a + 1) <= 0:
                continue
            lg = logits[:, : tgt_end - a - 1].float()
            tgt = ids[:, a + 1 : tgt_end]
            lp = torch.log_softmax(lg, dim=-1).gather(-1, tgt[..., None])[..., 0]
            nll[:, a : tgt_end - 1] = -lp.cpu()
        return ScoreOutput(nll, time.perf_counter() - t0, len(spans))

    @property
    def ranks_by_question(self) -> bool:
        """The memory keeps what a question will look for: set_question() before reading."""
        return any(rt.state.tracks_question for rt in self.runtimes)

    @exclusive
    @torch.no_grad()
    def set_question(self, ids: torch.Tensor | list[int]) -> None:
        """The question the document will be asked, before it is read: with
        `CamelotConfig.recall("question")` the raw reserve keeps the tokens its queries attend to
        most (camelot/question.py). It changes nothing already in memory and lasts until reset()."""
        for rt, q in zip(self.runtimes, capture_question(self, self._as_batch(ids))):
            rt.state.question = q if rt.state.tracks_question else None

    @exclusive
    @torch.no_grad()
    def feed(self, ids: torch.Tensor | list[int], progress: bool = True, rank: bool = True) -> int:
        """Stream a document into memory (constant memory however long). The tail that does not
        fill a segment stays in the open window, right before whatever comes next. rank=False:
        scaffolding, not content (a chat template's opening, an instruction): a write that ranks
        by surprise counts none in these tokens, so its reserve keeps its places for the document.
        Returns the number of tokens fed."""
        ids = self._as_batch(ids)
        with self.surprise.ranking(rank):
            for a, e in progress_bar(list(self.segments(ids.shape[1])), desc="feed", enabled=progress, unit="seg"):
                self.step(ids[:, a:e])
        return ids.shape[1]

    @exclusive
    @torch.no_grad()
    def generate(self, *args, generation_config=None, **kwargs):
        """transformers' generate on the wrapped model, continuing after whatever is in memory and
        the open window: a GenerationConfig and/or its options as keywords, logits_processor,
        stopping_criteria, streamer, tokenizer (stop_strings), seed. Returns only the new tokens
        [B, <= max_new_tokens] (see camelot.generation.generate for return_dict_in_generate).

        Every returned token is stepped into the state like a fed one: beyond the window it is
        consolidated into memory, and afterwards the state equals that of feed(ids + new)."""
        from camelot.generation import generate

        return generate(self, *args, generation_config=generation_config, **kwargs)

    def _as_batch(self, ids: torch.Tensor | list[int]) -> torch.Tensor:
        return as_batch(ids, self.model.get_input_embeddings().num_embeddings, self.device)

def wrap(model: nn.Module, config: CamelotConfig | None = None, **overrides) -> CamelotModel:
    """Give a frozen HF causal LM a camelot memory. Fails before touching the model if its
    architecture has no adapter."""
    if getattr(model, "_camelot_wrapper", None) is not None:
        raise ValueError("this model is already wrapped by camelot; call .unwrap() on the old wrapper first")
    if config is None:
        config = CamelotConfig(**overrides)
    else:  # a checked copy: fields set after construction (cfg.window = 0) are validated here
        config = config.replace(**overrides)
    adapter = get_adapter(model)
    adapter.check(model)
    return CamelotModel(model, config, adapter)
