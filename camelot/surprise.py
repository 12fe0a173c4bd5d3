"""The model's surprise at each token (its NLL), handed to write rules that rank tokens by it
(WriteRule.importance="surprise", EM-LLM's signal): computed once per step from the logits the
forward already made, for every layer at once."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from camelot.layer_state import LayerState


class SurpriseFeed:
    """Carries the last step's next-token log-probs, so the first token of a step is scored too."""

    def __init__(self) -> None:
        self.last_logp: torch.Tensor | None = None  # [B, V]

    def reset(self) -> None:
        self.last_logp = None

    def note(self, states: Sequence[LayerState], ids: torch.Tensor, logits: torch.Tensor) -> None:
        """ids [B, m] just run, logits [B, m, V] their outputs: each state that `tracks_surprise`
        gets the tokens' NLL (the first token after a reset scores 0)."""
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
        for st in wanting:
            st.note_surprise(nll)
