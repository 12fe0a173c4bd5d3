"""Memory snapshots on tiny random llamas: a save/load roundtrip answers identically, and every
file that does not fit (another model, another layout, damaged, truncated, pickle) is refused
with a clear message while the live memory stays exactly as it was. Also stats and checkpoints."""

from __future__ import annotations

import copy
import json
import pickle

import pytest
import torch

import camelot
from camelot.snapshot import SnapshotError, read_metadata
from tests.conftest import bare, tiny_llama

STRATEGIES = ["camelot", "knn", "recurrent", "sliding", "window"]


def _doc(n, batch=1, seed=0, vocab=101):
    return torch.randint(0, vocab, (batch, n), generator=torch.Generator().manual_seed(seed))


def _state(cm) -> list:
    out = []
    for rt in cm.runtimes:
        out += [rt.state.local_k, rt.state.local_v]
        out += list(rt.state.memory.state_dict().values()) if rt.state.memory is not None else []
        pre = rt.state.prefix
        out += [pre.keys, pre.values, pre.finite] if pre is not None else []
        out += [rt.state.sink.keys, rt.state.sink.values] if rt.state.sink is not None else []
    return [None if t is None else t.clone() for t in out]


def _same(a: list, b: list) -> bool:
    return len(a) == len(b) and all((x is None and y is None) or (x is not None and y is not None and torch.equal(x, y))
                                    for x, y in zip(a, b))


def _cfg(strategy="camelot", **kw):
    return bare(**{"window": 16, "slots": 12, "read_top_k": 2, "threshold": 0.5, "strategy": strategy, **kw})


@pytest.fixture
def fed(llama, tmp_path):
    """A camelot wrapper that read 75 tokens (4 closed segments + 11 open), and its snapshot."""
    cm = camelot.wrap(llama, _cfg())
    cm.feed(_doc(75, batch=2), progress=False)
    path = cm.memory.save(tmp_path / "doc.camelot", metadata={"note": "hello"})
    return cm, path


@pytest.mark.parametrize("strategy, extra", [(s, {}) for s in STRATEGIES] + [
    ("camelot", dict(recent=20, sink=3)), ("sliding", dict(sink=2))])
def test_roundtrip_answers_identically(llama, tmp_path, strategy, extra):
    cm = camelot.wrap(llama, _cfg(strategy, **extra))
    cm.feed(_doc(75, batch=2), progress=False)
    before = _state(cm)
    cm.memory.save(tmp_path / "m.camelot")
    assert _same(_state(cm), before) and cm.open_len == 75 % 16  # saving changes nothing
    question = _doc(6, batch=2, seed=5)
    answer = cm.generate(question, max_new_tokens=30)
    model = cm.unwrap()

    cm2 = camelot.wrap(model, _cfg(strategy, **extra))
    cm2.feed(_doc(40, batch=2, seed=9), progress=False)  # whatever it held is replaced
    cm2.memory.load(tmp_path / "m.camelot")
    assert _same(_state(cm2), before)
    assert torch.equal(cm2.generate(question, max_new_tokens=30), answer)


def test_metadata_records_model_config_and_versions(fed):
    cm, path = fed
    meta = read_metadata(path)
    assert meta["format"] == "camelot-memory" and meta["format_version"] == "1"
    assert meta["camelot_version"] == camelot.__version__
    assert json.loads(meta["model_type"]) == "llama"
    assert [json.loads(meta[k]) for k in ("num_layers", "num_heads", "num_kv_heads", "head_dim")] == [2, 4, 2, 16]
    assert json.loads(meta["config"])["slots"] == 12 and meta["open_len"] == "11"
    assert len(meta["fingerprint"]) == 32 and meta["user.note"] == "hello"
    assert cm.memory.load(path)["user.note"] == "hello"


def _refused(cm, path, needle: str) -> None:
    before = _state(cm)
    with pytest.raises(SnapshotError, match=needle):
        cm.memory.load(path)
    assert _same(_state(cm), before), "a refused load must leave the live memory untouched"


