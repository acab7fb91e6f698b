"""braid's Triton router logits (braid.kernels.moe.router_triton) against float64 products, run
by Triton's interpreter on CPU tensors (TRITON_INTERPRET=1 in a child process), and the
`router_logits` entry point's checks and CPU path.

Tolerances: the logits, the weight gradient and a float32 dx are float32 sums of exact bf16 part
products that leave out terms below 2**-24 of the whole, 1e-5 relative to float64; dx in
bfloat16 is rounded once, 1e-2 (a bf16 ulp is 2**-8).
"""

from __future__ import annotations

import pytest
import torch

from braid.kernels.moe import router_logits, router_logits_reference
from tests.helpers import relative_error, run_interpreted

CASES = [  # (N, D, E)
    (300, 72, 8),
    (1000, 130, 5),
    (37, 64, 64),
    (129, 16, 1),
]


def check_interpreted_router_kernels() -> None:
    """Run in the child process: every CASES case with bf16 and float32 x (float32 weight)."""
    import triton

    from braid.kernels.moe.router_triton import router_backward, router_forward, supports

    assert triton.knobs.runtime.interpret, "TRITON_INTERPRET=1 must be set before triton is imported"
    for N, D, E in CASES:
        for x_dtype, dx_tol in ((torch.bfloat16, 1e-2), (torch.float32, 1e-5)):
            gen = torch.Generator().manual_seed(N + D + E)
            x = torch.randn(N, D, generator=gen).to(x_dtype)
            weight = torch.randn(E, D, generator=gen)
            dlogits = torch.randn(N, E, generator=gen)
            assert supports(x, weight)
            x64, w64, dl64 = x.double(), weight.double(), dlogits.double()
            logits = router_forward(x, weight)
            dx, dweight = router_backward(dlogits, x, weight)
            assert logits.dtype == torch.float32 and dx.dtype == x_dtype and dweight.dtype == weight.dtype
            assert relative_error(logits, x64 @ w64.T) < 1e-5, relative_error(logits, x64 @ w64.T)
            assert relative_error(dweight, dl64.T @ x64) < 1e-5, relative_error(dweight, dl64.T @ x64)
            assert relative_error(dx, dl64 @ w64) < dx_tol, relative_error(dx, dl64 @ w64)
            print(f"ok N={N} D={D} E={E} {x_dtype}")
    logits = router_forward(torch.zeros(0, 8), torch.ones(3, 8))  # a rank with no tokens
    dx, dweight = router_backward(torch.zeros(0, 3), torch.zeros(0, 8), torch.ones(3, 8))
    assert logits.shape == (0, 3) and dx.shape == (0, 8) and torch.equal(dweight, torch.zeros(3, 8))


def test_triton_router_kernels_match_float64_interpreted():
    run_interpreted("tests.kernels.test_router:check_interpreted_router_kernels", 2 * len(CASES))


def test_router_logits_are_float32_under_autocast_on_the_cpu():
    x = torch.randn(40, 24).to(torch.bfloat16)
    weight = torch.randn(6, 24, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = router_logits(x, weight)
    assert logits.dtype == torch.float32
    torch.testing.assert_close(logits, x.double() @ weight.double().T, rtol=1e-5, atol=1e-5, check_dtype=False)
    logits.sum().backward()
    assert weight.grad.dtype == torch.float32
    assert router_logits_reference(x.double(), weight.double()).dtype == torch.float64


def test_router_logits_names_the_bad_shape():
    with pytest.raises(ValueError, match=r"router_logits: x must be \(tokens, d_model\)"):
        router_logits(torch.randn(4, 8), torch.randn(3, 9))
    with pytest.raises(ValueError, match="router_logits"):
        router_logits(torch.randn(2, 4, 8), torch.randn(3, 8))
