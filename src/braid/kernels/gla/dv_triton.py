"""GLA's value gradient dv as a braid Triton kernel: a drop-in for fla's `chunk_gla_bwd_dv` (same
inputs, output and layouts; dh in fla's default [K, V] layout).

Per chunk of BT steps, with A the forward's in-chunk scores (float32, zero above the diagonal),
g the in-chunk cumulative log2 gate, g_n its value at the chunk's last step and dh the gradient
of the state after the chunk (fla's `chunk_bwd_dh`, one per chunk):

    dv_t = sum_{s >= t} A[s, t] do_s  +  sum_k (k_tk 2^(g_nk - g_tk)) dh[k, :]

fla runs the first term as a float32 dot with TF32 off: on Hopper that is CUDA-core FMA work,
about 2 GFLOP a layer at hybrid-374m's shape (B2 T8192 H8 V128, chunk 64). Here it is a 3xTF32
dot, tensor-core work within float32's rounding; do is bf16, which TF32 holds exactly. The
second term is fla's: the decayed keys and dh rounded to k's dtype, a bf16 dot with float32 sums.

The default inside fla's GLA backward (`BRAID_KERNELS=gla_dv=reference` gives fla's). On an
H200 at that shape: 0.101 ms against fla's 0.138 ms (bench/kernels.py --only gla_dv --graph),
and the GLA layer 1.890 -> 1.853 ms fwd+bwd (bench/blocks.py --only mixer:gla --against
auto,gla_dv=triton --rounds 9; docs/benchmarks.md, sixteenth measurement). Runs on CPU
tensors under TRITON_INTERPRET=1 (the CI parity test), where the bf16 dot takes float32 tiles
(braid.kernels.interpreter).

Legend: B batch, T time, H heads, K key head dim, V value head dim, C chunk length; in the
kernel BT the chunk, BK and BV the channel blocks, NV value blocks, NT chunks.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from braid.kernels.gla.chunks_triton import chunk_count, chunk_in_sequence, chunk_slot
from braid.kernels.interpreter import interpreted

# The first guess, which passed the GPU tests and is the one measured (0.101 ms). A sweep on an
# H200 (Triton 3.6; .calls/gla_dv_sweep.py, sixteenth measurement) reached only BV 32: 125 us at
# 2 warps, and at 4 warps (stages 1 and 2) an illegal memory access, every time, though every
# load and store is masked: the symptom of triton-lang/triton#11366 and #10573 (sm90 kernels
# with several dots, 32-wide blocks and 4 warps, Triton 3.6 and later). Keep to configs that
# have passed tests/gpu's gla_dv cases.
BK, BV = 64, 64
NUM_WARPS, NUM_STAGES = 4, 2


@triton.jit(do_not_specialize=["T"])
def _gla_bwd_dv_kernel(
    k, g, A, do, dh, dv, cu_seqlens, chunk_indices, T,
    H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
    NV: tl.constexpr, IS_VARLEN: tl.constexpr, EXACT_F32: tl.constexpr,
):
    """dv for one chunk's BT rows, one head and BV value channels (see the module docstring);
    EXACT_F32 (the interpreter only) dots the key-side tiles as float32."""
    i_c, i_v = tl.program_id(0) // NV, tl.program_id(0) % NV
    i_bh = tl.program_id(1)
    i_b, i_h = i_bh // H, i_bh % H
    i_tg = chunk_slot(i_c, i_b, T, BT, IS_VARLEN)  # dh's chunk
    i_t, bos, T = chunk_in_sequence(cu_seqlens, chunk_indices, i_c, i_b, T, IS_VARLEN)
    o_i = tl.arange(0, BT)
    o_t = i_t * BT + o_i
    m_t = o_t < T
    o_v = i_v * BV + tl.arange(0, BV)
    m_v = o_v < V
    m_tv = m_t[:, None] & m_v[None, :]
    # the in-chunk term: A transposed, b_At[i, t] = A[t, i] for i <= t
    p_At = A + ((bos + o_t[None, :]) * H + i_h) * BT + o_i[:, None]
    b_At = tl.load(p_At, mask=m_t[None, :] & (o_i[:, None] <= o_i[None, :]), other=0.0)
    b_do = tl.load(do + ((bos + o_t[:, None]) * H + i_h) * V + o_v[None, :], mask=m_tv, other=0.0)
    b_dv = tl.dot(b_At, b_do.to(tl.float32), input_precision="tf32x3")
    # the term through the chunk's state gradient
    last = tl.minimum(i_t * BT + BT, T) - 1
    for i_k in range(0, tl.cdiv(K, BK)):
        o_k = i_k * BK + tl.arange(0, BK)
        m_k = o_k < K
        m_tk = m_t[:, None] & m_k[None, :]
        p_tk = ((bos + o_t[:, None]) * H + i_h) * K + o_k[None, :]
        b_k = tl.load(k + p_tk, mask=m_tk, other=0.0)
        b_g = tl.load(g + p_tk, mask=m_tk, other=0.0)
        b_gn = tl.load(g + ((bos + last) * H + i_h) * K + o_k, mask=m_k, other=0.0)
        b_kg = tl.where(m_tk, b_k * tl.exp2(b_gn[None, :] - b_g), 0.0).to(b_k.dtype)  # fla's rounding
        b_dh = tl.load(dh + ((i_tg * H + i_h) * K + o_k[:, None]) * V + o_v[None, :],
                       mask=m_k[:, None] & m_v[None, :], other=0.0).to(b_k.dtype)
        if EXACT_F32:
            b_dv = tl.dot(b_kg.to(tl.float32), b_dh.to(tl.float32), b_dv, input_precision="ieee")
        else:
            b_dv = tl.dot(b_kg, b_dh, b_dv)
    tl.store(dv + ((bos + o_t[:, None]) * H + i_h) * V + o_v[None, :], b_dv.to(dv.dtype.element_ty), mask=m_tv)


def gla_bwd_dv(
    k_BTHK: Tensor,
    g_BTHK: Tensor,
    A_BTHC: Tensor,
    do_BTHV: Tensor,
    dh_BNHKV: Tensor,
    cu_seqlens: Tensor | None = None,
    chunk_size: int = 64,
    chunk_indices: Tensor | None = None,
    num_warps: int = NUM_WARPS,
    num_stages: int = NUM_STAGES,
) -> Tensor:
    """dv (B, T, H, V) in do's dtype, as fla's `chunk_gla_bwd_dv(k, g, A, do, dh, cu_seqlens=...,
    chunk_size=..., chunk_indices=...)`. g: float32, the in-chunk cumulative log2 gate; A: float32
    (B, T, H, chunk_size); dh: (B, chunks per row, H, K, V), or (1, all chunks, H, K, V) packed;
    with cu_seqlens, B is 1 and chunk_indices holds (sequence, chunk) pairs (fla's
    prepare_chunk_indices)."""
    B, T, H, K = k_BTHK.shape
    V = do_BTHV.shape[-1]
    if A_BTHC.shape[-1] != chunk_size:
        raise ValueError(f"gla_bwd_dv: A's last dim {A_BTHC.shape[-1]} is not the chunk size {chunk_size}")
    NT = chunk_count(T, chunk_size, cu_seqlens, chunk_indices, "gla_bwd_dv")
    NV = triton.cdiv(V, BV)
    k_BTHK, g_BTHK, A_BTHC, do_BTHV, dh_BNHKV = (t.contiguous() for t in (k_BTHK, g_BTHK, A_BTHC, do_BTHV, dh_BNHKV))
    dv_BTHV = torch.empty(do_BTHV.shape, device=do_BTHV.device, dtype=do_BTHV.dtype)
    _gla_bwd_dv_kernel[(NT * NV, B * H)](
        k_BTHK, g_BTHK, A_BTHC, do_BTHV, dh_BNHKV, dv_BTHV, cu_seqlens, chunk_indices, T,
        H=H, K=K, V=V, BT=chunk_size, BK=min(BK, triton.next_power_of_2(K)), BV=BV, NV=NV,
        IS_VARLEN=cu_seqlens is not None, EXACT_F32=interpreted(), num_warps=num_warps, num_stages=num_stages,
    )
    return dv_BTHV
