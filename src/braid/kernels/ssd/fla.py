"""SSD (Mamba-2) and its causal conv on fla's Triton kernels (flash-linear-attention):
chunk_simple_gla for sequences, fused_recurrent_simple_gla for decode steps, fla's causal
conv with cu_seqlens for documents. The mapping onto these kernels is braid.kernels.ssd.packed.

The conv runs through custom ops over fla's `causal_conv1d_fwd` / `causal_conv1d_bwd`
(`braid::fla_causal_conv1d`), opaque nodes of a torch.compile graph; chunk_simple_gla stays
a graph break (it is refused on Hopper with Triton < 3.7.1 anyway, braid.kernels.backend).

fla picks its own chunk length (64): the chunk is a speed knob, not part of the function.
It computes float32 inputs with TF32 dots on GPUs that have them.

Shape legend: B batch, T time, H heads, P head dim, G groups of B/C, N state dim, C channels, K taps.
"""

from __future__ import annotations

import torch
from fla.modules.causal_conv1d.ops import causal_conv1d_bwd, causal_conv1d_fwd
from fla.ops.simple_gla import chunk_simple_gla, fused_recurrent_simple_gla
from torch import Tensor

from braid.kernels.custom_ops import cuda_op, drop_placeholder, optional_fake, optional_grad
from braid.kernels.ssd.packed import causal_conv1d_via_packed, ssd_step_via_simple_gla, ssd_via_simple_gla

# Opaque to torch.compile (graph breaks): dynamo tracing fla's Python fails in a fresh process
# (its torch version check raises inside dynamo; torch 2.11, fla 0.6.0, seen 2026-11-28).
chunk_simple_gla = torch.compiler.disable(chunk_simple_gla)
fused_recurrent_simple_gla = torch.compiler.disable(fused_recurrent_simple_gla)


# fla's conv forward and backward as custom ops with fake kernels: opaque nodes of one
# torch.compile graph rather than a graph break at each of the three convs of a Mamba-2 layer.
@cuda_op(
    "fla_causal_conv1d",
    "(Tensor x, Tensor weight, Tensor? bias, Tensor? initial_state, bool output_final_state, str? activation, "
    "Tensor? cu_seqlens, Tensor? cu_seqlens_cpu) -> (Tensor, Tensor)",
)
def _conv(x, weight, bias, initial_state, output_final_state, activation, cu_seqlens, cu_seqlens_cpu):
    y, final = causal_conv1d_fwd(
        x=x, weight=weight, bias=bias, residual=None, initial_state=initial_state,
        output_final_state=output_final_state, activation=activation, cu_seqlens=cu_seqlens,
        cu_seqlens_cpu=cu_seqlens_cpu,
    )
    final = x.new_empty(0) if final is None else final.to(x.dtype).contiguous()
    return y.contiguous(), final


@_conv.register_fake
def _(x, weight, bias, initial_state, output_final_state, activation, cu_seqlens, cu_seqlens_cpu):
    if not output_final_state:
        return x.new_empty(x.shape), x.new_empty(0)
    num_sequences = x.shape[0] if cu_seqlens is None else cu_seqlens.shape[0] - 1
    return x.new_empty(x.shape), x.new_empty((num_sequences, *weight.shape))


@cuda_op(
    "fla_causal_conv1d_backward",
    "(Tensor dy, Tensor? dfinal, Tensor x, Tensor weight, Tensor? bias, Tensor? initial_state, "
    "str? activation, Tensor? cu_seqlens, Tensor? cu_seqlens_cpu) -> (Tensor, Tensor, Tensor, Tensor)",
)
def _conv_backward(dy, dfinal, x, weight, bias, initial_state, activation, cu_seqlens, cu_seqlens_cpu):
    dx, dw, db, _, dinitial = causal_conv1d_bwd(
        x=x, dy=dy.contiguous(), dht=dfinal, weight=weight, bias=bias, residual=None, initial_state=initial_state,
        activation=activation, cu_seqlens=cu_seqlens, cu_seqlens_cpu=cu_seqlens_cpu,
    )
    return (dx.to(x.dtype).contiguous(), dw.to(weight.dtype).contiguous(), optional_grad(db, bias, x),
            optional_grad(dinitial, initial_state, x))


@_conv_backward.register_fake
def _(dy, dfinal, x, weight, bias, initial_state, activation, cu_seqlens, cu_seqlens_cpu):
    return x.new_empty(x.shape), weight.new_empty(weight.shape), optional_fake(bias, x), optional_fake(initial_state, x)


def _conv_setup(ctx, inputs, output):
    x, weight, bias, initial_state, output_final_state, activation, cu_seqlens, cu_seqlens_cpu = inputs
    ctx.save_for_backward(x, weight, bias, initial_state, cu_seqlens, cu_seqlens_cpu)
    ctx.activation, ctx.output_final_state = activation, output_final_state


def _conv_grads(ctx, dy, dfinal):
    x, weight, bias, initial_state, cu_seqlens, cu_seqlens_cpu = ctx.saved_tensors
    dx, dw, db, dinitial = torch.ops.braid.fla_causal_conv1d_backward(
        dy, dfinal if ctx.output_final_state else None, x, weight, bias, initial_state, ctx.activation,
        cu_seqlens, cu_seqlens_cpu,
    )
    return dx, dw, drop_placeholder(db, bias), drop_placeholder(dinitial, initial_state), None, None, None, None


_conv.register_autograd(_conv_grads, setup_context=_conv_setup)


def fla_causal_conv1d(
    x, *, weight, bias=None, activation=None, initial_state=None, output_final_state=False, cu_seqlens=None,
    cu_seqlens_cpu=None,
):
    """fla's causal_conv1d (its varlen keywords, no residual) through the custom ops."""
    y, final = torch.ops.braid.fla_causal_conv1d(
        x, weight, bias, initial_state, output_final_state, activation, cu_seqlens, cu_seqlens_cpu
    )
    return y, final if output_final_state else None


def ssd_fla(x_BTHP: Tensor, dt_BTH: Tensor, A_H: Tensor, B_BTGN: Tensor, C_BTGN: Tensor, **kwargs):
    """`braid.kernels.ssd.ssd` on chunk_simple_gla (inputs validated; keywords as ssd's, no chunk_size)."""
    return ssd_via_simple_gla(chunk_simple_gla, x_BTHP, dt_BTH, A_H, B_BTGN, C_BTGN, **kwargs)


def ssd_step_fla(x_BHP, dt_BH, A_H, B_BGN, C_BGN, state_BHPN, D_H=None) -> tuple[Tensor, Tensor]:
    """`braid.kernels.ssd.ssd_step` on fused_recurrent_simple_gla."""
    return ssd_step_via_simple_gla(fused_recurrent_simple_gla, x_BHP, dt_BH, A_H, B_BGN, C_BGN, state_BHPN, D_H)


def causal_conv1d_fla(x_BTC: Tensor, weight_CK: Tensor, bias_C: Tensor | None = None, **kwargs):
    """`braid.kernels.ssd.causal_conv1d` on fla's Triton causal conv (keywords as causal_conv1d's)."""
    return causal_conv1d_via_packed(fla_causal_conv1d, x_BTC, weight_CK, bias_C, **kwargs)
