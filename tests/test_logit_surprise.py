"""surprise_from="logit": the write ranks by the model's own NLL plus the logit memory added to
each token (camelot/logit_gain.py). Checked against a reference built from the model's own
modules: with memory on layer 0 alone, what memory added to the residual stream is exactly that
layer's attention output minus the output of a forward that reads no memory, and the credit is
the token's logit from the final normed residual with it minus without it."""

from __future__ import annotations

import pytest
import torch
from camelot.adapters import get_adapter
from camelot.adapters.base import UnsupportedModelError
from camelot.adapters.testing import TINY_FAMILIES, tiny_family

import camelot
import camelot.reads.query
from camelot.logit_gain import LogitGain
from camelot.snapshot import SnapshotError
from camelot.surprise import window_only
from tests.conftest import tiny_llama
from tests.test_window_surprise import SURPRISE, _ids

# where each family keeps the modules the reference reads: the first layer's attention module,
# its output projection, and the norm before the unembedding
PARTS = {
    "llama": lambda m: (m.model.layers[0].self_attn, m.model.norm),
    "llama-softcap": lambda m: (m.model.layers[0].self_attn, m.model.norm),
    "gpt2": lambda m: (m.transformer.h[0].attn, m.transformer.ln_f),  # Conv1D projection, LayerNorm
}
# the reads whose results join the softmax differently: per-entry logits (evict=use keeps them),
# one fused kernel over every slot, each query's own top-k gathered
READS = {"dense": {}, "fused": {"evict": "age"}, "top-k": {"evict": "age", "read_top_k": 2}}


def _noted(cm: camelot.CamelotModel) -> list[torch.Tensor]:
    """The NLL layer 0's state is handed at each step ([B, m])."""
    st, seen = cm.runtimes[0].state, []
    note = st.note_surprise

    def recording(nll):
        seen.append(nll.clone())
        return note(nll)

    st.note_surprise = recording
    return seen


