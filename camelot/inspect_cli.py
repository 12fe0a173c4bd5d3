"""`camelot inspect book.camelot`: what a memory snapshot holds, without loading a model.

Prints the snapshot's metadata (model, layout, settings, versions) and per memory layer the
slots used, how many tokens the slots stand for, count and age summaries and the write
telemetry; saves a PNG with the count and age histograms of every layer (log2 buckets, one
row per layer) next to the snapshot unless told otherwise.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import torch

from camelot.snapshot import USER_PREFIX, layer_stats, read_snapshot
from camelot.snapshot_format import metadata_value


def snapshot_stats(tensors: dict[str, torch.Tensor], meta: dict[str, str]) -> dict[str, Any]:
    """The same per-layer statistics as `cm.memory.stats()`, from a snapshot's tensors."""
    layers = json.loads(meta.get("memory_layers", "[]"))
    rows = []
    for i in layers:
        prefix = f"layer{i}.memory."
        state = {k[len(prefix):]: t for k, t in tensors.items() if k.startswith(prefix)}
        rows.append({"layer": i, **layer_stats(state)})
    prefix_len = max((t.shape[2] for k, t in tensors.items() if k.endswith(".prefix.keys")), default=0)
    config = json.loads(meta.get("config", "{}"))
    heads, kv = metadata_value(meta.get("num_heads")), metadata_value(meta.get("num_kv_heads"))
    per_kv = max(heads // kv, 1) if isinstance(heads, int) and isinstance(kv, int) and kv > 0 else 1
    # a KV head's query heads times the question's tokens: the rows of its saved queries
    asked = max((t.shape[2] // per_kv for k, t in tensors.items() if k.endswith(".question.queries")), default=0)
    return {"strategy": config.get("strategy"), "open_tokens": int(meta.get("open_len", "0")),
            "prefix_tokens": prefix_len, "question_tokens": asked, "layers": rows}


def describe(path: Path, meta: dict[str, str], stats: dict[str, Any]) -> str:
    """Human-readable summary: metadata, then one table row per memory layer."""
    cfg = json.loads(meta.get("config", "{}"))
    arch = {k: metadata_value(meta.get(k))
            for k in ("model_type", "num_layers", "num_heads", "num_kv_heads", "head_dim")}
    size = path.stat().st_size
    lines = [
        f"{path}  ({size / 2**20:.1f} MiB, format {meta.get('format')} v{meta.get('format_version')}, "
        f"written by camelot {meta.get('camelot_version')})",
        f"model: {arch['model_type']}, {arch['num_layers']} layers, {arch['num_heads']} heads / "
        f"{arch['num_kv_heads']} KV heads of dim {arch['head_dim']}, fingerprint {meta.get('fingerprint')}",
        "memory: " + ", ".join(f"{k}={cfg.get(k)}" for k in
                               ("strategy", "window", "slots", "threshold", "read_top_k", "top_k", "count_bias",
                                "count_mode", "count_cap", "placement")
                               if k in cfg),
        f"open segment: {stats['open_tokens']} tokens; raw prefix: {stats['prefix_tokens']} tokens",
    ]
    if cfg.get("span_reserve"):  # which tokens the raw reserve keeps, and what it ranks them by
        lines.append(f"raw reserve: {cfg['span_reserve']} slots per head ranked by {cfg.get('importance')} "
                     f"(span_score={cfg.get('span_score')}, span={cfg.get('span')}, follow={cfg.get('span_follow')})"
                     + (f"; the question it ranks by is saved ({stats['question_tokens']} tokens)"
                        if stats.get("question_tokens") else ""))
    for k, v in sorted(meta.items()):
        if k.startswith(USER_PREFIX):
            shown = v if len(v) <= 80 else v[:77] + "..."
            lines.append(f"{k}: {shown!r}")
    if not stats["layers"]:
        lines.append(f"no memory layers (strategy {stats['strategy']!r})")
        return "\n".join(lines)
    lines += ["", "| layer | slots used | tokens in slots | count mean | count max | age mean | age max | merged | new "
              "| evicted | dropped |", "|" + "---|" * 11]
    for r in stats["layers"]:
        if not r.get("slots_total"):
            lines.append(f"| {r['layer']} | 0 | 0 |" + " - |" * 8)
            continue
        lines.append(
            f"| {r['layer']} | {r['slots_used']}/{r['slots_total']} | {r['tokens_merged']} | {r['count_mean']:.2f} "
            f"| {r['count_max']} | {r.get('age_mean', float('nan')):.0f} | {r.get('age_max', '-')} | "
            f"{r.get('merged', '-')} | {r.get('new', '-')} | {r.get('evicted', '-')} | {r.get('dropped', '-')} |")
    return "\n".join(lines)


def plot_histograms(stats: dict[str, Any], path: Path, title: str) -> Path | None:
    """Heatmaps: layers (rows) x log2 buckets (columns) of slot counts and slot ages."""
    rows = [r for r in stats["layers"] if r.get("count_hist")]
    if not rows:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    kinds = [("count_hist", "tokens merged into a slot (count)"), ("age_hist", "slot age + 1 (tokens since write)")]
    kinds = [(k, label) for k, label in kinds if any(r.get(k) for r in rows)]
    fig, axes = plt.subplots(1, len(kinds), figsize=(6 * len(kinds), 1.5 + 0.25 * len(rows)), squeeze=False)
    for ax, (key, label) in zip(axes[0], kinds):
        n_buckets = max(len(bin(lo)) - 2 for r in rows for lo, _ in r.get(key, [])) if rows else 1
        grid = torch.zeros(len(rows), n_buckets)
        for y, r in enumerate(rows):
            for lo, n in r.get(key, []):
                grid[y, lo.bit_length() - 1] = n
        im = ax.imshow(grid.numpy(), aspect="auto", cmap="viridis", interpolation="nearest")
        ax.set_xticks(range(n_buckets), [f"{2**e}" for e in range(n_buckets)], rotation=90, fontsize=7)
        ax.set_yticks(range(len(rows)), [str(r["layer"]) for r in rows], fontsize=7)
        ax.set_xlabel(label + ", bucket lower bound")
        ax.set_ylabel("layer")
        fig.colorbar(im, ax=ax, label="slots")
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "inspect", help="show what a memory snapshot holds (and plot its histograms)",
        description="Print a camelot memory snapshot's metadata and per-layer statistics (slots used, count "
        "and age histograms, write telemetry) and save a PNG of the histograms. No model is loaded.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("snapshot", help="a .camelot file written by cm.memory.save or camelot ask --save")
    p.add_argument("--plot", default=None, help="PNG path (default: the snapshot's path with .png)")
    p.add_argument("--no-plot", action="store_true", help="do not write the PNG")
    p.add_argument("--json", action="store_true", help="print metadata and statistics as JSON instead")
    p.set_defaults(func=run_cli)


def run_cli(args: argparse.Namespace) -> int:
    path = Path(args.snapshot)
    tensors, meta = read_snapshot(path)  # SnapshotError (a ValueError) prints as one line
    stats = snapshot_stats(tensors, meta)
    if args.json:
        print(json.dumps({"metadata": meta, "stats": stats}, indent=1))
    else:
        print(describe(path, meta, stats))
    if not args.no_plot:
        out = Path(args.plot) if args.plot else path.with_suffix(path.suffix + ".png")
        title = f"{path.name}: {metadata_value(meta.get('model_type'))}, {stats['strategy']}"
        written = plot_histograms(stats, out, title)
        if written:
            print(f"wrote {written}", flush=True)
    return 0
