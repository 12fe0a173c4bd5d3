"""`camelot icl`: in-context learning with many demonstrations, most of them in memory.

Protocol (LongMem / CAMELoT): for each seed, shot count and strategy, the demonstrations are
split in two. The last ones, as many as fit in the window together with the longest test input
and its label, sit in the local window right before the test input; the earlier ones are fed
into memory first (`camelot`: consolidated slots, `knn`: every token), or dropped (`window`).
Then each test example is scored: which label word has the highest log-probability after the
prompt.

Efficiency and isolation: the memory and the window's demonstrations are read ONCE per
(seed, shots, strategy). Every test example then runs on top of that state and the open
window is put back afterwards. The whole prompt plus label stays strictly inside one segment, so
a segment never closes while scoring and nothing about a test example is ever written to memory:
the next example reads exactly the memory the demonstrations left (checked after each
configuration, and by tests/test_icl.py).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from camelot.eval.icl_report import RunRow, markdown_table, mean_ci, plot, summarize  # noqa: F401 (re-exported)
from camelot.eval.icl_tasks import BUILTIN_TASKS, Example, IclTask, balanced_pool, balanced_test, load_split, load_task

from camelot.options import add_model_args, load_model_from_args

LABEL_SCORES = ("sum", "mean", "first")
MEMORY_STRATEGIES = ("camelot", "knn", "infllm", "recurrent", "sliding")



# ---------------------------------------------------------------------------- tokenized task
@dataclass
class TokenizedTask:
    """A task's text turned into token ids once: demonstrations by training index, test prompts,
    and each label's answer tokens (answer_template filled with the label word).

    Pieces are tokenized separately (never across a demonstration boundary), so the same
    demonstration always yields the same tokens wherever it sits and lengths add up exactly."""

    task: IclTask
    tokenizer: Any
    train: list[Example]
    test: list[Example]
    test_ids: list[list[int]]  # prompt of each selected test example (input_template filled)
    test_labels: list[int]  # index into task.labels
    label_ids: list[list[int]]  # answer tokens per label, in task.labels order
    prefix_ids: list[int]  # special tokens the tokenizer puts first (BOS), start of the window
    _demo_cache: dict[int, list[int]] = field(default_factory=dict)

    def demo_ids(self, index: int) -> list[int]:
        ids = self._demo_cache.get(index)
        if ids is None:
            ex = self.train[index]
            ids = encode(self.tokenizer, self.task.format_demo(ex.text, ex.label))
            self._demo_cache[index] = ids
        return ids

    @property
    def reserve(self) -> int:
        """Tokens the test part can take after the demonstrations: the longest test prompt plus
        all but the last token of the longest label (the last one is predicted, never read)."""
        return max(len(t) for t in self.test_ids) + max(len(lab) for lab in self.label_ids) - 1


def encode(tokenizer: Any, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def tokenize_task(task: IclTask, tokenizer: Any, train: list[Example], test: list[Example],
                  test_index: Sequence[int]) -> TokenizedTask:
    label_ids = [encode(tokenizer, task.format_answer(lab)) for lab in task.labels]
    if any(not ids for ids in label_ids):
        raise ValueError(f"task {task.name!r}: a label word tokenizes to nothing: {label_ids}")
    if len({tuple(ids) for ids in label_ids}) != len(label_ids):
        raise ValueError(f"task {task.name!r}: two labels tokenize to the same tokens: {label_ids}")
    chosen = [test[i] for i in test_index]
    prefix = list(tokenizer("", add_special_tokens=True)["input_ids"])
    return TokenizedTask(
        task=task, tokenizer=tokenizer, train=train, test=chosen,
        test_ids=[encode(tokenizer, task.format_input(ex.text)) for ex in chosen],
        test_labels=[task.labels.index(ex.label) for ex in chosen],
        label_ids=label_ids, prefix_ids=prefix)


def split_demos(demo_lens: Sequence[int], budget: int) -> int:
    """How many of the LAST demonstrations fit in `budget` tokens (the rest go to memory)."""
    used = n = 0
    for length in reversed(demo_lens):
        if used + length > budget:
            break
        used += length
        n += 1
    return n


def window_budget(window: int, prefix_len: int, reserve: int) -> int:
    """Tokens left for demonstrations in the window. One token is kept free so the segment
    never fills up while scoring: a full segment would close and be written to memory."""
    budget = window - 1 - prefix_len - reserve
    if budget < 0:
        raise ValueError(f"window {window} is too small: the longest test prompt plus label needs {reserve} "
                         f"tokens (+{prefix_len} special, +1 kept free); use a larger --window or fewer/shorter "
                         "test examples")
    return budget


# ---------------------------------------------------------------------------- scoring
OpenState = list[tuple[torch.Tensor | None, ...]]


def open_state(cm: Any) -> OpenState:
    """The open segment's KV per layer (a free handle: the runtime never edits it in place)."""
    return cm.memory.open_segment()


