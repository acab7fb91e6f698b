"""SSD (Mamba-2) and its causal conv on fla's Triton kernels (flash-linear-attention):
chunk_simple_gla for sequences, fused_recurrent_simple_gla for decode steps, fla's causal
conv with cu_seqlens for documents. The mapping onto these kernels is braid.kernels.ssd.packed.

fla picks its own chunk length (64): the chunk is a speed knob, not part of the function.
It computes float32 inputs with TF32 dots on GPUs that have them.

Shape legend: B batch, T time, H heads, P head dim, G groups of B/C, N state dim, C channels, K taps.
"""

from __future__ import annotations

import torch
from fla.modules.causal_conv1d import causal_conv1d as fla_causal_conv1d
from fla.ops.simple_gla import chunk_simple_gla, fused_recurrent_simple_gla
from torch import Tensor

from braid.kernels.ssd.packed import causal_conv1d_via_packed, ssd_step_via_simple_gla, ssd_via_simple_gla

# Opaque to torch.compile (graph breaks): dynamo tracing fla's Python fails in a fresh process
# (its torch version check raises inside dynamo; torch 2.11, fla 0.6.0, seen 2026-11-28).
fla_causal_conv1d = torch.compiler.disable(fla_causal_conv1d)
chunk_simple_gla = torch.compiler.disable(chunk_simple_gla)
fused_recurrent_simple_gla = torch.compiler.disable(fused_recurrent_simple_gla)


def ssd_fla(x_BTHP: Tensor, dt_BTH: Tensor, A_H: Tensor, B_BTGN: Tensor, C_BTGN: Tensor, **kwargs):
    """`braid.kernels.ssd.ssd` on chunk_simple_gla (inputs validated; keywords as ssd's, no chunk_size)."""
    return ssd_via_simple_gla(chunk_simple_gla, x_BTHP, dt_BTH, A_H, B_BTGN, C_BTGN, **kwargs)


def ssd_step_fla(x_BHP, dt_BH, A_H, B_BGN, C_BGN, state_BHPN, D_H=None) -> tuple[Tensor, Tensor]:
    """`braid.kernels.ssd.ssd_step` on fused_recurrent_simple_gla."""
    return ssd_step_via_simple_gla(fused_recurrent_simple_gla, x_BHP, dt_BH, A_H, B_BGN, C_BGN, state_BHPN, D_H)


def causal_conv1d_fla(x_BTC: Tensor, weight_CK: Tensor, bias_C: Tensor | None = None, **kwargs):
    """`braid.kernels.ssd.causal_conv1d` on fla's Triton causal conv (keywords as causal_conv1d's)."""
    return causal_conv1d_via_packed(fla_causal_conv1d, x_BTC, weight_CK, bias_C, **kwargs)
