"""The training step, the engines it drives, and the non-finite (NaN/inf) guard.

Shapes: B batch, T time, V vocab.

`engine_step` is the step of every layout; what differs is the engine, a small object that
runs forward and backward of one micro-batch and then clips and steps:

    ModelEngine      one model and its optimizer: one process, TP, FSDP2, EP (DTensors);
                     in one process the head and the loss run fused (no full logits)
    PipelineEngine   this rank's pipeline stages (braid.parallel.pipeline), one optimizer each
    DeepSpeedEngine  a deepspeed engine (ZeRO 1/2/3; TP on local shards), pp = 1
    PipelineDeepSpeedEngine  this rank's pipeline stages under one deepspeed engine (ZeRO-1)

Under a parallel layout (braid.train.distributed.Layout) the step is the single-process
step on the global batch: the targets are counted over the data-parallel ranks, each rank's
loss is scaled so that the data-parallel gradient average gives the global gradient, the
logged losses are averaged over dp (and equal on every pipeline rank), and the gradient
norm is the norm of the whole model (over TP, FSDP and EP meshes and pipeline stages).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.distributed.tensor import DTensor

from braid.kernels.cross_entropy import linear_cross_entropy
from braid.parallel import parallel_cross_entropy
from braid.parallel.ep import update_moe_bias
from braid.parallel.pipeline import Pipeline, pipeline_eval, pipeline_step
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


def linear_cross_entropy_sum(hidden_BTD: torch.Tensor, weight_VD: torch.Tensor, labels_BT: torch.Tensor) -> torch.Tensor:
    """cross_entropy_sum of the logits hidden_BTD @ weight_VD^T, computed by the fused
    linear + cross-entropy kernel (braid.kernels.cross_entropy) without the full logits."""
    return linear_cross_entropy(
        hidden_BTD.flatten(0, 1), weight_VD, labels_BT.flatten(), ignore_index=IGNORE_INDEX, reduction="sum"
    )


class Engine(Protocol):
    """What the step needs of a layout's model and optimizer."""

    parts: list[nn.Module]  # the model parts this rank holds (one, or its pipeline stages)

    def set_lr(self, lr: float) -> None: ...

    def forward_backward(
        self, batch: dict[str, torch.Tensor], ce_scale: float, aux_scale: float, width, autocast
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Backward of ce_scale * CE sum + aux_scale * aux of one micro-batch; returns (loss, ce) detached."""

    def clip_and_step(self, grad_clip: float, loss_finite: bool) -> tuple[torch.Tensor, bool]:
        """Clip to `grad_clip` (inf: off), step unless a loss or the norm is not finite, zero the
        gradients; returns (gradient norm before clipping, updated)."""

    def evaluate_batch(self, batch: dict[str, torch.Tensor], autocast) -> float:
        """The batch's summed validation cross-entropy (equal on every rank)."""


class ModelEngine:
    """One model and its optimizer: one process, or TP / FSDP2 / EP ranks (DTensor parameters)."""

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, layout: Layout | None = None):
        self.model, self.optimizer, self.layout = model, optimizer, layout
        self.parts, self.optimizers = [model], [optimizer]

    @property
    def parallel(self) -> bool:
        return self.layout is not None and self.layout.parallel

    def set_lr(self, lr: float) -> None:
        set_lr(self.optimizer, lr)

    def forward_backward(self, batch, ce_scale, aux_scale, width, autocast):
        with autocast:
            if self.parallel:
                logits_BTV, aux = self.model(batch["input_ids"], batch["doc_ids"], widths=width, return_aux=True)
                ce = cross_entropy_sum(logits_BTV, batch["labels"]) * ce_scale
            else:  # the head and the loss fused: the (tokens x vocab) logits are never held at once
                hidden_BTD, aux = self.model(
                    batch["input_ids"], batch["doc_ids"], widths=width, return_aux=True, return_hidden=True
                )
                ce = linear_cross_entropy_sum(hidden_BTD, self.model.head_weight, batch["labels"]) * ce_scale
        loss = ce + sum(aux.values()) * aux_scale
        loss.backward()
        return loss.detach(), ce.detach()

    def clip_and_step(self, grad_clip, loss_finite):
        if self.parallel:
            grad_norm = clip_grad_norm(list(self.model.parameters()), grad_clip)
        else:
            grad_norm = nn.utils.clip_grad_norm_(self.model.parameters(), grad_clip)
        updated = loss_finite and bool(torch.isfinite(grad_norm))
        if updated:
            self.optimizer.step()
            if self.parallel:
                update_moe_bias(self.model, self.layout.dp_group)
            else:
                self.model.update_moe_bias()
        self.optimizer.zero_grad(set_to_none=True)
        return grad_norm, updated

    def evaluate_batch(self, batch, autocast):
        with autocast:
            logits_BTV = self.model(batch["input_ids"], batch["doc_ids"])
        return float(cross_entropy_sum(logits_BTV, batch["labels"]))


