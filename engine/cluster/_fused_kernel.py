"""The Triton kernel behind `engine.cluster._fused`; imported only where triton is (it imports triton at the top)."""

from __future__ import annotations

import os

import triton
import triton.language as tl


def _assign_rows(x_ptr, c_ptr, c_sq_ptr, labels_ptr, best_ptr, second_ptr, n, k, stride_x, stride_c,
                 D: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_ROWS: tl.constexpr, BLOCK_CENTROIDS: tl.constexpr,
                 ROUND_BF16: tl.constexpr, DOT_BF16: tl.constexpr, INPUT_PRECISION: tl.constexpr):
    # One program owns BLOCK_ROWS rows and walks every centroid tile, so the best and second-best of a
    # row live in registers from start to end: no n x k matrix, no atomics, no second pass.
    rows = tl.program_id(0) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
    dims = tl.arange(0, BLOCK_D)
    row_ok = rows < n
    dim_ok = dims < D
    # int64 offsets: n * stride passes 2**31 long before the rows stop fitting on a device.
    x = tl.load(x_ptr + rows.to(tl.int64)[:, None] * stride_x + dims[None, :],
                mask=row_ok[:, None] & dim_ok[None, :], other=0.0)
    if ROUND_BF16:
        x = x.to(tl.bfloat16)
    if not DOT_BF16:
        x = x.to(tl.float32)
    best = tl.full([BLOCK_ROWS], float("inf"), tl.float32)
    second = tl.full([BLOCK_ROWS], float("inf"), tl.float32)
    label = tl.zeros([BLOCK_ROWS], tl.int64)
    tile = tl.arange(0, BLOCK_CENTROIDS)
    for start in range(0, k, BLOCK_CENTROIDS):
        cols = start + tile
        col_ok = cols < k
        c = tl.load(c_ptr + cols.to(tl.int64)[:, None] * stride_c + dims[None, :],
                    mask=col_ok[:, None] & dim_ok[None, :], other=0.0)
        if ROUND_BF16:
            c = c.to(tl.bfloat16)
        if not DOT_BF16:
            c = c.to(tl.float32)
        # Padding centroids get +inf, so they never win and never come second.
        c_sq = tl.load(c_sq_ptr + cols, mask=col_ok, other=float("inf"))
        dot = tl.dot(x, tl.trans(c), input_precision=INPUT_PRECISION, out_dtype=tl.float32)
        dist = c_sq[None, :] - 2.0 * dot
        tile_best, tile_arg = tl.min(dist, axis=1, return_indices=True, return_indices_tie_break_left=True)
        tile_second = tl.min(tl.where(tile[None, :] == tile_arg[:, None], float("inf"), dist), axis=1)
        # Of two disjoint sets, the second best is the loser of the two bests or either set's second.
        second = tl.minimum(tl.maximum(best, tile_best), tl.minimum(second, tile_second))
        # Strictly better only: an exact tie keeps the lower index, as torch.argmin does.
        better = tile_best < best
        label = tl.where(better, (start + tile_arg).to(tl.int64), label)
        best = tl.minimum(best, tile_best)
    tl.store(labels_ptr + rows, label, mask=row_ok)
    tl.store(best_ptr + rows, best, mask=row_ok)
    tl.store(second_ptr + rows, second, mask=row_ok)


# triton.jit reads TRITON_INTERPRET when it decorates: one jitted kernel per mode, made on first use.
_JITTED: dict[bool, triton.JITFunction] = {}


def assign_rows_kernel() -> triton.JITFunction:
    """The jitted kernel for the current TRITON_INTERPRET setting."""
    interpret = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
    if interpret not in _JITTED:
        _JITTED[interpret] = triton.jit(_assign_rows)
    return _JITTED[interpret]



def dot_types(precision: str, interpret: bool) -> dict[str, object]:
    """The kernel's ROUND_BF16, DOT_BF16 and INPUT_PRECISION for a precision setting (plain values: constexpr
    booleans and strings are what every Triton version takes at launch).

    Triton 3.9's interpreter gets tl.dot wrong on bfloat16 operands (values off by 1e10), so there bf16 rounds
    the operands to bfloat16 and multiplies them in float32: the same numbers, since the product of two
    bfloat16 values is exact in float32 and the accumulation is float32 either way. (Its float32 -> bfloat16
    cast also truncates where the compiled kernel rounds to nearest; `fused_assign` rounds first there.)
    """
    bf16 = precision == "bf16"
    return {"ROUND_BF16": bf16, "DOT_BF16": bf16 and not interpret,
            "INPUT_PRECISION": "tf32" if precision == "tf32" else "ieee"}
