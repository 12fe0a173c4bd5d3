"""How much memory raised the logit of each token the model predicted (surprise_from="logit").

Each layer that read memory hands the difference its memory read made to its attention output
(`LayerRuntime.gain`: the output minus what the plain keys alone would have given). Projected by
the layer's output projection, the differences sum to what memory added to the residual stream;
the final norm of the residual with and without that sum, read against the predicted token's
unembedding row, gives the logit memory added to it. To first order (direct logit attribution:
later layers' reaction to the difference is not followed) that is what the token would have cost
the window alone beyond what it cost the model: a later needle's template, copied from the first
in memory, gains 10.6-18.6 logits where the haystack around it gains -3 to 1.6 (Qwen2.5-0.5B,
Genesis, 4k and 16k; docs/retrieval.md, "The logit memory added").
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager

import torch
from torch import nn

from camelot.adapters.base import UnsupportedModelError

# names of an attention module's output projection, and of the norm before the unembedding, in
# the families camelot wraps (llama / qwen / gemma / mistral: o_proj, norm; gpt2: c_proj, ln_f;
# gpt-neox, falcon, bloom: dense; opt: out_proj, final_layer_norm)
OUTPUT_PROJECTIONS = ("o_proj", "out_proj", "c_proj", "dense", "o")
FINAL_NORMS = ("norm", "ln_f", "final_layer_norm", "final_layernorm", "final_norm")


def _final_norm(model: nn.Module) -> nn.Module:
    # not inside a layer list: OPT names each decoder layer's MLP norm `final_layer_norm` too
    found = [mod for name, mod in model.named_modules()
             if name.rsplit(".", 1)[-1] in FINAL_NORMS and not any(part.isdigit() for part in name.split("."))]
    if not found:
        raise UnsupportedModelError(f"surprise_from='logit' needs the norm before {type(model).__name__}'s "
                                    f"unembedding (one of {FINAL_NORMS}); none found: use surprise_from='window'")
    return found[-1]


def _projection(module: nn.Module) -> nn.Module:
    for name in OUTPUT_PROJECTIONS:
        proj = getattr(module, name, None)
        if isinstance(proj, nn.Module):
            return proj
    raise UnsupportedModelError(f"surprise_from='logit' needs each attention module's output projection "
                                f"(one of {OUTPUT_PROJECTIONS}); {type(module).__name__} has none: use "
                                f"surprise_from='window'")


class LogitGain:
    """The logit memory added to each predicted token, for one wrapped model."""

    def __init__(self, model: nn.Module, modules: Sequence[nn.Module]) -> None:
        self.norm = _final_norm(model)
        self.projections = [_projection(m) for m in modules]
        head = model.get_output_embeddings()
        self.unembedding = head.weight  # [V, d]
        cfg = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
        self.softcap = getattr(cfg, "final_logit_softcapping", None)
        self._residual: torch.Tensor | None = None
        self._offsets: dict[tuple, torch.Tensor] = {}

    @contextmanager
    def capturing(self) -> Iterator[None]:
        """While it lasts, the input of the final norm (the residual stream) is kept."""
        def keep(mod: nn.Module, args: tuple) -> None:
            self._residual = args[0]

        handle = self.norm.register_forward_pre_hook(keep)
        try:
            yield
        finally:
            handle.remove()

    def _normed(self, x: torch.Tensor) -> torch.Tensor:
        # float32: the difference of two normed residuals is small, bf16 would round it away
        if isinstance(self.norm, nn.LayerNorm):
            n = self.norm
            return nn.functional.layer_norm(x, n.normalized_shape, None if n.weight is None else n.weight.float(),
                                            None if n.bias is None else n.bias.float(), n.eps)
        return self.norm(x).float()

    def added(self, runtimes: Sequence) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(with memory, without) final normed residuals [B, m, d] of the last forward (None: no
        layer read memory)."""
        h = self._residual
        self._residual = None
        if h is None:
            return None
        added = None
        for rt, proj in zip(runtimes, self.projections):
            if rt.gain is None:
                continue
            # affine: proj(x) - proj(0) is the linear part, whatever the bias or the layout (Conv1D)
            x = rt.gain.to(h.dtype)
            d = (proj(x).float() - self._offset(proj, x)).to(h.device)  # layers may sit on several devices
            added = d if added is None else added + d
            rt.gain = None
        if added is None:
            return None
        h = h.float()
        return self._normed(h), self._normed(h - added)

    def _offset(self, proj: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """proj(0) as float32: the frozen projection's bias, made once per layer, dtype and device."""
        key = (id(proj), x.dtype, x.device)
        if key not in self._offsets:
            self._offsets[key] = proj(x.new_zeros(1, x.shape[-1])).float()
        return self._offsets[key]

    def logit(self, normed: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """normed [B, n, d], ids [B, n] -> each id's logit [B, n] (softcapped as the model caps)."""
        w = self.unembedding[ids.to(self.unembedding.device)].float()
        out = (normed.to(w.device) * w).sum(-1)
        if self.softcap:
            out = torch.tanh(out / self.softcap) * self.softcap
        return out


def lens_for(model: nn.Module, modules: Sequence[nn.Module], source: str, runtimes: Sequence) -> LogitGain | None:
    """The parts the logit credit reads, where it will run: surprise_from "logit" or "auto" and a
    layer that ranks by surprise (a `sliding` run beside it is never refused for parts it would
    not read). Missing parts refuse "logit" (the wrapper asks before it touches the model, so a
    refused model is left as it was) and turn "auto" into the model's own surprise, with a warning."""
    if source not in ("logit", "auto") or not any(rt.state.tracks_surprise for rt in runtimes):
        return None
    try:
        return LogitGain(model, modules)
    except UnsupportedModelError as e:
        if source == "logit":
            raise
        warnings.warn(f"{e.args[0].split(';')[0]}: the write ranks by the model's own surprise "
                      "(surprise_from='memory'), which keeps the first of several similar facts and may lose the "
                      "later ones", stacklevel=5)  # at the caller of camelot.wrap
        return None


def gain_of(lens: LogitGain, runtimes: Sequence, forward: Callable[[], torch.Tensor], reach: int | None = None
            ) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor] | None]:
    """The forward's logits and its (with, without memory) normed residuals; reach: what the raw
    keys further than this from a query gave counts with memory (CamelotConfig.surprise_reach)."""
    for rt in runtimes:
        rt.wants_gain, rt.gain, rt.gain_reach = True, None, reach
    try:
        with lens.capturing():
            logits = forward()
    finally:
        for rt in runtimes:
            rt.wants_gain, rt.gain_reach = False, None
    return logits, lens.added(runtimes)
