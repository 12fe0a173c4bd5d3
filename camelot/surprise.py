"""The model's surprise at each token (its NLL), handed to write rules that rank tokens by it
(WriteRule.importance="surprise", EM-LLM's signal): computed once per step from the logits the
forward already made, for every layer at once, or (surprise_from="window") from a forward of its own
that reads no memory. That forward's tokens attend to the raw tail and sinks as the real forward
left them, so in layers past the first those keys still carry what earlier tokens read from
memory: it is the window's surprise at the new tokens, not a memoryless model's at the document.
surprise_from="logit" approximates it without a second forward: the forward's own NLL plus the
logit memory added to the token (camelot/logit_gain.py)."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager

import torch

from camelot.layer_state import LayerState
from camelot.logit_gain import LogitGain, gain_of, lens_for

# whose NLL the write ranks by (CamelotConfig.surprise_from). "memory": the wrapped model's own,
# free (the forward's logits). "window": a second forward that attends to the open segment, raw
# tail and sinks only. Why: once the memory holds a fact, a later fact in the same template is
# copied from it (0.0-0.3 nats a token) and ranks below the haystack, so a surprise reserve keeps
# the first of several needles and loses the rest (docs/retrieval.md, "Why the default loses
# later needles"); what the window alone cannot predict is the same for the first and the later.
# "logit": the forward's own NLL plus the logit memory added to the token (camelot/logit_gain.py):
# what the window alone would have lacked, to first order, without a second forward. It keeps
# what "window" keeps on RULER multi-key (docs/retrieval.md, "The logit memory added"); a credit
# for the share of attention memory received (surprise_from="read", 2026-12-07) kept less
# everywhere and was removed. "auto" (the default since 2026-12-07): "logit" where the model's
# parts are found (every family camelot's tests wrap), else "memory" with a warning.
SURPRISE_FROM = ("auto", "memory", "window", "logit")


@contextmanager
def window_only(runtimes: Sequence) -> Iterator[None]:
    """While it lasts, every layer attends to its open segment, raw tail and sinks only, reads no
    memory and keeps nothing of the forward (LayerRuntime.shadow)."""
    for rt in runtimes:
        rt.shadow = True
    try:
        yield
    finally:
        for rt in runtimes:
            rt.shadow = False


class SurpriseFeed:
    """Carries the last step's next-token log-probs, so the first token of a step is scored too;
    `lens`: the model's parts the logit credit reads (surprise_from "logit" or "auto"; built at
    wrap, so a model without them is refused, or under "auto" ranked by its own NLL, before any
    document)."""

    def __init__(self, lens: LogitGain | None = None, source: str = "memory", reach: int | None = None) -> None:
        self.lens = lens
        self.reach = reach  # CamelotConfig.surprise_reach: the logit credit counts the raw context beyond it
        # what run() ranks by: "auto" and "logit" resolve to "logit" where the lens was built
        # (some layer ranks by surprise and the parts were found), to "memory" elsewhere
        self.source = "logit" if lens is not None else "window" if source == "window" else "memory"
        self.last_logp: torch.Tensor | None = None  # [B, V]
        self.last_normed: tuple[torch.Tensor, torch.Tensor] | None = None  # the last query's, with / without memory
        self.ranked = True  # False while scaffolding is fed (CamelotModel.feed(rank=False)): no surprise counted

    @classmethod
    def built(cls, model: torch.nn.Module, modules: Sequence[torch.nn.Module], source: str,
              runtimes: Sequence, reach: int | None = None) -> SurpriseFeed:
        """The feed a wrapper of `model` ranks by (CamelotConfig.surprise_from, surprise_reach):
        lens_for finds the parts the logit credit reads, or refuses the model, before the wrapper
        touches it."""
        return cls(lens_for(model, modules, source, runtimes), source, reach)

    @contextmanager
    def ranking(self, rank: bool) -> Iterator[None]:
        """While it lasts, the tokens run count as surprising (rank) or as none at all."""
        if not isinstance(rank, bool):  # rank="no" would read as True
            raise TypeError(f"rank must be True or False, got {rank!r}")
        before, self.ranked = self.ranked, rank
        try:
            yield
        finally:
            self.ranked = before

    def reset(self) -> None:
        self.last_logp = None
        self.last_normed = None

    def run(self, runtimes: Sequence, ids: torch.Tensor, forward: Callable[[], torch.Tensor]) -> torch.Tensor:
        """The step's forward (`forward()` -> logits [B, m, V]), and each layer that ranks by
        surprise handed the NLL of ids under `self.source`: the forward's own, a window-only
        forward's, run first (it keeps nothing), or the forward's own plus the logit memory added
        to each token."""
        source, states = self.source, [rt.state for rt in runtimes]
        tracking = any(st.tracks_surprise for st in states)
        own = None
        if source == "logit" and tracking:
            logits, normed = gain_of(self.lens, runtimes, forward, self.reach)
            self.note(states, ids, logits, gain=self._gain(self.lens, ids, normed))
            return logits
        if source == "window" and tracking:
            with window_only(runtimes):
                own = forward()
        logits = forward()
        self.note(states, ids, logits if own is None else own)
        return logits

    def _gain(self, lens: LogitGain, ids: torch.Tensor, normed: tuple[torch.Tensor, torch.Tensor] | None
              ) -> torch.Tensor:
        """[B, m]: the logit memory added to each token, the first from the last step's last query."""
        gain = torch.zeros(ids.shape, dtype=torch.float32, device=ids.device)
        last, self.last_normed = self.last_normed, None
        if normed is not None:
            full, win = normed
            gain[:, 1:] = (lens.logit(full[:, :-1], ids[:, 1:]) - lens.logit(win[:, :-1], ids[:, 1:])).to(gain.device)
            self.last_normed = full[:, -1:], win[:, -1:]
        if last is not None and last[0].shape[0] == ids.shape[0]:
            gain[:, :1] = (lens.logit(last[0], ids[:, :1]) - lens.logit(last[1], ids[:, :1])).to(gain.device)
        return gain.clamp_min(0)  # what memory took away is no fact to keep

    def note(self, states: Sequence[LayerState], ids: torch.Tensor, logits: torch.Tensor,
             gain: torch.Tensor | None = None) -> None:
        """ids [B, m] just run, logits [B, m, V] their outputs: each state that `tracks_surprise`
        gets the tokens' NLL (the first token after a reset scores 0), plus `gain` [B, m] where
        given (the logit memory added to each token)."""
        wanting = [st for st in states if st.tracks_surprise]
        if not wanting:
            return
        # cross_entropy's fused kernel, not logsumexp then a gather: 2.5x faster on CPU (8.7 vs 21.5
        # ms for 128 x 49152 logits), the same NLL to 2e-6; only the last row's log-probs are kept
        logits = logits.float()
        b, m, v = logits.shape
        nll = torch.zeros(ids.shape, dtype=torch.float32, device=logits.device)
        if m > 1:
            nll[:, 1:] = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, v),
                                                           ids[:, 1:].reshape(-1).to(logits.device),
                                                           reduction="none").view(b, m - 1)
        prev = self.last_logp
        if prev is not None and prev.shape[0] == ids.shape[0]:
            nll[:, 0] = -prev.to(nll.device).gather(-1, ids[:, :1].to(nll.device))[:, 0]
        self.last_logp = torch.log_softmax(logits[:, -1], dim=-1)
        if gain is not None:
            nll += gain.to(nll.device)
        if not self.ranked:  # a chat template's opening is surprising only for lack of context: not a fact
            nll.zero_()
        for st in wanting:
            st.note_surprise(nll)
