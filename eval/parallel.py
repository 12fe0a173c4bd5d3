"""Data-parallel evaluation under `accelerate launch`: each process scores its share of the
documents, and the token-weighted totals are gathered so that the main process reports what one
process would have reported.

    accelerate launch --num_processes 2 --cpu -m camelot ppl --data docs/ ...

Outside a launcher (WORLD_SIZE unset or 1) every function here is the identity, and nothing is
imported from accelerate or torch.distributed.

Documents are dealt out whole (a document's segments depend on each other through memory, so
it cannot be split across processes), longest first to the least-loaded process, which balances
token counts. Each result keeps per-document NLL sums, so the gathered total is summed in the
original document order: the same float additions as one process, hence the same number.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

from camelot.cli import UserError


def world() -> tuple[int, int]:
    """(rank, number of processes) of this process; (0, 1) when not launched in parallel."""
    n = int(os.environ.get("WORLD_SIZE", "1"))
    if n <= 1:
        return 0, 1
    from accelerate import PartialState

    state = PartialState()  # joins the process group the launcher set up (gloo on CPU)
    return state.process_index, state.num_processes


def is_main_process() -> bool:
    return world()[0] == 0


def assign(lengths: Sequence[int], n_procs: int) -> list[list[int]]:
    """Document indices per process: longest first to the process with the fewest tokens (ties:
    lowest rank), each process's list in document order. Deterministic, so every process
    computes the same assignment without talking to the others."""
    load = [0] * n_procs
    out: list[list[int]] = [[] for _ in range(n_procs)]
    for i in sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)):
        p = min(range(n_procs), key=lambda r: (load[r], r))
        out[p].append(i)
        load[p] += lengths[i]
    return [sorted(ix) for ix in out]


def shard(docs: list, rank: int | None = None, n_procs: int | None = None) -> list:
    """This process's documents (each keeps its `.ids`); all of them outside a launcher."""
    if rank is None or n_procs is None:
        rank, n_procs = world()
    if n_procs == 1:
        return list(docs)
    if len(docs) < n_procs:
        raise UserError(f"{len(docs)} document(s) for {n_procs} processes: every process needs at least one; "
                        "launch fewer processes")
    ix = assign([d.ids.numel() for d in docs], n_procs)[rank]
    return [docs[i] for i in ix]


def merge(per_process: Sequence[Sequence[Any]], doc_order: Sequence[str]) -> list:
    """Combine RunResults (one list per process, the same runs in the same order) into one list,
    token-weighted: NLL sums and token counts add, per-position buckets add, documents are put
    back in `doc_order`. `seconds` adds up the processes' compute time, so tokens/s stays a
    per-process rate. A run skipped anywhere is skipped in the result (one process would have
    skipped it too: the skip depends on the longest document)."""
    from camelot.eval.plan import RunResult

    first = per_process[0]
    rank_of = {name: i for i, name in enumerate(doc_order)}
    out = []
    for j, r0 in enumerate(first):
        parts = [p[j] for p in per_process]
        if any(p.spec.label != r0.spec.label for p in parts):
            raise RuntimeError("processes ran different plans; every process must get the same arguments")
        n_b = max(len(p.bucket_nll) for p in parts)
        res = RunResult(r0.spec, bucket_nll=[0.0] * n_b, bucket_tokens=[0] * n_b)
        res.skipped = next((p.skipped for p in parts if p.skipped), None)
        for p in parts:
            for b, (s, n) in enumerate(zip(p.bucket_nll, p.bucket_tokens)):
                res.bucket_nll[b] += s
                res.bucket_tokens[b] += n
            res.seconds += p.seconds
            res.docs.extend(p.docs)
        res.docs.sort(key=lambda d: rank_of.get(d["name"], len(rank_of)))
        if res.skipped is None:
            for d in res.docs:  # document order, as one process adds them
                res.nll_sum += d["nll_sum"]
                res.tokens += d["tokens"]
        out.append(res)
    return out


def gather(results: list, doc_order: Sequence[str]) -> list:
    """All processes' results merged (see `merge`), on every process; `results` as is outside a
    launcher."""
    rank, n_procs = world()
    if n_procs == 1:
        return results
    from accelerate.utils import gather_object

    per_process = gather_object([results])  # one entry per process, in rank order
    return merge(per_process, doc_order)
