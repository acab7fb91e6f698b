"""Mamba-2's pass over the chunks (SSD's state passing, forward and backward) as braid Triton
kernels: a drop-in for mamba_ssm's `_state_passing_fwd` and `_state_passing_bwd` as braid's
SSD calls them (braid.kernels.ssd.mamba_ssm: float32 chunk states, documents as seq_idx).

    forward:   before_0 = initial,   before_(c+1) = decay_c * before_c + local_c
    backward:  g_C = dfinal,         g_(c-1) = decay_c * g_c + dbefore_c
               ddA_c = decay_c * sum(before_c * g_c)

before_c is the state entering chunk c, local_c the chunk's own term, decay_c = exp(dA_c) the
decay over chunk c (0 where chunk c's last token is in another document than chunk c-1's last
token, document 0 before the first chunk: mamba_ssm's rule), g_c the gradient of the state
after chunk c and dbefore_c the gradient of before_c from the rest of the SSD.

mamba_ssm runs each direction as one loop over the chunks per (row, head, block of the P x N
state): one load per chunk, each waiting for the last. At hybrid-374m's shape (B2 T8192 H32,
P64 N128, chunk 128: 64 chunks, 134 MB of float32 states) that took 75 us forward and 127 us
backward a layer on an H200 alone (128-180 us in the step, beside the other stream's kernels),
where the bytes would take about 60 and 90 us. Here each loop step takes STEP chunks: one
load of their terms and decays, a scan over them (tl.associative_scan of the composed
updates x -> decay * x + local), one store. The backward scans the updates shifted by one
chunk, so each row comes out as g_c itself (the exclusive scan), which the decay's gradient
needs. The partial sums of ddA are per block of the state,
summed afterwards in a fixed order (deterministic, as mamba_ssm's).

Measured on an H200 (docs/benchmarks.md, fifteenth measurement): alone, backward 110.8 against
127.0 us and forward 74.5 against 75.0 us; the Mamba-2 layer 2.779 -> 2.752 ms. Results differ from
mamba_ssm's by float32 rounding (within 5e-8, the decay gradient 1.6e-7): the scan groups the
products in another order. Runs on CPU tensors under TRITON_INTERPRET=1 (the CI parity test).

Legend: B batch, C chunks, H heads, D state elements per head (P x N), L chunk length, S STEP.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from braid.kernels.linear_recurrence import compose

# State elements per program, chunks per loop step, warps: the fastest backward of blocks {128,
# 256, 512, 1024, 2048} x steps {2, 4, 8} x warps {4, 8, 16} on an H200 at hybrid-374m's shape
# (110.8 against mamba_ssm's 127.0 us; forward 74.5 against 75.0 us; docs/benchmarks.md,
# fifteenth measurement). Smaller blocks ran up to 4x slower.
BLOCK, STEP, NUM_WARPS = 1024, 4, 4


@triton.jit
def _decays(dA, seq_idx, i_b, i_h, c, n_chunks, T, L, stride_ab, stride_ah, stride_ac, stride_sb,
            HAS_SEQ_IDX: tl.constexpr):
    """exp(dA) of the chunks c (S,): 0 where chunk c starts another document (its last token's
    document differs from chunk c-1's last token's, or from 0 for the first chunk), and 1 for
    c outside [0, n_chunks) (an update that changes nothing)."""
    ok = (c >= 0) & (c < n_chunks)
    decay = tl.exp(tl.load(dA + i_b * stride_ab + i_h * stride_ah + c * stride_ac, mask=ok, other=0.0).to(tl.float32))
    if HAS_SEQ_IDX:
        row = seq_idx + i_b * stride_sb
        doc = tl.load(row + tl.minimum((c + 1) * L, T) - 1, mask=ok, other=0)
        doc_before = tl.load(row + c * L - 1, mask=ok & (c > 0), other=0)
        decay = tl.where(ok & (doc != doc_before), 0.0, decay)
    return decay


@triton.jit
def _pass_fwd_kernel(
    states, dA, initial, seq_idx, out, final, D, n_chunks, T, L,
    stride_ab, stride_ah, stride_ac, stride_sb,
    H: tl.constexpr, BLOCK: tl.constexpr, STEP: tl.constexpr, HAS_INITIAL: tl.constexpr, HAS_SEQ_IDX: tl.constexpr,
):
    """before_c into out (B, C, H, D) and the state after the last chunk into final (B, H, D)
    for one row, head and BLOCK state elements; states holds each chunk's own term."""
    i_d, i_b, i_h = tl.program_id(0), tl.program_id(1).to(tl.int64), tl.program_id(2)
    o_d = i_d * BLOCK + tl.arange(0, BLOCK)
    m_d = o_d < D
    o_s = tl.arange(0, STEP)
    carry = tl.zeros([BLOCK], dtype=tl.float32)
    if HAS_INITIAL:
        carry = tl.load(initial + (i_b * H + i_h) * D + o_d, mask=m_d, other=0.0).to(tl.float32)
    tl.store(out + (i_b * n_chunks * H + i_h) * D + o_d, carry, mask=m_d)
    for start in range(0, n_chunks, STEP):
        c = start + o_s
        m_c = c < n_chunks
        p_cd = ((i_b * n_chunks + c)[:, None] * H + i_h) * D + o_d[None, :]
        local = tl.load(states + p_cd, mask=m_c[:, None] & m_d[None, :], other=0.0).to(tl.float32)
        decay = _decays(dA, seq_idx, i_b, i_h, c, n_chunks, T, L, stride_ab, stride_ah, stride_ac, stride_sb,
                        HAS_SEQ_IDX)
        decays, terms = tl.associative_scan((decay[:, None] + tl.zeros_like(local), local), 0, compose)
        after = decays * carry[None, :] + terms  # the state after each chunk: before the next
        tl.store(out + p_cd + H * D, after, mask=(c + 1 < n_chunks)[:, None] & m_d[None, :])
        carry = tl.sum(tl.where((o_s == STEP - 1)[:, None], after, 0.0), axis=0)
    tl.store(final + (i_b * H + i_h) * D + o_d, carry, mask=m_d)