def _spans(n: int, window: int, piece: int) -> list[tuple[int, int]]:
    """Steps of at most `piece` tokens that never cross a segment boundary."""
    out, a = [], 0
    while a < n:
        e = min(n, a + piece, (a // window + 1) * window)
        out.append((a, e))
        a = e
    return out


def _model(family: str) -> torch.nn.Module:
    if family == "gpt2":
        model = tiny_family(family).build()
        with torch.no_grad():  # GPT-2's initialisation (std 0.02) leaves logits too small to test against
            model.get_output_embeddings().weight.mul_(30)
            for block in model.transformer.h:  # and its zero biases would hide one the credit failed to take off
                block.attn.c_proj.bias.normal_()
        return model
    model = tiny_llama()
    if family == "llama-softcap":  # llama's forward ignores it; the credit must cap as gemma2 would
        model.config.final_logit_softcapping = 0.5
    return model


def _reference(cm: camelot.CamelotModel, family: str, ids: torch.Tensor, piece: int = 5):
    """Per step: the NLL the write was handed, and the reference's (own NLL + credit)."""
    attn, norm = PARTS[family](cm.model)
    seen = _noted(cm)
    got: dict[str, torch.Tensor] = {}
    hooks = [attn.register_forward_hook(lambda mod, a, out: got.__setitem__("attn", out[0].float())),
             norm.register_forward_pre_hook(lambda mod, a: None if "h" in got else got.update(h=a[0].float()))]
    head = cm.model.get_output_embeddings().weight.float()
    softcap = getattr(cm.model.config, "final_logit_softcapping", None)

    def logit(x, tok):
        out = (x * head[tok]).sum(-1)
        return out if not softcap else torch.tanh(out / softcap) * softcap

    want, last = [], None
    with torch.no_grad():
        for a, e in _spans(ids.shape[1], cm.config.window, piece):
            pos = torch.arange(cm.open_len, cm.open_len + e - a)[None]
            with window_only(cm.runtimes):
                cm.model(input_ids=ids[:, a:e], position_ids=pos, use_cache=False)
            alone = got["attn"]
            got.pop("h", None)
            lg = cm.step(ids[:, a:e]).float()
            h, added = got.pop("h"), got["attn"] - alone
            full, win = norm(h), norm(h - added)
            nll = torch.zeros(ids.shape[0], e - a)
            nll[:, 1:] = torch.nn.functional.cross_entropy(lg[:, :-1].transpose(1, 2), ids[:, a + 1 : e],
                                                           reduction="none")
            gain = torch.zeros_like(nll)
            gain[:, 1:] = logit(full[:, :-1], ids[:, a + 1 : e]) - logit(win[:, :-1], ids[:, a + 1 : e])
            if last is not None:
                plg, pfull, pwin = last
                nll[:, 0] = -torch.log_softmax(plg[:, -1], -1).gather(-1, ids[:, a : a + 1])[:, 0]
                gain[:, 0] = logit(pfull[:, -1], ids[:, a]) - logit(pwin[:, -1], ids[:, a])
            want.append(nll + gain.clamp_min(0))
            last = lg, full, win
    for hk in hooks:
        hk.remove()
    return seen, want


@pytest.mark.parametrize("family", sorted(PARTS))
@pytest.mark.parametrize("read", sorted(READS))
def test_the_credit_is_the_logit_memory_added_to_the_token(family, read, monkeypatch):
    if read == "top-k":  # gather each query's k entries even from a bank this small
        monkeypatch.setattr(camelot.reads.query, "SPARSE_BELOW", 0)
    ids = _ids(96, rows=2)
    cfg = camelot.CamelotConfig(**{**SURPRISE, **READS[read], "layers": [0], "surprise_from": "logit"})
    cm = camelot.wrap(_model(family), cfg)
    seen, want = _reference(cm, family, ids)
    for noted, ref in zip(seen, want, strict=True):
        assert torch.allclose(noted, ref, atol=2e-4), (noted - ref).abs().max()
    own = camelot.wrap(cm.unwrap(), camelot.CamelotConfig(**{**SURPRISE, **READS[read], "layers": [0],
                                                                     "surprise_from": "memory"}))
    seen_own = _noted(own)
    with torch.no_grad():
        for a, e in _spans(ids.shape[1], 16, 5):
            own.step(ids[:, a:e])
    gained = torch.cat(seen, 1) - torch.cat(seen_own, 1)
    assert gained.min() > -1e-4  # a credit, never a debit
    assert gained.gt(2e-3).sum() > 10  # and a real one once memory holds something (10x the tolerance)
    assert gained[:, :32].abs().max() < 1e-6  # nothing while the memory is empty
    own.unwrap()


def test_every_layer_that_reads_memory_adds_its_part():
    """Memory on both layers credits more than on the first alone, and not the same amounts."""
    ids = _ids(96)
    noted = {}
    for layers in ([0], "all"):
        cm = camelot.wrap(tiny_llama(), camelot.CamelotConfig(**SURPRISE, layers=layers, surprise_from="logit"))
        seen = _noted(cm)
        cm.score(ids)
        noted[str(layers)] = torch.cat(seen, 1)
        cm.unwrap()
    assert not torch.allclose(noted["[0]"], noted["all"], atol=1e-3)


def test_one_row_never_credits_another():
    ids = _ids(96, rows=2)
    other = ids.clone()
    other[1] = _ids(96, seed=5)[0]
    runs = []
    for x in (ids, other):
        cm = camelot.wrap(tiny_llama(), camelot.CamelotConfig(**SURPRISE, surprise_from="logit"))
        seen = _noted(cm)
        cm.score(x)
        runs.append(torch.cat(seen, 1))
        cm.unwrap()
    assert torch.allclose(runs[0][0], runs[1][0], atol=1e-5)
    assert not torch.allclose(runs[0][1], runs[1][1], atol=1e-3)


def test_a_model_without_the_parts_is_refused_at_wrap():
    model = tiny_llama()
    for layer in model.model.layers:
        layer.self_attn.proj_out = layer.self_attn.o_proj
        del layer.self_attn.o_proj
    with pytest.raises(UnsupportedModelError, match="output projection"):
        camelot.wrap(model, camelot.CamelotConfig(**SURPRISE, surprise_from="logit"))
    # the refused model is left as it was, and a run that ranks nothing by surprise (a baseline
    # beside camelot in one sweep) reads no parts: wrapped
    camelot.wrap(model, camelot.CamelotConfig(strategy="sliding", window=16, slots=16, sink=2,
                                              surprise_from="logit")).unwrap()
    model = tiny_llama()
    model.model.final = model.model.norm
    del model.model.norm
    with pytest.raises(UnsupportedModelError, match="norm before"):
        camelot.wrap(model, camelot.CamelotConfig(**SURPRISE, surprise_from="logit"))


@pytest.mark.parametrize("read", sorted(READS))
def test_the_credit_leaves_the_forward_as_it_was(read, monkeypatch):
    """Keeping the plain keys' output apart (the value matmul split in two where memory's values
    join it) changes no logit: the same step from the same memory, with and without the credit."""
    if read == "top-k":
        monkeypatch.setattr(camelot.reads.query, "SPARSE_BELOW", 0)
    ids = _ids(70, rows=2)
    cm = camelot.wrap(tiny_llama(), camelot.CamelotConfig(**{**SURPRISE, **READS[read], "surprise_from": "logit"}))
    with torch.no_grad():
        cm.feed(ids[:, :64], progress=False)
        cp = cm.memory.checkpoint()
        assert any(rt.state.memory.counts.gt(0).any() for rt in cm.runtimes)  # memory is read
        credited = cm.step(ids[:, 64:])
        cm.memory.restore(cp)
        cm.surprise.source = "memory"
        plain = cm.step(ids[:, 64:])
    assert torch.allclose(credited, plain, atol=1e-5), (credited - plain).abs().max()
    cm.unwrap()


def _noted_score(model, **cfg) -> tuple[torch.Tensor, camelot.CamelotModel]:
    cm = camelot.wrap(model, camelot.CamelotConfig(**SURPRISE, **cfg))
    seen = _noted(cm)
    with torch.no_grad():
        cm.score(_ids(80))
    return torch.cat(seen, 1), cm


def test_auto_is_the_logit_credit_where_the_parts_are_found_and_the_own_surprise_elsewhere(monkeypatch):
    assert camelot.CamelotConfig().surprise_from == "auto"
    auto, cm = _noted_score(tiny_llama())
    assert cm.surprise.source == "logit"
    logit, cm = _noted_score(cm.unwrap(), surprise_from="logit")
    own, cm = _noted_score(cm.unwrap(), surprise_from="memory")
    assert torch.equal(auto, logit) and not torch.allclose(auto, own)
    model = cm.unwrap()
    monkeypatch.setattr(camelot.logit_gain, "FINAL_NORMS", ("ln_final",))  # a family whose norm has no known name
    with pytest.warns(UserWarning, match="norm before .* the write ranks by the model's own surprise") as caught:
        fallback, cm = _noted_score(model)
    assert caught[0].filename == __file__  # where the user wrapped the model
    assert cm.surprise.source == "memory"
    assert torch.equal(fallback, own)
    cm.unwrap()


def _steps(cm: camelot.CamelotModel, ids: torch.Tensor, spans: list[tuple[int, int]]) -> None:
    with torch.no_grad():
        for a, e in spans:
            cm.step(ids[:, a:e])


def test_a_checkpoint_and_a_snapshot_carry_the_next_tokens_credit(tmp_path):
    """Restored or loaded between two steps, the write is handed exactly what the uninterrupted
    run hands it: the first token after the break is credited from the last query before it."""
    ids, other = _ids(96, rows=2), _ids(96, seed=3, rows=2)
    cfg = camelot.CamelotConfig(**SURPRISE, surprise_from="logit")
    spans, cut = _spans(96, 16, 5), 12  # a break inside a segment, once memory holds something
    cm = camelot.wrap(tiny_llama(), cfg)
    seen = _noted(cm)
    _steps(cm, ids, spans)
    whole = torch.cat(seen[cut:], 1)
    cm.reset()
    _steps(cm, ids, spans[:cut])
    cp = cm.memory.checkpoint()
    path = cm.memory.save(tmp_path / "m.camelot")
    _steps(cm, other, spans[cut : cut + 3])  # another continuation first
    cm.memory.restore(cp)
    seen.clear()
    _steps(cm, ids, spans[cut:])
    assert torch.allclose(torch.cat(seen, 1), whole, atol=1e-6)
    cm.memory.restore(cp)
    cm.surprise.last_normed = None  # without the carry the first token after the break is noted otherwise
    seen.clear()
    _steps(cm, ids, spans[cut:])
    assert not torch.allclose(torch.cat(seen, 1)[:, 0], whole[:, 0], atol=1e-4)
    cm.unwrap()
    loaded = camelot.wrap(tiny_llama(), cfg)
    loaded.memory.load(path)
    seen = _noted(loaded)
    _steps(loaded, ids, spans[cut:])
    assert torch.allclose(torch.cat(seen, 1), whole, atol=1e-6)
    loaded.unwrap()
    plain = camelot.wrap(tiny_llama(), camelot.CamelotConfig(**SURPRISE, surprise_from="memory"))
    with pytest.raises(SnapshotError, match="logit credit's residuals"):
        plain.memory.load(path)


def test_residuals_that_do_not_fit_are_refused(tmp_path):
    from safetensors.torch import load_file, save_file

    from camelot.snapshot import read_metadata, tensor_digest
    from tests.test_snapshot import _refused

    cfg = camelot.CamelotConfig(**SURPRISE, surprise_from="logit")
    cm = camelot.wrap(tiny_llama(), cfg)
    cm.feed(_ids(90), progress=False)
    path = cm.memory.save(tmp_path / "m.camelot")
    meta, name = read_metadata(path), "surprise.last_normed"
    assert load_file(str(path))[name].shape == (2, 1, 1, 64)
    target = camelot.wrap(tiny_llama(), cfg)
    target.feed(_ids(40, seed=6), progress=False)
    for edit, needle in [(lambda t: t.update({name: t[name][..., :50].clone()}), "are \\[2, batch, 1, 64\\] floats"),
                         (lambda t: t.update({name: t[name][:1].clone()}), "are \\[2, batch, 1, 64\\] floats"),
                         (lambda t: t.update({name: t[name].expand(2, 3, 1, 64).clone()}), "bad batch size"),
                         (lambda t: t[name].__setitem__((1, 0, 0, 3), float("nan")), "last_normed holds non-finite")]:
        tensors = load_file(str(path))
        edit(tensors)
        bad = tmp_path / "bad.camelot"
        save_file(tensors, str(bad), metadata={**meta, "digest": tensor_digest(tensors)})
        _refused(target, bad, needle)


@pytest.mark.parametrize("family", [f.name for f in TINY_FAMILIES])
def test_every_family_finds_the_norm_its_unembedding_reads_and_is_credited(family):
    """The norm found by name is the one whose output the unembedding reads (OPT also names each
    layer's MLP norm `final_layer_norm`), and a wrapped document is credited."""
    model = tiny_family(family).build()
    lens = LogitGain(model, get_adapter(model).attention_modules(model))
    ids = _ids(24) % model.config.vocab_size
    got = {}
    hook = model.get_output_embeddings().register_forward_pre_hook(lambda mod, a: got.update(x=a[0]))
    with torch.no_grad(), lens.capturing():
        model(input_ids=ids, use_cache=False)
    hook.remove()
    assert torch.allclose(lens.norm(lens._residual), got["x"], atol=1e-5)
    cm = camelot.wrap(model, camelot.CamelotConfig(**SURPRISE, layers="all", surprise_from="logit"))
    seen = _noted(cm)
    cm.score(_ids(80) % model.config.vocab_size)
    own = camelot.wrap(cm.unwrap(), camelot.CamelotConfig(**SURPRISE, layers="all", surprise_from="memory"))
    seen_own = _noted(own)
    own.score(_ids(80) % model.config.vocab_size)
    assert (torch.cat(seen, 1) - torch.cat(seen_own, 1)).max() > 1e-4
    own.unwrap()
