"""RMSNorm and gated RMSNorm as fused Triton kernels (forward and backward).

One program normalises one group of one row: x is viewed as (M rows, D) with D split into
NG groups of GS channels; the group's statistics are taken in float32 and the output is
stored in x's dtype. Three variants share the kernels:

    plain             y = x * rstd(x) * w
    gate then norm    u = x * silu(z),  y = u * rstd(u) * w          (Mamba-2)
    norm then gate    y = x * rstd(x) * w * silu(z)                  (GLA)

with rstd(u) = 1 / sqrt(mean(u^2) + eps) over the group. The backward recomputes rstd from
the saved inputs; each program of the backward walks a block of rows and writes its partial
weight gradient to its own row of a (programs, D) buffer that is summed afterwards (no
atomics, deterministic). Runs on CPU tensors under TRITON_INTERPRET=1 (the CI parity test).

Legend: M rows, D channels, NG groups, GS group size, BLOCK the power-of-two tile >= GS.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor


@triton.jit
def _rms_norm_fwd_kernel(
    X, Z, W, Y, stride_x, stride_z, stride_y, GS, eps,
    BLOCK: tl.constexpr, HAS_GATE: tl.constexpr, NORM_BEFORE_GATE: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * GS + tl.arange(0, BLOCK)
    mask = tl.arange(0, BLOCK) < GS
    x = tl.load(X + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
    if HAS_GATE:
        z = tl.load(Z + row * stride_z + cols, mask=mask, other=0.0).to(tl.float32)
        gate = z * tl.sigmoid(z)
        if not NORM_BEFORE_GATE:
            x = x * gate
    rstd = 1.0 / tl.sqrt(tl.sum(x * x, axis=0) / GS + eps)
    w = tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
    y = x * rstd * w
    if HAS_GATE:
        if NORM_BEFORE_GATE:
            y = y * gate
    tl.store(Y + row * stride_y + cols, y.to(Y.dtype.element_ty), mask=mask)


@triton.jit
def _rms_norm_bwd_kernel(
    X, Z, W, DY, DX, DZ, DW_PARTIAL, stride_x, stride_z, stride_dy, stride_dx, stride_dz,
    M, D, GS, eps, rows_per_program,
    BLOCK: tl.constexpr, HAS_GATE: tl.constexpr, NORM_BEFORE_GATE: tl.constexpr,
):
    program = tl.program_id(0)
    cols = tl.program_id(1) * GS + tl.arange(0, BLOCK)
    mask = tl.arange(0, BLOCK) < GS
    w = tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
    dw = tl.zeros((BLOCK,), dtype=tl.float32)
    row_start = program.to(tl.int64) * rows_per_program
    row_end = tl.minimum(row_start + rows_per_program, M)
    for row in range(row_start, row_end):
        x = tl.load(X + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
        dy = tl.load(DY + row * stride_dy + cols, mask=mask, other=0.0).to(tl.float32)
        u = x
        if HAS_GATE:
            z = tl.load(Z + row * stride_z + cols, mask=mask, other=0.0).to(tl.float32)
            sig = tl.sigmoid(z)
            gate = z * sig
            dgate_dz = sig * (1.0 + z * (1.0 - sig))
            if not NORM_BEFORE_GATE:
                u = x * gate
        rstd = 1.0 / tl.sqrt(tl.sum(u * u, axis=0) / GS + eps)
        n = u * rstd
        dn = dy * w
        if HAS_GATE:
            if NORM_BEFORE_GATE:
                dw += dy * n * gate
                tl.store(DZ + row * stride_dz + cols, (dy * n * w * dgate_dz).to(DZ.dtype.element_ty), mask=mask)
                dn = dn * gate
            else:
                dw += dy * n
        else:
            dw += dy * n
        du = rstd * (dn - n * (tl.sum(dn * n, axis=0) / GS))
        dx = du
        if HAS_GATE:
            if not NORM_BEFORE_GATE:
                dx = du * gate
                tl.store(DZ + row * stride_dz + cols, (du * x * dgate_dz).to(DZ.dtype.element_ty), mask=mask)
        tl.store(DX + row * stride_dx + cols, dx.to(DX.dtype.element_ty), mask=mask)
    tl.store(DW_PARTIAL + program.to(tl.int64) * D + cols, dw, mask=mask)


def _launch_config(group_size: int) -> tuple[int, int]:
    block = triton.next_power_of_2(group_size)
    return block, min(max(block // 256, 1), 8)


def _num_programs(device: torch.device, rows: int) -> int:
    """Backward programs per group: a few per SM on a GPU, a handful elsewhere (the interpreter)."""
    if device.type == "cuda":
        return max(1, min(rows, 4 * torch.cuda.get_device_properties(device).multi_processor_count))
    return max(1, min(rows, 4))


class _RMSNormFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, gate, weight, eps, group_size, norm_before_gate):
        D = x.shape[-1]
        x_MD = x.reshape(-1, D).contiguous()
        z_MD = None if gate is None else gate.reshape(-1, D).contiguous()
        y_MD = torch.empty_like(x_MD)
        block, num_warps = _launch_config(group_size)
        M = x_MD.shape[0]
        if M > 0:
            _rms_norm_fwd_kernel[(M, D // group_size)](
                x_MD, x_MD if z_MD is None else z_MD, weight, y_MD,
                x_MD.stride(0), 0 if z_MD is None else z_MD.stride(0), y_MD.stride(0), group_size, eps,
                BLOCK=block, HAS_GATE=z_MD is not None, NORM_BEFORE_GATE=norm_before_gate, num_warps=num_warps,
            )
        ctx.save_for_backward(x_MD, z_MD, weight)
        ctx.config = (eps, group_size, norm_before_gate, x.shape)
        return y_MD.view(x.shape)

    @staticmethod
    def backward(ctx, dy):
        x_MD, z_MD, weight = ctx.saved_tensors
        eps, group_size, norm_before_gate, shape = ctx.config
        M, D = x_MD.shape
        dy_MD = dy.reshape(M, D).contiguous()
        dx_MD = torch.empty_like(x_MD)
        dz_MD = None if z_MD is None else torch.empty_like(z_MD)
        programs = _num_programs(x_MD.device, M)
        dw_partial_PD = torch.zeros(programs, D, device=x_MD.device, dtype=torch.float32)
        block, num_warps = _launch_config(group_size)
        if M > 0:
            _rms_norm_bwd_kernel[(programs, D // group_size)](
                x_MD, x_MD if z_MD is None else z_MD, weight, dy_MD, dx_MD, dx_MD if dz_MD is None else dz_MD,
                dw_partial_PD, x_MD.stride(0), 0 if z_MD is None else z_MD.stride(0), dy_MD.stride(0),
                dx_MD.stride(0), 0 if dz_MD is None else dz_MD.stride(0),
                M, D, group_size, eps, triton.cdiv(M, programs),
                BLOCK=block, HAS_GATE=z_MD is not None, NORM_BEFORE_GATE=norm_before_gate, num_warps=num_warps,
            )
        dw = dw_partial_PD.sum(0).to(weight.dtype)
        dz = None if dz_MD is None else dz_MD.view(shape)
        return dx_MD.view(shape), dz, dw, None, None, None


def rms_norm_triton(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    """`braid.kernels.norm.rms_norm` as one Triton kernel each way (inputs validated)."""
    return _RMSNormFunction.apply(x, None, weight, eps, x.shape[-1], False)


def gated_rms_norm_triton(
    x: Tensor, gate: Tensor, weight: Tensor, eps: float, group_size: int, norm_before_gate: bool = False
) -> Tensor:
    """`braid.kernels.norm.gated_rms_norm` as one Triton kernel each way (inputs validated)."""
    return _RMSNormFunction.apply(x, gate, weight, eps, group_size, norm_before_gate)
