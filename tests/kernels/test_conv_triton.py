"""braid's Triton causal conv (braid.kernels.ssd.conv_triton) against the reference, run by
Triton's interpreter on CPU tensors (TRITON_INTERPRET=1 in a child process: the flag must be
set before triton is imported). Outputs and the gradients of x, weight and bias; rows and
packed documents; with and without SiLU and bias; lengths that do not fill a tile.

Tolerances: float32 2e-5 relative (the same float32 sums in another order); bfloat16 inputs
1e-2 (x and y rounded to bfloat16 on both sides, float32 inside, except the kernel's
backward intermediate dpre, kept in bfloat16 for dx).
"""

from __future__ import annotations

import pytest
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
                # The first pass walking 3 tiles per program (the last program's tiles partly past T),
                # the second on tiles of its own
                looped = conv_backward(dy, x, weight, bias, doc_ids, silu, block_t=8, block_c=16, steps=3,
                                       dx_tiles=(16, 8, 2))
            grads = [dx, dw] + ([db] if with_bias else [])
            assert y.dtype == dtype and dx.dtype == dtype and dw.dtype == weight.dtype
            assert relative_error(y, ref_y) < tol, ("y", relative_error(y, ref_y))
            for name, got, looped_got, want in zip(("dx", "dweight", "dbias"), grads, looped, ref_grads):
                assert relative_error(got, want) < tol, (name, relative_error(got, want))
                assert relative_error(looped_got, want) < tol, (name, "looped", relative_error(looped_got, want))
            print(f"ok B={B} T={T} C={C} K={K} docs={docs} silu={silu} bias={with_bias} {dtype}")


def test_triton_conv_kernels_match_the_reference_interpreted():
    run_interpreted("tests.kernels.test_conv_triton:check_interpreted_conv_kernels", 2 * len(CASES))


@pytest.mark.parametrize("documents", [False, True], ids=["rows", "documents"])
def test_looped_first_backward_pass_compiles_for_hopper(documents):
    """The looped first pass (tuples of per-tap accumulators carried through its loop) compiles
    to sm90 machine code with this machine's Triton and ptxas, no GPU needed (hybrid-374m's conv:
    four taps, bf16 x)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from braid.kernels.ssd import conv_triton

    fn = conv_triton._dpre_loop_kernel
    constants = dict(K=4, BT=32, BC=64, STEPS=8, HAS_BIAS=True, HAS_DOC=documents, SILU=True)
    types = dict(X="*bf16", W="*fp32", BIAS="*fp32", DOC="*i64" if documents else "*bf16", DY="*bf16", DPRE="*bf16",
                 DW_PARTIAL="*fp32", DB_PARTIAL="*fp32", **dict.fromkeys(constants, "constexpr"))
    signature = {name: types.get(name, "i32") for name in fn.arg_names}
    compiled = triton.compile(ASTSource(fn=fn, signature=signature, constexprs=constants),
                              target=GPUTarget("cuda", 90, 32), options={"num_warps": 4})
    assert len(compiled.asm["cubin"]) > 0
