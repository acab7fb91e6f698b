"""The MoE router's float32 logits as Triton kernels: bf16 tensor-core dots on split operands.

A router has few experts (E <= MAX_EXPERTS here), so logits = x Wᵀ is a skinny product bound by
reading x. cuBLAS runs it as a float32 SIMT GEMM, on an x materialised in float32 (0.099 ms
with the cast from bf16 at B2 T8192, D1024, E8 on an H200). Here each float32 operand is split
into three bf16 parts, v = v₁ + v₂ + v₃ (each the bf16 rounding of what the earlier ones
leave; 24 bits in all, a float32 mantissa): bf16 products are exact in float32 and the dots
accumulate in float32. A bf16 x is exact as it is, so its logits take three dots, x W₁ᵀ + x W₂ᵀ
+ x W₃ᵀ; a float32 (or float16) x is split as well, and the logits take the six part products
above 2**-24 of the whole (`_split_product`). The backward splits dlogits the same way: dW from
three dots against a bf16 x (six against a split one); dx from the six products, or from three
(error ~2**-16) when it is rounded to bf16 anyway.
The tiles are fixed, not autotuned: the order of a sum follows the tiles, so a timing-picked
config could change the logits' last bits (and a top-k tie) from one run to the next.

(Plain multiply-adds, `tl.sum(x[:, None, :] * w[None, :, :], 2)`, took 0.124-0.172 ms: slower
than cuBLAS. Their float32 dx, `sum(dl[:, :, None] * w[None], 1)`, was 8e-4 off, TF32's size of
error: by inference, Triton made that pattern a dot at its default TF32 precision; H200,
2026-11-29.)

As custom ops they are also opaque to autocast. torch.compile traces the backward of an
autocast-disabled linear under the forward's autocast, so in a compiled bf16 step the
reference router's backward GEMMs run in bf16 (seen in the AOT backward graph with torch
2.14.1 on the CPU, and as bf16 GEMM kernels in the H200 step profile of torch 2.11). Here
dlogits, W and x meet at float32 accuracy in the backward too.

Legend: N tokens, D model dim, E experts (EP: E padded to a power of two, at least 16, a dot's
smallest side), P row parts of the backward.
"""

from __future__ import annotations


import torch
import triton
import triton.language as tl
from torch import Tensor

from braid.kernels.custom_ops import cuda_op
from braid.kernels.interpreter import interpreted

MAX_EXPERTS = 64
BLOCK_N = 64  # rows a program (forward) or a step (backward) takes
BLOCK_D = 128  # columns a step (forward) or a program (backward) takes
# Row parts of the backward: enough programs, with the column blocks, to fill the GPU, and few
# enough that the float32 weight-gradient partials (P, EP, D) stay a small read.
TARGET_PARTS = 64


def supports(x_ND: Tensor, weight_ED: Tensor) -> bool:
    """A float16/bfloat16/float32 x and weight, at most MAX_EXPERTS experts."""
    return (
        x_ND.dtype in (torch.float16, torch.bfloat16, torch.float32)
        and weight_ED.dtype in (torch.float16, torch.bfloat16, torch.float32)
        and weight_ED.shape[0] <= MAX_EXPERTS
    )


@triton.jit
def _split3(v):
    """Three bf16 parts of a float32 tile, each the rounding of what the earlier ones leave."""
    hi = v.to(tl.bfloat16)
    rest = v - hi.to(tl.float32)
    mid = rest.to(tl.bfloat16)
    lo = (rest - mid.to(tl.float32)).to(tl.bfloat16)
    return hi, mid, lo


@triton.jit
def _dot(a, b, acc, IEEE_F32: tl.constexpr):
    """acc + a b for bf16 tiles; IEEE_F32 (the interpreter only) takes them as exact float32."""
    if IEEE_F32:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    return tl.dot(a, b, acc)


@triton.jit
def _split_product(a1, a2, a3, b1, b2, b3, acc, IEEE_F32: tl.constexpr):
    """acc + a b for a = a1 + a2 + a3 and b = b1 + b2 + b3 split by _split3: the six part
    products above 2**-24 of the whole, largest first."""
    acc = _dot(a1, b1, acc, IEEE_F32)
    acc = _dot(a1, b2, acc, IEEE_F32)
    acc = _dot(a2, b1, acc, IEEE_F32)
    acc = _dot(a1, b3, acc, IEEE_F32)
    acc = _dot(a3, b1, acc, IEEE_F32)
    return _dot(a2, b2, acc, IEEE_F32)


