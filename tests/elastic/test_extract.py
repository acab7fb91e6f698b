"""Mix'n'Match extraction: sliced standalone models equal the universal model.

Legend: B batch, T time, V vocab.
Tolerances: float64 logits to rtol/atol 1e-12 (the same matmuls on copied, contiguous
weight prefixes instead of views; anything larger is a bug).
"""

import pytest
import torch

from braid.elastic.extract import extract_config, extract_model, layer_widths
from braid.model import ModelConfig, build_model, num_params
from braid.model.config import (
    AttentionConfig,
    GLAConfig,
    Mamba2Config,
    MatFormerConfig,
    MLPConfig,
    MoEConfig,
)
from braid.model.mlp import SwiGLU

TOL = dict(rtol=1e-12, atol=1e-12)
VOCAB = 48


def _cfg(**changes) -> ModelConfig:
    base = ModelConfig(
        d_model=16,
        vocab_size=VOCAB,
        max_seq_len=16,
        pattern="MF GF S8E A- AF",
        attention=AttentionConfig(num_heads=2, num_kv_heads=1),
        mamba2=Mamba2Config(d_state=8, head_dim=8, chunk_size=8),
        gla=GLAConfig(num_heads=2, gate_low_rank=4, chunk_size=8),
        mlp=MLPConfig(d_ff=24),
        moe=MoEConfig(num_experts=4, top_k=2, d_expert=8),
        matformer=MatFormerConfig(d_ff=32, granularities=(0.25, 0.5, 1.0)),
    )
    return base.replace(**changes)


def _model(cfg: ModelConfig):
    return build_model(cfg, seed=0).double().eval()


def _inputs(T: int = 13):
    g = torch.Generator().manual_seed(1)
    tokens_BT = torch.randint(0, VOCAB, (2, T), generator=g)
    doc_ids_BT = torch.tensor([[0] * 6 + [1] * (T - 6), [0] * T])  # a document boundary in row 0
    return tokens_BT, doc_ids_BT


@pytest.mark.parametrize("matformer_widths", [[0.25, 0.25, 0.25], [1.0, 0.25, 0.5], [0.5, 1.0, 0.25]])
def test_extracted_logits_equal_universal_model_at_those_widths(matformer_widths):
    model = _model(_cfg())
    widths = layer_widths(model.cfg, matformer_widths=matformer_widths)
    assert widths == [matformer_widths[0], matformer_widths[1], None, None, matformer_widths[2]]
    sub = extract_model(model, widths)
    tokens_BT, doc_ids_BT = _inputs()
    with torch.no_grad():
        expected_BTV = model(tokens_BT, doc_ids_BT, widths=widths)
        got_BTV = sub(tokens_BT, doc_ids_BT)
    torch.testing.assert_close(got_BTV, expected_BTV, **TOL)
    assert "F" not in sub.cfg.pattern and isinstance(sub.layers["0"].ffn, SwiGLU)
    assert sub.layers["1"].ffn.w1.weight.shape == (model.cfg.matformer.hidden(matformer_widths[1]), 16)
    assert sub.layers["0"].mixer.out_proj.weight.dtype == torch.float64


def test_extracted_weights_are_copies_not_views():
    model = _model(_cfg())
    sub = extract_model(model, layer_widths(model.cfg, width=0.5))
    sub.layers["0"].ffn.w1.weight.data.zero_()
    assert model.layers["0"].ffn.w1.weight.abs().sum() > 0


def test_dropped_layers_equal_universal_model_without_those_blocks():
    model = _model(_cfg())
    widths = layer_widths(model.cfg, width=0.5)
    drop = [1, 3]
    sub = extract_model(model, widths, drop_layers=drop)
    tokens_BT, doc_ids_BT = _inputs()
    with torch.no_grad():
        h_BTD = model.tok_embeddings(tokens_BT)
        for i, block in model.layers.items():
            if int(i) not in drop:
                h_BTD, _ = block(h_BTD, doc_ids_BT, None, widths[int(i)])
        expected_BTV = model._head(h_BTD, return_hidden=False)
        got_BTV = sub(tokens_BT, doc_ids_BT)
    torch.testing.assert_close(got_BTV, expected_BTV, **TOL)
    assert len(sub.layers) == 3 and sub.cfg.pattern == "M- S8E A-"
    assert sub.cfg.mlp.d_ff_per_layer == (16, 0, 16)


