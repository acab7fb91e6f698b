"""RMSNorm and gated RMSNorm (Mamba-2's norm-then-gate and GLA's output gate).

On CUDA they run braid's fused Triton kernels (braid.kernels.norm.triton; liger-kernel's
RMSNorm as the alternative), elsewhere the pure-PyTorch references (braid.kernels.backend).
"""

import torch

from braid.kernels.backend import backend_module, pick
from braid.kernels.norm.reference import gated_rms_norm_reference, rms_norm_reference

__all__ = ["gated_rms_norm", "rms_norm"]


def rms_norm(x: "torch.Tensor", weight: "torch.Tensor", eps: float) -> "torch.Tensor":
    """RMSNorm over the last dimension, computed in float32, returned in x's dtype.

    x: (..., D); weight: (D,).
    """
    if weight.ndim != 1 or x.shape[-1] != weight.shape[0]:
        raise ValueError(f"rms_norm: weight of shape {tuple(weight.shape)} does not match x's last dim {x.shape[-1]}")
    backend = pick("norm", x, weight)
    if backend == "triton":
        return backend_module("norm", "triton").rms_norm_triton(x, weight, eps)
    if backend == "liger":
        return backend_module("norm", "liger").rms_norm_liger(x, weight, eps)
    return rms_norm_reference(x, weight, eps)


def gated_rms_norm(
    x: "torch.Tensor",
    gate: "torch.Tensor",
    weight: "torch.Tensor",
    eps: float,
    group_size: int | None = None,
    norm_before_gate: bool = False,
) -> "torch.Tensor":
    """RMSNorm(x * silu(gate)) (Mamba-2), or RMSNorm(x) * silu(gate) with `norm_before_gate`
    (GLA), the norm taken over groups of `group_size` channels.

    x, gate: (..., D); weight: (D,); group_size divides D (None: one group of D).
    """
    if x.shape != gate.shape:
        raise ValueError(f"gated_rms_norm: x {tuple(x.shape)} and gate {tuple(gate.shape)} differ in shape")
    group_size = group_size or x.shape[-1]
    if x.shape[-1] % group_size:
        raise ValueError(f"gated_rms_norm: group_size={group_size} does not divide D={x.shape[-1]}")
    if weight.ndim != 1 or weight.shape[0] != x.shape[-1]:
        raise ValueError(
            f"gated_rms_norm: weight of shape {tuple(weight.shape)} does not match x's last dim {x.shape[-1]}"
        )
    if pick("gated_norm", x, gate, weight) == "triton":
        return backend_module("gated_norm", "triton").gated_rms_norm_triton(
            x, gate, weight, eps, group_size, norm_before_gate
        )
    return gated_rms_norm_reference(x, gate, weight, eps, group_size, norm_before_gate)