def restore_open(cm: Any, state: OpenState) -> None:
    cm.memory.restore_open_segment(state)


def memory_fingerprint(cm: Any) -> tuple:
    """Cheap identity of the memory content: per layer, tokens written (telemetry totals) and the
    store size. Any write by a test example changes it."""
    out = []
    for rt in cm.runtimes:
        mem, pre = rt.state.memory, rt.state.prefix
        tel = None if mem is None or mem.telemetry is None else tuple(mem.telemetry.tolist())
        out.append((tel, getattr(mem, "size", None), None if pre is None else pre.size))
    return tuple(out)


def extend_open(cm: Any, ids: Sequence[int]) -> torch.Tensor | None:
    """Append ids to the open segment WITHOUT closing it (raises if they would fill it)."""
    if not ids:
        return None
    room = cm.config.window - cm.open_len
    if len(ids) >= room:
        raise RuntimeError(f"{len(ids)} tokens would fill the open segment (room {room}): scoring must stay "
                           "inside one segment so that nothing is written to memory")
    return cm.step(torch.tensor([list(ids)], dtype=torch.long, device=cm.device))


@torch.no_grad()
def label_logprobs(cm: Any, prompt_ids: Sequence[int], label_ids: Sequence[Sequence[int]],
                   mode: str = "sum") -> torch.Tensor:
    """Log-probability of each label's answer tokens after the prompt, on top of whatever the
    memory and open window hold; leaves the open window as it found it.

    mode: "sum" (log-prob of the whole multi-token answer), "mean" (per answer token), or
    "first" (first answer token only)."""
    if mode not in LABEL_SCORES:
        raise ValueError(f"label score must be one of {LABEL_SCORES}, got {mode!r}")
    base = open_state(cm)
    try:
        logits = extend_open(cm, prompt_ids)
        first = torch.log_softmax(logits[0, -1].float(), dim=-1)
        after_prompt = open_state(cm)
        out = []
        for ids in label_ids:
            lp = first[ids[0]]
            if mode != "first" and len(ids) > 1:
                lg = extend_open(cm, ids[:-1])[0].float()  # predicts ids[1:]
                tgt = torch.tensor(ids[1:], device=lg.device)
                lp = lp + torch.log_softmax(lg, dim=-1).gather(-1, tgt[:, None]).sum()
                restore_open(cm, after_prompt)
            if mode == "mean":
                lp = lp / len(ids)
            out.append(lp)
        return torch.stack(out).cpu()
    finally:
        restore_open(cm, base)


@dataclass
class PromptResult:
    logprobs: torch.Tensor  # [n_test, n_labels]
    predictions: list[int]
    correct: int
    feed_seconds: float
    score_seconds: float

    @property
    def accuracy(self) -> float:
        return self.correct / max(len(self.predictions), 1)


@torch.no_grad()
def evaluate_prompt(cm: Any, memory_ids: Sequence[int], window_ids: Sequence[int], data: TokenizedTask,
                    mode: str = "sum", progress: bool = False, desc: str = "test") -> PromptResult:
    """Feed memory_ids into memory (closing the last segment), put window_ids in the open window,
    then score every test example on top of that same state."""
    cm.reset()
    t0 = time.perf_counter()
    if memory_ids:
        cm.feed(list(memory_ids), progress=False)
        cm.flush()
    feed_s = time.perf_counter() - t0
    extend_open(cm, window_ids)
    base = open_state(cm)
    fp = memory_fingerprint(cm)
    from camelot.progress import progress_bar

    t1 = time.perf_counter()
    rows = []
    for prompt in progress_bar(data.test_ids, desc=desc, enabled=progress, unit="ex"):
        rows.append(label_logprobs(cm, prompt, data.label_ids, mode))
        restore_open(cm, base)
    score_s = time.perf_counter() - t1
    if memory_fingerprint(cm) != fp:
        raise RuntimeError("scoring wrote into memory: test examples would leak into each other")
    lps = torch.stack(rows) if rows else torch.empty(0, len(data.label_ids))
    preds = lps.argmax(-1).tolist() if rows else []
    correct = sum(int(p == y) for p, y in zip(preds, data.test_labels))
    cm.reset()
    return PromptResult(lps, preds, correct, feed_s, score_s)


