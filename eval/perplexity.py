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
import json
import math
import time
from collections.abc import Callable
from pathlib import Path

import torch
from camelot.eval.hf_cache import cache_kwarg, new_cache
from camelot.eval.plan import (  # noqa: F401  (re-exported for passkey, retrieval and tests)
    ALL_STRATEGIES,
    DEFAULT_STRATEGIES,
    RunResult,
    RunSpec,
    Sweep,
    add_sweep_args,
    parse_layers,
    parse_list,
    plan_runs,
    sweep_at_budget,
    sweep_from_args,
)

from camelot.config import CamelotConfig
from camelot.documents import add_data_limit_arg, data_limit
from camelot.options import UserError, add_model_args, load_model_from_args
from camelot.progress import progress_bar

DEFAULT_MAX_TOKENS = 4096
DEFAULT_BUCKET = 512


# ---------------------------------------------------------------------------- running
FULL_CHUNK = 1024  # tokens per forward of the `full` strategy


def token_nll_full(model: torch.nn.Module, ids: torch.Tensor, chunk: int = FULL_CHUNK) -> torch.Tensor:
    """NLL [N-1] of the plain HF model over the whole document (no camelot): the `full` strategy.
    Fed in chunks through the model's own KV cache, which is exact attention over everything
    before, so that only a chunk's logits exist at a time: one forward of 16k tokens made
    [16k, vocab] float logits, 10 GB for Qwen's 151k vocabulary, and was killed for memory."""
    dev = next(model.parameters()).device
    x = ids.to(dev)[None]
    cache = {cache_kwarg(model): new_cache(model)}  # filled in place by each forward
    parts = []
    for start in range(0, x.shape[1] - 1, chunk):
        out = model(input_ids=x[:, start : start + chunk], use_cache=True, **cache)
        targets = x[0, start + 1 : start + chunk + 1]
        logits = out.logits[0, : targets.shape[0]].float()
        parts.append(torch.nn.functional.cross_entropy(logits, targets, reduction="none").cpu())
        del out, logits
    return torch.cat(parts) if parts else torch.zeros(0)


def evaluate(model: torch.nn.Module, docs: list, specs: list[RunSpec], bucket_size: int = DEFAULT_BUCKET,
             progress: bool = True, on_doc: Callable[[RunResult], None] | None = None) -> list[RunResult]:
    """Score every document under every run. `docs` hold `.name` and `.ids` ([N] long).
    on_doc(result): called as each (run, document) is scored, its figures in `result.docs[-1]`.

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
            if on_doc is not None:
                on_doc(res)
    finally:
        if cm is not None:
            cm.unwrap()
    return results


def _log_partial(out: Path, rank: int, n_procs: int) -> Callable[[RunResult], None]:
    """Append each scored (run, document) to out/partial.jsonl (one file per process) at once, so
    that a run killed late (memory, time) loses nothing already measured; the full report is
    written at the end."""
    path = out / ("partial.jsonl" if n_procs == 1 else f"partial.{rank}.jsonl")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("")

    def log(res: RunResult) -> None:
        with path.open("a") as f:
            f.write(json.dumps({"run": res.spec.label, **res.docs[-1]}) + "\n")

    return log


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


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "ppl", help="perplexity of camelot and its baselines, side by side",
        description="Perplexity of every strategy on the same tokens and segmentation; comma-separated "
        "values sweep a setting. Writes a Markdown table (stdout), results.json and PNG plots to --out. "
        "Example: camelot ppl --data ../shared/data/docs/state_union --max-docs 3 --window 128 "
        "--slots 512,2048 --threshold 0.7,0.9",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--data", required=True,
                   help="text file, folder of .txt files, .jsonl/.parquet file, saved datasets folder, "
                   "or builtin:genesis_kjv / builtin:state_union_1961_kennedy")
    p.add_argument("--text-field", default="text", help="field holding the text in .jsonl/.parquet/datasets rows")
    p.add_argument("--split", default=None, help="split of a saved DatasetDict (default: test, or the only one)")
    add_sweep_args(p)
    p.add_argument("--max-docs", type=int, default=None, help="use at most this many documents")
    add_data_limit_arg(p)
    p.add_argument("--max-tokens", type=int, default=DEFAULT_MAX_TOKENS,
                   help="keep the first T tokens of each document (0: all)")
    p.add_argument("--bucket-size", type=int, default=DEFAULT_BUCKET, help="tokens per position bucket in the plot")
    p.add_argument("--out", default="results/ppl", help="folder for results.json and plots")
    p.add_argument("--seed", type=int, default=0, help="torch seed (for randomised search backends)")
    add_model_args(p)
    p.set_defaults(func=run_cli)


def run_cli(args: argparse.Namespace) -> int:
    from camelot.eval import report

    from camelot.documents import load_documents, tokenize_documents

    # Everything the user could get wrong is checked before the (slow) model load.
    specs = plan_runs(sweep_at_budget(args, str(CamelotConfig.slots)))
    if args.max_tokens is not None and args.max_tokens < 0:
        raise UserError(f"--max-tokens must be >= 0, got {args.max_tokens}")
    if args.bucket_size < 1:
        raise UserError(f"--bucket-size must be >= 1, got {args.bucket_size}")
    docs = load_documents(args.data, args.text_field, args.split, args.max_docs, data_limit(args))
    torch.manual_seed(args.seed)
    model, tok = load_model_from_args(args)
    tokenize_documents(docs, tok, args.max_tokens or None)
    max_pos = _max_positions(model)
    too_big = [w for w in {s.window for s in specs if s.window} if max_pos is not None and w > max_pos]
    if too_big:
        raise UserError(f"--window {max(too_big)} exceeds the model's {max_pos} positions")

    # Under `accelerate launch`, each process scores its share and the main process reports.
    from camelot.eval import parallel

    mine = parallel.shard(docs)
    out = Path(args.out)
    results = evaluate(model, mine, specs, args.bucket_size, progress=not args.no_progress,
                       on_doc=_log_partial(out, *parallel.world()))
    results = parallel.gather(results, [d.name for d in docs])
    if not parallel.is_main_process():
        return 0
    config = {k: v for k, v in vars(args).items() if k != "func"}
    config["documents"] = [{"name": d.name, "tokens": d.n_tokens} for d in docs]
    written = report.write_all(results, config, out, args.bucket_size)
    print(report.markdown_table(results))
    for r in results:
        if r.skipped:
            print(f"\nnote: {r.spec.strategy} skipped: {r.skipped}")
    print(f"\n{sum(d.n_tokens for d in docs)} tokens in {len(docs)} document(s); wrote "
          + ", ".join(str(p) for p in written))
    return 0
