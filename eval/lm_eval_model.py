"""camelot as an EleutherAI lm-evaluation-harness model (`pip install camelot-memory[lm-eval]`).

    camelot-lm-eval --model camelot --model_args pretrained=smollm2,window=128,slots=2048 \\
        --tasks wikitext --limit 10
    python -m camelot.eval.lm_eval_model ...          # the same
    import camelot.eval.lm_eval_model; lm_eval.simple_evaluate(model="camelot", ...)

lm-evaluation-harness has no plugin entry point for models, so the class is registered (as
`camelot`) when this module is imported; `camelot-lm-eval` is lm_eval's own command line with
that import done first. `model_args`: `pretrained` (a bundled short name or a local folder),
`device`, `dtype`, `threads`, `max_gen_toks`, and any CamelotConfig field (window, slots,
strategy, read_top_k, threshold, ...).

Each request starts from an empty memory (reset), reads its text segment by segment exactly as
`CamelotModel.score` / `feed` do, so what does not fit the window is consolidated into memory:
- loglikelihood_rolling: the whole document streamed through memory (long-document perplexity);
- loglikelihood: the context streamed through memory, the continuation scored after it;
- generate_until: the context fed, then `CamelotModel.generate` with the task's stop sequences.
`--apply_chat_template` uses the tokenizer's chat template. Requests run one at a time: rows of a
batch must have the same length (camelot reads without padding), which independent requests rarely
have; consecutive requests with one context (multiple choice) read it once.
"""

from __future__ import annotations

import sys
from dataclasses import fields
from typing import Any

import lm_eval.models  # noqa: F401  (fills the registry's built-in names before ours is added)
import torch
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from tqdm import tqdm

from camelot.generation import StopOnStrings, cut_at_stop

_OWN_ARGS = ("pretrained", "device", "dtype", "threads", "max_gen_toks", "batch_size", "max_batch_size")
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def make_config(args: dict[str, Any]) -> Any:
    """The CamelotConfig of the model_args that are not this class's own; a wrong name is refused
    with the list of fields."""
    from camelot.config import CamelotConfig

    try:
        return CamelotConfig(**args)
    except TypeError as e:
        names = ", ".join(f.name for f in fields(CamelotConfig))
        raise ValueError(f"camelot model_args: {e}; give {', '.join(_OWN_ARGS[:5])} or CamelotConfig fields "
                         f"({names})") from None


