"""Nearest-centroid assignment of low-dimensional rows in one fused Triton kernel (squared L2 and argmin).

For the engine's own latents (d = 10-64) a plain GEMM + argmin writes, and reads back, an n x k distance
matrix to do 2 d flops per entry: the assignment is bound by memory, not by the matmul. Here each program
keeps a block of rows in registers, walks the centroids in tiles with `tl.dot`, and keeps per row only the
best and the second-best of ||c||^2 - 2 x.c and the best index. The caller adds ||x||^2 where it needs the
distance itself, and uses `second - best` to find the rows whose label a lower precision may have changed
(the fp32 re-check of near ties).

Triton is optional: this module imports without it (and without a GPU); `available(device)` says whether
`fused_assign` can run there. With TRITON_INTERPRET=1 the kernel also runs on CPU tensors, slowly: that is
how the suite checks it on a machine without a GPU.
"""

from __future__ import annotations

import contextlib
import functools
import os
from typing import Any

import torch

PRECISIONS = ("fp32", "tf32", "bf16")
MAX_DIM = 128
"""Rows wider than this keep their tile of x in too many registers; a plain GEMM is the better tool there."""


@functools.cache
def _kernel_module() -> Any | None:
    try:
        from engine.cluster import _fused_kernel
    except ImportError:
        return None
    return _fused_kernel


