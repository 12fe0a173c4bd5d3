"""Row-wise top-k for the memory read: a small C kernel on CPU (camelot/csrc/topk.c), torch.topk
everywhere else.

Why a kernel: on CPU torch.topk costs ~2.5 us per row at 2048 slots whatever k and dtype, and a
camelot segment selects for every query row of every layer (SmolLM2: 30 layers x 1152 rows), so
selection alone was ~90 ms of a ~380 ms window-only segment. The kernel is exact (same values as
torch.topk; among equal scores the lower index) and ~3x cheaper on real scores (docs/speed.md).

The C sources are compiled once per machine with the system C compiler (`$CC`, else `cc`) into
`$CAMELOT_CACHE` (default `~/.cache/camelot`), in well under a second, and loaded with ctypes:
no torch headers, no build step at install time. The same library carries the bookkeeping of
a slot-bank write (camelot/csrc/consolidate.c, used by camelot/memory/bank.py). Where there is
no compiler, or the build fails, or `CAMELOT_NATIVE_TOPK=0`, every call uses torch.topk and
every write its torch code (one warning says why).
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import subprocess
import tempfile
import threading
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

# one library: the top-k kernel, and the bank write's bookkeeping (camelot/memory/bank.py)
SOURCES = tuple(Path(__file__).with_name("csrc") / name for name in ("topk.c", "consolidate.c"))
FLAGS = ("-O3", "-march=native", "-shared", "-fPIC", "-std=c99")
MIN_SLOTS = 64  # below this torch.topk is as cheap and the kernel is not worth a call
# fewer rows than this per thread: splitting costs more than it saves (384 rows x 2048 bf16, a
# write's k=1: 0.18 ms on 2 threads against 0.11 ms on one; k=8: equal)
ROWS_PER_THREAD = 256

_lock = threading.Lock()
_lib: ctypes.CDLL | None = None
_tried = False
_why_not: str | None = None
_pool: ThreadPoolExecutor | None = None
_pool_workers = 0


def _cache_dir() -> Path:
    return Path(os.environ.get("CAMELOT_CACHE", Path.home() / ".cache" / "camelot"))


def _build() -> ctypes.CDLL:
    src = b"".join(p.read_bytes() for p in SOURCES)
    cc = os.environ.get("CC", "cc")
    # -march=native: the binary belongs to this machine (and compiler), so both name it
    key = hashlib.sha256(src + " ".join((cc, *FLAGS, platform.node(), platform.machine())).encode()).hexdigest()
    out = _cache_dir() / f"camelot-native-{key[:16]}.so"
    if not out.exists():
        out.parent.mkdir(parents=True, exist_ok=True)
        # build beside the target and rename: a concurrent process never loads a half-written file
        fd, tmp = tempfile.mkstemp(suffix=".so", dir=out.parent)
        os.close(fd)
        try:
            res = subprocess.run([cc, *FLAGS, *map(str, SOURCES), "-o", tmp], capture_output=True, text=True,
                                 timeout=120)
            if res.returncode != 0:
                raise OSError(f"{cc} failed: {res.stderr.strip()[:500]}")
            os.replace(tmp, out)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
    lib = ctypes.CDLL(str(out))
    args = [ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64, ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p]
    for name in ("camelot_topk_f32", "camelot_topk_bf16"):
        fn = getattr(lib, name)
        fn.argtypes, fn.restype = args, ctypes.c_int
    lib.camelot_topk_max_k.restype = ctypes.c_int
    i64, ptr = ctypes.c_int64, ctypes.c_void_p
    lib.camelot_consolidate_f32.argtypes = [i64, i64, i64, i64, i64, i64, ctypes.c_float] + [ptr] * 11 + [i64, i64]
    lib.camelot_consolidate_f32.restype = ctypes.c_int
    lib.camelot_consolidate_use_f32.argtypes = [i64] * 6 + [ctypes.c_float] * 2 + [ptr] * 13 + [i64, i64]
    lib.camelot_consolidate_use_f32.restype = ctypes.c_int
    lib.max_k = lib.camelot_topk_max_k()  # its lane count: k lanes bound the k-th score from below
    return lib


def native_library() -> ctypes.CDLL | None:
    """The compiled kernel, built on first use; None where it cannot be (reason: `why_not()`)."""
    global _lib, _tried, _why_not
    if _tried:
        return _lib
    with _lock:
        if _tried:
            return _lib
        if os.environ.get("CAMELOT_NATIVE_TOPK", "1") == "0":
            _why_not = "disabled by CAMELOT_NATIVE_TOPK=0"
        else:
            try:
                _lib = _build()
            except (OSError, subprocess.SubprocessError) as e:
                _why_not = f"could not build camelot/csrc/*.c ({e})"
                warnings.warn("camelot: native kernels unavailable (top-k, bank writes), using torch.topk and "
                              f"torch code: {_why_not}",
                              RuntimeWarning, stacklevel=3)
        _tried = True
        return _lib


def why_not() -> str | None:
    """Why the native kernel is not in use (None: it is, or it was not needed yet)."""
    return _why_not


def _thread_pool(workers: int) -> ThreadPoolExecutor:
    global _pool, _pool_workers
    with _lock:
        if _pool_workers < workers:
            if _pool is not None:
                _pool.shutdown(wait=False)
            _pool, _pool_workers = ThreadPoolExecutor(workers, thread_name_prefix="camelot-topk"), workers
        return _pool


def _native_ok(scores: torch.Tensor, k: int) -> bool:
    return (scores.device.type == "cpu" and scores.dtype in (torch.float32, torch.bfloat16)
            and scores.shape[-1] >= MIN_SLOTS and 1 <= k <= scores.shape[-1] and scores.numel() > 0
            and not (scores.requires_grad and torch.is_grad_enabled()))


def topk(scores: torch.Tensor, k: int) -> torch.return_types.topk:
    """torch.topk(scores, k, dim=-1): (values in scores' dtype, int64 indices), largest first."""
    if not _native_ok(scores, k):
        return scores.topk(k, dim=-1)
    lib = native_library()
    if lib is None or k > lib.max_k:
        return scores.topk(k, dim=-1)
    x = scores.detach().contiguous()
    n = x.shape[-1]
    rows = x.numel() // n
    values = torch.empty(*x.shape[:-1], k, dtype=torch.float32)
    idx = torch.empty(*x.shape[:-1], k, dtype=torch.long)
    fn = lib.camelot_topk_f32 if x.dtype == torch.float32 else lib.camelot_topk_bf16
    # As many threads as torch uses (torch.topk would): ctypes calls release the GIL.
    parts = max(1, min(torch.get_num_threads(), rows // ROWS_PER_THREAD))
    step = -(-rows // parts)
    xs, es = x.data_ptr(), x.element_size()
    calls = [(xs + a * n * es, min(step, rows - a), n, k, values.data_ptr() + a * k * 4, idx.data_ptr() + a * k * 8)
             for a in range(0, rows, step)]
    codes = [fn(*calls[0])] if parts == 1 else list(_thread_pool(parts).map(lambda c: fn(*c), calls))
    if any(codes):
        return scores.topk(k, dim=-1)
    return torch.return_types.topk((values.to(scores.dtype), idx))
