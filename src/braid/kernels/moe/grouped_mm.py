"""Grouped SwiGLU on torch._grouped_mm: all experts in three grouped GEMMs (bf16, Hopper).

The rows are already sorted by expert; offsets_E (int32) are the cumulative row counts that
end each expert's slice. Weights are cast to bfloat16 here (autocast does not cover
_grouped_mm), accumulation is float32 inside the GEMM, the output is cast to x's dtype.

Legend: N rows sorted by expert, D model dim, F expert hidden dim, E experts.
"""

from __future__ import annotations

import torch
from torch import Tensor

from braid.kernels.swiglu import silu_mul

if not hasattr(torch, "_grouped_mm"):
    raise ImportError(f"torch {torch.__version__} has no torch._grouped_mm")


def compute_dtype(x_sorted_ND: Tensor) -> torch.dtype | None:
    """bfloat16 when x is bfloat16 or autocast to bfloat16 is on, else None (not this backend's call)."""
    if x_sorted_ND.dtype == torch.bfloat16:
        return torch.bfloat16
    device = x_sorted_ND.device.type
    if torch.is_autocast_enabled(device) and torch.get_autocast_dtype(device) == torch.bfloat16:
        return torch.bfloat16
    return None


# Each visible GPU's compute capability major, read once at import (before any torch.compile
# trace, which would otherwise meet the device query inside the MoE forward).
_MAJOR = [torch.cuda.get_device_capability(i)[0] for i in range(torch.cuda.device_count())]


def supports(x_sorted_ND: Tensor, w1_EDF: Tensor) -> bool:
    """bf16 compute, a GPU with grouped GEMMs (sm90+) and 16-byte aligned rows (D, F % 8 == 0)."""
    d_model, d_hidden = w1_EDF.shape[1:]
    return (
        compute_dtype(x_sorted_ND) is not None
        and _MAJOR[x_sorted_ND.device.index] >= 9
        and d_model % 8 == 0
        and d_hidden % 8 == 0
    )


def grouped_swiglu_mm(
    x_sorted_ND: Tensor, counts_E: Tensor, w1_EDF: Tensor, w3_EDF: Tensor, w2_EFD: Tensor
) -> Tensor:
    """`braid.kernels.moe.grouped_swiglu` as grouped GEMMs (inputs validated; counts sum to N)."""
    dtype = torch.bfloat16
    offsets_E = counts_E.cumsum(0).to(torch.int32)
    with torch.autocast(x_sorted_ND.device.type, enabled=False):
        x_ND = x_sorted_ND.to(dtype)
        gate_NF = torch._grouped_mm(x_ND, w1_EDF.to(dtype), offs=offsets_E)
        up_NF = torch._grouped_mm(x_ND, w3_EDF.to(dtype), offs=offsets_E)
        y_ND = torch._grouped_mm(silu_mul(gate_NF, up_NF), w2_EFD.to(dtype), offs=offsets_E)
    return y_ND.to(x_sorted_ND.dtype)
