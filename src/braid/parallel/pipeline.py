"""Pipeline parallelism: split the layers into stages by cost, build this rank's stages as
Decoder slices, run them under a torch.distributed.pipelining schedule.

    pp_mesh = dims.get_mesh("pp")
    pipe = build_pipeline(cfg, pp_mesh.get_local_rank(), dims.pp, pcfg.pp_schedule,
                          dims.num_microbatches, pcfg.pp_stages_per_rank, group=pp_mesh.get_group(),
                          cut_points=pcfg.pp_cut_points, mesh=mesh, state_dict=full_state_dict,
                          parallelize_fn=lambda part: parallelize(part, dims, mesh))
    out = pipeline_step(pipe, {"input_ids": ..., "labels": ..., "doc_ids": ...})  # fwd + bwd
    optimizer.step()  # over the parameters of pipe.modules; out.loss is equal on every rank
    ce_sum = pipeline_eval(pipe, batch)   # forward only (validation), equal on every rank

Every rank of the pipeline group calls `pipeline_step` with the same batch: the first stage
reads the tokens, the last the labels, and every stage the document ids (they reach each
stage as a keyword input of its forward, so no state or attention crosses a document on any
stage). The objective is the trainer's gradient accumulation over the microbatches:
sum of cross-entropy over the batch's targets / their count + sum(aux) / microbatches.
A stage's MoE auxiliary losses are attached to its output by `_AuxGrad`, whose backward
adds d(aux_scale * aux)/d(params) to the gradient the schedule sends back.

Shapes: B batch, T time, D d_model, V vocab, M microbatches.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.pipelining import PipelineStage, Schedule1F1B, ScheduleGPipe, ScheduleInterleaved1F1B
from torch.distributed.pipelining.schedules import PipelineScheduleMulti, PipelineScheduleSingle
from torch.distributed.tensor import DTensor

from braid.model.config import ModelConfig
from braid.model.decoder import Decoder
from braid.model.flops import layer_flops, layer_params
from braid.model.init import init_weights
from braid.parallel.loss import parallel_cross_entropy
from braid.parallel.parallelize import distribute_full_model

# Whether PipelineStage can rebuild received DTensors (TP activations) from mesh dim names.
# Without it (torch 2.11) a stage receives the local shard as a plain tensor, which the first
# block's TP input layout turns back into a DTensor: tp x pp trains the same on both
# (tests/parallel/test_pipeline.py and test_composed.py pass under 2.11 and 2.14).
STAGE_TAKES_MESH = "get_mesh" in inspect.signature(PipelineStage.__init__).parameters
# Whether a schedule's step takes microbatches already split (arg_mbs, kwarg_mbs, target_mbs)
# and loss keywords (torch 2.14). torch 2.11's step splits the batch itself and has no loss
# keywords: there `_run_schedule` drives the schedule's per-microbatch loop directly.
SCHEDULE_TAKES_MICROBATCHES = "arg_mbs" in inspect.signature(PipelineScheduleSingle.step).parameters

IGNORE_INDEX = -100
SCHEDULES = {"gpipe": ScheduleGPipe, "1f1b": Schedule1F1B, "interleaved_1f1b": ScheduleInterleaved1F1B}
MULTI_STAGE_SCHEDULES = frozenset({"interleaved_1f1b"})
AUX_NAMES = ("moe_load_balance", "moe_z_loss")  # the keys of Decoder's weighted aux losses


@dataclass(frozen=True)
class CostWeights:
    """How a block's cost mixes its share of the model's FLOPs and of its parameters.

    FLOPs per token set a stage's compute time, and the slowest stage paces every
    microbatch, so they dominate. Parameters (with gradients and optimizer state, ~16
    bytes each) set a stage's memory, and MoE layers hold num_experts/top_k times the
    weights they compute with; a small parameter weight keeps a stage of experts from
    also collecting most of the memory when the FLOP balance leaves room.
    """

    flops: float = 0.8
    params: float = 0.2

    def __post_init__(self) -> None:
        if self.flops < 0 or self.params < 0 or self.flops + self.params == 0:
            raise ValueError(f"CostWeights{self.flops, self.params}: weights must be >= 0 and not both zero")


def layer_costs(cfg: ModelConfig, *, seq_len: int | None = None, weights: CostWeights = CostWeights()) -> list[float]:
    """Cost of each block for stage balancing, the embedding folded into block 0 and the
    final norm and head into the last block (those blocks always open and close a stage).

    cost = weights.flops * flops / total flops + weights.params * params / total params,
    with forward FLOPs per token from braid.model.flops at `seq_len` (default max_seq_len).
    """
    seq_len = cfg.max_seq_len if seq_len is None else seq_len
    if seq_len <= 0:
        raise ValueError(f"seq_len must be positive, got {seq_len}")
    specs = cfg.layers
    flops = [sum(layer_flops(cfg, spec, seq_len).values()) for spec in specs]
    params = [float(layer_params(cfg, spec)) for spec in specs]
    head = cfg.vocab_size * cfg.d_model
    params[0] += head  # the embedding; its lookup costs no matmul FLOPs
    flops[-1] += 2.0 * head
    params[-1] += cfg.d_model + (0 if cfg.tie_embeddings else head)
    total_flops, total_params = sum(flops), sum(params)
    return [weights.flops * f / total_flops + weights.params * p / total_params for f, p in zip(flops, params)]


def split_layers(
    cfg: ModelConfig,
    num_stages: int,
    cut_points: Sequence[int] | None = None,
    *,
    seq_len: int | None = None,
    weights: CostWeights = CostWeights(),
) -> list[list[int]]:
    """Contiguous layer ids of each stage, covering every layer exactly once.

    cut_points: the first layer of stages 1..num_stages-1 (num_stages - 1 increasing ids in
        1..num_layers-1); None picks the split that minimises the costliest stage under
        `layer_costs` (an exact search over contiguous splits).
    """
    num_layers = cfg.resolved_num_layers
    if not 1 <= num_stages <= num_layers:
        raise ValueError(
            f"cannot split {num_layers} layers into {num_stages} pipeline stages: every stage needs "
            f"a layer, so use between 1 and {num_layers} stages (pp * pp_stages_per_rank)"
        )
    if cfg.tie_embeddings and num_stages > 1:
        raise ValueError(
            "tie_embeddings=True puts the embedding and the head on one stage; "
            "set tie_embeddings=False to pipeline this model"
        )
    if cut_points is None:
        cut_points = _balanced_cuts(layer_costs(cfg, seq_len=seq_len, weights=weights), num_stages)
    _check_cut_points(list(cut_points), num_stages, num_layers)
    bounds = [0, *cut_points, num_layers]
    return [list(range(bounds[s], bounds[s + 1])) for s in range(num_stages)]


def _check_cut_points(cut_points: list, num_stages: int, num_layers: int) -> None:
    if len(cut_points) != num_stages - 1:
        raise ValueError(
            f"pp_cut_points={cut_points} has {len(cut_points)} entries; {num_stages} stages need "
            f"{num_stages - 1} (the first layer of every stage but the first)"
        )
    if not all(isinstance(c, int) and not isinstance(c, bool) for c in cut_points):
        raise ValueError(f"pp_cut_points={cut_points} must be layer indices (ints)")
    if any(not 1 <= c <= num_layers - 1 for c in cut_points):
        raise ValueError(
            f"pp_cut_points={cut_points} must lie in 1..{num_layers - 1}: a cut at 0 or at "
            f"num_layers={num_layers} would leave a stage without layers"
        )
    if any(b <= a for a, b in zip(cut_points, cut_points[1:])):
        raise ValueError(
            f"pp_cut_points={cut_points} must be strictly increasing (equal cuts leave an empty stage)"
        )


def _balanced_cuts(costs: list[float], num_stages: int) -> list[int]:
    """Cut points minimising the largest stage cost (dynamic programming, O(S L^2))."""
    num_layers = len(costs)
    prefix = [0.0]
    for c in costs:
        prefix.append(prefix[-1] + c)
    inf = float("inf")
    # best[s][i]: smallest bottleneck putting layers [0, i) into s stages; cut[s][i]: last cut.
    best = [[inf] * (num_layers + 1) for _ in range(num_stages + 1)]
    cut = [[0] * (num_layers + 1) for _ in range(num_stages + 1)]
    best[0][0] = 0.0
    for s in range(1, num_stages + 1):
        for i in range(s, num_layers + 1):
            for j in range(s - 1, i):
                bottleneck = max(best[s - 1][j], prefix[i] - prefix[j])
                if bottleneck < best[s][i]:
                    best[s][i], cut[s][i] = bottleneck, j
    cuts, i = [], num_layers
    for s in range(num_stages, 1, -1):
        i = cut[s][i]
        cuts.append(i)
    return cuts[::-1]


def stage_ids_for_rank(pp_rank: int, pp_size: int, stages_per_rank: int = 1) -> list[int]:
    """Loop-style assignment: rank r holds stages r, r + pp_size, r + 2 * pp_size, ..."""
    if not 0 <= pp_rank < pp_size:
        raise ValueError(f"pp_rank={pp_rank} must be in 0..{pp_size - 1} (pp_size={pp_size})")
    if stages_per_rank < 1:
        raise ValueError(f"pp_stages_per_rank must be at least 1, got {stages_per_rank}")
    return [pp_rank + i * pp_size for i in range(stages_per_rank)]


class _AuxGrad(torch.autograd.Function):
    """Identity on a stage output; its backward also feeds `scale` into the stage's aux loss,
    so d(scale * aux)/d(params) joins the gradient of the pipeline's main loss."""

    @staticmethod
    def forward(ctx, out: torch.Tensor, aux: torch.Tensor, scale: float) -> torch.Tensor:
        ctx.scale = scale
        ctx.save_for_backward(aux)
        return out.view_as(out)

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        (aux,) = ctx.saved_tensors
        return grad_out, torch.full_like(aux, ctx.scale), None


