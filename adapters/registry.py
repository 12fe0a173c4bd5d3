"""model_type -> adapter. Add a family by registering an Adapter subclass."""

from __future__ import annotations

from camelot.adapters.base import Adapter, UnsupportedModelError
from torch import nn

_REGISTRY: dict[str, Adapter] = {}


def register_adapter(adapter: Adapter) -> Adapter:
    for t in adapter.model_types:
        _REGISTRY[t] = adapter
    return adapter


def supported_model_types() -> list[str]:
    _load_builtin()
    return sorted(_REGISTRY)


def get_adapter(model: nn.Module) -> Adapter:
    _load_builtin()
    cfg = getattr(model, "config", None)
    model_type = getattr(cfg, "model_type", None)
    if model_type is None:
        raise UnsupportedModelError(
            f"{type(model).__name__} has no config.model_type; camelot wraps HF causal LMs. "
            f"Supported model types: {', '.join(supported_model_types())}")
    adapter = _REGISTRY.get(model_type)
    if adapter is None:
        raise UnsupportedModelError(
            f"model type {model_type!r} has no camelot adapter. "
            f"Supported model types: {', '.join(supported_model_types())}")
    if not hasattr(model, "lm_head") and not hasattr(model, "get_output_embeddings"):
        raise UnsupportedModelError(f"{type(model).__name__} is not a causal LM (no output head)")
    return adapter


def _load_builtin() -> None:
    if _REGISTRY:
        return
    from camelot.adapters.families import FAMILY_ADAPTERS

    for adapter in FAMILY_ADAPTERS:
        register_adapter(adapter)
