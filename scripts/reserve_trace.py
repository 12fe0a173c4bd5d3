"""Trace what the span reserve does with one RULER case (docs/retrieval.md, "Why the default loses
later needles"): after every write, the tokens it wrote, their mean surprise, the reserve's
lowest and median held score and how many of the write's tokens it took; for every needle, the
write that brought it, how many of its tokens the reserve took then, their surprise, and how many
it still holds at the end of the document.

    .venv/bin/python scripts/reserve_trace.py --model qwen2.5-0.5b --length 4096 --depth 75 --trial 6 \
        --budget 1024 --set span_spread=40

The reserve ranks by the model's surprise, the same for every layer and head, so layer 0's first
KV head stands for all. --save writes the per-token surprise and the cuts between writes
(torch.save) for offline replays of other rankings.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from camelot.eval.passkey import build_haystack, haystack_text  # noqa: E402
from camelot.eval.retrieval_tasks import make_cases, make_prompt, task_haystack  # noqa: E402
from needle_probe import parse_run  # noqa: E402

import camelot  # noqa: E402
import camelot.memory.reserve_write as reserve_write  # noqa: E402
from camelot.presets import slots_for_budget  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="qwen2.5-0.5b")
    ap.add_argument("--length", type=int, default=4096)
    ap.add_argument("--depth", type=int, default=25)
    ap.add_argument("--trial", type=int, default=0)
    ap.add_argument("--budget", type=int, default=1024)
    ap.add_argument("--window", type=int, default=512)
    ap.add_argument("--task", default="multikey")
    ap.add_argument("--haystack", default="builtin:genesis_kjv")
    ap.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE", help="a CamelotConfig field")
    ap.add_argument("--save", type=Path, help="torch.save the traced surprise here")
    ap.add_argument("--rank-opening", action="store_true",
                    help="rank the prompt's opening (template, instruction) like the document, as before 2026-12-07")
    args = ap.parse_args()
    torch.set_num_threads(1)
    model, tok = camelot.load_model(args.model, dtype=torch.bfloat16)
    prompt = make_prompt(tok, True)
    hay = task_haystack(build_haystack(tok, args.length, haystack_text(args.haystack)), args.task, prompt)
    case = make_cases(hay, args.task, prompt, [args.length], [args.depth], args.trial + 1, 16, seed=0)[args.trial]
    extra = parse_run("camelot:" + ",".join(args.set))[1]  # the key=value parser the other scripts share
    slots = slots_for_budget(args.budget, 4, "auto", extra.get("evict", "use"), args.window)
    cfg = camelot.CamelotConfig(window=args.window, slots=slots, placement="recency", **extra)
    ids = case.ids(hay)
    doc = ids[: len(ids) - len(case.question)]
    needles, cur, at = [], case.needle_at, len(hay.intro) + case.needle_at
    for pos, nid in case.inserts:
        at += pos - cur
        cur = pos
        needles.append((at, at + len(nid), tok.decode(nid).strip()))
        at += len(nid)

    writes = []  # (importance, held, scores) of layer 0's first head, once per write
    choose = reserve_write.LastChoice.choose

    def traced(self, settings, inputs):
        out = choose(self, settings, inputs)
        imp = inputs[1]
        if not writes or writes[-1][3].shape != imp.shape or not torch.equal(writes[-1][3], imp):
            writes.append((imp[0, 0].clone(), out[0][0, 0].clone(), out[2][0, 0, :-1].clone(), imp))
        return out

    reserve_write.LastChoice.choose = traced
    with camelot.wrap(model, cfg) as cm:
        opening = len(hay.intro)  # what eval/retrieval.py feeds as scaffolding (rank=False)
        cm.feed(torch.tensor([doc[:opening]]), progress=False, rank=args.rank_opening)
        cm.feed(torch.tensor([doc[opening:]]), progress=False)
        bank = cm.runtimes[0].state.memory
        written = sum(w[0].shape[0] for w in writes)
        base = bank.slots - cfg.span_reserve
        held_ages = bank.ages[0, 0, base : bank.slots][bank.counts[0, 0, base : bank.slots] > 0]
        held_pos = set((cfg.sink + written - 1 - held_ages).tolist())
    print(f"slots {cfg.slots} (reserve {cfg.span_reserve}), tail {cfg.recent}; asked: {case.key}")
    pos = cfg.sink
    for i, (imp, held, score, _) in enumerate(writes):
        t, kept = imp.shape[0], score[torch.isfinite(score)]
        print(f"write {i:3d} tokens [{pos}, {pos + t}) mean surprise {imp[torch.isfinite(imp)].mean():.2f}  "
              f"reserve min {kept.min():.2f} median {kept.median():.2f}  took {int(held.sum())}")
        for a, b, text in needles:
            lo, hi = max(a, pos), min(b, pos + t)
            if lo < hi:
                nll = " ".join(f"{x:.1f}" for x in imp[lo - pos : hi - pos].tolist())
                print(f"    needle {text!r}: took {int(held[lo - pos : hi - pos].sum())} of {hi - lo}; surprise {nll}")
        pos += t
    print(f"at the question, the reserve holds {sum(p < opening for p in held_pos)} of the opening's {opening} tokens")
    for a, b, text in needles:
        kept = sum(p in held_pos for p in range(a, b))
        end = "still raw (not yet written)" if a >= pos else f"holds {kept} of {b - a}"
        print(f"at the question, {text!r}: {end}")
    if args.save:
        torch.save({"imp": torch.cat([w[0] for w in writes]), "sizes": [w[0].shape[0] for w in writes],
                    "needles": needles, "reserve": cfg.span_reserve, "recent": cfg.recent, "asked": case.key},
                   args.save)


if __name__ == "__main__":
    main()
