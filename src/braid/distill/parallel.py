"""`braid distill` under torchrun: N data-parallel ranks, the student and the teacher FSDP2-sharded.

    world = setup_world("cpu")                  # torchrun's WORLD_SIZE; process group, 1-D "dp" mesh
    shard_student(student, world.mesh)          # ZeRO-3: every block one unit, then the root
    shard_teacher(teacher, world.mesh)          # frozen: each rank holds 1/N, all-gathered per block
    loss = stage_loss(stage, student, teacher, batch, world, block_size=..., temperature=..., ce_weight=...)

Each rank reads its own rows of the global batch and computes its stage loss as a mean over
them; FSDP2 averages the gradients over the ranks, so with equal per-rank batches the step
is the one-process step on the global batch (stage 3's cross-entropy is normalised by the
global count of targets, which differs between ranks, so that it holds there too).

Why stage 1 and 2 need more than the stage losses of braid.distill.losses: FSDP2 all-gathers a
unit's parameters in the pre-forward hook of the module it wraps, and only there. The stage
losses call submodules directly: stage 1 runs a block's mixer_norm and the teacher's wq/wk,
the student's B/C/dt projections and convs and reads A_log and dt_bias (attributes, no
forward at all); both stages embed tokens with the teacher's tok_embeddings outside the
root's forward. On a sharded module those would see 1/N of each weight (as DTensors).
`fsdp_call(module, fn, *args)` runs fn(*args) between the module's FSDP pre- and
post-forward hooks (torch's register_fsdp_forward_method), so fn sees the unit's whole
parameters and, under grad, the unit's gradients are reduce-scattered in backward as for a
forward. braid.distill.losses runs each block's work, and the embedding, through such a
call (`call=fsdp_call`), and with `input_grad=True` makes the student's block inputs (the
teacher's hidden states) require grad, so FSDP's post-backward hook of each block fires as
soon as that block's backward is done (reshard and reduce-scatter per block, as in
training) instead of at the end of backward.

FSDP2 makes the first unit to run forward the root of its tree, so sharding runs each
root once (a no-op call) before any block runs alone. The teacher never runs backward, so
FSDP's per-iteration bookkeeping (the forward order kept for backward prefetching, which
would grow every step) is reset after each step (`end_teacher_step`).
"""

from __future__ import annotations

import os
import types
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.fsdp import FSDPModule, register_fsdp_forward_method
from torch.distributed.tensor import DTensor

from braid.data.packing import IGNORE_INDEX
from braid.distill.losses import kd_loss, stage1_loss, stage2_loss, stage3_loss
from braid.parallel.fsdp import apply_fsdp
from braid.train.distributed import env_world_size, init_process_group, local_device, read_as_shards

_CALL = "_braid_fsdp_call"


@dataclass
class World:
    """Where this process stands: rank of world_size, its device, the data-parallel mesh
    (None in one process)."""

    rank: int
    world_size: int
    device: torch.device
    mesh: DeviceMesh | None = None

    @property
    def parallel(self) -> bool:
        return self.mesh is not None

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def mean(self, value: float) -> float:
        """The mean of `value` over the ranks (every rank must call it)."""
        if not self.parallel:
            return value
        total = torch.tensor([value], dtype=torch.float64)  # CPU: gloo under "cuda:nccl,cpu:gloo" too
        dist.all_reduce(total)
        return total.item() / self.world_size

    def gather(self, obj) -> list:
        """`obj` of every rank, in rank order, on every rank."""
        if not self.parallel:
            return [obj]
        out: list = [None] * self.world_size
        dist.all_gather_object(out, obj)
        return out


def setup_world(device: str) -> World:
    """The world of torchrun's environment (WORLD_SIZE unset or 1: one process, nothing
    initialised): the default process group (gloo on CPU, "cuda:nccl,cpu:gloo" on CUDA; an
    existing one is kept), this rank's device (cuda:LOCAL_RANK) and the 1-D "dp" mesh."""
    world_size, dev = env_world_size(), torch.device(device)
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"--device {device}: no CUDA device is visible; use --device cpu")
        visible = torch.cuda.device_count()
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        local_ranks = int(os.environ.get("LOCAL_WORLD_SIZE", str(local_rank + 1)))
        if world_size > 1 and max(local_ranks, local_rank + 1) > visible:
            raise ValueError(
                f"--device {device} with {local_ranks} processes on this node but {visible} visible CUDA "
                f"device(s): every rank needs a card of its own; start at most {visible} processes per node "
                f"(torchrun --nproc_per_node {visible}) or use --device cpu"
            )
        dev = local_device(dev)
    elif dev.type != "cpu":
        raise ValueError(f"--device {device}: use cpu or cuda")
    if world_size == 1:
        return World(0, 1, dev)
    init_process_group(dev)
    if dist.get_world_size() != world_size:
        raise ValueError(f"WORLD_SIZE={world_size} but the process group has {dist.get_world_size()} ranks")
    mesh = init_device_mesh(dev.type, (world_size,), mesh_dim_names=("dp",))
    return World(dist.get_rank(), world_size, dev, mesh)


def virtual_ranks(read_as_dp: int, batch_size: int, rank: int, world_size: int) -> list[int]:
    """The data shards (of read_as_dp, or of world_size) that `rank` reads, stacked: the
    trainer's data.read_as_dp rule (braid.train.distributed.read_as_shards) for --read-as-dp."""
    return read_as_shards(read_as_dp, batch_size, rank, world_size, ("--read-as-dp ", "--batch-size "))


def _forward_with(self, fn, *args):
    return fn(*args)


