"""braid.kernels.moe.grouped_mm on this CPU (torch._grouped_mm runs on CPU tensors too):
grouped SwiGLU against the per-expert reference, eager and under torch.compile, with float32
and bf16 weights, and the bf16 weight op's casts and gradients.

Tolerance: 2e-2 relative (bf16 GEMM inputs and intermediates against the float32 reference).
"""

from __future__ import annotations

import pytest
import torch

from braid.kernels.moe.grouped_mm import grouped_swiglu_mm
from braid.kernels.moe.reference import grouped_swiglu_reference
from tests.helpers import relative_error

E, D, F = 4, 32, 24


def _leaves(seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    counts_E = torch.tensor([5, 0, 17, 10])
    x = torch.randn(int(counts_E.sum()), D, generator=gen).to(torch.bfloat16).requires_grad_(True)
    weights = [
        (torch.randn(E, D, F, generator=gen) * D**-0.5).requires_grad_(True),
        (torch.randn(E, D, F, generator=gen) * D**-0.5).requires_grad_(True),
        (torch.randn(E, F, D, generator=gen) * F**-0.5).requires_grad_(True),
    ]
    return counts_E, x, weights


@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
def test_grouped_swiglu_mm_matches_the_reference(compiled):
    counts_E, x, weights = _leaves()
    fn = torch.compile(grouped_swiglu_mm, fullgraph=True) if compiled else grouped_swiglu_mm
    y = fn(x, counts_E, *weights)
    ref = grouped_swiglu_reference(x, counts_E, *weights)
    assert y.dtype == torch.bfloat16 and y.shape == ref.shape
    assert relative_error(y, ref) < 2e-2
    dy = torch.randn(y.shape, generator=torch.Generator().manual_seed(1)).to(torch.bfloat16)
    grads = torch.autograd.grad(y, [x, *weights], dy)
    ref_grads = torch.autograd.grad(ref, [x, *weights], dy)
    for name, got, want in zip(("x", "w1", "w3", "w2"), grads, ref_grads):
        assert got.dtype == want.dtype, name
        assert relative_error(got, want) < 2e-2, (name, relative_error(got, want))


def test_bf16_weights_are_taken_as_they_are():
    counts_E, x, weights = _leaves()
    bf16 = [w.detach().to(torch.bfloat16).requires_grad_(True) for w in weights]
    y = grouped_swiglu_mm(x, counts_E, *bf16)
    assert relative_error(y, grouped_swiglu_reference(x, counts_E, *bf16)) < 2e-2
    grads = torch.autograd.grad(y.float().sum(), bf16)
    assert all(g.dtype == torch.bfloat16 and g.shape == w.shape for g, w in zip(grads, bf16))


def test_expert_weights_op_stacks_casts_and_splits_gradients_back():
    _, _, (w1, w3, w2) = _leaves()
    w13, w2_bf16 = torch.ops.braid.expert_weights_bf16_stacked(w1, w3, w2)
    assert w13.dtype == w2_bf16.dtype == torch.bfloat16 and w13.shape == (E, D, 2 * F)
    assert torch.equal(w13, torch.cat([w1, w3], dim=-1).to(torch.bfloat16))
    assert torch.equal(w2_bf16, w2.to(torch.bfloat16))
    cotangents = [torch.randn(w13.shape).to(torch.bfloat16), torch.randn(w2.shape).to(torch.bfloat16)]
    grad_w1, grad_w3, grad_w2 = torch.autograd.grad((w13, w2_bf16), (w1, w3, w2), cotangents)
    assert all(g.dtype == torch.float32 for g in (grad_w1, grad_w3, grad_w2))
    assert torch.equal(grad_w1, cotangents[0][..., :F].float())
    assert torch.equal(grad_w3, cotangents[0][..., F:].float())
    assert torch.equal(grad_w2, cotangents[1].float())
    torch.library.opcheck(torch.ops.braid.expert_weights_bf16_stacked, (w1, w3, w2))


def check_interpreted_stack_cast() -> None:
    """Run in the child process: the stacked cast equals torch.cat then the cast. float32 bit for
    bit; bf16 within one bf16 ulp, since the interpreter truncates to bf16 where the GPU (and
    torch) round to nearest even (the GPU test checks bf16 bit for bit)."""
    import triton

    from braid.kernels.moe.stack_triton import stack_cast

    assert triton.knobs.runtime.interpret, "TRITON_INTERPRET=1 must be set before triton is imported"
    for shape in ((3, 17, 24), (2, 5, 200), (40, 8)):
        gen = torch.Generator().manual_seed(sum(shape))
        a, b = torch.randn(shape, generator=gen), torch.randn(shape, generator=gen)
        want = torch.cat([a, b], dim=-1)
        assert torch.equal(stack_cast(a, b, torch.float32), want)
        got = stack_cast(a, b, torch.bfloat16)
        assert got.dtype == torch.bfloat16 and ((got.float() - want).abs() <= want.abs() * 2**-7).all()
        print(f"ok {shape}")
    with pytest.raises(ValueError, match="one shape"):
        stack_cast(torch.zeros(2, 3), torch.zeros(3, 2), torch.bfloat16)


def test_stack_cast_kernel_matches_cat_interpreted():
    from tests.helpers import run_interpreted

    run_interpreted("tests.kernels.test_grouped_mm:check_interpreted_stack_cast", 3)
