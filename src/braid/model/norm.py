"""RMSNorm module (weights initialised in braid.model.init)."""

import torch
from torch import nn

from braid.kernels.norm import gated_rms_norm, rms_norm


class RMSNorm(nn.Module):
    """RMSNorm over the last dim; `scale` multiplies the output (LayerNorm Scaling)."""

    def __init__(self, dim: int, eps: float = 1e-5, scale: float = 1.0):
        super().__init__()
        self.eps = eps
        self.scale = scale
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = rms_norm(x, self.weight, self.eps)
        return y * self.scale if self.scale != 1.0 else y

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, eps={self.eps}, scale={self.scale:.4g}"


class GatedRMSNorm(nn.Module):
    """Per group of channels: RMSNorm(x * silu(z)) (Mamba-2), or with `norm_before_gate`
    RMSNorm(x) * silu(z) (GLA's swish output gate)."""

    def __init__(self, dim: int, eps: float = 1e-5, group_size: int | None = None, norm_before_gate: bool = False):
        super().__init__()
        self.eps = eps
        self.group_size = group_size or dim
        self.norm_before_gate = norm_before_gate
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        return gated_rms_norm(x, z, self.weight, self.eps, self.group_size, self.norm_before_gate)
