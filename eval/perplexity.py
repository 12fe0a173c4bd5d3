"""`camelot ppl`: perplexity of every strategy side by side, on the same tokens and segmentation.

One invocation runs a plan of runs (see `plan_runs`): per window, the baselines once
(`window`, `recurrent`), `sliding` once per slot budget, `knn` per top_k, and `camelot` over the
cartesian product of the swept memory settings; `full` (the unwrapped model over the whole
document in one plain forward) once. Every run scores exactly the same token ids, so token
counts are equal across runs and perplexities are comparable.

How tokens are counted: a document of N tokens yields N-1 predictions (token t+1 from tokens
<= t). Segments are `window` tokens; the last token of a segment predicts the first token of the
next segment, so for `window` that boundary token is predicted with the previous segment as its
only context (it is never dropped or counted twice).
"""

from __future__ import annotations

import argparse
import itertools
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from camelot.cli import UserError, parse_count_bias, parse_top_k
from camelot.config import STRATEGIES, CamelotConfig
from camelot.progress import progress_bar
from camelot.search import BACKENDS

ALL_STRATEGIES = (*STRATEGIES, "full")
DEFAULT_STRATEGIES = ("window", "recurrent", "sliding", "knn", "camelot", "full")
DEFAULT_MAX_TOKENS = 4096
DEFAULT_BUCKET = 512


# ---------------------------------------------------------------------------- the plan
@dataclass
class Sweep:
    """Every value to try for each setting; `plan_runs` turns it into runs."""

    strategies: tuple[str, ...] = DEFAULT_STRATEGIES
    windows: tuple[int, ...] = (128,)
    slots: tuple[int, ...] = (CamelotConfig.slots,)
    thresholds: tuple[float, ...] = (CamelotConfig.threshold,)
    top_ks: tuple[int | None, ...] = (CamelotConfig.top_k,)
    knn_top_ks: tuple[int | None, ...] = (32,)  # knn reads k of every stored token (Memorizing Transformer)
    count_biases: tuple[float, ...] = (CamelotConfig.count_bias,)
    memory_distances: tuple[int | None, ...] = (None,)
    placements: tuple[str, ...] = (CamelotConfig.placement,)
    retrieves: tuple[str, ...] = (CamelotConfig.retrieve,)
    layers: tuple[list[int] | None, ...] = (None,)
    recents: tuple[int, ...] = (CamelotConfig.recent,)
    sinks: tuple[int, ...] = (CamelotConfig.sink,)
    search: str = CamelotConfig.search
    write_mode: str = CamelotConfig.write_mode


@dataclass
class RunSpec:
    """One row of the results: a strategy with its settings (`config` is None for `full`)."""

    strategy: str
    window: int | None
    params: dict[str, Any]
    config: CamelotConfig | None

    @property
    def label(self) -> str:
        shown = " ".join(f"{k}={_fmt_param(v, k)}" for k, v in self.params.items())
        return f"{self.strategy} {shown}".strip()


@dataclass
class RunResult:
    """Token-weighted totals of one run over all documents, with per-position buckets."""

    spec: RunSpec
    nll_sum: float = 0.0
    tokens: int = 0
    seconds: float = 0.0
    bucket_nll: list[float] = field(default_factory=list)
    bucket_tokens: list[int] = field(default_factory=list)
    docs: list[dict[str, Any]] = field(default_factory=list)
    skipped: str | None = None

    @property
    def ppl(self) -> float:
        return math.exp(self.nll_sum / self.tokens) if self.tokens else float("nan")

    @property
    def tokens_per_second(self) -> float:
        return self.tokens / self.seconds if self.seconds > 0 else float("nan")

    def bucket_ppl(self) -> list[float | None]:
        return [math.exp(s / n) if n else None for s, n in zip(self.bucket_nll, self.bucket_tokens)]


