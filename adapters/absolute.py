"""Learned absolute positions added to the embeddings (gpt2, opt, gpt_bigcode).

Keys already carry their position when attention sees them, and nothing can take it off, so
memory stores keys as they come and reads them without placement. Every segment runs at
positions [0, window), which the wrapper refuses to let exceed `max_position_embeddings`, so the
model never sees a position it was not trained on however long the input.
"""

from __future__ import annotations

from camelot.adapters.base import Adapter
from torch import nn


class AbsoluteAdapter(Adapter):
    model_types = ("gpt2", "opt", "gpt_bigcode")
    positions = "absolute"
    memory = "keys stored as they come (they hold segment positions in [0, window)); no placement"

    def num_kv_heads(self, model: nn.Module) -> int:
        cfg = self.text_config(model)
        if getattr(cfg, "multi_query", False):  # gpt_bigcode (santacoder, starcoder 1)
            return 1
        return super().num_kv_heads(model)
