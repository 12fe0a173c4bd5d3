"""camelot as an lm-evaluation-harness model: local task YAMLs over local jsonl files (no download)
through `lm_eval.simple_evaluate`, on a tiny random model and on SmolLM2, agreeing with camelot's
own ICL scoring and perplexity path on the same items."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

pytest.importorskip("lm_eval", reason="lm-evaluation-harness is an optional extra: pip install -e '.[lm-eval]'")

from camelot.eval import icl  # noqa: E402
from camelot.eval.icl_tasks import Example, IclTask  # noqa: E402

from tests.conftest import tiny_llama  # noqa: E402
from tests.test_generate_hf import word_tokenizer  # noqa: E402

MC_YAML = """task: {name}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {path}
test_split: test
output_type: multiple_choice
doc_to_text: "{template}"
doc_to_choice: {choices}
doc_to_target: "{{{{ {choices_py}.index(label) }}}}"
metric_list:
  - metric: acc
"""
ROLLING_YAML = """task: {name}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {path}
test_split: test
output_type: loglikelihood_rolling
doc_to_text: ""
doc_to_target: "{{{{text}}}}"
metric_list:
  - metric: word_perplexity
  - metric: bits_per_byte
"""
GEN_YAML = """task: {name}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {path}
test_split: test
output_type: generate_until
doc_to_text: "{{{{text}}}}"
doc_to_target: "{{{{label}}}}"
generation_kwargs:
  until: ["w50"]
  max_gen_toks: 6
  do_sample: false
metric_list:
  - metric: exact_match
"""


def _jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _evaluate(lm, folder: Path, tasks: list[str]) -> dict:
    import lm_eval
    from lm_eval.tasks import TaskManager

    return lm_eval.simple_evaluate(model=lm, tasks=tasks, task_manager=TaskManager(include_path=str(folder)),
                                   bootstrap_iters=0, log_samples=True)


def _lm(model, tok, **config):
    from camelot.eval.lm_eval_model import CamelotLM

    return CamelotLM(pretrained=model, tokenizer=tok, **config)


def _icl_logprobs(cm, tok, task: IclTask, examples: list[Example]) -> torch.Tensor:
    """camelot icl's zero-shot label log-probs ("sum" of every label token) on these examples."""
    data = icl.tokenize_task(task, tok, [], examples, list(range(len(examples))))
    return icl.evaluate_prompt(cm, [], data.prefix_ids, data, "sum").logprobs


def test_local_tasks_on_a_tiny_model(tmp_path: Path):
    tok = word_tokenizer()
    g = torch.Generator().manual_seed(0)
    words = lambda n: " ".join(f"w{int(i)}" for i in torch.randint(3, 100, (n,), generator=g))  # noqa: E731
    rows = [{"text": words(12), "label": ["w10", "w11 w12", "w13"][i % 3]} for i in range(9)]
    _jsonl(tmp_path / "mc.jsonl", rows)
    _jsonl(tmp_path / "doc.jsonl", [{"text": words(70)}, {"text": words(45)}])
    _jsonl(tmp_path / "gen.jsonl", [{"text": words(40), "label": "w1"} for _ in range(2)])
    names = ["w10", "w11 w12", "w13"]
    (tmp_path / "mc.yaml").write_text(MC_YAML.format(name="toy_mc", path=tmp_path / "mc.jsonl", template="{{text}}",
                                                     choices=json.dumps(names), choices_py=repr(names)))
    (tmp_path / "roll.yaml").write_text(ROLLING_YAML.format(name="toy_roll", path=tmp_path / "doc.jsonl"))
    (tmp_path / "gen.yaml").write_text(GEN_YAML.format(name="toy_gen", path=tmp_path / "gen.jsonl"))
    model = tiny_llama(seed=4)
    lm = _lm(model, tok, window=16, slots=8, read_top_k=2, recent=0, sink=0)
    res = _evaluate(lm, tmp_path, ["toy_mc", "toy_roll", "toy_gen"])
    assert set(res["results"]) == {"toy_mc", "toy_roll", "toy_gen"}

    # multiple choice (contexts fit the window): the same log-probs and accuracy as camelot icl
    task = IclTask(name="toy", label_words={"a": "w10", "b": "w11 w12", "c": "w13"}, input_template="{text}")
    by_word = {w: k for k, w in task.label_words.items()}
    ref = _icl_logprobs(lm.cm, tok, task, [Example(r["text"], by_word[r["label"]]) for r in rows])
    samples = sorted(res["samples"]["toy_mc"], key=lambda s: s["doc_id"])
    got = torch.tensor([[r[0][0] for r in s["resps"]] for s in samples])
    assert torch.allclose(got, ref, atol=1e-4)
    acc = float((ref.argmax(-1) == torch.tensor([i % 3 for i in range(9)])).float().mean())
    assert res["results"]["toy_mc"]["acc,none"] == pytest.approx(acc)

    # rolling: the document read through memory (70 tokens, window 16), as CamelotModel.score reads it
    for s in res["samples"]["toy_roll"]:
        ids = [tok.bos_token_id] + tok(s["doc"]["text"], add_special_tokens=False)["input_ids"]
        assert s["resps"][0][0] == pytest.approx(-float(lm.cm.score(ids).token_nll.double().sum()), rel=1e-6)
    # generation: feed, then greedy decoding cut at the task's stop string, memory reset in between
    for s in res["samples"]["toy_gen"]:
        ids = tok(s["doc"]["text"], add_special_tokens=False)["input_ids"]
        lm.cm.reset()
        new = lm.cm.generate(torch.tensor([ids]), max_new_tokens=6, eos_token_id=tok.eos_token_id)[0]
        text = tok.decode(new, skip_special_tokens=True).split("w50")[0]
        assert s["resps"][0][0] == text


