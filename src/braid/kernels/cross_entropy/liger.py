"""Linear + cross-entropy on liger-kernel's fused kernel: logits in token chunks, gradients
computed during the forward, weight gradients accumulated in float32."""

from __future__ import annotations

import torch
from liger_kernel.ops.fused_linear_cross_entropy import LigerFusedLinearCrossEntropyFunction
from torch import Tensor


def linear_cross_entropy_liger(
    hidden_ND: Tensor, weight_VD: Tensor, labels_N: Tensor, ignore_index: int, reduction: str
) -> Tensor:
    """`braid.kernels.cross_entropy.linear_cross_entropy` on liger (inputs validated)."""
    out = LigerFusedLinearCrossEntropyFunction.apply(
        hidden_ND, weight_VD, labels_N, None, None, ignore_index, 0.0, 0.0, reduction, None, False, torch.float32
    )
    loss = out[0] if isinstance(out, tuple) else out
    return loss.float()
