"""`camelot retrieval`: a RULER-style suite (tasks in retrieval_tasks.py) over every strategy.

Every strategy reads exactly the same cases (seeded per task, length, depth and trial), through
the pass key machinery (eval/passkey.py): per task the instruction and the haystack up to the
first needle are read once per group of cases that share them, and answers are greedy. `full`
runs where the model's positions reach; beyond, its cells say so.

Equal budget: `--budget B` is the KV entries one head keeps besides the current segment
(sinks + raw tail + slots): camelot gets B - sink - recent slots (by default its tail is as
long as its slots and sinks: B / 2 - sink slots) and sliding B - sink raw tokens plus the same
sinks, so both hold B entries; knn keeps every token (unbounded) and reads
its top-k.

Reports: a Markdown table per task (rows: runs, columns: lengths; mean score in % with a 95%
Wilson interval over trials), retrieval.json with every trial, and a heat map (depth x length,
mean over tasks) per run.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from camelot.eval.passkey import (
    build_haystack,
    fitting_cases,
    format_length,
    haystack_text,
    parse_length,
    run_camelot,
    run_full,
)
from camelot.eval.perplexity import RunSpec, add_sweep_args, parse_list, plan_runs
from camelot.eval.plan import sweep_at_budget
from camelot.eval.retrieval_journal import NAME as JOURNAL
from camelot.eval.retrieval_journal import Journal, read_journal, run_settings
from camelot.eval.retrieval_tasks import TASKS, RetrievalCase, make_cases, make_prompt, score, task_haystack

from camelot.cli import UserError
from camelot.options import add_model_args, load_model_from_args
from camelot.progress import progress_bar

DEFAULT_STRATEGIES = "window,sliding,knn,camelot,full"
DEFAULT_BUDGET = "1024"  # KV entries per head: a quarter of a 4k case
# answer tokens per task: the value(s) with some room (digits are one token each in some vocabularies)
NEW_TOKENS = {"niah_number": 16, "niah_word": 16, "niah_uuid": 40, "multikey": 16, "multivalue": 48,
              "multiquery": 48, "vt": 40}


@dataclass
class RetrievalTrial:
    task: str
    length: int
    depth: int
    trial: int
    key: str
    expected: list[str]
    answer: str
    correct: float  # RULER score: fraction of the expected strings in the answer
    seconds: float


@dataclass
class RetrievalResult:
    spec: RunSpec
    trials: list[RetrievalTrial] = field(default_factory=list)
    seconds: float = 0.0
    skipped: str | None = None
    note: str | None = None

    def scores(self, task: str | None = None, length: int | None = None, depth: int | None = None) -> list[float]:
        return [t.correct for t in self.trials if (task is None or t.task == task)
                and (length is None or t.length == length) and (depth is None or t.depth == depth)]


def journaled_trial(row: dict) -> RetrievalTrial:
    """A trial from its journal line (which also names its run)."""
    return RetrievalTrial(**{k: v for k, v in row.items() if k != "run"})


def make_judge(tok):
    """Trials from generated ids: the answer ends at the first special token (end of turn / text),
    as a chat would end it, so what greedy decoding writes after that is not scored."""
    special = set(tok.all_special_ids)

    def judge(case: RetrievalCase, ids: list[int], seconds: float) -> RetrievalTrial:
        end = next((i for i, t in enumerate(ids) if t in special), len(ids))
        answer = tok.decode(ids[:end])
        return RetrievalTrial(case.task, case.length, case.depth, case.trial, case.key, case.expected, answer,
                              score(answer, case.expected), seconds)

    return judge


def wilson(scores: list[float], z: float = 1.96) -> tuple[float, float, float] | None:
    """(mean, low, high): the Wilson score interval of the mean over trials; exact in form for
    0/1 scores, an approximation for the fractional scores of multi-value tasks."""
    n = len(scores)
    if not n:
        return None
    p = sum(scores) / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return p, max(0.0, centre - half), min(1.0, centre + half)


# ---------------------------------------------------------------------------- running
def evaluate(model, hays: dict, cases: dict[str, list[RetrievalCase]], specs: list[RunSpec],
             new_tokens: dict[str, int], progress: bool = True, log: bool = False,
             journal: Journal | None = None, on_run=None) -> list[RetrievalResult]:
    """Every run over every task's cases; the model is wrapped once per run and handed back.

    With a journal each trial is written down as it is judged, and the trials it already holds
    for a run are taken as they are, not read again; `on_run(results so far)` after each run."""
    from camelot.adapters import get_adapter

    import camelot

    max_pos = get_adapter(model).max_positions(model)
    plan = []
    for spec in specs:
        res, mine = RetrievalResult(spec), dict(cases)
        if spec.strategy == "full":
            notes = set()
            for task in cases:
                mine[task], note = fitting_cases(cases[task], max_pos)
                notes.add(note)
            res.note = next((n for n in notes if n), None)
            if not any(mine.values()):
                res.skipped = res.note
        if journal is not None:
            res.trials = [journaled_trial(t) for t in journal.done(spec.label)]
            seen = {(t.task, t.length, t.depth, t.trial) for t in res.trials}
            mine = {task: [c for c in cs if (c.task, c.length, c.depth, c.trial) not in seen]
                    for task, cs in mine.items()}
        plan.append((res, mine))
    total = sum(len(c) for res, mine in plan if not res.skipped for c in mine.values())
    judged = make_judge(next(iter(hays.values())).tokenizer)
    bar = progress_bar(range(total), desc="retrieval (runs x cases)", enabled=progress, unit="case")
    tick = (lambda: next(bar, None)) if progress else None
    for res, mine in plan:
        if res.skipped or not any(mine.values()):  # nothing to run, or all of it in the journal
            continue
        judge = judged if journal is None else _journaled(judged, journal, res.spec.label)
        t0 = time.perf_counter()
        cm = camelot.wrap(model, res.spec.config) if res.spec.config is not None else None
        try:
            for task, task_cases in mine.items():
                if not task_cases:
                    continue
                if cm is None:
                    res.trials += run_full(model, hays[task], task_cases, new_tokens[task], on_case=tick, judge=judge)
                else:
                    run = run_asked if cm.ranks_by_question else run_camelot
                    res.trials += run(cm, hays[task], task_cases, new_tokens[task], on_case=tick, judge=judge)
        finally:
            if cm is not None:
                cm.unwrap()
        res.seconds = time.perf_counter() - t0
        if log:
            print(f"{res.spec.label}: {_cell(res.scores())} in {res.seconds:.0f}s", file=sys.stderr, flush=True)
        if on_run is not None:
            on_run([r for r, _ in plan])
    return [res for res, _ in plan]


def _journaled(judge, journal: Journal, label: str):
    def write_down(case: RetrievalCase, ids: list[int], seconds: float) -> RetrievalTrial:
        trial = judge(case, ids, seconds)
        journal.add(label, trial)
        return trial

    return write_down


def run_asked(cm, hay, cases: list[RetrievalCase], max_new_tokens: int, on_case=None, judge=None) -> list:
    """camelot-question: each case's question and answer start are set before its document is read, so what
    memory keeps depends on the case and cases share no prefix (run_camelot shares them)."""
    import torch

    judge, out, dev = judge or make_judge(hay.tokenizer), [], cm.device
    for case in cases:
        cm.reset()
        cm.set_question(torch.tensor([case.asked], device=dev))
        cm.feed(torch.tensor([hay.intro], device=dev), progress=False, rank=False)
        if case.needle_at:
            cm.feed(torch.tensor([hay.stream[: case.needle_at]], device=dev), progress=False)
        t0 = time.perf_counter()
        gen = cm.generate(torch.tensor([case.suffix(hay)], device=dev), max_new_tokens=max_new_tokens)
        out.append(judge(case, gen[0].tolist(), time.perf_counter() - t0))
        if on_case:
            on_case()
    return out


# ---------------------------------------------------------------------------- reports
def _cell(scores: list[float]) -> str:
    w = wilson(scores)
    return "-" if w is None else f"{100 * w[0]:.0f} [{100 * w[1]:.0f}-{100 * w[2]:.0f}]"


def markdown_tables(results: list[RetrievalResult], tasks: list[str], lengths: list[int]) -> str:
    """Per task, then over all tasks: mean score (%) [95% interval] per run and length."""
    head = "| run | " + " | ".join(format_length(n) for n in lengths) + " |"
    rule = "|" + "---|" * (len(lengths) + 1)
    out = []
    for task in [*tasks, None]:
        out += ["", f"**{task or 'all tasks'}**: score % [95% interval]", "", head, rule]
        for r in results:
            if r.skipped:
                out.append(f"| {r.spec.label} | " + " | ".join("skipped" for _ in lengths) + " |")
                continue
            cells = [_cell(r.scores(task, n)) if r.scores(task, n) else "not run" for n in lengths]
            out.append(f"| {r.spec.label} | " + " | ".join(cells) + " |")
    return "\n".join(out[1:])


def to_json(results: list[RetrievalResult], config: dict, tasks: list[str], lengths: list[int],
            depths: list[int]) -> dict:
    def stats(xs: list[float]) -> dict | None:
        w = wilson(xs)
        return None if w is None else {"mean": w[0], "low": w[1], "high": w[2], "n": len(xs)}

    return {"config": config, "runs": [{
        "label": r.spec.label, "strategy": r.spec.strategy, "window": r.spec.window, "params": r.spec.params,
        "config": r.spec.config.to_dict() if r.spec.config else None, "skipped": r.skipped, "note": r.note,
        "seconds": r.seconds, "score": stats(r.scores()),
        "by_task_length": {f"{t}@{n}": stats(r.scores(t, n)) for t in tasks for n in lengths},
        "by_depth_length": {f"{d}@{n}": stats(r.scores(None, n, d)) for d in depths for n in lengths},
        "trials": [asdict(t) for t in r.trials]} for r in results]}


def heat_maps(results: list[RetrievalResult], depths: list[int], lengths: list[int], out: Path) -> list[Path]:
    """One PNG per run: mean score over tasks and trials by depth (rows) x length (columns)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    paths = []
    for r in results:
        if r.skipped:
            continue
        grid = np.full((len(depths), len(lengths)), np.nan)
        for i, d in enumerate(depths):
            for j, n in enumerate(lengths):
                xs = r.scores(None, n, d)
                if xs:
                    grid[i, j] = 100 * sum(xs) / len(xs)
        fig, ax = plt.subplots(figsize=(1.2 + 0.9 * len(lengths), 1.2 + 0.5 * len(depths)))
        ax.imshow(np.ma.masked_invalid(grid), vmin=0, vmax=100, cmap="RdYlGn", aspect="auto")
        for (i, j), v in np.ndenumerate(grid):
            ax.text(j, i, "n/a" if np.isnan(v) else f"{v:.0f}", ha="center", va="center", fontsize=8)
        ax.set_xticks(range(len(lengths)), [format_length(n) for n in lengths])
        ax.set_yticks(range(len(depths)), [f"{d}%" for d in depths])
        ax.set_xlabel("length (tokens)")
        ax.set_ylabel("needle depth")
        ax.set_title(r.spec.label, fontsize=8)
        fig.tight_layout()
        path = out / f"heatmap_{re.sub(r'[^A-Za-z0-9_.-]+', '_', r.spec.label).strip('_')}.png"
        fig.savefig(path, dpi=100)
        plt.close(fig)
        paths.append(path)
    return paths


