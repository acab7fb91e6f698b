"""The SwiGLU activation: silu(gate) * up, the middle of every SwiGLU FFN.

On CUDA it runs liger-kernel's fused kernel (which recomputes silu in the backward instead
of storing it), elsewhere and inside torch.compile (inductor fuses it) the reference.
"""

from __future__ import annotations

from torch import Tensor

from braid.kernels.backend import backend_module, pick
from braid.kernels.swiglu.reference import silu_mul_reference

__all__ = ["silu_mul"]


def silu_mul(gate: Tensor, up: Tensor) -> Tensor:
    """silu(gate) * up, element-wise; gate and up (..., F) of one shape and dtype.

    Computed in float32 (float64 for float64 inputs), returned in the inputs' dtype.
    """
    if gate.shape != up.shape:
        raise ValueError(f"silu_mul: gate {tuple(gate.shape)} and up {tuple(up.shape)} must have one shape")
    if gate.dtype != up.dtype or not gate.is_floating_point():
        raise ValueError(f"silu_mul: gate and up need one floating dtype, got {gate.dtype} and {up.dtype}")
    if pick("swiglu", gate, up) == "liger":
        return backend_module("swiglu", "liger").silu_mul_liger(gate, up)
    return silu_mul_reference(gate, up)