@triton.jit
def _router_fwd_kernel(X, W, OUT, N, D, E, stride_xn, stride_we, EP: tl.constexpr, BLOCK_N: tl.constexpr,
                       BLOCK_D: tl.constexpr, X_SPLIT: tl.constexpr, IEEE_F32: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    experts = tl.arange(0, EP)
    row_ok, expert_ok = rows < N, experts < E
    acc = tl.zeros((BLOCK_N, EP), dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        cols = d0 + tl.arange(0, BLOCK_D)
        col_ok = cols < D
        x = tl.load(X + rows[:, None] * stride_xn + cols[None, :], mask=row_ok[:, None] & col_ok[None, :], other=0.0)
        w_DE = tl.load(W + experts[None, :] * stride_we + cols[:, None], mask=expert_ok[None, :] & col_ok[:, None],
                       other=0.0).to(tl.float32)
        w1, w2, w3 = _split3(w_DE)
        if X_SPLIT:  # float32 or float16 x: split too
            x1, x2, x3 = _split3(x.to(tl.float32))
            acc = _split_product(x1, x2, x3, w1, w2, w3, acc, IEEE_F32)
        else:  # bf16 x is exact in the dots
            acc = _dot(x, w1, acc, IEEE_F32)
            acc = _dot(x, w2, acc, IEEE_F32)
            acc = _dot(x, w3, acc, IEEE_F32)
    tl.store(OUT + rows[:, None] * E + experts[None, :], acc, mask=row_ok[:, None] & expert_ok[None, :])


@triton.jit
def _router_bwd_kernel(X, W, DL, DX, DW_PART, N, D, E, stride_xn, stride_we, stride_dxn, ROWS_PER_PART,
                       EP: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, X_SPLIT: tl.constexpr,
                       IEEE_F32: tl.constexpr):
    """Program (part p, column block): dx for its rows and columns, and the part's dW columns."""
    part, cols = tl.program_id(0), tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    experts = tl.arange(0, EP)
    col_ok, expert_ok = cols < D, experts < E
    w = tl.load(W + experts[:, None] * stride_we + cols[None, :], mask=expert_ok[:, None] & col_ok[None, :],
                other=0.0).to(tl.float32)
    w1, w2, w3 = _split3(w)
    dw = tl.zeros((EP, BLOCK_D), dtype=tl.float32)
    for n0 in range(part * ROWS_PER_PART, tl.minimum(part * ROWS_PER_PART + ROWS_PER_PART, N), BLOCK_N):
        rows = n0 + tl.arange(0, BLOCK_N)
        row_ok = rows < N
        dl = tl.load(DL + rows[:, None] * E + experts[None, :], mask=row_ok[:, None] & expert_ok[None, :],
                     other=0.0).to(tl.float32)
        x = tl.load(X + rows[:, None] * stride_xn + cols[None, :], mask=row_ok[:, None] & col_ok[None, :], other=0.0)
        dl1, dl2, dl3 = _split3(dl)
        if X_SPLIT:  # float32 or float16 x: dx at float32 accuracy, x split for dW
            dx = _split_product(dl1, dl2, dl3, w1, w2, w3, tl.zeros((BLOCK_N, BLOCK_D), dtype=tl.float32), IEEE_F32)
            x1, x2, x3 = _split3(x.to(tl.float32))
            dw = _split_product(tl.trans(dl1), tl.trans(dl2), tl.trans(dl3), x1, x2, x3, dw, IEEE_F32)
        else:  # bf16 x: dx is rounded to bf16 (three terms, ~2**-16), bf16 x is exact for dW
            dx = _dot(dl1, w1, tl.zeros((BLOCK_N, BLOCK_D), dtype=tl.float32), IEEE_F32)
            dx = _dot(dl1, w2, dx, IEEE_F32)
            dx = _dot(dl2, w1, dx, IEEE_F32)
            dw = _dot(tl.trans(dl1), x, dw, IEEE_F32)
            dw = _dot(tl.trans(dl2), x, dw, IEEE_F32)
            dw = _dot(tl.trans(dl3), x, dw, IEEE_F32)
        tl.store(DX + rows[:, None] * stride_dxn + cols[None, :], dx.to(DX.dtype.element_ty),
                 mask=row_ok[:, None] & col_ok[None, :])
    tl.store(DW_PART + part * EP * D + experts[:, None] * D + cols[None, :], dw,
             mask=expert_ok[:, None] & col_ok[None, :])


def _rows_contiguous(t: Tensor) -> Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


def _padded(num_experts: int) -> int:
    return max(triton.next_power_of_2(num_experts), 16)


def router_forward(x_ND: Tensor, weight_ED: Tensor) -> Tensor:
    """logits_NE = x Wᵀ in float32."""
    x_ND, weight_ED = _rows_contiguous(x_ND), _rows_contiguous(weight_ED)
    (N, D), E = x_ND.shape, weight_ED.shape[0]
    logits_NE = torch.empty((N, E), device=x_ND.device, dtype=torch.float32)
    if N == 0:  # a rank with no tokens
        return logits_NE
    _router_fwd_kernel[(triton.cdiv(N, BLOCK_N),)](
        x_ND, weight_ED, logits_NE, N, D, E, x_ND.stride(0), weight_ED.stride(0),
        EP=_padded(E), BLOCK_N=BLOCK_N, BLOCK_D=BLOCK_D, X_SPLIT=x_ND.dtype != torch.bfloat16,
        IEEE_F32=interpreted(), num_warps=4,
    )
    return logits_NE


def router_backward(dlogits_NE: Tensor, x_ND: Tensor, weight_ED: Tensor) -> tuple[Tensor, Tensor]:
    """(dx_ND in x's dtype, dweight_ED in the weight's dtype), both summed in float32."""
    x_ND, weight_ED = _rows_contiguous(x_ND), _rows_contiguous(weight_ED)
    dlogits_NE = dlogits_NE.float().contiguous()  # float32 already from the forward: no copy
    (N, D), E = x_ND.shape, weight_ED.shape[0]
    EP = _padded(E)
    if N == 0:
        return torch.empty_like(x_ND), torch.zeros_like(weight_ED)
    rows_per_part = triton.cdiv(triton.cdiv(N, TARGET_PARTS), BLOCK_N) * BLOCK_N  # whole steps per part
    parts = triton.cdiv(N, rows_per_part)
    dx_ND = torch.empty((N, D), device=x_ND.device, dtype=x_ND.dtype)
    dw_PED = torch.empty((parts, EP, D), device=x_ND.device, dtype=torch.float32)
    _router_bwd_kernel[(parts, triton.cdiv(D, BLOCK_D))](
        x_ND, weight_ED, dlogits_NE, dx_ND, dw_PED, N, D, E, x_ND.stride(0), weight_ED.stride(0),
        dx_ND.stride(0), rows_per_part, EP=EP, BLOCK_N=BLOCK_N, BLOCK_D=BLOCK_D, X_SPLIT=x_ND.dtype != torch.bfloat16,
        IEEE_F32=interpreted(), num_warps=4,
    )
    return dx_ND, dw_PED[:, :E].sum(0).to(weight_ED.dtype)


@cuda_op("router_logits", "(Tensor x, Tensor weight) -> Tensor")
def _router_logits(x, weight):
    return router_forward(x, weight)


@_router_logits.register_fake
def _(x, weight):
    return x.new_empty((x.shape[0], weight.shape[0]), dtype=torch.float32)


@cuda_op("router_logits_backward", "(Tensor dlogits, Tensor x, Tensor weight) -> (Tensor, Tensor)")
def _router_logits_backward(dlogits, x, weight):
    return router_backward(dlogits, x, weight)


@_router_logits_backward.register_fake
def _(dlogits, x, weight):
    return x.new_empty(x.shape), weight.new_empty(weight.shape)


def _setup(ctx, inputs, output):
    ctx.save_for_backward(*inputs)


def _grads(ctx, dlogits):
    x, weight = ctx.saved_tensors
    return torch.ops.braid.router_logits_backward(dlogits, x, weight)


_router_logits.register_autograd(_grads, setup_context=_setup)


def router_logits_triton(x_ND: Tensor, weight_ED: Tensor) -> Tensor:
    """`braid.kernels.moe.router_logits` on the Triton kernels (inputs validated by the dispatcher)."""
    return torch.ops.braid.router_logits(x_ND, weight_ED)
