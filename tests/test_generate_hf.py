"""CamelotModel.generate with transformers' GenerationConfig, processors, stopping criteria and
streamers: inside the window (camelot is then the identity) it equals `model.generate` on the
unwrapped model token for token; beyond it, greedy decoding equals camelot's step-by-step loop;
what cannot work with one memory state per row is refused before any forward."""

from __future__ import annotations

import pytest
import torch
from transformers import GenerationConfig, TextStreamer

import camelot
from tests.conftest import bare, tiny_llama

VOCAB = 101


def _doc(n, batch=1, seed=0):
    return torch.randint(3, VOCAB, (batch, n), generator=torch.Generator().manual_seed(seed))


def word_tokenizer():
    """An offline word-level tokenizer over the tiny model's 101 ids ("w3".."w100"), with a chat
    template, so stop strings, streamers and apply_chat_template run on real transformers code."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    # "abcdef": the probe transformers' StopStringCriteria tokenizes to clean its vocabulary
    # special tokens get names no word starts with: a special token's text is split out of words
    words = {"<unk>": 0, "<s>": 1, "</s>": 2, **{f"w{i}": i for i in range(3, VOCAB)}, "abcdef": VOCAB}
    tk = Tokenizer(models.WordLevel(words, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    tk.decoder = decoders.WordPiece(prefix="##")  # joins tokens with spaces
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="<unk>", bos_token="<s>", eos_token="</s>")
    tok.chat_template = ("{% for m in messages %}<s> {{ m['content'] }} </s> {% endfor %}"
                         "{% if add_generation_prompt %}<s>{% endif %}")
    return tok


# settings compared with transformers on the unwrapped model (full context inside the window)
HF_CASES = {
    "greedy": dict(do_sample=False),
    "repetition_penalty": dict(do_sample=False, repetition_penalty=1.8),
    "no_repeat_ngram": dict(do_sample=False, no_repeat_ngram_size=2),
    "min_new_tokens": dict(do_sample=False, min_new_tokens=15),
    "bad_words": dict(do_sample=False, bad_words_ids=[[5], [6, 7]]),
    "sample_top_k_temperature": dict(do_sample=True, top_k=8, temperature=0.7),
    "sample_top_p_min_p": dict(do_sample=True, top_p=0.8, min_p=0.05, top_k=0),
}


@pytest.mark.parametrize("case", list(HF_CASES))
def test_generation_config_equals_transformers_on_the_unwrapped_model(case):
    """Document + prompt fit the window: camelot changes nothing, so transformers' own decoding on
    the plain model is the reference, processors (penalty over the whole context) included."""
    model = tiny_llama(seed=2)
    full = torch.cat([_doc(30, batch=2, seed=1), _doc(6, batch=2, seed=2)], dim=1)
    gc = GenerationConfig(max_new_tokens=20, eos_token_id=4, pad_token_id=0, **HF_CASES[case])
    torch.manual_seed(11)
    ref = model.generate(full, generation_config=gc)[:, full.shape[1]:]
    cm = camelot.wrap(model, bare(window=64, slots=16, read_top_k=2))
    torch.manual_seed(11)
    out = cm.generate(full, generation_config=gc)
    assert torch.equal(out, ref)
    if case == "repetition_penalty":  # the penalty does change the answer here
        cm.reset()
        assert not torch.equal(cm.generate(full, generation_config=GenerationConfig(max_new_tokens=20)), out)


def test_greedy_equals_the_step_loop_across_segments(llama):
    """Beyond the window (memory written and read): transformers' greedy path equals the plain
    loop camelot used before (argmax of the last logits, each token stepped in)."""
    cm = camelot.wrap(llama, bare(window=16, slots=8, read_top_k=2, threshold=0.5))
    prompt = _doc(37)
    cm.feed(_doc(90, seed=5), progress=False)
    logits, ref = None, []
    for a, e in cm.segments(prompt.shape[1]):
        logits = cm.step(prompt[:, a:e])
    for _ in range(40):
        nxt = logits[:, -1].float().argmax(-1)
        ref.append(nxt)
        logits = cm.step(nxt[:, None])
    ref = torch.stack(ref, 1)
    cm.reset()
    cm.feed(_doc(90, seed=5), progress=False)
    out = cm.generate(input_ids=prompt, generation_config=GenerationConfig(max_new_tokens=40, do_sample=False),
                      eos_token_id=None)
    assert torch.equal(out, ref)


def test_chat_template_call_reads_memory_and_streams():
    """The usual transformers call: **apply_chat_template(...), a GenerationConfig, a TextStreamer."""
    tok = word_tokenizer()
    model = tiny_llama(seed=3)
    enc = tok.apply_chat_template([{"role": "user", "content": "w9 w10 w11"}], return_dict=True,
                                  return_tensors="pt", add_generation_prompt=True)
    gc = GenerationConfig(max_new_tokens=12, do_sample=False, output_logits=True, return_dict_in_generate=True)
    cm = camelot.wrap(model, bare(window=16, slots=8, read_top_k=2))

    class Captured(TextStreamer):
        text = ""

        def on_finalized_text(self, text, stream_end=False):
            Captured.text += text

    cm.feed(_doc(70, seed=7), progress=False)
    res = cm.generate(**enc, generation_config=gc, streamer=Captured(tok, skip_prompt=True))
    n = enc["input_ids"].shape[1]
    new = res.sequences[:, n:]
    assert torch.equal(res.sequences[:, :n], enc["input_ids"]) and 1 <= new.shape[1] <= 12
    assert Captured.text.split() == tok.decode(new[0]).split()
    cm.reset()  # the same call without the document: the memory was read
    alone = cm.generate(**enc, generation_config=gc)
    assert not torch.allclose(alone.logits[0], res.logits[0])


def test_stop_strings_with_a_real_tokenizer(llama):
    tok = word_tokenizer()
    cm = camelot.wrap(llama, bare(window=64, slots=8, read_top_k=2))
    prompt = _doc(6)
    free = cm.generate(prompt, max_new_tokens=15, eos_token_id=None)
    stop = tok.convert_ids_to_tokens(int(free[0, 6]))
    first = free[0].tolist().index(int(free[0, 6]))
    cm.reset()
    out = cm.generate(prompt, generation_config=GenerationConfig(max_new_tokens=15, stop_strings=[stop]),
                      tokenizer=tok, eos_token_id=None)
    assert torch.equal(out[0], free[0, : first + 1])
    cm.reset()
    with pytest.raises(ValueError, match="tokenizer"):
        cm.generate(prompt, stop_strings=[stop])


def test_eos_from_the_model_config_and_old_keywords(llama):
    """No eos given: the model's generation_config's, as transformers does; old keywords keep working."""
    cm = camelot.wrap(llama, bare(window=64, slots=8, read_top_k=2))
    prompt = _doc(6)
    free = cm.generate(prompt, max_new_tokens=10, eos_token_id=None)
    llama.generation_config.eos_token_id = int(free[0, 3])
    cm.reset()
    assert torch.equal(cm.generate(prompt, max_new_tokens=10)[0], free[0, :4])
    cm.reset()
    assert cm.generate(prompt, max_new_tokens=10, eos_token_id=[], do_sample=False, temperature=0.5,
                       top_p=0.9, top_k=3, repetition_penalty=1.0).shape == (1, 10)
    cm.reset()
    assert cm.generate(ids=prompt, generation_config=GenerationConfig(), eos_token_id=None).shape == (1, 32)


@pytest.mark.parametrize("kwargs, needle", [
    ({"num_beams": 2}, "beam"),
    ({"num_beams": 4, "do_sample": True}, "beam"),
    ({"num_return_sequences": 2, "do_sample": True}, "num_return_sequences"),
    ({"guidance_scale": 1.5}, "guidance"),
    ({"penalty_alpha": 0.6, "top_k": 4}, "contrastive"),
    ({"assistant_model": object()}, "assist"),
    ({"attention_mask": torch.tensor([[0, 1, 1, 1]])}, "pad"),
    ({"frobnicate": 3}, "unexpected"),
])
def test_what_memory_cannot_do_is_refused_before_any_forward(llama, kwargs, needle):
    cm = camelot.wrap(llama, bare(window=32))
    with pytest.raises((ValueError, TypeError), match=needle):
        cm.generate(_doc(4), max_new_tokens=3, **kwargs)
    with pytest.raises(ValueError, match="beam"):
        cm.generate(_doc(4), generation_config=GenerationConfig(num_beams=3))
    assert cm.open_len == 0
