"""The user's entry point: `wrap(model, config)` returns a CamelotModel that reads input in
segments of `window` tokens, with each memory layer reading and consolidating its memory."""

from __future__ import annotations

import math
import threading
import time
from dataclasses import dataclass, field

import torch
from torch import nn

from camelot import attention
from camelot.adapters import get_adapter
from camelot.adapters.base import Adapter, param_device
from camelot.attention import LayerRuntime
from camelot.config import CamelotConfig
from camelot.guards import check_step_ids
from camelot.memory import RawWindow, SinkTokens, SlotBank, TokenStore
from camelot.ownership import check_owner, exclusive
from camelot.progress import progress_bar
from camelot.search import make_backend

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class ScoreOutput:
    token_nll: torch.Tensor  # [B, N-1]: NLL of token t+1 given tokens <= t
    seconds: float
    segments: int
    extra: dict = field(default_factory=dict)

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
        self.model = model
        self.config = config
        self.adapter = adapter
        self.max_positions = adapter.max_positions(model)
        if self.max_positions is not None and config.window > self.max_positions:
            raise ValueError(
                f"window ({config.window}) exceeds the model's position range ({self.max_positions})")
        modules = adapter.attention_modules(model)
        n_layers = len(modules)
        # No layers named: the adapter's choice (gemma2/3: only the full-attention layers).
        if config.layers is None:
            layers = set(adapter.default_memory_layers(model))
        else:
            layers = set(range(n_layers)) if config.layers == "all" else set(config.layers)
        bad = sorted(i for i in layers if i >= n_layers)
        if bad:
            raise ValueError(
                f"layers {bad} do not exist: the model has {n_layers} attention layers (0..{n_layers - 1})")
        self.modules = modules
        self.runtimes = [self._runtime(model, m.layer_idx, m.layer_idx in layers) for m in modules]
        attention.register()
        self._previous_impl = model.config._attn_implementation
        for m, rt in zip(modules, self.runtimes):
            m._camelot_runtime = rt
        model.set_attn_implementation(attention.ATTN_NAME)
        model.eval()
        model._camelot_wrapper = self

    def _runtime(self, model: nn.Module, layer_idx: int, with_memory: bool) -> LayerRuntime:
        """One layer's state. Memory (slots or token store) only where `with_memory`; raw context
        (the recent tail, the recurrent / sliding prefix, sinks) on every layer: it is exact,
        and a sliding-window layer masks it by its own window as it would the original tokens."""
        cfg = self.config
        dtype = _DTYPES[cfg.memory_dtype]
        memory = prefix = sink = None
        search = make_backend(cfg.search)
        if with_memory and cfg.strategy == "camelot":
            # the write's nearest-slot search scores like the read's backend does
            memory = SlotBank(cfg.slots, cfg.threshold, dtype, cfg.write_mode,
                              getattr(search, "score_dtype", torch.float32))
        elif with_memory and cfg.strategy == "knn":
            memory = TokenStore(dtype)
        raw_len = {"recurrent": cfg.window, "sliding": cfg.slots}.get(cfg.strategy, cfg.recent)
        if raw_len and cfg.strategy != "window":
            prefix = RawWindow(raw_len)
        if cfg.sink and cfg.strategy != "window":
            sink = SinkTokens(cfg.sink)
        return LayerRuntime(
            layer_idx=layer_idx, rope=self.adapter.rope_spec(model, layer_idx), memory=memory, prefix=prefix,
            sink=sink, search=search, top_k=cfg.top_k,
            distance=cfg.distance, count_bias=cfg.count_bias, placement=cfg.placement,
            retrieve=cfg.retrieve,
            max_distance=None if self.max_positions is None else self.max_positions - cfg.window)

    # ------------------------------------------------------------------ lifecycle
    @exclusive
    def reset(self) -> None:
        """Forget everything: memory, prefixes and the open segment."""
        for rt in self.runtimes:
            rt.reset()

    @exclusive
    def unwrap(self) -> nn.Module:
        """Detach camelot and give the model back as it was."""
        for m in self.modules:
            if hasattr(m, "_camelot_runtime"):
                del m._camelot_runtime
        self.model.set_attn_implementation(self._previous_impl)
        if getattr(self.model, "_camelot_wrapper", None) is self:
            del self.model._camelot_wrapper
        self._unwrapped = True  # every later call raises (camelot/ownership.py)
        return self.model

    @property
    def device(self) -> torch.device:
        return param_device(self.model)

    @property
    def open_len(self) -> int:
        """Tokens in the open (not yet consolidated) segment."""
        return self.runtimes[0].local_len

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
        self._check_state_devices()
        check_step_ids(ids, self.model.get_input_embeddings().num_embeddings)
        b, m = ids.shape
        start = self.open_len
        room = self.config.window - start
        if m > room:
            raise ValueError(f"step got {m} tokens but the open segment has room for {room}")
        pos = torch.arange(start, start + m, device=ids.device).expand(b, m)
        # An explicit all-ones mask: without one, HF inspects position_ids for packed sequences,
        # a device-to-host sync every segment. camelot's mask function ignores it anyway.
        mask = torch.ones(b, m, dtype=torch.long, device=ids.device)
        out = self.model(input_ids=ids, position_ids=pos, attention_mask=mask, use_cache=False)
        if start + m == self.config.window:
            self.flush()
        return out.logits

    def _check_state_devices(self) -> None:
        """Memory stays on the device its layer had when it was written. A model moved since
        (`model.to(...)`) would meet it deep inside torch with a device-mismatch error, so refuse
        here, naming both devices. One attribute check per layer and step: cheap."""
        for m, rt in zip(self.modules, self.runtimes):
            held = _held_device(rt)
            if held is None:
                continue
            p = next(m.parameters(), None)
            if p is not None and p.device != held:
                raise ValueError(
                    f"layer {rt.layer_idx}: camelot memory is on {held} but the model's layer is now on {p.device}; "
                    "move the model back, or call reset() (the memory is lost) to use the new device")

    @exclusive
    def flush(self) -> None:
        """Close the open segment now (write it to memory)."""
        for rt in self.runtimes:
            rt.flush()

    def _chunks(self, n: int):
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
        spans = list(self._chunks(n))
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

    @exclusive
    @torch.no_grad()
    def feed(self, ids: torch.Tensor | list[int], progress: bool = True) -> int:
        """Stream a document into memory (constant memory however long). The tail that does not
        fill a segment stays in the open window, right before whatever comes next.
        Returns the number of tokens fed."""
        ids = self._as_batch(ids)
        spans = list(self._chunks(ids.shape[1]))
        for a, e in progress_bar(spans, desc="feed", enabled=progress, unit="seg"):
            self.step(ids[:, a:e])
        return ids.shape[1]

    @exclusive
    @torch.no_grad()
    def generate(self, ids: torch.Tensor | list[int], max_new_tokens: int = 32, do_sample: bool = False,
                 temperature: float = 1.0, top_p: float = 1.0, top_k: int = 0, repetition_penalty: float = 1.0,
                 eos_token_id: int | list[int] | None = None, pad_token_id: int | None = None,
                 stopping_criteria=None, stop_strings: list[str] | None = None, tokenizer=None,
                 seed: int | None = None, streamer=None) -> torch.Tensor:
        """Continue after whatever is in memory and the open window, HF-style arguments (see
        camelot.generation.generate). Returns only the new tokens [B, <= max_new_tokens].

        Every returned token is stepped into the state like a fed one: beyond the window it is
        consolidated into memory, and afterwards the state equals that of feed(ids + new)."""
        from camelot.generation import generate

        return generate(self, self._as_batch(ids), max_new_tokens=max_new_tokens, do_sample=do_sample,
                        temperature=temperature, top_p=top_p, top_k=top_k, repetition_penalty=repetition_penalty,
                        eos_token_id=eos_token_id, pad_token_id=pad_token_id, stopping_criteria=stopping_criteria,
                        stop_strings=stop_strings, tokenizer=tokenizer, seed=seed, streamer=streamer)

    def _as_batch(self, ids: torch.Tensor | list[int]) -> torch.Tensor:
        if isinstance(ids, (list, tuple)):
            # No dtype here: floats must reach the integer check below, not be truncated silently.
            ids = torch.tensor(ids)
            if ids.numel() == 0:
                ids = ids.long()
        if not isinstance(ids, torch.Tensor):
            raise TypeError(f"token ids must be a tensor or a list of ints, got {type(ids).__name__}")
        if ids.dtype not in (torch.long, torch.int32, torch.int64):
            raise TypeError(f"token ids must be integers, got {ids.dtype}")
        if ids.dim() == 1:
            ids = ids[None]
        if ids.dim() != 2:
            raise ValueError(f"token ids must be [N] or [batch, N], got shape {tuple(ids.shape)}")
        if ids.shape[1] == 0:
            raise ValueError("empty input: no tokens to read")
        if ids.device.type == "meta":  # holds no values: range checks and copies would fail inside torch
            raise ValueError("token ids are on the meta device and hold no values; give them on cpu or the "
                             "model's device")
        vocab = self.model.get_input_embeddings().num_embeddings
        if int(ids.min()) < 0 or int(ids.max()) >= vocab:
            raise ValueError(f"token ids must lie in [0, {vocab}); got range [{int(ids.min())}, {int(ids.max())}]")
        dev = self.device
        if ids.device != dev:
            ids = ids.to(dev)
        return ids.long()


def _held_device(rt: LayerRuntime) -> torch.device | None:
    """Device of the first state tensor a layer holds (open segment, memory or prefix), if any."""
    for t in (rt.local_k, getattr(rt.memory, "keys", None), getattr(rt.prefix, "keys", None)):
        if isinstance(t, torch.Tensor):
            return t.device
    return None


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
