"""braid's Triton causal conv (braid.kernels.ssd.conv_triton) against the reference, run by
Triton's interpreter on CPU tensors (TRITON_INTERPRET=1 in a child process: the flag must be
set before triton is imported). Outputs and the gradients of x, weight and bias; rows and
packed documents; with and without SiLU and bias; lengths that do not fill a tile.

Tolerances: float32 2e-5 relative (the same float32 sums in another order); bfloat16 inputs
1e-2 (x and y rounded to bfloat16 on both sides, float32 inside, except the kernel's
backward intermediate dpre, kept in bfloat16 for dx).
"""

from __future__ import annotations

import torch

from tests.helpers import relative_error, run_interpreted

CASES = [  # (B, T, C, K, docs, silu, bias)
    (2, 37, 40, 4, False, True, True),
    (2, 37, 40, 4, True, True, True),
    (1, 70, 130, 4, True, False, True),
    (2, 5, 8, 3, False, True, False),
    (1, 33, 16, 2, True, True, False),
]


def check_interpreted_conv_kernels() -> None:
    """Run in the child process: every CASES case in float32 and bfloat16."""
    import triton

    from braid.kernels.ssd.conv import causal_conv1d_reference
    from braid.kernels.ssd.conv_triton import conv_backward, conv_forward

    assert triton.knobs.runtime.interpret, "TRITON_INTERPRET=1 must be set before triton is imported"
    for B, T, C, K, docs, silu, with_bias in CASES:
        for dtype, tol in ((torch.float32, 2e-5), (torch.bfloat16, 1e-2)):
            gen = torch.Generator().manual_seed(T * C + K)
            x = torch.randn(B, T, C, generator=gen).to(dtype).requires_grad_(True)
            weight = torch.randn(C, K, generator=gen).requires_grad_(True)
            bias = torch.randn(C, generator=gen).requires_grad_(True) if with_bias else None
            doc_ids = (torch.rand(B, T, generator=gen) < 0.15).cumsum(dim=1) if docs else None
            activation = "silu" if silu else None
            dy = torch.randn(B, T, C, generator=gen).to(dtype)

            ref_y = causal_conv1d_reference(x, weight, bias, doc_ids_BT=doc_ids, activation=activation)
            leaves = [t for t in (x, weight, bias) if t is not None]
            ref_grads = torch.autograd.grad(ref_y, leaves, dy)
            with torch.no_grad():
                y = conv_forward(x, weight, bias, doc_ids, silu)
                dx, dw, db = conv_backward(dy, x, weight, bias, doc_ids, silu)
            grads = [dx, dw] + ([db] if with_bias else [])
            assert y.dtype == dtype and dx.dtype == dtype and dw.dtype == weight.dtype
            assert relative_error(y, ref_y) < tol, ("y", relative_error(y, ref_y))
            for name, got, want in zip(("dx", "dweight", "dbias"), grads, ref_grads):
                assert relative_error(got, want) < tol, (name, relative_error(got, want))
            print(f"ok B={B} T={T} C={C} K={K} docs={docs} silu={silu} bias={with_bias} {dtype}")


def test_triton_conv_kernels_match_the_reference_interpreted():
    run_interpreted("tests.kernels.test_conv_triton:check_interpreted_conv_kernels", 2 * len(CASES))
