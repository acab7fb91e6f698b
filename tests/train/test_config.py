"""TrainConfig: dotted overrides with YAML typing, unknown keys, YAML round trip, named configs."""

import dataclasses
from pathlib import Path

import pytest

from braid.configs.train import TRAIN_CONFIGS, train_config
from braid.train.config import (
    DataSource,
    TrainConfig,
    apply_overrides,
    config_from_dict,
    config_to_dict,
    load_config,
    load_config_file,
    save_config,
)


@pytest.fixture
def cfg() -> TrainConfig:
    return train_config("tiny-hybrid")


def test_overrides_are_typed_like_yaml_scalars(cfg):
    out = apply_overrides(
        cfg,
        [
            "optim.lr=1e-3",  # YAML 1.1 reads this as a string; the float field takes it
            "train.steps=7",
            "log.tensorboard=true",
            "model.attention.head_dim=null",
            "model.attention.head_dim=16",
            "optim.betas=[0.8, 0.9]",
            "name=123",  # a str field keeps the text
            "model.pattern=M-A-",
        ],
    )
    assert out.optim.lr == 1e-3 and isinstance(out.optim.lr, float)
    assert out.train.steps == 7 and isinstance(out.train.steps, int)
    assert out.log.tensorboard is True
    assert out.model.attention.head_dim == 16
    assert out.optim.betas == (0.8, 0.9)
    assert out.name == "123"
    assert out.model.pattern == "M-A-"
    assert cfg.optim.lr == 3e-3, "apply_overrides must not mutate its input"


def test_mixture_override_builds_nested_dataclasses(cfg):
    out = apply_overrides(cfg, ["data.path=", "data.mixture=[{path: a, weight: 3}, {path: b}]"])
    assert out.data.mixture == [DataSource("a", 3.0), DataSource("b", 1.0)]
    assert out.data.loader_sources() == [("a", 0.75), ("b", 0.25)]


@pytest.mark.parametrize(
    "override, message",
    [
        ("optim.lrr=1", "unknown key 'lrr' in config.optim; valid keys: lr, betas, eps, weight_decay"),
        ("modle.d_model=64", "unknown key 'modle' in config; valid keys: model, data, name"),
        ("model.attention.heads=2", "valid keys: num_heads, num_kv_heads, head_dim"),
        ("train.steps=1.5", "config.train.steps: expected int"),
        ("optim.lr=fast", "config.optim.lr: expected float"),
        ("schedule.kind=linear", "schedule.kind='linear' is not one of cosine, wsd, constant"),
        ("optim.lr.peak=1", "config.optim.lr is a value, not a section"),
        ("optim.lr", "is not of the form dotted.key=value"),
        ("data.path=", "set exactly one of data.path"),
        ("data.seq_len=4096", "exceeds model.max_seq_len"),
        ("model.d_model=0", "d_model must be positive"),
    ],
)
def test_bad_overrides_raise_valueerror_saying_what_to_change(cfg, override, message):
    with pytest.raises(ValueError) as info:
        apply_overrides(cfg, [override])
    assert message in str(info.value)


def test_yaml_round_trip(cfg, tmp_path):
    cfg = apply_overrides(cfg, ["data.path=", "data.mixture=[{path: x, weight: 2}]", "schedule.kind=wsd"])
    save_config(cfg, tmp_path / "config.yaml")
    back = load_config_file(tmp_path / "config.yaml")
    assert back == cfg
    assert config_to_dict(back) == config_to_dict(cfg)


def test_yaml_file_with_unknown_key_lists_valid_keys(tmp_path):
    data = config_to_dict(train_config("tiny-hybrid"))
    data["optim"]["learning_rate"] = 0.1
    with pytest.raises(ValueError, match="unknown key 'learning_rate' in config.optim; valid keys: lr"):
        config_from_dict(TrainConfig, data)


def test_load_config_by_name_or_path(tmp_path):
    path = tmp_path / "run.yaml"
    save_config(train_config("tiny-dense"), path)
    from_file = load_config(str(path), ["train.steps=3"])
    assert from_file.model == train_config("tiny-dense").model and from_file.train.steps == 3
    with pytest.raises(ValueError, match="neither a named config"):
        load_config("no-such-config")


@pytest.mark.parametrize("name", list(TRAIN_CONFIGS))
def test_every_named_config_builds_and_round_trips(name):
    cfg = train_config(name)
    assert config_from_dict(TrainConfig, config_to_dict(cfg)) == cfg
    assert dataclasses.is_dataclass(cfg.model)


@pytest.mark.parametrize("path", sorted((Path(__file__).parents[2] / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_example_yaml_configs_load(path):
    cfg = load_config(str(path), ["train.steps=5"])
    assert cfg.train.steps == 5