# ---------------------------------------------------------------------------- CLI
def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "retrieval", help="RULER-style retrieval suite (needles, multi-key/value/query, variable tracking)",
        description="RULER's synthetic tasks in a haystack of real text, every strategy on the same seeded "
        "trials at equal KV budget. Writes a Markdown table, retrieval.json and heat maps to --out. Example: "
        "camelot retrieval --model qwen2.5-0.5b --tasks niah_number,multikey --lengths 4k,8k --trials 20",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_model_args(p)
    p.add_argument("--tasks", default=",".join(TASKS), help=f"from {','.join(TASKS)}")
    p.add_argument("--lengths", default="4k,8k,16k,32k", help="tokens per sequence, answer included")
    p.add_argument("--depths", default="10,30,50,70,90", help="depths (percent) of the first needle")
    p.add_argument("--trials", type=int, default=20, help="trials per task, length and depth")
    add_sweep_args(p, strategies=DEFAULT_STRATEGIES, window="512", slots="auto", placement="recency",
                   budget=DEFAULT_BUDGET)
    p.add_argument("--haystack", default="builtin:genesis_kjv",
                   help="'repeat' (RULER's filler sentences) or a text: a file, a folder of texts, builtin:NAME")
    p.add_argument("--no-chat-template", action="store_true", help="plain prompt (base models)")
    p.add_argument("--max-new-tokens", type=int, default=0, help="answer tokens (0: per task, 16-48)")
    p.add_argument("--seed", type=int, default=0, help="seed of the trials")
    p.add_argument("--out", default="results/retrieval", help="folder for the table, JSON and heat maps; every "
                   "trial is also appended to OUT/trials.jsonl as it is judged, and the table and JSON are "
                   "rewritten after each run")
    p.add_argument("--resume", action="store_true", help="go on with the unfinished run whose journal is in --out "
                   "(same settings): its trials are kept, the rest are run")
    p.add_argument("--report", action="store_true", help="print the table of the trials the journal in --out holds "
                   "so far (the same command as the run; it may still be going on), without running anything")
    p.set_defaults(func=run_cli)


