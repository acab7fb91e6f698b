"""Pure-PyTorch SwiGLU activation (the CPU path and the test oracle)."""

import torch
import torch.nn.functional as F


def silu_mul_reference(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    dtype = torch.promote_types(gate.dtype, torch.float32)
    return (F.silu(gate.to(dtype)) * up.to(dtype)).to(gate.dtype)


def silu_mul_stacked_reference(h: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up for h = [gate | up] along the last dimension (gate first)."""
    gate, up = h.chunk(2, dim=-1)
    return silu_mul_reference(gate, up)
