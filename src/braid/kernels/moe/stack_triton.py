"""[a | b] stacked along the last dimension and cast, in one Triton kernel: the MoE's bf16 copy
of [w1 | w3] (braid.kernels.moe.grouped_mm).

aten's copy into each half of the stacked tensor is a strided destination, so it takes
TensorIterator's generic loop instead of its vectorized one: 32 us for each of hybrid-374m's
(8, 1024, 1408) halves on an H200, where the vectorized cast of a whole tensor of that size
took 16 us. Here each program reads a block of rows of both inputs and writes the stacked rows.

Legend: R rows (every dimension but the last, flattened), F columns of each input.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

BLOCK_R = 16
BLOCK_F = 128
NUM_WARPS = 4


@triton.jit
def _stack_cast_kernel(A, B, OUT, R, F, BLOCK_R: tl.constexpr, BLOCK_F: tl.constexpr):
    rows = (tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)).to(tl.int64)
    cols = tl.program_id(1) * BLOCK_F + tl.arange(0, BLOCK_F)
    mask = (rows < R)[:, None] & (cols < F)[None, :]
    at = rows[:, None] * F + cols[None, :]
    out_at = OUT + rows[:, None] * (2 * F) + cols[None, :]
    tl.store(out_at, tl.load(A + at, mask=mask).to(OUT.dtype.element_ty), mask=mask)
    tl.store(out_at + F, tl.load(B + at, mask=mask).to(OUT.dtype.element_ty), mask=mask)


def stack_cast(a: Tensor, b: Tensor, dtype: torch.dtype) -> Tensor:
    """torch.cat([a, b], dim=-1).to(dtype) in one pass; a and b of one shape."""
    if a.shape != b.shape:
        raise ValueError(f"stack_cast: a {tuple(a.shape)} and b {tuple(b.shape)} must have one shape")
    a, b = a.contiguous(), b.contiguous()
    F = a.shape[-1]
    R = a.numel() // F if F else 0
    out = torch.empty((*a.shape[:-1], 2 * F), device=a.device, dtype=dtype)
    if R and F:
        _stack_cast_kernel[(triton.cdiv(R, BLOCK_R), triton.cdiv(F, BLOCK_F))](
            a, b, out, R, F, BLOCK_R=BLOCK_R, BLOCK_F=BLOCK_F, num_warps=NUM_WARPS
        )
    return out
