"""SwiGLU on a stacked pre-activation, silu(h[:, :F]) * h[:, F:], as Triton kernels.

The MoE's grouped GEMMs compute gate and up as one GEMM over [w1 | w3] (F + F = 2F columns;
braid.kernels.moe.grouped_mm): at hybrid-374m's F = 1408, 2F is a whole number of the grouped
GEMM's 256-wide tiles where F is not, and the input gradient becomes one GEMM over K = 2F instead
of two and a sum. Each row of h holds gate then up. Under torch.compile, inductor's generated
backward for this layout wrote the stacked gradient at about 60% of the split layout's speed
(docs/benchmarks.md, seventh and eighth measurements); these kernels are a custom op, which
inductor leaves whole. Each reads a row's gate and up halves as two contiguous runs, works in
float32 and rounds once on the store.

Legend: N rows, F hidden width (h has 2F columns).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from braid.kernels.custom_ops import cuda_op

BLOCK_N = 16  # rows a program takes
BLOCK_F = 128  # columns of each half a program takes
NUM_WARPS = 4


def supports(h_N2F: Tensor) -> bool:
    """A 2-D float16/bfloat16/float32 h with an even number of columns and unit column stride."""
    return (
        h_N2F.ndim == 2
        and h_N2F.shape[1] % 2 == 0
        and h_N2F.stride(1) == 1
        and h_N2F.dtype in (torch.float16, torch.bfloat16, torch.float32)
    )


@triton.jit
def _gate_and_up(H, N, F, stride_h, BLOCK_N: tl.constexpr, BLOCK_F: tl.constexpr):
    """This program's rows and columns, their mask, and its gate and up tiles in float32."""
    rows = (tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
    cols = tl.program_id(1) * BLOCK_F + tl.arange(0, BLOCK_F)
    mask = (rows < N)[:, None] & (cols < F)[None, :]
    gate_at = H + rows[:, None] * stride_h + cols[None, :]
    gate = tl.load(gate_at, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(gate_at + F, mask=mask, other=0.0).to(tl.float32)
    return rows, cols, mask, gate, up


@triton.jit
def _silu_mul_stacked_fwd_kernel(H, OUT, N, F, stride_h, stride_out, BLOCK_N: tl.constexpr, BLOCK_F: tl.constexpr):
    rows, cols, mask, gate, up = _gate_and_up(H, N, F, stride_h, BLOCK_N, BLOCK_F)
    out = gate * tl.sigmoid(gate) * up
    tl.store(OUT + rows[:, None] * stride_out + cols[None, :], out.to(OUT.dtype.element_ty), mask=mask)


@triton.jit
def _silu_mul_stacked_bwd_kernel(H, DOUT, DH, N, F, stride_h, stride_dout, stride_dh, BLOCK_N: tl.constexpr,
                                 BLOCK_F: tl.constexpr):
    rows, cols, mask, gate, up = _gate_and_up(H, N, F, stride_h, BLOCK_N, BLOCK_F)
    dout = tl.load(DOUT + rows[:, None] * stride_dout + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    sig = tl.sigmoid(gate)
    dgate = dout * up * sig * (1.0 + gate * (1.0 - sig))  # silu'(g) = s (1 + g (1 - s))
    dup = dout * gate * sig
    dgate_at = DH + rows[:, None] * stride_dh + cols[None, :]
    tl.store(dgate_at, dgate.to(DH.dtype.element_ty), mask=mask)
    tl.store(dgate_at + F, dup.to(DH.dtype.element_ty), mask=mask)


def _grid(N: int, F: int) -> tuple[int, int]:
    return triton.cdiv(N, BLOCK_N), triton.cdiv(F, BLOCK_F)


def silu_mul_stacked_forward(h_N2F: Tensor) -> Tensor:
    """out_NF = silu(gate) * up for h = [gate | up], in h's dtype."""
    N, F = h_N2F.shape[0], h_N2F.shape[1] // 2
    out_NF = torch.empty((N, F), device=h_N2F.device, dtype=h_N2F.dtype)
    if N and F:
        _silu_mul_stacked_fwd_kernel[_grid(N, F)](
            h_N2F, out_NF, N, F, h_N2F.stride(0), out_NF.stride(0), BLOCK_N=BLOCK_N, BLOCK_F=BLOCK_F,
            num_warps=NUM_WARPS,
        )
    return out_NF


def silu_mul_stacked_backward(dout_NF: Tensor, h_N2F: Tensor) -> Tensor:
    """dh_N2F = [dgate | dup], in h's dtype."""
    dout_NF = dout_NF if dout_NF.stride(-1) == 1 else dout_NF.contiguous()
    N, F = h_N2F.shape[0], h_N2F.shape[1] // 2
    dh_N2F = torch.empty((N, 2 * F), device=h_N2F.device, dtype=h_N2F.dtype)
    if N and F:
        _silu_mul_stacked_bwd_kernel[_grid(N, F)](
            h_N2F, dout_NF, dh_N2F, N, F, h_N2F.stride(0), dout_NF.stride(0), dh_N2F.stride(0), BLOCK_N=BLOCK_N,
            BLOCK_F=BLOCK_F, num_warps=NUM_WARPS,
        )
    return dh_N2F


@cuda_op("silu_mul_stacked", "(Tensor h) -> Tensor")
def _silu_mul_stacked(h):
    return silu_mul_stacked_forward(h)


@_silu_mul_stacked.register_fake
def _(h):
    return h.new_empty((h.shape[0], h.shape[1] // 2))


@cuda_op("silu_mul_stacked_backward", "(Tensor dout, Tensor h) -> Tensor")
def _silu_mul_stacked_backward(dout, h):
    return silu_mul_stacked_backward(dout, h)


@_silu_mul_stacked_backward.register_fake
def _(dout, h):
    return h.new_empty(h.shape)


def _setup(ctx, inputs, output):
    ctx.save_for_backward(inputs[0])


def _grads(ctx, dout):
    (h,) = ctx.saved_tensors
    return torch.ops.braid.silu_mul_stacked_backward(dout, h)


_silu_mul_stacked.register_autograd(_grads, setup_context=_setup)


def silu_mul_stacked_triton(h_N2F: Tensor) -> Tensor:
    """`braid.kernels.swiglu.silu_mul_stacked` on the Triton kernels (inputs validated by the dispatcher)."""
    return torch.ops.braid.silu_mul_stacked(h_N2F)