class StageDecoder(Decoder):
    """A Decoder slice run as one pipeline stage: forward(h, doc_ids_BT) -> h (or logits).

    Its state dict keys are the full model's (the slice keeps the global layer keys), so a
    full state dict loads by name. The detached weighted aux losses of each forward are
    appended to `aux_log` for logging; `pipeline_step` empties it.
    """

    def __init__(self, cfg: ModelConfig, *, layer_ids: Sequence[int], embed: bool, head: bool):
        super().__init__(cfg, layer_ids=layer_ids, embed=embed, head=head)
        self.aux_log: list[dict[str, torch.Tensor]] = []

    def forward(
        self,
        h_BTD: torch.Tensor,
        doc_ids_BT: torch.Tensor | None = None,
        *,
        widths=None,
        aux_scale: float = 1.0,
    ) -> torch.Tensor:
        """h_BTD: token ids (B, T) on the first stage, hidden states (B, T, D) after it.
        Returns hidden states (B, T, D), or logits (B, T, V) on the last stage.
        aux_scale: the weight of this forward's aux losses in the step's objective."""
        if self.training and not torch.is_grad_enabled():
            # The schedule's shape inference (torch 2.11 runs one on zeros, without autograd):
            # forward as in evaluation, so it leaves no training statistics (MoE token counts).
            self.eval()
            try:
                return super().forward(h_BTD, doc_ids_BT, widths=widths)
            finally:
                self.train()
        out, aux = super().forward(h_BTD, doc_ids_BT, widths=widths, return_aux=True)
        self.aux_log.append({name: value.detach() for name, value in aux.items()})
        if not aux:
            return out
        return _AuxGrad.apply(out, sum(aux.values()), aux_scale)


