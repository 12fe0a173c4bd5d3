"""A question set before the document ranks the raw reserve (CamelotConfig.recall("question")):
each token's importance is the largest logit the question's queries give its position-free key."""

from __future__ import annotations

import pytest
import torch

import camelot
from camelot.cli import main
from tests.conftest import tiny_llama
from tests.test_ask import ARGS, _answer, tiny_model_folder

QUESTION = [5, 17, 33, 8, 60, 2]


def _wrapped(model=None, kind: str = "question", **kw) -> camelot.CamelotModel:
    return camelot.wrap(model or tiny_llama(), camelot.CamelotConfig.recall(kind, **{
        "window": 16, "slots": 12, "recent": 16, "sink": 2, **kw}))


def _doc(n: int = 90, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 101, (1, n), generator=torch.Generator().manual_seed(seed))


def _reference_queries(model, ids: list[int]) -> list[torch.Tensor]:
    """Each layer's queries before rotary positions, from the plain model run on the question
    alone: [1, Hkv, G x n, D], a KV head's query heads (i // G) and tokens as rows."""
    got = []
    hooks = [layer.self_attn.q_proj.register_forward_hook(lambda mod, inp, out: got.append(out))
             for layer in model.model.layers]
    with torch.no_grad():
        model(torch.tensor([ids]))
    for h in hooks:
        h.remove()
    cfg = model.config
    d, hkv = cfg.hidden_size // cfg.num_attention_heads, cfg.num_key_value_heads
    return [q.view(1, len(ids), cfg.num_attention_heads, d).transpose(1, 2).reshape(1, hkv, -1, d) for q in got]


def test_each_written_token_is_ranked_by_the_questions_largest_logit_on_its_key():
    model = tiny_llama()
    ref = _reference_queries(model, QUESTION)
    cm = _wrapped(model)
    banks = [rt.state.memory for rt in cm.runtimes]
    assert all(b.wants_question and not (b.wants_surprise or b.wants_received) for b in banks)
    seen: dict[int, list[tuple[torch.Tensor, torch.Tensor]]] = {id(b): [] for b in banks}
    for b in banks:  # record the position-free keys each bank is handed and their importance
        b.write = (lambda f, out: lambda k, v, received=None, following=None: (
            out.append((k.clone(), received.clone())), f(k, v, received=received, following=following))[1])(
            b.write, seen[id(b)])
    cm.set_question(QUESTION)
    cm.feed(_doc(), progress=False)
    scale = ref[0].shape[-1] ** -0.5
    for b, q in zip(banks, ref):
        assert seen[id(b)], "nothing reached memory"
        for k, imp in seen[id(b)]:
            want = (q @ k.transpose(-1, -2)).amax(-2) * scale
            assert torch.allclose(imp, want, atol=1e-4), (imp - want).abs().max()
            assert not torch.equal(imp[:, 0], imp[:, 1])  # per KV head, not one score for all


def test_the_reserve_keeps_the_tokens_the_question_ranks_highest():
    """A reserve of 8 places and span 1: what it holds after the document are exactly the keys of
    the 8 written tokens with the highest question logits (per head)."""
    cm = _wrapped(slots=12, span_reserve=8, span=1, span_follow=0, span_score="sum")
    bank = cm.runtimes[1].state.memory
    written: list[tuple[torch.Tensor, torch.Tensor]] = []
    f = bank.write
    bank.write = lambda k, v, received=None, following=None: (written.append((k.clone(), received.clone())),
                                                              f(k, v, received=received, following=following))[1]
    cm.set_question(QUESTION)
    cm.feed(_doc(120, seed=3), progress=False)
    keys = torch.cat([k for k, _ in written], dim=2)[0]  # [H, T, D]
    imp = torch.cat([r for _, r in written], dim=2)[0]  # [H, T]
    held = bank.keys[0, :, 12 - 8 : 12]  # the reserve: the bank's last span_reserve slots
    for h in range(keys.shape[0]):
        top = keys[h, imp[h].topk(8).indices]
        d = torch.cdist(held[h].float(), top.float())
        assert bool((d.min(dim=1).values < 1e-4).all()) and bool((d.min(dim=0).values < 1e-4).all())


@pytest.mark.parametrize("kind", ["question", "question+facts"])
def test_set_question_leaves_the_documents_state_as_it_was_and_reset_forgets_it(kind):
    cm = _wrapped(kind=kind)
    cm.set_question(QUESTION)
    cm.feed(_doc()[:, :70], progress=False)
    before = {i: {n: t.clone() for n, t in rt.state.state_dict().items()} for i, rt in enumerate(cm.runtimes)}
    cm.set_question([9, 9, 4])
    for i, rt in enumerate(cm.runtimes):
        after = rt.state.state_dict()
        assert before[i].keys() == after.keys()
        assert all(torch.equal(before[i][n], after[n]) for n in after if n != "question.queries")
        assert not torch.equal(before[i]["question.queries"], after["question.queries"])  # only the question moved
    cm.reset()
    with pytest.raises(ValueError, match="set_question"):
        cm.feed(_doc(), progress=False)
    assert cm.open_len == 0 and all(not rt.state.memory.allocated for rt in cm.runtimes)  # refused before any change


