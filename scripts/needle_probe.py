"""A small, reproducible needle probe: does the memory keep one rare fact?

A 6-digit number tied to a name, written twice ("Remember: <name>'s secret number is <n>. <name>'s
secret number is <n>."), goes in at 10/50/80% depth of a ~3k-token passage of a book, and the
question "What is <name>'s secret number? <name>'s secret number is" comes at the end; SmolLM2
answers greedily and a trial is a hit when the first number in the answer is <n>. Each trial
draws its book, passage, name and number from the seed, so every strategy and write rule sees
the same token ids.

    .venv/bin/python scripts/needle_probe.py --threads 1 --trials 6 \
        --run full --run window --run sliding:slots=508 --run camelot:slots=380 \
        --run camelot:slots=380,evict=use \
        --run camelot:slots=380,span_reserve=256,span=8,span_follow=12,span_score=scan,importance=question

importance=question reads the question and the answer's start ("What is <name>'s secret number?
<name>'s secret number is") before the passage (CamelotModel.set_question).

A run is `strategy[:key=value,...]`: CamelotConfig fields (window 128, sink 4, recent 128 unless
given) over the consolidating write (camelot.presets.CONSOLIDATING; the default write's runs give
its fields). `full` is the plain model over the whole prompt. Budget per head = sink + recent + slots
(sliding: sink + slots).
"""

from __future__ import annotations

import argparse
import json
import random
import re
import sys
import time
from pathlib import Path

import torch

from camelot.presets import CONSOLIDATING

BOOKS = Path("/work/shared/data/docs/books")
BOOK_FILES = ("pg84_frankenstein.txt", "pg1342_pride_and_prejudice.txt", "pg9198_the_complete_angler.txt",
              "pg17474_how_to_listen_to_music.txt", "pg16215_jack_sheppard.txt", "genesis_kjv.txt",
              "pg14263_katrine.txt", "pg972_the_devils_dictionary.txt")
NAMES = ("Margaret Oakes", "Tobias Fenwick", "Clara Whitmore", "Silas Brandt", "Helena Voss", "Jasper Quill",
         "Agnes Thorne", "Felix Marlowe", "Ida Penrose", "Rupert Hale", "Nora Ashby", "Otto Kessler")
NEEDLE = " Remember: {name}'s secret number is {num}. {name}'s secret number is {num}."
QUESTION = "\n\nWhat is {name}'s secret number? {name}'s secret number is"
DEPTHS = (10, 50, 80)


def make_trials(tok, n: int, length: int, seed: int) -> list[dict]:
    """n trials, cycling over the depths and the books; each has its own passage, name, number."""
    rng = random.Random(seed)
    trials = []
    for i in range(n):
        depth = DEPTHS[i % len(DEPTHS)]
        book = BOOK_FILES[(i // len(DEPTHS) + i) % len(BOOK_FILES)]
        text = (BOOKS / book).read_text(encoding="utf-8")
        start = rng.randrange(20_000, len(text) - 20 * length)
        ids = tok(text[start : start + 8 * length], add_special_tokens=False)["input_ids"]
        name, num = rng.choice(NAMES), str(rng.randrange(100_000, 1_000_000))
        needle = tok(NEEDLE.format(name=name, num=num), add_special_tokens=False)["input_ids"]
        question = tok(QUESTION.format(name=name), add_special_tokens=False)["input_ids"]
        hay = ids[: length - len(needle) - len(question)]
        cut = _sentence_end(tok, hay, len(hay) * depth // 100)
        asked = tok(QUESTION.format(name=name).strip(), add_special_tokens=False)["input_ids"]
        trials.append({"book": book, "depth": depth, "name": name, "num": num,
                       "ids": hay[:cut] + needle + hay[cut:] + question, "asked": asked})
    return trials


def _sentence_end(tok, ids: list[int], at: int) -> int:
    """First index >= at right after a token ending in '.', so the needle starts a sentence."""
    for j in range(at, len(ids)):
        if tok.decode(ids[j - 1 : j]).rstrip().endswith("."):
            return j
    return at


def parse_run(text: str) -> tuple[str, dict]:
    strategy, _, rest = text.partition(":")
    changes = {}
    for part in filter(None, rest.split(",")):
        k, _, v = part.partition("=")
        changes[k] = _value(v)
    return strategy, changes


def _value(v: str):
    for kind in (int, float):
        try:
            return kind(v)
        except ValueError:
            pass
    return {"true": True, "false": False, "none": None}.get(v.lower(), v)


def answer(model, tok, strategy: str, changes: dict, ids: list[int], new: int = 8,
           asked: list[int] | None = None) -> str:
    """asked: the question's words, read before the document where the write ranks by a question
    (importance=question)."""
    import camelot

    x = torch.tensor([ids])
    if strategy == "full":
        out = model.generate(x, max_new_tokens=new, do_sample=False)[0, len(ids):]
        return tok.decode(out)
    cfg = {"window": 128, "sink": 4, "recent": 128, "strategy": strategy,
           **(CONSOLIDATING if strategy == "camelot" else {}), **changes}
    w = camelot.wrap(model, camelot.CamelotConfig(**cfg))
    try:
        if w.ranks_by_question:
            w.set_question(asked)
        return tok.decode(w.generate(x, max_new_tokens=new)[0])
    finally:
        w.unwrap()


def emit(row: dict, out: str | None) -> None:
    """Print one run's JSON line, and append it to `out` where given."""
    print(json.dumps(row), flush=True)
    if out:
        with open(out, "a") as f:
            f.write(json.dumps(row) + "\n")


def common_args(doc: str) -> argparse.ArgumentParser:
    """The options this probe shares with scripts/write_ablation.py."""
    p = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", action="append", required=True, help="strategy[:key=value,...] (repeatable)")
    p.add_argument("--model", default="smollm2")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default=None, help="append one JSON line per run here")
    return p


def main(argv: list[str] | None = None) -> int:
    p = common_args(__doc__)
    p.add_argument("--trials", type=int, default=6)
    p.add_argument("--length", type=int, default=3072, help="prompt tokens")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    import camelot

    model, tok = camelot.load_model(args.model)
    trials = make_trials(tok, args.trials, args.length, args.seed)
    for spec in args.run:
        strategy, changes = parse_run(spec)
        hits, answers, t0 = [], [], time.perf_counter()
        for tr in trials:
            text = answer(model, tok, strategy, changes, tr["ids"], asked=tr["asked"])
            found = re.search(r"\d+", text)
            hits.append(bool(found and found.group() == tr["num"]))
            answers.append(text.strip()[:20])
        row = {"run": spec, "hits": sum(hits), "trials": len(trials), "per_trial": [int(h) for h in hits],
               "depths": [tr["depth"] for tr in trials], "seconds": round(time.perf_counter() - t0, 1),
               "answers": answers}
        emit(row, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
