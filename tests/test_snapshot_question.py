"""A snapshot of a memory ranked by a question carries that question's queries: the loaded
memory goes on ranking the rest of the document by it without set_question, exactly as the one
that was saved (a question set before the load is replaced; a file without one keeps it).
Queries that do not fit are refused with the live state untouched."""

from __future__ import annotations

import pytest
import torch

import camelot
from camelot.snapshot import read_metadata, tensor_digest
from tests.conftest import tiny_llama
from tests.test_snapshot import _doc, _refused

QUESTION, OTHER = [5, 6, 7], [40, 3, 3, 90, 12]
KEY = "layer0.question.queries"


def _wrapped(kind: str = "question", question: list[int] | None = None) -> camelot.CamelotModel:
    cfg = camelot.CamelotConfig.recall(kind, window=16, slots=24, recent=8, sink=2)
    cm = camelot.wrap(tiny_llama(), cfg)
    if question is not None:
        cm.set_question(question)
    return cm


def _saved(tmp_path, kind: str = "question", batch: int = 1) -> tuple[camelot.CamelotModel, object, torch.Tensor]:
    doc = _doc(170, batch=batch, seed=5)
    cm = _wrapped(kind, QUESTION)
    cm.feed(doc[:, :90], progress=False)
    return cm, cm.memory.save(tmp_path / "m.camelot"), doc


def _rewritten(tmp_path, path, edit) -> object:
    from safetensors.torch import load_file, save_file

    tensors = load_file(str(path))
    edit(tensors)
    out = tmp_path / "edited.camelot"
    save_file(tensors, str(out), metadata={**read_metadata(path), "digest": tensor_digest(tensors)})
    return out


@pytest.mark.parametrize("kind", ["question", "question+facts"])
@pytest.mark.parametrize("set_before", [None, OTHER])
def test_a_loaded_question_memory_goes_on_ranking_by_its_question(tmp_path, kind, set_before):
    cm, path, doc = _saved(tmp_path, kind)
    other = _wrapped(kind, set_before)  # never asked, or asked something else: the file's question wins
    other.memory.load(path)
    nll = [w.score(doc[:, 90:], keep_memory=True).token_nll for w in (cm, other)]
    assert torch.equal(nll[0], nll[1])
    for a, b in zip(cm.runtimes, other.runtimes):
        assert torch.equal(a.state.question, b.state.question)
        assert torch.equal(a.state.memory.keys, b.state.memory.keys)


def test_without_the_question_the_load_keeps_the_one_set_and_ranks_by_it(tmp_path):
    """The check above can fail: a file without the queries (as written before 2026-12-06, later)
    leaves a wrapper never asked unable to read on, and one asked another question ranks by that."""
    cm, path, doc = _saved(tmp_path)
    old = _rewritten(tmp_path, path, lambda t: [t.pop(k) for k in list(t) if ".question." in k])
    never = _wrapped()
    never.memory.load(old)
    with pytest.raises(ValueError, match="set_question"):
        never.feed(doc[:, 90:], progress=False)
    asked = _wrapped(question=OTHER)
    asked.memory.load(old)
    assert all(torch.equal(rt.state.question, q) for rt, q in zip(asked.runtimes, _questions(_wrapped(), OTHER)))
    assert not torch.equal(cm.score(doc[:, 90:], keep_memory=True).token_nll,
                           asked.score(doc[:, 90:], keep_memory=True).token_nll)


def _questions(cm: camelot.CamelotModel, ids: list[int]) -> list[torch.Tensor]:
    cm.set_question(ids)
    return [rt.state.question for rt in cm.runtimes]


def test_one_question_for_every_row_loads_and_a_batch_that_disagrees_is_refused(tmp_path):
    cm, path, doc = _saved(tmp_path, batch=2)
    assert _wrapped().memory.load(path) is not None  # queries [1, ...] beside rows of 2
    target = _wrapped(question=OTHER)
    target.feed(_doc(40, batch=2, seed=6), progress=False)
    three = _rewritten(tmp_path, path, lambda t: t.update({KEY: t[KEY].expand(3, -1, -1, -1).clone()}))
    _refused(target, three, "batch size")


def test_queries_that_do_not_fit_are_refused_untouched(tmp_path):
    cm, path, _ = _saved(tmp_path)
    target = _wrapped(question=OTHER)
    target.feed(_doc(40, seed=6), progress=False)
    rows = 2 * 16  # tiny_llama: 2 query heads per KV head, window 16
    for edit, needle in [(lambda t: t.update({KEY: t[KEY][..., :3].clone()}), "question queries"),
                         (lambda t: t.update({KEY: t[KEY][:, :1].clone()}), "2 kv heads"),
                         (lambda t: t.update({KEY: torch.zeros(1, 2, rows + 1, t[KEY].shape[3])}), f"1 to {rows}"),
                         (lambda t: t.update({KEY: t[KEY][0].clone()}), "question queries"),
                         (lambda t: t[KEY].__setitem__((0, 0, 0, 0), float("inf")), "non-finite"),
                         (lambda t: t.update({"layer0.question.keys": t.pop(KEY)}), "unexpected tensors")]:
        _refused(target, _rewritten(tmp_path, path, edit), needle)
    facts = _wrapped("facts")  # ranks by surprise: no question to take
    facts.feed(_doc(40, seed=6), progress=False)
    plain = _rewritten(tmp_path, facts.memory.save(tmp_path / "f.camelot"),
                       lambda t: t.update({KEY: torch.zeros(1, 2, 3, 16)}))
    _refused(facts, plain, "unexpected tensors")


def test_a_checkpoint_brings_back_its_question():
    cm = _wrapped(question=QUESTION)
    cm.feed(_doc(40, seed=6), progress=False)
    cp, held = cm.memory.checkpoint(), [rt.state.question for rt in cm.runtimes]
    cm.set_question(OTHER)
    cm.memory.restore(cp)
    assert all(torch.equal(rt.state.question, q) for rt, q in zip(cm.runtimes, held))
