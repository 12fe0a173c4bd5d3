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
        # NLL = logsumexp(row) - row[next id]: no [B, m, V] log-softmax is made (V is 150k for Qwen)
        logits = logits.float()
        lse = torch.logsumexp(logits, dim=-1)  # [B, m]
        nll = torch.zeros(ids.shape, dtype=torch.float32, device=logits.device)
        nll[:, 1:] = lse[:, :-1] - logits[:, :-1].gather(-1, ids[:, 1:, None])[..., 0]
        prev = self.last_logp
        if prev is not None and prev.shape[0] == ids.shape[0]:
            nll[:, 0] = -prev.to(nll.device).gather(-1, ids[:, :1].to(nll.device))[:, 0]
        self.last_logp = logits[:, -1] - lse[:, -1:]
        for st in wanting:
            st.note_surprise(nll)
