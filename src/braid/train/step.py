"""The training step and the non-finite (NaN/inf) guard.

Shapes: B batch, T time, V vocab.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from braid.train.optim import set_lr

IGNORE_INDEX = -100


class TrainingStopped(RuntimeError):
    """Training cannot go on (e.g. the loss kept diverging); the message says what to try."""


@dataclass
class StepOutput:
    loss: float  # cross-entropy + weighted auxiliary losses, averaged over the step's tokens
    ce: float
    grad_norm: float
    updated: bool  # False when a non-finite loss or grad norm skipped the update


def train_step(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    micro_batches: list[dict[str, torch.Tensor]],
    lr: float,
    grad_clip: float,
    autocast: contextlib.AbstractContextManager,
) -> StepOutput:
    """One optimizer step over `micro_batches` (gradient accumulation).

    The cross-entropy is summed over all targets of the step and divided by their count,
    so accumulating k micro-batches gives the gradient of one k-times-larger batch.
    A non-finite loss or gradient norm zeroes the gradients and skips the update.
    """
    set_lr(optimizer, lr)
    num_targets = max(1, sum(int((b["labels"] != IGNORE_INDEX).sum()) for b in micro_batches))
    loss_sum = ce_sum = 0.0
    for batch in micro_batches:
        with autocast:
            logits_BTV, aux = model(batch["input_ids"], batch["doc_ids"], return_aux=True)
        ce = F.cross_entropy(
            logits_BTV.float().flatten(0, 1), batch["labels"].flatten(), ignore_index=IGNORE_INDEX, reduction="sum"
        ) / num_targets
        loss = ce + sum(aux.values()) / len(micro_batches)
        loss.backward()
        loss_sum += loss.detach()
        ce_sum += ce.detach()
    grad_norm = nn.utils.clip_grad_norm_(model.parameters(), grad_clip if grad_clip > 0 else math.inf)
    updated = bool(torch.isfinite(loss_sum) & torch.isfinite(grad_norm))
    if updated:
        optimizer.step()
        model.update_moe_bias()
    optimizer.zero_grad(set_to_none=True)
    return StepOutput(float(loss_sum), float(ce_sum), float(grad_norm), updated)


class NanGuard:
    """Counts skipped (non-finite) steps; raises TrainingStopped past the configured limits."""

    def __init__(self, max_consecutive: int, max_total: int):
        self.max_consecutive = max_consecutive
        self.max_total = max_total
        self.consecutive = 0
        self.total = 0

    def update(self, updated: bool, step: int) -> None:
        if updated:
            self.consecutive = 0
            return
        self.consecutive += 1
        self.total += 1
        if self.consecutive >= self.max_consecutive or self.total >= self.max_total:
            raise TrainingStopped(
                f"stopped at step {step}: the loss or gradient norm was not finite for "
                f"{self.consecutive} consecutive steps ({self.total} skipped in all, limits "
                f"nan_guard.max_consecutive={self.max_consecutive}, max_total={self.max_total}); "
                "try a lower optim.lr, a longer schedule.warmup_steps, optim.grad_clip=1.0 or "
                "train.dtype=float32, then resume from the last checkpoint"
            )

    def state_dict(self) -> dict[str, int]:
        return {"consecutive": self.consecutive, "total": self.total}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.consecutive = state["consecutive"]
        self.total = state["total"]