@triton.jit
def _pass_bwd_kernel(
    dbefore, before, dA, dfinal, seq_idx, dstates, ddA_parts, dinitial, before_cast, D, n_chunks, T, L,
    stride_ab, stride_ah, stride_ac, stride_sb,
    H: tl.constexpr, BLOCK: tl.constexpr, STEP: tl.constexpr, HAS_DFINAL: tl.constexpr,
    HAS_DINITIAL: tl.constexpr, HAS_SEQ_IDX: tl.constexpr, CAST: tl.constexpr,
):
    """g_c into dstates (B, C, H, D), this block's part of ddA_c into ddA_parts (B, H, C,
    blocks), the initial state's gradient into dinitial (B, H, D), and before cast to
    before_cast's dtype (with CAST), for one row, head and BLOCK state elements."""
    i_d, i_b, i_h = tl.program_id(0), tl.program_id(1).to(tl.int64), tl.program_id(2)
    o_d = i_d * BLOCK + tl.arange(0, BLOCK)
    m_d = o_d < D
    o_s = tl.arange(0, STEP)
    carry = tl.zeros([BLOCK], dtype=tl.float32)  # g of the chunk before the step's first
    if HAS_DFINAL:
        carry = tl.load(dfinal + (i_b * H + i_h) * D + o_d, mask=m_d, other=0.0).to(tl.float32)
    for start in range(0, n_chunks, STEP):
        c = n_chunks - 1 - (start + o_s)  # the chunks in reverse
        m_c = c >= 0
        p_cd = ((i_b * n_chunks + c)[:, None] * H + i_h) * D + o_d[None, :]
        m_cd = m_c[:, None] & m_d[None, :]
        # row s takes chunk c+1's update (row s-1's), row 0 none: the scan gives each chunk's g;
        # the row past chunk 0 takes chunk 0's, which gives the initial state's gradient
        later = ((o_s > 0) & (c >= -1))[:, None] & m_d[None, :]
        dbefore_later = tl.load(dbefore + p_cd + H * D, mask=later, other=0.0).to(tl.float32)
        decay_later = _decays(dA, seq_idx, i_b, i_h, tl.where(o_s > 0, c + 1, n_chunks), n_chunks, T, L,
                              stride_ab, stride_ah, stride_ac, stride_sb, HAS_SEQ_IDX)
        decays, terms = tl.associative_scan((decay_later[:, None] + tl.zeros_like(dbefore_later), dbefore_later), 0,
                                            compose)
        g = decays * carry[None, :] + terms
        tl.store(dstates + p_cd, g.to(dstates.dtype.element_ty), mask=m_cd)
        state = tl.load(before + p_cd, mask=m_cd, other=0.0).to(tl.float32)
        if CAST:
            tl.store(before_cast + p_cd, state.to(before_cast.dtype.element_ty), mask=m_cd)
        decay = _decays(dA, seq_idx, i_b, i_h, c, n_chunks, T, L, stride_ab, stride_ah, stride_ac, stride_sb,
                        HAS_SEQ_IDX)
        ddA = decay * tl.sum(state * g, axis=1)
        if not HAS_DINITIAL:  # as mamba_ssm: no initial state, no gradient through chunk 0's decay
            ddA = tl.where(c == 0, 0.0, ddA)
        tl.store(ddA_parts + ((i_b * H + i_h) * n_chunks + c) * tl.num_programs(0) + i_d, ddA, mask=m_c)
        # the next step's carry: the last row's update applied to its g (nothing past chunk 0)
        c_last = n_chunks - 1 - (start + STEP - 1)
        is_last = (o_s == STEP - 1)[:, None]
        dbefore_last = tl.load(dbefore + ((i_b * n_chunks + c_last) * H + i_h) * D + o_d, mask=m_d & (c_last >= 0),
                               other=0.0).to(tl.float32)
        decay_last = tl.sum(tl.where(o_s == STEP - 1, decay, 0.0), axis=0)
        carry = decay_last * tl.sum(tl.where(is_last, g, 0.0), axis=0) + dbefore_last
    if HAS_DINITIAL:
        tl.store(dinitial + (i_b * H + i_h) * D + o_d, carry.to(dinitial.dtype.element_ty), mask=m_d)


