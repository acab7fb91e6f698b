"""The training step and the non-finite (NaN/inf) guard.

Shapes: B batch, T time, V vocab.

Under a parallel layout (braid.train.distributed.Layout) the step is the single-process
step on the global batch: the targets are counted over the data-parallel ranks, each rank's
loss is scaled so that the data-parallel gradient average gives the global gradient, the
logged losses are averaged over dp, and the gradient norm is the norm of the whole model.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.distributed.tensor import DTensor

from braid.parallel import parallel_cross_entropy
from braid.parallel.ep import update_moe_bias
from braid.train.distributed import Layout
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


def cross_entropy_sum(logits_BTV: torch.Tensor, labels_BT: torch.Tensor) -> torch.Tensor:
    """Cross-entropy summed over the targets that are not IGNORE_INDEX, in float32 (float64
    for float64 logits). logits_BTV: plain, or a vocab-sharded DTensor (a TP model's head)."""
    if not isinstance(logits_BTV, DTensor):
        logits_NV = logits_BTV.flatten(0, 1)
        logits_NV = logits_NV.to(torch.promote_types(logits_NV.dtype, torch.float32))
        return F.cross_entropy(logits_NV, labels_BT.flatten(), ignore_index=IGNORE_INDEX, reduction="sum")
    num_valid = (labels_BT != IGNORE_INDEX).sum()
    if int(num_valid) == 0:  # the mean would be NaN; keep the graph for backward
        return logits_BTV.to_local().sum() * 0.0
    return parallel_cross_entropy(logits_BTV, labels_BT, ignore_index=IGNORE_INDEX) * num_valid


def train_step(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    micro_batches: list[dict[str, torch.Tensor]],
    lr: float,
    grad_clip: float,
    autocast: contextlib.AbstractContextManager,
    *,
    layout: Layout | None = None,
    widths: list[tuple[float | None, float]] | None = None,
) -> StepOutput:
    """One optimizer step over `micro_batches` (gradient accumulation).

    The cross-entropy is summed over all targets of the step and divided by their count,
    so accumulating k micro-batches gives the gradient of one k-times-larger batch.
    A non-finite loss or gradient norm zeroes the gradients and skips the update.
    `layout`: a parallel layout (this rank's micro-batches are its dp share of the step).
    `widths`: (MatFormer width, loss weight) pairs from braid.elastic's policy (None: the
    full model); each micro-batch is trained at every width, losses summed with the weights.
    """
    set_lr(optimizer, lr)
    parallel = layout is not None and layout.parallel
    dp_size = layout.dp_size if parallel else 1
    num_targets = _global_sum(sum(int((b["labels"] != IGNORE_INDEX).sum()) for b in micro_batches), layout)
    # Data-parallel gradients are averaged over dp ranks, hence the dp_size.
    ce_scale = dp_size / max(1.0, num_targets)
    loss_sum = ce_sum = 0.0
    for batch in micro_batches:
        for width, weight in widths or [(None, 1.0)]:
            with autocast:
                logits_BTV, aux = model(batch["input_ids"], batch["doc_ids"], widths=width, return_aux=True)
            ce = cross_entropy_sum(logits_BTV, batch["labels"]) * ce_scale
            loss = weight * (ce + sum(aux.values()) / len(micro_batches))
            loss.backward()
            loss_sum += loss.detach()
            ce_sum += weight * ce.detach()
    loss_sum, ce_sum = _dp_mean(loss_sum, ce_sum, layout)
    clip = grad_clip if grad_clip > 0 else math.inf
    if parallel:
        grad_norm = clip_grad_norm(list(model.parameters()), clip)
    else:
        grad_norm = nn.utils.clip_grad_norm_(model.parameters(), clip)
    updated = bool(torch.isfinite(loss_sum) & torch.isfinite(grad_norm))
    if updated:
        optimizer.step()
        if parallel:
            update_moe_bias(model, layout.dp_group)
        else:
            model.update_moe_bias()
    optimizer.zero_grad(set_to_none=True)
    return StepOutput(float(loss_sum), float(ce_sum), float(grad_norm), updated)


def _global_sum(count: int, layout: Layout | None) -> float:
    if layout is None or layout.dp_size == 1:
        return float(count)
    total = torch.tensor(float(count), dtype=torch.float64)
    dist.all_reduce(total, group=layout.dp_group)
    return float(total)


def _dp_mean(loss_sum, ce_sum, layout: Layout | None) -> tuple[torch.Tensor, torch.Tensor]:
    """The step's losses averaged over the data-parallel ranks (each holds its scaled share)."""
    pair = torch.stack([torch.as_tensor(loss_sum), torch.as_tensor(ce_sum)]).detach()
    if layout is not None and layout.dp_size > 1:
        pair = pair.to(torch.float64)
        dist.all_reduce(pair, group=layout.dp_group)
        pair /= layout.dp_size
    return pair[0], pair[1]


@torch.no_grad()
def clip_grad_norm(params: list[nn.Parameter], max_norm: float) -> torch.Tensor:
    """torch's clip_grad_norm_ for gradients that are DTensors on several meshes (TP, FSDP,
    EP experts) or plain tensors: the 2-norm of the whole model's gradient, then scaling."""
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return torch.tensor(0.0)
    norms = [_full_norm(g) for g in grads]
    total = torch.linalg.vector_norm(torch.stack([n.to(norms[0].dtype) for n in norms]))
    coef = min(1.0, max_norm / (float(total) + 1e-6))
    for grad in grads:
        grad.mul_(coef)
    return total


def _full_norm(grad: torch.Tensor) -> torch.Tensor:
    norm = torch.linalg.vector_norm(grad)
    return norm.full_tensor() if isinstance(norm, DTensor) else norm


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
