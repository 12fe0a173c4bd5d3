"""`camelot bench`: speed of every strategy and search backend against window-only attention,
measured in one process on the same model, tokens and segmentation (ratios, not absolute
seconds: the CPU may be shared), plus growth with document length, recall of approximate
search, and a profile of one camelot segment.

Tables (Markdown on stdout, everything also in --json):
1. speed: median time per segment and tokens/s of window, recurrent, knn and camelot (slots x
   backend), each as a ratio to window. camelot banks are pre-filled to full with random slots
   before timing, so every row pays the steady-state cost of its slot count (a real document
   needs `slots` novel tokens per head before that happens). `window` is timed first and again
   last; the spread of the two says how much the shared CPU drifted during the run.
2. growth: tokens/s and peak RSS as the document grows (the text cycled to length), relative to
   the shortest length of the same strategy. camelot should stay flat; knn and full grow.
3. recall@k of approximate backends against exact search, sampled on every read of a real run.
4. profile: top ops of one camelot segment and every host-sync op (item, nonzero, ...) with the
   camelot source line that called it.
"""

from __future__ import annotations

import argparse
import json
import statistics
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import torch
from camelot.eval.bench_decode import decode_rows, decode_table, default_rows, defaults_table, read_share
from camelot.eval.bench_measure import (  # noqa: F401  (re-exported)
    SYNC_OPS,
    PeakRSS,
    RecallProbe,
    Row,
    _mib,
    fill_banks,
    profile_segment,
    run_full,
    run_wrapped,
    state_bytes,
)

from camelot import topk as native_topk
from camelot.backends import BACKENDS
from camelot.cli import UserError, parse_count_bias, parse_top_k
from camelot.config import RETRIEVALS, CamelotConfig
from camelot.documents import add_data_limit_arg
from camelot.options import add_model_args, load_model_from_args, parse_int_or_auto

APPROXIMATE = ("torch-bf16", "faiss-ivf", "faiss-hnsw")
TABLES = ("speed", "growth", "recall", "profile", "defaults", "decode")
DEFAULT_BACKENDS = "torch,torch-bf16,faiss,faiss-ivf,faiss-hnsw"


