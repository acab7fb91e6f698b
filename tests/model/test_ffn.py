"""SwiGLU and MatFormer nested FFN.

Legend: B batch, T time, D d_model, F hidden width, M prefix width.
Tolerances: float64 parity to rtol 1e-12 / atol 1e-12 (the same matmuls in a different order of
slicing; anything larger is a bug).
"""

import pytest
import torch
import torch.nn.functional as F

from braid.model.config import MatFormerConfig
from braid.model.matformer import MatFormerFFN, slice_matformer
from braid.model.mlp import SwiGLU

D_MODEL = 8
TOL = dict(rtol=1e-12, atol=1e-12)


def _x_BTD(seed: int = 0) -> torch.Tensor:
    return torch.randn(2, 5, D_MODEL, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def test_swiglu_matches_formula():
    torch.manual_seed(0)
    mlp = SwiGLU(D_MODEL, 12).double()
    x_BTD = _x_BTD()
    w1_FD, w3_FD, w2_DF = mlp.w1.weight, mlp.w3.weight, mlp.w2.weight
    expected_BTD = (F.silu(x_BTD @ w1_FD.T) * (x_BTD @ w3_FD.T)) @ w2_DF.T
    torch.testing.assert_close(mlp(x_BTD), expected_BTD, **TOL)
    assert tuple(w1_FD.shape) == (12, D_MODEL) and tuple(w2_DF.shape) == (D_MODEL, 12)


def test_swiglu_rejects_wrong_d_model():
    with pytest.raises(ValueError, match="d_model=8"):
        SwiGLU(D_MODEL, 12)(torch.randn(1, 2, D_MODEL + 1))


def test_reset_parameters_draws_std_002():
    mlp = SwiGLU(64, 256)
    for linear in (mlp.w1, mlp.w3, mlp.w2):
        linear.weight.data.fill_(1.0)
    mlp.reset_parameters()
    for linear in (mlp.w1, mlp.w3, mlp.w2):
        assert abs(linear.weight.std().item() - 0.02) < 0.002  # 16384 draws: std error ~1e-4
        assert abs(linear.weight.mean().item()) < 0.002


CFG = MatFormerConfig(d_ff=16, granularities=(0.25, 0.5, 0.75, 1.0))


@pytest.mark.parametrize("width", CFG.granularities)
def test_matformer_width_equals_sliced_swiglu(width):
    torch.manual_seed(0)
    ffn = MatFormerFFN(D_MODEL, CFG).double()
    sliced = slice_matformer(ffn, width)
    num_hidden = CFG.hidden(width)
    assert isinstance(sliced, SwiGLU) and sliced.w1.weight.dtype == torch.float64
    assert sum(p.numel() for p in sliced.parameters()) == 3 * D_MODEL * num_hidden

    x_BTD = _x_BTD()
    y_BTD = ffn(x_BTD, width=width)
    torch.testing.assert_close(y_BTD, sliced(x_BTD), **TOL)

    grad_BTD = torch.randn_like(y_BTD)
    y_BTD.backward(grad_BTD)
    sliced(x_BTD).backward(grad_BTD)
    torch.testing.assert_close(ffn.w1.weight.grad[:num_hidden], sliced.w1.weight.grad, **TOL)
    torch.testing.assert_close(ffn.w3.weight.grad[:num_hidden], sliced.w3.weight.grad, **TOL)
    torch.testing.assert_close(ffn.w2.weight.grad[:, :num_hidden], sliced.w2.weight.grad, **TOL)
    assert torch.all(ffn.w1.weight.grad[num_hidden:] == 0)
    assert torch.all(ffn.w3.weight.grad[num_hidden:] == 0)
    assert torch.all(ffn.w2.weight.grad[:, num_hidden:] == 0)
    assert ffn.w1.weight.grad[:num_hidden].abs().sum() > 0


def test_matformer_full_width_is_default_and_a_plain_swiglu():
    torch.manual_seed(0)
    ffn = MatFormerFFN(D_MODEL, CFG).double()
    mlp = SwiGLU(D_MODEL, CFG.d_ff).double()
    mlp.load_state_dict(ffn.state_dict())
    x_BTD = _x_BTD()
    torch.testing.assert_close(ffn(x_BTD), ffn(x_BTD, width=1.0), **TOL)
    torch.testing.assert_close(ffn(x_BTD), mlp(x_BTD), **TOL)


def test_sliced_weights_are_copies():
    ffn = MatFormerFFN(D_MODEL, CFG)
    sliced = slice_matformer(ffn, 0.5)
    sliced.w1.weight.data.zero_()
    assert ffn.w1.weight[: CFG.hidden(0.5)].abs().sum() > 0


@pytest.mark.parametrize("width", [0.3, 0.0, 2.0])
def test_matformer_invalid_width_raises_naming_granularities(width):
    ffn = MatFormerFFN(D_MODEL, CFG)
    with pytest.raises(ValueError, match=r"granularities=\(0\.25, 0\.5, 0\.75, 1\.0\)"):
        ffn(torch.randn(1, 3, D_MODEL), width=width)
    with pytest.raises(ValueError, match="granularities"):
        slice_matformer(ffn, width)


def test_matformer_width_is_not_state():
    torch.manual_seed(0)
    ffn = MatFormerFFN(D_MODEL, CFG).double()
    x_BTD = _x_BTD()
    full_BTD = ffn(x_BTD)
    ffn(x_BTD, width=0.25)
    torch.testing.assert_close(ffn(x_BTD), full_BTD, **TOL)
    assert set(ffn.state_dict()) == {"w1.weight", "w3.weight", "w2.weight"}