@dataclass
class Pipeline:
    """This rank's share of a pipeline: its stage modules (in stage order) and the schedule."""

    schedule: PipelineScheduleSingle | PipelineScheduleMulti
    modules: list[StageDecoder]
    stages: list[PipelineStage]
    stage_ids: list[int]
    layer_ids: list[list[int]]  # per local stage
    num_microbatches: int
    group: dist.ProcessGroup | None

    @property
    def has_first(self) -> bool:
        return 0 in self.stage_ids

    @property
    def has_last(self) -> bool:
        return self.stages[-1].is_last


def build_stage_modules(
    cfg: ModelConfig,
    pp_rank: int,
    pp_size: int,
    stages_per_rank: int = 1,
    *,
    cut_points: Sequence[int] | None = None,
    seq_len: int | None = None,
    weights: CostWeights = CostWeights(),
) -> tuple[list[int], list[list[int]], list[StageDecoder]]:
    """(stage ids, layer ids per stage, stage modules) of this rank, built on the meta device."""
    stage_ids = stage_ids_for_rank(pp_rank, pp_size, stages_per_rank)
    num_stages = pp_size * stages_per_rank
    split = split_layers(cfg, num_stages, cut_points, seq_len=seq_len, weights=weights)
    modules = []
    with torch.device("meta"):
        for s in stage_ids:
            modules.append(StageDecoder(cfg, layer_ids=split[s], embed=s == 0, head=s == num_stages - 1))
    return stage_ids, [split[s] for s in stage_ids], modules


