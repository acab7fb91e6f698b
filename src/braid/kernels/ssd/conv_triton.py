"""Mamba's depthwise causal conv (+ SiLU) as braid's own Triton kernels, document-aware.

    pre_t = bias + sum_k w[:, k] * x_{t-(K-1)+k},   y_t = silu(pre_t)

A tap reaching before the row or into another document reads zero. One program covers a
(BLOCK_T time steps x BLOCK_C channels) tile of one row, the channels contiguous.
The forward computes pre in float32 and stores y in x's dtype. The backward takes two passes
(no saved activations besides x): the first recomputes pre, stores dpre = dy * silu'(pre) in
x's dtype and writes its tile's partial weight and bias gradients (from dpre in float32) to
its own rows of float32 buffers, summed afterwards (no atomics: deterministic); the second
sums dx_s = sum_j w[:, K-1-j] * dpre_{s+j} over the taps that reach s from later steps of
its own document. (One pass that recomputed pre for each of the K shifts was about 2x
slower on an H200.) The first pass can also walk several tiles of its row per program and
reduce its gradient partials once (`BWD_STEPS`, `_dpre_loop_kernel`): compiled for sm90 by
Triton 3.8 on the CPU, the one-tile kernel at its default 128 x 64 tile with 4 warps spills
(32 registers and a 6.5 KB stack per thread, `cuobjdump --dump-resource-usage`), where the
looped kernel at 16 x 64 with 4 warps takes 128 registers and no stack; it has not been timed
(`bench/conv_sweep.py` sweeps both passes). Sequences only, without conv states (the training
path; the dispatcher sends calls with states elsewhere).

As a torch op pair (`braid::causal_conv1d`, `braid::causal_conv1d_backward`) with fake
kernels, so torch.compile keeps it as one node. The kernels also run on CPU tensors under
TRITON_INTERPRET=1 (the CI parity test). The default conv on CUDA for calls without states
(fla's takes those); `BRAID_KERNELS=conv=fla` picks fla's for all.

Legend: B batch, T time, C channels, K taps.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from braid.kernels.custom_ops import cuda_op, drop_placeholder, optional_fake, optional_grad

# Tile sizes and warps, forward and backward: the fastest of a sweep on an H200 at the
# hybrid's fused x/B/C conv (B2 T8192 C2304, bf16 x; docs/benchmarks.md, sixth measurement).
BLOCK_T, BLOCK_C, NUM_WARPS = 32, 128, 4
BLOCK_T_BWD, BLOCK_C_BWD, NUM_WARPS_BWD = 128, 64, 4
# Tiles the backward's first pass takes per program. 1: one tile, its weight and bias gradient
# partials reduced over the tile's steps at once (the measured default). Above 1: the program
# walks that many tiles of its row in time order, adds the products into registers and reduces
# once (`_dpre_loop_kernel`), so small tiles (more programs resident per SM) no longer pay a
# reduction and a partial row per tile. Not yet timed on a GPU (docs/benchmarks.md, seventeenth
# measurement).
BWD_STEPS = 1
# The second pass's tiles and warps (the same as the first pass's until swept apart).
BLOCK_T_DX, BLOCK_C_DX, NUM_WARPS_DX = BLOCK_T_BWD, BLOCK_C_BWD, NUM_WARPS_BWD


@triton.jit
def _pre_activation(X, W, BIAS, DOC, row_x, row_doc, t, doc_t, cols, col_ok, T, stride_xt, stride_dt,
                    K: tl.constexpr, BT: tl.constexpr, BC: tl.constexpr, HAS_BIAS: tl.constexpr,
                    HAS_DOC: tl.constexpr):
    """pre at times t (BT,) of the row, (BT, BC) float32; doc_t: t's doc ids (with HAS_DOC)."""
    acc = tl.zeros((BT, BC), dtype=tl.float32)
    if HAS_BIAS:
        acc += tl.load(BIAS + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    for k in tl.static_range(K):
        src = t - (K - 1) + k
        ok = (src >= 0) & (src < T)
        if HAS_DOC:
            ok = ok & (tl.load(DOC + row_doc + src * stride_dt, mask=ok, other=-1) == doc_t)
        x = tl.load(X + row_x + src[:, None] * stride_xt + cols[None, :], mask=ok[:, None] & col_ok[None, :],
                    other=0.0).to(tl.float32)
        w = tl.load(W + cols * K + k, mask=col_ok, other=0.0).to(tl.float32)
        acc += x * w[None, :]
    return acc


@triton.jit
def _tile(DOC, T, C, stride_db, stride_dt, BT: tl.constexpr, BC: tl.constexpr, HAS_DOC: tl.constexpr):
    """This program's row b, its BT time steps and BC channels, their in-range masks, and the
    steps' doc ids (the steps themselves without documents, never compared then)."""
    b = tl.program_id(2).to(tl.int64)
    t = tl.program_id(0) * BT + tl.arange(0, BT)
    cols = tl.program_id(1) * BC + tl.arange(0, BC)
    t_ok, col_ok = t < T, cols < C
    doc_t = t
    if HAS_DOC:
        doc_t = tl.load(DOC + b * stride_db + t * stride_dt, mask=t_ok, other=0)
    return b, t, cols, t_ok, col_ok, doc_t


@triton.jit
def _conv_fwd_kernel(X, W, BIAS, DOC, Y, T, C, stride_xb, stride_xt, stride_db, stride_dt,
                     K: tl.constexpr, BT: tl.constexpr, BC: tl.constexpr,
                     HAS_BIAS: tl.constexpr, HAS_DOC: tl.constexpr, SILU: tl.constexpr):
    b, t, cols, t_ok, col_ok, doc_t = _tile(DOC, T, C, stride_db, stride_dt, BT, BC, HAS_DOC)
    pre = _pre_activation(X, W, BIAS, DOC, b * stride_xb, b * stride_db, t, doc_t, cols, col_ok, T, stride_xt,
                          stride_dt, K, BT, BC, HAS_BIAS, HAS_DOC)
    y = pre * tl.sigmoid(pre) if SILU else pre
    tl.store(Y + (b * T + t[:, None]) * C + cols[None, :], y.to(Y.dtype.element_ty),
             mask=t_ok[:, None] & col_ok[None, :])


@triton.jit
def _dpre_kernel(X, W, BIAS, DOC, DY, DPRE, DW_PARTIAL, DB_PARTIAL, T, C, stride_xb, stride_xt, stride_db,
                 stride_dt, stride_yb, stride_yt,
                 K: tl.constexpr, BT: tl.constexpr, BC: tl.constexpr,
                 HAS_BIAS: tl.constexpr, HAS_DOC: tl.constexpr, SILU: tl.constexpr):
    """Backward pass 1: dpre = dy * silu'(pre) of this tile (stored), and the tile's partial
    weight and bias gradients from dpre in float32."""
    b, t, cols, t_ok, col_ok, doc_t = _tile(DOC, T, C, stride_db, stride_dt, BT, BC, HAS_DOC)
    mask = t_ok[:, None] & col_ok[None, :]
    dy = tl.load(DY + b * stride_yb + t[:, None] * stride_yt + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    if SILU:
        pre = _pre_activation(X, W, BIAS, DOC, b * stride_xb, b * stride_db, t, doc_t, cols, col_ok, T, stride_xt,
                              stride_dt, K, BT, BC, HAS_BIAS, HAS_DOC)
        sig = tl.sigmoid(pre)
        dpre = dy * sig * (1.0 + pre * (1.0 - sig))
    else:
        dpre = dy
    tl.store(DPRE + (b * T + t[:, None]) * C + cols[None, :], dpre.to(DPRE.dtype.element_ty), mask=mask)
    program = (b * tl.num_programs(0) + tl.program_id(0)) * C
    if HAS_BIAS:
        tl.store(DB_PARTIAL + program + cols, tl.sum(dpre, axis=0), mask=col_ok)
    for k in tl.static_range(K):
        src = t - (K - 1) + k
        tap_ok = (src >= 0) & t_ok
        if HAS_DOC:
            tap_ok = tap_ok & (tl.load(DOC + b * stride_db + src * stride_dt, mask=tap_ok, other=-1) == doc_t)
        x = tl.load(X + b * stride_xb + src[:, None] * stride_xt + cols[None, :],
                    mask=tap_ok[:, None] & col_ok[None, :], other=0.0).to(tl.float32)
        tl.store(DW_PARTIAL + (program + cols) * K + k, tl.sum(dpre * x, axis=0), mask=col_ok)


@triton.jit
def _dpre_loop_kernel(X, W, BIAS, DOC, DY, DPRE, DW_PARTIAL, DB_PARTIAL, T, C, stride_xb, stride_xt, stride_db,
                      stride_dt, stride_yb, stride_yt,
                      K: tl.constexpr, BT: tl.constexpr, BC: tl.constexpr, STEPS: tl.constexpr,
                      HAS_BIAS: tl.constexpr, HAS_DOC: tl.constexpr, SILU: tl.constexpr):
    """Backward pass 1 over STEPS consecutive tiles of one row: each tile's dpre (stored), and the
    program's partial weight and bias gradients, summed element-wise over its tiles in float32
    registers and reduced over the steps once at the end. Each tap's x tile is loaded once, for
    pre and for the weight gradient."""
    b = tl.program_id(2).to(tl.int64)
    cols = tl.program_id(1) * BC + tl.arange(0, BC)
    col_ok = cols < C
    weights = ()
    for k in tl.static_range(K):
        weights = weights + (tl.load(W + cols * K + k, mask=col_ok, other=0.0).to(tl.float32),)
    bias = tl.zeros((BC,), dtype=tl.float32)
    if HAS_BIAS:
        bias = tl.load(BIAS + cols, mask=col_ok, other=0.0).to(tl.float32)
    dw_acc = (tl.zeros((BT, BC), dtype=tl.float32),) * K
    db_acc = tl.zeros((BT, BC), dtype=tl.float32)
    for step in range(STEPS):
        t = (tl.program_id(0) * STEPS + step) * BT + tl.arange(0, BT)
        t_ok = t < T
        mask = t_ok[:, None] & col_ok[None, :]
        doc_t = t
        if HAS_DOC:
            doc_t = tl.load(DOC + b * stride_db + t * stride_dt, mask=t_ok, other=0)
        dy = tl.load(DY + b * stride_yb + t[:, None] * stride_yt + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        pre = tl.zeros((BT, BC), dtype=tl.float32) + bias[None, :]
        taps = ()
        for k in tl.static_range(K):
            src = t - (K - 1) + k
            ok = (src >= 0) & (src < T)
            if HAS_DOC:
                ok = ok & (tl.load(DOC + b * stride_db + src * stride_dt, mask=ok, other=-1) == doc_t)
            x = tl.load(X + b * stride_xb + src[:, None] * stride_xt + cols[None, :],
                        mask=ok[:, None] & col_ok[None, :], other=0.0).to(tl.float32)
            taps = taps + (x,)
            pre += x * weights[k][None, :]
        if SILU:
            sig = tl.sigmoid(pre)
            dpre = dy * sig * (1.0 + pre * (1.0 - sig))
        else:
            dpre = dy  # rows past T read dy = 0, so they add nothing below
        tl.store(DPRE + (b * T + t[:, None]) * C + cols[None, :], dpre.to(DPRE.dtype.element_ty), mask=mask)
        db_acc += dpre
        summed = ()
        for k in tl.static_range(K):
            summed = summed + (dw_acc[k] + dpre * taps[k],)
        dw_acc = summed
    program = (b * tl.num_programs(0) + tl.program_id(0)) * C
    if HAS_BIAS:
        tl.store(DB_PARTIAL + program + cols, tl.sum(db_acc, axis=0), mask=col_ok)
    for k in tl.static_range(K):
        tl.store(DW_PARTIAL + (program + cols) * K + k, tl.sum(dw_acc[k], axis=0), mask=col_ok)


@triton.jit
def _dx_kernel(DPRE, W, DOC, DX, T, C, stride_db, stride_dt,
               K: tl.constexpr, BT: tl.constexpr, BC: tl.constexpr, HAS_DOC: tl.constexpr):
    """Backward pass 2: dx_s = sum_j w[:, K-1-j] * dpre_{s+j} over the steps of s's document."""
    b, s, cols, s_ok, col_ok, doc_s = _tile(DOC, T, C, stride_db, stride_dt, BT, BC, HAS_DOC)
    dx = tl.zeros((BT, BC), dtype=tl.float32)
    for j in tl.static_range(K):  # output t = s + j reads x_s through tap K-1-j
        t = s + j
        ok = t < T
        if HAS_DOC:
            ok = ok & (tl.load(DOC + b * stride_db + t * stride_dt, mask=ok, other=-1) == doc_s)
        dpre = tl.load(DPRE + (b * T + t[:, None]) * C + cols[None, :], mask=ok[:, None] & col_ok[None, :],
                       other=0.0).to(tl.float32)
        w = tl.load(W + cols * K + (K - 1 - j), mask=col_ok, other=0.0).to(tl.float32)
        dx += dpre * w[None, :]
    tl.store(DX + (b * T + s[:, None]) * C + cols[None, :], dx.to(DX.dtype.element_ty),
             mask=s_ok[:, None] & col_ok[None, :])


def _grid(x_BTC: Tensor, block_t: int, block_c: int) -> tuple[int, int, int]:
    batch, T, C = x_BTC.shape
    return triton.cdiv(T, block_t), triton.cdiv(C, block_c), batch


def _doc_args(doc_ids_BT: Tensor | None, x_BTC: Tensor) -> tuple[Tensor, tuple[int, int]]:
    """The doc ids pointer and strides; without documents any tensor (never read) and zeros."""
    return (x_BTC, (0, 0)) if doc_ids_BT is None else (doc_ids_BT, doc_ids_BT.stride())


def _channels_contiguous(x_BTC: Tensor) -> Tensor:
    return x_BTC if x_BTC.stride(-1) == 1 else x_BTC.contiguous()


def conv_forward(x_BTC: Tensor, weight_CK: Tensor, bias_C: Tensor | None, doc_ids_BT: Tensor | None,
                 silu: bool, block_t: int = BLOCK_T, block_c: int = BLOCK_C, num_warps: int = NUM_WARPS) -> Tensor:
    """y_BTC (x's dtype, contiguous): the kernel's forward."""
    x_BTC = _channels_contiguous(x_BTC)
    weight_CK = weight_CK.contiguous()
    y_BTC = torch.empty(x_BTC.shape, device=x_BTC.device, dtype=x_BTC.dtype)
    doc, doc_strides = _doc_args(doc_ids_BT, x_BTC)
    _conv_fwd_kernel[_grid(x_BTC, block_t, block_c)](
        x_BTC, weight_CK, bias_C if bias_C is not None else weight_CK, doc, y_BTC, x_BTC.shape[1], x_BTC.shape[2],
        x_BTC.stride(0), x_BTC.stride(1), *doc_strides,
        K=weight_CK.shape[1], BT=block_t, BC=block_c, HAS_BIAS=bias_C is not None, HAS_DOC=doc_ids_BT is not None,
        SILU=silu, num_warps=num_warps,
    )
    return y_BTC


def conv_backward(dy_BTC: Tensor, x_BTC: Tensor, weight_CK: Tensor, bias_C: Tensor | None,
                  doc_ids_BT: Tensor | None, silu: bool, block_t: int | None = None, block_c: int | None = None,
                  num_warps: int | None = None, steps: int | None = None,
                  dx_tiles: tuple[int, int, int] | None = None) -> tuple[Tensor, Tensor, Tensor | None]:
    """dx_BTC (x's dtype), dweight_CK and dbias_C (their parameters' dtypes): the kernel's backward.
    The first pass's tiles, warps and tiles per program, and the second pass's (time, channel)
    tile and warps (`dx_tiles`), default to the module's settings."""
    block_t = BLOCK_T_BWD if block_t is None else block_t
    block_c = BLOCK_C_BWD if block_c is None else block_c
    num_warps = NUM_WARPS_BWD if num_warps is None else num_warps
    steps = BWD_STEPS if steps is None else steps
    x_BTC, dy_BTC = _channels_contiguous(x_BTC), _channels_contiguous(dy_BTC)
    weight_CK = weight_CK.contiguous()
    grid = _grid(x_BTC, block_t, block_c)
    batch, T, C = x_BTC.shape
    K = weight_CK.shape[1]
    dpre_grid = (triton.cdiv(grid[0], steps), grid[1], grid[2])
    dpre_BTC = torch.empty(x_BTC.shape, device=x_BTC.device, dtype=x_BTC.dtype)
    dw_PCK = torch.empty(dpre_grid[0] * batch, C, K, device=x_BTC.device, dtype=torch.float32)
    db_PC = torch.empty(dpre_grid[0] * batch, C, device=x_BTC.device, dtype=torch.float32)
    doc, doc_strides = _doc_args(doc_ids_BT, x_BTC)
    blocks = dict(K=K, BT=block_t, BC=block_c, HAS_DOC=doc_ids_BT is not None, num_warps=num_warps)
    dpre_args = (x_BTC, weight_CK, bias_C if bias_C is not None else weight_CK, doc, dy_BTC, dpre_BTC, dw_PCK, db_PC,
                 T, C, x_BTC.stride(0), x_BTC.stride(1), *doc_strides, dy_BTC.stride(0), dy_BTC.stride(1))
    if steps == 1:
        _dpre_kernel[dpre_grid](*dpre_args, HAS_BIAS=bias_C is not None, SILU=silu, **blocks)
    else:
        _dpre_loop_kernel[dpre_grid](*dpre_args, STEPS=steps, HAS_BIAS=bias_C is not None, SILU=silu, **blocks)
    dx_BTC = torch.empty(x_BTC.shape, device=x_BTC.device, dtype=x_BTC.dtype)
    dx_t, dx_c, dx_warps = dx_tiles or (BLOCK_T_DX, BLOCK_C_DX, NUM_WARPS_DX)
    _dx_kernel[_grid(x_BTC, dx_t, dx_c)](dpre_BTC, weight_CK, doc, dx_BTC, T, C, *doc_strides, K=K, BT=dx_t, BC=dx_c,
                                         HAS_DOC=doc_ids_BT is not None, num_warps=dx_warps)
    db_C = None if bias_C is None else db_PC.sum(0).to(bias_C.dtype)
    return dx_BTC, dw_PCK.sum(0).to(weight_CK.dtype), db_C


@cuda_op(
    "causal_conv1d",
    "(Tensor x, Tensor weight, Tensor? bias, Tensor? doc_ids, bool silu) -> Tensor",
)
def _conv(x, weight, bias, doc_ids, silu):
    return conv_forward(x, weight, bias, doc_ids, silu)


@_conv.register_fake
def _(x, weight, bias, doc_ids, silu):
    return x.new_empty(x.shape)


@cuda_op(
    "causal_conv1d_backward",
    "(Tensor dy, Tensor x, Tensor weight, Tensor? bias, Tensor? doc_ids, bool silu) -> (Tensor, Tensor, Tensor)",
)
def _conv_backward(dy, x, weight, bias, doc_ids, silu):
    dx, dw, db = conv_backward(dy, x, weight, bias, doc_ids, silu)
    return dx, dw, optional_grad(db, bias, x)


@_conv_backward.register_fake
def _(dy, x, weight, bias, doc_ids, silu):
    return x.new_empty(x.shape), weight.new_empty(weight.shape), optional_fake(bias, x)


def _setup(ctx, inputs, output):
    x, weight, bias, doc_ids, silu = inputs
    ctx.save_for_backward(x, weight, bias, doc_ids)
    ctx.silu = silu


def _grads(ctx, dy):
    x, weight, bias, doc_ids = ctx.saved_tensors
    dx, dw, db = torch.ops.braid.causal_conv1d_backward(dy, x, weight, bias, doc_ids, ctx.silu)
    return dx, dw, drop_placeholder(db, bias), None, None


_conv.register_autograd(_grads, setup_context=_setup)


def causal_conv1d_triton(x_BTC: Tensor, weight_CK: Tensor, bias_C: Tensor | None = None, *,
                         doc_ids_BT: Tensor | None = None, activation: str | None = "silu") -> Tensor:
    """`braid.kernels.ssd.causal_conv1d` without states (inputs validated by the dispatcher)."""
    return torch.ops.braid.causal_conv1d(x_BTC, weight_CK, bias_C, doc_ids_BT, activation == "silu")
