"""GLA written against a chunked GLA kernel with fla's varlen calling convention (see
braid.kernels.varlen.run_packed), free of fla imports so that the mapping is tested on CPU
with a reference kernel in fla's place.

Legend: B batch, T time, H heads, K key head dim, V value head dim.
"""

from __future__ import annotations

import torch
from torch import Tensor

from braid.kernels.varlen import run_packed


def state_dtype(t: Tensor) -> torch.dtype:
    """float32, or float64 for float64 tensors."""
    return torch.promote_types(t.dtype, torch.float32)


def gla_via_packed(
    kernel,
    q_BTHK: Tensor,
    k_BTHK: Tensor,
    v_BTHV: Tensor,
    g_BTHK: Tensor,
    *,
    scale: float | None = None,
    doc_ids_BT: Tensor | None = None,
    initial_state_BHKV: Tensor | None = None,
    return_final_state: bool = False,
):
    """`braid.kernels.gla.gla` through a chunked GLA kernel (fla's chunk_gla signature).
    q and k are cast to v's dtype (the kernel takes one dtype); the state is float32."""
    dtype = v_BTHV.dtype
    scale = q_BTHK.shape[-1] ** -0.5 if scale is None else scale
    state_BHKV = None if initial_state_BHKV is None else initial_state_BHKV.to(state_dtype(v_BTHV))
    o_BTHV, final_BHKV = run_packed(
        kernel,
        (q_BTHK.to(dtype), k_BTHK.to(dtype), v_BTHV, g_BTHK),
        doc_ids_BT=doc_ids_BT,
        initial_state_Bx=state_BHKV,
        return_final_state=return_final_state,
        scale=scale,
    )
    o_BTHV = o_BTHV.to(dtype)
    return (o_BTHV, final_BHKV.to(state_dtype(v_BTHV))) if return_final_state else o_BTHV


def gla_step_via_recurrent(
    fused_recurrent_gla, q_BHK: Tensor, k_BHK: Tensor, v_BHV: Tensor, g_BHK: Tensor, state_BHKV: Tensor,
    scale: float | None = None,
) -> tuple[Tensor, Tensor]:
    """`braid.kernels.gla.gla_step` through a recurrent GLA kernel (fla's signature) on one token."""
    dtype = v_BHV.dtype
    scale = q_BHK.shape[-1] ** -0.5 if scale is None else scale
    o_B1HV, new_state_BHKV = fused_recurrent_gla(
        q_BHK.to(dtype)[:, None], k_BHK.to(dtype)[:, None], v_BHV[:, None], gk=g_BHK[:, None], scale=scale,
        initial_state=state_BHKV.to(state_dtype(v_BHV)), output_final_state=True,
    )
    return o_B1HV[:, 0].to(dtype), new_state_BHKV.to(state_dtype(v_BHV))