def build_schedule(
    modules: Sequence[nn.Module],
    stage_ids: Sequence[int],
    num_stages: int,
    schedule: str,
    microbatches: int,
    *,
    device: str | torch.device = "cpu",
    group: dist.ProcessGroup | None = None,
    mesh: DeviceMesh | None = None,
) -> tuple[PipelineScheduleSingle | PipelineScheduleMulti, list[PipelineStage]]:
    """Wrap materialised stage modules in PipelineStages and build the named schedule.

    mesh: the world mesh, from which a stage rebuilds the DTensors (TP/SP activations) it
    receives; their mesh is found by its dim names.
    """
    extra = {}
    if mesh is not None and STAGE_TAKES_MESH:
        extra["get_mesh"] = lambda dim_names, layout: mesh[tuple(dim_names)]
    stages = [PipelineStage(module, s, num_stages, torch.device(device), group=group, **extra)
              for module, s in zip(modules, stage_ids)]
    # The loss is already divided by the step's target count and the aux losses carry
    # aux_scale, so per-microbatch gradients are summed, never averaged again.
    kwargs = dict(n_microbatches=microbatches, loss_fn=_microbatch_cross_entropy, scale_grads=False)
    if schedule in MULTI_STAGE_SCHEDULES:
        return SCHEDULES[schedule](stages, **kwargs), stages
    return SCHEDULES[schedule](stages[0], **kwargs), stages


def _microbatch_cross_entropy(
    logits_BTV: torch.Tensor, labels_BT: torch.Tensor, num_targets: float = 1, ce_scale: float = 1.0
) -> torch.Tensor:
    """The microbatch's cross-entropy summed over its targets, divided by the step's targets
    and times ce_scale (the defaults give the plain sum, as validation uses)."""
    if not isinstance(logits_BTV, DTensor):
        logits_NV = logits_BTV.flatten(0, 1)
        logits_NV = logits_NV.to(torch.promote_types(logits_NV.dtype, torch.float32))
        ce_sum = F.cross_entropy(logits_NV, labels_BT.flatten(), ignore_index=IGNORE_INDEX, reduction="sum")
        return ce_sum / num_targets * ce_scale
    # Vocab-sharded logits (TP): parallel_cross_entropy gives the mean over the targets,
    # which is NaN for a microbatch without any.
    num_valid = int((labels_BT != IGNORE_INDEX).sum())
    if num_valid == 0:
        return logits_BTV.to_local().sum() * 0.0
    return parallel_cross_entropy(logits_BTV, labels_BT, IGNORE_INDEX) * (num_valid / num_targets) * ce_scale


