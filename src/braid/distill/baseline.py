"""The from-scratch control of a distillation: the student's architecture, freshly initialised
(braid's usual init, no teacher weights), trained with next-token cross-entropy by the
ordinary trainer (`braid train`) on the same data, sequence length and batch size.

A distilled student is only worth its three stages if it beats this model at an equal
token budget; `bench/distill_smollm2.sh` gives it the tokens of all three stages together.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from braid.model.config import ModelConfig
from braid.train.config import (
    CheckpointConfig,
    DataConfig,
    EvalConfig,
    LogConfig,
    OptimConfig,
    RunConfig,
    ScheduleConfig,
    TrainConfig,
    config_from_dict,
)


def run_student_config(run_dir: str | Path) -> ModelConfig:
    """The student ModelConfig a `braid distill` run wrote to RUN/student_config.json."""
    path = Path(run_dir) / "student_config.json"
    if not path.is_file():
        raise ValueError(f"{path} does not exist; start `braid distill --out {run_dir}` first (it writes it)")
    return config_from_dict(ModelConfig, json.loads(path.read_text()), "student_config")


def scratch_config(
    student: ModelConfig,
    data: str,
    out: str,
    tokens: int,
    seq_len: int,
    batch_size: int,
    lr: float = 1e-3,
    warmup_fraction: float = 0.1,
    device: str = "cpu",
    seed: int = 0,
) -> TrainConfig:
    """A TrainConfig that trains `student` from scratch on ceil(tokens / (seq_len * batch_size))
    steps of `data`: AdamW at `lr`, linear warmup over `warmup_fraction` of the steps, then
    cosine to lr/10; float32 like `braid distill`; one checkpoint at the end."""
    if tokens <= 0:
        raise ValueError(f"scratch_config: tokens must be positive, got {tokens}")
    if not 0 <= warmup_fraction < 1:
        raise ValueError(f"scratch_config: warmup_fraction must be in [0, 1), got {warmup_fraction}")
    steps = max(1, math.ceil(tokens / (seq_len * batch_size)))
    return TrainConfig(
        model=student,
        data=DataConfig(path=data, seq_len=seq_len, batch_size=batch_size),
        name="scratch",
        out_dir=out,
        optim=OptimConfig(lr=lr),
        schedule=ScheduleConfig(kind="cosine", warmup_steps=int(warmup_fraction * steps)),
        train=RunConfig(steps=steps, seed=seed, device=device, dtype="float32"),
        checkpoint=CheckpointConfig(every=0),
        log=LogConfig(every=10, progress=False),
        eval=EvalConfig(every=0, batches=1),
    )
