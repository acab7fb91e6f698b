"""Grouped SwiGLU for dropless mixture-of-experts (each expert runs on its contiguous slice),
and the router's float32 logits.

On a Hopper GPU with bf16 compute the experts run as grouped GEMMs (torch._grouped_mm,
braid.kernels.moe.grouped_mm), elsewhere as the loop over experts (the reference). The
router's logits run on braid's Triton kernels (braid.kernels.moe.router_triton) on CUDA for
up to 64 experts, elsewhere as a float32 linear with autocast off (the reference). The weighted
combine of the experts' outputs is torch ops forward; its backward can run as one Triton
kernel (braid.kernels.moe.combine_triton; opt-in, `moe_combine=triton`).

Legend: N rows sorted by expert, D model dim, F expert hidden dim, E experts.
"""

import torch

from braid.kernels.backend import backend_module, pick
from braid.kernels.moe.reference import grouped_swiglu_reference, router_logits_reference, weighted_combine_reference

__all__ = [
    "expert_input_dtype",
    "grouped_swiglu",
    "router_logits",
    "router_logits_reference",
    "weighted_combine",
]


def grouped_swiglu(
    x_sorted_ND: torch.Tensor,
    counts_E: torch.Tensor,
    w1_EDF: torch.Tensor,
    w3_EDF: torch.Tensor,
    w2_EFD: torch.Tensor,
) -> torch.Tensor:
    """y[rows of e] = (silu(x w1[e]) * (x w3[e])) w2[e] for each expert e.

    x_sorted_ND: (N, D) rows sorted by expert; counts_E: (E,) integer rows per expert,
    summing to N; w1_EDF, w3_EDF: (E, D, F); w2_EFD: (E, F, D). Returns y_sorted_ND (N, D)
    in x's dtype, computed in float32 (float64 for float64 inputs) by the reference, in
    bfloat16 with float32 accumulation by the grouped GEMMs (which do not check the counts'
    sum, to avoid a host sync).
    """
    _check_shapes(x_sorted_ND, counts_E, w1_EDF, w3_EDF, w2_EFD)
    if _grouped_mm_runs(x_sorted_ND, counts_E, w1_EDF, w3_EDF, w2_EFD):
        return backend_module("moe", "grouped_mm").grouped_swiglu_mm(x_sorted_ND, counts_E, w1_EDF, w3_EDF, w2_EFD)
    return grouped_swiglu_reference(x_sorted_ND, counts_E, w1_EDF, w3_EDF, w2_EFD)


def expert_input_dtype(x: torch.Tensor, w1_EDF: torch.Tensor) -> torch.dtype:
    """The dtype the experts will read tokens x in: bfloat16 where the grouped GEMMs run them in
    bf16 (a bf16 x, or bf16 autocast on a Hopper GPU), else x's own dtype (the reference)."""
    if pick("moe", x, w1_EDF) == "grouped_mm" and backend_module("moe", "grouped_mm").supports(x, w1_EDF):
        return torch.bfloat16
    return x.dtype


def _grouped_mm_runs(x_sorted_ND, counts_E, w1_EDF, w3_EDF, w2_EFD) -> bool:
    if pick("moe", x_sorted_ND, counts_E, w1_EDF, w3_EDF, w2_EFD) != "grouped_mm":
        return False
    return backend_module("moe", "grouped_mm").supports(x_sorted_ND, w1_EDF)


def _check_shapes(x_sorted_ND, counts_E, w1_EDF, w3_EDF, w2_EFD) -> None:
    if x_sorted_ND.ndim != 2:
        raise ValueError(
            f"grouped_swiglu: x_sorted_ND must be 2-D (rows, d_model), got shape {tuple(x_sorted_ND.shape)}"
        )
    if w1_EDF.ndim != 3 or w1_EDF.shape != w3_EDF.shape:
        raise ValueError(
            f"grouped_swiglu: w1 {tuple(w1_EDF.shape)} and w3 {tuple(w3_EDF.shape)} must both be (E, D, F)"
        )
    num_experts, d_model, d_hidden = w1_EDF.shape
    if tuple(w2_EFD.shape) != (num_experts, d_hidden, d_model):
        raise ValueError(
            f"grouped_swiglu: w2 has shape {tuple(w2_EFD.shape)}, "
            f"expected (E, F, D) = {(num_experts, d_hidden, d_model)}"
        )
    if x_sorted_ND.shape[1] != d_model:
        raise ValueError(
            f"grouped_swiglu: x_sorted_ND has d_model {x_sorted_ND.shape[1]} but the weights have {d_model}"
        )
    if counts_E.shape != (num_experts,) or counts_E.dtype.is_floating_point or counts_E.dtype.is_complex:
        raise ValueError(
            f"grouped_swiglu: counts_E must be an integer tensor of shape ({num_experts},), "
            f"got {counts_E.dtype} of shape {tuple(counts_E.shape)}"
        )


def router_logits(x_ND: torch.Tensor, weight_ED: torch.Tensor) -> torch.Tensor:
    """logits_NE = x_ND weight_EDᵀ, computed and returned in float32 (float64 for float64 x)
    whatever the autocast state, forward and backward; the gradients come back in the inputs'
    dtypes. x_ND: (N, D) tokens, weight_ED: (E, D) router weight."""
    if x_ND.ndim != 2 or weight_ED.ndim != 2 or x_ND.shape[1] != weight_ED.shape[1]:
        raise ValueError(
            f"router_logits: x must be (tokens, d_model) and weight (experts, d_model); got "
            f"{tuple(x_ND.shape)} and {tuple(weight_ED.shape)}"
        )
    if pick("router", x_ND, weight_ED) == "triton":
        router = backend_module("router", "triton")
        if router.supports(x_ND, weight_ED):
            return router.router_logits_triton(x_ND, weight_ED)
    return router_logits_reference(x_ND, weight_ED)


def weighted_combine(
    y_sorted_SD: torch.Tensor, gates_NK: torch.Tensor, order_S: torch.Tensor, unsort_S: torch.Tensor
) -> torch.Tensor:
    """Each token's K expert outputs weighted by its gates and summed, in the gates' dtype (N, D):
    y_ND[n] = sum_k gates_NK[n, k] * y_sorted_SD[unsort_S[n * K + k]].

    y_sorted_SD: (S, D) expert outputs in expert order; gates_NK: (N, K); order_S sorts the
    flattened (token, k) slots by expert and unsort_S is its inverse (S = N * K)."""
    if gates_NK.ndim != 2 or y_sorted_SD.ndim != 2 or unsort_S.shape != (gates_NK.numel(),):
        raise ValueError(
            f"weighted_combine: y_sorted_SD must be (N*K, D), gates_NK (N, K) and unsort_S (N*K,); got "
            f"{tuple(y_sorted_SD.shape)}, {tuple(gates_NK.shape)} and {tuple(unsort_S.shape)}"
        )
    if pick("moe_combine", y_sorted_SD, gates_NK, unsort_S) == "triton":
        combine = backend_module("moe_combine", "triton")
        if combine.supports(y_sorted_SD, gates_NK):
            return combine.weighted_combine_triton(y_sorted_SD, gates_NK, unsort_S)
    return weighted_combine_reference(y_sorted_SD, gates_NK, order_S, unsort_S)