def test_a_long_context_is_read_through_memory(llama):
    """loglikelihood of a continuation after a context 4 windows long equals the score path (which
    reads memory), and differs from a window-only model (the memory mattered)."""
    tok = word_tokenizer()
    ctx = torch.randint(3, 100, (70,), generator=torch.Generator().manual_seed(1)).tolist()
    cont = [7, 8, 9]
    lm = _lm(llama, tok, window=16, slots=8, read_top_k=2, recent=0, sink=0)
    (lp, _), (lp2, _) = lm.continuation_logprobs(ctx, [cont, [11, 12]])  # the second from a checkpoint
    nll = lm.cm.score(ctx + cont).token_nll[0, -3:]
    assert lp == pytest.approx(-float(nll.double().sum()), rel=1e-5)
    assert lp2 == pytest.approx(-float(lm.cm.score(ctx + [11, 12]).token_nll[0, -2:].double().sum()), rel=1e-5)
    assert lm.continuation_logprobs(ctx, [[11, 12]])[0][0] == pytest.approx(lp2, rel=1e-6)
    lm.cm.unwrap()
    window_only = _lm(llama, tok, window=16, strategy="window")
    assert abs(window_only.continuation_logprobs(ctx, [cont])[0][0] - lp) > 1e-3
    assert window_only.apply_chat_template([{"role": "user", "content": "w5"}]) == "<s> w5 </s> <s>"


def test_bad_model_args_are_named():
    from camelot.eval.lm_eval_model import CamelotLM

    with pytest.raises(ValueError, match="frobnicate"):
        CamelotLM.create_from_arg_string("pretrained=smollm2,frobnicate=3")


@pytest.mark.slow
def test_smollm2_agrees_with_camelot_icl_and_ppl(smollm2, tmp_path: Path, long_text: str):
    """SmolLM2, 8 SST-2 items zero-shot: the same per-choice log-probs as `camelot icl` (atol 1e-3)
    and the same accuracy; a ~600-token document through memory (window 128): token perplexity
    within 1% of the `camelot ppl` path (which does not predict the first token and so starts its
    segments one token later)."""
    from camelot.eval.icl_tasks import BUILTIN_TASKS, default_data_dir

    from camelot.documents import Document, tokenize_documents

    model, tok = smollm2
    data_dir = default_data_dir()
    if data_dir is None:
        pytest.skip("the shared ICL data folder is not on this machine")
    rows = [json.loads(x) for x in (data_dir / "sst2" / "test.jsonl").read_text().splitlines()[:8]]
    _jsonl(tmp_path / "sst2.jsonl", rows)
    text = long_text[:2600]
    _jsonl(tmp_path / "doc.jsonl", [{"text": text}])
    (tmp_path / "mc.yaml").write_text(MC_YAML.format(name="sst2_local", path=tmp_path / "sst2.jsonl",
                                                     template="Review: {{text}}\\nSentiment:",
                                                     choices=json.dumps(["positive", "negative"]),
                                                     choices_py=repr(["positive", "negative"])))
    (tmp_path / "roll.yaml").write_text(ROLLING_YAML.format(name="doc_local", path=tmp_path / "doc.jsonl"))
    lm = _lm(model, tok, window=128, slots=256)
    try:
        res = _evaluate(lm, tmp_path, ["sst2_local", "doc_local"])
        ref = _icl_logprobs(lm.cm, tok, BUILTIN_TASKS["sst2"], [Example(r["text"], r["label"]) for r in rows])
        samples = sorted(res["samples"]["sst2_local"], key=lambda s: s["doc_id"])
        got = torch.tensor([[r[0][0] for r in s["resps"]] for s in samples])
        assert torch.allclose(got, ref, atol=1e-3)
        gold = torch.tensor([["positive", "negative"].index(r["label"]) for r in rows])
        assert res["results"]["sst2_local"]["acc,none"] == pytest.approx(float((ref.argmax(-1) == gold).float().mean()))

        (doc,) = tokenize_documents([Document("doc", text)], tok)
        ppl = lm.cm.score(doc.ids).perplexity
        (sample,) = res["samples"]["doc_local"]
        n = len(tok(text, add_special_tokens=False)["input_ids"])
        assert n > 4 * 128
        rolling_ppl = float(torch.exp(torch.tensor(-sample["resps"][0][0] / n)))
        assert rolling_ppl == pytest.approx(ppl, rel=0.01)
    finally:
        lm.cm.unwrap()


def test_the_registered_name_with_model_args(tmp_path: Path):
    """`model="camelot"` + a model_args string, as lm_eval's command line builds it (device cuda
    falls back to cpu without CUDA, as the harness's own HF model does)."""
    import camelot.eval.lm_eval_model  # noqa: F401  (registers "camelot")
    import lm_eval
    from lm_eval.tasks import TaskManager

    folder = tmp_path / "tiny"
    tiny_llama(seed=5).save_pretrained(folder)
    word_tokenizer().save_pretrained(folder)
    _jsonl(tmp_path / "mc.jsonl", [{"text": "w5 w6 w7", "label": "w10"}, {"text": "w8 w9", "label": "w13"}])
    names = ["w10", "w13"]
    (tmp_path / "mc.yaml").write_text(MC_YAML.format(name="toy_named", path=tmp_path / "mc.jsonl", template="{{text}}",
                                                     choices=json.dumps(names), choices_py=repr(names)))
    res = lm_eval.simple_evaluate(model="camelot", model_args=f"pretrained={folder},window=16,slots=8,threads=1",
                                  tasks=["toy_named"], task_manager=TaskManager(include_path=str(tmp_path)),
                                  device="cuda", bootstrap_iters=0)
    assert 0.0 <= res["results"]["toy_named"]["acc,none"] <= 1.0
