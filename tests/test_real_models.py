"""The real SmolLM2-135M (llama, GQA 9 q / 3 kv heads), from its PyPI package; Qwen2.5-0.5B
(qwen2, GQA 14 q / 2 kv heads, rope theta 1e6) where its optional parts are installed."""

from __future__ import annotations

import pytest
import torch

import camelot
from camelot import CamelotConfig


@pytest.fixture(scope="module")
def qwen05():
    from camelot.model_parts import PARTED, PartsError, part_files

    try:
        part_files(PARTED["qwen2.5-0.5b"])
    except PartsError as e:
        pytest.skip(f"Qwen2.5-0.5B is optional (`make models-large`) and not installed: {e}")
    return camelot.load_model("qwen2.5-0.5b")


def test_smollm2_identity_with_empty_memory(smollm2, long_text):
    model, tok = smollm2
    assert_identity(model, tok(long_text[:2000], return_tensors="pt").input_ids[:, :100])


@pytest.mark.slow
def test_qwen05_identity_with_empty_memory(qwen05, long_text):
    model, tok = qwen05
    assert_identity(model, tok(long_text[:2000], return_tensors="pt").input_ids[:, :100])


def assert_identity(model, ids: torch.Tensor) -> None:
    """A wrapped model with empty memory gives the unwrapped model's logits."""
    impl = model.config._attn_implementation
    with torch.no_grad():
        ref_sdpa = model(ids).logits
        model.set_attn_implementation("eager")
        ref = model(ids).logits
        model.set_attn_implementation(impl)
    cm = camelot.wrap(model, CamelotConfig(window=128, slots=256, read_top_k=4))
    try:
        got = cm.step(ids)
    finally:
        cm.unwrap()
    # Against the model's own eager attention (fp32 softmax, same reduction order): <= 1e-5.
    assert (got - ref).abs().max() <= 1e-5
    # SDPA itself differs from eager by ~1e-4 on O(30) logits over 30 layers; we sit inside that.
    assert (got - ref_sdpa).abs().max() <= 2 * max((ref - ref_sdpa).abs().max(), 1e-5)


def test_smollm2_camelot_beats_window_on_a_long_document(smollm2, long_text):
    """Issues 2 and 4: >= 8k tokens of Genesis, window 128, default memory settings: camelot cuts
    window-only perplexity by at least 30%, and its consolidated slots add to what the raw tail
    alone (recurrent, with the same sinks) gives."""
    model, tok = smollm2
    ids = tok(long_text, return_tensors="pt").input_ids[:, :8192]
    assert ids.shape[1] == 8192
    results = {}
    for strategy in ("window", "recurrent", "camelot"):
        cm = camelot.wrap(model, CamelotConfig(window=128, slots=384, strategy=strategy))
        try:
            results[strategy] = cm.score(ids).perplexity
        finally:
            cm.unwrap()
    assert results["camelot"] < 0.7 * results["window"], results
    assert results["camelot"] < results["recurrent"], results
