"""Gated linear attention on fla's Triton kernels: chunk_gla (training, prefill) and
fused_recurrent_gla (decode); the mapping onto them is braid.kernels.gla.packed.

chunk_gla's forward and backward (the steps of fla's `chunk_gla_fwd`, keeping what the
backward would recompute, and of `chunk_gla_bwd`, whose in-chunk part runs on a side stream
beside the state-gradient pass: braid.kernels.streams) are custom ops with fake kernels,
`braid::fla_chunk_gla` and its backward: torch.compile keeps them as opaque nodes in one graph.
The two in-chunk steps (the scores A forward, their dq and dk backward) run on braid's kernels
(braid.kernels.gla.intra_triton, op "gla_intra") unless `BRAID_KERNELS=gla_intra=reference`;
so does the value gradient (braid.kernels.gla.dv_triton, op "gla_dv") unless
`BRAID_KERNELS=gla_dv=reference`; the pass over the chunks can run on braid's
(braid.kernels.gla.scan_triton, `gla_scan=triton`, opt-in).

Documents run as fla varlen segments: an initial state applies to each row's first
segment, the final state is read from each row's last one. fla's chunk length is its own
(64). float32 inputs run with TF32 dots on GPUs that have them.

Legend: B batch, T time, H heads, K key head dim, V value head dim.
"""

from __future__ import annotations

import torch
from fla.ops.common.chunk_h import chunk_bwd_dh, chunk_fwd_h
from fla.ops.gla import fused_recurrent_gla
from fla.ops.gla.chunk import (
    chunk_gla_bwd_dA,
    chunk_gla_bwd_dqk_intra,
    chunk_gla_bwd_dqkg,
    chunk_gla_bwd_dv,
    chunk_gla_fwd_intra_gk,
    chunk_gla_fwd_o_gk,
)
from fla.ops.utils import prepare_chunk_indices
from fla.ops.utils.constant import RCP_LN2
from fla.ops.utils.cumsum import chunk_local_cumsum
from torch import Tensor

from braid.kernels.backend import backend_module, pick
from braid.kernels.custom_ops import cuda_op, drop_placeholder, optional_fake, optional_grad
from braid.kernels.gla.packed import gla_step_via_recurrent, gla_via_packed
from braid.kernels.streams import beside, join

# Opaque to torch.compile (a graph break), as braid.kernels.ssd.fla's kernels; decoding only.
fused_recurrent_gla = torch.compiler.disable(fused_recurrent_gla)


def _chunk_length(T: int) -> int:
    """fla's chunk for chunk_gla: the next power of two of T, clamped to [16, 64]."""
    return min(64, max(16, 1 << max(T - 1, 0).bit_length()))


def _chunk_indices(cu_seqlens, cu_seqlens_cpu, chunk_size):
    return None if cu_seqlens is None else prepare_chunk_indices(cu_seqlens, chunk_size, cu_seqlens_cpu=cu_seqlens_cpu)


# chunk_gla's forward and backward as custom ops with fake kernels (fla's kernels, in the order
# its ChunkGLAFunction runs them): an opaque node of one torch.compile graph instead of a graph
# break per GLA layer.
#
# The forward runs chunk_gla_fwd's four steps itself so that it can keep what fla's backward
# would recompute: the gate's in-chunk cumsum (float32, as fla keeps it for float32 gates) and,
# without documents, the chunk states h in float32, as fla's backward recomputes them (its
# forward stores them in q's dtype; its output kernel casts h to q's dtype on load, so the
# output is the same). The backward then skips the cumsum and the state pass (a hybrid-374m
# GLA layer at B2 T8192: 2.21 -> 2.17 ms on an H200, about 100 MB more kept per layer). With
# documents the number of chunks depends on the lengths, so h is recomputed there as fla does.
@cuda_op(
    "fla_chunk_gla",
    "(Tensor q, Tensor k, Tensor v, Tensor g, float scale, Tensor? initial_state, bool output_final_state, "
    "Tensor? cu_seqlens, Tensor? cu_seqlens_cpu) -> (Tensor, Tensor, Tensor, Tensor, Tensor)",
)
def _chunk_gla(q, k, v, g, scale, initial_state, output_final_state, cu_seqlens, cu_seqlens_cpu):
    chunk_size = _chunk_length(q.shape[1])
    q, k, v, g = (t.contiguous() for t in (q, k, v, g))
    chunk_indices = _chunk_indices(cu_seqlens, cu_seqlens_cpu, chunk_size)
    with torch.cuda.device(q.device):
        g_cumsum = chunk_local_cumsum(g, chunk_size, scale=RCP_LN2, cu_seqlens=cu_seqlens)
        h, final = _states(k, v, g_cumsum, initial_state, output_final_state, cu_seqlens, chunk_size, chunk_indices)
        A = _intra_scores(q, k, g_cumsum, scale, cu_seqlens, chunk_size, chunk_indices)
        o = chunk_gla_fwd_o_gk(
            q=q, v=v, g=g_cumsum, A=A, h=h, scale=scale, cu_seqlens=cu_seqlens, chunk_size=chunk_size,
            chunk_indices=chunk_indices,
        )
    final = q.new_empty(0, dtype=torch.float32) if final is None else final.float().contiguous()
    h = h if cu_seqlens is None else q.new_empty(0, dtype=torch.float32)
    return o.to(v.dtype).contiguous(), final, A.contiguous(), g_cumsum, h


