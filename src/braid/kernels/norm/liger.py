"""RMSNorm on liger-kernel's Triton RMSNorm, in its "gemma" casting mode: everything in
float32, the output cast to x's dtype, which is what the reference computes. liger's
in-place backward (overwriting dY) is turned off: dY may be shared with other consumers."""

from __future__ import annotations

from liger_kernel.ops.rms_norm import LigerRMSNormFunction
from torch import Tensor


def rms_norm_liger(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    """`braid.kernels.norm.rms_norm` on liger (inputs validated)."""
    return LigerRMSNormFunction.apply(x, weight, eps, 0.0, "gemma", False)
