"""Grouped SwiGLU on torch._grouped_mm: all experts in three grouped GEMMs (bf16, Hopper).

The rows are already sorted by expert; offsets_E (int32) are the cumulative row counts that
end each expert's slice. Weights are cast to bfloat16 here (autocast does not cover
_grouped_mm), accumulation is float32 inside the GEMM, the output is cast to x's dtype.

The bf16 weight copies come from a custom op (`braid::expert_weights_bf16`) that
torch.compile keeps whole: they run as aten's vectorized copy kernels, which took 0.053 ms
for a hybrid-374m MoE layer's three (8 experts of 1024 x 1408, on an H200) where inductor's
generated casts took 0.070 ms; the layer at B2 T8192 went from 2.206 to 2.179 ms.
Running w1 and w3 as one grouped GEMM over [w1 | w3] made the GEMMs 0.1 ms faster, but
inductor's SiLU-mul backward, which then writes the stacked gradient, 0.075 ms slower.

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


@torch.library.custom_op("braid::expert_weights_bf16", mutates_args=())
def _expert_weights_bf16(w1_EDF: Tensor, w3_EDF: Tensor, w2_EFD: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Copies of w1, w3 and w2 in bfloat16."""
    return tuple(w.to(torch.bfloat16, copy=True) for w in (w1_EDF, w3_EDF, w2_EFD))


@_expert_weights_bf16.register_fake
def _(w1_EDF, w3_EDF, w2_EFD):
    return tuple(w.new_empty(w.shape, dtype=torch.bfloat16) for w in (w1_EDF, w3_EDF, w2_EFD))


def _setup(ctx, inputs, output):
    ctx.dtypes = tuple(w.dtype for w in inputs)


def _grads(ctx, *grads):
    return tuple(g.to(dtype) for g, dtype in zip(grads, ctx.dtypes))


_expert_weights_bf16.register_autograd(_grads, setup_context=_setup)


def grouped_swiglu_mm(
    x_sorted_ND: Tensor, counts_E: Tensor, w1_EDF: Tensor, w3_EDF: Tensor, w2_EFD: Tensor
) -> Tensor:
    """`braid.kernels.moe.grouped_swiglu` as grouped GEMMs (inputs validated; counts sum to N)."""
    offsets_E = counts_E.cumsum(0).to(torch.int32)
    with torch.autocast(x_sorted_ND.device.type, enabled=False):
        if not all(w.dtype == torch.bfloat16 for w in (w1_EDF, w3_EDF, w2_EFD)):
            w1_EDF, w3_EDF, w2_EFD = torch.ops.braid.expert_weights_bf16(w1_EDF, w3_EDF, w2_EFD)
        x_ND = x_sorted_ND.to(torch.bfloat16)
        gate_NF = torch._grouped_mm(x_ND, w1_EDF, offs=offsets_E)
        up_NF = torch._grouped_mm(x_ND, w3_EDF, offs=offsets_E)
        y_ND = torch._grouped_mm(silu_mul(gate_NF, up_NF), w2_EFD, offs=offsets_E)
    return y_ND.to(x_sorted_ND.dtype)
