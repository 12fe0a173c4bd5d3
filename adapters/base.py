"""What an adapter provides, with defaults that fit most rotary decoder models in transformers."""

from __future__ import annotations

import torch
from torch import nn

from camelot.rope import RopeSpec


class UnsupportedModelError(ValueError):
    """The model cannot be wrapped; raised before the model is touched."""


class Adapter:
    """Defaults for rotary models whose decoder layers hold `self_attn` modules with `layer_idx`,
    and whose base model carries one `rotary_emb` with `inv_freq` and `attention_scaling`."""

    model_types: tuple[str, ...] = ()
    positions: str = "rotary"  # rotary | absolute | alibi
    notes: str = ""

    def text_config(self, model: nn.Module):
        cfg = model.config
        return cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg

    def attention_modules(self, model: nn.Module) -> list[nn.Module]:
        mods = [m for m in model.modules() if hasattr(m, "layer_idx") and _is_attention(m)]
        mods.sort(key=lambda m: m.layer_idx)
        if not mods:
            raise UnsupportedModelError(
                f"no attention modules with a layer index found in {type(model).__name__}")
        return mods

    def num_kv_heads(self, model: nn.Module) -> int:
        cfg = self.text_config(model)
        return getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads

    def max_positions(self, model: nn.Module) -> int | None:
        cfg = self.text_config(model)
        return getattr(cfg, "max_position_embeddings", None) or getattr(cfg, "n_positions", None)

    def rotary_module(self, model: nn.Module) -> nn.Module:
        for name, mod in model.named_modules():
            if name.endswith("rotary_emb") and (hasattr(mod, "inv_freq") or _has_layer_type_freqs(mod)):
                return mod
        raise UnsupportedModelError(f"{type(model).__name__}: no rotary embedding module found")

    def rope_spec(self, model: nn.Module, layer_idx: int) -> RopeSpec | None:
        if self.positions != "rotary":
            return None
        rot = self.rotary_module(model)
        layer_type = self.layer_type(model, layer_idx)
        if layer_type is not None and hasattr(rot, f"{layer_type}_inv_freq"):
            inv = getattr(rot, f"{layer_type}_inv_freq")
            scale = getattr(rot, f"{layer_type}_attention_scaling", 1.0)
        else:
            inv, scale = rot.inv_freq, getattr(rot, "attention_scaling", 1.0)
        return RopeSpec(inv_freq=inv.detach().float().clone(), scaling=float(scale))

    def layer_type(self, model: nn.Module, layer_idx: int) -> str | None:
        types = getattr(self.text_config(model), "layer_types", None)
        return types[layer_idx] if types else None

    def check(self, model: nn.Module) -> None:
        """Raise UnsupportedModelError for configurations this adapter cannot serve."""
        mods = self.attention_modules(model)
        for m in mods:
            self.rope_spec(model, m.layer_idx)


def _is_attention(m: nn.Module) -> bool:
    name = type(m).__name__
    return name.endswith("Attention") or name.endswith("SelfAttention")


def _has_layer_type_freqs(mod: nn.Module) -> bool:
    return any(n.endswith("_inv_freq") for n, _ in mod.named_buffers(recurse=False))


def param_device(module: nn.Module) -> torch.device:
    for p in module.parameters():
        return p.device
    return torch.device("cpu")
