"""GatedLinearAttention mixer: wiring vs the recurrence, causality, packing, incremental decoding.

Legend: B batch, T time, D d_model, H heads, K key head dim, V value head dim.
Tolerances: float64 comparisons use atol=rtol=1e-10 (observed errors ~1e-15).
"""

import pytest
import torch
import torch.nn.functional as F

from braid.kernels.gla.reference import gla_naive
from braid.kernels.norm import gated_rms_norm
from braid.model.config import GLAConfig
from braid.model.gla import GLACache, GatedLinearAttention

F64 = dict(atol=1e-10, rtol=1e-10)
D, CHUNK = 16, 8
CFG = GLAConfig(num_heads=2, expand_k=0.5, expand_v=1.0, gate_low_rank=4, chunk_size=CHUNK)


def make_layer(seed=0):
    torch.manual_seed(seed)
    layer = GatedLinearAttention(D, CFG).double()
    layer.reset_parameters(std=0.3)
    with torch.no_grad():
        layer.norm.weight.uniform_(0.5, 1.5)
        layer.gk_up.bias.uniform_(-2.0, 2.0)
    return layer


def make_x(B, T, seed=1):
    return torch.randn(B, T, D, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def test_parameter_names_and_shapes_on_meta():
    with torch.device("meta"):
        layer = GatedLinearAttention(D, CFG)
    shapes = {name: tuple(p.shape) for name, p in layer.named_parameters()}
    assert shapes == {
        "q_proj.weight": (8, D),
        "k_proj.weight": (8, D),
        "v_proj.weight": (D, D),
        "g_proj.weight": (D, D),
        "gk_down.weight": (4, D),
        "gk_up.weight": (8, 4),
        "gk_up.bias": (8,),
        "norm.weight": (D,),
        "o_proj.weight": (D, D),
    }


def test_forward_matches_recurrence_wiring():
    """y = o_proj(RMSNorm_per_head(o * silu(g_proj x))), o from the naive recurrence."""
    layer, x_BTD = make_layer(), make_x(2, 2 * CHUNK + 3)
    H, K, V = 2, 4, 8
    q_BTHK, k_BTHK = (F.linear(x_BTD, p.weight).unflatten(-1, (H, K)) for p in (layer.q_proj, layer.k_proj))
    v_BTHV = F.linear(x_BTD, layer.v_proj.weight).unflatten(-1, (H, V))
    gate_BTK = F.linear(F.linear(x_BTD, layer.gk_down.weight), layer.gk_up.weight, layer.gk_up.bias)
    g_BTHK = (F.logsigmoid(gate_BTK) / CFG.gate_logit_normalizer).unflatten(-1, (H, K))
    o_BTV = gla_naive(q_BTHK, k_BTHK, v_BTHV, g_BTHK).flatten(-2)
    gate_BTV = F.linear(x_BTD, layer.g_proj.weight)
    gated_BTV = gated_rms_norm(o_BTV, gate_BTV, layer.norm.weight, 1e-5, V, norm_before_gate=True)
    want_BTD = F.linear(gated_BTV, layer.o_proj.weight)
    torch.testing.assert_close(layer(x_BTD), want_BTD, **F64)


def test_causal():
    layer, x_BTD = make_layer(), make_x(2, 2 * CHUNK + 5)
    t = CHUNK + 2
    changed_BTD = x_BTD.clone()
    changed_BTD[:, t:] = make_x(2, x_BTD.shape[1] - t, seed=5)
    y_BTD, y_changed_BTD = layer(x_BTD), layer(changed_BTD)
    torch.testing.assert_close(y_changed_BTD[:, :t], y_BTD[:, :t], atol=0, rtol=0)
    assert not torch.allclose(y_changed_BTD[:, t], y_BTD[:, t])


@pytest.mark.parametrize("split", [3, CHUNK, CHUNK + 1])
def test_packed_documents_equal_separate_runs(split):
    layer, x_BTD = make_layer(), make_x(1, 2 * CHUNK + 3)
    doc_ids_BT = torch.zeros(1, x_BTD.shape[1], dtype=torch.long)
    doc_ids_BT[:, split:] = 7
    y_BTD = layer(x_BTD, doc_ids_BT)
    torch.testing.assert_close(y_BTD[:, :split], layer(x_BTD[:, :split]), **F64)
    torch.testing.assert_close(y_BTD[:, split:], layer(x_BTD[:, split:]), **F64)


@pytest.mark.parametrize("prompt_len", [1, 5, CHUNK + 1])
def test_incremental_decoding_equals_full_forward(prompt_len):
    """Prefill `prompt_len` tokens, then T=1 steps and one 3-token call, through one cache."""
    B, T = 2, 2 * CHUNK + 4
    layer, x_BTD = make_layer(), make_x(B, T)
    want_BTD = layer(x_BTD)
    cache = layer.new_cache(B, T, device="cpu", dtype=torch.float64)
    assert isinstance(cache, GLACache) and cache.state_BHKV.dtype == torch.float64
    pieces = [layer(x_BTD[:, :prompt_len], cache=cache)]
    for t in range(prompt_len, T - 3):
        pieces.append(layer(x_BTD[:, t : t + 1], cache=cache))
    pieces.append(layer(x_BTD[:, T - 3 :], cache=cache))
    torch.testing.assert_close(torch.cat(pieces, dim=1), want_BTD, **F64)


def test_cache_state_is_float32_for_low_precision_models():
    layer = GatedLinearAttention(D, CFG)
    cache = layer.new_cache(3, 64, device="cpu", dtype=torch.bfloat16)
    assert cache.state_BHKV.shape == (3, 2, 4, 8) and cache.state_BHKV.dtype == torch.float32


def test_bad_inputs_raise_value_error():
    layer, x_BTD = make_layer(), make_x(1, 4)
    cache = layer.new_cache(1, 4, device="cpu", dtype=torch.float64)
    with pytest.raises(ValueError, match="doc_ids_BT must be None"):
        layer(x_BTD, torch.zeros(1, 4, dtype=torch.long), cache=cache)
    with pytest.raises(ValueError, match=r"\(B, T, 16\)"):
        layer(x_BTD[..., :8])
