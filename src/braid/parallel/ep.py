"""Expert parallelism (EP) for braid's dropless MoE, and MoE aux losses over the global batch.

    apply_ep(model_part, ep_mesh, batch_group=dp_group)   # after TP, before AC / ZeRO
    apply_ep(model_part, ep_mesh, batch_group=dp_x_tp_group, seq_mesh=tp_mesh)   # with TP
    apply_global_aux_losses(model_part, dp_group)         # data parallel without EP
    update_moe_bias(model_part, dp_group)                 # bias balancing, after each step

Expert weights w1, w3, w2 become DTensors sharded on dim 0 (experts) over the ep mesh: each
rank keeps E/ep experts. Being DTensors, they keep their global shape in the state dict (DCP
checkpoints reshard across layouts), their norms are global (a DTensor norm reduces over its
mesh), and FSDP2 can shard them further over the data-parallel ranks outside the ep group as
it does TP DTensors (mesh from the same root; braid.parallel.parallelize does this over
"dp_shard_mod_ep"). The router, the shared expert and the balancing buffers
stay replicated. Each MoE module's class is swapped for a subclass (as FSDP2 does) that
overrides two seams of braid.model.moe.MoE:

- `run_experts`: the rows, already sorted by expert, go to the rank owning their expert by
  an all-to-all (counts first, then rows: dropless, splits vary per step), run through the
  local experts, and come back by the reverse all-to-all; the base class unsorts them,
  weights them by their gates and sums over the k.
- `batch_sum`: the aux losses are built from per-token sums (expert counts, router
  probabilities, squared logsumexps, token count). An autograd all-reduce over the batch
  group adds them, so every rank computes the load-balance loss (f_e, P_e) and z-loss of the
  GLOBAL batch, the values of one process on the whole batch. Its backward adds the ranks'
  gradients, which data-parallel averaging turns back into the single-process gradient.

Gradient convention: every rank's loss is the mean over its own tokens and data parallelism
averages gradients, so the objective is the mean of the ranks' losses. A local expert's
gradient collects the tokens of all ep ranks, i.e. the SUM of the ep ranks' gradients; the
backward scales it by 1/ep so that it is their mean like every other parameter's. Averaging
over the remaining data-parallel ranks (outside the ep group) then completes the global mean,
so those ranks must average expert gradients as usual and ep ranks must not reduce them
with each other. EP ranks must hold different tokens (data, context or sequence parallel).

With tensor parallelism (ep > 1, tp > 1; torchtitan's design) the ep group spans the TP
group and ep/tp data-parallel shard ranks (braid.parallel.dims). Under sequence parallelism
each TP rank holds T/tp different tokens of the same rows at the MoE input, so the MoE runs
on those tokens (braid.parallel.tp.moe_local_plan: no gather, experts not split by hidden
units) and dispatches them over the ep group like any other tokens. The TP ranks share one
loss, whose gradient is the SUM of their token shares, so a local expert's gradient is
scaled by 1/(ep/tp), the number of data-parallel ranks in the ep group, not 1/ep; likewise
the router and shared expert, replicated over the ep group, have their gradients summed over
it and divided by ep/tp (braid.parallel.styles.BatchReplicated, applied by parallelize),
and the aux losses' gradients are divided by tp (SequenceLocal), as under plain TP. The aux
statistics are summed over data x TP ranks (`batch_group`), so the aux losses stay those of
the global batch.

tokens_per_expert keeps counting local tokens; update_moe_bias sums it over the data-parallel
group (and, under TP, over the TP group: `seq_group`) before moving the biases, so every rank
moves its replicated bias identically.

Legend: E experts, R ep ranks, L local experts (E/R), S routed rows sent by this rank,
Q rows received by this rank, D d_model, X packed statistics (2E + 2).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Shard

from braid.kernels.moe import grouped_swiglu
from braid.model.moe import MoE, inverse_permutation, sort_by_expert
from braid.parallel.styles import ScaleGrad

__all__ = [
    "BatchStatsMoE",
    "ExpertParallelMoE",
    "apply_ep",
    "apply_global_aux_losses",
    "sync_moe_load",
    "update_moe_bias",
]

EXPERT_WEIGHTS = ("w1", "w3", "w2")


class _AllReduceSum(torch.autograd.Function):
    """Sum over the group; backward sums the gradients (every rank's loss used the total)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
        ctx.group = group
        total = x.clone(memory_format=torch.contiguous_format)
        dist.all_reduce(total, group=group)
        return total

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return _AllReduceSum.apply(grad, ctx.group), None


class _AllToAll(torch.autograd.Function):
    """Variable-size all-to-all of rows; backward sends the gradients back the same way."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, out_splits: list[int], in_splits: list[int], group) -> torch.Tensor:
        ctx.splits, ctx.group = (in_splits, out_splits), group
        out = x.new_empty((sum(out_splits), *x.shape[1:]))
        dist.all_to_all_single(out, x.contiguous(), out_splits, in_splits, group=group)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        back_out_splits, back_in_splits = ctx.splits
        return _AllToAll.apply(grad, back_out_splits, back_in_splits, ctx.group), None, None, None


class BatchStatsMoE(MoE):
    """An MoE whose aux losses are those of the whole batch split over `batch_group`."""

    batch_group: dist.ProcessGroup

    def batch_sum(self, sums_X: torch.Tensor) -> torch.Tensor:
        return _AllReduceSum.apply(sums_X, self.batch_group)


class ExpertParallelMoE(BatchStatsMoE):
    """An MoE whose experts are sharded over `ep_group`, dispatched by all-to-all.

    expert_grad_scale: 1 / (data-parallel ranks in the ep group), see the module docstring.
    seq_group: the TP group whose ranks hold other tokens of the same rows, or None.
    """

    ep_group: dist.ProcessGroup
    expert_grad_scale: float
    seq_group: dist.ProcessGroup | None = None

    def run_experts(self, x_sorted_SD: torch.Tensor, counts_E: torch.Tensor) -> torch.Tensor:
        """x_sorted_SD: (S, D) rows sorted by global expert, counts_E: (E,) -> (S, D) outputs."""
        num_ranks = dist.get_world_size(self.ep_group)
        num_local = self.cfg.num_experts // num_ranks
        recv_counts_RL = torch.empty_like(counts_E)
        dist.all_to_all_single(recv_counts_RL, counts_E.contiguous(), group=self.ep_group)
        recv_counts_RL = recv_counts_RL.view(num_ranks, num_local)
        send_splits = counts_E.view(num_ranks, num_local).sum(dim=1).tolist()
        recv_splits = recv_counts_RL.sum(dim=1).tolist()
        x_recv_QD = _AllToAll.apply(x_sorted_SD, recv_splits, send_splits, self.ep_group)
        # Rows arrive grouped by source rank, then by local expert: regroup them by expert.
        local_expert_Q = torch.repeat_interleave(
            torch.arange(num_local, device=counts_E.device).repeat(num_ranks), recv_counts_RL.flatten()
        )
        order_Q = sort_by_expert(local_expert_Q, num_local)
        weights = [ScaleGrad.apply(_local(getattr(self, name)), self.expert_grad_scale) for name in EXPERT_WEIGHTS]
        y_grouped_QD = grouped_swiglu(x_recv_QD[order_Q], recv_counts_RL.sum(dim=0), *weights)
        y_recv_QD = y_grouped_QD[inverse_permutation(order_Q)]
        return _AllToAll.apply(y_recv_QD, send_splits, recv_splits, self.ep_group)


def apply_ep(
    model_part: nn.Module,
    ep_mesh: DeviceMesh,
    batch_group: dist.ProcessGroup | DeviceMesh | None = None,
    seq_mesh: DeviceMesh | None = None,
) -> nn.Module:
    """Shard every MoE's experts over the 1-D `ep_mesh` and dispatch tokens by all-to-all.

    batch_group: all ranks holding different tokens of the global batch at the MoE input
    (the data-parallel ranks, with context/sequence-parallel ones); the aux losses are
    reduced over it. Default: the ep group. seq_mesh: with tensor parallelism, the 1-D TP
    mesh, contained in the ep mesh, whose ranks hold other tokens of the same rows and
    share one loss (the MoEs must already run on local tokens: apply_tp with
    expert_parallel=True). Expects plain (non-DTensor) expert weights with the same values
    on every rank, e.g. the full model built from one seed. An ep mesh of size 1 leaves the
    experts unsharded. Returns model_part, changed in place.
    """
    if ep_mesh.ndim != 1:
        raise ValueError(f"apply_ep needs a 1-D ep mesh, got {ep_mesh.ndim} dims {ep_mesh.mesh_dim_names}")
    num_ranks = ep_mesh.size()
    ep_group = ep_mesh.get_group()
    seq_size = 1 if seq_mesh is None else seq_mesh.size()
    if num_ranks % seq_size:
        raise ValueError(
            f"apply_ep: the ep mesh ({num_ranks} ranks) must contain the sequence-parallel mesh "
            f"({seq_size} ranks); make ep a multiple of tp"
        )
    for name, moe in _moe_modules(model_part):
        _check_shardable(name, moe, num_ranks)
    for _, moe in _moe_modules(model_part):
        group = _as_group(batch_group) if batch_group is not None else getattr(moe, "batch_group", ep_group)
        if num_ranks == 1:
            _set_batch_group(moe, group)
            continue
        rank = ep_mesh.get_local_rank()
        for weight_name in EXPERT_WEIGHTS:
            _shard_experts(moe, weight_name, ep_mesh, rank)
        moe.__class__ = ExpertParallelMoE
        moe.ep_group = ep_group
        moe.batch_group = group
        moe.expert_grad_scale = seq_size / num_ranks
        moe.seq_group = seq_mesh.get_group() if seq_size > 1 else None
    return model_part


def apply_global_aux_losses(model_part: nn.Module, batch_group: dist.ProcessGroup | DeviceMesh) -> nn.Module:
    """Make every MoE's aux losses those of the global batch split over `batch_group`.

    For data parallelism without EP (apply_ep does this itself). Returns model_part.
    """
    group = _as_group(batch_group)
    for _, moe in _moe_modules(model_part):
        _set_batch_group(moe, group)
    return model_part


@torch.no_grad()
def sync_moe_load(model_part: nn.Module, group: dist.ProcessGroup | DeviceMesh | None) -> None:
    """Sum every MoE's tokens_per_expert over the data-parallel `group` (one all-reduce).

    The counts must be rank-local (accumulated since the last reset): syncing twice without
    a reset double counts. MoEs that run on sequence-parallel tokens (EP with TP) are summed
    over their TP group too. See update_moe_bias.
    """
    _sum_counts([moe for _, moe in _moe_modules(model_part)], group)


@torch.no_grad()
def update_moe_bias(model_part: nn.Module, group: dist.ProcessGroup | DeviceMesh | None) -> None:
    """Aux-loss-free balancing under data parallelism, the trainer's call after each step.

    Sums the counts of the MoEs that balance (cfg.bias_balancing) over `group`, so each rank
    sees the global batch's load, then moves their replicated biases identically and resets
    the counts (MoE.update_bias). Equals model.update_moe_bias() of one process.
    """
    moes = [moe for _, moe in _moe_modules(model_part) if moe.cfg.bias_balancing]
    _sum_counts(moes, group)
    for moe in moes:
        moe.update_bias()


def _sum_counts(moes: list[MoE], group: dist.ProcessGroup | DeviceMesh | None) -> None:
    seq_groups = {id(g): g for moe in moes if (g := getattr(moe, "seq_group", None)) is not None}
    for seq_group in seq_groups.values():
        _all_reduce_counts([moe for moe in moes if getattr(moe, "seq_group", None) is seq_group], seq_group)
    if group is not None:
        _all_reduce_counts(moes, _as_group(group))


def _all_reduce_counts(moes: list[MoE], group: dist.ProcessGroup) -> None:
    if not moes or dist.get_world_size(group) == 1:
        return
    packed_counts = torch.cat([moe.tokens_per_expert for moe in moes])
    dist.all_reduce(packed_counts, group=group)
    for moe, counts_E in zip(moes, packed_counts.split([m.tokens_per_expert.numel() for m in moes])):
        moe.tokens_per_expert.copy_(counts_E)


def _moe_modules(model_part: nn.Module) -> list[tuple[str, MoE]]:
    return [(name, module) for name, module in model_part.named_modules() if isinstance(module, MoE)]


def _check_shardable(name: str, moe: MoE, num_ranks: int) -> None:
    if moe.cfg.num_experts % num_ranks != 0:
        raise ValueError(
            f"{name}: moe.num_experts={moe.cfg.num_experts} is not divisible by the ep size {num_ranks}; "
            "choose an ep size that divides the number of experts"
        )
    if any(isinstance(getattr(moe, w), DTensor) for w in EXPERT_WEIGHTS):
        raise ValueError(
            f"{name}: expert weights are already DTensors (EP applied twice, or a TP plan shards "
            "w1/w3/w2); apply_ep needs plain expert weights: leave the experts out of the MoE TP plan"
        )


def _shard_experts(moe: MoE, weight_name: str, ep_mesh: DeviceMesh, rank: int) -> None:
    full = getattr(moe, weight_name)
    num_local = full.shape[0] // ep_mesh.size()
    local = full.detach()[rank * num_local : (rank + 1) * num_local].clone()
    sharded = DTensor.from_local(local, ep_mesh, [Shard(0)], run_check=False, shape=full.shape, stride=full.stride())
    setattr(moe, weight_name, nn.Parameter(sharded, requires_grad=full.requires_grad))


def _set_batch_group(moe: MoE, group: dist.ProcessGroup) -> None:
    if type(moe) is MoE:
        moe.__class__ = BatchStatsMoE
    moe.batch_group = group


def _local(weight: torch.Tensor) -> torch.Tensor:
    return weight.to_local() if isinstance(weight, DTensor) else weight


def _as_group(group: dist.ProcessGroup | DeviceMesh) -> dist.ProcessGroup:
    if isinstance(group, DeviceMesh):
        if group.ndim != 1:
            raise ValueError(
                f"expected a 1-D mesh for a process group, got dims {group.mesh_dim_names}; flatten it first"
            )
        return group.get_group()
    return group