def interpreting() -> bool:
    """Whether Triton runs kernels in its interpreter (TRITON_INTERPRET=1), on CPU tensors."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def available(device: torch.device | str) -> bool:
    """True when `fused_assign` can run on `device`: a CUDA device with triton importable."""
    return torch.device(device).type == "cuda" and torch.cuda.is_available() and _kernel_module() is not None


def fused_assign(X: torch.Tensor, C: torch.Tensor, c_sq: torch.Tensor, *, precision: str = "fp32",
                 block_rows: int = 128, block_centroids: int | None = None, num_warps: int = 8,
                 num_stages: int = 2) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(labels int64, best float32, second float32) of every row of X (n, d) among the centroids C (k, d).

    `best` and `second` are the two smallest values of ||c||^2 - 2 x.c over the centroids (add ||x||^2 for
    squared distances); `second` is +inf when k = 1, and equals `best` on an exact tie (the lower index
    wins, as with torch.argmin). X and C are float32 or bfloat16 on one device, d <= MAX_DIM; c_sq (k,) is
    float32, computed from the float32 centroids. `precision`: "fp32" (IEEE float32 products), "tf32"
    (TensorFloat-32 products) or "bf16" (bfloat16 products); the accumulation is float32 in all three.
    The block sizes and num_warps are tuning knobs (see `kernel_config`).
    """
    _check(X, C, c_sq, precision)
    kernels = _kernel_module()
    if kernels is None:
        raise RuntimeError("fused_assign needs triton, which is not installed here; check available(device) first")
    config = kernel_config(X.shape[1], precision, block_rows=block_rows, block_centroids=block_centroids,
                           num_warps=num_warps, num_stages=num_stages, interpret=interpreting())
    n, d = X.shape
    k = C.shape[0]
    device = X.device
    if device.type != "cuda" and not (device.type == "cpu" and interpreting()):
        raise ValueError(f"fused_assign runs on a CUDA device (or on the CPU under TRITON_INTERPRET=1); "
                         f"X is on {device}")
    labels = torch.empty(n, dtype=torch.int64, device=device)
    best = torch.empty(n, dtype=torch.float32, device=device)
    second = torch.empty(n, dtype=torch.float32, device=device)
    if n == 0:
        return labels, best, second
    if precision == "bf16" and interpreting():
        # The interpreter's float32 -> bfloat16 cast truncates; the compiled kernel's rounds to nearest, as torch's.
        X, C = X.to(torch.bfloat16), C.to(torch.bfloat16)
    X = X if X.stride(1) == 1 else X.contiguous()
    C = C if C.stride(1) == 1 else C.contiguous()
    c_sq = c_sq.contiguous()
    grid = ((n + block_rows - 1) // block_rows,)
    with torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext():
        kernels.assign_rows_kernel()[grid](X, C, c_sq, labels, best, second, n, k, X.stride(0), C.stride(0),
                                           **config)
    return labels, best, second


def kernel_config(d: int, precision: str, *, block_rows: int = 128, block_centroids: int | None = None,
                  num_warps: int = 8, num_stages: int = 2, interpret: bool = False) -> dict[str, Any]:
    """The kernel's compile-time arguments and launch options for rows of `d` features (needs triton).

    The defaults keep every d <= 128 and precision free of register spills on sm_90 (compiled with Triton 3.9
    here on a CPU and read with cuobjdump -res-usage): a float32 dot runs on the FMA units with both tiles
    in registers, 246 of 255 registers at d = 64 with 64-centroid tiles, and with those it spills 984 bytes
    a thread at d = 128, hence 32-centroid tiles there; tf32 and bf16 dots (wgmma) stay under 130 registers
    with 8 warps. Which blocks are fastest, benchmarks/gpu.py measures on the device.
    """
    kernels = _kernel_module()
    if kernels is None:
        raise RuntimeError("the fused kernel needs triton, which is not installed here")
    block_d = max(16, 1 << (d - 1).bit_length())
    if block_centroids is None:
        block_centroids = 32 if precision == "fp32" and block_d > 64 else 64
    for name, value in (("block_rows", block_rows), ("block_centroids", block_centroids)):
        if value < 16 or value & (value - 1):
            raise ValueError(f"{name}={value} should be a power of two >= 16")
    return {"D": d, "BLOCK_D": block_d, "BLOCK_ROWS": block_rows, "BLOCK_CENTROIDS": block_centroids,
            **kernels.dot_types(precision, interpret), "num_warps": num_warps, "num_stages": num_stages}


def reference_assign(X: torch.Tensor, C: torch.Tensor, c_sq: torch.Tensor, *, precision: str = "fp32",
                     block_rows: int = 65536) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """What `fused_assign` computes, in plain torch on any device: blocks of the n x k matrix and top-2.

    The products are taken in `precision`: tf32 through torch.backends.cuda.matmul.allow_tf32 on CUDA
    (the CPU has no tf32: float32 there), bf16 by rounding both sides to bfloat16 and multiplying in float32
    (exact products, float32 sums, as the kernel's bfloat16 dot does), so a difference from `fused_assign`
    is the kernel's, not the rounding's.
    """
    _check(X, C, c_sq, precision)
    n, k = X.shape[0], C.shape[0]
    Ct = _rounded(C, precision).T
    out = (torch.empty(n, dtype=torch.int64, device=X.device), torch.empty(n, device=X.device),
           torch.full((n,), float("inf"), device=X.device))
    previous = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = precision == "tf32"
    try:
        for start in range(0, n, block_rows):
            stop = min(start + block_rows, n)
            dist = c_sq - 2.0 * (_rounded(X[start:stop], precision) @ Ct)
            values, indices = dist.topk(min(2, k), dim=1, largest=False)
            out[0][start:stop] = indices[:, 0]
            out[1][start:stop] = values[:, 0]
            if k > 1:
                out[2][start:stop] = values[:, 1]
    finally:
        torch.backends.cuda.matmul.allow_tf32 = previous
    return out


def _check(X: torch.Tensor, C: torch.Tensor, c_sq: torch.Tensor, precision: str) -> None:
    if precision not in PRECISIONS:
        raise ValueError(f"precision={precision!r} should be one of {', '.join(map(repr, PRECISIONS))}")
    if X.ndim != 2 or C.ndim != 2:
        raise ValueError(f"X and C should be 2-d, got X of shape {tuple(X.shape)} and C of {tuple(C.shape)}")
    if X.shape[1] != C.shape[1]:
        raise ValueError(f"X has {X.shape[1]} features but the centroids have {C.shape[1]}")
    if X.shape[1] > MAX_DIM:
        raise ValueError(f"X has {X.shape[1]} features; the fused assignment takes at most {MAX_DIM}")
    if C.shape[0] < 1:
        raise ValueError("C should hold at least one centroid")
    if c_sq.shape != (C.shape[0],) or c_sq.dtype != torch.float32:
        raise ValueError(f"c_sq should be float32 of shape ({C.shape[0]},), got {c_sq.dtype} {tuple(c_sq.shape)}")
    for name, t in (("X", X), ("C", C)):
        if t.dtype not in (torch.float32, torch.bfloat16):
            raise ValueError(f"{name} should be float32 or bfloat16, got {t.dtype}")
    if not X.device == C.device == c_sq.device:
        raise ValueError(f"X, C and c_sq should be on one device, got {X.device}, {C.device} and {c_sq.device}")


def _rounded(t: torch.Tensor, precision: str) -> torch.Tensor:
    return (t.to(torch.bfloat16) if precision == "bf16" else t).float()