def test_other_models_are_refused(fed):
    cm, path = fed
    cm.unwrap()
    for model, needle in [(tiny_llama(seed=3), "another llama checkpoint"),
                          (tiny_llama(kv_heads=1), r"num_kv_heads 2 vs 1"),
                          (tiny_llama(layers=3), r"num_layers 2 vs 3")]:
        other = camelot.wrap(model, _cfg())
        other.feed(_doc(40, batch=2, seed=4), progress=False)
        _refused(other, path, needle)
        other.unwrap()


@pytest.mark.parametrize("change, needle", [
    ({"strategy": "knn"}, "holds a 'camelot' memory"),
    ({"slots": 24}, "12 slots per head"),
    ({"layers": [1]}, r"memory on layers \[0, 1\]"),
    ({"window": 8}, "open segment holds 11 tokens"),
    ({"recent": 4}, "saved with recent=0"),
    ({"sink": 2}, "saved with sink=0"),
])
def test_other_layouts_are_refused(fed, change, needle):
    cm, path = fed
    model = cm.unwrap()
    cfg = _cfg(**{k: v for k, v in change.items() if k != "strategy"})
    other = camelot.wrap(model, cfg.replace(strategy=change.get("strategy", "camelot")))
    other.feed(_doc(40, batch=2, seed=4), progress=False)
    _refused(other, path, needle)


