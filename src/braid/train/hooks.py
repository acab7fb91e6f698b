"""Hooks: the extras of a run (logging, validation, checkpoints, samples), called every N steps.

A hook is a function of the Trainer; the loop calls each after every step whose number is
a multiple of `every` (0: never), and once more at the end when `at_end` is set.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from braid.train.trainer import Trainer


@dataclass
class Hook:
    name: str
    every: int
    fn: Callable[[Trainer], None]
    at_end: bool = False

    def due(self, step: int) -> bool:
        return self.every > 0 and step % self.every == 0


def _finite_mean(values: list[float]) -> float:
    finite = [v for v in values if math.isfinite(v)]
    return sum(finite) / len(finite) if finite else float("nan")


def log_metrics(trainer: Trainer) -> None:
    """One metrics row (losses averaged over the steps since the last row) to every sink."""
    window = trainer.window
    row = {
        "step": trainer.state.step,
        "loss": _finite_mean([out.loss for out in window]),
        "ce": _finite_mean([out.ce for out in window]),
        "lr": trainer.lr_at(trainer.state.step - 1),
        "tokens": trainer.state.tokens,
        "grad_norm": trainer.last.grad_norm,
        "skipped_steps": trainer.nan_guard.total,
        **trainer.throughput.rate(),
    }
    window.clear()
    trainer.metrics.log(row)
    trainer.last_row = row


def validate(trainer: Trainer) -> None:
    """Validation loss and perplexity on the fixed val batches."""
    if trainer.last_val_step == trainer.state.step:
        return
    result = trainer.validate()
    trainer.metrics.log({"step": trainer.state.step, "tokens": trainer.state.tokens, **result})
    trainer.progress.write(
        f"step {trainer.state.step}: val_loss {result['val_loss']:.4f}, val_ppl {result['val_ppl']:.2f}"
    )


def checkpoint(trainer: Trainer) -> None:
    trainer.save_checkpoint()


def sample(trainer: Trainer) -> None:
    """A short text sample from `log.sample_prompt`, shown on the bar and logged."""
    text = trainer.sample(trainer.cfg.log.sample_prompt, trainer.cfg.log.sample_tokens)
    trainer.progress.write(f"step {trainer.state.step} sample: {text!r}")
    trainer.metrics.log({"step": trainer.state.step, "sample": text})


def default_hooks(trainer: Trainer) -> list[Hook]:
    """Logging, validation, checkpointing and sampling at the intervals of the config."""
    cfg = trainer.cfg
    return [
        Hook("log", cfg.log.every, log_metrics),
        Hook("validate", cfg.eval.every, validate, at_end=True),
        Hook("sample", cfg.log.sample_every, sample),
        Hook("checkpoint", cfg.checkpoint.every, checkpoint, at_end=True),
    ]
