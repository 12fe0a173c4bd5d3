"""Token generation for CamelotModel with transformers' own decoding machinery.

`generate` takes what `transformers`' `model.generate` takes for a decoder-only model: a
`GenerationConfig` and/or plain keyword arguments, `logits_processor`, `stopping_criteria`,
`streamer`, `tokenizer` (for `stop_strings`), the `input_ids` / `attention_mask` of a tokenizer
call or of `apply_chat_template(..., return_dict=True)`. The configuration is merged with the
model's `generation_config` exactly as transformers does, and the next-token choice runs the
`LogitsProcessorList` and `StoppingCriteriaList` that transformers itself builds from it
(repetition penalty, temperature, top-k / top-p / min-p, min_new_tokens, bad words, eos, stop
strings, max_time...). Only the loop is camelot's: there is no HF KV cache, the wrapper's open
segment is the cache, and every chosen token is stepped through the model exactly like a fed
token. So once the open segment fills, generated tokens are consolidated into memory by the same
write as fed ones, and after `generate(prompt)` returned `new` the state equals that of
`feed(prompt + new)`.

What cannot work with one memory state per row is refused before any forward: beam search
(several hypotheses per row), several return sequences, assisted / contrastive / DoLa decoding,
classifier-free guidance (an extra unconditional pass) and left-padded batches.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch

from camelot.guards import check_pad_token

if TYPE_CHECKING:
    from camelot.interfaces import Wrapper

DEFAULT_MAX_NEW_TOKENS = 32  # camelot's default when neither max_new_tokens nor max_length is given
_REFUSED = {
    "assistant_model": "assisted generation rolls back rejected draft tokens, but generated tokens are "
                       "written into camelot's memory as they are stepped",
    "prompt_lookup_num_tokens": "prompt-lookup decoding rolls back rejected draft tokens",
    "past_key_values": "camelot keeps its own state (the open segment and memory), not an HF cache",
    "inputs_embeds": "camelot steps token ids through the model; give input_ids",
}
def check_settings(max_new_tokens: int | None, do_sample: bool, temperature: float | None, top_p: float | None,
                   top_k: int | None, repetition_penalty: float | None) -> None:
    """Refuse settings transformers would refuse late or silently misread, before any forward."""
    if max_new_tokens is not None and (isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int)
                                       or max_new_tokens < 0):
        raise ValueError(f"max_new_tokens must be an integer >= 0, got {max_new_tokens!r}")
    if do_sample and temperature is not None and not temperature > 0:
        raise ValueError(f"temperature must be > 0 when sampling, got {temperature}")
    if top_p is not None and not 0 < top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")
    if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 0):
        raise ValueError(f"top_k must be an integer >= 0 (0 = off), got {top_k!r}")
    if repetition_penalty is not None and not repetition_penalty > 0:
        raise ValueError(f"repetition_penalty must be > 0 (1.0 = off), got {repetition_penalty}")


class StopOnStrings:
    """Stopping criterion for tokenizers without a vocabulary table (transformers'
    StopStringCriteria needs one): a row is done once its generated text contains a stop string.

    Decodes only the generated part (the prompt may itself contain the stop string), and only
    the last `lookback` tokens of it, so the cost per step stays small however long the answer."""

    def __init__(self, tokenizer, strings: Sequence[str], prompt_len: int = 0, lookback: int = 32) -> None:
        if isinstance(strings, str):
            strings = [strings]
        self.tokenizer = tokenizer
        self.strings = [s for s in strings if s]
        self.prompt_len = prompt_len
        self.lookback = lookback

    def __call__(self, ids: torch.Tensor, scores: torch.Tensor | None = None, **kwargs) -> torch.Tensor:
        gen = ids[:, self.prompt_len:][:, -self.lookback:]
        texts = self.tokenizer.batch_decode(gen.tolist(), skip_special_tokens=False)
        return torch.tensor([any(s in t for s in self.strings) for t in texts], dtype=torch.bool, device=ids.device)


def cut_at_stop(text: str, strings: Sequence[str]) -> str:
    """The text before the first stop string (the answer a user should see)."""
    cut = len(text)
    for s in strings:
        i = text.find(s) if s else -1
        if i >= 0:
            cut = min(cut, i)
    return text[:cut]


def _input_ids(cm: Wrapper, args: tuple, kwargs: dict[str, Any]) -> torch.Tensor:
    """The prompt from `generate(ids)`, `generate(input_ids=...)`, `generate(inputs=...)` or the
    old `generate(ids=...)`; a padded attention mask is refused (camelot reads rows unpadded)."""
    given = [kwargs.pop(k) for k in ("input_ids", "inputs", "ids") if k in kwargs]
    given = list(args[:1]) + given
    if len(given) != 1:
        raise TypeError("generate needs exactly one prompt: input_ids (positional, input_ids=, inputs= or ids=)")
    mask = kwargs.pop("attention_mask", None)
    if mask is not None and not bool(torch.as_tensor(mask).bool().all()):
        raise ValueError("the attention_mask pads some rows: camelot reads each row without padding (its memory "
                         "holds one unpadded stream per row); generate padded rows one at a time")
    return cm._as_batch(given[0])


def prepare(cm: Wrapper, prompt_len: int, generation_config: Any, kwargs: dict[str, Any],
            device: torch.device) -> tuple[Any, Any, Any, int]:
    """(generation config, logits processors, stopping criteria, max new tokens), built by
    transformers from the user's config and keyword arguments merged with the model's
    generation_config; raises on anything camelot cannot honour, before any forward."""
    from transformers import GenerationConfig
    from transformers.generation.configuration_utils import GenerationMode
    from transformers.generation.stopping_criteria import StoppingCriteriaList

    model = cm.model
    for key, why in _REFUSED.items():
        if kwargs.get(key) is not None:
            raise ValueError(f"generate: {key} is not supported with camelot memory: {why}")
    processors_in = kwargs.pop("logits_processor", None)
    criteria_in = kwargs.pop("stopping_criteria", None)
    tokenizer = kwargs.pop("tokenizer", None)
    prefix_fn = kwargs.pop("prefix_allowed_tokens_fn", None)
    for key in ("synced_gpus", "use_model_defaults", "custom_generate", "negative_prompt_ids",
                "negative_prompt_attention_mask"):
        if kwargs.pop(key, None) is not None:
            raise ValueError(f"generate: {key} is not supported with camelot memory")
    if generation_config is not None and not isinstance(generation_config, GenerationConfig):
        raise TypeError(f"generation_config must be a transformers.GenerationConfig, got "
                        f"{type(generation_config).__name__}")
    # camelot's default length applies only where the user set none (the model's 20-token
    # max_length counts the prompt, which here may be a short delta after a long memory)
    given = [kwargs.get("max_new_tokens"), kwargs.get("max_length")]
    if generation_config is not None:
        given += [generation_config.max_new_tokens, generation_config.max_length]
    user_max = next((v for v in given if v is not None), None)
    check_settings(kwargs.get("max_new_tokens"), False, None, None, None, None)
    if isinstance(kwargs.get("eos_token_id"), (list, tuple)) and not kwargs["eos_token_id"]:
        kwargs["eos_token_id"] = None  # camelot's old spelling of "no eos"; transformers fails on []
    nothing = kwargs.get("max_new_tokens") == 0  # camelot allows it (a no-op); transformers refuses 0
    if nothing:
        kwargs["max_new_tokens"] = 1
    gc, model_kwargs = model._prepare_generation_config(generation_config, **kwargs)
    model_kwargs.pop("use_cache", None)
    if model_kwargs:
        raise TypeError(f"generate got unexpected keyword argument(s) {sorted(model_kwargs)}")
    mode = gc.get_generation_mode()
    if gc.num_beams > 1 or mode not in (GenerationMode.GREEDY_SEARCH, GenerationMode.SAMPLE):
        raise ValueError(f"generate: {mode.value} (num_beams={gc.num_beams}) is not supported with camelot memory: "
                         "every generated token is written into the row's one memory state, so decoding can follow "
                         "one hypothesis per row only; use greedy decoding or sampling (num_beams=1)")
    if (gc.num_return_sequences or 1) > 1:
        raise ValueError("generate: num_return_sequences > 1 would need one memory state per returned sequence; "
                         "repeat the prompt in the batch after feeding the document into each row instead")
    if gc.guidance_scale is not None and gc.guidance_scale != 1:
        raise ValueError("generate: classifier-free guidance runs an unconditional second pass, which would be "
                         "written into camelot's memory; it is not supported")
    if user_max is None:
        gc.max_new_tokens = DEFAULT_MAX_NEW_TOKENS
    check_settings(gc.max_new_tokens, bool(gc.do_sample), gc.temperature, gc.top_p, gc.top_k, gc.repetition_penalty)
    max_new = gc.max_new_tokens if gc.max_new_tokens is not None else max(0, gc.max_length - prompt_len)
    max_new = 0 if nothing else max_new
    gc.max_length = prompt_len + max_new  # what transformers' MaxLengthCriteria counts: prompt + new
    if gc.min_new_tokens is not None:
        gc.min_length = prompt_len + gc.min_new_tokens
    model._prepare_special_tokens(gc, kwargs_has_attention_mask=True, device=device)
    check_pad_token(gc, model.get_input_embeddings().num_embeddings)  # before the prompt is read
    processors = model._get_logits_processor(
        gc, input_ids_seq_length=prompt_len, prefix_allowed_tokens_fn=prefix_fn,
        logits_processor=processors_in if processors_in is not None else [], device=device)
    criteria_in = StoppingCriteriaList(criteria_in or [])
    if gc.stop_strings is not None and tokenizer is not None and not hasattr(tokenizer, "get_vocab"):
        # transformers' StopStringCriteria reads the vocabulary; a decode-only tokenizer gets ours
        criteria_in.append(StopOnStrings(tokenizer, [gc.stop_strings] if isinstance(gc.stop_strings, str)
                                         else gc.stop_strings, prompt_len=prompt_len))
        gc.stop_strings = None
    criteria = model._get_stopping_criteria(gc, stopping_criteria=criteria_in, tokenizer=tokenizer)
    return gc, processors, criteria, max_new


@torch.no_grad()
def generate(cm: Wrapper, *args: Any, generation_config: Any = None, streamer: Any = None,
             seed: int | None = None, **kwargs: Any) -> Any:
    """The decoding behind `CamelotModel.generate`. Returns the new tokens [B, <= max_new_tokens]
    (the prompt is not repeated: the memory may hold far more than it), or, with
    `return_dict_in_generate=True`, transformers' GenerateDecoderOnlyOutput whose `sequences`
    are prompt + new tokens as with `model.generate`, plus `scores` / `logits` when asked.

    Finished rows (eos or a stopping rule) keep receiving the pad token (default: the first eos,
    else the row's last token) until every row is done, as transformers does; every returned
    token, including the last, has been stepped into the model's state. `seed` (camelot's own)
    draws samples from a private generator; without it sampling uses torch's global one, as
    `model.generate` does."""
    if len(args) > 1:
        raise TypeError("generate takes the prompt positionally; give the other settings by keyword")
    ids = _input_ids(cm, args, kwargs)
    gc, processors, criteria, max_new = prepare(cm, ids.shape[1], generation_config, kwargs, ids.device)
    gen = None
    if seed is not None and gc.do_sample:
        gen = torch.Generator(device=ids.device)
        gen.manual_seed(seed)
    want_scores = gc.return_dict_in_generate and gc.output_scores
    want_logits = gc.return_dict_in_generate and gc.output_logits
    scores_out: list[torch.Tensor] = []
    logits_out: list[torch.Tensor] = []

    logits = None
    for a, e in cm.segments(ids.shape[1]):
        logits = cm.step(ids[:, a:e])
    b = ids.shape[0]
    history = ids  # prompt + generated: what the processors and stopping rules see, as in transformers
    if streamer is not None:
        streamer.put(ids.cpu())
    pad = gc._pad_token_tensor
    unfinished = torch.ones(b, dtype=torch.bool, device=ids.device)
    for _ in range(max_new):
        raw = logits[:, -1].to(dtype=torch.float32, copy=True)
        scores = processors(history, raw)
        if gc.do_sample:
            nxt = torch.multinomial(scores.softmax(-1), 1, generator=gen)[:, 0]
        else:
            nxt = scores.argmax(-1)
        if history.shape[1] > ids.shape[1]:  # rows already done get the pad (or repeat their last token)
            filler = history[:, -1] if pad is None else pad.to(nxt.device).expand_as(nxt)
            nxt = torch.where(unfinished, nxt, filler)
        history = torch.cat([history, nxt[:, None]], dim=1)
        if want_scores:
            scores_out.append(scores)
        if want_logits:
            logits_out.append(raw)
        if streamer is not None:
            streamer.put(nxt.cpu())
        unfinished &= ~torch.as_tensor(criteria(history, scores), dtype=torch.bool, device=ids.device).expand(b)
        logits = cm.step(nxt[:, None])  # the token joins the state like a fed one
        if not bool(unfinished.any()):
            break
    if streamer is not None:
        streamer.end()
    if gc.return_dict_in_generate:
        from transformers.generation.utils import GenerateDecoderOnlyOutput

        return GenerateDecoderOnlyOutput(sequences=history, scores=tuple(scores_out) if want_scores else None,
                                         logits=tuple(logits_out) if want_logits else None)
    return history[:, ids.shape[1]:]
