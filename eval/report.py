"""Perplexity results as people read them: a Markdown table, a JSON file with every figure and
the full config, and PNG plots (perplexity by position in the document, against slots, against
threshold). Plots use matplotlib's Agg backend so they work without a display."""

from __future__ import annotations

import json
import math
import platform
from pathlib import Path
from typing import Any

from camelot.eval.plan import RunResult

BASELINE = "window"


def _baseline(results: list[RunResult], window: int) -> RunResult | None:
    for r in results:
        if r.spec.strategy == BASELINE and r.spec.window == window and not r.skipped and r.tokens:
            return r
    return None


def _full(results: list[RunResult]) -> RunResult | None:
    return next((r for r in results if r.spec.strategy == "full" and not r.skipped and r.tokens), None)


def windows(results: list[RunResult]) -> list[int]:
    return sorted({r.spec.window for r in results if r.spec.window is not None})


def comparison(r: RunResult, base: RunResult | None, full: RunResult | None) -> dict[str, float | None]:
    """How a run compares with `window` at the same window: Δ% perplexity, speed ratio, and the
    share of the window->full perplexity gap it closes (when `full` ran)."""
    if base is None or r.skipped or not r.tokens:
        return {"delta_pct": None, "speed_ratio": None, "gap_closed_pct": None}
    gap = None
    if full is not None and base.ppl != full.ppl:
        gap = 100.0 * (base.ppl - r.ppl) / (base.ppl - full.ppl)
    return {"delta_pct": 100.0 * (r.ppl - base.ppl) / base.ppl,
            "speed_ratio": r.tokens_per_second / base.tokens_per_second, "gap_closed_pct": gap}


def _rows(results: list[RunResult]) -> list[tuple[int | None, RunResult]]:
    """Table order: per window, its runs in plan order, then `full` compared with that window."""
    full = next((r for r in results if r.spec.strategy == "full"), None)
    ws = windows(results)
    rows: list[tuple[int | None, RunResult]] = []
    for w in ws:
        rows += [(w, r) for r in results if r.spec.window == w]
        if full is not None:
            rows.append((w, full))
    if not ws and full is not None:
        rows.append((None, full))
    return rows


def _num(x: float | None, fmt: str) -> str:
    return "–" if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, fmt)


def markdown_table(results: list[RunResult]) -> str:
    full = _full(results)
    show_gap = full is not None
    head = ["strategy", "window", "params", "ppl", "Δ% vs window", "tokens/s", "speed vs window"]
    if show_gap:
        head.append("gap closed %")
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    for w, r in _rows(results):
        base = _baseline(results, w) if w is not None else None
        params = " ".join(f"{k}={v}" for k, v in _param_strings(r).items()) or \
            ("whole document" if r.spec.strategy == "full" else "–")
        if r.skipped:
            cells = [r.spec.strategy, str(w or "–"), params, "skipped", "–", "–", "–"] + (["–"] if show_gap else [])
        else:
            c = comparison(r, base, full)
            cells = [r.spec.strategy, str(w) if w is not None else "–", params, _num(r.ppl, ".2f"),
                     _num(c["delta_pct"], "+.1f"), _num(r.tokens_per_second, ".0f"),
                     _num(c["speed_ratio"], ".2f") + ("×" if c["speed_ratio"] is not None else "")]
            if show_gap:
                cells.append(_num(c["gap_closed_pct"], ".0f") if r.spec.strategy not in (BASELINE, "full") else "–")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _param_strings(r: RunResult) -> dict[str, str]:
    from camelot.eval.plan import fmt_param as _fmt_param

    return {k: _fmt_param(v, k) for k, v in r.spec.params.items()}


# ---------------------------------------------------------------------------- JSON
def to_json(results: list[RunResult], config: dict[str, Any], bucket_size: int) -> dict[str, Any]:
    import torch
    import transformers

    full = _full(results)
    runs = []
    for r in results:
        compare = []
        for w in ([r.spec.window] if r.spec.window is not None else windows(results)):
            compare.append({"window": w, **comparison(r, _baseline(results, w), full)})
        runs.append({
            "strategy": r.spec.strategy, "window": r.spec.window, "label": r.spec.label,
            "params": r.spec.params, "config": r.spec.config.to_dict() if r.spec.config else None,
            "skipped": r.skipped, "ppl": None if r.skipped else r.ppl,
            "nll": r.nll_sum / r.tokens if r.tokens else None, "tokens": r.tokens, "seconds": r.seconds,
            "tokens_per_second": None if r.skipped else r.tokens_per_second, "compare": compare,
            "by_position": {"bucket_size": bucket_size, "ppl": r.bucket_ppl(), "tokens": r.bucket_tokens},
            "documents": r.docs,
        })
    env = {"python": platform.python_version(), "torch": torch.__version__,
           "transformers": transformers.__version__, "threads": torch.get_num_threads()}
    return {"config": config, "environment": env, "runs": runs}