def test_extracted_param_count_is_exact_and_smaller():
    cfg = _cfg()
    model = _model(cfg)
    for width in (0.25, 0.5, 1.0):
        sub = extract_model(model, layer_widths(cfg, width=width), drop_layers=[2])
        assert num_params(sub.cfg) == sum(p.numel() for p in sub.parameters())
        assert num_params(sub.cfg) < num_params(cfg)
    full = extract_config(cfg, layer_widths(cfg, width=1.0))
    assert num_params(full) == num_params(cfg)  # same weights, dense instead of nested


def test_extracted_model_decodes_like_the_universal_model():
    from braid.model import generate

    model = _model(_cfg())
    widths = layer_widths(model.cfg, width=0.25)
    sub = extract_model(model, widths)
    prompt_BT = torch.randint(0, VOCAB, (2, 5), generator=torch.Generator().manual_seed(2))
    out_BT = generate(sub, prompt_BT, 4, temperature=0.0)
    with torch.no_grad():
        logits_BTV = model(out_BT[:, :-1], widths=widths)
    assert torch.equal(out_BT[:, 5:], logits_BTV[:, 4:].argmax(-1))


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(width=0.3), "not one of matformer.granularities"),
        (dict(matformer_widths=[0.5, 0.5]), "one width per 'F' layer"),
        (dict(width=0.5, matformer_widths=[0.5, 0.5, 0.5]), "exactly one"),
    ],
)
def test_bad_widths_raise(kwargs, message):
    with pytest.raises(ValueError, match=message):
        layer_widths(_cfg(), **kwargs)


def test_bad_drop_layers_raise():
    cfg = _cfg()
    widths = layer_widths(cfg, width=0.5)
    with pytest.raises(ValueError, match="out of range"):
        extract_config(cfg, widths, drop_layers=[5])
    with pytest.raises(ValueError, match="removes every layer"):
        extract_config(cfg, widths, drop_layers=[0, 1, 2, 3, 4])
    with pytest.raises(ValueError, match="layernorm_scaling"):
        extract_config(cfg.replace(layernorm_scaling=True), widths, drop_layers=[1])


def test_d_ff_per_layer_validates_and_builds():
    cfg = ModelConfig(d_model=8, vocab_size=16, pattern="A- A AE", mlp=MLPConfig(d_ff_per_layer=(12, 0, 0)),
                      moe=MoEConfig(num_experts=2, top_k=1, d_expert=4))
    model = build_model(cfg)
    assert model.layers["0"].ffn.w1.weight.shape == (12, 8)
    assert num_params(cfg) == sum(p.numel() for p in model.parameters())
    with pytest.raises(ValueError, match="entries but the model has 3 layers"):
        cfg.replace(mlp=MLPConfig(d_ff_per_layer=(12, 0)))
    with pytest.raises(ValueError, match="needs 0"):
        cfg.replace(mlp=MLPConfig(d_ff_per_layer=(12, 4, 0)))
    with pytest.raises(ValueError, match="needs a positive width"):
        cfg.replace(mlp=MLPConfig(d_ff_per_layer=(0, 0, 0)))


def _heads_cfg() -> ModelConfig:
    """Two KV heads per attention layer and two B/C groups per Mamba-2 layer: heads 0.5 nests."""
    return _cfg(
        attention=AttentionConfig(num_heads=4, num_kv_heads=2),
        mamba2=Mamba2Config(d_state=8, head_dim=4, n_groups=2, chunk_size=8),
    )