@register_model("camelot")
class CamelotLM(TemplateLM):
    """A frozen HF causal LM wrapped by camelot, answering lm-evaluation-harness requests."""

    def __init__(self, pretrained: Any = "smollm2", tokenizer: Any = None, device: str | None = None,
                 dtype: str = "float32", threads: int | None = None, max_gen_toks: int = 256,
                 batch_size: Any = 1, max_batch_size: Any = None, **config: Any) -> None:
        super().__init__()
        import camelot

        cfg = make_config(config)
        if threads:
            torch.set_num_threads(int(threads))
        if device and str(device).startswith("cuda") and not torch.cuda.is_available():
            # lm_eval's command line asks for cuda by default; like its own HF model, run on the CPU then
            print(f"camelot: {device} is not available, running on cpu", file=sys.stderr)
            device = "cpu"
        if isinstance(pretrained, str):
            model, tok = camelot.load_model(pretrained, dtype=_DTYPES[dtype], device=device)
        else:  # an already loaded model (with its tokenizer), e.g. from a test
            model, tok = pretrained, tokenizer
        self.tokenizer = tok
        self.cm = camelot.wrap(model, cfg)
        self.max_gen_toks = int(max_gen_toks)

    # ------------------------------------------------------------------ TemplateLM's hooks
    @property
    def eot_token_id(self) -> int:
        return self.tokenizer.eos_token_id

    @property
    def prefix_token_id(self) -> int:
        """What an empty context (and a rolling document) starts from: BOS, else end of text."""
        bos = self.tokenizer.bos_token_id
        return bos if bos is not None else self.eot_token_id

    @property
    def device(self) -> torch.device:
        return self.cm.device

    @property
    def tokenizer_name(self) -> str:
        return getattr(self.tokenizer, "name_or_path", "camelot").replace("/", "__")

    def apply_chat_template(self, chat_history: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
        """The tokenizer's chat template, for the harness's --apply_chat_template."""
        return self.tokenizer.apply_chat_template(chat_history, tokenize=False,
                                                  add_generation_prompt=add_generation_prompt)

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs: Any) -> list[int]:
        return list(self.tokenizer(string, add_special_tokens=bool(add_special_tokens))["input_ids"])

    # ------------------------------------------------------------------ requests
    @torch.no_grad()
    def continuation_logprobs(self, context: list[int], continuations: list[list[int]]) -> list[tuple[float, bool]]:
        """(log-prob of each continuation after `context`, whether it is the greedy continuation),
        from an empty memory. The context is read once, segment by segment through memory; each
        continuation is then scored from a checkpoint of that state (multiple-choice tasks ask
        for several continuations of one context in a row)."""
        dev = self.cm.device
        self.cm.reset()
        ctx = torch.tensor([context], dtype=torch.long, device=dev)
        last = None
        for a, e in self.cm.segments(len(context)):
            last = self.cm.step(ctx[:, a:e])[0, -1]
        first = torch.log_softmax(last.float(), dim=-1)  # predicts each continuation's first token
        cp = self.cm.memory.checkpoint() if len(continuations) > 1 else None
        out = []
        for i, cont in enumerate(continuations):
            if not cont:
                out.append((0.0, True))
                continue
            if i and cp is not None:
                self.cm.memory.restore(cp)
            tgt = torch.tensor(cont, dtype=torch.long, device=dev)
            total, greedy = first[tgt[0]], bool(first.argmax() == tgt[0])
            if len(cont) > 1:  # the continuation's own tokens predict its next ones
                rows = [self.cm.step(tgt[None, a:e])[0] for a, e in self.cm.segments(len(cont) - 1)]
                lp = torch.log_softmax(torch.cat(rows).float(), dim=-1)
                total = total + lp.gather(-1, tgt[1:, None]).sum()
                greedy = greedy and bool((lp.argmax(-1) == tgt[1:]).all())
            out.append((float(total), greedy))
        self.cm.reset()
        return out

    def _loglikelihood_tokens(self, requests: list, disable_tqdm: bool = False, **kwargs: Any) -> list:
        out: list[tuple[float, bool]] = []
        bar = tqdm(total=len(requests), disable=disable_tqdm, desc="camelot loglikelihood")
        i = 0
        while i < len(requests):  # consecutive requests with the same context share its reading
            j = i + 1
            while j < len(requests) and list(requests[j][1]) == list(requests[i][1]):
                j += 1
            res = self.continuation_logprobs(list(requests[i][1]), [list(r[2]) for r in requests[i:j]])
            for (key, _, _), r in zip(requests[i:j], res):
                out.append(r)
                self.cache_hook.add_partial("loglikelihood", key, r)
            bar.update(j - i)
            i = j
        bar.close()
        return out

    def loglikelihood_rolling(self, requests: list, disable_tqdm: bool = False) -> list[float]:
        """Sum of log-probs of every token of each document, read through memory (after BOS)."""
        out = []
        for req in tqdm(requests, disable=disable_tqdm, desc="camelot rolling"):
            (text,) = req.args
            ids = [self.prefix_token_id] + self.tok_encode(text)
            res = -float(self.cm.score(torch.tensor([ids]), progress=False).token_nll.double().sum())
            self.cm.reset()
            out.append(res)
            self.cache_hook.add_partial("loglikelihood_rolling", (text,), res)
        return out

    @torch.no_grad()
    def generate_until(self, requests: list, disable_tqdm: bool = False) -> list[str]:
        out = []
        for req in tqdm(requests, disable=disable_tqdm, desc="camelot generate"):
            context, gen_kwargs = req.args
            kw = dict(gen_kwargs or {})
            until = kw.pop("until", None) or []
            until = [until] if isinstance(until, str) else list(until)
            max_new = int(kw.pop("max_gen_toks", self.max_gen_toks))
            temperature = kw.pop("temperature", None)
            kw["do_sample"] = bool(kw.get("do_sample", False)) and temperature != 0  # harness: 0 means greedy
            if kw["do_sample"] and temperature is not None:
                kw["temperature"] = temperature
            ids = self.tok_encode(context) or [self.prefix_token_id]
            self.cm.reset()
            stops = [StopOnStrings(self.tokenizer, until, prompt_len=len(ids))] if until else []
            new = self.cm.generate(torch.tensor([ids]), max_new_tokens=max_new, stopping_criteria=stops,
                                   eos_token_id=self.eot_token_id, **kw)[0].tolist()
            self.cm.reset()
            text = cut_at_stop(self.tokenizer.decode(new, skip_special_tokens=True), until)
            out.append(text)
            self.cache_hook.add_partial("generate_until", (context, gen_kwargs), text)
        return out


def main(argv: list[str] | None = None) -> None:
    """lm-evaluation-harness's command line, with the `camelot` model registered."""
    from lm_eval.__main__ import cli_evaluate

    if argv is not None:
        sys.argv = [sys.argv[0], *argv]
    cli_evaluate()


if __name__ == "__main__":
    main()