# ---------------------------------------------------------------------------- tables
def speed_rows(model, ids: torch.Tensor, base: CamelotConfig, strategies: list[str], slots: list[int],
               backends: list[str], progress: bool, retrieves: tuple[str, ...] = ("query",)) -> list[Row]:
    warm = ids[:, : 2 * base.window]  # first forwards pay one-off costs (allocator, kernels): not timed
    run_wrapped(model, warm, base.replace(strategy="window"), "warm-up", progress=False)
    run_wrapped(model, warm, base.replace(strategy="camelot", slots=min(slots)), "warm-up", progress=False)
    rows = [run_wrapped(model, ids, base.replace(strategy="window"), "window", progress=progress)]
    if "recurrent" in strategies:
        rows.append(run_wrapped(model, ids, base.replace(strategy="recurrent"), "recurrent", progress=progress))
    if "knn" in strategies:
        for b in backends:
            rows.append(run_wrapped(model, ids, base.replace(strategy="knn", search=b), f"knn {b}",
                                    progress=progress))
    if "infllm" in strategies:  # blocks of 128 at the budget of the smallest bank
        budget = max(base.block_size, min(slots) // base.block_size * base.block_size)
        rows.append(run_wrapped(model, ids, base.replace(strategy="infllm", slots=budget, placement="fixed"),
                                f"infllm {budget // base.block_size}x{base.block_size}", progress=progress))
    if "camelot" in strategies:
        if base.read_top_k is None:  # every slot is read: nothing to pick
            retrieves = ("query",)
        for s in slots:
            for b in backends:
                for r in retrieves:
                    cfg = base.replace(strategy="camelot", slots=s, search=b, retrieve=r)
                    label = f"camelot slots={s} {b}" + ("" if r == "query" else f" by {r}")
                    rows.append(run_wrapped(model, ids, cfg, label, prefill=True, progress=progress))
                    rows[-1].extra["retrieve"] = r
            for b in ("torch", "torch-bf16"):  # the library default reads every slot (bf16 where native)
                if b in backends and base.read_top_k is not None:
                    cfg = base.replace(strategy="camelot", slots=s, search=b, read_top_k=None)
                    rows.append(run_wrapped(model, ids, cfg, f"camelot slots={s} {b} all", prefill=True,
                                            progress=progress))
    rows.append(run_wrapped(model, ids, base.replace(strategy="window"), "window (again)", progress=progress))
    return rows


def growth_rows(model, ids: torch.Tensor, base: CamelotConfig, lengths: list[int], strategies: list[str],
                knn_max: int, full_max: int, progress: bool) -> list[Row]:
    rows = []
    max_pos = getattr(model.config, "max_position_embeddings", None)
    for n in lengths:
        x = ids[:, :n]
        for st in strategies:
            if st == "full":
                if n > full_max or (max_pos and n > max_pos):
                    continue
                row = run_full(model, x)
            elif st == "knn" and n > knn_max:
                continue
            else:
                row = run_wrapped(model, x, base.replace(strategy=st), f"{st} {n}", progress=progress)
            row.label = st
            rows.append(row)
    return rows


def recall_rows(model, ids: torch.Tensor, base: CamelotConfig, slots: list[int], backends: list[str],
                progress: bool) -> list[Row]:
    rows = []
    for s in slots:
        for b in (b for b in backends if b in APPROXIMATE):
            cfg = base.replace(strategy="camelot", slots=s, search=b)
            rows.append(run_wrapped(model, ids, cfg, f"recall slots={s} {b}", probe=True, progress=progress))
    return rows


def pool_rounds(rounds: list[list[Row]]) -> list[Row]:
    """The rows of several interleaved rounds as one: segment times pooled (the median over all
    of them), totals summed. Rounds interleave every configuration, so a drift of the machine's
    speed during the run reaches all of them alike."""
    pooled: dict[str, Row] = {}
    for row in (r for rows in rounds for r in rows):
        p = pooled.get(row.label)
        if p is None:
            pooled[row.label] = replace(row, seg_times=list(row.seg_times), extra=dict(row.extra))
            continue
        p.seg_times += row.seg_times
        p.tokens, p.segments, p.seconds = p.tokens + row.tokens, p.segments + row.segments, p.seconds + row.seconds
        p.peak_rss = max(p.peak_rss, row.peak_rss)
        p.seg_median = statistics.median(p.seg_times)
    return list(pooled.values())


def speed_table(rows: list[Row]) -> str:
    """Ratios against window-only measured first and again last: both runs' segments pooled."""
    windows = [r for r in rows if r.strategy == "window"]
    base = statistics.median([t for r in windows for t in r.seg_times] or [windows[0].seg_median])
    base_tps = sum(r.tokens for r in windows) / sum(r.seconds for r in windows)
    out = ["| run | segments | time/segment (ms) | × window | tokens/s | × window | state MiB |",
           "|---|---|---|---|---|---|---|"]
    for r in rows:
        out.append(f"| {r.label} | {r.segments} | {1e3 * r.seg_median:.1f} | {r.seg_median / base:.2f} | "
                   f"{r.tokens_per_second:.0f} | {r.tokens_per_second / base_tps:.2f} | "
                   f"{_mib(r.state_bytes)} |")
    return "\n".join(out)


def growth_table(rows: list[Row]) -> str:
    first: dict[str, Row] = {}
    out = ["| strategy | tokens | tokens/s | × shortest | peak RSS MiB | × shortest | state MiB |",
           "|---|---|---|---|---|---|---|"]
    for r in rows:
        f = first.setdefault(r.label, r)
        out.append(f"| {r.label} | {r.tokens} | {r.tokens_per_second:.0f} | "
                   f"{r.tokens_per_second / f.tokens_per_second:.2f} | {_mib(r.peak_rss)} | "
                   f"{r.peak_rss / f.peak_rss:.2f} | {_mib(r.state_bytes)} |")
    return "\n".join(out)


def recall_table(rows: list[Row], k: int) -> str:
    out = [f"| backend | slots | recall@{k} | index trainings |", "|---|---|---|---|"]
    for r in rows:
        out.append(f"| {r.search} | {r.slots} | {r.extra['recall']:.3f} | {r.extra.get('trains', '–')} |")
    return "\n".join(out)


# ---------------------------------------------------------------------------- CLI
def _ints(text: str, name: str) -> list[int]:
    try:
        out = [int(t) for t in text.split(",") if t.strip()]
    except ValueError:
        raise UserError(f"--{name}: {text!r} is not a comma-separated list of integers") from None
    if not out or min(out) < 1:
        raise UserError(f"--{name} needs positive integers, got {text!r}")
    return out


def _names(text: str, allowed: tuple[str, ...], name: str) -> list[str]:
    out = [t.strip() for t in text.split(",") if t.strip()]
    bad = [t for t in out if t not in allowed]
    if bad or not out:
        raise UserError(f"--{name}: {bad[0] if bad else text!r} is not one of {', '.join(allowed)}")
    return out


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "bench", help="speed of camelot vs window-only attention, growth with length, search recall",
        description="Speed benchmark, one process: every row is a ratio to window-only attention on the same "
        "model, tokens and segmentation. Not a test: numbers depend on the machine and its load.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_model_args(p, device="cpu", threads=1, dtype=False)
    p.add_argument("--data", default="builtin:genesis_kjv", help="text to read (cycled to the needed length)")
    add_data_limit_arg(p)
    p.add_argument("--quick", action="store_true", help="small sizes: a smoke run of every table in minutes")
    p.add_argument("--window", type=int, default=128)
    p.add_argument("--read-top-k", "--top-k", dest="top_k", type=parse_top_k, default=8,
                   help="slots read per query ('all': every one, torch only); torch rows are also timed with "
                   "every slot read, the library default")
    p.add_argument("--threshold", type=float, default=CamelotConfig.threshold)
    p.add_argument("--recent", type=parse_int_or_auto, default=CamelotConfig.recent,
                   help="raw tail tokens (camelot, knn); auto: camelot's default, as long as its slots")
    p.add_argument("--sink", type=int, default=CamelotConfig.sink, help="attention sink tokens")
    p.add_argument("--count-bias", type=parse_count_bias, default=CamelotConfig.count_bias,
                   help="factor of the log(count / mean count) bias: a number, on or off")
    p.add_argument("--placement", default=CamelotConfig.placement, choices=("fixed", "recency"))
    p.add_argument("--retrieve", default="query,group",
                   help=f"how top-k reads pick slots, each timed ({','.join(RETRIEVALS)}): query = each query "
                   "head's own top-k; group = one search per KV head for its query heads together; key = the "
                   "paper's rule, the slots nearest the token's key")
    p.add_argument("--slots", default="512,2048,8192", help="camelot slots per KV head to time")
    p.add_argument("--backends", default=DEFAULT_BACKENDS, help=f"from {','.join(BACKENDS)}")
    p.add_argument("--strategies", default="recurrent,knn,infllm,camelot", help="besides window, which to time")
    p.add_argument("--tokens", type=int, default=2048, help="document length of the speed and recall tables")
    p.add_argument("--rounds", type=int, default=1,
                   help="repeat the speed table's runs this many times, interleaved, and pool their segments")
    p.add_argument("--lengths", default="4096,16384",
                   help="document lengths of the growth table (the issue's: 4096,16384,65536,262144)")
    p.add_argument("--growth-strategies", default="window,camelot,knn,full")
    p.add_argument("--knn-max", type=int, default=16384, help="longest document for knn in the growth table")
    p.add_argument("--full-max", type=int, default=8192, help="longest document for full attention")
    p.add_argument("--skip", default="", help=f"tables to skip: {','.join(TABLES)}")
    p.add_argument("--decode-lengths", default="8192,32768",
                   help="document lengths read before timing decoding (the decode table)")
    p.add_argument("--decode-tokens", type=int, default=32, help="tokens generated in the decode table")
    p.add_argument("--json", default=None, help="also write every measurement to this JSON file")
    p.set_defaults(func=run_cli)


def run_cli(args: argparse.Namespace) -> int:
    from camelot.documents import data_limit, load_documents, tokenize_documents

    if args.quick:
        args.tokens, args.lengths, args.slots = 512, "1024,2048", "512,2048"
        args.decode_lengths, args.decode_tokens = "1024,2048", 8
        if args.backends == DEFAULT_BACKENDS:
            args.backends = "torch,torch-bf16,faiss-ivf"
    slots = _ints(args.slots, "slots")
    lengths = _ints(args.lengths, "lengths")
    backends = _names(args.backends, BACKENDS, "backends")
    strategies = _names(args.strategies, ("recurrent", "knn", "infllm", "camelot"), "strategies")
    growth = _names(args.growth_strategies, ("window", "camelot", "knn", "full", "recurrent"), "growth-strategies")
    skip = set(_names(args.skip, TABLES, "skip")) if args.skip else set()
    decode_lengths = _ints(args.decode_lengths, "decode-lengths")
    retrieves = tuple(_names(args.retrieve, RETRIEVALS, "retrieve"))
    try:
        base = CamelotConfig(window=args.window, read_top_k=args.top_k, threshold=args.threshold, recent=args.recent,
                             sink=args.sink, count_bias=args.count_bias, placement=args.placement, slots=max(slots))
    except ValueError as e:
        raise UserError(str(e)) from None
    if args.rounds < 1:
        raise UserError(f"--rounds must be at least 1, got {args.rounds}")
    if args.tokens < 3 * args.window:
        raise UserError(f"--tokens must cover at least 3 windows ({3 * args.window}), got {args.tokens}")
    docs = load_documents(args.data, max_bytes=data_limit(args))
    torch.set_num_threads(args.threads)
    model, tok = load_model_from_args(args)
    tokenize_documents(docs, tok)
    text = torch.cat([d.ids for d in docs])
    need = max([args.tokens, *lengths, *([] if "decode" in skip else decode_lengths)])
    ids = text.repeat(-(-need // text.numel()))[:need][None].to(model.device)
    progress = not args.no_progress
    report: dict[str, Any] = {"config": {k: v for k, v in vars(args).items() if k != "func"},
                              "torch_threads": torch.get_num_threads()}
    selector = "native kernel" if native_topk.native_library() is not None else f"torch.topk ({native_topk.why_not()})"
    report["top_k_selection"] = selector
    print(f"# camelot bench: {args.model}, window {args.window}, top_k {args.top_k}, placement {args.placement}, "
          f"{torch.get_num_threads()} thread(s), {args.device}; CPU top-k: {selector}\n")
    if "speed" not in skip:
        rows = pool_rounds([speed_rows(model, ids[:, : args.tokens], base, strategies, slots, backends, progress,
                                       retrieves) for _ in range(args.rounds)])
        report["speed"] = [asdict(r) for r in rows]
        rounds = f", {args.rounds} interleaved rounds" if args.rounds > 1 else ""
        print(f"## Speed ({args.tokens} tokens{rounds}; camelot banks full; × window: against the median "
              f"segment of both window runs)\n\n{speed_table(rows)}\n")
    if "growth" not in skip:
        rows = growth_rows(model, ids, base.replace(slots=2048 if 2048 in slots else slots[0]), lengths, growth,
                           args.knn_max, args.full_max, progress)
        report["growth"] = [asdict(r) for r in rows]
        print(f"## Growth with document length\n\n{growth_table(rows)}\n")
    if "recall" not in skip and any(b in APPROXIMATE for b in backends):
        rows = recall_rows(model, ids[:, : args.tokens], base, slots, backends, progress)
        report["recall"] = [asdict(r) for r in rows]
        print(f"## Search recall ({args.tokens} tokens of real keys and queries)\n\n"
              f"{recall_table(rows, args.top_k)}\n")
    if "profile" not in skip:
        cfg = base.replace(strategy="camelot", slots=2048 if 2048 in slots else slots[0], search="torch")
        prof = profile_segment(model, ids, cfg)
        report["profile"] = {k: v for k, v in prof.items() if k != "table"}
        print(f"## Profile of one camelot segment (slots={cfg.slots}, torch search)\n\n{prof['table']}\n")
        print(f"aten ops: {prof['aten_ops']} ({prof['aten_ops_per_layer']:.0f} per layer); host-sync ops: "
              f"{prof['syncs'] or 'none'}")
        for site, n in sorted(prof["sync_sites"].items(), key=lambda x: -x[1]):
            print(f"  {n} x {site}")
    if "defaults" not in skip:
        rows = default_rows(model, ids[:, : args.tokens], args.window, progress)
        report["defaults"] = [asdict(r) for r in rows]
        print(f"## The default config ({args.tokens} tokens; CamelotConfig(window={args.window}), banks full)\n\n"
              f"{defaults_table(rows)}\n")
        share = read_share(model, CamelotConfig(window=args.window))
        report["read_share"] = share
        print(f"Reading every memory entry is {share:.2f}x window-only's multiply-adds per token: the default "
              f"cannot cost less than ~{1 + share:.2f}x window-only without a top-k read.\n")
    if "decode" not in skip:
        drows = decode_rows(model, ids, decode_lengths, args.decode_tokens, args.window, progress)
        report["decode"] = [asdict(r) for r in drows]
        print(f"## Decoding after a long document ({args.decode_tokens} greedy tokens, default config)\n\n"
              f"{decode_table(drows)}\n")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(report, indent=1, default=str))
    return 0
