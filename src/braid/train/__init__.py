"""Training: TrainConfig, AdamW and schedules, the Trainer, DCP checkpoints, metrics, eval."""

from braid.train.checkpoint import (
    latest_checkpoint,
    load_checkpoint,
    load_model_weights,
    resolve_checkpoint,
    save_checkpoint,
)
from braid.train.config import (
    CheckpointConfig,
    DataConfig,
    DataSource,
    EvalConfig,
    LogConfig,
    NanGuardConfig,
    OptimConfig,
    RunConfig,
    ScheduleConfig,
    TrainConfig,
    apply_overrides,
    config_from_dict,
    config_to_dict,
    load_config,
    load_config_file,
    save_config,
)
from braid.train.evaluate import evaluate, load_trained, sample_text, val_batches
from braid.train.hooks import Hook
from braid.train.optim import build_optimizer, lr_multiplier, param_groups
from braid.train.plot import plot_run
from braid.train.step import NanGuard, StepOutput, TrainingStopped, train_step
from braid.train.trainer import Trainer, train

__all__ = [
    "CheckpointConfig",
    "DataConfig",
    "DataSource",
    "EvalConfig",
    "Hook",
    "LogConfig",
    "NanGuard",
    "NanGuardConfig",
    "OptimConfig",
    "RunConfig",
    "ScheduleConfig",
    "StepOutput",
    "TrainConfig",
    "Trainer",
    "TrainingStopped",
    "apply_overrides",
    "build_optimizer",
    "config_from_dict",
    "config_to_dict",
    "evaluate",
    "latest_checkpoint",
    "load_checkpoint",
    "load_config",
    "load_config_file",
    "load_model_weights",
    "load_trained",
    "lr_multiplier",
    "param_groups",
    "plot_run",
    "resolve_checkpoint",
    "sample_text",
    "save_checkpoint",
    "save_config",
    "train",
    "train_step",
    "val_batches",
]
