"""Grouped SwiGLU on torch._grouped_mm: all experts in two grouped GEMMs forward (bf16, Hopper).

The rows are already sorted by expert; offsets_E (int32) are the cumulative row counts that
end each expert's slice. Weights are cast to bfloat16 here (autocast does not cover
_grouped_mm), accumulation is float32 inside the GEMM, the output is cast to x's dtype.

Gate and up are one GEMM over the stacked weight [w1 | w3] (E, D, 2F), and the SwiGLU takes
the stacked result (braid.kernels.swiglu.silu_mul_stacked). torch's grouped GEMM on sm90 runs
128 x 256 tiles: at hybrid-374m's F = 1408 the split GEMMs' last tile column is half empty,
where 2F = 2816 is eleven whole tiles; and the input gradient is one GEMM over K = 2F rather
than two GEMMs and a sum. The parameters stay w1 and w3 (checkpoints, tensor and expert
parallelism see them as before): the bf16 copy op writes both into the stacked copy in the
same pass as the cast, and its backward splits the stacked gradient while casting it back.
(Stacking was measured before, with inductor's SwiGLU backward on the stacked layout: the GEMMs
gained 0.1 ms a layer and that backward lost 0.075 ms; docs/benchmarks.md.)

The bf16 copies come from a custom op (`braid::expert_weights_bf16_stacked`) that
torch.compile keeps whole: aten's vectorized cast for w2 and one Triton pass for [w1 | w3]
(braid.kernels.moe.stack_triton). Split, aten's three casts took 0.053 ms for a hybrid-374m MoE
layer (8 experts of 1024 x 1408, on an H200) where inductor's generated casts took 0.070 ms.

Legend: N rows sorted by expert, D model dim, F expert hidden dim, E experts.
"""

from __future__ import annotations

import torch
from torch import Tensor

from braid.kernels.swiglu import silu_mul_stacked

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


@torch.library.custom_op("braid::expert_weights_bf16_stacked", mutates_args=())
def _expert_weights_bf16_stacked(w1_EDF: Tensor, w3_EDF: Tensor, w2_EFD: Tensor) -> tuple[Tensor, Tensor]:
    """bfloat16 copies: [w1 | w3] stacked along the last dimension (E, D, 2F), and w2."""
    if w1_EDF.is_cuda:  # one Triton pass (aten's copies into the halves are strided: twice as slow)
        from braid.kernels.moe.stack_triton import stack_cast

        w13_ED2F = stack_cast(w1_EDF, w3_EDF, torch.bfloat16)
    else:
        w13_ED2F = torch.cat([w1_EDF, w3_EDF], dim=-1).to(torch.bfloat16)
    return w13_ED2F, w2_EFD.to(torch.bfloat16, copy=True)


@_expert_weights_bf16_stacked.register_fake
def _(w1_EDF, w3_EDF, w2_EFD):
    num_experts, d_model, d_hidden = w1_EDF.shape
    w13_ED2F = w1_EDF.new_empty((num_experts, d_model, 2 * d_hidden), dtype=torch.bfloat16)
    return w13_ED2F, w2_EFD.new_empty(w2_EFD.shape, dtype=torch.bfloat16)


def _setup(ctx, inputs, output):
    ctx.dtypes = tuple(w.dtype for w in inputs)


def _grads(ctx, grad_w13_ED2F, grad_w2_EFD):
    dtype1, dtype3, dtype2 = ctx.dtypes
    grad_w1_EDF, grad_w3_EDF = grad_w13_ED2F.chunk(2, dim=-1)
    return grad_w1_EDF.to(dtype1), grad_w3_EDF.to(dtype3), grad_w2_EFD.to(dtype2)


_expert_weights_bf16_stacked.register_autograd(_grads, setup_context=_setup)


def grouped_swiglu_mm(
    x_sorted_ND: Tensor, counts_E: Tensor, w1_EDF: Tensor, w3_EDF: Tensor, w2_EFD: Tensor
) -> Tensor:
    """`braid.kernels.moe.grouped_swiglu` as grouped GEMMs (inputs validated; counts sum to N)."""
    offsets_E = counts_E.cumsum(0).to(torch.int32)
    with torch.autocast(x_sorted_ND.device.type, enabled=False):
        if all(w.dtype == torch.bfloat16 for w in (w1_EDF, w3_EDF, w2_EFD)):  # w2 as it is; w1 and w3 stacked
            w13_ED2F = torch.cat([w1_EDF, w3_EDF], dim=-1)
        else:
            w13_ED2F, w2_EFD = torch.ops.braid.expert_weights_bf16_stacked(w1_EDF, w3_EDF, w2_EFD)
        x_ND = x_sorted_ND.to(torch.bfloat16)
        h_N2F = torch._grouped_mm(x_ND, w13_ED2F, offs=offsets_E)
        y_ND = torch._grouped_mm(silu_mul_stacked(h_N2F), w2_EFD, offs=offsets_E)
    return y_ND.to(x_sorted_ND.dtype)
