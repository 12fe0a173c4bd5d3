"""Rotary families: keys are stored with their rotation taken off and put back at their placement
when read. The base Adapter already reads `rotary_emb` (including gemma3's per-layer-type
frequencies and partial rotary); here only the families that differ from it."""

from __future__ import annotations

import torch
from camelot.adapters.base import Adapter, UnsupportedModelError
from torch import nn

from camelot.rope import RopeSpec


class RotaryAdapter(Adapter):
    """Rotate-half RoPE on the whole head or its leading part (llama and most descendants)."""

    model_types = ("llama", "mistral", "mixtral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text", "phi3",
                   "starcoder2", "olmo", "olmo2", "granite")
    memory = "keys stored un-rotated; memory re-rotated at its placement (recency: last-write position)"


class NoPERotaryAdapter(RotaryAdapter):
    """SmolLM3: some layers skip RoPE (`no_rope_layers[i] == 0`); their keys carry no position
    and are stored and read as they are."""

    model_types = ("smollm3",)
    memory = "rotary layers as llama; NoPE layers store keys as they come"

    def rope_spec(self, model: nn.Module, layer_idx: int) -> RopeSpec | None:
        flags = getattr(self.text_config(model), "no_rope_layers", None)
        if flags is not None and not flags[layer_idx]:
            return None
        return super().rope_spec(model, layer_idx)


class PartialRotaryAdapter(RotaryAdapter):
    """RoPE on the first `partial_rotary_factor * head_dim` dims only; the rest carry no position
    and are stored and read as they are."""

    model_types = ("gpt_neox", "phi", "stablelm")
    memory = "rotated dims un-rotated and re-placed; the pass-through dims stored as they are"


class InterleavedRotaryAdapter(RotaryAdapter):
    """Cohere: RoPE pairs dims (2i, 2i+1) instead of (i, i + d/2)."""

    model_types = ("cohere",)
    interleaved_rotary = True


class GPTJAdapter(Adapter):
    """GPT-J / CodeGen: interleaved partial RoPE from a fixed sin/cos table instead of a module with
    `inv_freq`; the frequencies are rebuilt exactly as `create_sinusoidal_positions` does."""

    model_types = ("gptj", "codegen")
    interleaved_rotary = True
    memory = RotaryAdapter.memory

    def rotary_spec(self, model: nn.Module, layer_idx: int) -> RopeSpec:
        cfg = self.text_config(model)
        dim = getattr(cfg, "rotary_dim", None)
        if not dim:
            raise UnsupportedModelError(f"{cfg.model_type}: config.rotary_dim is not set; camelot needs it")
        inv = 1.0 / (10000 ** (torch.arange(0, dim, 2, dtype=torch.int64) / dim))
        return RopeSpec(inv_freq=inv.float(), interleaved=True)
