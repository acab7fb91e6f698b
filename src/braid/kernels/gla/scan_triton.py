"""GLA's pass over the chunks (the states entering each chunk, and their gradients) as two
braid Triton kernels: a drop-in for fla's `chunk_fwd_h` and `chunk_bwd_dh` with a per-channel
gate (gk) and float32 states, the calls braid's GLA makes.

fla runs the pass as one kernel: a program per (row, head, BK x BV block of the state) walks
all chunks in order, and each step waits for the last. At hybrid-374m's shape (B2 T8192 H8 K64
V128, chunk 64) that is 64 to 128 programs on an H200's 132 SMs, 135-145 us a layer, where
the bytes moved would take about 40 us. Here the pass is split in two:

    local:    S_c = (a_c * 2^w_c)^T b_c          every chunk c at once (dots)
    passing:  state_(c+1) = 2^(gk_last_c) * state_c + S_c      (element-wise, per channel k)

forward: a = k, w = gk_last - gk, b = v, and state_c (stored) is the state entering chunk c;
backward (in reverse): a = q * scale, w = gk, b = do, and state_c is the gradient of the
state entering chunk c. The local terms are written into the output buffer, which the pass
then overwrites in place with the states. The pass takes STEP_PASS chunks per loop step (one
load, a tl.associative_scan of the composed updates, one store): one chunk per step waited
on every load and took 328 us forward on an H200 at the shape above, four take 124 us, level
with fla's 134 us (docs/benchmarks.md, fifteenth measurement). In the GLA layer it measured
1.7% slower than fla's, so the op is opt-in. The products round as fla's (bf16 operands,
float32 sums), but each chunk's dot is summed on its own before it is added to the decayed
state, so results differ from fla's by float32 rounding. Runs on CPU tensors under
TRITON_INTERPRET=1 (the CI parity test).

Legend: B batch, T time, H heads, K key head dim, V value head dim, C chunks (all rows, or
all documents packed), N sequences.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from braid.kernels.gla.chunks_triton import chunk_count, chunk_in_sequence, chunk_slot
from braid.kernels.interpreter import interpreted
from braid.kernels.linear_recurrence import compose

# State elements per program of the pass and chunks per loop step: the fastest of blocks {256,
# 512, 1024} x steps {4, 8, 16} x warps {4, 8} on an H200 at the shape above (fifteenth measurement).
BLOCK_PASS = 256
STEP_PASS = 4
NUM_WARPS_LOCAL, NUM_STAGES_LOCAL = 4, 2
NUM_WARPS_PASS, NUM_STAGES_PASS = 8, 3


@triton.jit(do_not_specialize=["T"])
def _local_states_kernel(
    a, b, gk, out, cu_seqlens, chunk_indices, scale, T,
    H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
    NV: tl.constexpr, IS_VARLEN: tl.constexpr, REVERSE: tl.constexpr, EXACT_F32: tl.constexpr,
):
    """One chunk's term for one head and BK x BV block: out[c] = (a * 2^w)^T b (see above);
    EXACT_F32 (the interpreter only, braid.kernels.interpreter) dots the tiles as float32."""
    i_c, i_bh, i_kv = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    i_b, i_h = i_bh // H, i_bh % H
    i_k, i_v = i_kv // NV, i_kv % NV
    slot = chunk_slot(i_c, i_b, T, BT, IS_VARLEN)
    i_t, bos, T = chunk_in_sequence(cu_seqlens, chunk_indices, i_c, i_b, T, IS_VARLEN)
    o_t = i_t * BT + tl.arange(0, BT)
    m_t = o_t < T
    o_k = i_k * BK + tl.arange(0, BK)
    o_v = i_v * BV + tl.arange(0, BV)
    m_k, m_v = o_k < K, o_v < V
    m_tk = m_t[:, None] & m_k[None, :]
    p_tk = ((bos + o_t[:, None]) * H + i_h) * K + o_k[None, :]
    b_a = tl.load(a + p_tk, mask=m_tk, other=0.0)
    b_g = tl.load(gk + p_tk, mask=m_tk, other=0.0)
    if REVERSE:  # fla's rounding: q * scale, then times the decay, each in q's dtype
        b_a = (b_a * scale).to(b_a.dtype)
        b_a = (b_a * tl.exp2(b_g)).to(b_a.dtype)
    else:
        last = tl.minimum(i_t * BT + BT, T) - 1
        b_last = tl.load(gk + ((bos + last) * H + i_h) * K + o_k, mask=m_k, other=0.0)
        b_a = (b_a * tl.exp2(b_last[None, :] - b_g)).to(b_a.dtype)
    b_b = tl.load(b + ((bos + o_t[:, None]) * H + i_h) * V + o_v[None, :], mask=m_t[:, None] & m_v[None, :],
                  other=0.0)
    if EXACT_F32:
        b_s = tl.dot(tl.trans(b_a).to(tl.float32), b_b.to(b_a.dtype).to(tl.float32), input_precision="ieee")
    else:
        b_s = tl.dot(tl.trans(b_a), b_b.to(b_a.dtype))
    p_out = out + (slot * H + i_h) * K * V + o_k[:, None] * V + o_v[None, :]
    tl.store(p_out, b_s, mask=m_k[:, None] & m_v[None, :])


@triton.jit(do_not_specialize=["T"])
def _pass_kernel(
    states, gk, initial, final, cu_seqlens, chunk_offsets, T,
    H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, BT: tl.constexpr, BLOCK: tl.constexpr,
    STEP: tl.constexpr, IS_VARLEN: tl.constexpr, REVERSE: tl.constexpr, HAS_INITIAL: tl.constexpr,
    HAS_FINAL: tl.constexpr,
):
    """The pass over one sequence's chunks for one head and BLOCK state elements: each slot
    holds the chunk's local term on entry and the state before the chunk on exit. It takes
    STEP chunks at a time: one load of their terms and decays, a scan over them (tl's
    associative_scan of the composed updates), one store; so the loop waits on memory once
    per STEP chunks instead of once per chunk."""
    i_nh, i_e = tl.program_id(0), tl.program_id(1)
    i_n, i_h = i_nh // H, i_nh % H
    if IS_VARLEN:
        bos = tl.load(cu_seqlens + i_n).to(tl.int64)
        T = (tl.load(cu_seqlens + i_n + 1).to(tl.int64) - bos).to(tl.int32)
        first_slot = tl.load(chunk_offsets + i_n).to(tl.int64)
    else:
        bos = i_n.to(tl.int64) * T
        first_slot = i_n.to(tl.int64) * tl.cdiv(T, BT)
    n_chunks = tl.cdiv(T, BT)
    o_e = i_e * BLOCK + tl.arange(0, BLOCK)
    m_e = o_e < K * V
    o_k = o_e // V
    o_s = tl.arange(0, STEP)
    state = tl.zeros([BLOCK], dtype=tl.float32)
    if HAS_INITIAL:
        state = tl.load(initial + i_nh.to(tl.int64) * K * V + o_e, mask=m_e, other=0.0).to(tl.float32)
    for start in range(0, n_chunks, STEP):
        n_s = start + o_s  # the chunks' places in the pass's order
        i_t = n_chunks - 1 - n_s if REVERSE else n_s
        m_se = (n_s < n_chunks)[:, None] & m_e[None, :]
        p_se = states + ((first_slot + i_t)[:, None] * H + i_h) * K * V + o_e[None, :]
        local = tl.load(p_se, mask=m_se, other=0.0)
        last = tl.minimum(i_t * BT + BT, T) - 1
        # past the last chunk: decay 1 and term 0, so the carried state comes out unchanged
        decay = tl.exp2(tl.load(gk + ((bos + last)[:, None] * H + i_h) * K + o_k[None, :], mask=m_se, other=0.0))
        decays, terms = tl.associative_scan((decay, local), 0, compose)
        after = decays * state[None, :] + terms  # the state after each chunk
        # the state before a chunk is the one after the chunk before it: a slot further on
        if REVERSE:
            p_before, first = p_se - H * K * V, n_chunks - 1 - start
        else:
            p_before, first = p_se + H * K * V, start
        tl.store(p_before, after, mask=((o_s < STEP - 1) & (n_s + 1 < n_chunks))[:, None] & m_e[None, :])
        tl.store(states + ((first_slot + first) * H + i_h) * K * V + o_e, state, mask=m_e)
        state = tl.sum(tl.where((o_s == STEP - 1)[:, None], after, 0.0), axis=0)
    if HAS_FINAL:
        tl.store(final + i_nh.to(tl.int64) * K * V + o_e, state, mask=m_e)


def _chunk_offsets(cu_seqlens: Tensor, chunk_size: int) -> Tensor:
    """Each sequence's first chunk in the packed list (fla's prepare_chunk_offsets), (N + 1,)."""
    counts = (cu_seqlens[1:] - cu_seqlens[:-1] + chunk_size - 1) // chunk_size
    return torch.cat([counts.new_zeros(1), counts.cumsum(0)])


def _scan(a, b, gk, initial, want_final, scale, cu_seqlens, chunk_size, chunk_indices, reverse, caller):
    """The local terms, then the pass (module docstring); (states, final or None)."""
    varlen = cu_seqlens is not None
    B, T, H, K = a.shape
    V, BT = b.shape[-1], chunk_size
    BK, BV = min(64, triton.next_power_of_2(K)), min(64, triton.next_power_of_2(V))
    NV = triton.cdiv(V, BV)
    NT = chunk_count(T, BT, cu_seqlens, chunk_indices, caller)  # chunks per row (all, packed)
    N = cu_seqlens.shape[0] - 1 if varlen else B
    states = torch.empty(B, NT, H, K, V, device=a.device, dtype=torch.float32)
    _local_states_kernel[(NT, B * H, triton.cdiv(K, BK) * NV)](
        a, b, gk, states, cu_seqlens, chunk_indices, scale, T,
        H=H, K=K, V=V, BT=BT, BK=BK, BV=BV, NV=NV, IS_VARLEN=varlen, REVERSE=reverse, EXACT_F32=interpreted(),
        num_warps=NUM_WARPS_LOCAL, num_stages=NUM_STAGES_LOCAL,
    )
    final = torch.empty(N, H, K, V, device=a.device, dtype=torch.float32) if want_final else None
    _pass_kernel[(N * H, triton.cdiv(K * V, BLOCK_PASS))](
        states, gk, initial, final, cu_seqlens, _chunk_offsets(cu_seqlens, BT) if varlen else None, T,
        H=H, K=K, V=V, BT=BT, BLOCK=BLOCK_PASS, STEP=STEP_PASS, IS_VARLEN=varlen, REVERSE=reverse,
        HAS_INITIAL=initial is not None, HAS_FINAL=want_final,
        num_warps=NUM_WARPS_PASS, num_stages=NUM_STAGES_PASS,
    )
    return states, final


def gla_states(
    k_BTHK: Tensor,
    v_BTHV: Tensor,
    gk_BTHK: Tensor,
    initial_NHKV: Tensor | None = None,
    output_final_state: bool = False,
    cu_seqlens: Tensor | None = None,
    chunk_size: int = 64,
    chunk_indices: Tensor | None = None,
) -> tuple[Tensor, Tensor | None]:
    """(h, final): the float32 state entering each chunk, (B, C/B, H, K, V) (B = 1 packed), and
    the state after each sequence's last chunk (N, H, K, V) when `output_final_state`; as
    fla's `chunk_fwd_h(k, v, g=None, gk, gv=None, h0, output_final_state, cu_seqlens,
    chunk_size, states_in_fp32=True)`. gk is the in-chunk cumulative log2 gate (float32);
    with cu_seqlens, chunk_indices holds fla's (sequence, chunk) pairs."""
    return _scan(k_BTHK, v_BTHV, gk_BTHK, initial_NHKV, output_final_state, 1.0, cu_seqlens, chunk_size,
                 chunk_indices, reverse=False, caller="gla_states")


def gla_state_grads(
    q_BTHK: Tensor,
    do_BTHV: Tensor,
    gk_BTHK: Tensor,
    scale: float,
    dfinal_NHKV: Tensor | None = None,
    want_dinitial: bool = False,
    cu_seqlens: Tensor | None = None,
    chunk_size: int = 64,
    chunk_indices: Tensor | None = None,
) -> tuple[Tensor, Tensor | None]:
    """(dh, dinitial): the gradient of each chunk's entering state, float32 and shaped as
    `gla_states`' h, and of the initial states (N, H, K, V) when `want_dinitial`; as fla's
    `chunk_bwd_dh(q, k, v, g=None, gk, gv=None, do, h0, dht, scale, cu_seqlens, chunk_size,
    states_in_fp32=True)`."""
    return _scan(q_BTHK, do_BTHV, gk_BTHK, dfinal_NHKV, want_dinitial, scale, cu_seqlens, chunk_size,
                 chunk_indices, reverse=True, caller="gla_state_grads")
