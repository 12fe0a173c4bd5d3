"""Perplexity of write rules at equal budget (docs/memory_write.md), with the time the bank's
write takes, on the development corpora: 2 State of the Union addresses, Genesis, 2 WikiText
articles, each cut to --max-tokens.

    .venv/bin/python scripts/write_ablation.py --threads 1 --run sliding:slots=508 \
        --run camelot:slots=380 --run camelot:slots=380,evict=use

A run is `strategy[:key=value,...]` of CamelotConfig fields (window 128, sink 4, recent 128
unless given), over the consolidating write (camelot.presets.CONSOLIDATING: the write these
runs' documented changes are named against; the default write's runs give its fields), as in
scripts/needle_probe.py. Prints one JSON line per run: perplexity per
corpus (token-weighted over its documents) and seconds spent in SlotBank.write.
"""

from __future__ import annotations

import math
import sys
import time
from pathlib import Path

import torch

from camelot.presets import CONSOLIDATING

DOCS = Path("/work/shared/data/docs")
CORPORA = {"sotu": ["state_union/1945-Truman.txt", "state_union/1946-Truman.txt"],
           "genesis": ["books/genesis_kjv.txt"],
           "wiki": ["wikitext2_test/001_robert_unk.txt", "wikitext2_test/002_du_fu.txt"]}


def main(argv: list[str] | None = None) -> int:
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from needle_probe import common_args, emit, parse_run

    import camelot
    from camelot.memory import SlotBank

    p = common_args(__doc__)
    p.add_argument("--max-tokens", type=int, default=4096)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    model, tok = camelot.load_model(args.model)
    docs = {c: [tok((DOCS / f).read_text(encoding="utf-8"))["input_ids"][: args.max_tokens] for f in files]
            for c, files in CORPORA.items()}

    spent = [0.0]
    original = SlotBank.write

    def timed(self, *a, **kw):
        t0 = time.perf_counter()
        try:
            return original(self, *a, **kw)
        finally:
            spent[0] += time.perf_counter() - t0

    SlotBank.write = timed
    for spec in args.run:
        strategy, changes = parse_run(spec)
        cfg = camelot.CamelotConfig(**{"window": 128, "sink": 4, "recent": 128, "strategy": strategy,
                                       **(CONSOLIDATING if strategy == "camelot" else {}), **changes})
        w = camelot.wrap(model, cfg)
        spent[0], t0, row = 0.0, time.perf_counter(), {"run": spec}
        try:
            for corpus, ids in docs.items():
                nll = torch.cat([w.score(torch.tensor(d)).token_nll[0] for d in ids])
                row[corpus] = round(math.exp(float(nll.mean())), 3)
        finally:
            w.unwrap()
        row["write_s"] = round(spent[0], 2)
        row["total_s"] = round(time.perf_counter() - t0, 1)
        emit(row, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