# ---------------------------------------------------------------------------- the sweep
def run_sweep(model: Any, data: TokenizedTask, shots: Sequence[int], strategies: Sequence[str], seeds: int,
              config: Any, mode: str = "sum", progress: bool = True,
              log: Callable[[str], None] = lambda s: None) -> list[RunRow]:
    """Every (strategy, seed, shots) on the same test examples. Shot count 0 is the zero-shot
    line (one row, strategy "zero-shot"). Configurations whose model input is identical to one
    already scored (same window demonstrations, same memory or none) reuse its result."""
    import camelot
    from camelot.presets import at_same_budget

    budget = window_budget(config.window, len(data.prefix_ids), data.reserve)
    pools = {s: balanced_pool(data.train, data.task.labels, max(shots), seed=s) for s in range(seeds)}
    cache: dict[tuple, tuple[PromptResult, str]] = {}
    rows: list[RunRow] = []
    for strategy in strategies:
        cm = camelot.wrap(model, at_same_budget(config, strategy))
        try:
            for seed in range(seeds):
                for k in shots:
                    if k == 0 and (strategy != strategies[0] or seed > 0):
                        continue  # zero-shot: no demonstrations, so no strategy or seed matters
                    rows.append(_run_one(cm, data, strategy, seed, k, pools[seed], budget, mode, progress, cache))
                    log(_describe(rows[-1]))
        finally:
            cm.unwrap()
    return rows


def plan_prompt(data: TokenizedTask, pool: Sequence[int], k: int, budget: int) -> tuple[list[int], list[int]]:
    """(demonstrations for memory, demonstrations for the window) of the k-shot prompt: the last
    k of the seed's pool, of which the last ones that fit in `budget` tokens go in the window."""
    demos = list(pool[len(pool) - k:]) if k else []
    n_win = split_demos([len(data.demo_ids(i)) for i in demos], budget)
    return demos[: len(demos) - n_win], demos[len(demos) - n_win:]


def _run_one(cm: Any, data: TokenizedTask, strategy: str, seed: int, k: int, pool: Sequence[int], budget: int,
             mode: str, progress: bool, cache: dict[tuple, tuple[PromptResult, str]]) -> RunRow:
    in_mem, in_win = plan_prompt(data, pool, k, budget)
    has_mem = strategy in MEMORY_STRATEGIES and bool(in_mem)
    mem_ids = [t for i in in_mem for t in data.demo_ids(i)] if has_mem else []
    win_ids = list(data.prefix_ids) + [t for i in in_win for t in data.demo_ids(i)]
    name = "zero-shot" if k == 0 else strategy
    # the model input is fully described by this key: equal keys give bit-equal results
    key = (strategy if has_mem else None, tuple(in_mem) if has_mem else (), tuple(in_win))
    reused = None
    if key in cache:
        res, reused = cache[key]
    else:
        res = evaluate_prompt(cm, mem_ids, win_ids, data, mode, progress, desc=f"{name} seed {seed} shots {k}")
        cache[key] = (res, f"{name} seed {seed} shots {k}")
    return RunRow(name, seed, k, res.accuracy, res.correct, len(data.test_ids), len(in_win),
                  len(in_mem) if has_mem else 0, len(win_ids), len(mem_ids),
                  0.0 if reused else res.feed_seconds, 0.0 if reused else res.score_seconds, reused)


def _describe(r: RunRow) -> str:
    dps = r.demos_per_second
    return (f"{r.strategy:>9} seed {r.seed} shots {r.shots:>5}: acc {r.accuracy:.3f}  window {r.demos_in_window} "
            f"demos, memory {r.demos_in_memory} demos" + (f" ({dps:.1f} demos/s fed)" if dps else "")
            + (f"  [same input as {r.reused}]" if r.reused else ""))


# ---------------------------------------------------------------------------- CLI
def _int_list(text: str) -> list[int]:
    try:
        vals = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not vals or any(v < 0 for v in vals):
        raise argparse.ArgumentTypeError(f"expected non-negative integers, got {text!r}")
    return sorted(set(vals))


def _str_list(text: str) -> list[str]:
    vals = [x.strip() for x in text.split(",") if x.strip()]
    if not vals:
        raise argparse.ArgumentTypeError("expected a comma-separated list")
    return list(dict.fromkeys(vals))


