"""RMSNorm and gated RMSNorm (Mamba-2's norm-then-gate and GLA's output gate)."""

from braid.kernels.norm.reference import gated_rms_norm_reference, rms_norm_reference

__all__ = ["gated_rms_norm", "rms_norm"]


def rms_norm(x: "torch.Tensor", weight: "torch.Tensor", eps: float) -> "torch.Tensor":
    """RMSNorm over the last dimension, computed in float32, returned in x's dtype.

    x: (..., D); weight: (D,).
    """
    if weight.ndim != 1 or x.shape[-1] != weight.shape[0]:
        raise ValueError(f"rms_norm: weight of shape {tuple(weight.shape)} does not match x's last dim {x.shape[-1]}")
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
    return gated_rms_norm_reference(x, gate, weight, eps, group_size, norm_before_gate)