@pytest.mark.parametrize(
    "matformer_widths, heads, per_layer",
    [
        ([0.5, 0.5, 0.5], 0.5, None),
        ([1.0, 0.25, 0.5], None, [0.5, 1.0, 0.5, 1.0]),
        ([0.25, 1.0, 1.0], None, [1.0, 0.5, 1.0, 0.5]),
    ],
)
def test_extracted_heads_equal_universal_model_at_those_heads(matformer_widths, heads, per_layer):
    from braid.elastic.extract import layer_heads
    from braid.model import Submodel

    model = _model(_heads_cfg())
    widths = layer_widths(model.cfg, matformer_widths=matformer_widths)
    fractions = layer_heads(model.cfg, heads, per_layer)
    assert fractions[1] is None  # GLA: no nested heads
    sub = extract_model(model, widths, heads=fractions)
    tokens_BT, doc_ids_BT = _inputs()
    with torch.no_grad():
        expected_BTV = model(tokens_BT, doc_ids_BT, widths=Submodel(ffn=widths, heads=fractions))
        got_BTV = sub(tokens_BT, doc_ids_BT)
    torch.testing.assert_close(got_BTV, expected_BTV, **TOL)
    assert num_params(sub.cfg) == sum(p.numel() for p in sub.parameters())
    assert num_params(sub.cfg) < num_params(model.cfg)
    kv = sub.cfg.attention.kv_heads_per_layer
    assert kv[1] == 0 and kv[0] == 0 and sub.cfg.attention.head_dim == 4
    assert sub.cfg.mamba2.groups_per_layer[0] == (1 if fractions[0] == 0.5 else 2)


def test_extracted_heads_decode_like_the_universal_model():
    from braid.elastic.extract import layer_heads
    from braid.model import Submodel, generate

    model = _model(_heads_cfg())
    submodel = Submodel(ffn=layer_widths(model.cfg, width=0.25), heads=layer_heads(model.cfg, 0.5))
    sub = extract_model(model, submodel.ffn, heads=submodel.heads)
    prompt_BT = torch.randint(0, VOCAB, (2, 5), generator=torch.Generator().manual_seed(2))
    out_BT = generate(sub, prompt_BT, 6, temperature=0.0)
    with torch.no_grad():
        logits_BTV = model(out_BT[:, :-1], widths=submodel)
    assert torch.equal(out_BT[:, 5:], logits_BTV[:, 4:].argmax(-1))
    # The universal model decodes the same tokens through views of its full-size caches.
    assert torch.equal(generate(model, prompt_BT, 6, temperature=0.0, widths=submodel), out_BT)


def test_heads_with_dropped_layers_and_a_second_extraction():
    from braid.elastic.extract import layer_heads

    model = _model(_heads_cfg())
    widths, fractions = layer_widths(model.cfg, width=0.5), layer_heads(model.cfg, 0.5)
    sub = extract_model(model, widths, drop_layers=[1], heads=fractions)
    assert sub.cfg.pattern == "M- S8E A- A-"
    assert sub.cfg.attention.kv_heads_per_layer == (0, 1, 1, 1)
    assert sub.cfg.mamba2.groups_per_layer == (1, 0, 0, 0)
    # Extracting the extracted model again (full width and heads) keeps it unchanged.
    again = extract_model(sub, layer_widths(sub.cfg), drop_layers=[2], heads=layer_heads(sub.cfg, 1.0))
    assert again.cfg.attention.kv_heads_per_layer == (0, 1, 1)
    tokens_BT, doc_ids_BT = _inputs()
    with torch.no_grad():
        h_BTD = model.tok_embeddings(tokens_BT)
        for i, block in model.layers.items():
            if int(i) not in (1, 3):  # 3: the source layer of sub's layer 2
                h_BTD, _ = block(h_BTD, doc_ids_BT, None, widths[int(i)], fractions[int(i)])
        expected_BTV = model._head(h_BTD, return_hidden=False)
        torch.testing.assert_close(again(tokens_BT, doc_ids_BT), expected_BTV, **TOL)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(heads=0.3), "not a whole number"),
        (dict(per_layer=[0.5, 0.5]), "one fraction per such layer"),
        (dict(heads=0.5, per_layer=[0.5, 0.5, 0.5]), "at most one"),
    ],
)
def test_bad_heads_raise(kwargs, message):
    from braid.elastic.extract import layer_heads

    with pytest.raises(ValueError, match=message):
        layer_heads(_heads_cfg(), **kwargs)
