"""What an adapter provides, with defaults that fit most rotary decoder models in transformers."""

from __future__ import annotations

import torch
from torch import nn

from camelot.rope import RopeSpec


class UnsupportedModelError(ValueError):
    """The model cannot be wrapped; raised before the model is touched."""


class Adapter:
    """Defaults for rotary models whose decoder layers hold `self_attn` modules with `layer_idx`,
    and whose base model carries one `rotary_emb` with `inv_freq` and `attention_scaling`.

    Class attributes describe the family for users and for the compatibility table
    (scripts/compat_table.py reads them, so the table cannot drift from the code):
    positions: how positions enter attention (rotary | absolute | alibi).
    hook: "registry" when transformers calls camelot through `AttentionInterface`; "forward" when
        the family's attention never consults the registry and the adapter swaps the attention
        modules' forward instead (see `prepare`).
    memory: what memory does in this family, one line.
    """

    model_types: tuple[str, ...] = ()
    positions: str = "rotary"
    hook: str = "registry"
    memory: str = "keys stored un-rotated, re-rotated at their placement when read"
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

    def positions_of(self, model: nn.Module) -> str:
        """How positions enter attention in this model (a family may vary by config: falcon)."""
        return self.positions

    def rope_spec(self, model: nn.Module, layer_idx: int) -> RopeSpec | None:
        """The layer's rotary embedding, or None where keys carry no rotation to take off."""
        if self.positions_of(model) != "rotary":
            return None
        return self.rotary_spec(model, layer_idx)

    def rotary_spec(self, model: nn.Module, layer_idx: int) -> RopeSpec:
        rot = self.rotary_module(model)
        layer_type = self.layer_type(model, layer_idx)
        if layer_type is not None and hasattr(rot, f"{layer_type}_inv_freq"):
            # Per-layer rope (gemma3: sliding layers and full layers use different bases).
            inv = getattr(rot, f"{layer_type}_inv_freq")
            scale = getattr(rot, f"{layer_type}_attention_scaling", 1.0)
        else:
            inv, scale = rot.inv_freq, getattr(rot, "attention_scaling", 1.0)
        return RopeSpec(inv_freq=inv.detach().float().clone(), scaling=float(scale),
                        interleaved=self.interleaved_rotary)

    interleaved_rotary: bool = False  # gptj/cohere pair dims (2i, 2i+1); llama pairs (i, i + d/2)

    def layer_type(self, model: nn.Module, layer_idx: int) -> str | None:
        types = getattr(self.text_config(model), "layer_types", None)
        return types[layer_idx] if types else None

    def default_memory_layers(self, model: nn.Module) -> list[int]:
        """Layers that should own memory when the user names none (`CamelotConfig.layers=None`).

        Where a model interleaves sliding-window and full layers (gemma2/3), only the full layers:
        sliding layers were trained never to see past their window, and on Gemma-3 270M memory in
        them wrecks perplexity (855 vs 53 window-only) while memory in the 3 full layers gives 18.9
        (docs/compatibility.md). Where every layer slides (mistral, starcoder2) or none does, all."""
        n = len(self.attention_modules(model))
        sliding = set(self.sliding_layers(model))
        if sliding and len(sliding) < n:
            return [i for i in range(n) if i not in sliding]
        return list(range(n))

    def sliding_layers(self, model: nn.Module) -> list[int]:
        """Layers whose attention is limited to a sliding window."""
        cfg = self.text_config(model)
        types = getattr(cfg, "layer_types", None)
        n = len(self.attention_modules(model))
        if types:
            return [i for i, t in enumerate(types[:n]) if t == "sliding_attention"]
        return list(range(n)) if getattr(cfg, "sliding_window", None) else []

    def check(self, model: nn.Module) -> None:
        """Raise UnsupportedModelError for configurations this adapter cannot serve; then make the
        model ready (`prepare`). Nothing is changed unless every check passed."""
        mods = self.attention_modules(model)
        for m in mods:
            self.rope_spec(model, m.layer_idx)
        self.prepare(model)

    def prepare(self, model: nn.Module) -> None:
        """Install what the attention registry cannot do for this family. Registry families need
        nothing. Must be idempotent and must leave the model's behaviour unchanged while no
        camelot runtime is attached."""

    def restore(self, model: nn.Module) -> None:
        """Undo `prepare` (called on unwrap where the wrapper supports it)."""


def _is_attention(m: nn.Module) -> bool:
    name = type(m).__name__
    return name.endswith("Attention") or name.endswith("SelfAttention")


def _has_layer_type_freqs(mod: nn.Module) -> bool:
    return any(n.endswith("_inv_freq") for n, _ in mod.named_buffers(recurse=False))


def param_device(module: nn.Module) -> torch.device:
    for p in module.parameters():
        return p.device
    return torch.device("cpu")