def _pass_args(dA_BHC: Tensor, seq_idx_BT: Tensor | None) -> tuple:
    """dA's strides and seq_idx's row stride (0 without documents; the kernels read a row's
    positions at unit stride, so the callers pass it contiguous), the kernels' shared arguments."""
    return (*dA_BHC.stride(), 0 if seq_idx_BT is None else seq_idx_BT.stride(0))


def state_pass(
    states_BCHD: Tensor,
    dA_BHC: Tensor,
    initial_BHD: Tensor | None = None,
    seq_idx_BT: Tensor | None = None,
    chunk_size: int | None = None,
) -> tuple[Tensor, Tensor]:
    """(before_BCHD, final_BHD), both float32: the state entering each chunk and the state after
    the last, from each chunk's own term (states, float32) and decay exponent dA (its last
    in-chunk cumulative dA); as mamba_ssm's `_state_passing_fwd(states, dA, initial_states,
    seq_idx, chunk_size)` with float32 states. seq_idx (B, T) needs chunk_size."""
    if seq_idx_BT is not None and chunk_size is None:
        raise ValueError("state_pass: seq_idx needs chunk_size (the chunk length in tokens)")
    B, C, H, D = states_BCHD.shape
    states_BCHD = states_BCHD.contiguous()
    initial_BHD = None if initial_BHD is None else initial_BHD.contiguous()
    seq_idx_BT = None if seq_idx_BT is None else seq_idx_BT.contiguous()
    out = torch.empty(B, C, H, D, device=states_BCHD.device, dtype=torch.float32)
    final = torch.empty(B, H, D, device=states_BCHD.device, dtype=torch.float32)
    T = 0 if seq_idx_BT is None else seq_idx_BT.shape[1]
    _pass_fwd_kernel[(triton.cdiv(D, BLOCK), B, H)](
        states_BCHD, dA_BHC, initial_BHD, seq_idx_BT, out, final, D, C, T, chunk_size or 0,
        *_pass_args(dA_BHC, seq_idx_BT),
        H=H, BLOCK=BLOCK, STEP=STEP, HAS_INITIAL=initial_BHD is not None, HAS_SEQ_IDX=seq_idx_BT is not None,
        num_warps=NUM_WARPS,
    )
    return out, final


