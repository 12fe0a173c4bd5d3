"""The CPU top-k kernel (camelot/csrc/topk.c) and the row gather/copy helpers: exact against
torch, on every shape and value pattern the memory read can hand them."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from camelot import topk as native
from camelot.rows import copy_rows_, finite_rows, gather_rows

HAS_CC = shutil.which(os.environ.get("CC", "cc")) is not None


def _check(x: torch.Tensor, k: int) -> None:
    got = native.topk(x, k)
    ref = x.topk(k, dim=-1)
    assert got.values.dtype == x.dtype and got.indices.dtype == torch.long
    assert torch.equal(got.values, ref.values)  # same values, largest first
    assert torch.equal(x.gather(-1, got.indices), got.values)  # the indices point at them
    assert (got.indices.sort(-1).values.diff(dim=-1) > 0).all()  # k distinct slots per row


@pytest.mark.skipif(not HAS_CC, reason="no C compiler: torch.topk is used (tested below)")
def test_the_kernel_is_built_and_used_here():
    assert native.native_library() is not None, native.why_not()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("n", [64, 100, 2048, 2049])
@pytest.mark.parametrize("k", [1, 7, 8, 32])
def test_exact_against_torch(dtype, n, k):
    g = torch.Generator().manual_seed(n * 100 + k)
    x = torch.randn(2, 3, 50, n, generator=g).to(dtype)
    _check(x, k)
    x[0, 1] = float("-inf")  # a head with an empty bank
    x[1, 0, :, k // 2 + 1 :] = float("-inf")  # fewer valid slots than k
    _check(x, k)


def test_ties_keep_the_lower_slot():
    x = torch.zeros(4, 256)
    x[:, 10] = x[:, 200] = 1.0
    got = native.topk(x, 3)
    assert got.indices[:, 0].tolist() == [10] * 4 and got.indices[:, 1].tolist() == [200] * 4
    assert got.indices[:, 2].tolist() == [0] * 4  # first of the 254 equal zeros


def test_ascending_rows_every_score_replaces_the_last():
    x = torch.arange(4096.0).expand(8, 4096).contiguous()
    _check(x, 8)


def test_nan_rows_still_answer_k_distinct_slots_in_range():
    x = torch.full((3, 128), float("nan"))
    got = native.topk(x, 4)
    assert ((got.indices >= 0) & (got.indices < 128)).all()
    assert (got.indices.sort(-1).values.diff(dim=-1) > 0).all()


def test_what_the_kernel_does_not_take_goes_to_torch():
    x = torch.randn(5, 40)  # too few slots to be worth a call
    assert torch.equal(native.topk(x, 3).values, x.topk(3, -1).values)
    y = torch.randn(5, 500, dtype=torch.float64)  # dtype
    assert torch.equal(native.topk(y, 3).values, y.topk(3, -1).values)
    z = torch.randn(5, 500)
    assert torch.equal(native.topk(z, 40).values, z.topk(40, -1).values)  # k above the kernel's 32
    w = torch.randn(5, 500)[:, ::2]  # not contiguous
    _check(w, 5)
    e = torch.randn(0, 3, 500)  # no rows
    assert native.topk(e, 4).indices.shape == (0, 3, 4)


@settings(max_examples=60, deadline=None)
@given(rows=st.integers(1, 6), n=st.integers(64, 700), k=st.integers(1, 32), seed=st.integers(0, 2**16),
       levels=st.sampled_from([0, 3, 50]), bf16=st.booleans())
def test_property_exact_on_random_and_tied_scores(rows, n, k, seed, levels, bf16):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, n, generator=g)
    if levels:  # few distinct values: ties everywhere
        x = torch.randint(0, levels, (rows, n), generator=g).float()
    if bf16:
        x = x.bfloat16()
    _check(x, min(k, n))


@pytest.mark.parametrize("env", [{"CAMELOT_NATIVE_TOPK": "0"}, {"CC": "/bin/false"}])
def test_without_the_kernel_results_are_torch_topk(tmp_path, env):
    code = ("import warnings, torch; warnings.simplefilter('always')\n"
            "from camelot import topk as t\n"
            "x = torch.randn(4, 300)\n"
            "with warnings.catch_warnings(record=True) as w:\n"
            "    r = t.topk(x, 5)\n"
            "assert torch.equal(r.values, x.topk(5, -1).values) and t.native_library() is None\n"
            "from camelot.memory import SlotBank\n"  # a bank write does its bookkeeping in torch then
            "b = SlotBank(4, 0.9); b.write(torch.eye(4)[None, None, :3], torch.randn(1, 1, 3, 2))\n"
            "assert b.counts[0, 0].tolist() == [1, 1, 1, 0, 0] and b.telemetry.tolist() == [0, 3, 0, 0, 0]\n"
            "print(t.why_not()); print(len(w), *[str(m.message) for m in w])\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                         env={**os.environ, "CAMELOT_CACHE": str(tmp_path), **env})
    assert out.returncode == 0, out.stderr
    if "CC" in env:
        assert "could not build" in out.stdout and "using torch.topk" in out.stdout  # one warning says why
    else:
        assert out.stdout.startswith("disabled by CAMELOT_NATIVE_TOPK=0")
    assert not list(tmp_path.glob("*.so"))


def test_gather_and_copy_rows_on_bank_slices_match_gather_and_scatter():
    g = torch.Generator().manual_seed(0)
    full = torch.randn(2, 3, 301, 8, generator=g)  # a bank: 300 slots + scratch
    bank = full[..., :300, :]
    idx = torch.randint(0, 300, (2, 3, 5, 4), generator=g)
    ref = bank.gather(2, idx.reshape(2, 3, -1, 1).expand(-1, -1, -1, 8)).view(2, 3, 5, 4, 8)
    assert torch.equal(gather_rows(bank, idx), ref)
    slots = torch.stack([torch.randperm(300, generator=g)[:7] for _ in range(6)]).view(2, 3, 7)
    src = torch.randn(2, 3, 7, 8, generator=g)
    a, b = full.clone(), full.clone()
    copy_rows_(a[..., :300, :], slots, src)
    b[..., :300, :].scatter_(2, slots[..., None].expand(-1, -1, -1, 8), src)
    assert torch.equal(a, b)  # the scratch slot and every other row untouched
    expanded = torch.randn(1, 1, 300, 8).expand(2, 3, 300, 8)  # aliasing rows: falls back to gather
    assert torch.equal(gather_rows(expanded, idx), expanded.gather(
        2, idx.reshape(2, 3, -1, 1).expand(-1, -1, -1, 8)).view(2, 3, 5, 4, 8))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rows_split_over_threads_land_in_their_own_places(dtype):
    before = torch.get_num_threads()
    torch.set_num_threads(3)  # 1001 rows: three uneven parts
    try:
        x = torch.randn(1001, 300, generator=torch.Generator().manual_seed(3)).to(dtype)
        _check(x, 6)
    finally:
        torch.set_num_threads(before)


@pytest.mark.skipif(not HAS_CC, reason="no C compiler")
def test_the_kernel_without_avx512_is_exact_too(tmp_path):
    """Where the CPU has no AVX-512 the second pass takes its chunk masks from a plain loop: build
    it that way here (a compiler wrapper adds -mno-avx512f) and check it against torch."""
    cc = tmp_path / "cc-no-avx512"
    cc.write_text(f'#!/bin/sh\nexec {shutil.which(os.environ.get("CC", "cc"))} "$@" -mno-avx512f\n')
    cc.chmod(0o755)
    code = ("import torch\n"
            "from camelot import topk as t\n"
            "assert t.native_library() is not None, t.why_not()\n"
            "g = torch.Generator().manual_seed(0)\n"
            "for dtype in (torch.float32, torch.bfloat16):\n"
            "    for x in (torch.randn(40, 2049, generator=g), torch.randint(0, 3, (40, 700), generator=g).float()):\n"
            "        x = x.to(dtype)\n"
            "        x[3] = float('-inf'); x[4, 5:] = float('-inf')\n"
            "        for k in (1, 8, 32):\n"
            "            r, ref = t.topk(x, k), x.topk(k, -1)\n"
            "            assert torch.equal(r.values, ref.values) and torch.equal(x.gather(-1, r.indices), r.values)\n"
            "            assert (r.indices.sort(-1).values.diff(dim=-1) > 0).all()\n"
            "print('ok')\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                         env={**os.environ, "CAMELOT_CACHE": str(tmp_path), "CC": str(cc)})
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr
    assert list(tmp_path.glob("*.so")), "the kernel was not built with the wrapper"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_finite_rows_flags_every_nan_and_inf_and_nothing_else(dtype):
    g = torch.Generator().manual_seed(3)
    k, v = torch.randn(2, 3, 40, 16, generator=g), torch.randn(2, 3, 40, 8, generator=g)
    big = torch.finfo(dtype).max
    k[0, 0, 1, 3], v[0, 1, 2, 7], k[1, 2, 3, 0] = float("nan"), float("inf"), -float("inf")
    k[1, 0, 5], v[1, 0, 5] = big, -big  # huge but finite in both: must stay finite
    v[0, 2, 6, 0], k[0, 2, 6, 1] = float("nan"), float("inf")
    k, v = k.to(dtype), v.to(dtype)
    ref = torch.isfinite(k).all(-1) & torch.isfinite(v).all(-1)
    assert torch.equal(finite_rows(k, v), ref) and int((~ref).sum()) == 4
