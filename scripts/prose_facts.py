"""Facts written in plain prose inside a novel, asked through `camelot ask`'s session: where a
reserve ranked by surprise does not help (the novel is about as surprising to the model as the
fact; docs/inference.md).

Each case puts one plain sentence ("Mr. Hartley keeps the spare key under the blue flowerpot.")
at a depth of the first --chars characters of a book and asks about it in a chat turn; a case is
found when the expected words are in the greedy answer. Every run reads the same text with the
same question through AskSession (the chat template, the document, then the question), with
`ask`'s memory defaults (window 512, 4096 slots, recency placement) unless the run changes them.

    .venv/bin/python scripts/prose_facts.py --model qwen2.5-0.5b --threads 1 \\
        --run full --run camelot --run recall:facts --run recall:question

A run: `full` (plain generate over the whole prompt), `camelot[:key=value,...]` (CamelotConfig
fields over ask's defaults and the consolidating write) or `recall:KIND[,key=value...]` (CamelotConfig.recall(KIND)).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

from camelot.presets import CONSOLIDATING

BOOKS = Path("/work/shared/data/docs/books")
# (book, sentence, question, expected words in the answer)
CASES = (
    ("pg84_frankenstein.txt", "The secret code of the vault is 4821937.", "What is the secret code of the vault?",
     "4821937"),
    ("pg84_frankenstein.txt", "Mr. Hartley keeps the spare key under the blue flowerpot by the kitchen door.",
     "Where does Mr. Hartley keep the spare key?", "flowerpot"),
    ("pg1342_pride_and_prejudice.txt", "The ship that carried the letters to Lisbon was called the Northern "
     "Swallow.", "What was the ship that carried the letters to Lisbon called?", "Northern Swallow"),
    ("pg1342_pride_and_prejudice.txt", "Colonel Ashcombe was born in the town of Wexmoor in 1791.",
     "In which town was Colonel Ashcombe born?", "Wexmoor"),
    ("pg16215_jack_sheppard.txt", "The password to the old cellar door was 'juniper seventeen'.",
     "What was the password to the old cellar door?", "juniper"),
    ("pg16215_jack_sheppard.txt", "Mrs. Dalloway paid exactly 312 guineas for the painted harpsichord.",
     "How many guineas did Mrs. Dalloway pay for the painted harpsichord?", "312"),
)
ASK_MEMORY = {"window": 512, "slots": 4096, "placement": "recency"}


def document(book: str, sentence: str, depth: int, chars: int) -> str:
    """The book's first `chars` characters (after its first 10,000, past the licence header) with
    the sentence put in at the first sentence end after `depth` percent."""
    text = (BOOKS / book).read_text(encoding="utf-8")[10_000 : 10_000 + chars]
    at = text.find(". ", len(text) * depth // 100) + 2
    return text[:at] + sentence + " " + text[at:]


def config(run: str):
    import camelot

    kind, _, rest = run.partition(":")
    if kind == "recall":
        name, _, rest = rest.partition(",")
    changes = {}
    for part in filter(None, rest.split(",")):
        k, _, v = part.partition("=")
        changes[k] = int(v) if v.lstrip("-").isdigit() else v
    if kind == "recall":
        return camelot.CamelotConfig.recall(name, **{**ASK_MEMORY, **changes})
    return camelot.CamelotConfig(**{**ASK_MEMORY, **CONSOLIDATING, **changes})


def answer_full(model, tok, doc: str, question: str, new: int) -> str:
    msgs = [{"role": "user", "content": f"{doc}\n\n{question}"}]
    ids = tok.apply_chat_template(msgs, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    out = model.generate(**ids, max_new_tokens=new, do_sample=False)[0, ids["input_ids"].shape[1]:]
    return tok.decode(out, skip_special_tokens=True)


def answer_camelot(model, tok, cfg, doc: str, question: str, new: int) -> str:
    import camelot
    from camelot.ask import AskSession

    with camelot.wrap(model, cfg) as cm:
        session = AskSession(cm, tok, generation={"max_new_tokens": new})
        session.read(doc, progress=False, question=question)
        return session.ask(question)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", action="append", required=True, help="full | camelot[:k=v,...] | recall:KIND[,k=v...]")
    p.add_argument("--model", default="qwen2.5-0.5b")
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--chars", type=int, default=80_000, help="characters of each book (80,000: ~18k Qwen tokens)")
    p.add_argument("--depths", default="25,60")
    p.add_argument("--cases", default=None, help="comma-separated case indices (default: all)")
    p.add_argument("--new-tokens", type=int, default=24)
    p.add_argument("--out", default=None, help="append one JSON line per run here")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from needle_probe import emit

    import camelot

    model, tok = camelot.load_model(args.model, dtype=getattr(torch, args.dtype))
    picked = [CASES[int(i)] for i in args.cases.split(",")] if args.cases else list(CASES)
    depths = [int(d) for d in args.depths.split(",")]
    for run in args.run:
        cfg = None if run == "full" else config(run)
        hits, answers, t0 = [], [], time.perf_counter()
        for book, sentence, question, expected in picked:
            for depth in depths:
                doc = document(book, sentence, depth, args.chars)
                text = (answer_full(model, tok, doc, question, args.new_tokens) if cfg is None
                        else answer_camelot(model, tok, cfg, doc, question, args.new_tokens))
                hits.append(int(expected.lower() in text.lower()))
                answers.append(text.strip()[:40])
        row = {"run": run, "found": sum(hits), "cases": len(hits), "per_case": hits,
               "seconds": round(time.perf_counter() - t0, 1), "answers": answers}
        emit(row, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
