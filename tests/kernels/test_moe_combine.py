"""The MoE's weighted combine: braid's Triton backward (braid.kernels.moe.combine_triton)
against float64, run by Triton's interpreter on CPU tensors (TRITON_INTERPRET=1 in a child
process), and the `weighted_combine` entry point's checks and CPU path.

Tolerances, relative to float64: dgates is a float32 sum over D, 1e-5; dy_sorted is one product
rounded once to y's dtype: 1e-6 for float32, 2**-8 (a bf16 ulp) for bf16.
"""

from __future__ import annotations

import pytest
import torch

from braid.kernels.moe import weighted_combine
from braid.kernels.moe.reference import weighted_combine_reference
from tests.helpers import relative_error, run_interpreted

CASES = [(37, 2, 200), (16, 1, 256), (5, 3, 1000)]  # (N, K, D)
DY_TOLERANCE = {torch.float32: 1e-6, torch.bfloat16: 2**-8}


def _inputs(N: int, K: int, D: int, dtype: torch.dtype, seed: int = 0):
    gen = torch.Generator().manual_seed(seed + N + K + D)
    order_S = torch.randperm(N * K, generator=gen)
    unsort_S = torch.empty_like(order_S)
    unsort_S[order_S] = torch.arange(N * K)
    y_sorted_SD = torch.randn(N * K, D, generator=gen).to(dtype)
    gates_NK = torch.rand(N, K, generator=gen)
    grad_ND = torch.randn(N, D, generator=gen)
    return y_sorted_SD, gates_NK, order_S, unsort_S, grad_ND


def _float64_grads(y_sorted_SD, gates_NK, order_S, unsort_S, grad_ND):
    y64 = y_sorted_SD.double().requires_grad_(True)
    gates64 = gates_NK.double().requires_grad_(True)
    out = weighted_combine_reference(y64, gates64, order_S, unsort_S)
    return torch.autograd.grad(out, (y64, gates64), grad_ND.double())


def check_interpreted_combine_backward() -> None:
    """Run in the child process: every CASES case with bf16 and float32 expert outputs."""
    import triton

    from braid.kernels.moe.combine_triton import combine_backward, supports

    assert triton.knobs.runtime.interpret, "TRITON_INTERPRET=1 must be set before triton is imported"
    for N, K, D in CASES:
        for dtype in (torch.float32, torch.bfloat16):
            y_sorted_SD, gates_NK, order_S, unsort_S, grad_ND = _inputs(N, K, D, dtype)
            assert supports(y_sorted_SD, gates_NK)
            dy_sorted_SD, dgates_NK = combine_backward(grad_ND, y_sorted_SD, gates_NK, unsort_S)
            want_dy, want_dgates = _float64_grads(y_sorted_SD, gates_NK, order_S, unsort_S, grad_ND)
            assert dy_sorted_SD.dtype == dtype and dgates_NK.dtype == torch.float32
            assert relative_error(dy_sorted_SD, want_dy) < DY_TOLERANCE[dtype], relative_error(dy_sorted_SD, want_dy)
            assert relative_error(dgates_NK, want_dgates) < 1e-5, relative_error(dgates_NK, want_dgates)
            print(f"ok N={N} K={K} D={D} {dtype}")
    dy, dgates = combine_backward(torch.zeros(0, 4), torch.zeros(0, 4), torch.zeros(0, 2), torch.zeros(0, dtype=torch.long))
    assert dy.shape == (0, 4) and dgates.shape == (0, 2)


def test_combine_backward_kernel_matches_float64_interpreted():
    run_interpreted("tests.kernels.test_moe_combine:check_interpreted_combine_backward", 2 * len(CASES))


def test_weighted_combine_on_the_cpu_is_the_gate_weighted_sum():
    y_sorted_SD, gates_NK, order_S, unsort_S, _ = _inputs(6, 2, 5, torch.float64)
    out = weighted_combine(y_sorted_SD, gates_NK.double(), order_S, unsort_S)
    y_NKD = y_sorted_SD[unsort_S].unflatten(0, (6, 2))
    torch.testing.assert_close(out, (y_NKD * gates_NK.double().unsqueeze(-1)).sum(1), rtol=0, atol=0)


def test_weighted_combine_names_what_to_change():
    y_sorted_SD, gates_NK, order_S, unsort_S, _ = _inputs(6, 2, 5, torch.float32)
    with pytest.raises(ValueError, match=r"unsort_S \(N\*K,\)"):
        weighted_combine(y_sorted_SD, gates_NK, order_S, unsort_S[:-1])