@_chunk_gla.register_fake
def _(q, k, v, g, scale, initial_state, output_final_state, cu_seqlens, cu_seqlens_cpu):
    batch, T, H, K = q.shape
    chunk_size = _chunk_length(T)
    f32 = {"dtype": torch.float32}
    final = q.new_empty(0, **f32)
    if output_final_state:
        num_sequences = batch if cu_seqlens is None else cu_seqlens.shape[0] - 1
        final = q.new_empty((num_sequences, H, K, v.shape[-1]), **f32)
    h = q.new_empty(0, **f32)
    if cu_seqlens is None:
        h = q.new_empty((batch, -(-T // chunk_size), H, K, v.shape[-1]), **f32)
    return v.new_empty(v.shape), final, q.new_empty((batch, T, H, chunk_size), **f32), g.new_empty(g.shape, **f32), h


@cuda_op(
    "fla_chunk_gla_backward",
    "(Tensor do, Tensor? dfinal, Tensor q, Tensor k, Tensor v, float scale, Tensor? initial_state, "
    "Tensor A, Tensor g_cumsum, Tensor h, Tensor? cu_seqlens, Tensor? cu_seqlens_cpu) "
    "-> (Tensor, Tensor, Tensor, Tensor, Tensor)",
)
def _chunk_gla_backward(do, dfinal, q, k, v, scale, initial_state, A, g_cumsum, h, cu_seqlens, cu_seqlens_cpu):
    chunk_size = _chunk_length(q.shape[1])
    q, k, v, do = (t.contiguous() for t in (q, k, v, do))
    chunk_indices = _chunk_indices(cu_seqlens, cu_seqlens_cpu, chunk_size)
    varlen = dict(cu_seqlens=cu_seqlens, chunk_size=chunk_size)
    # fla's chunk_gla_bwd, step by step, with its in-chunk dq and dk (which need no state
    # gradients) on the side stream beside the state-gradient scan and dv. (The forward's
    # in-chunk attention beside its state pass gained nothing: both slowed down by as much.)
    with torch.cuda.device(q.device):
        with beside(q.device):
            dA = chunk_gla_bwd_dA(v=v, do=do, scale=scale, chunk_indices=chunk_indices, **varlen)
            dq, dk = _dqk_intra(q, k, g_cumsum, dA, chunk_indices, varlen)
        if not h.numel():  # with documents the forward kept no states
            h, _ = _states(k, v, g_cumsum, initial_state, False, cu_seqlens, chunk_size, chunk_indices)
        dh, dinitial = _state_grads(q, k, v, do, g_cumsum, scale, initial_state, dfinal, varlen, chunk_indices)
        dv = _value_grads(k, g_cumsum, A, do, dh, chunk_indices, varlen)
        join(q.device)
        dq, dk, dg = chunk_gla_bwd_dqkg(
            q=q, k=k, v=v, h=h, g=g_cumsum, do=do, dh=dh, dq=dq, dk=dk, scale=scale, chunk_indices=chunk_indices,
            **varlen,
        )
    grads = tuple(d.to(t.dtype).contiguous() for d, t in ((dq, q), (dk, k), (dv, v), (dg, g_cumsum)))
    return (*grads, optional_grad(dinitial, initial_state, q))


@_chunk_gla_backward.register_fake
def _(do, dfinal, q, k, v, scale, initial_state, A, g_cumsum, h, cu_seqlens, cu_seqlens_cpu):
    grads = (q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape), g_cumsum.new_empty(g_cumsum.shape))
    return (*grads, optional_fake(initial_state, q))


def _states(k, v, g_cumsum, initial_state, output_final_state, cu_seqlens, chunk_size, chunk_indices):
    """(h, final): the float32 state entering each chunk; braid's two-kernel pass (op "gla_scan",
    backend "triton", opt-in) or fla's `chunk_fwd_h`."""
    if pick("gla_scan", k, v, g_cumsum) == "triton":
        return backend_module("gla_scan", "triton").gla_states(
            k, v, g_cumsum, initial_state, output_final_state, cu_seqlens, chunk_size, chunk_indices
        )
    return chunk_fwd_h(
        k=k, v=v, g=None, gk=g_cumsum, gv=None, h0=initial_state, output_final_state=output_final_state,
        cu_seqlens=cu_seqlens, chunk_size=chunk_size, states_in_fp32=True,
    )


def _state_grads(q, k, v, do, g_cumsum, scale, initial_state, dfinal, varlen, chunk_indices):
    """(dh, dinitial): the states' gradients, on braid's pass ("gla_scan") or fla's `chunk_bwd_dh`."""
    if pick("gla_scan", q, do, g_cumsum) == "triton":
        return backend_module("gla_scan", "triton").gla_state_grads(
            q, do, g_cumsum, scale, dfinal, initial_state is not None, chunk_indices=chunk_indices, **varlen
        )
    return chunk_bwd_dh(
        q=q, k=k, v=v, g=None, gk=g_cumsum, gv=None, do=do, h0=initial_state, dht=dfinal, scale=scale,
        states_in_fp32=True, **varlen,
    )


def _value_grads(k, g_cumsum, A, do, dh, chunk_indices, varlen):
    """dv: braid's kernel (op "gla_dv", backend "triton") or fla's `chunk_gla_bwd_dv`."""
    if pick("gla_dv", k, do, A) == "triton":
        return backend_module("gla_dv", "triton").gla_bwd_dv(k, g_cumsum, A, do, dh, chunk_indices=chunk_indices,
                                                           **varlen)
    return chunk_gla_bwd_dv(k=k, g=g_cumsum, A=A, do=do, dh=dh, chunk_indices=chunk_indices, **varlen)


def _intra_scores(q, k, g_cumsum, scale, cu_seqlens, chunk_size, chunk_indices):
    """The in-chunk attention scores A: braid's kernel (op "gla_intra", backend "triton") or
    fla's `chunk_gla_fwd_intra_gk`."""
    if pick("gla_intra", q, k, g_cumsum) == "triton":
        return backend_module("gla_intra", "triton").gla_fwd_intra(
            q, k, g_cumsum, scale, cu_seqlens=cu_seqlens, chunk_size=chunk_size, chunk_indices=chunk_indices
        )
    return chunk_gla_fwd_intra_gk(
        q=q, k=k, g=g_cumsum, scale=scale, cu_seqlens=cu_seqlens, chunk_size=chunk_size, chunk_indices=chunk_indices
    )


def _dqk_intra(q, k, g_cumsum, dA, chunk_indices, varlen):
    """The in-chunk dq and dk: braid's kernel (op "gla_intra", backend "triton": one dot for each
    diagonal block where fla takes it row by row) or fla's `chunk_gla_bwd_dqk_intra`."""
    if pick("gla_intra", q, k, g_cumsum, dA) == "triton":
        return backend_module("gla_intra", "triton").gla_bwd_intra(
            q, k, g_cumsum, dA, chunk_indices=chunk_indices, **varlen
        )
    return chunk_gla_bwd_dqk_intra(q=q, k=k, g=g_cumsum, dA=dA, chunk_indices=chunk_indices, **varlen)


def _gla_setup(ctx, inputs, output):
    q, k, v, g, scale, initial_state, output_final_state, cu_seqlens, cu_seqlens_cpu = inputs
    ctx.save_for_backward(q, k, v, initial_state, *output[2:], cu_seqlens, cu_seqlens_cpu)
    ctx.scale, ctx.output_final_state, ctx.g_dtype = scale, output_final_state, g.dtype


def _gla_grads(ctx, do, dfinal, *_kept):
    q, k, v, initial_state, A, g_cumsum, h, cu_seqlens, cu_seqlens_cpu = ctx.saved_tensors
    dq, dk, dv, dg, dinitial = torch.ops.braid.fla_chunk_gla_backward(
        do, dfinal if ctx.output_final_state else None, q, k, v, ctx.scale, initial_state, A, g_cumsum, h,
        cu_seqlens, cu_seqlens_cpu,
    )
    return dq, dk, dv, dg.to(ctx.g_dtype), None, drop_placeholder(dinitial, initial_state), None, None, None


_chunk_gla.register_autograd(_gla_grads, setup_context=_gla_setup)


def chunk_gla(q, k, v, g, *, scale, initial_state=None, output_final_state=False, cu_seqlens=None, cu_seqlens_cpu=None):
    """fla's chunk_gla (its varlen keywords) through the custom ops."""
    o, final, *_kept = torch.ops.braid.fla_chunk_gla(
        q, k, v, g, scale, initial_state, output_final_state, cu_seqlens, cu_seqlens_cpu
    )
    return o, final if output_final_state else None


def gla_fla(q_BTHK: Tensor, k_BTHK: Tensor, v_BTHV: Tensor, g_BTHK: Tensor, **kwargs):
    """`braid.kernels.gla.gla` on chunk_gla (inputs validated; keywords as gla's, no chunk_size)."""
    return gla_via_packed(chunk_gla, q_BTHK, k_BTHK, v_BTHV, g_BTHK, **kwargs)


def gla_step_fla(q_BHK, k_BHK, v_BHV, g_BHK, state_BHKV, scale=None) -> tuple[Tensor, Tensor]:
    """`braid.kernels.gla.gla_step` on fused_recurrent_gla."""
    return gla_step_via_recurrent(fused_recurrent_gla, q_BHK, k_BHK, v_BHV, g_BHK, state_BHKV, scale)
