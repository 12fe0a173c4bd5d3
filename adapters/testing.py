"""Testing support: tiny random models of every supported family, built from configs (no downloads).

The adapter tests parametrize over `TINY_FAMILIES`, and scripts/compat_table.py reads the same
list, so the compatibility table names exactly what the tests prove. Each variant is small
(hidden 64, 2-3 layers, vocab 101) and exercises what makes its family different: GQA/MQA,
sliding windows, softcapping, per-layer rope, partial or interleaved rotary, absolute positions,
ALiBi.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

VOCAB = 101
HIDDEN = 64
MAX_POS = 512
ABS_POS = 128  # learned position tables: small, so a test can run past one cheaply


@dataclass(frozen=True)
class TinyFamily:
    """One test variant: `name` is its id, `config_class` a transformers config class name."""

    name: str
    config_class: str
    kwargs: dict[str, Any] = field(default_factory=dict)
    exercises: str = ""

    def config(self):
        import transformers

        return getattr(transformers, self.config_class)(**self.kwargs)

    def build(self, seed: int = 0) -> nn.Module:
        """A fresh fp32 model in eval mode with eager attention (the reference implementation)."""
        from transformers import AutoModelForCausalLM

        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(self.config(), dtype=torch.float32)
        model.set_attn_implementation("eager")
        return model.eval()

    @property
    def model_type(self) -> str:
        return self.config().model_type


def _decoder(**kw: Any) -> dict[str, Any]:
    base = dict(vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=2 * HIDDEN, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=MAX_POS,
                bos_token_id=1, eos_token_id=2, pad_token_id=0)
    base.update(kw)
    return base


_SLIDING3 = ["sliding_attention", "full_attention", "sliding_attention"]

TINY_FAMILIES: tuple[TinyFamily, ...] = (
    TinyFamily("llama", "LlamaConfig", _decoder(), "rotary, GQA 4q/2kv"),
    TinyFamily("mistral", "MistralConfig", _decoder(sliding_window=24), "rotary, GQA, sliding window 24"),
    TinyFamily("mixtral", "MixtralConfig", _decoder(num_local_experts=2, num_experts_per_tok=1),
               "rotary, GQA, mixture of experts"),
    TinyFamily("qwen2", "Qwen2Config", _decoder(num_key_value_heads=1), "rotary, MQA, qkv bias"),
    TinyFamily("qwen3", "Qwen3Config", _decoder(head_dim=32), "rotary, q/k norm, head_dim 32 != hidden/heads"),
    TinyFamily("gemma", "GemmaConfig", _decoder(num_key_value_heads=1, head_dim=16), "rotary, MQA"),
    TinyFamily("gemma2", "Gemma2Config",
               _decoder(head_dim=16, sliding_window=16, attn_logit_softcapping=20.0, query_pre_attn_scalar=24),
               "rotary, softcap, sliding/full layers, query_pre_attn_scalar"),
    TinyFamily("gemma3_text", "Gemma3TextConfig",
               _decoder(num_hidden_layers=3, head_dim=16, sliding_window=16, layer_types=_SLIDING3,
                        query_pre_attn_scalar=24),
               "per-layer rope bases (sliding 10k / full 1M), sliding/full layers, q/k norm"),
    TinyFamily("phi3", "Phi3Config", _decoder(), "rotary, fused qkv"),
    TinyFamily("starcoder2", "Starcoder2Config", _decoder(), "rotary, GQA, biases"),
    TinyFamily("olmo", "OlmoConfig", _decoder(num_key_value_heads=4), "rotary, MHA"),
    TinyFamily("olmo2", "Olmo2Config", _decoder(), "rotary, q/k norm over heads"),
    TinyFamily("granite", "GraniteConfig", _decoder(attention_multiplier=0.1), "rotary, custom attention scale"),
    TinyFamily("smollm3", "SmolLM3Config", _decoder(no_rope_layers=[1, 0]), "rotary with NoPE layers"),
    TinyFamily("cohere", "CohereConfig", _decoder(), "interleaved rotary"),
    TinyFamily("gpt_neox", "GPTNeoXConfig", _decoder(num_key_value_heads=None, rotary_pct=0.25),
               "partial rotary (25%), MHA"),
    TinyFamily("phi", "PhiConfig", _decoder(num_key_value_heads=4, partial_rotary_factor=0.5), "partial rotary (50%)"),
    TinyFamily("stablelm", "StableLmConfig", _decoder(partial_rotary_factor=0.25), "partial rotary, GQA"),
    TinyFamily("gptj", "GPTJConfig", dict(vocab_size=VOCAB, n_embd=HIDDEN, n_layer=2, n_head=4, n_positions=MAX_POS,
                                          rotary_dim=8, bos_token_id=1, eos_token_id=2),
               "interleaved partial rotary from a sin/cos table"),
    TinyFamily("codegen", "CodeGenConfig", dict(vocab_size=VOCAB, n_embd=HIDDEN, n_layer=2, n_head=4,
                                                n_positions=MAX_POS, n_ctx=MAX_POS, rotary_dim=8,
                                                bos_token_id=1, eos_token_id=2),
               "interleaved partial rotary, fused qkv in 4 shards"),
    TinyFamily("gpt2", "GPT2Config", dict(vocab_size=VOCAB, n_embd=HIDDEN, n_layer=2, n_head=4, n_positions=ABS_POS,
                                          bos_token_id=1, eos_token_id=2, scale_attn_by_inverse_layer_idx=True),
               "learned absolute positions, per-layer attention scale"),
    TinyFamily("gpt_bigcode", "GPTBigCodeConfig", dict(vocab_size=VOCAB, n_embd=HIDDEN, n_layer=2, n_head=4,
                                                       n_positions=ABS_POS, multi_query=True,
                                                       bos_token_id=1, eos_token_id=2),
               "learned absolute positions, MQA"),
    TinyFamily("opt", "OPTConfig", dict(vocab_size=VOCAB, hidden_size=HIDDEN, ffn_dim=2 * HIDDEN, num_hidden_layers=2,
                                        num_attention_heads=4, max_position_embeddings=ABS_POS,
                                        word_embed_proj_dim=HIDDEN, bos_token_id=1, eos_token_id=2, pad_token_id=0),
               "learned absolute positions (offset 2), pre-scaled queries"),
    TinyFamily("falcon", "FalconConfig", dict(vocab_size=VOCAB, hidden_size=HIDDEN, num_hidden_layers=2,
                                              num_attention_heads=4, num_kv_heads=2, new_decoder_architecture=True,
                                              alibi=False, max_position_embeddings=MAX_POS,
                                              bos_token_id=1, eos_token_id=2),
               "rotary, GQA through fused qkv (falcon-40b style); forward hook"),
    TinyFamily("falcon_alibi", "FalconConfig", dict(vocab_size=VOCAB, hidden_size=HIDDEN, num_hidden_layers=2,
                                                    num_attention_heads=4, multi_query=True, alibi=True,
                                                    parallel_attn=False, bias=True, max_position_embeddings=MAX_POS,
                                                    bos_token_id=1, eos_token_id=2),
               "ALiBi, MQA (falcon-rw style); forward hook"),
    TinyFamily("bloom", "BloomConfig", dict(vocab_size=VOCAB, hidden_size=HIDDEN, n_layer=2, n_head=4,
                                            bos_token_id=1, eos_token_id=2, pad_token_id=0),
               "ALiBi, MHA; forward hook"),
)

# Real weights that tests run (tests/test_real_models.py, tests/test_adapters.py): model_type -> name.
REAL_MODELS: dict[str, str] = {"llama": "SmolLM2-135M (camelot.load_model('smollm2'))",
                               "gemma3_text": "Gemma-3 270M (camelot.load_model('gemma3-270m'))"}


def tiny_family(name: str) -> TinyFamily:
    for fam in TINY_FAMILIES:
        if fam.name == name:
            return fam
    raise KeyError(f"no tiny family {name!r}; known: {', '.join(f.name for f in TINY_FAMILIES)}")