def test_damaged_files_are_refused(fed, tmp_path):
    cm, path = fed
    data = path.read_bytes()
    header_len = int.from_bytes(data[:8], "little")
    cases = {}
    flipped = bytearray(data)
    flipped[8 + header_len + 100] ^= 0xFF  # a bit of tensor data: the file still parses
    cases["flipped.camelot"] = (bytes(flipped), "do not match the digest")
    header = bytearray(data)
    header[9] = ord("#")  # the JSON header no longer parses
    cases["header.camelot"] = (bytes(header), "not a readable camelot snapshot")
    cases["truncated.camelot"] = (data[: len(data) // 2], "not a readable camelot snapshot")
    cases["tiny.camelot"] = (data[:5], "truncated or empty")
    cases["pickle.camelot"] = (pickle.dumps({"keys": [1.0, 2.0]}), "pickle")
    cases["text.camelot"] = (b"just some text, not a snapshot at all", "not a readable camelot snapshot")
    for name, (content, needle) in cases.items():
        (tmp_path / name).write_bytes(content)
        _refused(cm, tmp_path / name, needle)
    torch.save(_state(cm), tmp_path / "torch.pt")  # zip-format pickle
    _refused(cm, tmp_path / "torch.pt", "pickle")
    _refused(cm, tmp_path / "missing.camelot", "no such snapshot file")
    _refused(cm, tmp_path, "not a file")
    from safetensors.torch import save_file

    save_file({"x": torch.zeros(2)}, str(tmp_path / "plain.safetensors"))
    _refused(cm, tmp_path / "plain.safetensors", "not a camelot memory snapshot")


def test_tampered_tensors_are_refused(fed, tmp_path):
    """Files whose digest matches (re-signed) but whose content does not fit the model."""
    from safetensors.torch import load_file, save_file

    from camelot.snapshot import tensor_digest

    cm, path = fed
    meta = read_metadata(path)
    for edit, needle in [(lambda t: t.pop("layer1.memory.ages"), "lacks memory.ages"),
                         (lambda t: t.update({"layer0.memory.keys": t["layer0.memory.keys"][..., :8].clone()}), "keys"),
                         (lambda t: t["layer0.memory.values"].__setitem__((0, 0, 0, 0), float("nan")), "non-finite"),
                         (lambda t: t["layer0.memory.counts"].__setitem__((0, 0, 0), -3), "negative"),
                         (lambda t: t.__setitem__("layer7.extra", torch.zeros(1)), "unexpected tensors")]:
        tensors = load_file(str(path))
        edit(tensors)
        bad = tmp_path / "bad.camelot"
        save_file(tensors, str(bad), metadata={**meta, "digest": tensor_digest(tensors)})
        _refused(cm, bad, needle)


def test_stats_count_and_age_histograms():
    model = tiny_llama()
    cm = camelot.wrap(model, bare(window=16, slots=64, read_top_k=2, threshold=0.6))
    cm.feed(_doc(70), progress=False)
    stats = cm.memory.stats()
    assert stats["open_tokens"] == 70 % 16 and stats["strategy"] == "camelot"
    assert [row["layer"] for row in stats["layers"]] == [0, 1]
    for row in stats["layers"]:
        used = row["slots_used"]
        assert 0 < used <= row["slots_total"] == 64 * 2
        assert sum(n for _, n in row["count_hist"]) == used == sum(n for _, n in row["age_hist"])
        assert row["tokens_merged"] == 64 * 2  # 4 closed segments x 2 kv heads, none evicted
        assert row["merged"] + row["new"] == 64 * 2 and row["new"] == used
        lows = [lo for lo, _ in row["count_hist"]]
        assert lows == sorted(lows) and all(lo & (lo - 1) == 0 for lo in lows)  # powers of two
        assert row["count_max"] < 2 * lows[-1] and row["age_max"] < 64
    json.dumps(stats)  # plain data


def test_checkpoint_and_restore(llama):
    cm = camelot.wrap(llama, _cfg())
    cm.feed(_doc(40), progress=False)
    cp = cm.memory.checkpoint()
    before = _state(cm)
    first = cm.generate(_doc(30, seed=2), max_new_tokens=10)
    assert not _same(_state(cm), before)
    for _ in range(2):  # a checkpoint survives being restored
        cm.memory.restore(cp)
        assert _same(_state(cm), before)
        assert torch.equal(cm.generate(_doc(30, seed=2), max_new_tokens=10), first)


def test_a_header_length_that_looks_like_a_pickle_opcode_still_loads(fed, tmp_path):
    """A safetensors file opens with its header length; when its low byte is 0x80 (a pickle's
    first opcode) the file must still load, not be refused as pickle."""
    cm, _ = fed
    for n in range(256):
        path = cm.memory.save(tmp_path / "odd.camelot", metadata={"pad": "x" * n})
        if path.read_bytes()[0] == 0x80:
            break
    else:
        pytest.fail("no padding gave a header length with low byte 0x80")
    assert cm.memory.load(path)["user.pad"] == "x" * n
    # cut short, the same file is truncated, not pickle
    (tmp_path / "cut.camelot").write_bytes(path.read_bytes()[:5])
    _refused(cm, tmp_path / "cut.camelot", "truncated or empty")


# ---------------------------------------------------------------------------- the span reserve
def _reserve_cfg(**kw):
    # recent=0 and saves at a segment boundary: no open segment and no raw tail, whose tokens'
    # importance (LayerState.received_open / received_tail) snapshots do not carry
    return camelot.CamelotConfig(**{"window": 16, "slots": 12, "recent": 0, "sink": 2, "span_reserve": 6, "span": 2,
                                    "span_score": "sum", "importance": "attention", **kw})


@pytest.mark.parametrize("apart", [0, 3])
def test_a_loaded_span_reserve_continues_like_the_original(tmp_path, apart):
    """Without span_score in the file the loaded reserve looks empty and the next write replaces
    its tokens: keys, counts and the continuation's NLL then differ. (span_apart carries the
    importance of `apart` more tokens: saved and loaded with the rest.)"""
    doc = _doc(96 + 60, seed=3)
    cm = camelot.wrap(tiny_llama(), _reserve_cfg(span_apart=apart))
    cm.feed(doc[:, :96], progress=False)
    assert all(bool(torch.isfinite(rt.state.memory.span_score[..., :6]).all()) for rt in cm.runtimes)  # full
    path = cm.memory.save(tmp_path / "reserve.camelot")
    other = camelot.wrap(tiny_llama(), _reserve_cfg(span_apart=apart))
    other.memory.load(path)
    nll = [w.score(doc[:, 96:], keep_memory=True).token_nll for w in (cm, other)]
    assert torch.equal(nll[0], nll[1])
    for a, b in zip(cm.runtimes, other.runtimes):
        for name in ("keys", "values", "counts", "ages", "span_score", "span_before"):
            assert torch.equal(getattr(a.state.memory, name), getattr(b.state.memory, name)), name


def test_empty_reserve_places_roundtrip_as_a_mark_below_every_score():
    from camelot.memory import SlotBank
    from camelot.memory.bank_state import EMPTY_SPAN
    from camelot.memory.rules import WriteRule

    rule = WriteRule(span_reserve=6, span=2, span_score="sum")
    bank = SlotBank(12, 0.99, rule=rule)
    k = torch.randn(1, 2, 3, 8, generator=torch.Generator().manual_seed(0))
    bank.write(k, k, received=torch.ones(1, 2, 3))  # 3 tokens held, 3 places empty
    state = bank.state_dict()
    # 6 places, then the carried importance of the last span - 1 = 1 token written (1.0)
    assert state["span_score"].shape == (1, 2, 7) and int((state["span_score"] == EMPTY_SPAN).sum()) == 2 * 3
    assert torch.equal(state["span_score"][..., 6], torch.ones(1, 2))
    loaded = SlotBank(12, 0.99, rule=rule)
    loaded.load_state_dict(state)
    assert torch.equal(loaded.span_score, bank.span_score)  # the mark back to -inf, the scratch entry too
    assert torch.equal(loaded.span_before, bank.span_before)
    marked_as_before = {**state, "span_score": state["span_score"].clamp(min=-1.0)}  # files written until 2026-12-05
    loaded.load_state_dict(marked_as_before)
    assert torch.equal(loaded.span_score, bank.span_score)
    places_only = {**state, "span_score": state["span_score"][..., :6]}  # saved before the carried scores
    loaded.load_state_dict(places_only)
    assert torch.equal(loaded.span_score, bank.span_score) and bool(torch.isneginf(loaded.span_before).all())
    for bad, needle in [(SlotBank(12, 0.99), "no reserve"), (SlotBank(12, 0.99, rule=WriteRule(span_reserve=4)),
                                                             r"\[1, 2, 4 or 11\]")]:
        with pytest.raises(ValueError, match=needle):
            bad.load_state_dict(state)
    older = {n: t for n, t in state.items() if n != "span_score"}  # a snapshot from before span_score
    loaded.load_state_dict(older)
    assert bool(torch.isneginf(loaded.span_score).all())


def test_a_scan_reserve_with_scores_below_the_old_empty_mark_roundtrips_exactly():
    """A scan scores a window by its excess over the write's mean, so held tokens may score below
    0, and below -1, the empty mark until 2026-12-05 (they came back as empty places)."""
    from camelot.memory import SlotBank
    from camelot.memory.rules import WriteRule

    rule = WriteRule(span_reserve=16, span=2, span_score="scan", importance="surprise")
    bank = SlotBank(24, 0.99, rule=rule)
    k = torch.randn(1, 1, 12, 8, generator=torch.Generator().manual_seed(0))
    bank.write(k, k, received=torch.tensor([[[9.0] * 4 + [0.0] * 8]]))
    assert bool((bank.span_score < -1).logical_and(torch.isfinite(bank.span_score)).any())
    loaded = SlotBank(24, 0.99, rule=rule)
    loaded.load_state_dict(bank.state_dict())
    assert torch.equal(loaded.span_score, bank.span_score) and torch.equal(loaded.span_before, bank.span_before)


@pytest.mark.parametrize("recall", ["facts", "demonstrations"])
def test_a_recall_reserve_roundtrips_through_a_file(tmp_path, recall):
    """The loaded copy continues from the same state; with surprise ("facts") its choices may then
    differ a little, as a snapshot does not carry the model's prediction of the next token (the
    first token read after a load scores surprise 0)."""
    cfg = camelot.CamelotConfig.recall(recall, window=16, slots=40, recent=0, sink=2)
    doc = _doc(96 + 40, seed=5)
    cm = camelot.wrap(tiny_llama(), cfg)
    cm.feed(doc[:, :96], progress=False)
    other = camelot.wrap(tiny_llama(), cfg)
    other.memory.load(cm.memory.save(tmp_path / "scan.camelot"))
    for a, b in zip(cm.runtimes, other.runtimes):
        for name in ("keys", "values", "counts", "ages", "span_score", "span_before"):
            assert torch.equal(getattr(a.state.memory, name), getattr(b.state.memory, name)), name
    nll = [w.score(doc[:, 96:112], keep_memory=True).token_nll for w in (cm, other)]
    assert torch.equal(nll[0], nll[1])  # the next segment reads the same memory


def test_the_default_write_resumes_from_a_file_as_if_never_saved(tmp_path):
    """The default write evicts by use: the slots' scores travel in the snapshot (and through a
    device move), so a memory saved, loaded and fed on evicts what the uninterrupted one evicts."""
    cfg = camelot.CamelotConfig(window=16, slots=24, sink=2)
    assert cfg.evict == "use" and cfg.span_reserve == 8
    doc = _doc(96 + 64, seed=6)
    cm = camelot.wrap(tiny_llama(), cfg)
    cm.feed(doc[:, :96], progress=False)
    other = camelot.wrap(tiny_llama(), cfg)
    other.memory.load(cm.memory.save(tmp_path / "default.camelot"))
    assert any(bool(rt.state.memory.score.abs().sum() > 0) for rt in cm.runtimes)  # something was read
    for w in (cm, other):
        w.feed(doc[:, 96:], progress=False)
    for a, b in zip(cm.runtimes, other.runtimes):
        for name in ("keys", "values", "counts", "ages", "score", "span_score"):
            assert torch.equal(getattr(a.state.memory, name), getattr(b.state.memory, name)), name
    moved = copy.deepcopy(cm.runtimes[0].state.memory)
    moved.load_state_dict(cm.runtimes[0].state.memory.state_dict())
    assert torch.equal(moved.score, cm.runtimes[0].state.memory.score)


def test_slot_scores_that_do_not_fit_are_refused(tmp_path):
    from safetensors.torch import load_file, save_file

    from camelot.snapshot import tensor_digest

    cfg = camelot.CamelotConfig(window=16, slots=24, sink=2)
    cm = camelot.wrap(tiny_llama(), cfg)
    cm.feed(_doc(64, seed=7), progress=False)
    path = cm.memory.save(tmp_path / "use.camelot")
    meta, name = read_metadata(path), "layer0.memory.slot_score"
    for edit, needle in [(lambda t: t.update({name: t[name][..., :4].clone()}), "24 slots"),
                         (lambda t: t[name].__setitem__((0, 0, 0), float("nan")), "non-finite"),
                         (lambda t: t.update({"layer0.memory.pinned": t["layer0.memory.counts"].clamp(max=1)}),
                          "ranks no slots")]:  # protect=0: nothing is pinned
        tensors = load_file(str(path))
        edit(tensors)
        bad = tmp_path / "bad.camelot"
        save_file(tensors, str(bad), metadata={**meta, "digest": tensor_digest(tensors)})
        _refused(camelot.wrap(tiny_llama(), cfg), bad, needle)


def test_span_scores_that_do_not_fit_are_refused(tmp_path):
    from safetensors.torch import load_file, save_file

    from camelot.snapshot import tensor_digest

    cm = camelot.wrap(tiny_llama(), _reserve_cfg())
    cm.feed(_doc(48, seed=3), progress=False)
    path = cm.memory.save(tmp_path / "reserve.camelot")
    model = cm.unwrap()
    plain = camelot.wrap(model, _reserve_cfg(span_reserve=0))
    plain.feed(_doc(40, seed=4), progress=False)
    _refused(plain, path, "was saved with span_reserve=6, this wrapper has span_reserve=0")
    # and the other way: the paper write's consolidated slots are no reserve (it loaded silently,
    # its last slots then taken for an empty reserve)
    _refused(camelot.wrap(tiny_llama(), _reserve_cfg()), plain.memory.save(tmp_path / "plain.camelot"),
             "was saved with span_reserve=0, this wrapper has span_reserve=6")
    plain.unwrap()
    cm = camelot.wrap(model, _reserve_cfg())
    cm.feed(_doc(40, seed=4), progress=False)
    meta = read_metadata(path)
    name = "layer0.memory.span_score"
    for edit, needle in [(lambda t: t.update({name: t[name][..., :4].clone()}), "6 span reserve places"),
                         (lambda t: t[name].__setitem__((0, 0, 0), -2e30), "below -1e"),
                         (lambda t: t[name].__setitem__((0, 0, 0), float("inf")), "non-finite"),
                         (lambda t: t.update({name: t[name].long()}), "dtype"),
                         (lambda t: t.update({"layer0.open.span_score": t.pop(name)}), "keeps no span reserve")]:
        tensors = load_file(str(path))
        edit(tensors)
        bad = tmp_path / "bad.camelot"
        save_file(tensors, str(bad), metadata={**meta, "digest": tensor_digest(tensors)})
        _refused(cm, bad, needle)
