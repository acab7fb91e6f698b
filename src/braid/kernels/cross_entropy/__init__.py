"""Linear + cross-entropy fused so that the (tokens x vocab) logits are never held at once.

    loss = CE(hidden_ND @ weight_VD^T, labels_N)

The trainer calls it with `model(..., return_hidden=True)` and `model.head_weight`. On CUDA
it runs liger-kernel's fused linear cross-entropy (chunked logits, gradients computed in
the forward), elsewhere `linear_cross_entropy_reference` (token chunks recomputed in the
backward). See braid.kernels.backend.

Legend: N tokens, D hidden dim, V vocabulary.
"""

from __future__ import annotations

from torch import Tensor

from braid.kernels.backend import backend_module, pick
from braid.kernels.cross_entropy.reference import linear_cross_entropy_reference

__all__ = ["linear_cross_entropy"]

REDUCTIONS = ("mean", "sum")


def linear_cross_entropy(
    hidden_ND: Tensor,
    weight_VD: Tensor,
    labels_N: Tensor,
    ignore_index: int = -100,
    reduction: str = "mean",
) -> Tensor:
    """Cross-entropy of the logits hidden_ND @ weight_VD^T against labels_N, as a scalar.

    hidden_ND: (N, D) floating; weight_VD: (V, D) floating; labels_N: (N,) integer class ids
    in [0, V) or ignore_index. reduction "sum" adds the per-token losses of non-ignored
    labels, "mean" divides that sum by their count (nan when every label is ignored, as
    F.cross_entropy). The logits are computed in float32 (the matmul under autocast in its
    dtype); the loss is float32 (float64 for float64 inputs).
    """
    _check_inputs(hidden_ND, weight_VD, labels_N, reduction)
    if pick("cross_entropy", hidden_ND, weight_VD) == "liger":
        module = backend_module("cross_entropy", "liger")
        return module.linear_cross_entropy_liger(hidden_ND, weight_VD, labels_N, ignore_index, reduction)
    return linear_cross_entropy_reference(hidden_ND, weight_VD, labels_N, ignore_index, reduction)


def _check_inputs(hidden_ND: Tensor, weight_VD: Tensor, labels_N: Tensor, reduction: str) -> None:
    if hidden_ND.ndim != 2 or weight_VD.ndim != 2 or hidden_ND.shape[1] != weight_VD.shape[1]:
        raise ValueError(
            f"linear_cross_entropy: hidden must be (N, D) and weight (V, D) with one D; got "
            f"{tuple(hidden_ND.shape)} and {tuple(weight_VD.shape)} (flatten batch and time into N first)"
        )
    if not hidden_ND.is_floating_point() or not weight_VD.is_floating_point():
        raise ValueError(
            f"linear_cross_entropy: hidden and weight must be floating, got {hidden_ND.dtype}, {weight_VD.dtype}"
        )
    if labels_N.shape != hidden_ND.shape[:1] or labels_N.is_floating_point() or labels_N.dtype.is_complex:
        raise ValueError(
            f"linear_cross_entropy: labels must be an integer tensor of shape ({hidden_ND.shape[0]},), "
            f"got {labels_N.dtype} of shape {tuple(labels_N.shape)}"
        )
    if reduction not in REDUCTIONS:
        raise ValueError(f"linear_cross_entropy: reduction={reduction!r} is not one of {REDUCTIONS}")