def report_journal(out: Path, specs: list[RunSpec], tasks: list[str], lengths: list[int],
                   args: argparse.Namespace) -> int:
    """`--report`: the table of what the journal holds, read only, with each run's count of cases."""
    path = out / JOURNAL
    if not path.exists():
        raise UserError(f"--report: {path} does not exist; the run writes it (same command without --report)")
    trials, finished = read_journal(path, run_settings(vars(args)))
    results = [RetrievalResult(spec, [journaled_trial(t) for t in trials if t["run"] == spec.label])
               for spec in specs]
    print(markdown_tables(results, tasks, lengths))
    planned = args.trials * len(tasks) * len(lengths) * len(parse_list(args.depths, int, "depths"))
    print(f"\n{'finished' if finished else 'not finished'}; cases judged: "
          + ", ".join(f"{r.spec.label} {len(r.trials)} of {planned}" for r in results))
    return 0


def run_cli(args: argparse.Namespace) -> int:

    tasks = list(parse_list(args.tasks, str, "tasks"))
    bad = [t for t in tasks if t not in TASKS]
    if bad:
        raise UserError(f"unknown task {bad[0]!r}; choose from {', '.join(TASKS)}")
    lengths = list(parse_list(args.lengths, parse_length, "lengths"))
    depths = list(parse_list(args.depths, int, "depths"))
    if any(not 0 <= d <= 100 for d in depths):
        raise UserError(f"--depths are percentages in [0, 100], got {depths}")
    if args.trials < 1 or args.max_new_tokens < 0:
        raise UserError("--trials must be >= 1 and --max-new-tokens >= 0")
    specs = plan_runs(sweep_at_budget(args, "auto", DEFAULT_BUDGET), questions=True)
    out = Path(args.out)
    if args.report:
        return report_journal(out, specs, tasks, lengths, args)
    journal = Journal(out, run_settings(vars(args)), args.resume)
    text = haystack_text(args.haystack)
    model, tok = load_model_from_args(args)
    prompt = make_prompt(tok, chat_template=not args.no_chat_template)
    new_tokens = {t: args.max_new_tokens or NEW_TOKENS[t] for t in tasks}
    base = build_haystack(tok, max(lengths), text)
    hays = {t: task_haystack(base, t, prompt) for t in tasks}
    cases = {t: make_cases(hays[t], t, prompt, lengths, depths, args.trials, new_tokens[t], args.seed) for t in tasks}
    config = {k: v for k, v in vars(args).items() if k != "func"}

    def write_reports(results: list[RetrievalResult]) -> str:
        (out / "retrieval.json").write_text(json.dumps(to_json(results, config, tasks, lengths, depths), indent=1))
        table = markdown_tables(results, tasks, lengths)
        (out / "retrieval.md").write_text(table + "\n")
        return table

    try:
        results = evaluate(model, hays, cases, specs, new_tokens, progress=not args.no_progress, log=True,
                           journal=journal, on_run=write_reports)
    except KeyboardInterrupt:
        print(f"the trials judged so far are in {journal.path}: the same command with --resume goes on",
              file=sys.stderr)
        raise
    journal.finish()
    table = write_reports(results)
    maps = heat_maps(results, depths, lengths, out)
    print(table)
    for r in results:
        if r.skipped or r.note:
            print(f"\nnote: {r.spec.label}: {r.skipped or r.note} (those cells not run)")
    n = sum(len(c) for c in cases.values())
    print(f"\n{n} cases per run ({args.trials} per task, length and depth); wrote {out}/retrieval.json, "
          f"retrieval.md and {len(maps)} heat maps")
    return 0
