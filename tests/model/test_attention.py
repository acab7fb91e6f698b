"""Tests for RoPE and the Attention mixer: an explicit banded-mask reference (outputs and
gradients), causality, packing, incremental decoding through the KV cache (full and ring
buffer), GQA vs repeated kv heads.

Legend: B batch, T time, D d_model, H query heads, J kv heads, K head dim.
Tolerances: float64 atol 1e-12 / rtol 1e-10 (differences are summation order only).
"""

import math

import pytest
import torch

from braid.model.attention import Attention, KVCache
from braid.model.config import AttentionConfig
from braid.model.rope import apply_rope, positions_from_doc_ids, rope_cos_sin

F64 = dict(atol=1e-12, rtol=1e-10)
D_MODEL = 32


def _layer(window=None, num_heads=4, num_kv_heads=2, head_dim=None, seed=0):
    torch.manual_seed(seed)
    cfg = AttentionConfig(num_heads=num_heads, num_kv_heads=num_kv_heads, head_dim=head_dim, rope_theta=500.0)
    layer = Attention(D_MODEL, cfg, window=window).double()
    layer.reset_parameters()
    return layer


def _x(B, T, seed=1):
    return torch.randn(B, T, D_MODEL, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def _rope_complex(x_BTHK, pos_BT, theta):
    """RoPE as complex rotation of the pairs (i, i + K/2) by pos * theta ** (-2i / K)."""
    half = x_BTHK.shape[-1] // 2
    freq_F = theta ** (-torch.arange(half, dtype=torch.float64) * 2 / x_BTHK.shape[-1])
    rotation_BTF = torch.polar(torch.ones(1, dtype=torch.float64), pos_BT[..., None].double() * freq_F)
    z_BTHF = torch.complex(x_BTHK[..., :half], x_BTHK[..., half:]) * rotation_BTF[:, :, None]
    return torch.cat((z_BTHF.real, z_BTHF.imag), dim=-1)


def _banded_reference(layer, x_BTD, window=None, doc_ids_BT=None):
    """The layer's function written out: projections, complex RoPE at in-document positions,
    repeated kv heads, and a mask built from index arithmetic."""
    B, T, _ = x_BTD.shape
    H, J, K = layer.num_heads, layer.num_kv_heads, layer.head_dim
    docs_BT = torch.zeros(B, T, dtype=torch.int64) if doc_ids_BT is None else doc_ids_BT
    same_doc_BTT = docs_BT[:, :, None] == docs_BT[:, None, :]
    t = torch.arange(T)
    first_BT = torch.stack([(same_doc_BTT[b] & (t[None] <= t[:, None])).int().argmax(-1) for b in range(B)])
    pos_BT = t - first_BT
    q = _rope_complex((x_BTD @ layer.wq.weight.T).view(B, T, H, K), pos_BT, layer.rope_theta)
    k = _rope_complex((x_BTD @ layer.wk.weight.T).view(B, T, J, K), pos_BT, layer.rope_theta)
    v = (x_BTD @ layer.wv.weight.T).view(B, T, J, K)
    k, v = k.repeat_interleave(H // J, dim=2), v.repeat_interleave(H // J, dim=2)
    band_TT = (t[None] <= t[:, None]) & ((t[:, None] - t[None] < window) if window else True)
    mask_B1TT = (band_TT & same_doc_BTT)[:, None]
    scores_BHTT = torch.einsum("bthk,bshk->bhts", q, k) / math.sqrt(K)
    o = torch.einsum("bhts,bshk->bthk", scores_BHTT.masked_fill(~mask_B1TT, -math.inf).softmax(-1), v)
    return o.reshape(B, T, H * K) @ layer.wo.weight.T


def _decode(layer, x_BTD, prompt_len, max_seq_len=None):
    """Prefill x[:, :prompt_len], then feed one token at a time; returns (y_BTD, cache)."""
    B, T, _ = x_BTD.shape
    cache = layer.new_cache(B, max_seq_len or T, x_BTD.device, x_BTD.dtype)
    with torch.no_grad():
        ys = [layer(x_BTD[:, :prompt_len], cache=cache)]
        ys += [layer(x_BTD[:, t : t + 1], cache=cache) for t in range(prompt_len, T)]
    return torch.cat(ys, dim=1), cache


def test_rope_matches_complex_rotation_and_is_relative():
    x = torch.randn(2, 9, 3, 16, dtype=torch.float64)
    pos = torch.randint(0, 5000, (2, 9))
    cos, sin = rope_cos_sin(pos, 16, 500.0, torch.float64)
    torch.testing.assert_close(apply_rope(x, cos, sin), _rope_complex(x, pos, 500.0), **F64)
    # <rope(q, p), rope(k, r)> depends on p - r only.
    q, k = torch.randn(2, 1, 1, 1, 16, dtype=torch.float64).unbind(0)
    dots = []
    for p, r in ((7, 3), (104, 100), (4, 0)):
        cq, sq = rope_cos_sin(torch.tensor([[p]]), 16, 500.0, torch.float64)
        ck, sk = rope_cos_sin(torch.tensor([[r]]), 16, 500.0, torch.float64)
        dots.append((apply_rope(q, cq, sq) * apply_rope(k, ck, sk)).sum())
    torch.testing.assert_close(torch.stack(dots), dots[0].expand(3), **F64)


def test_rope_tables_stay_one_opaque_op_under_compile():
    """torch.compile sees the cos/sin tables as one op (inductor must not inline the trig into
    every head's rotation) and computes what eager does; gradients flow to x only."""
    from torch._dynamo.testing import EagerAndRecordGraphs

    pos = torch.arange(6).expand(2, 6)
    x = torch.randn(2, 6, 3, 8, requires_grad=True)

    def rotate(x, pos):
        cos, sin = rope_cos_sin(pos, 8, 10_000.0, torch.float32)
        return apply_rope(x, cos, sin)

    recorder = EagerAndRecordGraphs()
    compiled = torch.compile(rotate, backend=recorder, fullgraph=True)
    torch.testing.assert_close(compiled(x, pos), rotate(x, pos), rtol=0, atol=0)
    targets = [str(node.target) for node in recorder.graphs[0].graph.nodes if node.op == "call_function"]
    assert sum("rope_tables" in t for t in targets) == 1
    assert not any(name in t for t in targets for name in ("cos", "sin"))
    grad = torch.autograd.grad(compiled(x, pos).sum(), x)[0]
    torch.testing.assert_close(grad, torch.autograd.grad(rotate(x, pos).sum(), x)[0])


def test_rope_dtype_and_errors():
    cos, sin = rope_cos_sin(torch.arange(4)[None], 8, 10_000.0, torch.bfloat16)
    assert cos.dtype == sin.dtype == torch.bfloat16 and cos.shape == (1, 4, 8)
    with pytest.raises(ValueError, match="even"):
        rope_cos_sin(torch.arange(4)[None], 7, 10_000.0, torch.float32)
    with pytest.raises(ValueError, match="shape"):
        apply_rope(torch.zeros(1, 4, 2, 8), cos[:, :3], sin[:, :3])


def test_positions_from_doc_ids_restart_per_document():
    doc_ids = torch.tensor([[0, 0, 0, 1, 1, 2, 2, 2, 2], [5, 5, 5, 5, 5, 5, 5, 5, 5]])
    want = torch.tensor([[0, 1, 2, 0, 1, 0, 1, 2, 3], list(range(9))])
    assert torch.equal(positions_from_doc_ids(doc_ids), want)
    assert torch.equal(positions_from_doc_ids(torch.tensor([[3, 1, 3]])), torch.tensor([[0, 0, 0]]))


@pytest.mark.parametrize("window", [None, 1, 4])
@pytest.mark.parametrize("T", [1, 23])
@pytest.mark.parametrize("packed", [False, True])
def test_layer_matches_banded_reference_with_gradients(window, T, packed):
    layer = _layer(window)
    x = _x(2, T).requires_grad_()
    doc_ids = torch.tensor([[0] * (T // 3) + [1] * (T - T // 3), [4] * T]) if packed else None
    y = layer(x, doc_ids)
    want = _banded_reference(layer, x, window, doc_ids)
    torch.testing.assert_close(y, want, **F64)
    grad_y = torch.randn_like(y)
    params = [x, *layer.parameters()]
    for got, expected in zip(torch.autograd.grad(y, params, grad_y), torch.autograd.grad(want, params, grad_y)):
        torch.testing.assert_close(got, expected, **F64)


def test_window_covering_sequence_equals_full_attention():
    x = _x(2, 17)
    torch.testing.assert_close(_layer(window=17)(x), _layer(window=None)(x), **F64)
    torch.testing.assert_close(_layer(window=64)(x), _layer(window=None)(x), **F64)


@pytest.mark.parametrize("window", [None, 5])
def test_causality(window):
    layer, x, t = _layer(window), _x(2, 30), 11
    y = layer(x)
    x[:, t] += 1.0
    y_changed = layer(x)
    assert torch.equal(y_changed[:, :t], y[:, :t])
    assert not torch.allclose(y_changed[:, t], y[:, t])


@pytest.mark.parametrize("window", [None, 5])
def test_packed_documents_equal_documents_alone(window):
    layer, lengths = _layer(window), (7, 12, 1)
    x = _x(1, sum(lengths))
    doc_ids = torch.repeat_interleave(torch.arange(3), torch.tensor(lengths))[None]
    packed = layer(x, doc_ids)
    for part in torch.arange(sum(lengths)).split(lengths):
        torch.testing.assert_close(packed[:, part], layer(x[:, part]), **F64)


@pytest.mark.parametrize("window", [None, 4, 16])
@pytest.mark.parametrize("prompt_len", [1, 6, 13])
def test_prefill_then_decode_equals_full_forward(window, prompt_len):
    layer, x = _layer(window), _x(2, 20)
    y, cache = _decode(layer, x, prompt_len, max_seq_len=24)
    torch.testing.assert_close(y, layer(x), **F64)
    assert cache.seq_len == 20


def test_ring_buffer_stays_at_window_slots_during_long_decode():
    window, T = 4, 31
    layer, x = _layer(window), _x(2, T)
    y, cache = _decode(layer, x, prompt_len=1)
    torch.testing.assert_close(y, layer(x), **F64)
    assert cache.k_BSJK.shape[1] == cache.v_BSJK.shape[1] == cache.pos_BS.shape[1] == window
    assert sorted(cache.pos_BS[0].tolist()) == list(range(T - window, T))


def test_prefill_longer_than_window_keeps_last_window_keys():
    window, T = 5, 13
    layer, x = _layer(window), _x(1, T)
    cache = layer.new_cache(1, 64, x.device, x.dtype)
    with torch.no_grad():
        layer(x, cache=cache)
    assert torch.equal(cache.pos_BS[0], torch.tensor([10, 11, 12, 8, 9]))  # position p in slot p % 5
    pos = torch.arange(T)[None]
    k_BTJK = apply_rope(layer.wk(x).view(1, T, 2, -1), *rope_cos_sin(pos, layer.head_dim, layer.rope_theta, x.dtype))
    torch.testing.assert_close(cache.k_BSJK, k_BTJK[:, cache.pos_BS[0]], **F64)


def test_chunked_prefill_and_bfloat16_cache():
    layer, x = _layer(window=6), _x(2, 19)
    cache = layer.new_cache(2, 19, x.device, x.dtype)
    with torch.no_grad():
        y = torch.cat([layer(chunk, cache=cache) for chunk in x.split([8, 3, 1, 7], dim=1)], dim=1)
    torch.testing.assert_close(y, layer(x), **F64)
    layer32 = _layer(window=None).float()
    cache16 = layer32.new_cache(2, 19, x.device, torch.bfloat16)
    assert cache16.k_BSJK.dtype == torch.bfloat16
    with torch.no_grad():
        y16 = torch.cat([layer32(chunk, cache=cache16) for chunk in x.float().split([8, 11], dim=1)], dim=1)
    # Keys and values rounded to bf16 (8 mantissa bits) once; outputs are O(0.1).
    torch.testing.assert_close(y16, layer32(x.float()), atol=5e-3, rtol=0)


def test_gqa_equals_repeating_kv_heads():
    gqa, mha = _layer(num_heads=6, num_kv_heads=2, head_dim=6), _layer(num_heads=6, num_kv_heads=6, head_dim=6)
    K = gqa.head_dim
    with torch.no_grad():
        mha.wq.weight.copy_(gqa.wq.weight)
        mha.wo.weight.copy_(gqa.wo.weight)
        for name in ("wk", "wv"):
            w_JKD = getattr(gqa, name).weight.view(2, K, D_MODEL)
            getattr(mha, name).weight.copy_(w_JKD.repeat_interleave(3, dim=0).reshape(6 * K, D_MODEL))
    x = _x(2, 15)
    torch.testing.assert_close(gqa(x), mha(x), **F64)


def test_meta_build_has_named_parameters_and_no_buffers():
    cfg = AttentionConfig(num_heads=4, num_kv_heads=2, head_dim=12)
    with torch.device("meta"):
        layer = Attention(D_MODEL, cfg, window=8)
    shapes = {name: tuple(p.shape) for name, p in layer.named_parameters()}
    assert shapes == {"wq.weight": (48, 32), "wk.weight": (24, 32), "wv.weight": (24, 32), "wo.weight": (32, 48)}
    assert list(layer.buffers()) == []
    assert isinstance(layer.new_cache(3, 16, "meta", torch.float32), KVCache)


def test_bad_calls_raise_value_error():
    layer, x = _layer(), _x(2, 6)
    cache = layer.new_cache(2, 8, x.device, x.dtype)
    with pytest.raises(ValueError, match="doc_ids"):
        layer(x, torch.zeros(2, 6, dtype=torch.int64), cache)
    with pytest.raises(ValueError, match="x must be"):
        layer(x[..., :-1])
    with torch.no_grad():
        layer(x, cache=cache)
        with pytest.raises(ValueError, match="max_seq_len"):
            layer(x[:, :3], cache=cache)
    with pytest.raises(ValueError, match="new_cache"):
        layer(x, cache=_layer(window=4).new_cache(2, 8, x.device, x.dtype))
