"""Mamba2 mixer: parameter contract, causality, document packing, cached decoding vs the full
forward, initialisation ranges, meta/bf16 builds.

Shape legend: B batch, T time, D d_model.
Tolerances: float64 comparisons use rtol=1e-9, atol=1e-10 (observed error ~1e-15).
"""

import copy
import math

import pytest
import torch
import torch.nn.functional as F

from braid.model.config import Mamba2Config
from braid.model.mamba2 import Mamba2, Mamba2Cache

F64 = dict(rtol=1e-9, atol=1e-10)
D_MODEL = 16
CFG = Mamba2Config(d_state=4, d_conv=4, expand=2, head_dim=8, n_groups=2, chunk_size=8)


def _layer(seed=0, dtype=torch.float64):
    torch.manual_seed(seed)
    layer = Mamba2(D_MODEL, CFG).to(dtype)
    # Larger-than-init projections so the conv, gate and state paths all move the output.
    with torch.no_grad():
        for name, p in layer.named_parameters():
            if name.endswith("proj.weight"):
                p.normal_(0.0, 0.3)
    return layer


def _x(B, T, seed=1, dtype=torch.float64):
    return torch.randn(B, T, D_MODEL, generator=torch.Generator().manual_seed(seed), dtype=torch.float64).to(dtype)


def test_parameter_names_and_shapes():
    layer = Mamba2(D_MODEL, CFG)
    E, H, GN = 32, 4, 8
    expected = {
        "z_proj.weight": (E, D_MODEL),
        "x_proj.weight": (E, D_MODEL),
        "B_proj.weight": (GN, D_MODEL),
        "C_proj.weight": (GN, D_MODEL),
        "dt_proj.weight": (H, D_MODEL),
        "conv_x.weight": (E, 4),
        "conv_x.bias": (E,),
        "conv_B.weight": (GN, 4),
        "conv_B.bias": (GN,),
        "conv_C.weight": (GN, 4),
        "conv_C.bias": (GN,),
        "dt_bias": (H,),
        "A_log": (H,),
        "D": (H,),
        "norm.weight": (E,),
        "out_proj.weight": (D_MODEL, E),
    }
    assert {n: tuple(p.shape) for n, p in layer.named_parameters()} == expected
    assert Mamba2.fp32_params == ("dt_bias", "A_log", "D")
    assert all(getattr(layer, n).dtype == torch.float32 for n in Mamba2.fp32_params)


def test_reset_parameters_ranges():
    layer = _layer()
    dt_H = F.softplus(layer.dt_bias)
    assert (dt_H >= CFG.dt_min * (1 - 1e-9)).all() and (dt_H <= CFG.dt_max * (1 + 1e-9)).all()
    A_H = torch.exp(layer.A_log)
    assert (A_H >= CFG.A_init_range[0]).all() and (A_H <= CFG.A_init_range[1]).all()
    assert (layer.D == 1).all() and (layer.norm.weight == 1).all()
    assert (layer.conv_x.weight.abs() <= 1 / math.sqrt(CFG.d_conv)).all() and (layer.conv_x.bias == 0).all()


@pytest.mark.parametrize("t", [0, 5, 8, 12])
def test_causality(t):
    layer = _layer()
    x = _x(2, 13)
    x_changed = x.clone()
    x_changed[:, t] += 1.0
    with torch.no_grad():
        y, y_changed = layer(x), layer(x_changed)
    assert torch.equal(y[:, :t], y_changed[:, :t])
    assert not torch.allclose(y[:, t], y_changed[:, t])


@pytest.mark.parametrize("split", [1, 3, 8, 11])
def test_packed_documents_equal_separate_runs(split):
    layer = _layer()
    T = 19
    x = _x(1, T)
    doc_ids_BT = (torch.arange(T) >= split).long()[None]
    with torch.no_grad():
        y_packed = layer(x, doc_ids_BT)
        y_first, y_second = layer(x[:, :split]), layer(x[:, split:])
    torch.testing.assert_close(y_packed, torch.cat([y_first, y_second], dim=1), **F64)


