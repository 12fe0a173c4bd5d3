"""`camelot icl`'s results: one row per (strategy, seed, shots), their summary over seeds with a
95% interval, the markdown table and the accuracy-vs-shots plot."""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# two-sided 95% Student-t quantiles for 1..30 degrees of freedom (no scipy dependency)
_T95 = [12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145, 2.131,
        2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042]


@dataclass
class RunRow:
    strategy: str
    seed: int
    shots: int
    accuracy: float
    correct: int
    n_test: int
    demos_in_window: int
    demos_in_memory: int
    window_tokens: int
    memory_tokens: int
    feed_seconds: float
    score_seconds: float
    reused: str | None = None  # identical inputs were already scored (e.g. memory empty: == window)

    @property
    def demos_per_second(self) -> float | None:
        if not self.demos_in_memory or self.reused or self.feed_seconds <= 0:
            return None
        return self.demos_in_memory / self.feed_seconds


# ---------------------------------------------------------------------------- summaries
def mean_ci(values: Sequence[float]) -> tuple[float, float, float]:
    """(mean, sample std, half-width of the 95% Student-t interval over seeds)."""
    n = len(values)
    if n == 0:
        return float("nan"), float("nan"), float("nan")
    m = statistics.fmean(values)
    if n == 1:
        return m, 0.0, float("nan")
    sd = statistics.stdev(values)
    t = _T95[n - 2] if n - 1 <= len(_T95) else 1.96
    return m, sd, t * sd / math.sqrt(n)


def summarize(rows: Sequence[RunRow]) -> list[dict[str, Any]]:
    groups: dict[tuple[str, int], list[RunRow]] = {}
    for r in rows:
        groups.setdefault((r.strategy, r.shots), []).append(r)
    out = []
    for (strategy, k), rs in groups.items():
        accs = [r.accuracy for r in rs]
        m, sd, ci = mean_ci(accs)
        dps = [r.demos_per_second for r in rs if r.demos_per_second]
        tps = [r.memory_tokens / r.feed_seconds for r in rs if r.demos_per_second]
        out.append({
            "strategy": strategy, "shots": k, "seeds": len(rs), "accuracy": m, "std": sd, "ci95": ci,
            "per_seed": accs, "n_test": rs[0].n_test,
            "demos_in_window": statistics.fmean(r.demos_in_window for r in rs),
            "demos_in_memory": statistics.fmean(r.demos_in_memory for r in rs),
            "demos_per_second": statistics.fmean(dps) if dps else None,
            "memory_tokens_per_second": statistics.fmean(tps) if tps else None,
        })
    return out


def _pct(m: float, ci: float) -> str:
    """Accuracy % with its 95% interval over seeds, clipped to [0, 100] (accuracy cannot leave it,
    whatever a t-interval over two seeds says)."""
    if math.isnan(ci):
        return f"{100 * m:.1f}"
    lo, hi = max(0.0, m - ci), min(1.0, m + ci)
    return f"{100 * m:.1f} [{100 * lo:.0f}, {100 * hi:.0f}]"


def markdown_table(summary: Sequence[dict[str, Any]], strategies: Sequence[str], title: str) -> str:
    by = {(s["strategy"], s["shots"]): s for s in summary}
    shots = sorted({s["shots"] for s in summary})
    lines = [f"### {title}", "", "| shots | demos in window | " + " | ".join(strategies) + " |",
             "|---:|---:|" + "---:|" * len(strategies)]
    for k in shots:
        if k == 0:
            z = by.get(("zero-shot", 0))
            if z:
                lines.append("| 0 (zero-shot) | 0 | " + " | ".join(_pct(z["accuracy"], z["ci95"]) for _ in strategies)
                             + " |")
            continue
        cells = []
        win = None
        for s in strategies:
            r = by.get((s, k))
            cells.append(_pct(r["accuracy"], r["ci95"]) if r else "")
            win = win if win is not None or not r else r["demos_in_window"]
        lines.append(f"| {k} | {win:g} | " + " | ".join(cells) + " |")
    speed = [s for s in summary if s["demos_per_second"]]
    if speed:
        lines += ["", "| strategy | shots | demos in memory | demos/s fed | tokens/s fed |",
                  "|---|---:|---:|---:|---:|"]
        for s in sorted(speed, key=lambda s: (s["strategy"], s["shots"])):
            lines.append(f"| {s['strategy']} | {s['shots']} | {s['demos_in_memory']:g} | {s['demos_per_second']:.1f} "
                         f"| {s['memory_tokens_per_second']:.0f} |")
    return "\n".join(lines) + "\n"


def plot(summary: Sequence[dict[str, Any]], strategies: Sequence[str], path: Path, title: str) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    fit = []
    for s in strategies:
        pts = sorted((r["shots"], r["accuracy"], 0.0 if math.isnan(r["ci95"]) else r["ci95"])
                     for r in summary if r["strategy"] == s and r["shots"] > 0)
        fit += [r["demos_in_window"] for r in summary if r["strategy"] == s and r["shots"] > 0]
        if pts:
            x, y, e = zip(*pts)
            below = [100 * (v - max(0.0, v - c)) for v, c in zip(y, e)]  # the interval clipped to [0, 100]
            above = [100 * (min(1.0, v + c) - v) for v, c in zip(y, e)]
            ax.errorbar(x, [100 * v for v in y], yerr=[below, above], marker="o", capsize=3, label=s)
    zero = [r for r in summary if r["strategy"] == "zero-shot"]
    if zero:
        ax.axhline(100 * zero[0]["accuracy"], color="gray", linestyle="--", label="zero-shot")
    if fit:
        ax.axvline(max(fit), color="gray", linestyle=":", label=f"fit in window (~{max(fit):g})")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("demonstrations (shots)")
    ax.set_ylabel("accuracy (%)")
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
