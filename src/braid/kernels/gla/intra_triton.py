"""GLA's in-chunk attention scores A (forward) and dq and dk (their backward) as braid's Triton
kernels, drop-ins for fla's `chunk_gla_fwd_intra_gk` and `chunk_gla_bwd_dqk_intra` (same
inputs, outputs and layouts; A is also written as zeros above the diagonal).

With g the in-chunk cumulative log2 gate (float32) and dA the gradient of the in-chunk
attention scores (float32, zero above the diagonal, the scale folded in), per chunk of BT steps:

    dq_i = sum_{j <= i} dA[i, j] * k_j * 2^(g_i - g_j)
    dk_j = sum_{i >= j} dA[i, j] * q_i * 2^(g_i - g_j)          (per channel)

The forward's scores are A[i, j] = scale * sum_k q_ik k_jk 2^(g_ik - g_jk) for j <= i.

A program takes BC rows (a sub-chunk) of one chunk, head and block of BK channels. Terms from
other sub-chunks are dots after a split of the decay at the sub-chunk's edge row n, as fla
does: 2^(g_i - g_j) = 2^(g_i - g_n) * 2^(g_n - g_j), both factors at most 1 there. fla takes
the sub-chunk's own (diagonal) block one row at a time, BC element-wise passes with an exp2
each; here it is one more dot on the same split, where one factor grows up to 2^R and the
other shrinks as far, R the largest |g - g_n| over the block's valid rows. With R <= MAX_SPLIT
(64, far from float32's range) the split is exact up to rounding; a block with a steeper gate
(a decay below 2^-4 per step across all 16 steps) takes fla's row-by-row pass instead.
The dots run in 3xTF32 (about float32's precision; fla's own dots between sub-chunks run in
TF32). Runs on CPU tensors under TRITON_INTERPRET=1 (the CI parity test).

Legend: B batch, T time, H heads, K key head dim, C chunk length; in the kernels BT the chunk,
BC the sub-chunk, BK the channel block, NC sub-chunks per chunk, NK channel blocks, NT chunks.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from braid.kernels.gla.chunks_triton import chunk_count, chunk_in_sequence

MAX_SPLIT = 64.0  # the largest |g - g_n| (log2) for which a diagonal block is taken as one dot
# The fastest of warps {2, 4, 8} x stages {1, 2, 3} on an H200 at hybrid-374m's shape (B2 T8192
# H8 K64, chunk 64; CUDA-graph replay), for the backward: 118.5 us (4 warps, 2 stages: 139.2),
# fla's 261.9 us. The forward at the same setting: 94.0 us (93.2 at 1 or 2 stages), fla's 112.0.
NUM_WARPS, NUM_STAGES = 2, 3


@triton.jit
def _row_pass_dq(k, g, dA, b_g, o_c, m_k, row0, n_rows, i_h, i_a, H: tl.constexpr, K: tl.constexpr,
                 BT: tl.constexpr, BC: tl.constexpr, BK: tl.constexpr):
    """The diagonal block's dq terms one source row at a time (fla's exact pass)."""
    o_i = tl.arange(0, BC)
    m_a = o_c < row0 + n_rows
    acc = tl.zeros([BC, BK], dtype=tl.float32)
    for j in range(0, n_rows):
        b_dA = tl.load(dA + (o_c * H + i_h) * BT + i_a + j, mask=m_a, other=0.0)
        b_kj = tl.load(k + ((row0 + j) * H + i_h) * K, mask=m_k, other=0.0).to(tl.float32)
        b_gj = tl.load(g + ((row0 + j) * H + i_h) * K, mask=m_k, other=0.0)
        acc += tl.where(o_i[:, None] >= j, b_dA[:, None] * b_kj[None, :] * tl.exp2(b_g - b_gj[None, :]), 0.0)
    return acc


@triton.jit
def _row_pass_dk(q, g, dA, b_g, m_k, row0, n_rows, i_h, i_a, H: tl.constexpr, K: tl.constexpr,
                 BT: tl.constexpr, BC: tl.constexpr, BK: tl.constexpr):
    """The diagonal block's dk terms one target row at a time (fla's exact pass)."""
    o_i = tl.arange(0, BC)
    acc = tl.zeros([BC, BK], dtype=tl.float32)
    for j in range(0, n_rows):
        b_dA = tl.load(dA + ((row0 + j) * H + i_h) * BT + i_a + o_i, mask=o_i < n_rows, other=0.0)
        b_qj = tl.load(q + ((row0 + j) * H + i_h) * K, mask=m_k, other=0.0).to(tl.float32)
        b_gj = tl.load(g + ((row0 + j) * H + i_h) * K, mask=m_k, other=0.0)
        acc += tl.where(o_i[:, None] <= j, b_dA[:, None] * b_qj[None, :] * tl.exp2(b_gj[None, :] - b_g), 0.0)
    return acc


@triton.jit(do_not_specialize=["T"])
def _gla_bwd_intra_kernel(
    q, k, g, dA, dq, dk, cu_seqlens, chunk_indices, T,
    H: tl.constexpr, K: tl.constexpr, BT: tl.constexpr, BC: tl.constexpr, BK: tl.constexpr, NC: tl.constexpr,
    NK: tl.constexpr, IS_VARLEN: tl.constexpr, MAX_R: tl.constexpr,
):
    i_t, i_kc = tl.program_id(0) // (NK * NC), tl.program_id(0) % (NK * NC)
    i_bh = tl.program_id(1)
    i_b, i_h = i_bh // H, i_bh % H
    i_k, i_i = i_kc // NC, i_kc % NC
    i_t, bos, T = chunk_in_sequence(cu_seqlens, chunk_indices, i_t, i_b, T, IS_VARLEN)
    row0 = i_t * BT + i_i * BC  # this sub-chunk's first row in the sequence
    if row0 >= T:
        return
    n_rows = tl.minimum(BC, T - row0)
    n_sub = tl.minimum(NC, tl.cdiv(T - i_t * BT, BC))  # sub-chunks of this chunk inside the sequence
    # every pointer from here on is relative to the sequence's first row and this block's channels
    o_k = i_k * BK + tl.arange(0, BK)
    m_k = o_k < K
    q += bos * H * K + o_k
    k += bos * H * K + o_k
    g += bos * H * K + o_k
    dq += bos * H * K + o_k
    dk += bos * H * K + o_k
    dA += bos * H * BT

    o_i = tl.arange(0, BC)
    o_c = row0 + o_i
    m_c = o_c < T
    m_ck = m_c[:, None] & m_k[None, :]
    p_rows = (o_c[:, None] * H + i_h) * K
    b_g = tl.load(g + p_rows, mask=m_ck, other=0.0)
    # the diagonal block of dA: rows o_c, columns of this sub-chunk, lower triangle
    m_tri = m_c[:, None] & (o_i[:, None] >= o_i[None, :])
    b_dA_diag = tl.load(dA + (o_c[:, None] * H + i_h) * BT + i_i * BC + o_i[None, :], mask=m_tri, other=0.0)

    # dq: the split at the sub-chunk's first row
    b_gn = tl.load(g + (row0 * H + i_h) * K, mask=m_k, other=0.0)
    b_dq = tl.zeros([BC, BK], dtype=tl.float32)
    for i_j in range(0, i_i):
        o_j = i_t * BT + i_j * BC + o_i
        p_j = (o_j[:, None] * H + i_h) * K
        b_kj = tl.load(k + p_j, mask=m_k[None, :], other=0.0).to(tl.float32)
        b_gj = tl.load(g + p_j, mask=m_k[None, :], other=0.0)
        b_dAj = tl.load(dA + (o_c[:, None] * H + i_h) * BT + i_j * BC + o_i[None, :], mask=m_c[:, None], other=0.0)
        b_dq = tl.dot(b_dAj, b_kj * tl.exp2(b_gn[None, :] - b_gj), b_dq, input_precision="tf32x3")
    d_first = tl.where(m_ck, b_g - b_gn[None, :], 0.0)
    if tl.max(tl.max(tl.abs(d_first), axis=1), axis=0) <= MAX_R:
        b_k = tl.load(k + p_rows, mask=m_ck, other=0.0).to(tl.float32)
        b_kg = tl.where(m_ck, b_k * tl.exp2(-d_first), 0.0)
        b_dq = tl.dot(b_dA_diag, b_kg, b_dq, input_precision="tf32x3") * tl.exp2(d_first)
    else:
        b_dq = b_dq * tl.exp2(d_first) + _row_pass_dq(k, g, dA, b_g, o_c, m_k, row0, n_rows, i_h, i_i * BC,
                                                     H, K, BT, BC, BK)
    tl.store(dq + p_rows, b_dq.to(dq.dtype.element_ty), mask=m_ck)

    # dk: the split at the sub-chunk's last row
    b_gn = tl.load(g + ((row0 + n_rows - 1) * H + i_h) * K, mask=m_k, other=0.0)
    b_dk = tl.zeros([BC, BK], dtype=tl.float32)
    for i_j in range(i_i + 1, n_sub):
        o_j = i_t * BT + i_j * BC + o_i
        m_j = o_j < T
        m_jk = m_j[:, None] & m_k[None, :]
        p_j = (o_j[:, None] * H + i_h) * K
        b_qj = tl.load(q + p_j, mask=m_jk, other=0.0).to(tl.float32)
        b_gj = tl.load(g + p_j, mask=m_jk, other=0.0)
        b_qg = tl.where(m_jk, b_qj * tl.exp2(b_gj - b_gn[None, :]), 0.0)
        # dA[j, i] for this sub-chunk's rows i (as rows) and the later sub-chunk's rows j
        b_dAj = tl.load(dA + (o_j[None, :] * H + i_h) * BT + i_i * BC + o_i[:, None], mask=m_j[None, :], other=0.0)
        b_dk = tl.dot(b_dAj, b_qg, b_dk, input_precision="tf32x3")
    d_last = tl.where(m_ck, b_gn[None, :] - b_g, 0.0)
    if tl.max(tl.max(tl.abs(d_last), axis=1), axis=0) <= MAX_R:
        b_q = tl.load(q + p_rows, mask=m_ck, other=0.0).to(tl.float32)
        b_qg = tl.where(m_ck, b_q * tl.exp2(-d_last), 0.0)
        b_dk = tl.dot(tl.trans(b_dA_diag), b_qg, b_dk, input_precision="tf32x3") * tl.exp2(d_last)
    else:
        b_dk = b_dk * tl.exp2(d_last) + _row_pass_dk(q, g, dA, b_g, m_k, row0, n_rows, i_h, i_i * BC,
                                                    H, K, BT, BC, BK)
    tl.store(dk + p_rows, b_dk.to(dk.dtype.element_ty), mask=m_ck)


@triton.jit(do_not_specialize=["T"])
def _gla_fwd_intra_kernel(
    q, k, g, A, cu_seqlens, chunk_indices, scale, T,
    H: tl.constexpr, K: tl.constexpr, BT: tl.constexpr, BC: tl.constexpr, BK: tl.constexpr, NC: tl.constexpr,
    IS_VARLEN: tl.constexpr, MAX_R: tl.constexpr,
):
    """A[i, j] = scale * sum_k q_ik k_jk 2^(g_ik - g_jk) for j <= i in the chunk (0 above), for
    one sub-chunk's BC rows i and the chunk's BT columns j."""
    i_t, i_i = tl.program_id(0) // NC, tl.program_id(0) % NC
    i_bh = tl.program_id(1)
    i_b, i_h = i_bh // H, i_bh % H
    i_t, bos, T = chunk_in_sequence(cu_seqlens, chunk_indices, i_t, i_b, T, IS_VARLEN)
    row0 = i_t * BT + i_i * BC
    if row0 >= T:
        return
    n_rows = tl.minimum(BC, T - row0)
    q += bos * H * K
    k += bos * H * K
    g += bos * H * K
    A += bos * H * BT
    o_i = tl.arange(0, BC)
    o_c = row0 + o_i
    m_c = o_c < T
    p_A = A + (o_c[:, None] * H + i_h) * BT
    for i_j in range(0, NC):  # the sub-chunks after this one: zeros
        if i_j > i_i:
            tl.store(p_A + i_j * BC + o_i[None, :], tl.zeros([BC, BC], dtype=tl.float32), mask=m_c[:, None])
    for i_j in range(0, i_i + 1):
        o_j = i_t * BT + i_j * BC + o_i
        b_A = tl.zeros([BC, BC], dtype=tl.float32)
        for i_k in range(0, tl.cdiv(K, BK)):
            o_k = i_k * BK + tl.arange(0, BK)
            m_k = o_k < K
            m_ck = m_c[:, None] & m_k[None, :]
            p_rows = (o_c[:, None] * H + i_h) * K + o_k[None, :]
            b_q = tl.load(q + p_rows, mask=m_ck, other=0.0).to(tl.float32)
            b_g = tl.load(g + p_rows, mask=m_ck, other=0.0)
            b_gn = tl.load(g + (row0 * H + i_h) * K + o_k, mask=m_k, other=0.0)
            d_first = tl.where(m_ck, b_g - b_gn[None, :], 0.0)
            p_cols = (o_j[:, None] * H + i_h) * K + o_k[None, :]
            m_jk = (o_j < T)[:, None] & m_k[None, :]
            if i_j < i_i:  # both factors at most 1
                b_kj = tl.load(k + p_cols, mask=m_jk, other=0.0).to(tl.float32)
                b_gj = tl.load(g + p_cols, mask=m_jk, other=0.0)
                b_kg = tl.where(m_jk, b_kj * tl.exp2(b_gn[None, :] - b_gj), 0.0)
                b_A = tl.dot(b_q * tl.exp2(d_first), tl.trans(b_kg), b_A, input_precision="tf32x3")
            elif tl.max(tl.max(tl.abs(d_first), axis=1), axis=0) <= MAX_R:
                b_k = tl.load(k + p_rows, mask=m_ck, other=0.0).to(tl.float32)
                b_kg = tl.where(m_ck, b_k * tl.exp2(-d_first), 0.0)
                b_A = tl.dot(b_q * tl.exp2(d_first), tl.trans(b_kg), b_A, input_precision="tf32x3")
            else:  # fla's way: one column at a time
                for j in range(0, n_rows):
                    b_kj = tl.load(k + ((row0 + j) * H + i_h) * K + o_k, mask=m_k, other=0.0).to(tl.float32)
                    b_gj = tl.load(g + ((row0 + j) * H + i_h) * K + o_k, mask=m_k, other=0.0)
                    col = tl.sum(tl.where(m_ck, b_q * b_kj[None, :] * tl.exp2(b_g - b_gj[None, :]), 0.0), axis=1)
                    b_A += tl.where(o_i[None, :] == j, col[:, None], 0.0)
        if i_j == i_i:
            b_A = tl.where(o_i[:, None] >= o_i[None, :], b_A, 0.0)
        tl.store(p_A + i_j * BC + o_i[None, :], b_A * scale, mask=m_c[:, None])


def _tiles(q_BTHK: Tensor, chunk_size: int, cu_seqlens: Tensor | None, chunk_indices: Tensor | None, caller: str):
    """(B, T, H, K, BT, BC, BK, NT, NC): the shape and the kernels' tile sizes, fla's choices."""
    B, T, H, K = q_BTHK.shape
    BT, BC = chunk_size, min(16, chunk_size)
    NT = chunk_count(T, BT, cu_seqlens, chunk_indices, caller)
    return B, T, H, K, BT, BC, min(64, triton.next_power_of_2(K)), NT, triton.cdiv(BT, BC)


def gla_fwd_intra(
    q_BTHK: Tensor,
    k_BTHK: Tensor,
    g_BTHK: Tensor,
    scale: float,
    cu_seqlens: Tensor | None = None,
    chunk_size: int = 64,
    chunk_indices: Tensor | None = None,
    max_split: float = MAX_SPLIT,
    num_warps: int = NUM_WARPS,
    num_stages: int = NUM_STAGES,
) -> Tensor:
    """The in-chunk attention scores A (B, T, H, chunk_size) float32, zero above the diagonal, as
    fla's `chunk_gla_fwd_intra_gk(q, k, g, scale, cu_seqlens, chunk_size, chunk_indices)` (which
    leaves the blocks above the diagonal's sub-chunks unwritten); inputs as `gla_bwd_intra`'s."""
    B, T, H, K, BT, BC, BK, NT, NC = _tiles(q_BTHK, chunk_size, cu_seqlens, chunk_indices, "gla_fwd_intra")
    A_BTHC = torch.empty(B, T, H, BT, device=q_BTHK.device, dtype=torch.float32)
    _gla_fwd_intra_kernel[(NT * NC, B * H)](
        q_BTHK, k_BTHK, g_BTHK, A_BTHC, cu_seqlens, chunk_indices, scale, T,
        H=H, K=K, BT=BT, BC=BC, BK=BK, NC=NC, IS_VARLEN=cu_seqlens is not None, MAX_R=max_split,
        num_warps=num_warps, num_stages=num_stages,
    )
    return A_BTHC


def gla_bwd_intra(
    q_BTHK: Tensor,
    k_BTHK: Tensor,
    g_BTHK: Tensor,
    dA_BTHC: Tensor,
    cu_seqlens: Tensor | None = None,
    chunk_size: int = 64,
    chunk_indices: Tensor | None = None,
    max_split: float = MAX_SPLIT,
    num_warps: int = NUM_WARPS,
    num_stages: int = NUM_STAGES,
) -> tuple[Tensor, Tensor]:
    """(dq, dk) (B, T, H, K) in float32, as fla's `chunk_gla_bwd_dqk_intra(q, k, g, dA, cu_seqlens,
    chunk_size, chunk_indices)`. q, k in any float dtype; g float32, the in-chunk cumulative
    log2 gate; dA float32, C = chunk_size; with cu_seqlens, B is 1 and chunk_indices holds
    (sequence, chunk) pairs (fla's prepare_chunk_indices). A negative `max_split` takes every
    diagonal block row by row (fla's way), for tests."""
    B, T, H, K, BT, BC, BK, NT, NC = _tiles(q_BTHK, chunk_size, cu_seqlens, chunk_indices, "gla_bwd_intra")
    NK = triton.cdiv(K, BK)
    dq_BTHK = torch.empty(q_BTHK.shape, device=q_BTHK.device, dtype=torch.float32)
    dk_BTHK = torch.empty(k_BTHK.shape, device=k_BTHK.device, dtype=torch.float32)
    _gla_bwd_intra_kernel[(NT * NK * NC, B * H)](
        q_BTHK, k_BTHK, g_BTHK, dA_BTHC, dq_BTHK, dk_BTHK, cu_seqlens, chunk_indices, T,
        H=H, K=K, BT=BT, BC=BC, BK=BK, NC=NC, NK=NK, IS_VARLEN=cu_seqlens is not None, MAX_R=max_split,
        num_warps=num_warps, num_stages=num_stages,
    )
    return dq_BTHK, dk_BTHK