def plan_runs(sweep: Sweep) -> list[RunSpec]:
    """Runs for a sweep: memory settings multiply only where a strategy uses them, so baselines
    run once per window. Every config is validated here, before any model is loaded."""
    unknown = [s for s in sweep.strategies if s not in ALL_STRATEGIES]
    if unknown:
        raise UserError(f"unknown strategy {unknown[0]!r}; choose from {', '.join(ALL_STRATEGIES)}")
    specs: list[RunSpec] = []
    base = {"search": sweep.search, "write_mode": sweep.write_mode}
    for w in sweep.windows:
        for strategy in (s for s in sweep.strategies if s != "full"):
            if strategy == "window":
                grid = [{}]
            elif strategy == "recurrent":
                grid = _product(sink=sweep.sinks)
            elif strategy == "sliding":  # the same KV budget as camelot: its slots plus its raw tail
                budgets = sorted({s + r for s in sweep.slots for r in sweep.recents})
                grid = _product(slots=tuple(budgets), sink=sweep.sinks)
            elif strategy == "knn":
                grid = _product(top_k=sweep.knn_top_ks, recent=sweep.recents, sink=sweep.sinks,
                                memory_distance=sweep.memory_distances, placement=sweep.placements,
                                retrieve=sweep.retrieves, layers=sweep.layers)
            else:
                grid = _product(slots=sweep.slots, recent=sweep.recents, sink=sweep.sinks, threshold=sweep.thresholds,
                                top_k=sweep.top_ks, count_bias=sweep.count_biases,
                                memory_distance=sweep.memory_distances, placement=sweep.placements,
                                retrieve=sweep.retrieves, layers=sweep.layers)
            for params in grid:
                try:
                    cfg = CamelotConfig(window=w, strategy=strategy, **base, **params)
                except ValueError as e:
                    raise UserError(f"{strategy} with window={w} {params}: {e}") from None
                specs.append(RunSpec(strategy, w, _shown(params, sweep), cfg))
    if "full" in sweep.strategies:
        specs.append(RunSpec("full", None, {}, None))
    return specs


def _product(**axes: tuple) -> list[dict[str, Any]]:
    keys = list(axes)
    return [dict(zip(keys, combo)) for combo in itertools.product(*(axes[k] for k in keys))]


def _shown(params: dict[str, Any], sweep: Sweep) -> dict[str, Any]:
    """The params a table row names: always slots/threshold/top_k/count_bias where they apply;
    memory_distance and layers only when set or swept (they are rarely changed)."""
    out = {}
    for k, v in params.items():
        if k == "memory_distance" and len(sweep.memory_distances) == 1 and v is None:
            continue
        if k == "layers" and len(sweep.layers) == 1 and v is None:
            continue
        if k == "placement" and len(sweep.placements) == 1:
            continue
        if k == "retrieve" and len(sweep.retrieves) == 1:
            continue
        if k in ("recent", "sink") and v == 0 and len(getattr(sweep, k + "s")) == 1:
            continue
        out[k] = v
    return out


def _fmt_param(v: Any, key: str = "") -> str:
    if isinstance(v, bool) or (key == "count_bias" and v in (0, 1)):
        return "on" if v else "off"
    if v is None:
        return "all" if key == "top_k" else "default"
    if isinstance(v, list):
        return format_layers(v)
    return str(v)


