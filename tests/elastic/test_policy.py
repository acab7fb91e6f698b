"""Elastic training policies and their hook into the training step.

Tolerances: the step parity test compares float64 gradients to rtol/atol 1e-12 (the same
forward and backward passes, summed in the same order).
"""

import contextlib
import copy

import pytest
import torch
import torch.nn.functional as F

from braid.elastic import ElasticConfig, ElasticPolicy, build_policy
from braid.model import ModelConfig, build_model
from braid.model.config import AttentionConfig, Mamba2Config, MatFormerConfig
from braid.train.config import apply_overrides
from braid.train.step import train_step

GRANS = (0.125, 0.25, 0.5, 1.0)


def test_all_trains_every_granularity_with_normalised_weights():
    policy = ElasticPolicy(ElasticConfig(policy="all", weights=(1, 1, 2, 4)), GRANS)
    assert policy.widths(0) == [(0.125, 0.125), (0.25, 0.125), (0.5, 0.25), (1.0, 0.5)]
    assert policy.widths(7) == policy.widths(0)


def test_none_trains_the_full_model_only():
    assert ElasticPolicy(ElasticConfig(), GRANS).widths(3) == [(None, 1.0)]


def test_sample_is_a_pure_function_of_seed_and_step():
    cfg = ElasticConfig(policy="sample", seed=5)
    first = [ElasticPolicy(cfg, GRANS).widths(s) for s in range(200)]
    resumed = ElasticPolicy(cfg, GRANS)  # a fresh policy, as after a resume: no hidden state
    assert [resumed.widths(s) for s in reversed(range(200))] == first[::-1]
    other_seed = [ElasticPolicy(ElasticConfig(policy="sample", seed=6), GRANS).widths(s) for s in range(200)]
    assert other_seed != first


def test_sample_follows_the_weights():
    policy = ElasticPolicy(ElasticConfig(policy="sample", weights=(1, 1, 1, 7)), GRANS)
    draws = [policy.widths(s)[0][0] for s in range(2000)]
    # Binomial(2000, 0.7): std ~20 draws, so +-100 is a 5-sigma band.
    assert abs(draws.count(1.0) - 1400) < 100
    assert set(draws) == set(GRANS)


def test_sandwich_has_largest_smallest_and_a_middle_width():
    policy = ElasticPolicy(ElasticConfig(policy="sandwich", seed=1), GRANS)
    middles = set()
    for step in range(50):
        widths = policy.widths(step)
        assert [w for w, _ in widths[:2]] == [1.0, 0.125]
        assert all(weight == pytest.approx(1 / 3) for _, weight in widths)
        middles.add(widths[2][0])
    assert middles == {0.25, 0.5}


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(policy="biggest"), "not one of"),
        (dict(policy="all", granularities=(0.5, 0.25)), "increasing"),
        (dict(policy="all", granularities=(0.25, 1.0), weights=(1.0,)), "one weight per granularity"),
        (dict(policy="all", weights=(1.0, -1.0, 1.0, 1.0)), "positive"),
    ],
)
def test_bad_elastic_config_raises(kwargs, message):
    with pytest.raises(ValueError, match=message):
        ElasticPolicy(ElasticConfig(**kwargs), GRANS)


def test_granularity_the_model_lacks_and_model_without_matformer_raise():
    cfg = ModelConfig(d_model=16, vocab_size=32, pattern="AF", matformer=MatFormerConfig(d_ff=32))
    with pytest.raises(ValueError, match="not in model.matformer.granularities"):
        build_policy(ElasticConfig(policy="all", granularities=(0.3, 1.0)), cfg)
    with pytest.raises(ValueError, match="needs MatFormer"):
        build_policy(ElasticConfig(policy="sample"), cfg.replace(pattern="A-"))


def test_train_config_takes_an_elastic_section(data_dir, tmp_path):
    from tests.train.conftest import tiny_config

    cfg = tiny_config(data_dir, tmp_path, "elastic.policy=sandwich", "elastic.seed=3")
    assert cfg.elastic == ElasticConfig(policy="sandwich", seed=3)
    with pytest.raises(ValueError, match="not in model.matformer.granularities"):
        apply_overrides(cfg, ["elastic.granularities=[0.3, 1.0]"])


