"""SSD (Mamba-2) and its causal conv written against varlen kernels with fla's calling
convention (see braid.kernels.varlen.run_packed), kept free of fla imports so that the
mapping is tested on CPU with reference kernels in its place.

SSD is simple GLA with a per-head scalar decay:

    state_t = exp(dt_t A) state_{t-1} + (dt_t x_t) B_t^T,  y_t = state_t C_t + D x_t

is S_t = exp(g_t) S_{t-1} + k_t^T v_t, o_t = scale q_t S_t with q = C, k = B (groups
expanded to heads), v = dt * x, g = dt * A and scale = 1. The simple-GLA state is (K, V) =
(N, P), the transpose of braid's (P, N). D and the group expansion stay outside the kernel;
g and the states are float32 (float64 for float64 x, which only the CPU tests send).
fla's conv state holds the last K inputs (B, C, K) where braid's holds K-1: the oldest slot
is zero going in and dropped coming out.

Shape legend: B batch, T time, H heads, P head dim, G groups of B/C, N state dim,
C channels, K conv taps.
"""

from __future__ import annotations

import torch
from torch import Tensor

from braid.kernels.gla.packed import state_dtype
from braid.kernels.varlen import run_packed


def heads_from_groups(t_xGN: Tensor, num_heads: int) -> Tensor:
    """(..., G, N) -> (..., H, N), head h reading group h // (H // G)."""
    *lead, G, N = t_xGN.shape
    return t_xGN.unsqueeze(-2).expand(*lead, G, num_heads // G, N).reshape(*lead, num_heads, N)


def _with_skip(o_xHP: Tensor, x_xHP: Tensor, D_H: Tensor | None) -> Tensor:
    if D_H is None:
        return o_xHP.to(x_xHP.dtype)
    dtype = state_dtype(x_xHP)
    return torch.addcmul(o_xHP.to(dtype), x_xHP.to(dtype), D_H.to(dtype)[:, None]).to(x_xHP.dtype)


def _simple_gla_inputs(x_xHP, dt_xH, A_H, B_xGN, C_xGN):
    """q = C, k = B (per head), v = dt * x in x's dtype; g = dt * A in float32 (float64 for float64)."""
    H, dtype = x_xHP.shape[-2], x_xHP.dtype
    q_xHN = heads_from_groups(C_xGN, H).to(dtype)
    k_xHN = heads_from_groups(B_xGN, H).to(dtype)
    v_xHP = (x_xHP * dt_xH[..., None]).to(dtype)
    g_xH = dt_xH.to(state_dtype(x_xHP)) * A_H.to(state_dtype(x_xHP))
    return q_xHN, k_xHN, v_xHP, g_xH


def ssd_via_simple_gla(
    chunk_simple_gla,
    x_BTHP: Tensor,
    dt_BTH: Tensor,
    A_H: Tensor,
    B_BTGN: Tensor,
    C_BTGN: Tensor,
    *,
    D_H: Tensor | None = None,
    doc_ids_BT: Tensor | None = None,
    initial_state_BHPN: Tensor | None = None,
    return_final_state: bool = False,
) -> Tensor | tuple[Tensor, Tensor]:
    """`braid.kernels.ssd.ssd` through a chunked simple-GLA kernel (fla's signature)."""
    dtype = state_dtype(x_BTHP)
    state_BHNP = None if initial_state_BHPN is None else initial_state_BHPN.to(dtype).transpose(-1, -2)
    o_BTHP, final_BHNP = run_packed(
        chunk_simple_gla,
        _simple_gla_inputs(x_BTHP, dt_BTH, A_H, B_BTGN, C_BTGN),
        doc_ids_BT=doc_ids_BT,
        initial_state_Bx=state_BHNP,
        return_final_state=return_final_state,
        scale=1.0,
    )
    y_BTHP = _with_skip(o_BTHP, x_BTHP, D_H)
    if not return_final_state:
        return y_BTHP
    return y_BTHP, final_BHNP.to(dtype).transpose(-1, -2)


def ssd_step_via_simple_gla(
    fused_recurrent_simple_gla,
    x_BHP: Tensor,
    dt_BH: Tensor,
    A_H: Tensor,
    B_BGN: Tensor,
    C_BGN: Tensor,
    state_BHPN: Tensor,
    D_H: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """`braid.kernels.ssd.ssd_step` through a recurrent simple-GLA kernel run on one token."""
    inputs_B1x = tuple(t[:, None] for t in _simple_gla_inputs(x_BHP, dt_BH, A_H, B_BGN, C_BGN))
    dtype = state_dtype(x_BHP)
    o_B1HP, state_BHNP = fused_recurrent_simple_gla(
        *inputs_B1x, scale=1.0, initial_state=state_BHPN.to(dtype).transpose(-1, -2).contiguous(),
        output_final_state=True,
    )
    return _with_skip(o_B1HP[:, 0], x_BHP, D_H), state_BHNP.to(dtype).transpose(-1, -2)


def causal_conv1d_via_packed(
    conv_kernel,
    x_BTC: Tensor,
    weight_CK: Tensor,
    bias_C: Tensor | None = None,
    *,
    doc_ids_BT: Tensor | None = None,
    initial_state_BCK: Tensor | None = None,
    activation: str | None = "silu",
    return_final_state: bool = False,
) -> Tensor | tuple[Tensor, Tensor]:
    """`braid.kernels.ssd.causal_conv1d` through a varlen conv kernel with a K-slot state."""
    batch, _, C = x_BTC.shape
    state_BCK = None
    if initial_state_BCK is not None:
        zeros_BC1 = initial_state_BCK.new_zeros(batch, C, 1)
        state_BCK = torch.cat([zeros_BC1, initial_state_BCK], dim=-1).to(x_BTC.dtype)
    y_BTC, final_BCK = run_packed(
        conv_kernel, (x_BTC,), doc_ids_BT=doc_ids_BT, initial_state_Bx=state_BCK,
        return_final_state=return_final_state, weight=weight_CK, bias=bias_C, activation=activation,
    )
    if not return_final_state:
        return y_BTC
    return y_BTC, final_BCK[..., 1:].to(x_BTC.dtype).contiguous()
