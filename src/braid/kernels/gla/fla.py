"""Gated linear attention on fla's Triton kernels: chunk_gla (training, prefill) and
fused_recurrent_gla (decode); the mapping onto them is braid.kernels.gla.packed.

Documents run as fla varlen segments: an initial state applies to each row's first
segment, the final state is read from each row's last one. fla's chunk length is its own
(64). float32 inputs run with TF32 dots on GPUs that have them.

Legend: B batch, T time, H heads, K key head dim, V value head dim.
"""

from __future__ import annotations

import torch
from fla.ops.gla import chunk_gla, fused_recurrent_gla
from torch import Tensor

from braid.kernels.gla.packed import gla_step_via_recurrent, gla_via_packed

# Opaque to torch.compile (graph breaks), as braid.kernels.ssd.fla's kernels.
chunk_gla = torch.compiler.disable(chunk_gla)
fused_recurrent_gla = torch.compiler.disable(fused_recurrent_gla)


def gla_fla(q_BTHK: Tensor, k_BTHK: Tensor, v_BTHV: Tensor, g_BTHK: Tensor, **kwargs):
    """`braid.kernels.gla.gla` on chunk_gla (inputs validated; keywords as gla's, no chunk_size)."""
    return gla_via_packed(chunk_gla, q_BTHK, k_BTHK, v_BTHV, g_BTHK, **kwargs)


def gla_step_fla(q_BHK, k_BHK, v_BHV, g_BHK, state_BHKV, scale=None) -> tuple[Tensor, Tensor]:
    """`braid.kernels.gla.gla_step` on fused_recurrent_gla."""
    return gla_step_via_recurrent(fused_recurrent_gla, q_BHK, k_BHK, v_BHV, g_BHK, state_BHKV, scale)