# ---------------------------------------------------------------------------- running
def token_nll_full(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    """NLL [N-1] of a plain HF forward of the whole document (no camelot): the `full` strategy."""
    dev = next(model.parameters()).device
    x = ids.to(dev)[None]
    logits = model(input_ids=x, use_cache=False).logits[0, :-1]
    return torch.nn.functional.cross_entropy(logits.float(), x[0, 1:], reduction="none").cpu()


def evaluate(model: torch.nn.Module, docs: list, specs: list[RunSpec], bucket_size: int = DEFAULT_BUCKET,
             progress: bool = True) -> list[RunResult]:
    """Score every document under every run. `docs` hold `.name` and `.ids` ([N] long).

    The model is wrapped once per run and unwrapped afterwards (also on error), so it comes back
    as it was. Overall progress counts (run, document) pairs; each document shows its segments."""
    import camelot

    max_pos = _max_positions(model)
    longest = max(d.ids.numel() for d in docs)
    n_buckets = math.ceil(longest / bucket_size)
    results = [RunResult(s, bucket_nll=[0.0] * n_buckets, bucket_tokens=[0] * n_buckets) for s in specs]
    for r in results:
        if r.spec.strategy == "full" and max_pos is not None and longest > max_pos:
            r.skipped = (f"a document has {longest} tokens, beyond the model's {max_pos} positions; "
                         f"use --max-tokens {max_pos} to compare with full context")
    pairs = [(i, j) for i, r in enumerate(results) if r.skipped is None for j in range(len(docs))]
    cm, current = None, None
    try:
        for i, j in progress_bar(pairs, desc="ppl (runs x docs)", enabled=progress, unit="doc"):
            res, doc = results[i], docs[j]
            spec = res.spec
            if i != current:
                if cm is not None:
                    cm.unwrap()
                    cm = None
                if spec.config is not None:
                    cm = camelot.wrap(model, spec.config)
                current = i
            if cm is None:  # full
                t0 = time.perf_counter()
                with torch.no_grad():
                    nll = token_nll_full(model, doc.ids)
                seconds = time.perf_counter() - t0
            else:
                out = cm.score(doc.ids, progress=progress, desc=f"{spec.label} | {doc.name}")
                nll, seconds = out.token_nll[0], out.seconds
            _accumulate(res, doc.name, nll, seconds, bucket_size)
    finally:
        if cm is not None:
            cm.unwrap()
    return results


def _accumulate(res: RunResult, name: str, nll: torch.Tensor, seconds: float, bucket_size: int) -> None:
    nll = nll.double()
    # bucket of the predicted token's position in the document (token t+1 for nll[t])
    bucket = torch.arange(1, nll.numel() + 1) // bucket_size
    sums = torch.bincount(bucket, weights=nll, minlength=len(res.bucket_nll))
    counts = torch.bincount(bucket, minlength=len(res.bucket_nll))
    for b in range(len(res.bucket_nll)):
        res.bucket_nll[b] += float(sums[b])
        res.bucket_tokens[b] += int(counts[b])
    total = float(nll.sum())
    res.nll_sum += total
    res.tokens += nll.numel()
    res.seconds += seconds
    # nll_sum lets a data-parallel run (eval/parallel.py) re-add documents in their own order
    res.docs.append({"name": name, "tokens": nll.numel(), "ppl": math.exp(total / nll.numel()),
                     "seconds": seconds, "nll_sum": total})


def _max_positions(model: torch.nn.Module) -> int | None:
    from camelot.adapters import get_adapter

    return get_adapter(model).max_positions(model)


# ---------------------------------------------------------------------------- CLI
def parse_list(text: str, kind: type, name: str) -> tuple:
    """"128,256" -> (128, 256) with a clear error naming the option."""
    items = [t.strip() for t in str(text).split(",") if t.strip()]
    if not items:
        raise UserError(f"--{name} needs at least one value")
    out = []
    for t in items:
        try:
            out.append(kind(t))
        except (ValueError, argparse.ArgumentTypeError):
            raise UserError(f"--{name}: {t!r} is not a valid {kind.__name__}") from None
    return tuple(out)


def parse_distance(text: str) -> int | None:
    return None if text.strip().lower() in ("default", "none") else int(text)


def parse_layers(text: str) -> tuple[list[int] | str | None, ...]:
    """"default/all/0-14/15,20-29" -> (None, "all", [0..14], [15, 20..29]): '/' separates sweep
    values; default is the adapter's choice (gemma2/3: the full-attention layers)."""
    out: list[list[int] | str | None] = []
    for chunk in text.split("/"):
        chunk = chunk.strip()
        if chunk.lower() in ("default", ""):
            out.append(None)
            continue
        if chunk.lower() == "all":
            out.append("all")
            continue
        layers: list[int] = []
        try:
            for part in chunk.split(","):
                a, _, b = part.partition("-")
                layers.extend(range(int(a), int(b) + 1) if b else [int(a)])
        except ValueError:
            raise UserError(f"--layers: {chunk!r} is not a layer list like 0-14,20 (or 'all')") from None
        out.append(sorted(set(layers)))
    return tuple(out)


def format_layers(layers: list[int]) -> str:
    runs, start = [], layers[0]
    for a, b in zip(layers, layers[1:] + [None]):
        if b != a + 1:
            runs.append(f"{start}-{a}" if a != start else f"{a}")
            start = b
    return ",".join(runs)


def sweep_from_args(args: argparse.Namespace) -> Sweep:
    return Sweep(
        strategies=parse_list(args.strategies, str, "strategies"),
        windows=parse_list(args.window, int, "window"),
        slots=parse_list(args.slots, int, "slots"),
        thresholds=parse_list(args.threshold, float, "threshold"),
        top_ks=parse_list(args.top_k, parse_top_k, "top-k"),
        knn_top_ks=parse_list(args.knn_top_k, parse_top_k, "knn-top-k"),
        recents=parse_list(args.recent, int, "recent"),
        sinks=parse_list(args.sink, int, "sink"),
        count_biases=parse_list(args.count_bias, parse_count_bias, "count-bias"),
        memory_distances=parse_list(args.memory_distance, parse_distance, "memory-distance"),
        placements=parse_list(args.placement, str, "placement"),
        retrieves=parse_list(args.retrieve, str, "retrieve"),
        layers=parse_layers(args.layers),
        search=args.search,
        write_mode=args.write_mode,
    )


def add_sweep_args(p: argparse.ArgumentParser, **defaults: str) -> None:
    """The memory settings a run sweeps (comma-separated values), shared by `camelot ppl` and
    `camelot passkey`; `defaults` overrides a default by option name (window="512")."""
    d = CamelotConfig
    dflt = {"strategies": ",".join(DEFAULT_STRATEGIES), "window": str(d.window), "slots": str(d.slots),
            "placement": d.placement, **defaults}
    p.add_argument("--strategies", default=dflt["strategies"], help=f"from {','.join(ALL_STRATEGIES)}")
    p.add_argument("--window", default=dflt["window"], help="segment length(s)")
    p.add_argument("--slots", default=dflt["slots"],
                   help="consolidated memory slots per KV head (camelot); sliding caches slots + recent raw tokens")
    p.add_argument("--threshold", default=str(d.threshold), help="merge threshold(s), cosine similarity")
    p.add_argument("--top-k", default=_fmt_param(d.top_k, "top_k"),
                   help="memory slots read per query (camelot, knn); 'all' reads every slot")
    p.add_argument("--knn-top-k", default="32", help="stored tokens read per query by knn ('all': every one)")
    p.add_argument("--recent", default=str(d.recent),
                   help="raw tokens kept before the segment; tokens reach memory as they leave this tail "
                   "(camelot, knn). sliding caches slots + recent tokens, the same budget")
    p.add_argument("--sink", default=str(d.sink),
                   help="first tokens of the document kept raw for good, the attention sinks (recurrent, sliding, "
                   "knn, camelot)")
    p.add_argument("--count-bias", default=_fmt_param(d.count_bias, "count_bias"),
                   help="factor(s) of the log(count / mean count) bias on slot logits: numbers, on (1) or off (0); "
                   "0,0.7,1 sweeps")
    p.add_argument("--memory-distance", default="default",
                   help="positions between memory and the segment start ('default' = one window)")
    p.add_argument("--placement", default=dflt["placement"],
                   help="where memory sits for rotary models: recency (each slot at its last write) or fixed "
                   "(all at --memory-distance, the paper); fixed,recency sweeps")
    p.add_argument("--retrieve", default=d.retrieve,
                   help="how a top-k read picks slots: query (each query head's highest logits), group (one "
                   "top-k per KV head for its query heads together: cheaper) or key (the paper's rule: the slots "
                   "nearest the token's key); query,group sweeps")
    p.add_argument("--layers", default="default",
                   help="layers with memory: default (the adapter's choice: all, or gemma2/3's full-attention "
                   "layers), all, or a list like 0-14,20; '/' sweeps: default/all")
    p.add_argument("--search", default=d.search, help=f"search backend ({', '.join(BACKENDS)})")
    p.add_argument("--write-mode", default=d.write_mode, help="segment (fast) or token (sequential)")


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "ppl", help="perplexity of camelot and its baselines, side by side",
        description="Perplexity of every strategy on the same tokens and segmentation; comma-separated "
        "values sweep a setting. Writes a Markdown table (stdout), results.json and PNG plots to --out. "
        "Example: camelot ppl --data ../shared/data/docs/state_union --max-docs 3 --window 128 "
        "--slots 512,2048 --threshold 0.7,0.9",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", default="smollm2", help="bundled short name (smollm2, gemma3-270m) or a local folder")
    p.add_argument("--data", required=True,
                   help="text file, folder of .txt files, .jsonl/.parquet file, saved datasets folder, "
                   "or builtin:genesis_kjv / builtin:state_union_1961_kennedy")
    p.add_argument("--text-field", default="text", help="field holding the text in .jsonl/.parquet/datasets rows")
    p.add_argument("--split", default=None, help="split of a saved DatasetDict (default: test, or the only one)")
    add_sweep_args(p)
    p.add_argument("--max-docs", type=int, default=None, help="use at most this many documents")
    p.add_argument("--max-data-mb", type=float, default=256.0,  # eval/data.py MAX_DATA_BYTES
                   help="refuse data files (or a folder of .txt files) larger than this many MiB")
    p.add_argument("--max-tokens", type=int, default=DEFAULT_MAX_TOKENS,
                   help="keep the first T tokens of each document (0: all)")
    p.add_argument("--bucket-size", type=int, default=DEFAULT_BUCKET, help="tokens per position bucket in the plot")
    p.add_argument("--out", default="results/ppl", help="folder for results.json and plots")
    p.add_argument("--seed", type=int, default=0, help="torch seed (for randomised search backends)")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"))
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")
    p.set_defaults(func=run_cli)


def run_cli(args: argparse.Namespace) -> int:
    from camelot.eval import report
    from camelot.eval.data import load_documents, tokenize_documents

    # Everything the user could get wrong is checked before the (slow) model load.
    specs = plan_runs(sweep_from_args(args))
    if args.max_tokens is not None and args.max_tokens < 0:
        raise UserError(f"--max-tokens must be >= 0, got {args.max_tokens}")
    if args.bucket_size < 1:
        raise UserError(f"--bucket-size must be >= 1, got {args.bucket_size}")
    docs = load_documents(args.data, args.text_field, args.split, args.max_docs, int(args.max_data_mb * 2**20))
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    model, tok = _load(args)
    tokenize_documents(docs, tok, args.max_tokens or None)
    max_pos = _max_positions(model)
    too_big = [w for w in {s.window for s in specs if s.window} if max_pos is not None and w > max_pos]
    if too_big:
        raise UserError(f"--window {max(too_big)} exceeds the model's {max_pos} positions")

    # Under `accelerate launch`, each process scores its share and the main process reports.
    from camelot.eval import parallel

    mine = parallel.shard(docs)
    results = evaluate(model, mine, specs, args.bucket_size, progress=not args.no_progress)
    results = parallel.gather(results, [d.name for d in docs])
    if not parallel.is_main_process():
        return 0
    config = {k: v for k, v in vars(args).items() if k != "func"}
    config["documents"] = [{"name": d.name, "tokens": d.n_tokens} for d in docs]
    out = Path(args.out)
    written = report.write_all(results, config, out, args.bucket_size)
    print(report.markdown_table(results))
    for r in results:
        if r.skipped:
            print(f"\nnote: {r.spec.strategy} skipped: {r.skipped}")
    print(f"\n{sum(d.n_tokens for d in docs)} tokens in {len(docs)} document(s); wrote "
          + ", ".join(str(p) for p in written))
    return 0


def _load(args: argparse.Namespace):
    import camelot

    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[args.dtype]
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if args.no_progress:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()  # its "Loading weights" bar too
    try:
        return camelot.load_model(args.model, dtype=dtype, device=device)
    except (OSError, ValueError) as e:  # missing folder / not a model: transformers raises these
        if isinstance(e, FileNotFoundError) and "package" in str(e):
            raise
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(f"cannot load model {args.model!r}: {first}") from None
