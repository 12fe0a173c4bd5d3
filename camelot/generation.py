"""Token generation for CamelotModel: the decoding loop, next-token choice (greedy, temperature,
top-k, top-p, repetition penalty) and stopping rules.

The loop never keeps an HF KV cache: the wrapper's open segment is the cache, and every token
chosen is stepped through the model exactly like a fed token. So once the open segment fills,
generated tokens are consolidated into memory by the same write as fed ones, and after
`generate(prompt)` returned `new`, the state equals that of `feed(prompt + new)`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from camelot.wrapper import CamelotModel

# HF-style stopping criterion: (ids [B, T] = prompt + generated so far, scores [B, V]) -> done [B]
StoppingCriterion = Callable[[torch.Tensor, torch.Tensor], Any]


def check_settings(max_new_tokens: int, do_sample: bool, temperature: float, top_p: float, top_k: int,
                   repetition_penalty: float) -> None:
    """Refuse settings HF would refuse (or silently misread), before any forward runs."""
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be an integer >= 0, got {max_new_tokens!r}")
    if do_sample and not temperature > 0:
        raise ValueError(f"temperature must be > 0 when sampling, got {temperature}")
    if not 0 < top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")
    if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 0:
        raise ValueError(f"top_k must be an integer >= 0 (0 = off), got {top_k!r}")
    if not repetition_penalty > 0:
        raise ValueError(f"repetition_penalty must be > 0 (1.0 = off), got {repetition_penalty}")


def apply_repetition_penalty(logits: torch.Tensor, history: torch.Tensor, penalty: float) -> torch.Tensor:
    """HF's (CTRL) rule: a token already in `history` [B, T] gets its logit divided by `penalty`
    when positive, multiplied when negative. One gather and one scatter, no loop over tokens."""
    if penalty == 1.0 or history.numel() == 0:
        return logits
    seen = logits.gather(-1, history)
    seen = torch.where(seen < 0, seen * penalty, seen / penalty)
    return logits.scatter(-1, history, seen)


def sample_next(logits: torch.Tensor, do_sample: bool, temperature: float, top_p: float, top_k: int,
                generator: torch.Generator) -> torch.Tensor:
    """logits [B, V] (CPU, fp32) -> token ids [B]."""
    if not do_sample:
        return logits.argmax(-1)
    if temperature <= 0:
        raise ValueError("temperature must be > 0 when sampling")
    logits = logits / temperature
    if top_k and top_k > 0:
        kth = logits.topk(min(top_k, logits.shape[-1]), dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        probs = sorted_logits.softmax(-1)
        drop = probs.cumsum(-1) - probs > top_p  # keep the smallest set whose mass reaches top_p
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)
    return torch.multinomial(logits.softmax(-1), 1, generator=generator)[:, 0]


class StopOnStrings:
    """Stopping criterion: a row is done once its generated text contains one of `strings`.

    Decodes only the generated part (the prompt may itself contain the stop string), and only
    the last `lookback` tokens of it, so the cost per step stays small however long the answer."""

    def __init__(self, tokenizer, strings: Sequence[str], prompt_len: int = 0, lookback: int = 32) -> None:
        if isinstance(strings, str):
            strings = [strings]
        self.tokenizer = tokenizer
        self.strings = [s for s in strings if s]
        self.prompt_len = prompt_len
        self.lookback = lookback

    def __call__(self, ids: torch.Tensor, scores: torch.Tensor | None = None) -> torch.Tensor:
        gen = ids[:, self.prompt_len:][:, -self.lookback:]
        texts = self.tokenizer.batch_decode(gen.tolist(), skip_special_tokens=False)
        return torch.tensor([any(s in t for s in self.strings) for t in texts], dtype=torch.bool)


def cut_at_stop(text: str, strings: Sequence[str]) -> str:
    """The text before the first stop string (the answer a user should see)."""
    cut = len(text)
    for s in strings:
        i = text.find(s) if s else -1
        if i >= 0:
            cut = min(cut, i)
    return text[:cut]


@torch.no_grad()
def generate(cm: CamelotModel, ids: torch.Tensor, max_new_tokens: int = 32, do_sample: bool = False,
             temperature: float = 1.0, top_p: float = 1.0, top_k: int = 0, repetition_penalty: float = 1.0,
             eos_token_id: int | Sequence[int] | None = None, pad_token_id: int | None = None,
             stopping_criteria: Sequence[StoppingCriterion] | None = None, stop_strings: Sequence[str] | None = None,
             tokenizer=None, seed: int | None = None, streamer=None) -> torch.Tensor:
    """The decoding loop behind `CamelotModel.generate`; ids are [B, N] on the model's device.

    Finished rows (eos or a stopping rule) keep receiving `pad_token_id` (default: the first eos,
    else the row's last token) until every row is done, as HF does; every returned token,
    including the last, has been stepped into the model's state."""
    check_settings(max_new_tokens, do_sample, temperature, top_p, top_k, repetition_penalty)
    eos = [eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id or [])
    eos_t = torch.tensor(eos, dtype=torch.long)
    criteria = list(stopping_criteria or [])
    if stop_strings:
        if tokenizer is None:
            raise ValueError("stop_strings needs the tokenizer (generate(..., stop_strings=[...], tokenizer=tok))")
        criteria.append(StopOnStrings(tokenizer, stop_strings, prompt_len=ids.shape[1]))
    gen = torch.Generator(device="cpu")
    if seed is not None:
        gen.manual_seed(seed)
    elif do_sample:
        gen.seed()

    logits = None
    for a, e in cm._chunks(ids.shape[1]):
        logits = cm.step(ids[:, a:e])
    b = ids.shape[0]
    history = ids.cpu()  # prompt + generated: what the repetition penalty and stopping rules see
    if streamer is not None:
        streamer.put(history)
    done = torch.zeros(b, dtype=torch.bool)
    out: list[torch.Tensor] = []
    for _ in range(max_new_tokens):
        scores = apply_repetition_penalty(logits[:, -1].float().cpu(), history, repetition_penalty)
        nxt = sample_next(scores, do_sample, temperature, top_p, top_k, gen)
        if out:
            pad = pad_token_id if pad_token_id is not None else (eos[0] if eos else None)
            filler = out[-1] if pad is None else torch.full_like(nxt, pad)
            nxt = torch.where(done, filler, nxt)
        out.append(nxt)
        history = torch.cat([history, nxt[:, None]], dim=1)
        if streamer is not None:
            streamer.put(nxt)
        if eos:
            done |= torch.isin(nxt, eos_t)
        for crit in criteria:
            done |= torch.as_tensor(crit(history, scores), dtype=torch.bool).reshape(-1).expand(b).cpu()
        logits = cm.step(nxt[:, None].to(ids.device))  # the token joins the state like a fed one
        if bool(done.all()):
            break
    if streamer is not None:
        streamer.end()
    return torch.stack(out, dim=1) if out else torch.empty(b, 0, dtype=torch.long)