def _check_layout(schedule: str, pp_size: int, microbatches: int, stages_per_rank: int) -> None:
    if schedule not in SCHEDULES:
        raise ValueError(f"pp_schedule={schedule!r} is not one of {sorted(SCHEDULES)}")
    if schedule in MULTI_STAGE_SCHEDULES and stages_per_rank < 2:
        raise ValueError(
            f"pp_schedule={schedule!r} interleaves several stages per rank: set pp_stages_per_rank >= 2"
        )
    if schedule not in MULTI_STAGE_SCHEDULES and stages_per_rank != 1:
        raise ValueError(
            f"pp_schedule={schedule!r} runs one stage per rank but pp_stages_per_rank={stages_per_rank}: "
            "set pp_stages_per_rank=1 or pp_schedule='interleaved_1f1b'"
        )
    if microbatches < pp_size:
        raise ValueError(
            f"pp_microbatches={microbatches} is smaller than pp={pp_size}: the pipeline would never "
            f"fill; use at least {pp_size} microbatches"
        )


def build_pipeline(
    cfg: ModelConfig,
    pp_rank: int,
    pp_size: int,
    schedule: str,
    microbatches: int,
    stages_per_rank: int = 1,
    *,
    group: dist.ProcessGroup | None = None,
    device: str | torch.device = "cpu",
    cut_points: Sequence[int] | None = None,
    seq_len: int | None = None,
    weights: CostWeights = CostWeights(),
    parallelize_fn: Callable[[StageDecoder], nn.Module] | None = None,
    mesh: DeviceMesh | None = None,
    state_dict: dict[str, torch.Tensor] | None = None,
    seed: int = 0,
) -> Pipeline:
    """Build this rank's stages (Decoder slices), materialise them on `device` and wrap them
    in the schedule ("gpipe", "1f1b" or "interleaved_1f1b" with stages_per_rank >= 2).

    group: the pipeline process group (pp_rank is this rank's index in it); default: world.
    parallelize_fn: applied to each stage module on the meta device (TP, EP, activation
        checkpointing, compile, ZeRO), before the schedule wraps it; it must modify the
        module in place and return it (as braid.parallel.parallelize does).
    mesh: the world mesh, needed when stages exchange DTensors (tensor/sequence parallel).
    state_dict: the full model's state dict (e.g. build_model(cfg, seed=s).state_dict());
        each stage loads its own keys, so training starts from the single-process weights.
        Without it each stage is initialised by braid.model.init with `seed` (the same
        scheme, other random draws than the single-process model).
    """
    _check_layout(schedule, pp_size, microbatches, stages_per_rank)
    stage_ids, layer_ids, modules = build_stage_modules(
        cfg, pp_rank, pp_size, stages_per_rank, cut_points=cut_points, seq_len=seq_len, weights=weights
    )
    parts = []
    for stage_id, module in zip(stage_ids, modules):
        part = parallelize_fn(module) if parallelize_fn is not None else module
        part.to_empty(device=device)
        _load_part(part, cfg, state_dict, seed + stage_id)
        parts.append(part)
    num_stages = pp_size * stages_per_rank
    sched, stages = build_schedule(
        parts, stage_ids, num_stages, schedule, microbatches, device=device, group=group, mesh=mesh
    )
    return Pipeline(sched, parts, stages, stage_ids, layer_ids, microbatches, group)


def _load_part(part: nn.Module, cfg: ModelConfig, state_dict: dict | None, seed: int) -> None:
    if state_dict is None:
        init_weights(part, cfg, seed)
    else:
        distribute_full_model(part, state_dict)


@dataclass
class PipelineLoss:
    """Detached scalars, equal on every rank of the pipeline group.

    loss = ce + sum(aux.values()); ce is the batch's mean cross-entropy share
    (sum / num_targets) and aux the weighted MoE losses times aux_scale, summed over
    microbatches and stages (their contribution to the step's loss).
    """

    loss: torch.Tensor
    ce: torch.Tensor
    aux: dict[str, torch.Tensor]