def _tiny_model() -> torch.nn.Module:
    cfg = ModelConfig(
        d_model=16, vocab_size=32, max_seq_len=16, pattern="AF A-",
        matformer=MatFormerConfig(d_ff=32, granularities=(0.25, 0.5, 1.0)),
    )
    return build_model(cfg, seed=0).double()


class _GradRecorder(torch.optim.SGD):
    """An SGD with lr 0 that keeps a copy of the gradients it was stepped with."""

    def __init__(self, named_params):
        self.names = {id(p): n for n, p in named_params}
        super().__init__([p for _, p in named_params], lr=0.0)
        self.grads = {}

    def step(self, closure=None):
        for group in self.param_groups:
            for p in group["params"]:
                self.grads[self.names[id(p)]] = p.grad.clone()


def _step_equals_weighted_losses(model, widths) -> dict[str, torch.Tensor]:
    """train_step with (width, weight) pairs: its loss and gradients equal the weighted sum of
    the model's cross-entropies at each width (float64, 1e-12). Returns the step's gradients."""
    reference = copy.deepcopy(model)
    g = torch.Generator().manual_seed(0)
    batch = {
        "input_ids": torch.randint(0, 32, (2, 9), generator=g),
        "labels": torch.randint(0, 32, (2, 9), generator=g),
        "doc_ids": torch.zeros(2, 9, dtype=torch.long),
    }
    optimizer = _GradRecorder(list(model.named_parameters()))
    out = train_step(model, optimizer, [batch], 0.0, 0.0, contextlib.nullcontext(), widths=widths)
    expected = sum(
        w * F.cross_entropy(
            reference(batch["input_ids"], batch["doc_ids"], widths=width).flatten(0, 1), batch["labels"].flatten()
        )
        for width, w in widths
    )
    expected.backward()
    assert out.ce == pytest.approx(expected.item(), rel=1e-12)
    for name, param in reference.named_parameters():
        torch.testing.assert_close(optimizer.grads[name], param.grad, rtol=1e-12, atol=1e-12)
    return optimizer.grads


def test_train_step_sums_weighted_losses_of_each_width():
    model = _tiny_model()
    grads = _step_equals_weighted_losses(model, [(1.0, 0.5), (0.25, 0.5)])
    # Rows past the 0.25 prefix get gradient from the full width only (weight 0.5).
    assert grads["layers.0.ffn.w1.weight"][8:].abs().sum() > 0


def test_resumed_sample_run_trains_the_same_widths(data_dir, tmp_path):
    from braid.train import train
    from tests.train.conftest import tiny_config, train_losses

    args = ("elastic.policy=sample", "elastic.seed=2", "schedule.kind=constant", "schedule.warmup_steps=0")
    train(tiny_config(data_dir, tmp_path / "full", "train.steps=6", *args))
    train(tiny_config(data_dir, tmp_path / "resumed", "train.steps=3", *args))
    train(tiny_config(data_dir, tmp_path / "resumed", "train.steps=6", *args))  # resumes from step 3
    train(tiny_config(data_dir, tmp_path / "other", "train.steps=6", "elastic.policy=sample", "elastic.seed=3", *args[2:]))
    full, resumed = train_losses(tmp_path / "full"), train_losses(tmp_path / "resumed")
    assert sorted(resumed) == list(range(1, 7))
    for step in range(1, 7):  # fp32 on CPU, the same ops in the same order: equal to rounding
        assert resumed[step] == pytest.approx(full[step], abs=1e-6), f"step {step}"
    # Control: another seed samples other widths, so the same batches give other losses.
    other = train_losses(tmp_path / "other")
    assert any(abs(other[s] - full[s]) > 1e-4 for s in range(1, 7))


HEADS = (0.5, 1.0)


