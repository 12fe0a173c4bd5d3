"""A snapshot of a memory that ranks tokens (a reserve ranked by surprise, a question or both)
carries what the write will rank the still-raw tokens by (the open segment's and the raw tail's
importance) and the last prediction (the next token's surprise), so a loaded memory continues
exactly as the one that was saved; files whose extra tensors do not fit are refused untouched."""

from __future__ import annotations

import pytest
import torch

import camelot
from camelot.snapshot import read_metadata
from tests.conftest import tiny_llama
from tests.test_snapshot import _doc, _refused

QUESTION = [5, 6, 7]


def _wrapped(kind: str, **kw) -> camelot.CamelotModel:
    cfg = camelot.CamelotConfig.recall(kind, **{"window": 16, "slots": 24, "recent": 8, "sink": 2, **kw})
    cm = camelot.wrap(tiny_llama(), cfg)
    if cm.ranks_by_question:
        cm.set_question(QUESTION)
    return cm


@pytest.mark.parametrize("kind", ["facts", "question", "question+facts", "demonstrations"])
def test_a_loaded_ranking_memory_continues_exactly(tmp_path, kind):
    doc = _doc(170, seed=5)
    cm = _wrapped(kind)
    cm.feed(doc[:, :90], progress=False)  # mid-segment: open tokens and a raw tail carry importance
    path = cm.memory.save(tmp_path / "m.camelot")
    other = _wrapped(kind)
    other.memory.load(path)
    nll = [w.score(doc[:, 90:], keep_memory=True).token_nll for w in (cm, other)]
    assert torch.equal(nll[0], nll[1])
    for a, b in zip(cm.runtimes, other.runtimes):
        for name in ("keys", "counts", "span_score", "span_before"):
            assert torch.equal(getattr(a.state.memory, name), getattr(b.state.memory, name)), name


def test_without_the_importance_the_continuation_differs(tmp_path):
    """The check above can fail: the same file less its importance and last prediction (what
    files written before 2026-12-06 hold) loads, and the reserve then ranks differently."""
    from safetensors.torch import load_file, save_file

    from camelot.snapshot import tensor_digest

    doc = _doc(170, seed=5)
    cm = _wrapped("facts")
    cm.feed(doc[:, :90], progress=False)
    path = cm.memory.save(tmp_path / "m.camelot")
    tensors = {k: t for k, t in load_file(str(path)).items() if "importance" not in k and "surprise" not in k}
    old = tmp_path / "old.camelot"
    save_file(tensors, str(old), metadata={**read_metadata(path), "digest": tensor_digest(tensors)})
    other = _wrapped("facts")
    other.memory.load(old)
    assert not torch.equal(cm.score(doc[:, 90:], keep_memory=True).token_nll,
                           other.score(doc[:, 90:], keep_memory=True).token_nll)


def test_importance_and_predictions_that_do_not_fit_are_refused(tmp_path):
    from safetensors.torch import load_file, save_file

    from camelot.snapshot import tensor_digest

    cm = _wrapped("question+facts")
    cm.feed(_doc(90, seed=5), progress=False)
    path = cm.memory.save(tmp_path / "m.camelot")
    meta = read_metadata(path)
    imp, logp = "layer0.prefix.importance", "surprise.last_logp"
    assert load_file(str(path))[imp].shape == (1, 2, 8, 2)
    target = _wrapped("question+facts")
    target.feed(_doc(40, seed=6), progress=False)
    for edit, needle in [(lambda t: t.update({imp: t[imp][..., 0].clone()}), "prefix of layer 0 takes"),
                         (lambda t: t.update({imp: t[imp][:, :, :5].clone()}), "does not fit its tokens"),
                         (lambda t: t.update({"layer0.sink.importance": t.pop(imp)}), "sink of layer 0"),
                         (lambda t: t[imp].__setitem__((0, 0, 0, 0), float("nan")), "non-finite"),
                         (lambda t: t.update({logp: t[logp][:, :50].clone()}), "predicts \\[batch, 101\\]"),
                         (lambda t: t[logp].__setitem__((0, 3), float("inf")), "last_logp holds non-finite")]:
        tensors = load_file(str(path))
        edit(tensors)
        bad = tmp_path / "bad.camelot"
        save_file(tensors, str(bad), metadata={**meta, "digest": tensor_digest(tensors)})
        _refused(target, bad, needle)
    assert target.surprise.last_logp is not None  # refused before the last prediction was replaced
    plain = camelot.wrap(tiny_llama(), camelot.CamelotConfig.consolidating(window=16, slots=24, recent=8, sink=2))
    plain.feed(_doc(90, seed=5), progress=False)
    path = plain.memory.save(tmp_path / "plain.camelot")
    tensors = {**load_file(str(path)), imp: torch.zeros(1, 2, 8)}  # a memory that ranks nothing
    save_file(tensors, str(bad), metadata={**read_metadata(path), "digest": tensor_digest(tensors)})
    _refused(plain, bad, "ranks no tokens")


@pytest.mark.parametrize("decay", [1.0, 0.995, 0.9951])
def test_loaded_tensors_sit_in_aligned_memory_whatever_the_header_length(tmp_path, decay):
    """The metadata (here a config value's digits) sets the header's length and so where each
    tensor's bytes fall in the file; read as they lie they are only 8-byte aligned, and SIMD sums
    over them round differently from the saved memory's (the continuation above then differs in
    the last bit). Loaded tensors are copies in fresh memory."""
    from camelot.snapshot_format import read_snapshot

    cm = _wrapped("facts", use_decay=decay)
    cm.feed(_doc(60, seed=1), progress=False)
    tensors, _ = read_snapshot(cm.memory.save(tmp_path / "m.camelot"))
    assert all(t.data_ptr() % 64 == 0 for t in tensors.values() if t.numel())