def fsdp_call(module: nn.Module, fn, *args):
    """fn(*args) run as a forward of `module`: for an FSDP2 module its parameters (those of
    its own unit) are all-gathered around fn, and under grad its unit takes part in backward
    as after a forward. A plain module: fn(*args)."""
    if not isinstance(module, FSDPModule):
        return fn(*args)
    if _CALL not in vars(module):
        setattr(module, _CALL, types.MethodType(_forward_with, module))
        register_fsdp_forward_method(module, _CALL)
    return getattr(module, _CALL)(fn, *args)


def _nothing() -> None:
    return None


def _shard(model: nn.Module, mesh: DeviceMesh) -> nn.Module:
    apply_fsdp(model, mesh, reshard_after_forward=True)
    # FSDP2 takes the first unit that runs forward as its root; stages 1 and 2 call blocks
    # alone, so run the root once here (one all-gather of its own parameters).
    with torch.no_grad():
        fsdp_call(model, _nothing)
    _reset(model)
    return model


def _reset(model: nn.Module) -> None:
    """Clear the per-iteration FSDP state of a root that ran forwards without a backward."""
    if not isinstance(model, FSDPModule):
        return
    reset = getattr(model, "reset_iter_state", None)
    if reset is not None:
        reset()
        return
    # A torch without reset_iter_state: drop the forward order kept for backward prefetching
    # (private attributes, hence the getattr), else it grows by one entry per unit and step.
    state = model._get_fsdp_state()
    order = getattr(getattr(state, "_comm_ctx", None), "post_forward_order", None)
    if order is not None:
        order.clear()
    for unit in getattr(getattr(state, "_state_ctx", None), "all_states", ()):
        groups = getattr(unit, "_fsdp_param_groups", None) or [getattr(unit, "_fsdp_param_group", None)]
        for group in groups:
            indices = getattr(group, "_post_forward_indices", None)
            if indices is not None:
                indices.clear()


def shard_student(student: nn.Module, mesh: DeviceMesh) -> nn.Module:
    """ZeRO-3 over `mesh`: each block one FSDP2 unit, then the root (embedding, norm, head);
    parameters resharded after forward. In place; returns `student`."""
    _check_uniform_dtype(student)
    return _shard(student, mesh)


def shard_teacher(teacher: nn.Module, mesh: DeviceMesh) -> nn.Module:
    """The frozen teacher sharded like the student: each rank keeps 1/N of every parameter,
    a block's are all-gathered for its forward and freed after it."""
    if any(param.requires_grad for param in teacher.parameters()):
        raise ValueError("shard_teacher: freeze the teacher first (requires_grad_(False))")
    return _shard(teacher, mesh)


def _check_uniform_dtype(model: nn.Module) -> None:
    dtypes = {param.dtype for param in model.parameters()}
    if len(dtypes) > 1:  # FSDP2 reduce-scatters one dtype per unit
        raise ValueError(f"shard_student: parameters of several dtypes {sorted(map(str, dtypes))}; cast them to one")


def end_teacher_step(teacher: nn.Module) -> None:
    """Forget the teacher's per-iteration FSDP state (it never runs the backward that would)."""
    _reset(teacher)


# ---- stage 3 over ranks (stages 1 and 2 are braid.distill.losses with call=fsdp_call) ----


def sharded_stage3_loss(
    student, teacher, tokens_BT: Tensor, doc_ids_BT: Tensor | None, targets_BT: Tensor,
    temperature: float, ce_weight: float, world: World,
) -> Tensor:
    """stage3_loss on this rank's rows; the cross-entropy term is this rank's sum over the
    global count of targets times world_size, so the mean over ranks is the global mean."""
    with torch.no_grad():
        teacher_BTV = teacher(tokens_BT, doc_ids_BT)
    student_BTV = student(tokens_BT, doc_ids_BT)
    loss = kd_loss(student_BTV, teacher_BTV, temperature)
    if not ce_weight:
        return loss
    ce_sum = F.cross_entropy(
        student_BTV.float().flatten(0, -2), targets_BT.flatten(), ignore_index=IGNORE_INDEX, reduction="sum"
    )
    count = (targets_BT != IGNORE_INDEX).sum()
    if world.parallel:
        dist.all_reduce(count)
    return loss + ce_weight * ce_sum * world.world_size / count.clamp_min(1)


def stage_loss(stage: int, student, teacher, batch: dict, world: World, *, block_size: int, temperature: float,
               ce_weight: float) -> Tensor:
    """This rank's loss of `stage` on its rows of the batch: braid.distill.losses in one
    process, the sharded versions above under a process group."""
    tokens_BT, doc_ids_BT = batch["input_ids"], batch["doc_ids"]
    input_grad = world.parallel  # fsdp_call on a plain module is a direct call
    try:
        if stage == 1:
            return stage1_loss(
                student, teacher, tokens_BT, doc_ids_BT, block_size, call=fsdp_call, input_grad=input_grad
            )
        if stage == 2:
            return stage2_loss(student, teacher, tokens_BT, doc_ids_BT, call=fsdp_call, input_grad=input_grad)
        if not world.parallel:
            return stage3_loss(student, teacher, tokens_BT, doc_ids_BT, batch["labels"], temperature, ce_weight)
        return sharded_stage3_loss(
            student, teacher, tokens_BT, doc_ids_BT, batch["labels"], temperature, ce_weight, world
        )
    finally:
        end_teacher_step(teacher)  # a no-op for an unsharded teacher


def local_numel(module: nn.Module) -> int:
    """Parameter elements this rank holds (its local shards for DTensors)."""
    return sum((p.to_local() if isinstance(p, DTensor) else p).numel() for p in module.parameters())
