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


def test_bf16_weights_are_used_as_they_are():
    counts_E, x, weights = _leaves()
    bf16 = [w.detach().to(torch.bfloat16).requires_grad_(True) for w in weights]
    y = grouped_swiglu_mm(x, counts_E, *bf16)
    assert relative_error(y, grouped_swiglu_reference(x, counts_E, *bf16)) < 2e-2
    grads = torch.autograd.grad(y.float().sum(), bf16)
    assert all(g.dtype == torch.bfloat16 and g.shape == w.shape for g, w in zip(grads, bf16))


def test_expert_weights_op_casts_and_casts_gradients_back():
    _, _, weights = _leaves()
    copies = torch.ops.braid.expert_weights_bf16(*weights)
    for copy, weight in zip(copies, weights):
        assert copy.dtype == torch.bfloat16 and torch.equal(copy, weight.to(torch.bfloat16))
    cotangents = [torch.randn(w.shape).to(torch.bfloat16) for w in weights]
    for grad, cotangent in zip(torch.autograd.grad(copies, weights, cotangents), cotangents):
        assert grad.dtype == torch.float32 and torch.equal(grad, cotangent.float())
    torch.library.opcheck(torch.ops.braid.expert_weights_bf16, tuple(weights))