def pipeline_step(
    pipeline: Pipeline,
    batch: dict[str, torch.Tensor],
    *,
    num_targets: int | None = None,
    ce_scale: float = 1.0,
    aux_scale: float | None = None,
    widths=None,
) -> PipelineLoss:
    """Forward and backward of `batch` through the pipeline; gradients accumulate in the
    stage modules' parameters (the caller steps the optimizer and zeroes them).

    batch: "input_ids" (B, T), "labels" (B, T) with IGNORE_INDEX (-100) for no target, and
        optionally "doc_ids" (B, T); the same batch on every rank of the group. B must be a
        multiple of the pipeline's microbatches.
    num_targets: the divisor of the summed cross-entropy (default: the batch's targets);
        pass the step's total when one optimizer step accumulates several pipeline_steps.
    ce_scale: a further factor of the cross-entropy (the trainer passes num_targets=1 and
        its data-parallel scale dp_size / the step's global targets).
    aux_scale: weight of each microbatch's aux losses (default 1 / microbatches); pass
        1 / (microbatches * accumulation steps) when accumulating.
    widths: MatFormer widths, as for Decoder.forward.
    """
    num_mb = pipeline.num_microbatches
    if num_targets is None:
        num_targets = max(1, int((batch["labels"] != IGNORE_INDEX).sum()))
    aux_scale = 1.0 / num_mb if aux_scale is None else aux_scale
    arg_mbs, kwarg_mbs, target_mbs = _split_batch(pipeline, batch, widths, aux_scale)
    for module in pipeline.modules:
        module.aux_log.clear()
    losses: list[torch.Tensor] = []
    loss_kwargs = {"num_targets": num_targets, "ce_scale": ce_scale}
    _run_schedule(pipeline, arg_mbs, kwarg_mbs, target_mbs, losses, loss_kwargs, backward=True)
    return _gather_loss(pipeline, losses, aux_scale)


@torch.no_grad()
def pipeline_eval(pipeline: Pipeline, batch: dict[str, torch.Tensor], *, widths=None) -> torch.Tensor:
    """The cross-entropy summed over the batch's targets, forward only through the schedule
    (stages in eval mode); a float64 scalar equal on every rank of the pipeline group.
    batch: as for pipeline_step (B a multiple of the pipeline's microbatches)."""
    arg_mbs, kwarg_mbs, target_mbs = _split_batch(pipeline, batch, widths, aux_scale=0.0)
    modes = [module.training for module in pipeline.modules]
    for module in pipeline.modules:
        module.eval()
    losses: list[torch.Tensor] = []
    try:
        _run_schedule(pipeline, arg_mbs, kwarg_mbs, target_mbs, losses, None, backward=False)
    finally:
        for module, mode in zip(pipeline.modules, modes):
            module.train(mode)
            module.aux_log.clear()
    total = torch.zeros(1, dtype=torch.float64, device=pipeline.stages[0].device)
    if pipeline.has_last:
        total[0] = sum(_plain(loss).double() for loss in losses)
    dist.all_reduce(total, group=pipeline.group)
    return total[0].cpu()


