"""`camelot passkey`'s reports: accuracy tables by length and depth, JSON, length labels."""

from __future__ import annotations

from dataclasses import asdict
from typing import Any

PasskeyResult = Any  # camelot.eval.passkey.PasskeyResult (not imported: passkey imports this module)


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.0f}"


def markdown_tables(results: list[PasskeyResult], lengths: list[int], depths: list[int]) -> str:
    """Accuracy (%) by length (all depths), then by length x depth; seconds per run."""
    head = "| run | " + " | ".join(format_length(n) for n in lengths) + " | all | seconds |"
    lines = ["Accuracy (%) by length, over all depths and trials", "", head,
             "|" + "---|" * (len(lengths) + 3)]
    for r in results:
        if r.skipped:
            lines.append(f"| {r.spec.label} | " + " | ".join("-" for _ in lengths) + " | skipped | - |")
            continue
        cells = [_pct(r.accuracy(n)) for n in lengths]
        lines.append(f"| {r.spec.label} | " + " | ".join(cells) + f" | {_pct(r.accuracy())} | {r.seconds:.0f} |")
    cols = [(n, d) for n in lengths for d in depths]
    lines += ["", "Accuracy (%) by length @ depth (%)", "",
              "| run | " + " | ".join(f"{format_length(n)}@{d}" for n, d in cols) + " |",
              "|" + "---|" * (len(cols) + 1)]
    for r in results:
        if not r.skipped:
            lines.append(f"| {r.spec.label} | " + " | ".join(_pct(r.accuracy(n, d)) for n, d in cols) + " |")
    return "\n".join(lines)


def format_length(n: int) -> str:
    return f"{n // 1024}k" if n % 1024 == 0 else str(n)


def parse_length(text: str) -> int:
    """"2k" -> 2048, "128K" -> 131072, "1500" -> 1500."""
    t = text.strip().lower()
    return int(t[:-1]) * 1024 if t.endswith("k") else int(t)


def to_json(results: list[PasskeyResult], config: dict[str, Any], lengths: list[int], depths: list[int]) -> dict:
    return {
        "config": config,
        "runs": [{"label": r.spec.label, "strategy": r.spec.strategy, "window": r.spec.window,
                  "params": r.spec.params, "config": r.spec.config.to_dict() if r.spec.config else None,
                  "skipped": r.skipped, "note": r.note, "seconds": r.seconds, "accuracy": r.accuracy(),
                  "by_length": {str(n): r.accuracy(n) for n in lengths},
                  "by_length_depth": {f"{n}@{d}": r.accuracy(n, d) for n in lengths for d in depths},
                  "trials": [asdict(t) for t in r.trials]} for r in results],
    }
