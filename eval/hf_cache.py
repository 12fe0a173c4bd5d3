"""The plain model's own KV cache, for the baselines that run without camelot (`full` perplexity,
pass keys, decoding speed): one place for what differs between transformers releases."""

from __future__ import annotations

import inspect
from typing import Any

import torch


def cache_kwarg(model: torch.nn.Module) -> str:
    """transformers renamed `past_key_values` to `cache` (the old name warns from 5.2x on): the
    name this release's forward takes."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def new_cache(model: torch.nn.Module) -> Any:
    """An empty DynamicCache laid out for the model (sliding-window layers where it has them)."""
    from transformers import DynamicCache

    try:
        return DynamicCache(config=model.config)
    except TypeError:  # transformers 4.x
        return DynamicCache()