def test_all_with_heads_trains_the_cross_product():
    from braid.model import Submodel

    policy = ElasticPolicy(ElasticConfig(policy="all", granularities=(0.5, 1.0), weights=(1, 3), heads=HEADS), GRANS)
    assert policy.widths(0) == [
        (Submodel(0.5, 0.5), 0.125), (Submodel(0.5, 1.0), 0.125),
        (Submodel(1.0, 0.5), 0.375), (Submodel(1.0, 1.0), 0.375),
    ]


def test_sandwich_with_heads_bounds_both_axes():
    policy = ElasticPolicy(ElasticConfig(policy="sandwich", seed=1, heads=(0.25, 0.5, 1.0)), GRANS)
    middles = set()
    for step in range(60):
        (largest, _), (smallest, _), (middle, _) = policy.widths(step)
        assert (largest.ffn, largest.heads) == (1.0, 1.0) and (smallest.ffn, smallest.heads) == (0.125, 0.25)
        middles.add((middle.ffn, middle.heads))
    assert middles == {(0.25, 0.5), (0.5, 0.5)}


def test_sample_with_heads_is_deterministic_and_covers_both_axes():
    cfg = ElasticConfig(policy="sample", seed=4, heads=HEADS)
    draws = [ElasticPolicy(cfg, GRANS).widths(s)[0][0] for s in range(400)]
    assert [ElasticPolicy(cfg, GRANS).widths(s)[0][0] for s in range(400)] == draws
    assert {(d.ffn, d.heads) for d in draws} == {(g, h) for g in GRANS for h in HEADS}
    # Without heads the same seed draws the same widths as before the heads axis existed.
    plain = ElasticPolicy(ElasticConfig(policy="sample", seed=4), GRANS)
    assert all(isinstance(plain.widths(s)[0][0], float) for s in range(10))


def test_heads_only_policy_for_a_model_without_matformer():
    cfg = ModelConfig(d_model=16, vocab_size=32, pattern="A-", num_layers=2)  # 4 heads, 4 KV heads
    policy = build_policy(ElasticConfig(policy="sandwich", heads=(0.25, 0.5, 1.0)), cfg)
    (largest, _), (smallest, _), _ = policy.widths(0)
    assert (largest.ffn, largest.heads, smallest.ffn, smallest.heads) == (None, 1.0, None, 0.25)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(heads=(1.0, 0.5)), "increasing"),
        (dict(heads=(0.25, 0.5)), "ending with 1.0"),
        (dict(heads=(0.0, 1.0)), r"in \(0, 1\]"),
    ],
)
def test_bad_heads_config_raises(kwargs, message):
    with pytest.raises(ValueError, match=message):
        ElasticConfig(policy="sample", **kwargs)


def test_heads_that_do_not_nest_in_the_model_raise():
    cfg = ModelConfig(d_model=16, vocab_size=32, pattern="AF", matformer=MatFormerConfig(d_ff=32),
                      attention=AttentionConfig(num_heads=4, num_kv_heads=2))
    with pytest.raises(ValueError, match="KV heads .* of layer 0, in elastic.heads"):
        build_policy(ElasticConfig(policy="sample", heads=(0.25, 1.0)), cfg)
    with pytest.raises(ValueError, match="needs attention or Mamba-2 layers"):
        build_policy(ElasticConfig(policy="sample", heads=(0.5, 1.0)), cfg.replace(pattern="GF"))


def test_train_step_sums_weighted_losses_of_each_submodel():
    from braid.model import Submodel

    cfg = ModelConfig(
        d_model=16, vocab_size=32, max_seq_len=16, pattern="MF A-",
        attention=AttentionConfig(num_heads=4, num_kv_heads=2),
        mamba2=Mamba2Config(d_state=4, head_dim=8, n_groups=2, chunk_size=4),
        matformer=MatFormerConfig(d_ff=32, granularities=(0.25, 0.5, 1.0)),
    )
    model = build_model(cfg, seed=0).double()
    grads = _step_equals_weighted_losses(model, [(Submodel(1.0, 1.0), 0.5), (Submodel(0.25, 0.5), 0.5)])
    # KV head 1's rows get gradient from the full-heads submodel only, and do get it.
    assert grads["layers.1.mixer.wk.weight"][4:].abs().sum() > 0