@pytest.mark.parametrize("prefill", [1, 3, 9])
def test_cached_decoding_matches_full_forward(prefill):
    layer = _layer()
    T = 16
    x = _x(2, T)
    cache = layer.new_cache(2, T, x.device, x.dtype)
    with torch.no_grad():
        y_full = layer(x)
        ys = [layer(x[:, :prefill], cache=cache)]
        for t in range(prefill, T):
            ys.append(layer(x[:, t : t + 1], cache=cache))
    torch.testing.assert_close(torch.cat(ys, dim=1), y_full, **F64)


def test_cache_continues_with_multi_token_calls():
    layer = _layer()
    x = _x(1, 20)
    cache = layer.new_cache(1, 20, x.device, x.dtype)
    with torch.no_grad():
        y_full = layer(x)
        pieces = [layer(x[:, a:b], cache=cache) for a, b in [(0, 2), (2, 3), (3, 12), (12, 20)]]
    torch.testing.assert_close(torch.cat(pieces, dim=1), y_full, **F64)


def test_cache_shapes_and_dtypes():
    cache = Mamba2(D_MODEL, CFG).new_cache(3, 64, "cpu", torch.bfloat16)
    assert isinstance(cache, Mamba2Cache)
    assert cache.conv_x_BCK.shape == (3, 32, 3) and cache.conv_x_BCK.dtype == torch.bfloat16
    assert cache.conv_B_BCK.shape == cache.conv_C_BCK.shape == (3, 8, 3)
    assert cache.ssm_state_BHPN.shape == (3, 4, 8, 4) and cache.ssm_state_BHPN.dtype == torch.float32


def test_doc_ids_with_cache_rejected():
    layer = _layer()
    x = _x(1, 4)
    cache = layer.new_cache(1, 4, x.device, x.dtype)
    with pytest.raises(ValueError, match="doc_ids must be None"):
        layer(x, torch.zeros(1, 4, dtype=torch.long), cache=cache)


def test_gradients_reach_every_parameter():
    layer = _layer()
    layer(_x(2, 10), _x(2, 10)[..., 0].gt(0).long().cumsum(-1)).square().sum().backward()
    for name, p in layer.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, name


def test_meta_build_and_bf16_forward():
    with torch.device("meta"):
        meta_layer = Mamba2(D_MODEL, CFG)
    assert all(p.is_meta for p in meta_layer.parameters())
    layer64 = _layer()
    layer = copy.deepcopy(layer64).to(torch.bfloat16)
    for name in Mamba2.fp32_params:
        getattr(layer, name).data = getattr(layer64, name).data.float()
    x = _x(2, 11, dtype=torch.bfloat16)
    with torch.no_grad():
        y, y64 = layer(x), layer64(x.double())
    assert y.dtype == torch.bfloat16 and torch.isfinite(y).all()
    # bf16 keeps 8 mantissa bits (~4e-3 relative per rounding); a handful of roundings in series.
    torch.testing.assert_close(y.double(), y64, rtol=0.05, atol=0.05)


@pytest.mark.parametrize("docs", [False, True])
def test_fused_xBC_projection_and_conv_equal_the_separate_ones(docs):
    """Training forwards run x, B and C through one GEMM and one conv over the concatenated
    weights; values and gradients equal the three separate projections and convs."""
    layer = _layer()
    x = _x(2, 13).requires_grad_(True)
    doc_ids_BT = torch.tensor([[0] * 5 + [1] * 8, [0] * 13]) if docs else None
    fused = layer._xBC_fused(x, doc_ids_BT)
    separate = [conv(proj(x), doc_ids_BT) for proj, conv in
                ((layer.x_proj, layer.conv_x), (layer.B_proj, layer.conv_B), (layer.C_proj, layer.conv_C))]
    params = [x, *layer.parameters()]
    cotangents = [torch.randn_like(t) for t in separate]
    for got, want in zip(fused, separate):
        torch.testing.assert_close(got, want, **F64)
    got_grads = torch.autograd.grad(fused, params, cotangents, allow_unused=True)
    want_grads = torch.autograd.grad(separate, params, cotangents, allow_unused=True)
    for got, want in zip(got_grads, want_grads):
        assert (got is None) == (want is None)
        if got is not None:
            torch.testing.assert_close(got, want, **F64)
