"""AdamW with decay / no-decay parameter groups, and learning-rate schedules.

Schedules are pure functions of the step (a multiplier of optim.lr), so resuming needs
only the step: there is no scheduler state to save.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from braid.train.config import OptimConfig, ScheduleConfig


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Two AdamW groups: decayed weights, and `model.no_weight_decay_names()` without decay.

    Norm weights, biases and SSM parameters (A_log, D, dt_bias) take no decay; embeddings
    and projection weights do.
    """
    no_decay = model.no_weight_decay_names()
    named = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
    unknown = no_decay - {name for name, _ in model.named_parameters()}
    if unknown:
        raise ValueError(f"no_weight_decay_names() lists parameters the model lacks: {sorted(unknown)[:5]}")
    decay = [p for name, p in named if name not in no_decay]
    keep = [p for name, p in named if name in no_decay]
    return [
        {"params": decay, "weight_decay": weight_decay, "name": "decay"},
        {"params": keep, "weight_decay": 0.0, "name": "no_decay"},
    ]


def build_optimizer(model: nn.Module, cfg: OptimConfig, device: torch.device) -> torch.optim.AdamW:
    """AdamW over `param_groups`; the fused kernel on CUDA, the foreach path elsewhere."""
    fused = device.type == "cuda"
    return torch.optim.AdamW(
        param_groups(model, cfg.weight_decay),
        lr=cfg.lr,
        betas=tuple(cfg.betas),
        eps=cfg.eps,
        fused=fused,
        foreach=None if fused else True,
    )


def warmup_multiplier(step: int, warmup_steps: int) -> float:
    """Linear warmup: step 0 trains at 1/(warmup+1) of the peak, reaching it at `warmup_steps`."""
    return min(1.0, (step + 1) / (warmup_steps + 1))


def cosine_multiplier(step: int, warmup_steps: int, total_steps: int, min_ratio: float) -> float:
    """Warmup, then a half cosine from 1 to `min_ratio` at the last step."""
    if step < warmup_steps:
        return warmup_multiplier(step, warmup_steps)
    span = max(1, total_steps - 1 - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / span)
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def wsd_multiplier(step: int, warmup_steps: int, total_steps: int, min_ratio: float, decay_fraction: float) -> float:
    """Warmup-stable-decay: warmup, constant peak, linear decay to `min_ratio` over the last fraction."""
    if step < warmup_steps:
        return warmup_multiplier(step, warmup_steps)
    decay_steps = max(1, round(decay_fraction * total_steps))
    decay_start = max(warmup_steps, total_steps - decay_steps)
    if step < decay_start:
        return 1.0
    span = max(1, total_steps - 1 - decay_start)
    progress = min(1.0, (step - decay_start) / span)
    return 1.0 - (1.0 - min_ratio) * progress


def lr_multiplier(step: int, cfg: ScheduleConfig, total_steps: int) -> float:
    """The schedule's multiplier of optim.lr at optimizer step `step` (0-based)."""
    if cfg.kind == "constant":
        return warmup_multiplier(step, cfg.warmup_steps)
    if cfg.kind == "cosine":
        return cosine_multiplier(step, cfg.warmup_steps, total_steps, cfg.min_lr_ratio)
    if cfg.kind == "wsd":
        return wsd_multiplier(step, cfg.warmup_steps, total_steps, cfg.min_lr_ratio, cfg.decay_fraction)
    raise ValueError(f"schedule.kind={cfg.kind!r} is not one of cosine, wsd, constant")


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr
