"""Rotary position arithmetic: place keys at chosen positions, take positions off again.

Memory keys must be position-free to be averaged, so the core stores keys with their
rotation removed and puts a position back only when a query reads them.
Two pairings exist in HF models: rotate-half (llama and most others: dim i pairs with
dim i + rot_dim/2) and interleaved (gptj, codegen, cohere: dim 2i pairs with 2i+1). A RopeSpec
says which; partial rotary (gpt_neox, phi, stablelm) rotates only the first `rot_dim` dims.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class RopeSpec:
    """What the core needs of one layer's rotary embedding.

    inv_freq: [rot_dim // 2] inverse frequencies.
    scaling: the factor HF multiplies cos and sin by (1.0 for plain RoPE).
    rot_dim: leading head dims that rotate (partial rotary leaves the rest as they are).
    interleaved: pairs (2i, 2i+1) rotate together (gptj/cohere style) instead of (i, i + rot_dim/2).
    """

    inv_freq: torch.Tensor
    scaling: float = 1.0
    interleaved: bool = False

    @property
    def rot_dim(self) -> int:
        return 2 * self.inv_freq.shape[-1]


def cos_sin(spec: RopeSpec, positions: torch.Tensor, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Unit cos/sin of shape [..., rot_dim] for integer `positions` (negative allowed), in fp32."""
    freqs = positions.to(device=device, dtype=torch.float32)[..., None] * spec.inv_freq.to(
        device=device, dtype=torch.float32
    )
    emb = freqs.repeat_interleave(2, dim=-1) if spec.interleaved else torch.cat((freqs, freqs), dim=-1)
    return emb.cos(), emb.sin()


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def _rotate_every_two(x: torch.Tensor) -> torch.Tensor:
    pairs = x.unflatten(-1, (-1, 2))
    return torch.stack((-pairs[..., 1], pairs[..., 0]), dim=-1).flatten(-2)


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, inverse: bool = False,
           interleaved: bool = False) -> torch.Tensor:
    """Rotate the first cos.shape[-1] dims of x (fp32 math, result in fp32). inverse undoes it."""
    rd = cos.shape[-1]
    x = x.float()
    rot, rest = x[..., :rd], x[..., rd:]
    s = -sin if inverse else sin
    turn = _rotate_every_two if interleaved else _rotate_half
    out = rot * cos + turn(rot) * s
    return torch.cat((out, rest), dim=-1) if rest.shape[-1] else out


def unrotate_keys(spec: RopeSpec | None, keys: torch.Tensor, positions: torch.Tensor,
                  cos_sin_at: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
    """Post-RoPE keys [B, H, T, D] at `positions` [T] -> position-free keys (fp32).
    `cos_sin_at`: cos_sin(spec, positions) already computed."""
    if spec is None:
        return keys.float()
    cos, sin = cos_sin(spec, positions, keys.device) if cos_sin_at is None else cos_sin_at
    raw = rotate(keys, cos, sin, inverse=True, interleaved=spec.interleaved)
    if spec.scaling != 1.0:
        # HF scales cos and sin by `scaling`, so a rotated key carries that factor once.
        raw = raw / spec.scaling
    return raw


def place_keys(spec: RopeSpec | None, raw: torch.Tensor, positions: torch.Tensor,
               cos_sin_at: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
    """Position-free keys [B, H, T, D] -> keys as HF would have rotated them at `positions` [T].
    `cos_sin_at`: cos_sin(spec, positions) already computed (a caller placing keys at the same
    positions every segment keeps it)."""
    if spec is None:
        return raw.float()
    cos, sin = cos_sin(spec, positions, raw.device) if cos_sin_at is None else cos_sin_at
    out = rotate(raw, cos, sin, interleaved=spec.interleaved)
    return out * spec.scaling if spec.scaling != 1.0 else out


def place_queries_for_memory(spec: RopeSpec | None, query: torch.Tensor, distance: int,
                             cos_sin_at_distance: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
    """Turn rotated queries into vectors whose dot product with a *position-free* key equals the
    query's score against that key placed `distance` positions before position 0.

    q_p . (s R(-d) k) = (s R(d) q_p) . k, so the memory never needs rotating: one rotation
    of the (smaller) query block per layer replaces a rotation of every slot. A caller that
    reads every step passes `cos_sin_at_distance` (cos_sin(spec, distance)) computed once.
    """
    if spec is None:
        return query.float()
    if cos_sin_at_distance is None:
        cos_sin_at_distance = cos_sin(spec, torch.tensor(distance), query.device)
    cos, sin = cos_sin_at_distance
    out = rotate(query, cos, sin, interleaved=spec.interleaved)
    return out * spec.scaling if spec.scaling != 1.0 else out
