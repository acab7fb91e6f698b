"""Config validation and the layer-pattern grammar."""

import dataclasses

import pytest

from braid.configs import MODEL_CONFIGS, model_config
from braid.model import (
    AttentionConfig,
    GLAConfig,
    Mamba2Config,
    MatFormerConfig,
    ModelConfig,
    MoEConfig,
    format_pattern,
    parse_pattern,
)
from braid.configs.models import MAMBA2_HYBRID_8B_PATTERN


def kinds(pattern, num_layers=None):
    return [(s.mixer, s.window, s.ffn) for s in parse_pattern(pattern, num_layers)]


def test_megatron_8b_pattern_counts():
    specs = parse_pattern(MAMBA2_HYBRID_8B_PATTERN)
    mixers = [s.mixer for s in specs if s.mixer]
    ffns = [s.ffn for s in specs if s.ffn]
    # Megatron counts one sublayer per symbol: 24 Mamba, 4 attention, 28 MLP = 56.
    assert mixers.count("mamba2") == 24 and mixers.count("attention") == 4
    assert ffns.count("mlp") == 28
    assert len(mixers) + len(ffns) == len(MAMBA2_HYBRID_8B_PATTERN) == 56


def test_pattern_tokens_windows_and_tiling():
    assert kinds("M- S512E GF A*") == [
        ("mamba2", None, "mlp"),
        ("sliding", 512, "moe"),
        ("gla", None, "matformer"),
        ("attention", None, None),
        ("attention", None, None),
    ]
    assert kinds("S-", 3) == [("sliding", None, "mlp")] * 3
    assert kinds("M|-") == [("mamba2", None, None), (None, None, "mlp")]
    assert [s.index for s in parse_pattern("ME A-", 5)] == [0, 1, 2, 3, 4]
    assert kinds("ME A-", 3)[2] == ("mamba2", None, "moe")


def test_format_pattern_round_trips():
    pattern = "M- S128E G A- F"
    specs = parse_pattern(pattern)
    assert kinds(format_pattern(specs)) == kinds(pattern)


@pytest.mark.parametrize(
    "pattern, message",
    [("MX", "unknown symbol 'X'"), ("", "empty"), ("A12", "may only follow 'S'"), ("S0-", "must be positive")],
)
def test_bad_patterns(pattern, message):
    with pytest.raises(ValueError, match=message):
        parse_pattern(pattern)


def test_pattern_longer_than_num_layers():
    with pytest.raises(ValueError, match="num_layers=2"):
        parse_pattern("A- M- G-", 2)


@pytest.mark.parametrize(
    "changes, message",
    [
        (dict(pattern="A-", attention=AttentionConfig(num_heads=5, num_kv_heads=5)), "does not divide d_model"),
        (dict(pattern="A-", attention=AttentionConfig(num_heads=4, num_kv_heads=3)), "must divide attention.num_heads"),
        (dict(pattern="S1024-", max_seq_len=256), "larger than the context"),
        (dict(pattern="M", mamba2=Mamba2Config(head_dim=64, n_groups=3)), "n_groups=3 must divide"),
        (dict(pattern="M", mamba2=Mamba2Config(head_dim=48)), "head_dim=48 does not divide"),
        (dict(pattern="G", gla=GLAConfig(num_heads=5)), "gla.num_heads=5 does not divide"),
        (dict(pattern="E", moe=MoEConfig(num_experts=4, top_k=5)), "top_k=5"),
        (dict(pattern="E", moe=MoEConfig(score="relu")), "moe.score"),
        (dict(pattern="F", matformer=MatFormerConfig(granularities=(0.5, 0.25, 1.0))), "increasing"),
        (dict(pattern="F", matformer=MatFormerConfig(granularities=(0.25, 0.5))), "must end with 1.0"),
        (dict(d_model=0), "d_model must be positive"),
    ],
)
def test_bad_configs_say_what_to_change(changes, message):
    with pytest.raises(ValueError, match=message):
        ModelConfig(**changes)


def test_unused_subconfigs_are_not_validated():
    # A pure-attention model does not care about an unused Mamba-2 setting.
    cfg = ModelConfig(pattern="A-", mamba2=Mamba2Config(n_groups=3))
    assert [s.mixer for s in cfg.layers] == ["attention"]


def test_named_configs():
    assert set(MODEL_CONFIGS) >= {"tiny-hybrid", "tiny-dense", "tiny-mamba2", "tiny-gla", "llama-374m",
                                  "hybrid-1b", "mamba2-hybrid-8b"}
    tiny = model_config("tiny-hybrid")
    specs = tiny.layers
    assert {s.mixer for s in specs} >= {"mamba2", "gla", "attention", "sliding"}
    assert {s.ffn for s in specs} >= {"mlp", "moe", "matformer"}
    llama = model_config("llama-374m")
    assert (llama.d_model, llama.resolved_num_layers, llama.attention.num_heads, llama.mlp.d_ff,
            llama.vocab_size, llama.max_seq_len) == (1024, 24, 16, 2816, 32000, 2048)
    with pytest.raises(ValueError, match="named configs are"):
        model_config("nope")


def test_config_round_trips_through_dicts():
    cfg = model_config("tiny-hybrid")
    d = dataclasses.asdict(cfg)
    sub = {k: type(getattr(cfg, k))(**v) for k, v in d.items() if isinstance(v, dict)}
    rebuilt = ModelConfig(**{**d, **sub})
    assert rebuilt == cfg
