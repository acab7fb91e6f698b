"""Named training configs: Python functions returning a complete TrainConfig.

The tiny ones are sized for the CPU demo (`braid demo`: a few minutes on 2 cores); the
large ones for GPU nodes. All read the data dir `data/gutenberg` unless overridden
(`data.path=DIR`).
"""

from __future__ import annotations

from collections.abc import Callable

from braid.configs.models import model_config
from braid.train.config import (
    CheckpointConfig,
    DataConfig,
    EvalConfig,
    LogConfig,
    OptimConfig,
    RunConfig,
    ScheduleConfig,
    TrainConfig,
)

DEFAULT_DATA = "data/gutenberg"


def _tiny(model_name: str) -> TrainConfig:
    """CPU demo settings: short sequences, a high learning rate, few steps, one CPU thread
    (a model this small gains little from more, and loses much when cores are shared)."""
    return TrainConfig(
        name=model_name,
        out_dir=f"runs/{model_name}",
        model=model_config(model_name).replace(max_seq_len=128),
        data=DataConfig(path=DEFAULT_DATA, seq_len=128, batch_size=8),
        optim=OptimConfig(lr=3e-3, weight_decay=0.1, grad_clip=1.0),
        schedule=ScheduleConfig(kind="cosine", warmup_steps=30, min_lr_ratio=0.1),
        train=RunConfig(steps=600, device="auto", cpu_threads=1),
        checkpoint=CheckpointConfig(every=200, keep_last=2),
        log=LogConfig(every=10),
        eval=EvalConfig(every=200, batches=16),
    )


def tiny_hybrid() -> TrainConfig:
    """The CPU demo: tiny-hybrid (every mixer and FFN kind) on Gutenberg."""
    return _tiny("tiny-hybrid")


def tiny_dense() -> TrainConfig:
    return _tiny("tiny-dense")


def tiny_mamba2() -> TrainConfig:
    return _tiny("tiny-mamba2")


def tiny_gla() -> TrainConfig:
    return _tiny("tiny-gla")


def _gpu(model_name: str, seq_len: int, batch_size: int, steps: int, lr: float) -> TrainConfig:
    """One-GPU settings: bf16 autocast, WSD schedule, checkpoints every 1000 steps."""
    return TrainConfig(
        name=model_name,
        out_dir=f"runs/{model_name}",
        model=model_config(model_name),
        data=DataConfig(path=DEFAULT_DATA, seq_len=seq_len, batch_size=batch_size),
        optim=OptimConfig(lr=lr, weight_decay=0.1, grad_clip=1.0),
        schedule=ScheduleConfig(kind="wsd", warmup_steps=min(2000, steps // 10), decay_fraction=0.2),
        train=RunConfig(steps=steps, device="cuda"),
        checkpoint=CheckpointConfig(every=1000, keep_last=3),
        log=LogConfig(every=10, tensorboard=True),
        eval=EvalConfig(every=1000, batches=20),
    )


def llama_374m() -> TrainConfig:
    return _gpu("llama-374m", seq_len=2048, batch_size=16, steps=20_000, lr=1e-3)


def hybrid_1b() -> TrainConfig:
    return _gpu("hybrid-1b", seq_len=4096, batch_size=4, steps=50_000, lr=6e-4)


TRAIN_CONFIGS: dict[str, Callable[[], TrainConfig]] = {
    "tiny-hybrid": tiny_hybrid,
    "tiny-dense": tiny_dense,
    "tiny-mamba2": tiny_mamba2,
    "tiny-gla": tiny_gla,
    "llama-374m": llama_374m,
    "hybrid-1b": hybrid_1b,
}


def train_config(name: str) -> TrainConfig:
    """The named training config `name` (see TRAIN_CONFIGS)."""
    if name not in TRAIN_CONFIGS:
        raise ValueError(f"unknown training config {name!r}; named configs are: {', '.join(TRAIN_CONFIGS)}")
    return TRAIN_CONFIGS[name]()
