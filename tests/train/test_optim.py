"""Schedules (warmup, cosine, WSD, constant) and AdamW no-decay parameter groups."""

import math

import pytest
import torch

from braid.configs import model_config
from braid.model import build_model
from braid.train.config import OptimConfig, ScheduleConfig
from braid.train.optim import build_optimizer, lr_multiplier, param_groups

STEPS = 100


def curve(**kwargs) -> list[float]:
    cfg = ScheduleConfig(**kwargs)
    return [lr_multiplier(step, cfg, STEPS) for step in range(STEPS)]


def test_cosine_warms_up_linearly_then_decays_to_min():
    lrs = curve(kind="cosine", warmup_steps=10, min_lr_ratio=0.1)
    assert lrs[:11] == pytest.approx([(s + 1) / 11 for s in range(11)], abs=1e-12)
    assert lrs[10] == 1.0
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:])), "cosine must not increase after warmup"
    assert lrs[-1] == pytest.approx(0.1, abs=1e-12)
    progress = (40 - 10) / (STEPS - 1 - 10)
    assert lrs[40] == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)), abs=1e-12)


def test_wsd_is_flat_then_decays_linearly_over_the_last_fraction():
    lrs = curve(kind="wsd", warmup_steps=10, decay_fraction=0.2, min_lr_ratio=0.0)
    assert lrs[10:80] == [1.0] * 70
    decay = lrs[80:]
    assert decay[-1] == pytest.approx(0.0, abs=1e-12)
    steps = [a - b for a, b in zip(decay, decay[1:])]
    assert steps == pytest.approx([1 / 19] * 19, abs=1e-12), "WSD decay must be linear"


def test_constant_after_warmup():
    assert curve(kind="constant", warmup_steps=4)[4:] == [1.0] * (STEPS - 4)
    assert curve(kind="constant", warmup_steps=0)[0] == 1.0


def test_no_decay_groups_follow_model_names():
    model = build_model(model_config("tiny-hybrid").replace(d_model=64, vocab_size=128), seed=0)
    groups = param_groups(model, weight_decay=0.1)
    by_id = {id(p): name for name, p in model.named_parameters()}
    decayed = {by_id[id(p)] for p in groups[0]["params"]}
    kept = {by_id[id(p)] for p in groups[1]["params"]}
    assert groups[0]["weight_decay"] == 0.1 and groups[1]["weight_decay"] == 0.0
    assert kept == model.no_weight_decay_names()
    assert decayed | kept == set(by_id.values()) and not decayed & kept
    assert any(n.endswith("A_log") for n in kept) and any(n.endswith("norm.weight") for n in kept)
    assert "tok_embeddings.weight" in decayed, "embeddings take weight decay"
    optimizer = build_optimizer(model, OptimConfig(lr=1e-3, weight_decay=0.1), torch.device("cpu"))
    assert [g["weight_decay"] for g in optimizer.param_groups] == [0.1, 0.0]
