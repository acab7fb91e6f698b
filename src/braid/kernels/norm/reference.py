"""Pure-PyTorch RMSNorm references (the CPU path and the test oracle)."""

import torch
import torch.nn.functional as F


def rms_norm_reference(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    dtype = torch.promote_types(x.dtype, torch.float32)
    x32 = x.to(dtype)
    y = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return (y * weight.to(dtype)).to(x.dtype)


def gated_rms_norm_reference(
    x: torch.Tensor,
    gate: torch.Tensor,
    weight: torch.Tensor,
    eps: float,
    group_size: int,
    norm_before_gate: bool = False,
) -> torch.Tensor:
    dtype = torch.promote_types(x.dtype, torch.float32)
    x32, gate32 = x.to(dtype), F.silu(gate.to(dtype))
    if not norm_before_gate:
        x32 = x32 * gate32
    grouped = x32.unflatten(-1, (-1, group_size))
    y = (grouped * torch.rsqrt(grouped.pow(2).mean(-1, keepdim=True) + eps)).flatten(-2) * weight.to(dtype)
    if norm_before_gate:
        y = y * gate32
    return y.to(x.dtype)
