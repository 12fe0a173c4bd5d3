"""`camelot bench` tables for what a user meets with the defaults: the default config's cost per
segment against window-only and against a raw sliding cache of the same budget, decoding speed
after a long document against transformers' generate with a KV cache of the same attended
length, and the time from a long document to its first answered token against a full-context
prefill."""

from __future__ import annotations

import inspect
import time
from dataclasses import dataclass

import torch
from camelot.eval.bench_measure import Row, run_wrapped
from camelot.eval.hf_cache import cache_kwarg, new_cache

from camelot.config import CamelotConfig
from camelot.presets import TAIL


def default_rows(model, ids: torch.Tensor, window: int, progress: bool) -> list[Row]:
    """window-only, `CamelotConfig(window=...)` with every other default, the consolidating write
    and `sliding` holding the same KV entries per head (sinks + slots + raw tail)."""
    cfg = CamelotConfig(window=window)
    budget = cfg.slots + cfg.recent
    rows = [run_wrapped(model, ids, cfg.replace(strategy="window"), "window", progress=progress),
            run_wrapped(model, ids, cfg, f"camelot defaults ({cfg.slots} slots + {cfg.recent} tail, "
                        f"search={cfg.search})", prefill=True, progress=progress)]
    if cfg.search != "torch":  # the exact fp32 read beside the default bfloat16 one
        rows.append(run_wrapped(model, ids, cfg.replace(search="torch"), "camelot defaults, search=torch (exact)",
                                prefill=True, progress=progress))
    # the default write until 2026-12-06 at the same budget: what the new write costs against it
    old = CamelotConfig.consolidating(window=window, slots=budget - TAIL, search=cfg.search)
    rows.append(run_wrapped(model, ids, old, f"camelot consolidating ({old.slots} slots + {old.recent} tail; the "
                            "default until 2026-12-06)", prefill=True, progress=progress))
    return rows + [run_wrapped(model, ids, cfg.replace(strategy="sliding", slots=budget),
                               f"sliding {budget} (same budget)", prefill=True, progress=progress)]


def read_share(model, cfg: CamelotConfig) -> float:
    """Multiply-adds per token of reading every memory entry (sinks + slots + raw tail, keys and
    values, every query head of every layer) over those of window-only (every linear layer, the
    output head included, plus attending a whole window). With equal efficiency per multiply-add,
    an every-slot read cannot cost less than 1 + this share of window-only: the floor under the
    default's ratio, whatever the code around it."""
    import camelot
    from camelot.snapshot_format import architecture

    cm = camelot.wrap(model, cfg)
    try:
        arch = architecture(cm)
    finally:
        cm.unwrap()
    per_entry = arch["num_layers"] * arch["num_heads"] * arch["head_dim"] * 2  # a key and a value
    linear = sum(m.in_features * m.out_features for m in model.modules() if isinstance(m, torch.nn.Linear))
    return per_entry * (cfg.sink + cfg.slots + cfg.recent) / (linear + per_entry * cfg.window)


def defaults_table(rows: list[Row]) -> str:
    base = rows[0].seg_median
    out = ["| run | time/segment (ms) | × window | × sliding (same budget) |", "|---|---|---|---|"]
    sliding = rows[-1].seg_median
    for r in rows:
        out.append(f"| {r.label} | {1e3 * r.seg_median:.1f} | {r.seg_median / base:.2f} | "
                   f"{r.seg_median / sliding:.2f} |")
    return "\n".join(out)


@dataclass
class DecodeRow:
    tokens_read: int
    attended: int  # KV entries per head camelot attends while decoding (= the HF cache length)
    camelot_tps: float  # generated tokens/s after feeding `tokens_read` tokens
    hf_tps: float  # transformers' generate, KV cache of `attended` tokens
    camelot_first_s: float  # feed the document + first new token
    full_first_s: float | None  # one full-context prefill of the document + first token; None beyond positions


def decode_rows(model, ids: torch.Tensor, lengths: list[int], new_tokens: int, window: int,
                progress: bool) -> list[DecodeRow]:
    import camelot

    cfg = CamelotConfig(window=window)
    attended = cfg.sink + cfg.slots + cfg.recent + cfg.window
    max_pos = getattr(model.config, "max_position_embeddings", None)
    rows = []
    for n in lengths:
        doc = ids[:, :n]
        with camelot.wrap(model, cfg) as cm:
            t0 = time.perf_counter()
            cm.feed(doc[:, :-1], progress=progress)
            answer = cm.generate(doc[:, -1:], max_new_tokens=1)
            first = time.perf_counter() - t0
            # the answer's token is in the state already: this prompt steps it once more, so the
            # timed loop runs one step more than it returns tokens (a conservative figure)
            t0 = time.perf_counter()
            out = cm.generate(answer[:, -1:], max_new_tokens=new_tokens, min_new_tokens=new_tokens)
            camelot_tps = out.shape[1] / (time.perf_counter() - t0)
        rows.append(DecodeRow(n, attended, camelot_tps, _hf_decode(model, doc[:, -attended:], new_tokens), first,
                              _full_first(model, doc) if max_pos is None or n <= max_pos else None))
    return rows


@torch.no_grad()
def _hf_decode(model, ctx: torch.Tensor, new_tokens: int) -> float:
    """Tokens/s of `model.generate` continuing from a DynamicCache already holding `ctx` (the
    prefill is not timed: only decoding, as for camelot after its feed)."""
    name, cache = cache_kwarg(model), new_cache(model)
    model(input_ids=ctx[:, :-1], use_cache=True, **{name: cache})
    t0 = time.perf_counter()
    out = model.generate(input_ids=ctx, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                         pad_token_id=0, **{name: cache})
    return (out.shape[1] - ctx.shape[1]) / (time.perf_counter() - t0)


@torch.no_grad()
def _full_first(model, doc: torch.Tensor) -> float:
    """One forward over the whole document, the model's own attention; only the last row's logits
    (a 32k-token document's logits over Qwen's 151k-token vocabulary would be ~10 GB)."""
    keep = {"logits_to_keep": 1} if "logits_to_keep" in inspect.signature(model.forward).parameters else {}
    t0 = time.perf_counter()
    model(input_ids=doc, use_cache=False, **keep).logits[:, -1].argmax(-1)
    return time.perf_counter() - t0


def decode_table(rows: list[DecodeRow]) -> str:
    out = ["| tokens read | attended / head | camelot tokens/s | transformers tokens/s (same cache length) | × | "
           "document -> first token: camelot s | full prefill s |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        full = "beyond the model's positions" if r.full_first_s is None else f"{r.full_first_s:.1f}"
        out.append(f"| {r.tokens_read} | {r.attended} | {r.camelot_tps:.1f} | {r.hf_tps:.1f} | "
                   f"{r.camelot_tps / r.hf_tps:.2f} | {r.camelot_first_s:.1f} | {full} |")
    return "\n".join(out)
