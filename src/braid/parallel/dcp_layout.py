"""Checkpoint layout of interleaved TP shards (MatFormer's nested bands).

Under tensor parallelism each rank holds its share of every MatFormer nesting band
(braid.parallel.tp): its rows of w1/w3 (columns of w2) are not one contiguous block, so the
DTensor placement is _StridedShard(dim, split_factor=sub-bands). DCP describes a rank's
shard as ONE chunk, so it cannot save such a tensor ("overlapping chunks"), and torch 2.11
cannot gather one to a full tensor. Before saving, these DTensors are moved to contiguous
shards of the same global tensor, split on another dim; after loading, back:

    model_sd, optim_sd = get_state_dict(model, optimizer)
    dcp.save(to_checkpoint_layout({"model": model_sd, "optim": optim_sd}), checkpoint_id=path)

    template = {"model": model_sd, "optim": optim_sd}
    state = to_checkpoint_layout(template)
    dcp.load(state, checkpoint_id=path)
    state = from_checkpoint_layout(state, template)   # then set_state_dict(...)

The global tensors never change, so a checkpoint written at one layout loads at another
(and in one process). Other values pass through untouched. The moves are all-gathers over
the TP group, done by hand (torch 2.11 cannot redistribute a lone _StridedShard).
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor, Shard
from torch.distributed.tensor.placement_types import Placement, _StridedShard

__all__ = ["from_checkpoint_layout", "to_checkpoint_layout"]


def to_checkpoint_layout(state):
    """A copy of a nested state dict whose interleaved DTensors are contiguous shards."""
    if isinstance(state, dict):
        return {key: to_checkpoint_layout(value) for key, value in state.items()}
    if isinstance(state, DTensor) and _interleaved_axis(state) is not None:
        return _to_contiguous(state)
    return state


def from_checkpoint_layout(state, template):
    """`state` (loaded in the checkpoint layout) with each DTensor moved back to the
    placements of the matching value in `template` (the live state dict)."""
    if isinstance(state, dict):
        return {key: from_checkpoint_layout(value, template[key]) for key, value in state.items()}
    if isinstance(template, DTensor) and _interleaved_axis(template) is not None:
        return _to_interleaved(state, template)
    return state


def _interleaved_axis(t: DTensor) -> int | None:
    """The mesh axis of a _StridedShard that interleaves a dim on its own (not FSDP's
    right-to-left composition with later shards of the same dim, which DCP handles)."""
    placements = t.placements
    for axis, placement in enumerate(placements):
        if not isinstance(placement, _StridedShard):
            continue
        later = [t.device_mesh.size(a) for a in range(axis + 1, len(placements)) if _shards(placements[a], placement.dim)]
        if placement.split_factor != math.prod(later):
            return axis
    return None


def _shards(placement: Placement, dim: int) -> bool:
    return isinstance(placement, Shard) and placement.dim == dim


def _other_dim(t: DTensor, dim: int) -> int:
    return 1 if dim % t.ndim == 0 else 0


def _gather(local: torch.Tensor, t: DTensor, axis: int) -> list[torch.Tensor]:
    group = t.device_mesh.get_group(axis)
    pieces = [torch.empty_like(local) for _ in range(dist.get_world_size(group))]
    dist.all_gather(pieces, local.contiguous(), group=group)
    return pieces


def _to_contiguous(t: DTensor) -> DTensor:
    axis = _interleaved_axis(t)
    strided = t.placements[axis]
    dim, bands = strided.dim % t.ndim, strided.split_factor
    other = _other_dim(t, dim)
    # This rank's rows hold its part of every band; the ranks' parts, band by band, are the rows in order.
    pieces = [piece.chunk(bands, dim=dim) for piece in _gather(t.to_local(), t, axis)]
    rows = torch.cat([part[band] for band in range(bands) for part in pieces], dim=dim)
    num_ranks, rank = t.device_mesh.size(axis), t.device_mesh.get_local_rank(axis)
    if rows.shape[other] % num_ranks:
        raise ValueError(
            f"to_checkpoint_layout: dim {other} ({rows.shape[other]} per rank) does not split over the "
            f"{num_ranks} TP ranks; use a tp that divides d_model"
        )
    placements = list(t.placements)
    placements[axis] = Shard(other)
    local = rows.chunk(num_ranks, dim=other)[rank]
    return DTensor.from_local(local, t.device_mesh, placements, run_check=False, shape=t.shape, stride=t.stride())


def _to_interleaved(state: DTensor, template: DTensor) -> DTensor:
    axis = _interleaved_axis(template)
    strided = template.placements[axis]
    dim, bands = strided.dim % template.ndim, strided.split_factor
    other = _other_dim(template, dim)
    assert state.placements[axis] == Shard(other), (state.placements, template.placements)
    rows = torch.cat(_gather(state.to_local(), state, axis), dim=other)
    rank = template.device_mesh.get_local_rank(axis)
    num_ranks = template.device_mesh.size(axis)
    own = [band.chunk(num_ranks, dim=dim)[rank] for band in rows.chunk(bands, dim=dim)]
    local = torch.cat(own, dim=dim)
    return DTensor.from_local(
        local, template.device_mesh, template.placements, run_check=False, shape=template.shape, stride=template.stride()
    )