def state_pass_backward(
    before_BCHD: Tensor,
    dA_BHC: Tensor,
    dbefore_BCHD: Tensor,
    dfinal_BHD: Tensor | None = None,
    seq_idx_BT: Tensor | None = None,
    want_dinitial: bool = False,
    dstates_dtype: torch.dtype | None = None,
    states_dtype: torch.dtype | None = None,
    chunk_size: int | None = None,
) -> tuple[Tensor, Tensor, Tensor | None, Tensor]:
    """(dstates_BCHD, ddA_BHC, dinitial_BHD or None, before in states_dtype): the gradients of
    `state_pass`' chunk terms (in dstates_dtype, default dbefore's), of dA (float32) and of the
    initial state (dstates' dtype), from the gradients of its outputs (dbefore: float32, each
    chunk's entering state; dfinal); as mamba_ssm's `_state_passing_bwd(states, dA, dout,
    dfinal_states, seq_idx, has_initial_states, dstates_dtype, states_dtype, chunk_size)`."""
    if seq_idx_BT is not None and chunk_size is None:
        raise ValueError("state_pass_backward: seq_idx needs chunk_size (the chunk length in tokens)")
    B, C, H, D = before_BCHD.shape
    before_BCHD, dbefore_BCHD = before_BCHD.contiguous(), dbefore_BCHD.contiguous()
    dfinal_BHD = None if dfinal_BHD is None else dfinal_BHD.contiguous()
    seq_idx_BT = None if seq_idx_BT is None else seq_idx_BT.contiguous()
    device = before_BCHD.device
    dstates = torch.empty(B, C, H, D, device=device, dtype=dstates_dtype or dbefore_BCHD.dtype)
    blocks = triton.cdiv(D, BLOCK)
    ddA_parts = torch.empty(B, H, C, blocks, device=device, dtype=torch.float32)
    dinitial = torch.empty(B, H, D, device=device, dtype=dstates.dtype) if want_dinitial else None
    cast = states_dtype is not None and states_dtype != before_BCHD.dtype
    before_cast = torch.empty(B, C, H, D, device=device, dtype=states_dtype) if cast else None
    T = 0 if seq_idx_BT is None else seq_idx_BT.shape[1]
    _pass_bwd_kernel[(blocks, B, H)](
        dbefore_BCHD, before_BCHD, dA_BHC, dfinal_BHD, seq_idx_BT, dstates, ddA_parts, dinitial, before_cast,
        D, C, T, chunk_size or 0, *_pass_args(dA_BHC, seq_idx_BT),
        H=H, BLOCK=BLOCK, STEP=STEP, HAS_DFINAL=dfinal_BHD is not None, HAS_DINITIAL=want_dinitial,
        HAS_SEQ_IDX=seq_idx_BT is not None, CAST=cast, num_warps=NUM_WARPS,
    )
    return dstates, ddA_parts.sum(-1), dinitial, before_cast if cast else before_BCHD