@pytest.mark.parametrize("kind, extra", [("question", {}), ("question+facts", {}),
                                         ("question+facts", {"span_score": "joint-scan"})])
def test_causal_and_identical_to_an_empty_memory_before_anything_is_written(kind, extra):
    cm = _wrapped(kind=kind, **extra)
    doc = _doc(100)
    cm.set_question(QUESTION)
    a = cm.score(doc, keep_memory=True).token_nll
    changed = doc.clone()
    changed[0, 80] = (changed[0, 80] + 7) % 101
    cm.reset()
    cm.set_question(QUESTION)
    b = cm.score(changed, keep_memory=True).token_nll
    assert torch.equal(a[:, :79], b[:, :79])
    plain = camelot.wrap(cm.unwrap(), camelot.CamelotConfig(window=16, slots=12, recent=16, sink=2))
    first = plain.score(doc[:, :16]).token_nll  # one window: no memory read yet, whatever the write rule
    assert torch.equal(first, a[:, :15])


def test_a_memory_that_does_not_rank_by_a_question_refuses_one():
    cm = camelot.wrap(tiny_llama(), camelot.CamelotConfig.recall("facts", window=16, slots=12))
    with pytest.raises(ValueError, match="recall\\('question'\\)"):
        cm.set_question(QUESTION)
    cm = _wrapped()
    with pytest.raises(ValueError, match="empty"):
        cm.set_question(torch.zeros(1, 0, dtype=torch.long))


def test_ask_reads_the_question_first(tmp_path, capsys):
    folder = tiny_model_folder(tmp_path / "m")
    book = tmp_path / "book.txt"
    book.write_text("The pass key is 4471. " + "The sky is blue and the grass is green. " * 40)
    base = ["ask", "--model", str(folder), "--context-file", str(book), *ARGS]
    assert main([*base, "--recall-question", "What is the pass key?"]) == 0
    assert _answer(capsys).endswith("\n")
    for flag in ("--recall-question", "--recall-question-facts"):
        assert main([*base, flag, "-i"]) == 2
        err = capsys.readouterr().err
        assert f"{flag} ranks the document" in err and "Traceback" not in err


@pytest.mark.parametrize("extra, ranked, reserve", [
    ([], "surprise", 43),  # one question about a document: --recall is the default (all 64 slots but 21)
    (["--no-recall"], "surprise", 21),  # the default write: a third of the slots, ranked by surprise too
    (["--save", "SNAP"], "surprise", 21),  # the memory will meet other questions
    (["--consolidating"], None, 0),  # the write of camelot 0.1: no reserve
    (["--recall-question"], "the question", 43),
    (["--recall-question-facts"], "half by the question", 43),
    (["--recall-demos"], "attention", 43),
])
def test_ask_keeps_facts_by_default_only_for_one_question(tmp_path, capsys, extra, ranked, reserve):
    folder = tiny_model_folder(tmp_path / "m")
    book = tmp_path / "book.txt"
    book.write_text("The sky is blue and the grass is green. " * 40)
    extra = [str(tmp_path / "s.camelot") if x == "SNAP" else x for x in extra]
    assert main(["ask", "--model", str(folder), "--context-file", str(book), *ARGS, *extra, "Who?"]) == 0
    err = capsys.readouterr().err
    kinds = ("surprise", "the question", "attention", "half by the question")
    assert [k for k in kinds if f"reserve ranked {'' if k.startswith('half') else 'by '}{k}" in err] == (
        [ranked] if ranked else [])
    assert (f"{reserve} of 64 slots a reserve" in err) == bool(reserve)
    # surprise_from="auto": the model's parts are found, so surprise is credited with what memory added
    assert ("ranked by surprise plus the logit memory added" in err) == (ranked == "surprise")


def test_an_ask_session_runs_the_question_once_and_needs_it_before_reading(tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from camelot.ask import AskSession
    from camelot.cli import UserError

    folder = tiny_model_folder(tmp_path / "m")
    cm = _wrapped(AutoModelForCausalLM.from_pretrained(folder), window=32, slots=64)
    session = AskSession(cm, AutoTokenizer.from_pretrained(folder), generation={"max_new_tokens": 2})
    with pytest.raises(UserError, match="give it before reading"):
        session.read("The sky is blue. " * 20, progress=False)
    assert cm.open_len == 0
    calls = []
    f = cm.set_question
    cm.set_question = lambda ids: (calls.append(ids), f(ids))[1]
    session.read("The sky is blue. " * 20, progress=False, question="What colour is the sky?")
    session.ask("What colour is the sky?")
    assert len(calls) == 1
    session.ask("And the grass?")  # a later question ranks what is read from then on
    assert len(calls) == 2
