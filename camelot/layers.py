"""Which layers own memory, and the runtime each attention layer gets for a config: the memory
kind of its strategy, the raw context, the search backend and the read rule."""

from __future__ import annotations

import torch
from torch import nn

from camelot.adapters.base import Adapter
from camelot.attention import LayerRuntime
from camelot.backends import make_backend
from camelot.config import CamelotConfig
from camelot.interfaces import Memory, SearchBackend, require
from camelot.masks import MaskCache
from camelot.memory import RawWindow, SinkTokens, SlotBank, TokenStore
from camelot.memory.rules import rule_from_config
from camelot.reads.blocks import infllm_parts

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def memory_layers(adapter: Adapter, model: nn.Module, config: CamelotConfig, n_layers: int) -> set[int]:
    """Layer indices that own memory; no layers named: the adapter's choice (gemma2/3: only the
    full-attention layers)."""
    if config.layers is None:
        layers = set(adapter.default_memory_layers(model))
    else:
        layers = set(range(n_layers)) if config.layers == "all" else set(config.layers)
    bad = sorted(i for i in layers if i >= n_layers)
    if bad:
        raise ValueError(f"layers {bad} do not exist: the model has {n_layers} attention layers (0..{n_layers - 1})")
    return layers


def build_runtime(adapter: Adapter, model: nn.Module, config: CamelotConfig, layer_idx: int, with_memory: bool,
                  masks: MaskCache, max_positions: int | None) -> LayerRuntime:
    """One layer's runtime. Memory only where `with_memory`; raw context (the recent tail, the
    recurrent / sliding prefix, sinks) on every layer: it is exact, and a sliding-window layer
    masks it by its own window as it would the original tokens."""
    cfg = config
    dtype = DTYPES[cfg.memory_dtype]
    memory = prefix = sink = read = None
    search = require(make_backend(cfg.search), SearchBackend, "search backend")
    if with_memory and cfg.strategy == "camelot":
        # the write's nearest-slot search scores like the read's backend does
        memory = SlotBank(cfg.slots, cfg.threshold, dtype, cfg.write_mode, search.score_dtype, rule_from_config(cfg))
    elif with_memory and cfg.strategy == "knn":
        memory = TokenStore(dtype)
    elif with_memory and cfg.strategy == "infllm":  # InfLLM's blocks and its block read
        memory, read = infllm_parts(cfg, search, dtype)
    if memory is not None:
        require(memory, Memory, "memory")
    raw_len = {"recurrent": cfg.window, "sliding": cfg.slots}.get(cfg.strategy, cfg.recent)
    if raw_len and cfg.strategy != "window":
        prefix = RawWindow(raw_len)
    if cfg.sink and cfg.strategy != "window":
        sink = SinkTokens(cfg.sink)
    return LayerRuntime.build(
        layer_idx=layer_idx, masks=masks, rope=adapter.rope_spec(model, layer_idx), memory=memory, prefix=prefix,
        sink=sink, search=search, top_k=cfg.read_top_k, distance=cfg.distance, count_bias=cfg.count_bias,
        count_mode=cfg.count_mode, count_cap=cfg.count_cap,
        placement=cfg.placement, retrieve=cfg.retrieve, read=read,
        max_distance=None if max_positions is None else max_positions - cfg.window)
