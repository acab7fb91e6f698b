"""Nested heads (the second elastic axis): attention by KV head, Mamba-2 by B/C group.

A layer run with `heads=f` must equal a standalone layer built with only that many KV heads
(B/C groups) and holding the sliced weights, with packed documents and through the
inference cache; the per-layer counts of an extracted config must build the model that
num_params counts.

Legend: B batch, T time, D d_model.
Tolerances: float64, rtol/atol 1e-12 (the same matmuls on copied weight prefixes; anything
larger is a bug).
"""

import pytest
import torch

from braid.model import ModelConfig, Submodel, build_model, num_params
from braid.model.attention import Attention
from braid.model.config import AttentionConfig, Mamba2Config, MatFormerConfig, nested_count
from braid.model.mamba2 import Mamba2

TOL = dict(rtol=1e-12, atol=1e-12)
D_MODEL = 16
T = 13


def _x(B=2, seed=1):
    return torch.randn(B, T, D_MODEL, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def _doc_ids():
    return torch.tensor([[0] * 5 + [1] * (T - 5), [0] * T])


def _attention(window=None, num_kv_heads=None):
    torch.manual_seed(0)
    cfg = AttentionConfig(num_heads=8, num_kv_heads=4, head_dim=4)
    layer = Attention(D_MODEL, cfg, window=window, num_kv_heads=num_kv_heads).double()
    layer.reset_parameters()
    return layer


def _mamba2(n_groups=None):
    torch.manual_seed(0)
    cfg = Mamba2Config(d_state=4, head_dim=4, n_groups=4, chunk_size=4)  # 8 heads, 2 per group
    layer = Mamba2(D_MODEL, cfg, n_groups=n_groups).double()
    layer.reset_parameters()
    with torch.no_grad():
        layer.norm.weight.uniform_(0.5, 1.5)  # not all ones, so slicing it is tested
    return layer


def _standalone(layer, heads, build):
    sliced = build()
    sliced.load_state_dict(layer.sliced_state_dict(heads), strict=True)
    return sliced


@pytest.mark.parametrize("window", [None, 4])
@pytest.mark.parametrize("heads, num_kv", [(0.25, 1), (0.5, 2), (0.75, 3)])
def test_attention_heads_equal_a_layer_with_only_those_heads(window, heads, num_kv):
    layer = _attention(window)
    sliced = _standalone(layer, heads, lambda: _attention(window, num_kv_heads=num_kv))
    assert sliced.num_heads == 2 * num_kv and sliced.wq.weight.shape == (2 * num_kv * 4, D_MODEL)
    x_BTD = _x()
    with torch.no_grad():
        torch.testing.assert_close(layer(x_BTD, _doc_ids(), heads=heads), sliced(x_BTD, _doc_ids()), **TOL)


@pytest.mark.parametrize("heads, n_groups", [(0.25, 1), (0.5, 2)])
def test_mamba2_heads_equal_a_layer_with_only_those_groups(heads, n_groups):
    layer = _mamba2()
    sliced = _standalone(layer, heads, lambda: _mamba2(n_groups=n_groups))
    assert sliced.num_heads == 2 * n_groups and sliced.out_proj.weight.shape == (D_MODEL, 2 * n_groups * 4)
    x_BTD = _x()
    with torch.no_grad():
        torch.testing.assert_close(layer(x_BTD, _doc_ids(), heads=heads), sliced(x_BTD, _doc_ids()), **TOL)


def test_full_heads_is_the_plain_forward():
    for layer in (_attention(), _mamba2()):
        x_BTD = _x()
        with torch.no_grad():
            assert torch.equal(layer(x_BTD, heads=1.0), layer(x_BTD))


@pytest.mark.parametrize("make", [lambda: _attention(), lambda: _attention(window=4), lambda: _mamba2()])
def test_cached_decoding_with_heads_matches_full_forward(make):
    """The universal layer decodes at heads=0.5 through views of its full cache."""
    layer = make()
    x_BTD = _x()
    with torch.no_grad():
        expected_BTD = layer(x_BTD, heads=0.5)
        cache = layer.new_cache(2, T, x_BTD.device, x_BTD.dtype)
        steps = [layer(x_BTD[:, :6], cache=cache, heads=0.5)]
        steps += [layer(x_BTD[:, t : t + 1], cache=cache, heads=0.5) for t in range(6, T)]
    torch.testing.assert_close(torch.cat(steps, dim=1), expected_BTD, **TOL)


@pytest.mark.parametrize(
    "make, grad", [(_attention, lambda m: m.wk.weight.grad), (_mamba2, lambda m: m.A_log.grad)]
)
def test_dropped_heads_get_no_gradient(make, grad):
    layer = make()
    layer(_x(), heads=0.5).sum().backward()
    kept = 8 if isinstance(layer, Attention) else 4  # 2 of 4 KV heads x 4 rows; 4 of 8 Mamba-2 heads
    assert torch.count_nonzero(grad(layer)[kept:]) == 0 and grad(layer)[:kept].abs().sum() > 0


@pytest.mark.parametrize(
    "fraction, total, message",
    [(0.3, 4, "not a whole number"), (0.0, 4, "not a whole number"), (1.5, 2, "not a whole number")],
)
def test_fraction_that_does_not_nest_raises(fraction, total, message):
    with pytest.raises(ValueError, match=message):
        nested_count(fraction, total, "KV heads")
    with pytest.raises(ValueError, match="multiple of 1/4"):
        _attention()(_x(), heads=0.3)


def _hybrid(**changes) -> ModelConfig:
    base = ModelConfig(
        d_model=D_MODEL, vocab_size=32, max_seq_len=16, pattern="MF A- S8F",
        attention=AttentionConfig(num_heads=4, num_kv_heads=2),
        mamba2=Mamba2Config(d_state=4, head_dim=8, n_groups=2, chunk_size=4),
        matformer=MatFormerConfig(d_ff=32, granularities=(0.5, 1.0)),
    )
    return base.replace(**changes)


def test_per_layer_counts_build_the_model_num_params_counts():
    cfg = _hybrid(
        attention=AttentionConfig(num_heads=4, num_kv_heads=2, head_dim=4, kv_heads_per_layer=(0, 1, 2)),
        mamba2=Mamba2Config(d_state=4, head_dim=8, n_groups=2, chunk_size=4, groups_per_layer=(1, 0, 0)),
    )
    model = build_model(cfg)
    assert model.layers["0"].mixer.num_heads == 2 and model.layers["0"].mixer.z_proj.weight.shape == (16, D_MODEL)
    assert model.layers["1"].mixer.num_heads == 2 and model.layers["2"].mixer.num_heads == 4
    assert num_params(cfg) == sum(p.numel() for p in model.parameters())
    assert num_params(cfg) < num_params(_hybrid())


@pytest.mark.parametrize(
    "changes, message",
    [
        (dict(attention=AttentionConfig(num_heads=4, num_kv_heads=2, kv_heads_per_layer=(0, 1))), "3 layers"),
        (dict(attention=AttentionConfig(num_heads=4, num_kv_heads=2, kv_heads_per_layer=(1, 1, 1))), "needs 0"),
        (dict(attention=AttentionConfig(num_heads=4, num_kv_heads=2, kv_heads_per_layer=(0, 0, 1))),
         "positive count"),
        (dict(mamba2=Mamba2Config(d_state=4, head_dim=8, n_groups=2, groups_per_layer=(1, 1, 0))), "needs 0"),
    ],
)
def test_bad_per_layer_counts_raise(changes, message):
    with pytest.raises(ValueError, match=message):
        _hybrid(**changes)


def test_decoder_takes_a_submodel_per_layer():
    model = build_model(_hybrid(), seed=0).double()
    tokens_BT = torch.randint(0, 32, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        uniform = model(tokens_BT, widths=Submodel(ffn=0.5, heads=0.5))
        per_layer = model(tokens_BT, widths=Submodel(ffn=[0.5, None, 0.5], heads=[0.5, 0.5, 0.5]))
        only_first = model(tokens_BT, widths=Submodel(heads={0: 0.5}))
        full = model(tokens_BT)
    torch.testing.assert_close(per_layer, uniform, **TOL)
    assert not torch.allclose(only_first, full) and not torch.allclose(only_first, uniform)
    with pytest.raises(ValueError, match="one fraction per layer"):
        model(tokens_BT, widths=Submodel(heads=[0.5, 0.5]))


def _tp_worker(rank, world_size, cfg):
    """heads < 1 under TP must raise (a rank's shard is not a prefix); heads 1 runs."""
    import gc

    from torch.distributed.device_mesh import init_device_mesh

    from braid.parallel import apply_tp

    model = build_model(cfg, seed=0)
    apply_tp(model, init_device_mesh("cpu", (world_size,)), sequence_parallel=False)
    tokens_BT = torch.randint(0, 32, (2, 8), generator=torch.Generator().manual_seed(0))
    full = model(tokens_BT, widths=Submodel(heads=1.0))
    messages = []
    for heads in ({0: 0.5}, {1: 0.5}):  # the Mamba-2 layer, the attention layer
        try:
            model(tokens_BT, widths=Submodel(heads=heads))
        except ValueError as error:
            messages.append(str(error))
    del model
    gc.collect()
    return tuple(full.shape), messages


def test_nested_heads_under_tensor_parallelism_raise():
    from braid.parallel.testing import run_distributed

    for shape, messages in run_distributed(_tp_worker, 2, (_hybrid(pattern="M- A-"),)):
        assert shape == (2, 8, 32)
        assert len(messages) == 2 and all("not supported under tensor parallelism" in m for m in messages)
