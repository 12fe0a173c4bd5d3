"""`camelot soak`: a long run that shows memory stays bounded.

Streams many tokens (default 1M) through a wrapped model and prints, every `--report-every`
tokens: throughput over the last interval, the process RSS, the bytes held by camelot's state
(memory banks, prefixes, the open segment), slots in use, perplexity of the interval and the
write telemetry. With `camelot` (or `window`, `recurrent`, `sliding`) the camelot state has a
fixed size once the bank is full, so RSS must stay flat after warm-up; `knn` grows by design
and makes a useful contrast.

The text is the packaged Genesis (KJV) tokenised once and repeated, or a `--data` text file.
Tokens are scored with `keep_memory=True` interval after interval, so the run is one long
document and every interval's perplexity also proves that no NaN crept in.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from camelot.cli import UserError, add_memory_args, memory_config
from camelot.documents import add_data_limit_arg
from camelot.options import add_model_args, load_model_from_args
from camelot.progress import progress_bar

DEFAULT_TOKENS = 1_000_000
DEFAULT_REPORT = 50_000


@dataclass
class SoakReport:
    """One line of the soak: totals so far and figures of the last interval."""

    tokens: int
    seconds: float
    tokens_per_second: float  # over the last interval
    rss_mb: float
    state_mb: float  # bytes in camelot's memory banks and prefixes (not the open segment, < one window)
    slots_used: int
    ppl: float  # of the last interval's predictions
    telemetry: dict[str, int] = field(default_factory=dict)
    gpu_mb: float | None = None  # torch.cuda.memory_allocated when the model is on a GPU

    def line(self) -> str:
        tel = " ".join(f"{k}={v}" for k, v in self.telemetry.items())
        gpu = "" if self.gpu_mb is None else f"GPU {self.gpu_mb:8.1f} MiB  "
        return (f"{self.tokens:>9,d} tok  {self.tokens_per_second:8.1f} tok/s  RSS {self.rss_mb:8.1f} MiB  {gpu}"
                f"state {self.state_mb:7.2f} MiB  slots {self.slots_used:>7d}  ppl {self.ppl:8.2f}  {tel}")


def rss_mb() -> float:
    """Resident set size of this process now (not the peak), in MiB."""
    try:
        with open("/proc/self/statm") as f:
            pages = int(f.read().split()[1])
        return pages * os.sysconf("SC_PAGE_SIZE") / 2**20
    except (OSError, ValueError, IndexError):
        pass
    try:
        import psutil

        return psutil.Process().memory_info().rss / 2**20
    except ImportError:  # last resort: the peak (ru_maxrss is KiB on Linux)
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def state_bytes(cm, include_open: bool = False) -> int:
    """Bytes in the tensors camelot holds for a wrapped model (all layers): memory banks and raw
    prefixes, plus the open segment if `include_open` (it varies with where an interval ends
    inside a segment, so the flatness check leaves it out; it never exceeds one window)."""
    total = 0
    for rt in cm.runtimes:
        held = [rt.state.local_k, rt.state.local_v] if include_open else []
        for part in (rt.state.memory, rt.state.prefix):
            if part is not None:
                held += [getattr(part, n, None) for n in ("keys", "values", "counts", "ages", "valid")]
        total += sum(t.numel() * t.element_size() for t in held if isinstance(t, torch.Tensor))
    return total


def slots_used(cm) -> int:
    """Occupied slots (camelot) or stored tokens (knn) summed over layers, rows and KV heads."""
    n = 0
    for rt in cm.runtimes:
        state = rt.state.memory.readable() if rt.state.memory is not None else None
        if state is not None:
            n += int(state[3].sum())
    return n


def cycled(source: torch.Tensor, start: int, n: int) -> torch.Tensor:
    """n tokens of `source` repeated without end, from offset `start`."""
    idx = (torch.arange(start, start + n) % source.numel())
    return source[idx]


def run_soak(cm, source: torch.Tensor, total_tokens: int, report_every: int,
             on_report: Callable[[SoakReport], None] | None = None, progress: bool = True) -> list[SoakReport]:
    """Score `total_tokens` tokens of `source` (cycled) as one long document, `report_every`
    tokens at a time, keeping memory between intervals. Returns one report per interval."""
    if total_tokens < 1 or report_every < 1:
        raise UserError("--tokens and --report-every must be >= 1")
    cm.reset()
    reports: list[SoakReport] = []
    done, t_start = 0, time.perf_counter()
    starts = list(range(0, total_tokens, report_every))
    for a in progress_bar(starts, desc="soak", enabled=progress, unit="interval"):
        n = min(report_every, total_tokens - a)
        t0 = time.perf_counter()
        out = cm.score(cycled(source, a, n), keep_memory=True)
        dt = time.perf_counter() - t0
        done += n
        gpu = torch.cuda.memory_allocated(cm.device) / 2**20 if cm.device.type == "cuda" else None
        rep = SoakReport(tokens=done, seconds=time.perf_counter() - t_start, tokens_per_second=n / max(dt, 1e-9),
                         rss_mb=rss_mb(), state_mb=state_bytes(cm) / 2**20, slots_used=slots_used(cm),
                         ppl=out.perplexity, telemetry=cm.memory.telemetry(), gpu_mb=gpu)
        reports.append(rep)
        if on_report is not None:
            on_report(rep)
    return reports


def summarize(reports: list[SoakReport], warmup: int = 1) -> dict[str, float]:
    """Growth after warm-up (the first `warmup` reports): what must stay near zero."""
    if not reports:
        return {}
    base = reports[min(warmup, len(reports)) - 1]
    last = reports[-1]
    speeds = [r.tokens_per_second for r in reports[min(warmup, len(reports) - 1):]]
    return {
        "tokens": last.tokens,
        "seconds": last.seconds,
        "rss_after_warmup_mb": base.rss_mb,
        "rss_last_mb": last.rss_mb,
        "rss_growth_mb": last.rss_mb - base.rss_mb,
        "rss_max_mb": max(r.rss_mb for r in reports),
        "state_growth_mb": last.state_mb - base.state_mb,
        **({"gpu_growth_mb": last.gpu_mb - base.gpu_mb} if last.gpu_mb is not None and base.gpu_mb is not None
           else {}),
        "tokens_per_second_first": speeds[0],
        "tokens_per_second_last": speeds[-1],
        "any_nan_ppl": any(math.isnan(r.ppl) for r in reports),
    }


# ---------------------------------------------------------------------------- CLI
def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "soak", help="long run: tokens/s and RSS every interval (memory must stay flat)",
        description="Stream many tokens through a wrapped model as one document and print throughput, RSS and "
        "camelot's state size every interval. Example: camelot soak --tokens 200000 --report-every 10000 "
        "--threads 1",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_model_args(p, dtype=False)
    p.add_argument("--data", default=None, help="UTF-8 text file to repeat (default: the packaged Genesis)")
    add_data_limit_arg(p)
    p.add_argument("--tokens", type=int, default=DEFAULT_TOKENS, help="tokens to stream in total")
    p.add_argument("--report-every", type=int, default=DEFAULT_REPORT, help="tokens between report lines")
    add_memory_args(p)
    p.add_argument("--json", default=None, help="also write the reports and a summary to this JSON file")
    p.set_defaults(func=run_cli)


def run_cli(args: argparse.Namespace) -> int:
    import camelot
    from camelot.documents import data_limit, load_documents

    if args.tokens < 1 or args.report_every < 1:
        raise UserError("--tokens and --report-every must be >= 1")
    cfg = memory_config(args)
    text = load_documents(args.data or "builtin:genesis_kjv", max_bytes=data_limit(args))[0].text
    if args.threads:
        torch.set_num_threads(args.threads)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if args.no_progress:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()  # its "Loading weights" bar too
    try:
        model, tok = load_model_from_args(args)
    except OSError as e:
        raise UserError(f"cannot load model {args.model!r}: {str(e).strip().splitlines()[0]}") from None
    source = torch.tensor(tok(text, add_special_tokens=False, verbose=False)["input_ids"], dtype=torch.long)
    if source.numel() < 2:
        raise UserError("the soak text has fewer than 2 tokens")
    cm = camelot.wrap(model, cfg)
    print(f"soak: {args.model} {cfg.strategy} window={cfg.window} slots={cfg.slots} recent={cfg.recent} "
          f"evict={cfg.evict} span_reserve={cfg.span_reserve} surprise={cm.surprise.source} threshold={cfg.threshold} "
          f"read_top_k={cfg.read_top_k} on {device}, {torch.get_num_threads()} thread(s); "
          f"text of {source.numel()} tokens "
          f"repeated to {args.tokens:,d}", flush=True)
    reports = run_soak(cm, source, args.tokens, args.report_every,
                       on_report=lambda r: print(r.line(), flush=True), progress=not args.no_progress)
    summary = summarize(reports)
    print("summary: " + " ".join(f"{k}={v:.2f}" if isinstance(v, float) else f"{k}={v}"
                                 for k, v in summary.items()))
    if args.json:
        Path(args.json).write_text(json.dumps({"config": {k: v for k, v in vars(args).items() if k != "func"},
                                               "reports": [asdict(r) for r in reports], "summary": summary},
                                              indent=2))
    return 0
