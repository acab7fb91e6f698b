"""TrainConfig: typed nested dataclasses, validated when built, loaded from YAML or a name.

A config is a tree of dataclasses. `config_from_dict` builds it from plain dicts (YAML),
coercing values to the declared field types and rejecting unknown keys with the list of
valid keys at that level; `apply_overrides` takes `dotted.key=value` strings whose values
are parsed as YAML scalars. Every dataclass validates itself in `__post_init__`, so a bad
config fails before any model or device work.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Union

import yaml

from braid.elastic.policy import ElasticConfig, build_policy
from braid.model.config import ModelConfig
from braid.parallel.dims import ParallelConfig


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise ValueError(message)


@dataclass
class DataSource:
    """One dataset of a mixture: a prepared data dir and its sampling weight."""

    path: str
    weight: float = 1.0

    def __post_init__(self) -> None:
        _require(bool(self.path), "data.mixture entries need a path (a dir made by `braid data prepare`)")
        _require(self.weight > 0, f"data.mixture weight for {self.path!r} must be positive, got {self.weight}")


@dataclass
class DataConfig:
    """Training data: one prepared dir (`path`) or a weighted `mixture` of them."""

    path: str = ""
    mixture: list[DataSource] = field(default_factory=list)
    seq_len: int = 256
    batch_size: int = 8  # sequences per micro-batch
    # Read each micro-batch as `read_as_dp` data-parallel ranks would, their rows stacked in
    # rank order: a run of fewer ranks then trains on the batches of a larger data-parallel
    # run (e.g. one GPU reproducing a dp2 run's data). 1: this run's own dp ranks.
    read_as_dp: int = 1

    def __post_init__(self) -> None:
        _require(
            isinstance(self.read_as_dp, int) and self.read_as_dp >= 1,
            f"data.read_as_dp must be an int >= 1, got {self.read_as_dp!r}",
        )
        _require(
            bool(self.path) != bool(self.mixture),
            "set exactly one of data.path (a dir made by `braid data prepare`) or data.mixture "
            "(a list of {path, weight})",
        )
        _require(self.seq_len > 0, f"data.seq_len must be positive, got {self.seq_len}")
        _require(self.batch_size > 0, f"data.batch_size must be positive, got {self.batch_size}")

    @property
    def paths(self) -> list[str]:
        return [self.path] if self.path else [source.path for source in self.mixture]

    def loader_sources(self) -> str | list[tuple[str, float]]:
        """What PackedLoader takes: a data dir, or (dir, proportion) pairs."""
        if self.path:
            return self.path
        total = sum(source.weight for source in self.mixture)
        return [(source.path, source.weight / total) for source in self.mixture]


@dataclass
class OptimConfig:
    """AdamW; `grad_clip` 0 disables clipping; `grad_accum` micro-batches per step."""

    lr: float = 3e-4
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = 1e-8
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    grad_accum: int = 1

    def __post_init__(self) -> None:
        _require(self.lr > 0, f"optim.lr must be positive, got {self.lr}")
        _require(
            len(self.betas) == 2 and all(0 <= b < 1 for b in self.betas),
            f"optim.betas={self.betas} must be two numbers in [0, 1)",
        )
        _require(self.eps > 0, f"optim.eps must be positive, got {self.eps}")
        _require(self.weight_decay >= 0, f"optim.weight_decay must be >= 0, got {self.weight_decay}")
        _require(self.grad_clip >= 0, f"optim.grad_clip must be >= 0 (0 disables), got {self.grad_clip}")
        _require(self.grad_accum >= 1, f"optim.grad_accum must be at least 1, got {self.grad_accum}")


SCHEDULE_KINDS = ("cosine", "wsd", "constant")


@dataclass
class ScheduleConfig:
    """Learning-rate schedule: linear warmup, then cosine / warmup-stable-decay / constant."""

    kind: str = "cosine"
    warmup_steps: int = 100
    decay_fraction: float = 0.2  # WSD: the last fraction of steps decays linearly
    min_lr_ratio: float = 0.1  # final lr = min_lr_ratio * optim.lr

    def __post_init__(self) -> None:
        _require(
            self.kind in SCHEDULE_KINDS,
            f"schedule.kind={self.kind!r} is not one of {', '.join(SCHEDULE_KINDS)}",
        )
        _require(self.warmup_steps >= 0, f"schedule.warmup_steps must be >= 0, got {self.warmup_steps}")
        _require(
            0 < self.decay_fraction <= 1,
            f"schedule.decay_fraction must be in (0, 1], got {self.decay_fraction}",
        )
        _require(
            0 <= self.min_lr_ratio <= 1,
            f"schedule.min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}",
        )


DEVICES = ("auto", "cpu", "cuda")
DTYPES = ("auto", "float32", "bfloat16", "float64")


@dataclass
class RunConfig:
    """The loop: total optimizer steps, seed, device and compute dtype.

    dtype "auto" is bfloat16 autocast on CUDA and float32 on CPU; "float64" holds the model in
    float64 (parity tests of parallel layouts against one process). On a shared or busy CPU,
    cpu_threads=1 avoids OpenMP threads spinning against other processes (tiny models
    gain little from more threads and can run many times slower when cores are contended).
    """

    steps: int = 1000
    seed: int = 0
    device: str = "auto"
    dtype: str = "auto"
    cpu_threads: int = 0  # torch intra-op threads when on CPU; 0 keeps torch's default

    def __post_init__(self) -> None:
        _require(self.steps > 0, f"train.steps must be positive, got {self.steps}")
        _require(self.cpu_threads >= 0, f"train.cpu_threads must be >= 0 (0: torch's default), got {self.cpu_threads}")
        _require(self.device in DEVICES, f"train.device={self.device!r} is not one of {', '.join(DEVICES)}")
        _require(self.dtype in DTYPES, f"train.dtype={self.dtype!r} is not one of {', '.join(DTYPES)}")


@dataclass
class CheckpointConfig:
    """DCP checkpoints every `every` steps (0: only at the end and on a signal)."""

    every: int = 500
    keep_last: int = 2
    resume: bool = True  # auto-resume from the latest complete checkpoint in the run dir

    def __post_init__(self) -> None:
        _require(self.every >= 0, f"checkpoint.every must be >= 0 (0: only at the end), got {self.every}")
        _require(self.keep_last >= 1, f"checkpoint.keep_last must be at least 1, got {self.keep_last}")


@dataclass
class LogConfig:
    """Metrics every `every` steps to metrics.jsonl, the progress bar, TensorBoard, W&B.

    `peak_flops` is the per-device peak FLOP/s for MFU; 0 means from the device (H100/H200
    bf16 dense: 989e12) and MFU is n/a where the device is unknown (CPU).
    """

    every: int = 10
    progress: bool = True
    tensorboard: bool = False
    wandb: bool = False
    wandb_project: str = "braid"
    peak_flops: float = 0.0
    sample_every: int = 0  # 0: no text samples during training
    sample_prompt: str = "The"
    sample_tokens: int = 32

    def __post_init__(self) -> None:
        _require(self.every >= 1, f"log.every must be at least 1, got {self.every}")
        _require(self.peak_flops >= 0, f"log.peak_flops must be >= 0 (0: from the device), got {self.peak_flops}")
        _require(self.sample_every >= 0, f"log.sample_every must be >= 0 (0: off), got {self.sample_every}")
        _require(self.sample_tokens >= 1, f"log.sample_tokens must be at least 1, got {self.sample_tokens}")


@dataclass
class EvalConfig:
    """Validation loss/perplexity on the first `batches` val batches every `every` steps."""

    every: int = 200
    batches: int = 8

    def __post_init__(self) -> None:
        _require(self.every >= 0, f"eval.every must be >= 0 (0: only at the end), got {self.every}")
        _require(self.batches >= 1, f"eval.batches must be at least 1, got {self.batches}")


@dataclass
class NanGuardConfig:
    """Skip steps whose loss or grad norm is not finite; stop after too many."""

    max_consecutive: int = 5
    max_total: int = 50

    def __post_init__(self) -> None:
        _require(self.max_consecutive >= 1, f"nan_guard.max_consecutive must be >= 1, got {self.max_consecutive}")
        _require(self.max_total >= 1, f"nan_guard.max_total must be >= 1, got {self.max_total}")


@dataclass
class TrainConfig:
    """Everything a training run needs; saved as config.yaml in the run dir."""

    model: ModelConfig
    data: DataConfig
    name: str = "run"
    out_dir: str = "runs/run"
    optim: OptimConfig = field(default_factory=OptimConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    train: RunConfig = field(default_factory=RunConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    log: LogConfig = field(default_factory=LogConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    nan_guard: NanGuardConfig = field(default_factory=NanGuardConfig)
    elastic: ElasticConfig = field(default_factory=ElasticConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)

    def __post_init__(self) -> None:
        build_policy(self.elastic, self.model)  # raises on granularities the model lacks
        _require(
            self.data.seq_len <= self.model.max_seq_len,
            f"data.seq_len={self.data.seq_len} exceeds model.max_seq_len={self.model.max_seq_len}; "
            "lower data.seq_len or raise model.max_seq_len",
        )
        _require(bool(self.out_dir), "out_dir must name the run directory")


def _coerce_scalar(value: Any, hint: type, raw: str | None, where: str) -> Any:
    if hint is bool and isinstance(value, bool):
        return value
    if hint is int and isinstance(value, int) and not isinstance(value, bool):
        return value
    if hint is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if hint is float and isinstance(value, str):
        try:  # YAML 1.1 reads "3e-4" (no dot) as a string
            number = float(value)
        except ValueError:
            pass
        else:
            if math.isfinite(number):
                return number
    if hint is str:
        if raw is not None:
            return raw
        if isinstance(value, str):
            return value
    raise ValueError(f"{where}: expected {hint.__name__}, got {value!r}")


def _coerce_union(value: Any, args: tuple, raw: str | None, where: str) -> Any:
    if value is None and type(None) in args:
        return None
    options = [a for a in args if a is not type(None)]
    errors = []
    for option in sorted(options, key=lambda a: a is str):  # try str last: it takes anything raw
        try:
            return _coerce(value, option, raw, where)
        except ValueError as error:
            errors.append(str(error))
    raise ValueError(errors[0] if len(errors) == 1 else f"{where}: {value!r} fits none of {options}")


def _coerce_sequence(value: Any, hint: Any, where: str) -> Any:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if not isinstance(value, (list, tuple)):
        raise ValueError(f"{where}: expected a list, got {value!r}")
    if origin is list:
        return [_coerce(item, args[0], None, f"{where}[{i}]") for i, item in enumerate(value)]
    if len(args) == 2 and args[1] is Ellipsis:
        return tuple(_coerce(item, args[0], None, f"{where}[{i}]") for i, item in enumerate(value))
    if len(value) != len(args):
        raise ValueError(f"{where}: expected {len(args)} values, got {value!r}")
    return tuple(_coerce(item, arg, None, f"{where}[{i}]") for i, (item, arg) in enumerate(zip(value, args)))


def _coerce(value: Any, hint: Any, raw: str | None, where: str) -> Any:
    """`value` as type `hint`; `raw` is the override text (kept verbatim for str fields)."""
    if hint is Any:
        return value
    if dataclasses.is_dataclass(hint):
        if dataclasses.is_dataclass(value) and isinstance(value, hint):
            return value
        if not isinstance(value, dict):
            raise ValueError(f"{where}: expected a mapping of {hint.__name__} fields, got {value!r}")
        return config_from_dict(hint, value, where)
    origin = typing.get_origin(hint)
    if origin in (Union, types.UnionType):
        return _coerce_union(value, typing.get_args(hint), raw, where)
    if origin in (list, tuple):
        return _coerce_sequence(value, hint, where)
    return _coerce_scalar(value, hint, raw, where)


def config_from_dict(cls: type, data: dict, where: str = "config") -> Any:
    """Build dataclass `cls` from nested dicts; unknown keys raise ValueError naming the valid ones."""
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = [key for key in data if key not in names]
    if unknown:
        raise ValueError(f"unknown key {unknown[0]!r} in {where}; valid keys: {', '.join(names)}")
    kwargs = {key: _coerce(value, hints[key], None, f"{where}.{key}") for key, value in data.items()}
    try:
        return cls(**kwargs)
    except TypeError as error:  # a required field is missing
        raise ValueError(f"{where}: {error}; valid keys: {', '.join(names)}") from None


def config_to_dict(cfg: Any) -> Any:
    """Plain nested dicts/lists (tuples become lists) for YAML or JSON."""
    if dataclasses.is_dataclass(cfg):
        return {f.name: config_to_dict(getattr(cfg, f.name)) for f in dataclasses.fields(cfg)}
    if isinstance(cfg, (list, tuple)):
        return [config_to_dict(item) for item in cfg]
    return cfg


def _set_dotted(cls: type, data: dict, keys: list[str], raw: str, where: str) -> None:
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    key = keys[0]
    if key not in names:
        raise ValueError(f"unknown key {key!r} in {where}; valid keys: {', '.join(names)}")
    hint = hints[key]
    if len(keys) > 1:
        if not dataclasses.is_dataclass(hint):
            raise ValueError(f"{where}.{key} is a value, not a section: drop {'.'.join(keys[1:])!r}")
        _set_dotted(hint, data.setdefault(key, {}), keys[1:], raw, f"{where}.{key}")
        return
    value = yaml.safe_load(raw) if raw.strip() else ""
    data[key] = config_to_dict(_coerce(value, hint, raw, f"{where}.{key}"))


def apply_overrides(cfg: Any, overrides: list[str]) -> Any:
    """A new config (TrainConfig, ModelConfig or any config dataclass) with `dotted.key=value`
    overrides applied (values typed as YAML scalars)."""
    cls = type(cfg)
    data = config_to_dict(cfg)
    for override in overrides:
        key, sep, raw = override.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"override {override!r} is not of the form dotted.key=value (e.g. optim.lr=1e-3)")
        _set_dotted(cls, data, key.strip().split("."), raw, "config")
    return config_from_dict(cls, data)


class _Dumper(yaml.SafeDumper):
    """Block style for sections, flow style for lists ([0.9, 0.95])."""


def _flow_list(dumper: yaml.SafeDumper, data: list) -> yaml.Node:
    return dumper.represent_sequence("tag:yaml.org,2002:seq", data, flow_style=True)


_Dumper.add_representer(list, _flow_list)


def save_config(cfg: TrainConfig, path: str | Path) -> None:
    """Write `cfg` as YAML (loadable with `load_config_file`)."""
    text = yaml.dump(config_to_dict(cfg), Dumper=_Dumper, sort_keys=False)
    Path(path).write_text(text)


def load_config_file(path: str | Path) -> TrainConfig:
    """A TrainConfig from a YAML file."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"config file {str(path)!r} does not exist; give a YAML path or a named config")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as error:
        raise ValueError(f"config file {str(path)!r} is not valid YAML: {error}") from None
    if not isinstance(data, dict):
        raise ValueError(f"config file {str(path)!r} must hold a mapping of config sections")
    return config_from_dict(TrainConfig, data)


def load_config(name_or_path: str, overrides: list[str] | None = None) -> TrainConfig:
    """A named config (see `braid configs`) or a YAML file, then `dotted.key=value` overrides."""
    from braid.configs.train import TRAIN_CONFIGS, train_config

    if name_or_path in TRAIN_CONFIGS:
        cfg = train_config(name_or_path)
    elif name_or_path.endswith((".yaml", ".yml")) or Path(name_or_path).is_file():
        cfg = load_config_file(name_or_path)
    else:
        raise ValueError(
            f"{name_or_path!r} is neither a named config ({', '.join(TRAIN_CONFIGS)}) nor a YAML file"
        )
    return apply_overrides(cfg, overrides or [])
