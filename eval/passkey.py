"""`camelot passkey`: can the model find a 5-digit pass key hidden in a long haystack?

The standard long-context retrieval check (Mohtashami & Jaggi 2023): an instruction, N tokens of
filler with "The pass key is 71432. Remember it. 71432 is the pass key." at a chosen depth,
then "What is the pass key? The pass key is", and greedy decoding of a few tokens. A trial is
correct when the first number in the answer is the key.

Every strategy gets exactly the same token ids (same keys, same positions). The filler is one
token stream, cut only at sentence ends, so all cases share their prefix up to the needle: each
run reads the stream once up to each needle position, keeps a checkpoint there (camelot: a copy
of the memory; `full`: the KV cache, cropped back after each case), and reads only the rest
per case. That gives the same answers as reading every case from scratch (tested) in about
half the compute, and keys of different trials cost only their suffix.

Lengths count the whole sequence, answer included: prompt = N - max_new_tokens tokens, so a
length the model's positions allow for `full` fits it, and with N a multiple of the window the
answer is still generated inside the segment that holds the question.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import re
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from camelot.eval.hf_cache import cache_kwarg, new_cache
from camelot.eval.passkey_report import (  # noqa: F401  (re-exported)
    _pct,
    format_length,
    markdown_tables,
    parse_length,
    to_json,
)
from camelot.eval.perplexity import RunSpec, add_sweep_args, parse_list, plan_runs, sweep_at_budget

from camelot.cli import UserError
from camelot.config import STRATEGIES
from camelot.options import add_model_args, load_model_from_args
from camelot.progress import progress_bar

INTRO = ("There is an important info hidden inside a lot of irrelevant text. Find it and memorize it. "
         "I will quiz you about the important information there.\n")
FILLER = " The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
NEEDLE = " The pass key is {key}. Remember it. {key} is the pass key."
QUESTION = "\nWhat is the pass key? The pass key is"
DEFAULT_STRATEGIES = ("window", "recurrent", "knn", "camelot", "full")
SLOTS_DEFAULT = "2044"
ALL_STRATEGIES = (*STRATEGIES, "full")


# ---------------------------------------------------------------------------- the cases
@dataclass
class Haystack:
    """Token ids of the fixed parts and of the filler stream; needles go in at `boundaries`."""

    intro: list[int]
    stream: list[int]
    boundaries: list[int]  # stream indices right after a sentence end, ascending
    question: list[int]
    tokenizer: Any = field(repr=False)

    def needle(self, key: str) -> list[int]:
        return _ids(self.tokenizer, NEEDLE.format(key=key))


@dataclass
class Case:
    length: int
    depth: int  # percent
    trial: int
    key: str
    needle_at: int  # stream index where the needle goes (shared prefix = intro + stream[:needle_at])
    hay_len: int  # stream tokens in the haystack, needle excluded

    def suffix(self, hay: Haystack) -> list[int]:
        """Everything after the shared prefix: needle, the rest of the filler, the question."""
        return hay.needle(self.key) + hay.stream[self.needle_at : self.hay_len] + hay.question

    def ids(self, hay: Haystack) -> list[int]:
        return hay.intro + hay.stream[: self.needle_at] + self.suffix(hay)


def _ids(tok, text: str) -> list[int]:
    return list(tok(text, add_special_tokens=False)["input_ids"])


def haystack_text(spec: str) -> str | None:
    """The text a --filler / --haystack spec names (a data spec of camelot.documents), or None
    for "repeat" (the built-in filler sentences)."""
    if spec == "repeat":
        return None
    from camelot.documents import load_documents

    return "\n".join(doc.text for doc in load_documents(spec))


def build_haystack(tok, max_len: int, filler_text: str | None = None) -> Haystack:
    """Filler: FILLER repeated (default) or a real text (cycled), as one token stream of at least
    `max_len` tokens. Needles are only inserted after a sentence end."""
    bos = [tok.bos_token_id] if getattr(tok, "add_bos_token", False) and tok.bos_token_id is not None else []
    intro = bos + _ids(tok, INTRO)
    if filler_text is None:
        unit = _ids(tok, FILLER)
        reps = math.ceil(max_len / len(unit))
        stream = unit * reps
        boundaries = [i * len(unit) for i in range(reps + 1)]
    else:
        unit = _ids(tok, " " + " ".join(filler_text.split()))
        if not unit:
            raise UserError("the filler text has no tokens")
        stream = unit * math.ceil(max_len / len(unit))
        pieces = tok.convert_ids_to_tokens(stream)
        ends = [i + 1 for i, p in enumerate(pieces) if p.rstrip().endswith((".", "!", "?"))]
        boundaries = [0, *ends] if ends else list(range(len(stream) + 1))
    return Haystack(intro, stream, boundaries, _ids(tok, QUESTION), tok)


def make_cases(hay: Haystack, lengths: list[int], depths: list[int], trials: int, max_new_tokens: int,
               seed: int = 0) -> list[Case]:
    """Cases for every length x depth x trial, keys drawn from `seed` (the same for every run)."""
    rng = random.Random(seed)
    cases = []
    for n in lengths:
        for d in depths:
            for t in range(trials):
                key = str(rng.randint(10000, 99999))
                fixed = len(hay.intro) + len(hay.needle(key)) + len(hay.question) + max_new_tokens
                hay_len = haystack_room(hay, n, fixed, "instruction, pass key, question and answer")
                cases.append(Case(n, d, t, key, sentence_end(hay, round(d / 100 * hay_len), hay_len), hay_len))
    return cases


def haystack_room(hay: Haystack, length: int, fixed: int, what: str) -> int:
    """Stream tokens that fit beside `fixed` other tokens in `length`; an error if none or too many."""
    room = length - fixed
    if room < 1:
        raise UserError(f"length {length} is too short: {what} need {fixed} tokens")
    if room > len(hay.stream):
        raise UserError(f"length {length} needs {room} haystack tokens, the stream has {len(hay.stream)}")
    return room


def sentence_end(hay: Haystack, target: int, hay_len: int) -> int:
    """The last sentence end at or before stream index `target` (needles go in between sentences)."""
    import bisect

    return min(hay.boundaries[max(0, bisect.bisect_right(hay.boundaries, target) - 1)], hay_len)


def first_number(text: str) -> str | None:
    m = re.search(r"\d+", text)
    return m.group(0) if m else None


# ---------------------------------------------------------------------------- running
@dataclass
class Trial:
    length: int
    depth: int
    trial: int
    key: str
    answer: str
    correct: bool
    seconds: float


@dataclass
class PasskeyResult:
    spec: RunSpec
    trials: list[Trial] = field(default_factory=list)
    seconds: float = 0.0
    skipped: str | None = None  # the whole run
    note: str | None = None  # some cases were not run (full: lengths beyond the model's positions)

    def accuracy(self, length: int | None = None, depth: int | None = None) -> float | None:
        sel = [t.correct for t in self.trials
               if (length is None or t.length == length) and (depth is None or t.depth == depth)]
        return sum(sel) / len(sel) if sel else None


def _groups(cases: list[Case]) -> list[tuple[int, list[Case]]]:
    by: dict[int, list[Case]] = {}
    for c in cases:
        by.setdefault(c.needle_at, []).append(c)
    return sorted(by.items())


def _as_tensor(ids: list[int], device) -> torch.Tensor:
    return torch.tensor([ids], dtype=torch.long, device=device)


def run_camelot(cm, hay: Haystack, cases: list[Case], max_new_tokens: int, on_case=None, judge=None) -> list:
    """All cases through a camelot wrapper, sharing prefixes through memory checkpoints.

    A case needs `needle_at` (end of the prefix it shares) and `suffix(hay)`; `judge(case,
    generated ids, seconds)` makes its trial (default: the pass key rule on the decoded text), so
    other suites (retrieval) run their own cases through the same machinery."""
    judge = judge or _judge(hay.tokenizer)
    dev, out = cm.device, []
    cm.reset()
    cm.feed(_as_tensor(hay.intro, dev), progress=False, rank=False)  # the instruction: no fact to keep
    pos, cp = 0, cm.memory.checkpoint()
    for at, group in _groups(cases):
        if at > pos:
            cm.memory.restore(cp)
            cm.feed(_as_tensor(hay.stream[pos:at], dev), progress=False)
            pos, cp = at, cm.memory.checkpoint()
        for case in group:
            cm.memory.restore(cp)
            t0 = time.perf_counter()
            gen = cm.generate(_as_tensor(case.suffix(hay), dev), max_new_tokens=max_new_tokens)
            out.append(judge(case, gen[0].tolist(), time.perf_counter() - t0))
            if on_case:
                on_case()
    return out


def run_full(model, hay: Haystack, cases: list[Case], max_new_tokens: int, chunk: int = 1024,
             on_case=None, judge=None) -> list:
    """All cases through the plain model (whole sequence in context), sharing prefixes by keeping
    the KV cache and cropping it back after each case; greedy decoding like HF generate."""
    judge = judge or _judge(hay.tokenizer)
    dev, out = next(model.parameters()).device, []
    cache = new_cache(model)
    # Cropping undoes a case only where every layer keeps its whole past (no sliding-window
    # layers, e.g. gemma3's); elsewhere each case is read from scratch.
    shared = all(type(layer).__name__ == "DynamicLayer" for layer in getattr(cache, "layers", []))
    if not shared:
        out = []
        for case in cases:
            cache = new_cache(model)
            t0 = time.perf_counter()
            with torch.no_grad():
                gen = _greedy(model, cache, case.ids(hay), max_new_tokens, chunk, dev)
            out.append(judge(case, gen, time.perf_counter() - t0))
            if on_case:
                on_case()
        return out

    with torch.no_grad():
        _forward(model, cache, hay.intro, chunk, dev)
        pos = 0
        for at, group in _groups(cases):
            if at > pos:
                _forward(model, cache, hay.stream[pos:at], chunk, dev)
                pos = at
            base = cache.get_seq_length()
            for case in group:
                t0 = time.perf_counter()
                gen = _greedy(model, cache, case.suffix(hay), max_new_tokens, chunk, dev)
                cache.crop(-(cache.get_seq_length() - base))  # negative: "remove that many" in every version
                out.append(judge(case, gen, time.perf_counter() - t0))
                if on_case:
                    on_case()
    return out


def _forward(model, cache, ids: list[int], chunk: int, dev) -> torch.Tensor:
    """Append ids to the KV cache (in chunks, to bound attention memory); last logits [V]."""
    name = cache_kwarg(model)
    logits = None
    for a in range(0, len(ids), chunk):
        logits = model(input_ids=_as_tensor(ids[a : a + chunk], dev), use_cache=True, **{name: cache}).logits
    return logits[0, -1]


def _greedy(model, cache, ids: list[int], max_new_tokens: int, chunk: int, dev) -> list[int]:
    logits, gen = _forward(model, cache, ids, chunk, dev), []
    for i in range(max_new_tokens):
        gen.append(int(logits.argmax()))
        if i + 1 < max_new_tokens:
            logits = _forward(model, cache, gen[-1:], chunk, dev)
    return gen


def _judge(tok):
    return lambda case, ids, seconds: _trial(case, tok.decode(ids, skip_special_tokens=True), seconds)


def _trial(case: Case, answer: str, seconds: float) -> Trial:
    return Trial(case.length, case.depth, case.trial, case.key, answer, first_number(answer) == case.key, seconds)


def evaluate(model, hay: Haystack, cases: list[Case], specs: list[RunSpec], max_new_tokens: int,
             progress: bool = True, log: bool = False) -> list[PasskeyResult]:
    """Every run over every case; the model is wrapped per run and handed back unwrapped."""
    from camelot.adapters import get_adapter

    import camelot

    max_pos = get_adapter(model).max_positions(model)
    results = [PasskeyResult(s) for s in specs]
    runs_cases = []
    for r in results:
        mine = cases
        if r.spec.strategy == "full":
            mine, r.note = fitting_cases(cases, max_pos)
            if not mine:
                r.skipped = r.note
        runs_cases.append(mine)
    total = sum(len(c) for r, c in zip(results, runs_cases) if not r.skipped)
    bar = progress_bar(range(total), desc="passkey (runs x cases)", enabled=progress, unit="case")
    tick = (lambda: next(bar, None)) if progress else None
    for r, mine in zip(results, runs_cases):
        if r.skipped:
            continue
        t0 = time.perf_counter()
        if r.spec.config is None:
            r.trials = run_full(model, hay, mine, max_new_tokens, on_case=tick)
        else:
            cm = camelot.wrap(model, r.spec.config)
            try:
                r.trials = run_camelot(cm, hay, mine, max_new_tokens, on_case=tick)
            finally:
                cm.unwrap()
        r.seconds = time.perf_counter() - t0
        if log:  # partial results of a long sweep, as each run ends
            print(f"{r.spec.label}: {_pct(r.accuracy())}% in {r.seconds:.0f}s", file=sys.stderr, flush=True)
    return results


def fitting_cases(cases: list, max_pos: int | None) -> tuple[list, str | None]:
    """The cases whose length fits the model's positions (what `full` can run), and a note
    naming the lengths that do not."""
    if max_pos is None:
        return cases, None
    too_long = sorted({c.length for c in cases if c.length > max_pos})
    note = f"lengths {', '.join(map(format_length, too_long))} exceed the model's {max_pos} positions"
    return [c for c in cases if c.length <= max_pos], note if too_long else None


# ---------------------------------------------------------------------------- CLI
def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "passkey", help="pass key retrieval accuracy of camelot and its baselines",
        description="Hide a random 5-digit pass key at several depths of N tokens of filler and ask for it; "
        "every strategy reads the same tokens. Comma-separated values sweep a setting. Prints accuracy "
        "tables and writes passkey.json to --out. Example: camelot passkey --lengths 2k,8k --depths 10,50,90 "
        "--window 512 --trials 3",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_model_args(p)
    p.add_argument("--lengths", default="2k,8k,32k,128k", help="tokens per sequence, answer included")
    p.add_argument("--depths", default="10,50,90", help="needle depths in percent of the filler")
    p.add_argument("--trials", type=int, default=3, help="keys per length and depth")
    add_sweep_args(p, window="512", slots=SLOTS_DEFAULT, placement="recency")
    p.add_argument("--filler", default="repeat",
                   help="'repeat' (grass is green...) or a text: a file, or builtin:genesis_kjv")
    p.add_argument("--max-new-tokens", type=int, default=8, help="answer tokens generated (greedy)")
    p.add_argument("--seed", type=int, default=0, help="seed of the keys")
    p.add_argument("--out", default="results/passkey", help="folder for passkey.json")
    p.set_defaults(func=run_cli)


def run_cli(args: argparse.Namespace) -> int:

    lengths = list(parse_list(args.lengths, parse_length, "lengths"))
    depths = list(parse_list(args.depths, int, "depths"))
    if any(n < 1 for n in lengths):
        raise UserError("--lengths must be positive")
    if any(not 0 <= x <= 100 for x in depths):
        raise UserError(f"--depths are percentages in [0, 100], got {depths}")
    if args.trials < 1 or args.max_new_tokens < 1:
        raise UserError("--trials and --max-new-tokens must be >= 1")
    specs = plan_runs(sweep_at_budget(args, SLOTS_DEFAULT))
    filler_text = haystack_text(args.filler)
    model, tok = load_model_from_args(args)
    hay = build_haystack(tok, max(lengths), filler_text)
    cases = make_cases(hay, lengths, depths, args.trials, args.max_new_tokens, args.seed)
    results = evaluate(model, hay, cases, specs, args.max_new_tokens, progress=not args.no_progress, log=True)
    config = {k: v for k, v in vars(args).items() if k != "func"}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / "passkey.json"
    path.write_text(json.dumps(to_json(results, config, lengths, depths), indent=1))
    print(markdown_tables(results, lengths, depths))
    for r in results:
        if r.skipped:
            print(f"\nnote: {r.spec.label} skipped: {r.skipped}")
        elif r.note:
            print(f"\nnote: {r.spec.label}: {r.note} (not run; 'all' covers the lengths run)")
    print(f"\n{len(cases)} cases per run (chance is ~0%); wrote {path}")
    return 0
