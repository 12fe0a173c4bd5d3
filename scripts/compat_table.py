"""Regenerate docs/compatibility.md (the README's compatibility table) from the adapter registry
and the tiny-model test matrix, so the table cannot drift from what the code and tests do.

    .venv/bin/python scripts/compat_table.py          # rewrite docs/compatibility.md
    .venv/bin/python scripts/compat_table.py --check  # exit 1 if it is stale (tests do this too)

Each row is one variant of `camelot.adapters.testing.TINY_FAMILIES`, the list tests/test_adapters.py
parametrizes over; the row is built by loading that tiny model and asking its adapter.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

DOC_PATH = Path(__file__).resolve().parent.parent / "docs" / "compatibility.md"

CHECKS = ("identity with empty memory (<= 1e-5, fp32)", "raw prefix == full context (relative positions) or "
          "positions stay in range (absolute)", "causality across segments", "memory written (counts per KV head) "
          "and read", "generate() with memory")

NOTES = """\
## Decisions

**Sliding-window layers.** gemma2/3 interleave sliding and full layers; mistral and
starcoder2 configs may make every layer sliding. Inside a segment the sliding window is honoured
exactly, on the raw context too (the raw tail, the `recurrent` / `sliding` prefix and the sinks
sit on every layer, each masked by the layer's own window as the original tokens would be).
Consolidated memory: where sliding and full layers interleave, only the full layers own it by
default (`CamelotConfig(layers=None)` means `adapter.default_memory_layers(model)`): sliding
layers were trained never to see past their window, and on Gemma-3 270M memory in all 18 layers
is far worse than memory in the 3 full layers (figures below). Where every layer slides
(mistral-style) all layers own memory, else there would be none. Pass
`CamelotConfig(layers=...)` to choose otherwise.

**ALiBi (falcon-rw, bloom).** Keys carry no position and are stored as they come. A memory slot
gets the ALiBi bias of the position it is placed at, exactly as a raw key there would:
`slope_h * p` with `p = -memory_distance` (placement "fixed") or `p = -(age + 1)`, the slot's
last-write position (placement "recency"). Slots are chosen by content (top-k of q.k) first, then
biased. The bias is rounded to bfloat16 like HF's `build_alibi_tensor`, so identity is exact.

**Absolute positions (gpt2, opt, gpt_bigcode).** Keys already hold their learned position and
nothing can take it off, so memory stores them as they come and reads them unplaced. Every
segment runs at positions `[0, window)`, and `wrap` refuses a `window` beyond
`max_position_embeddings`, so a document of any length never leaves the trained range. A raw
prefix (`recurrent`, `sliding`) cannot be re-placed either: its keys keep their in-segment
positions.

**Families outside the attention registry (falcon, bloom).** In transformers 5.x their attention
modules compute attention inline and never consult `AttentionInterface`. Their adapters replace
the attention modules' `forward` (an instance attribute) with one that projects q/k/v with the
module's own weights and calls the camelot runtime; while no camelot runtime is attached it calls
the original forward, so an unwrapped model behaves exactly as before.

**Unsupported models** (an encoder such as BERT, or a decoder type without an adapter such as
mpt) fail in `wrap` with `UnsupportedModelError` naming the model type and listing the supported
ones, before anything is patched (tests/test_adapters.py checks the model is untouched).
"""


def _positions(adapter, model) -> str:
    kind = adapter.positions_of(model)
    if kind != "rotary":
        return kind
    runtimes = [adapter.rope_spec(model, m.layer_idx) for m in adapter.attention_modules(model)]
    specs = [s for s in runtimes if s is not None]
    cfg = adapter.text_config(model)
    head = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    parts = ["rotary"]
    if any(s.interleaved for s in specs):
        parts.append("interleaved")
    if specs and specs[0].rot_dim < head:
        parts.append(f"partial {specs[0].rot_dim}/{head}")
    if len({tuple(s.inv_freq.tolist()) for s in specs}) > 1:
        parts.append("per-layer bases")
    if len(specs) < len(runtimes):
        parts.append("NoPE layers")
    return ", ".join(parts)


def rows() -> list[dict[str, str]]:
    import torch
    from camelot.adapters import get_adapter
    from camelot.adapters.testing import REAL_MODELS, TINY_FAMILIES

    torch.set_num_threads(1)
    out = []
    for fam in TINY_FAMILIES:
        model = fam.build()
        adapter = get_adapter(model)
        sliding = adapter.sliding_layers(model)
        n = len(adapter.attention_modules(model))
        tested = f"random config: {fam.exercises}"
        if fam.model_type in REAL_MODELS and fam.name == fam.model_type:
            tested += f"; real weights: {REAL_MODELS[fam.model_type]}"
        out.append({
            "family": fam.name, "model_type": fam.model_type, "positions": _positions(adapter, model),
            "sliding": "none" if not sliding else ("all" if len(sliding) == n else f"{len(sliding)} of {n}"),
            "hook": "attention registry" if adapter.hook == "registry" else "attention forward swapped",
            "memory": adapter.memory, "tested": tested,
        })
    return out


def render_table() -> str:
    head = ["Family", "model_type", "Positions", "Sliding layers (tiny config)", "Hook", "What memory does",
            "Tested with"]
    keys = ["family", "model_type", "positions", "sliding", "hook", "memory", "tested"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows():
        lines.append("| " + " | ".join(r[k].replace("|", "/") for k in keys) + " |")
    return "\n".join(lines)


def render_doc() -> str:
    from camelot.adapters import supported_model_types

    checks = "\n".join(f"- {c}" for c in CHECKS)
    return (
        "# Compatibility\n\n"
        "<!-- generated by scripts/compat_table.py from the adapter registry and the test matrix; "
        "do not edit by hand -->\n\n"
        f"Supported `model_type`s: {', '.join(f'`{t}`' for t in supported_model_types())}.\n\n"
        "Every row is a tiny random model that tests/test_adapters.py builds from its config and checks for:\n\n"
        f"{checks}\n\n{render_table()}\n\n{NOTES}\n{REAL_RESULTS}"
    )


REAL_RESULTS = """\
## Real weights

Gemma-3 270M (`camelot.load_model("gemma3-270m")`, loads as `gemma3_text`: 18 layers of which
3 full-attention (5, 11, 17), 4 q heads / 1 kv head, head dim 256, sliding window 512, rope
bases 10k sliding / 1M full), fp32, first 4096 tokens of Genesis, window 128, 384 slots + 128
raw tail + 4 sinks (the same 512 entries as sliding), other settings default:

| strategy | memory layers | perplexity |
|---|---|---|
| window | - | 53.30 |
| recurrent (previous segment + sinks) | - | 5.71 |
| sliding 512 + sinks | - | 5.43 |
| camelot | default: full-attention layers 5, 11, 17 | **5.43** |
| camelot | all 18 | 5.46 |
| camelot, no count bias | default / all 18 | 5.45 / 5.46 |
| camelot, the paper's absolute count bias 0.7 | default / all 18 | 5.43 / 5.80 |
| full context | - | 5.42 |

```bash
camelot ppl --model gemma3-270m --data ../shared/data/docs/books --max-tokens 4096 --window 128 --slots 384 \\
    --strategies window,recurrent,sliding,camelot,full --layers default/all --threads 2
```

Window-only is this bad because Gemma leans on its `<bos>` as an attention sink and a segment
other than the first has none; the sinks give it back, and with them every memory here is within
0.4 of full context on this text. Memory on the sliding layers too buys nothing (5.46 vs 5.43;
with the absolute count bias it cost 0.37), so the default keeps it to the 3 full-attention layers: a
sixth of the memory and of its cost. Identity with empty memory
against the model's own eager attention is tested
(`tests/test_adapters.py::test_gemma3_270m_identity_with_empty_memory`), and so are camelot
below half of window-only and the default layers within 1% of all layers on this text
(`test_gemma3_270m_camelot_beats_window_on_a_long_text`, about 1 min). SmolLM2 (llama) figures
are in the README.
"""


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--check", action="store_true", help="exit 1 if docs/compatibility.md is stale")
    args = ap.parse_args(argv)
    doc = render_doc()
    if args.check:
        current = DOC_PATH.read_text(encoding="utf-8") if DOC_PATH.exists() else ""
        if current != doc:
            print(f"{DOC_PATH} is stale: run .venv/bin/python scripts/compat_table.py", file=sys.stderr)
            return 1
        return 0
    DOC_PATH.parent.mkdir(parents=True, exist_ok=True)
    DOC_PATH.write_text(doc, encoding="utf-8")
    print(f"wrote {DOC_PATH}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
