from __future__ import annotations

import os

import pytest
import torch

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


def tiny_llama(seed: int = 0, layers: int = 2, heads: int = 4, kv_heads: int = 2, vocab: int = 101,
               hidden: int = 64, max_pos: int = 1024):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden,
                      num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
                      max_position_embeddings=max_pos, attn_implementation="sdpa")
    model = LlamaForCausalLM(cfg).eval()
    # random weights have no end of text: without LlamaConfig's default eos (2), generate (camelot's
    # and transformers') runs to max_new_tokens unless a test names an eos
    model.generation_config.eos_token_id = None
    return model


def bare(**kw):
    """A CamelotConfig without the raw tail and sinks, written as the paper writes (every token
    consolidated, the oldest slot evicted): every closed token goes straight to memory, the setting
    that the memory-mechanics tests reason about on short documents."""
    from camelot import CamelotConfig

    return CamelotConfig.consolidating(**{"recent": 0, "sink": 0, **kw})


@pytest.fixture
def llama():
    return tiny_llama()


@pytest.fixture(scope="session")
def smollm2():
    import camelot

    try:
        model, tok = camelot.load_model("smollm2")
    except FileNotFoundError as e:  # the package is part of `make test`'s setup
        pytest.fail(f"SmolLM2 is not installed: {e}")
    return model, tok


@pytest.fixture(scope="session")
def long_text() -> str:
    from importlib.resources import files

    return files("camelot").joinpath("data/genesis_kjv.txt").read_text(encoding="utf-8")