# ---------------------------------------------------------------------------- plots
def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_by_position(results: list[RunResult], window: int, bucket_size: int, path: Path) -> None:
    """Perplexity per position bucket: does memory help more as the document grows?"""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(8, 5))
    for r in results:
        if r.skipped or not r.tokens or r.spec.window not in (window, None):
            continue
        ys = r.bucket_ppl()
        xs = [i * bucket_size for i, y in enumerate(ys) if y is not None]
        ax.plot(xs, [y for y in ys if y is not None], marker="o", markersize=3, label=r.spec.label,
                linestyle="--" if r.spec.strategy in (BASELINE, "full") else "-")
    _finish(plt, fig, ax, path, f"token position in document (bucket start, {bucket_size} tokens per bucket)",
            f"perplexity by position, window {window}")


def _finish(plt, fig, ax, path: Path, xlabel: str, title: str) -> None:
    ax.set_xlabel(xlabel)
    ax.set_ylabel("perplexity")
    ax.set_title(title)
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_sweep(results: list[RunResult], window: int, param: str, path: Path) -> None:
    """Perplexity against one swept setting: a line per strategy and fixed other settings, and
    dashed lines for runs the setting does not apply to (window, recurrent, full, ...)."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(8, 5))
    groups: dict[str, list[tuple[float, float]]] = {}
    flat: list[RunResult] = []
    for r in results:
        if r.skipped or not r.tokens or r.spec.window not in (window, None):
            continue
        if param in r.spec.params:
            rest = " ".join(f"{k}={v}" for k, v in _param_strings(r).items() if k != param)
            groups.setdefault(f"{r.spec.strategy} {rest}".strip(), []).append((r.spec.params[param], r.ppl))
        else:
            flat.append(r)
    # read_top_k may be None ("all"): such a sweep gets a categorical axis with "all" last
    categorical = any(x is None for pts in groups.values() for x, _ in pts)
    order = sorted({x for pts in groups.values() for x, _ in pts}, key=lambda x: (x is None, x or 0))
    for label, pts in groups.items():
        pts.sort(key=lambda p: order.index(p[0]))
        xs = [order.index(p[0]) if categorical else p[0] for p in pts]
        ax.plot(xs, [p[1] for p in pts], marker="o", label=label)
    if categorical:
        ax.set_xticks(range(len(order)), ["all" if x is None else str(x) for x in order])
    for r in flat:
        ax.axhline(r.ppl, linestyle="--", linewidth=1, color="gray" if r.spec.strategy != "full" else "black")
        ax.annotate(r.spec.label, (0.01, r.ppl), xycoords=("axes fraction", "data"), fontsize=7,
                    va="bottom")
    if param == "slots" and not categorical:
        ax.set_xscale("log", base=2)
    _finish(plt, fig, ax, path, param, f"perplexity vs {param}, window {window}")


def _swept(results: list[RunResult], window: int, param: str) -> bool:
    return len({r.spec.params[param] for r in results if r.spec.window == window and param in r.spec.params}) > 1


def write_all(results: list[RunResult], config: dict[str, Any], out: Path, bucket_size: int) -> list[Path]:
    """results.json, results.md and the plots under `out`; returns the paths written."""
    out.mkdir(parents=True, exist_ok=True)
    written = [out / "results.json", out / "results.md"]
    written[0].write_text(json.dumps(to_json(results, config, bucket_size), indent=2, default=str) + "\n")
    written[1].write_text(markdown_table(results) + "\n")
    for w in windows(results) or [None]:
        path = out / (f"ppl_by_position_w{w}.png" if w is not None else "ppl_by_position.png")
        plot_by_position(results, w, bucket_size, path)
        written.append(path)
        for param in ("slots", "threshold", "read_top_k"):
            if w is not None and _swept(results, w, param):
                path = out / f"ppl_vs_{param}_w{w}.png"
                plot_sweep(results, w, param, path)
                written.append(path)
    return written
