"""Read rules: how a query picks the memory entries it attends to. A new rule is one module
with a `Read` subclass and one line in READS."""

from __future__ import annotations

from camelot.interfaces import SearchBackend
from camelot.reads.base import CountBias, DenseResult, Read, ReadAttribution, SparseResult
from camelot.reads.blocks import BlockRead
from camelot.reads.dense import EverySlotRead
from camelot.reads.query import SPARSE_BELOW, QueryTopK
from camelot.reads.shared import GroupTopK, KeyTopK

# config.retrieve -> rule for a top-k read; top_k=None reads every entry whatever `retrieve` says
READS: dict[str, type[Read]] = {"query": QueryTopK, "group": GroupTopK, "key": KeyTopK}


def make_read(search: SearchBackend, top_k: int | None, retrieve: str, count_bias: float,
              count_mode: str = "relative", count_cap: float | None = None) -> Read:
    rule = EverySlotRead if top_k is None else READS[retrieve]
    return rule(search, top_k, count_bias, count_mode, count_cap)


__all__ = ["READS", "SPARSE_BELOW", "BlockRead", "CountBias", "DenseResult", "EverySlotRead", "GroupTopK", "KeyTopK",
           "QueryTopK", "Read", "ReadAttribution", "SparseResult", "make_read"]
