"""Pure-PyTorch grouped SwiGLU over experts, router logits and the weighted combine of the
experts' outputs (the CPU path and the test oracle).

Legend: N rows sorted by expert (tokens, for the combine), D model dim, F expert hidden dim,
E experts, K experts per token, S routed slots (N * K).
"""

import torch
import torch.nn.functional as F


def grouped_swiglu_reference(
    x_sorted_ND: torch.Tensor,
    counts_E: torch.Tensor,
    w1_EDF: torch.Tensor,
    w3_EDF: torch.Tensor,
    w2_EFD: torch.Tensor,
) -> torch.Tensor:
    """A loop over experts: expert e runs on its contiguous slice of counts_E[e] rows."""
    counts = counts_E.tolist()
    if any(c < 0 for c in counts) or sum(counts) != x_sorted_ND.shape[0]:
        raise ValueError(
            f"grouped_swiglu: counts_E={counts} must be non-negative and sum to the "
            f"{x_sorted_ND.shape[0]} rows of x_sorted_ND (one count per expert, rows sorted by expert)"
        )
    compute_dtype = torch.float64 if x_sorted_ND.dtype == torch.float64 else torch.float32
    pieces = []
    for e, x_nD in enumerate(torch.split(x_sorted_ND.to(compute_dtype), counts)):
        h_nF = F.silu(x_nD @ w1_EDF[e].to(compute_dtype)) * (x_nD @ w3_EDF[e].to(compute_dtype))
        pieces.append(h_nF @ w2_EFD[e].to(compute_dtype))
    return torch.cat(pieces).to(x_sorted_ND.dtype)


def router_logits_reference(x_ND: torch.Tensor, weight_ED: torch.Tensor) -> torch.Tensor:
    """x Wᵀ in float32 (float64 for float64 x), with autocast off: under bf16 autocast it would
    run the linear, and so the logits, in bfloat16."""
    dtype = torch.promote_types(x_ND.dtype, torch.float32)
    with torch.autocast(x_ND.device.type, enabled=False):
        return F.linear(x_ND.to(dtype), weight_ED.to(dtype))


class _Combine(torch.autograd.Function):
    """The expert outputs back in (token, k) order, y_sorted_SD[unsort_S]; unsort_S is a
    permutation, so the backward is the gather through its inverse, order_S."""

    @staticmethod
    def forward(ctx, y_sorted_SD, order_S, unsort_S):
        ctx.save_for_backward(order_S)
        return y_sorted_SD[unsort_S]

    @staticmethod
    def backward(ctx, grad_SD):
        (order_S,) = ctx.saved_tensors
        return grad_SD[order_S], None, None


def combine(y_sorted_SD: torch.Tensor, order_S: torch.Tensor, unsort_S: torch.Tensor) -> torch.Tensor:
    """Expert outputs back in (token, k) slot order, y_sorted_SD[unsort_S] (S, D); the backward
    gathers at order_S (a permutation's inverse) rather than scattering."""
    return _Combine.apply(y_sorted_SD, order_S, unsort_S)


def weighted_combine_reference(
    y_sorted_SD: torch.Tensor, gates_NK: torch.Tensor, order_S: torch.Tensor, unsort_S: torch.Tensor
) -> torch.Tensor:
    """Each token's K expert outputs weighted by its gates and summed, in the gates' dtype:
    y_ND[n] = sum_k gates_NK[n, k] * y_sorted_SD[unsort_S[n * K + k]]."""
    return gate_weighted_sum(combine(y_sorted_SD, order_S, unsort_S).unflatten(0, gates_NK.shape), gates_NK)


def gate_weighted_sum(y_NKD: torch.Tensor, gates_NK: torch.Tensor) -> torch.Tensor:
    """sum_k gates_NK[n, k] * y_NKD[n, k], in the gates' dtype (N, D)."""
    return (y_NKD.to(gates_NK.dtype) * gates_NK.unsqueeze(-1)).sum(dim=1)
