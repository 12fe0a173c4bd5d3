"""Row gathers and copies on [B, H, N, D] state tensors.

`x.gather(2, idx[..., None].expand(..., D))` walks the index tensor element by element; on CPU
that is ~15x slower than selecting whole rows (index_select / index_copy_ on a [rows, D] view),
and the memory read does it for every query's chosen slots in every layer. These helpers compute
flat row numbers from the tensor's strides, so slices of the banks (which carry a scratch slot
past the real ones) are read and written in place, without a copy.
"""

from __future__ import annotations

import torch


def _flat(x: torch.Tensor, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(rows view [R, D] over x's storage, flat row numbers of idx) or None if x's layout does not allow it."""
    b, h, n, d = x.shape
    s0, s1, s2, s3 = x.stride()
    if s3 != 1 or s2 != d or s1 % d or s0 % d or x.numel() == 0:
        return None
    if (s0 == 0 and b > 1) or (s1 == 0 and h > 1):  # expanded: rows would alias
        return None
    span = ((b - 1) * s0 + (h - 1) * s1 + (n - 1) * s2) // d + 1
    rows = x.as_strided((span, d), (d, 1))
    base = (torch.arange(b, device=x.device) * (s0 // d))[:, None] + (torch.arange(h, device=x.device) * (s1 // d))
    return rows, (idx + base.view(b, h, *([1] * (idx.dim() - 2)))).reshape(-1)


def gather_rows(x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """x [B, H, N, D], idx [B, H, ...] (int64, values in [0, N)) -> x rows [B, H, ..., D]."""
    flat = _flat(x, idx)
    if flat is None:
        return x.gather(2, idx.reshape(*idx.shape[:2], -1, 1).expand(-1, -1, -1, x.shape[-1])).view(
            *idx.shape, x.shape[-1])
    rows, i = flat
    return rows.index_select(0, i).view(*idx.shape, x.shape[-1])


def copy_rows_(x: torch.Tensor, idx: torch.Tensor, src: torch.Tensor) -> None:
    """x[b, h, idx[b, h, t]] = src[b, h, t] in place; idx [B, H, T], src [B, H, T, D].
    Where an index repeats, the rows written must be equal (or land in a scratch row)."""
    flat = _flat(x, idx)
    if flat is None:
        x.scatter_(2, idx[..., None].expand(*idx.shape, x.shape[-1]), src)
        return
    rows, i = flat
    rows.index_copy_(0, i, src.reshape(-1, x.shape[-1]).to(x.dtype))


def finite_rows(k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """[B, H, T] bool: token t's key and value rows [B, H, T, D] hold no NaN and no inf.
    (The largest magnitude of each row carries both: a NaN or inf anywhere makes it non-finite.
    ~6x cheaper than isfinite(...).all(-1), whose boolean reduction is slow on CPU.)"""
    return torch.isfinite(torch.maximum(k.abs().amax(-1), v.abs().amax(-1)))