def register(subparsers: argparse._SubParsersAction) -> None:
    from camelot.cli import add_memory_args

    p = subparsers.add_parser(
        "icl", help="in-context learning: accuracy vs number of demonstrations, with demonstrations in memory",
        description="Accuracy of a frozen LM on a classification task against the number of in-context "
        "demonstrations. The demonstrations that fit sit in the window; the rest are fed into memory "
        "(camelot, knn) or dropped (window). camelot writes as --recall-demos unless another write is named "
        "(--recall-balanced: the library's default write): its reserve keeps the tokens the window attended "
        "most, a demonstration's label (subj / SST-2 at 256 shots on SmolLM2: 80.8 / 81.5, the library's "
        "default write 75.8 / 64.0). Example: camelot icl --task mr --shots 0,4,16,64,256 --seeds 2",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_model_args(p, device="cpu")
    p.add_argument("--task", default="mr",
                   help=f"built-in task ({', '.join(BUILTIN_TASKS)}), a task folder (train.jsonl, test.jsonl with "
                   "text/label, optional labels.txt; or a `datasets` folder) or a .json/.py task file")
    p.add_argument("--data-dir", default=None, help="folder holding <task>/train.jsonl and <task>/test.jsonl "
                   "(default: $CAMELOT_ICL_DATA or ../shared/data/icl)")
    p.add_argument("--shots", type=_int_list, default=[0, 4, 16, 64, 256, 1024], help="comma-separated shot counts")
    p.add_argument("--strategies", type=_str_list, default=["window", "camelot", "knn"])
    p.add_argument("--seeds", type=int, default=3, help="demonstration samples (seeds 0..N-1)")
    p.add_argument("--n-test", type=int, default=200, help="label-balanced test examples (same for all runs)")
    add_memory_args(p, strategy=False, window=256)
    p.add_argument("--label-score", choices=LABEL_SCORES, default="sum",
                   help="sum: log-prob of all tokens of a label word; mean: per token; first: first token only")
    p.add_argument("--out", default="icl-results", help="folder for the .md, .json and .png outputs")
    p.set_defaults(func=main)


def main(args: argparse.Namespace) -> int:
    from camelot.cli import UserError, memory_config
    from camelot.config import STRATEGIES

    if args.threads:
        torch.set_num_threads(args.threads)
    bad = [s for s in args.strategies if s not in STRATEGIES]
    if bad:
        raise UserError(f"unknown strategies {bad}; choose from {', '.join(STRATEGIES)}")
    if args.seeds < 1:
        raise UserError("--seeds must be >= 1")
    if args.n_test < 1:
        raise UserError("--n-test must be >= 1")
    if args.recall is None:  # demonstrations: what a label vote needs kept (docs/icl_memory.md)
        args.recall = "demonstrations"
    config = memory_config(args)
    task = load_task(args.task)
    train = load_split(task, args.data_dir, "train")
    test = load_split(task, args.data_dir, "test")
    from camelot.models import BUNDLED, PARTED

    known = (*BUNDLED, *PARTED)
    if args.model not in known and not Path(args.model).is_dir():
        raise UserError(f"--model {args.model!r} is neither a bundled model ({', '.join(known)}) nor a local folder")

    model, tok = load_model_from_args(args)
    data = tokenize_task(task, tok, train, test, balanced_test(test, task.labels, args.n_test))
    progress = not args.no_progress and sys.stderr.isatty()
    print(f"icl {task.name}: {len(train)} train / {len(data.test)} test examples, model {args.model}, "
          f"window {args.window}, label tokens {data.label_ids} (score: {args.label_score})", file=sys.stderr)
    t0 = time.perf_counter()
    rows = run_sweep(model, data, args.shots, args.strategies, args.seeds, config, args.label_score, progress,
                     log=lambda s: print(s, file=sys.stderr))
    summary = summarize(rows)
    title = (f"{task.name}, {args.model}, window {args.window}, {args.seeds} seed(s), {len(data.test)} test, "
             f"label score {args.label_score}" + (f", camelot: recall {args.recall}" if args.recall else ""))
    table = markdown_table(summary, args.strategies, title)
    print(table)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = f"icl_{task.name}"
    record = {
        "task": task.to_dict(), "model": args.model, "config": config.to_dict(), "shots": args.shots,
        "strategies": args.strategies, "seeds": args.seeds, "n_test": len(data.test), "label_score": args.label_score,
        "label_token_ids": data.label_ids, "window_budget_tokens": window_budget(args.window, len(data.prefix_ids),
                                                                                 data.reserve),
        "seconds": time.perf_counter() - t0, "summary": summary,
        "runs": [{**asdict(r), "demos_per_second": r.demos_per_second} for r in rows],
    }
    (out / f"{stem}.json").write_text(json.dumps(record, indent=2), encoding="utf-8")
    (out / f"{stem}.md").write_text(table, encoding="utf-8")
    plot(summary, args.strategies, out / f"{stem}.png", title)
    print(f"wrote {out / stem}.md, .json, .png", file=sys.stderr)
    return 0
