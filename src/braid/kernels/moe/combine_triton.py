"""The MoE's weighted combine with its backward as one Triton kernel.

Forward (torch ops, which inductor fuses into one gather-weight-sum kernel):
y_ND[n] = sum_k gates[n, k] * y_sorted[unsort[n K + k]].
Backward, for the incoming gradient g_ND: dy_sorted[unsort[n K + k]] = gates[n, k] * g[n] and
dgates[n, k] = <g[n], y_sorted[unsort[n K + k]]>. Compiled, the reference backward is two
kernels: one for dgates, which gathers y_sorted and reads g, and one for dy_sorted, which reads
g again and writes in expert order through the inverse permutation. On an H200 at hybrid-374m's
shape (N 16384, K 2, D 1024) they took 43 and 41 us (docs/benchmarks.md, seventeenth
measurement). Here each program takes a block of tokens. It reads g once for both outputs and
writes each slot's row where unsort puts it. unsort is a permutation, so the writes never
collide (no atomics), and dgates is summed over D in a fixed order: runs are bit-identical.

Legend: N tokens, K experts per token (KP: K padded to a power of two), D model dim, S slots (N K).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from braid.kernels.custom_ops import cuda_op
from braid.kernels.moe.reference import gate_weighted_sum

BLOCK_N = 8  # tokens a program takes
BLOCK_D = 256  # columns a loop step takes
NUM_WARPS = 4


def supports(y_sorted_SD: Tensor, gates_NK: Tensor) -> bool:
    """2-D float16/bfloat16/float32 expert outputs with unit column stride, float32 gates."""
    return (
        y_sorted_SD.ndim == 2
        and y_sorted_SD.stride(1) == 1
        and y_sorted_SD.dtype in (torch.float16, torch.bfloat16, torch.float32)
        and gates_NK.ndim == 2
        and gates_NK.dtype == torch.float32
    )


@triton.jit
def _combine_bwd_kernel(G, Y, GATES, UNSORT, DY, DGATES, N, D, stride_g, stride_y, stride_dy, K: tl.constexpr,
                        KP: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    tokens = (tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
    ks = tl.arange(0, KP)
    token_ok = tokens < N
    slot_ok = token_ok[:, None] & (ks < K)[None, :]
    slot_at = tokens[:, None] * K + ks[None, :]
    rows = tl.load(UNSORT + slot_at, mask=slot_ok, other=0).to(tl.int64)  # each slot's row in y_sorted
    gates = tl.load(GATES + slot_at, mask=slot_ok, other=0.0)
    dgates = tl.zeros((BLOCK_N, KP), dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        cols = d0 + tl.arange(0, BLOCK_D)
        col_ok = cols < D
        g = tl.load(G + tokens[:, None] * stride_g + cols[None, :], mask=token_ok[:, None] & col_ok[None, :],
                    other=0.0).to(tl.float32)
        mask = slot_ok[:, :, None] & col_ok[None, None, :]
        y = tl.load(Y + rows[:, :, None] * stride_y + cols[None, None, :], mask=mask, other=0.0).to(tl.float32)
        dgates += tl.sum(g[:, None, :] * y, axis=2)
        dy = g[:, None, :] * gates[:, :, None]
        tl.store(DY + rows[:, :, None] * stride_dy + cols[None, None, :], dy.to(DY.dtype.element_ty), mask=mask)
    tl.store(DGATES + slot_at, dgates, mask=slot_ok)


def combine_backward(grad_ND: Tensor, y_sorted_SD: Tensor, gates_NK: Tensor, unsort_S: Tensor) -> tuple[Tensor, Tensor]:
    """(dy_sorted_SD in y's dtype, dgates_NK float32) for the incoming gradient grad_ND."""
    grad_ND = grad_ND if grad_ND.stride(-1) == 1 else grad_ND.contiguous()
    gates_NK, unsort_S = gates_NK.contiguous(), unsort_S.contiguous()
    (N, K), D = gates_NK.shape, y_sorted_SD.shape[1]
    dy_sorted_SD = torch.empty((N * K, D), device=y_sorted_SD.device, dtype=y_sorted_SD.dtype)
    dgates_NK = torch.empty((N, K), device=gates_NK.device, dtype=torch.float32)
    if N and K and D:
        _combine_bwd_kernel[(triton.cdiv(N, BLOCK_N),)](
            grad_ND, y_sorted_SD, gates_NK, unsort_S, dy_sorted_SD, dgates_NK, N, D, grad_ND.stride(0),
            y_sorted_SD.stride(0), dy_sorted_SD.stride(0), K=K, KP=triton.next_power_of_2(K), BLOCK_N=BLOCK_N,
            BLOCK_D=BLOCK_D, num_warps=NUM_WARPS,
        )
    elif N and K:
        dgates_NK.zero_()
    return dy_sorted_SD, dgates_NK


@cuda_op("moe_combine_backward", "(Tensor grad, Tensor y_sorted, Tensor gates, Tensor unsort) -> (Tensor, Tensor)")
def _moe_combine_backward(grad, y_sorted, gates, unsort):
    return combine_backward(grad, y_sorted, gates, unsort)


@_moe_combine_backward.register_fake
def _(grad, y_sorted, gates, unsort):
    return y_sorted.new_empty((gates.shape[0] * gates.shape[1], y_sorted.shape[1])), gates.new_empty(gates.shape)


class _WeightedCombine(torch.autograd.Function):
    """The reference's forward; the backward on the kernel above."""

    @staticmethod
    def forward(ctx, y_sorted_SD, gates_NK, unsort_S):
        ctx.save_for_backward(y_sorted_SD, gates_NK, unsort_S)
        return gate_weighted_sum(y_sorted_SD[unsort_S].unflatten(0, gates_NK.shape), gates_NK)

    @staticmethod
    def backward(ctx, grad_ND):
        y_sorted_SD, gates_NK, unsort_S = ctx.saved_tensors
        dy_sorted_SD, dgates_NK = torch.ops.braid.moe_combine_backward(grad_ND, y_sorted_SD, gates_NK, unsort_S)
        return dy_sorted_SD, dgates_NK, None


def weighted_combine_triton(y_sorted_SD: Tensor, gates_NK: Tensor, unsort_S: Tensor) -> Tensor:
    """`braid.kernels.moe.weighted_combine` with the Triton backward (inputs validated by the dispatcher)."""
    return _WeightedCombine.apply(y_sorted_SD, gates_NK, unsort_S)
