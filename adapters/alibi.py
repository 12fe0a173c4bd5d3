"""ALiBi (falcon-rw, bloom): the position rule these families add to attention logits, exactly
as their HF code computes it. The core adds it through `camelot.interfaces.PositionBias`."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Alibi:
    """logit += scale * bf16(slope_bf16 * key_position), HF's falcon/bloom rule.

    slopes: [Hq] per query head, already rounded to bfloat16 as `build_alibi_tensor` does.
    scale: factor the model applies to the bias (falcon: 1/sqrt(head_dim); bloom: 1).
    round_bf16: HF materialises the bias in bfloat16; matching that keeps identity exact.
    A per-row constant does not change a softmax, so `slope * key_position` is HF's relative bias.
    """

    slopes: torch.Tensor
    scale: float = 1.0
    round_bf16: bool = True

    def bias(self, positions: torch.Tensor, hkv: int, g: int) -> torch.Tensor:
        """positions broadcastable against [Hkv, G, 1, 1] (e.g. [N], or [B, Hkv, 1, 1, S]) -> bias."""
        slopes = self.slopes.to(device=positions.device, dtype=torch.float32).view(hkv, g, 1, 1)
        b = slopes * positions.float()
        if self.round_bf16:
            b = b.to(torch.bfloat16).float()
        return b * self.scale if self.scale != 1.0 else b


def alibi_slopes(num_heads: int) -> torch.Tensor:
    """Per-head ALiBi slopes exactly as HF's `build_alibi_tensor` makes them (rounded to bf16)."""
    closest = 2 ** math.floor(math.log2(num_heads))
    base = torch.tensor(2 ** (-(2 ** -(math.log2(closest) - 3))), dtype=torch.float32)
    slopes = torch.pow(base, torch.arange(1, 1 + closest, dtype=torch.int32))
    if closest != num_heads:
        extra = torch.tensor(2 ** (-(2 ** -(math.log2(2 * closest) - 3))), dtype=torch.float32)
        n_rest = min(closest, num_heads - closest)
        slopes = torch.cat([slopes, torch.pow(extra, torch.arange(1, 1 + 2 * n_rest, 2, dtype=torch.int32))])
    return slopes.bfloat16().float()
