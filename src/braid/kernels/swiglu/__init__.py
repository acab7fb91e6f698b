"""The SwiGLU activation: silu(gate) * up, the middle of every SwiGLU FFN.

On CUDA it runs liger-kernel's fused kernel (which recomputes silu in the backward instead
of storing it), elsewhere and inside torch.compile (inductor fuses it) the reference.
`silu_mul_stacked` takes gate and up stacked in one tensor, [gate | up], as one GEMM over
stacked weights writes them; on CUDA it runs braid's Triton kernels, under torch.compile too
(braid.kernels.swiglu.stacked_triton says why).
"""

from __future__ import annotations

from torch import Tensor

from braid.kernels.backend import backend_module, pick
from braid.kernels.swiglu.reference import silu_mul_reference, silu_mul_stacked_reference

__all__ = ["silu_mul", "silu_mul_stacked"]


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


def silu_mul_stacked(h: Tensor) -> Tensor:
    """silu(gate) * up for h = [gate | up]: h (N, 2F) with gate in its first F columns -> (N, F).

    Computed in float32 (float64 for float64 inputs), returned in h's dtype.
    """
    if h.ndim != 2 or h.shape[1] % 2 or not h.is_floating_point():
        raise ValueError(
            f"silu_mul_stacked: h must be a 2-D floating tensor (rows, 2F) of [gate | up], got {h.dtype} "
            f"of shape {tuple(h.shape)}"
        )
    if pick("swiglu_stacked", h) == "triton":
        stacked = backend_module("swiglu_stacked", "triton")
        if stacked.supports(h):
            return stacked.silu_mul_stacked_triton(h)
    return silu_mul_stacked_reference(h)