class PipelineEngine:
    """This rank's pipeline stages (each parallelized by TP/FSDP2/EP), one optimizer per stage.

    Each micro-batch of the step runs through the schedule as pipeline.num_microbatches
    pipeline microbatches; the loss and aux of the whole pipeline are equal on every rank.
    """

    def __init__(self, pipeline: Pipeline, optimizers: Sequence[torch.optim.Optimizer], layout: Layout):
        self.pipeline, self.optimizers, self.layout = pipeline, list(optimizers), layout
        self.parts = list(pipeline.modules)

    def set_lr(self, lr: float) -> None:
        for optimizer in self.optimizers:
            set_lr(optimizer, lr)

    def forward_backward(self, batch, ce_scale, aux_scale, width, autocast):
        with autocast:
            out = pipeline_step(
                self.pipeline, batch, num_targets=1, ce_scale=ce_scale,
                aux_scale=aux_scale / self.pipeline.num_microbatches, widths=width,
            )
        return out.loss, out.ce

    def clip_and_step(self, grad_clip, loss_finite):
        params = [p for part in self.parts for p in part.parameters()]
        grad_norm = clip_grad_norm(params, grad_clip, self.layout.pp_group)
        updated = loss_finite and bool(torch.isfinite(grad_norm))
        for optimizer in self.optimizers:
            if updated:
                optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        if updated:
            for part in self.parts:
                update_moe_bias(part, self.layout.dp_group)
        return grad_norm, updated

    def evaluate_batch(self, batch, autocast):
        with autocast:
            return float(pipeline_eval(self.pipeline, batch))


class _DeepSpeedStep:
    """The optimizer half shared by the deepspeed engines: `self.engine` (a deepspeed engine in
    unmanaged accumulation mode) reduces, clips (DeepSpeed's gradient_clipping) and steps, or
    skips a step whose gradient norm is not finite (its overflow check, on by default in
    float32 and bf16; its grad norm is always computed, zero_optimization.compute_grad_norm)."""

    engine: Any
    layout: Layout
    parts: list[nn.Module]

    def set_lr(self, lr: float) -> None:
        for group in self.engine.optimizer.param_groups:
            group["lr"] = lr

    def clip_and_step(self, grad_clip, loss_finite):
        # DeepSpeed decides from the gradient norm alone (a non-finite loss gives one too).
        self.engine.step()
        grad_norm = torch.tensor(float(self.engine.get_global_grad_norm()), dtype=torch.float64)
        updated = bool(torch.isfinite(grad_norm))
        if updated:
            for part in self.parts:
                update_moe_bias(part, self.layout.dp_group)
        return grad_norm, updated


class DeepSpeedEngine(_DeepSpeedStep):
    """A deepspeed engine (braid.parallel.deepspeed) in its unmanaged accumulation mode:
    backward accumulates, `step` reduces, clips and steps (_DeepSpeedStep)."""

    def __init__(self, engine: Any, layout: Layout):
        self.engine, self.layout = engine, layout
        self.parts = [engine.module]

    def forward_backward(self, batch, ce_scale, aux_scale, width, autocast):
        with autocast:
            logits_BTV, aux = self.engine(batch["input_ids"], batch["doc_ids"], widths=width, return_aux=True)
        ce = cross_entropy_sum(logits_BTV, batch["labels"]) * ce_scale
        loss = ce + sum(aux.values()) * aux_scale
        self.engine.backward(loss, scale_wrt_gas=False)
        return loss.detach(), ce.detach()

    def evaluate_batch(self, batch, autocast):
        with autocast:
            logits_BTV = self.engine.module(batch["input_ids"], batch["doc_ids"])
        return float(cross_entropy_sum(logits_BTV, batch["labels"]))


