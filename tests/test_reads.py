"""Read rules are pluggable: the example rule of docs/architecture.md, as a user would add it
(one module, one registry line), runs through a layer and reads what it says it reads."""

from __future__ import annotations

import re
import sys
import types
from pathlib import Path

import pytest
import torch

from camelot.attention import LayerRuntime
from camelot.interfaces import Memory, SearchBackend, require
from camelot.layer_state import LayerState
from camelot.memory import SlotBank
from camelot.positions import Positions
from camelot.reads import READS, make_read
from camelot.search import TorchExactSearch

DOC = Path(__file__).resolve().parents[1] / "docs" / "architecture.md"


def _example_module() -> types.ModuleType:
    code = re.search(r"```python\n\s*(# camelot/reads/frequent\.py.*?)```", DOC.read_text(), re.S).group(1)
    code = "\n".join(line[2:] if line.startswith("  ") else line for line in code.splitlines())
    mod = types.ModuleType("camelot.reads.frequent")
    exec(compile(code, str(DOC), "exec"), mod.__dict__)
    return mod


def test_the_documented_example_rule_plugs_in_with_one_registry_line(monkeypatch):
    rule = _example_module().MostMerged
    monkeypatch.setitem(READS, "frequent", rule)
    monkeypatch.setitem(sys.modules, "camelot.reads.frequent", types.ModuleType("x"))
    torch.manual_seed(0)
    d, n = 8, 6
    bank = SlotBank(n, 0.99)
    keys = torch.randn(1, 1, n, d)
    counts = torch.tensor([[[1, 9, 2, 7, 1, 3]]])
    bank.load_state_dict({"keys": keys, "values": torch.randn(1, 1, n, d), "counts": counts,
                          "ages": torch.zeros(1, 1, n).long(), "telemetry": torch.zeros(5).long()})
    read = make_read(TorchExactSearch(), 2, "frequent", count_bias=0.0)
    assert isinstance(read, rule)
    rt = LayerRuntime(0, LayerState(bank), Positions(None, 0), read, record_reads=True)
    rt.attend(torch.randn(1, 1, 3, d), torch.randn(1, 1, 3, d), torch.randn(1, 1, 3, d), 1.0, None, None)
    read_slots = rt.last_read.slots[0, 0, 0]  # [m, k]: every query reads the two most merged
    assert all(set(row.tolist()) == {1, 3} for row in read_slots)


def test_contracts_are_checked_at_construction():
    class NoReset:
        name, dense, score_dtype = "x", False, torch.float32

        def topk(self, *a):
            ...

        def indices(self, *a):
            ...

    with pytest.raises(TypeError, match="reset"):
        require(NoReset(), SearchBackend, "search backend")
    assert require(TorchExactSearch(), SearchBackend, "search backend")
    assert require(SlotBank(4, 0.9), Memory, "memory")
    with pytest.raises(TypeError, match="Memory"):
        require(object(), Memory, "memory")
