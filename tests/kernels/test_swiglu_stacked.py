"""braid's stacked SwiGLU kernels (braid.kernels.swiglu.stacked_triton) against float64, run by
Triton's interpreter on CPU tensors (TRITON_INTERPRET=1 in a child process), and the
`silu_mul_stacked` entry point's checks and CPU path.

Tolerances (relative to float64): float32 inputs 1e-6 (float32 element-wise work); bf16 1e-2
(each output rounded once to bf16, whose ulp is 2**-8).
"""

from __future__ import annotations

import pytest
import torch

from braid.kernels.swiglu import silu_mul, silu_mul_stacked
from tests.helpers import relative_error, run_interpreted

CASES = [  # (N, F, row padding): partial row and column blocks, a row stride wider than 2F
    (37, 24, 0),
    (16, 128, 0),
    (70, 200, 6),
]
TOLERANCE = {torch.float32: 1e-6, torch.bfloat16: 1e-2}


def _float64_reference(h64, dout64):
    h64 = h64.clone().requires_grad_(True)
    gate, up = h64.chunk(2, dim=-1)
    out = torch.nn.functional.silu(gate) * up
    (dh,) = torch.autograd.grad(out, h64, dout64)
    return out.detach(), dh


def check_interpreted_stacked_kernels() -> None:
    """Run in the child process: every CASES case in float32 and bf16."""
    import triton

    from braid.kernels.swiglu.stacked_triton import silu_mul_stacked_backward, silu_mul_stacked_forward, supports

    assert triton.knobs.runtime.interpret, "TRITON_INTERPRET=1 must be set before triton is imported"
    for N, F, pad in CASES:
        for dtype in (torch.float32, torch.bfloat16):
            gen = torch.Generator().manual_seed(N + F)
            h = (torch.randn(N, 2 * F + pad, generator=gen) * 3).to(dtype)[:, : 2 * F]
            dout = torch.randn(N, F, generator=gen).to(dtype)
            assert supports(h)
            out = silu_mul_stacked_forward(h)
            dh = silu_mul_stacked_backward(dout, h)
            want_out, want_dh = _float64_reference(h.double(), dout.double())
            assert out.dtype == dh.dtype == dtype and out.shape == (N, F) and dh.shape == (N, 2 * F)
            assert relative_error(out, want_out) < TOLERANCE[dtype], relative_error(out, want_out)
            assert relative_error(dh, want_dh) < TOLERANCE[dtype], relative_error(dh, want_dh)
            print(f"ok N={N} F={F} pad={pad} {dtype}")
    empty = torch.zeros(0, 8)
    assert silu_mul_stacked_forward(empty).shape == (0, 4)
    assert silu_mul_stacked_backward(torch.zeros(0, 4), empty).shape == (0, 8)


def test_stacked_swiglu_kernels_match_float64_interpreted():
    run_interpreted("tests.kernels.test_swiglu_stacked:check_interpreted_stacked_kernels", 2 * len(CASES))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_silu_mul_stacked_is_silu_mul_of_the_halves_on_the_cpu(dtype):
    h = torch.randn(9, 12).to(dtype).requires_grad_(True)
    out = silu_mul_stacked(h)
    gate, up = h.detach().chunk(2, dim=-1)
    gate, up = gate.clone().requires_grad_(True), up.clone().requires_grad_(True)
    want = silu_mul(gate, up)
    # The CPU's silu differs in the last float32 bits between contiguous (vectorized) and strided
    # inputs, which can also move a bf16 rounding by one ulp (2**-8).
    tolerance = 1e-6 if dtype == torch.float32 else 2**-8
    assert out.dtype == dtype and relative_error(out, want) < tolerance
    dout = torch.randn(out.shape).to(dtype)
    (dh,) = torch.autograd.grad(out, h, dout)
    assert relative_error(dh, torch.cat(torch.autograd.grad(want, (gate, up), dout), dim=-1)) < tolerance


@pytest.mark.parametrize("shape", [(4, 7), (2, 3, 8)])
def test_silu_mul_stacked_names_what_to_change(shape):
    with pytest.raises(ValueError, match=r"\(rows, 2F\)"):
        silu_mul_stacked(torch.randn(shape))