class PipelineDeepSpeedEngine(_DeepSpeedStep, PipelineEngine):
    """This rank's pipeline stages under one deepspeed engine in ZeRO-1 (pp > 1; its module is
    braid.parallel.deepspeed.StageParts, in unmanaged accumulation mode).

    The torch pipeline schedule runs forward and backward of every micro-batch with plain
    autograd, so the stages' param.grad sum the scaled microbatch gradients (the scaling of
    PipelineEngine: ce_scale holds dp_size, so DeepSpeed's data-parallel average gives the
    global gradient, as FSDP2's does). The step is _DeepSpeedStep's: engine.step() reduces
    the gradients over the data-parallel group into this rank's ZeRO-1 partition
    (reduce_gradients, as DeepSpeed's own PipelineEngine does), clips at optim.grad_clip
    with the whole model's norm (DeepSpeed sums it over dp and over the mpu's model-parallel
    group, the tp x pp ranks), skips the step on every stage when that norm is not finite,
    and steps the partitioned AdamW.
    """

    def __init__(self, pipeline: Pipeline, engine: Any, layout: Layout):
        PipelineEngine.__init__(self, pipeline, [], layout)
        self.engine = engine

    def forward_backward(self, batch, ce_scale, aux_scale, width, autocast):
        # What engine.forward does first: ZeRO's per-forward gradient-hook bookkeeping.
        self.engine.optimizer.clear_backward_seen_flag()
        return super().forward_backward(batch, ce_scale, aux_scale, width, autocast)


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
    """`engine_step` of one model and its optimizer (ModelEngine)."""
    engine = ModelEngine(model, optimizer, layout)
    return engine_step(engine, micro_batches, lr, grad_clip, autocast, layout=layout, widths=widths)


def engine_step(
    engine: Engine,
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
    engine.set_lr(lr)
    dp_size = layout.dp_size if layout is not None else 1
    num_targets = _global_sum(sum(int((b["labels"] != IGNORE_INDEX).sum()) for b in micro_batches), layout)
    # Data-parallel gradients are averaged over dp ranks, hence the dp_size.
    ce_scale = dp_size / max(1.0, num_targets)
    loss_sum = ce_sum = 0.0
    for batch in micro_batches:
        for width, weight in widths or [(None, 1.0)]:
            loss, ce = engine.forward_backward(batch, weight * ce_scale, weight / len(micro_batches), width, autocast)
            loss_sum += loss
            ce_sum += ce
    loss_sum, ce_sum = _dp_mean(loss_sum, ce_sum, layout)
    clip = grad_clip if grad_clip > 0 else math.inf
    grad_norm, updated = engine.clip_and_step(clip, bool(torch.isfinite(loss_sum)))
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
def clip_grad_norm(
    params: list[nn.Parameter], max_norm: float, pp_group: dist.ProcessGroup | None = None
) -> torch.Tensor:
    """torch's clip_grad_norm_ for gradients that are DTensors on several meshes (TP, FSDP,
    EP experts) or plain tensors: the 2-norm of the whole model's gradient, then scaling.
    pp_group: the pipeline ranks, each holding other stages' gradients (their squared norms
    are summed over it)."""
    grads = [p.grad for p in params if p.grad is not None]
    norms = [_full_norm(g) for g in grads]
    dtype = norms[0].dtype if norms else torch.float32
    total = torch.linalg.vector_norm(torch.stack([n.to(dtype) for n in norms])) if norms else torch.tensor(0.0)
    if pp_group is not None and dist.get_world_size(pp_group) > 1:
        squared = (total.double() ** 2).reshape(1)
        dist.all_reduce(squared, group=pp_group)
        total = squared[0].sqrt().to(dtype)
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
