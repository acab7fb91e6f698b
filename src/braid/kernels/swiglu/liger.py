"""SwiGLU activation on liger-kernel's fused silu-multiply (silu in float32 inside the kernel)."""

from __future__ import annotations

from liger_kernel.ops.swiglu import LigerSiLUMulFunction
from torch import Tensor


def silu_mul_liger(gate: Tensor, up: Tensor) -> Tensor:
    """`braid.kernels.swiglu.silu_mul` on liger (inputs validated)."""
    return LigerSiLUMulFunction.apply(gate, up)
