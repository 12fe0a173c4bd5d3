"""Families whose attention never consults transformers' attention registry (falcon, bloom in
transformers 5.x compute attention inline, with ALiBi or rotary), so `attn_implementation`
cannot route them to camelot. Their adapters swap the attention modules' `forward` for one that
projects q/k/v with the module's own weights and hands them to the camelot runtime.

The swapped forward is an instance attribute that falls back to the original whenever no camelot
runtime is attached, so a model whose wrapper was unwrapped behaves exactly as before.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from camelot.adapters.alibi import Alibi, alibi_slopes
from camelot.adapters.base import Adapter
from torch import nn

_ORIGINAL = "_camelot_original_forward"


class ForwardHookAdapter(Adapter):
    hook = "forward"

    def camelot_forward(self, module: nn.Module, hidden_states: torch.Tensor, **kwargs) -> tuple:
        raise NotImplementedError

    def prepare(self, model: nn.Module) -> None:
        for m in self.attention_modules(model):
            if _ORIGINAL in vars(m):
                continue
            original = m.forward
            m.__dict__[_ORIGINAL] = original
            m.forward = _dispatching_forward(m, original, self.camelot_forward)

    def restore(self, model: nn.Module) -> None:
        for m in self.attention_modules(model):
            if _ORIGINAL in vars(m):
                del m.forward
                del m.__dict__[_ORIGINAL]
            m.__dict__.pop("_camelot_alibi", None)


def _dispatching_forward(module: nn.Module, original: Callable, camelot_forward: Callable) -> Callable:
    def forward(hidden_states, *args, **kwargs):
        if getattr(module, "_camelot_runtime", None) is None:
            return original(hidden_states, *args, **kwargs)
        return camelot_forward(module, hidden_states, *args, **kwargs)

    return forward


class FalconAdapter(ForwardHookAdapter):
    """Falcon: rotary (falcon-7b/40b/180b, new decoder architecture) or ALiBi (falcon-rw), MQA/GQA
    through a fused qkv projection."""

    model_types = ("falcon",)
    positions = "rotary | alibi"
    notes = "transformers 5.x falcon computes attention inline; the adapter swaps its attention forward"

    @property
    def memory(self) -> str:  # type: ignore[override]
        return "rotary: keys un-rotated and re-placed; ALiBi: " + ALIBI_RULE

    def positions_of(self, model: nn.Module) -> str:
        return "alibi" if self.text_config(model).alibi else "rotary"

    def num_kv_heads(self, model: nn.Module) -> int:
        cfg = self.text_config(model)
        if cfg.new_decoder_architecture:
            return cfg.num_kv_heads
        return 1 if cfg.multi_query else cfg.num_attention_heads

    def camelot_forward(self, module, hidden_states, *args, alibi=None, position_embeddings=None, **kwargs):
        from transformers.models.falcon.modeling_falcon import apply_rotary_pos_emb

        b, s, _ = hidden_states.shape
        hd, nh = module.head_dim, module.num_heads
        fused = module.query_key_value(hidden_states)
        if module.new_decoder_architecture:  # [q_1..q_g, k, v] per kv head; keep k/v un-broadcast
            qkv = fused.view(b, s, -1, nh // module.num_kv_heads + 2, hd)
            q, k, v = qkv[:, :, :, :-2].flatten(2, 3), qkv[:, :, :, -2], qkv[:, :, :, -1]
        elif module.multi_query:
            qkv = fused.view(b, s, nh + 2, hd)
            q, k, v = qkv[:, :, :-2], qkv[:, :, -2:-1], qkv[:, :, -1:]
        else:
            qkv = fused.view(b, s, nh, 3, hd)
            q, k, v = qkv[..., 0, :], qkv[..., 1, :], qkv[..., 2, :]
        q, k, v = (x.transpose(1, 2) for x in (q, k, v))
        ali = None
        # transformers >= 5.25 passes no `alibi` (it rides in the mask) but still rotary tables:
        # the config, not the kwargs, says which rule the model uses
        cfg = getattr(module, "config", None)
        if not (alibi is not None or getattr(cfg, "alibi", False)):
            cos, sin = position_embeddings
            q, k = apply_rotary_pos_emb(q, k, cos, sin)
        else:  # HF adds the bias before multiplying by 1/sqrt(head_dim)
            ali = _cached_alibi(module, nh, scale=module.inv_norm_factor)
        out = module._camelot_runtime.attend(q, k, v, module.inv_norm_factor, None, None, alibi=ali)
        return module.dense(out.reshape(b, s, nh * hd)), None


class BloomAdapter(ForwardHookAdapter):
    """BLOOM: ALiBi, multi-head, fused qkv; the attention module also adds the residual."""

    model_types = ("bloom",)
    positions = "alibi"
    memory = ALIBI_RULE = ("keys stored as they come; each slot's logit gets the ALiBi bias of its "
                           "placement (fixed: -memory_distance; recency: its last-write position)")
    notes = "transformers 5.x bloom computes attention inline; the adapter swaps its attention forward"

    def max_positions(self, model: nn.Module) -> int | None:
        return None  # ALiBi extrapolates; no learned table bounds the segment positions

    def camelot_forward(self, module, hidden_states, residual, *args, **kwargs):
        from transformers.models.bloom.modeling_bloom import dropout_add

        b, s, _ = hidden_states.shape
        q, k, v = module._reshape(module.query_key_value(hidden_states))
        ali = _cached_alibi(module, module.num_heads, scale=1.0)  # bloom adds the bias unscaled
        out = module._camelot_runtime.attend(q, k, v, module.inv_norm_factor, None, None, alibi=ali)
        out = module.dense(out.reshape(b, s, module.hidden_size))
        return dropout_add(out, residual, module.hidden_dropout, module.training), None


ALIBI_RULE = BloomAdapter.ALIBI_RULE


def _cached_alibi(module: nn.Module, num_heads: int, scale: float) -> Alibi:
    ali = module.__dict__.get("_camelot_alibi")
    if ali is None:
        ali = Alibi(alibi_slopes(num_heads), scale=scale)
        module.__dict__["_camelot_alibi"] = ali
    return ali