def _run_schedule(pipeline: Pipeline, arg_mbs, kwarg_mbs, target_mbs, losses: list, loss_kwargs, *, backward: bool):
    """One pass of the schedule over pre-split microbatches: forward and backward, or forward
    only (backward=False). On torch 2.14 through its public step/eval; on torches whose step
    only splits a whole batch (2.11) through the schedule's own per-microbatch loop
    (`_step_microbatches`, the method step calls after splitting), with the loss keywords
    bound into the loss function for the pass."""
    schedule = pipeline.schedule
    if SCHEDULE_TAKES_MICROBATCHES:
        if backward:
            schedule.step(arg_mbs=arg_mbs, kwarg_mbs=kwarg_mbs, target_mbs=target_mbs, losses=losses,
                          return_outputs=False, loss_kwargs=loss_kwargs)
        else:
            schedule.eval(arg_mbs=arg_mbs, kwarg_mbs=kwarg_mbs, target_mbs=target_mbs, losses=losses)
        return
    if backward and not torch.is_grad_enabled():
        raise RuntimeError("pipeline_step needs gradients enabled; use pipeline_eval for forward only")
    loss_fn, has_backward = schedule._loss_fn, schedule._has_backward
    schedule._loss_fn = functools.partial(_microbatch_cross_entropy, **(loss_kwargs or {}))
    schedule._has_backward = backward and has_backward
    try:
        for stage in pipeline.stages:  # what step() does before its loop
            stage.has_backward = schedule._has_backward
            stage.clear_runtime_states()
        schedule._step_microbatches(arg_mbs, kwarg_mbs, target_mbs, losses, False)
    finally:
        schedule._loss_fn, schedule._has_backward = loss_fn, has_backward


def _split_batch(pipeline: Pipeline, batch: dict[str, torch.Tensor], widths, aux_scale: float):
    """(arg_mbs, kwarg_mbs, target_mbs) of the schedule: tokens on the first stage, labels
    on the last, document ids and the stage keywords everywhere."""
    num_mb = pipeline.num_microbatches
    tokens_BT, labels_BT = batch["input_ids"], batch["labels"]
    if tokens_BT.shape[0] % num_mb != 0:
        raise ValueError(
            f"batch size {tokens_BT.shape[0]} is not a multiple of pp_microbatches={num_mb}: "
            "change the micro-batch size (data.batch_size) or parallel.pp_microbatches"
        )
    doc_mbs = [None] * num_mb if batch.get("doc_ids") is None else batch["doc_ids"].tensor_split(num_mb)
    kwarg_mbs = [_stage_kwargs(doc_ids, widths, aux_scale) for doc_ids in doc_mbs]
    arg_mbs = [(t,) for t in tokens_BT.tensor_split(num_mb)] if pipeline.has_first else None
    target_mbs = list(labels_BT.tensor_split(num_mb)) if pipeline.has_last else None
    return arg_mbs, kwarg_mbs, target_mbs


def _stage_kwargs(doc_ids_BT: torch.Tensor | None, widths, aux_scale: float) -> dict:
    kwargs = {"widths": widths, "aux_scale": aux_scale}
    if doc_ids_BT is not None:
        kwargs["doc_ids_BT"] = doc_ids_BT
    return kwargs


def _gather_loss(pipeline: Pipeline, losses: list[torch.Tensor], aux_scale: float) -> PipelineLoss:
    """Sum the last stage's CE and every stage's aux across the pipeline group."""
    aux_names = [n for n in AUX_NAMES if any(s.ffn == "moe" for s in pipeline.modules[0].cfg.layers)]
    totals = torch.zeros(1 + len(aux_names), dtype=torch.float64, device=pipeline.stages[0].device)
    if pipeline.has_last:
        totals[0] = sum(_plain(loss).double() for loss in losses)
    for module in pipeline.modules:
        # The schedule's first step also runs a shape-inference forward on stand-in
        # tensors; only the last num_microbatches forwards are this step's.
        for aux in module.aux_log[-pipeline.num_microbatches :]:
            for i, name in enumerate(aux_names, start=1):
                if name in aux:
                    totals[i] += aux_scale * _plain(aux[name]).double()
        module.aux_log.clear()
    dist.all_reduce(totals, group=pipeline.group)
    totals = totals.cpu()
    aux = {name: totals[i] for i, name in enumerate(aux_names, start=1)}
    return PipelineLoss(loss=totals.sum(), ce=totals[0], aux=aux)


def _plain(value: torch.Tensor) -> torch.Tensor:
    value = value.detach()
    return value.full_tensor() if isinstance(value, DTensor) else value
