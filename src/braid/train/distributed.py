"""The trainer's side of the parallel layer: process groups from torchrun's environment, the
layout of one run (mesh, data-parallel rank), and the loader re-split for a new dp size.

    layout = build_layout(cfg)        # validates parallel.* against WORLD_SIZE and the model
    layout.dp_rank, layout.dp_size    # which loader shard this rank reads
    layout.pp_group                   # the pipeline ranks (None without pipeline parallelism)
    layout.is_main                    # rank 0: the only one that logs and writes files

With WORLD_SIZE unset or 1 nothing is initialised and `layout.mesh` is None: the trainer
runs the single-device model as before. Tensor- and pipeline-parallel ranks of one
data-parallel group read the same batches.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh

from braid.parallel import ParallelDims
from braid.parallel.pipeline import split_layers
from braid.train.config import DataConfig, TrainConfig


@dataclass
class Layout:
    """Where this process stands in the run's parallel layout."""

    dims: ParallelDims
    mesh: DeviceMesh | None  # None: one process, no parallelism
    rank: int = 0
    dp_rank: int = 0
    dp_size: int = 1
    dp_group: dist.ProcessGroup | None = None
    pp_rank: int = 0
    pp_group: dist.ProcessGroup | None = None  # None: no pipeline parallelism

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def parallel(self) -> bool:
        return self.mesh is not None


def env_world_size() -> int:
    """WORLD_SIZE as set by torchrun (1 when unset); ValueError if it is not a positive int."""
    raw = os.environ.get("WORLD_SIZE", "1")
    if not raw.isdigit() or int(raw) < 1:
        raise ValueError(f"WORLD_SIZE={raw!r} must be a positive integer (torchrun sets it); unset it for one process")
    return int(raw)


def check_layout(cfg: TrainConfig) -> ParallelDims:
    """`cfg.parallel` resolved against WORLD_SIZE and checked against the model (no device work).

    The trainer drives TP, FSDP2 data parallelism (ZeRO-2/3, HSDP), EP, pipeline stages
    (pp > 1) and DeepSpeed ZeRO 1/2/3 (ZeRO-1 only with pp > 1). Text samples during
    training need the whole model on one rank: tp = 1 and pp = 1.
    """
    pcfg = cfg.parallel
    if pcfg.zero_engine == "deepspeed":
        _check_deepspeed(cfg)
    for name, size in (("tp", pcfg.tp), ("pp", pcfg.pp)):
        if size > 1 and cfg.log.sample_every > 0:
            raise ValueError(
                f"log.sample_every={cfg.log.sample_every} with parallel.{name}={size}: text samples need the "
                "whole model and vocabulary on one rank; set log.sample_every=0 and sample with "
                "`braid generate` on a checkpoint"
            )
    dims = ParallelDims(pcfg, env_world_size(), cfg.model)
    if dims.pp > 1:  # the stage split's own checks (tied embeddings, cut points), before any model work
        split_layers(cfg.model, dims.num_stages, pcfg.pp_cut_points, seq_len=cfg.data.seq_len)
    virtual_dp_ranks(cfg.data, 0, dims.dp_replicate * dims.dp_shard)  # data.read_as_dp fits the dp size
    return dims


def _check_deepspeed(cfg: TrainConfig) -> None:
    pcfg = cfg.parallel
    if pcfg.pp > 1 and pcfg.zero_stage != 1:
        raise ValueError(
            f"parallel.zero_engine=deepspeed with parallel.pp={pcfg.pp} and parallel.zero_stage={pcfg.zero_stage}: "
            "DeepSpeed allows ZeRO-1 only with pipeline parallelism (ZeRO-2 reduces and partitions gradients "
            "inside its own backward, ZeRO-3 gathers parameters in its own forward hooks; the pipeline schedule "
            "runs both itself); set parallel.zero_stage=1 (DeepSpeed shards gradients only outside a pipeline), "
            "or parallel.zero_engine=fsdp2 (ZeRO-2/3 with pp), or parallel.pp=1"
        )
    if pcfg.ep > 1:
        raise ValueError(
            f"parallel.zero_engine=deepspeed with parallel.ep={pcfg.ep}: DeepSpeed would average expert shards "
            "over ranks that hold other experts; set parallel.zero_engine=fsdp2 or parallel.ep=1"
        )
    if cfg.train.dtype == "float64":
        raise ValueError(
            "train.dtype=float64 with parallel.zero_engine=deepspeed: DeepSpeed reduces float32 and bfloat16 "
            "gradients only; set train.dtype=float32 (or auto), or parallel.zero_engine=fsdp2"
        )


def init_process_group(device: torch.device) -> None:
    """The default process group from torchrun's env vars: gloo on CPU, nccl on CUDA.
    No-op when WORLD_SIZE is 1 or a group already exists (e.g. a test harness made it)."""
    if env_world_size() == 1 or dist.is_initialized():
        return
    # On CUDA, NCCL for GPU tensors and gloo for the few CPU ones (counts, loader states).
    dist.init_process_group("cuda:nccl,cpu:gloo" if device.type == "cuda" else "gloo")


def local_device(device: torch.device) -> torch.device:
    """On CUDA under torchrun, this process's card (LOCAL_RANK); otherwise `device`."""
    if device.type != "cuda" or env_world_size() == 1:
        return device
    index = int(os.environ.get("LOCAL_RANK", "0"))
    torch.cuda.set_device(index)
    return torch.device("cuda", index)


def build_layout(dims: ParallelDims, device: torch.device) -> Layout:
    """The mesh and data-parallel coordinates of this process (every rank must call it)."""
    if dims.world_size == 1:
        return Layout(dims, None)
    init_process_group(device)
    mesh = dims.build_mesh(device.type)
    dp_mesh, pp_mesh = dims.get_mesh("dp"), dims.get_mesh("pp")
    return Layout(
        dims, mesh, rank=dist.get_rank(), dp_rank=dp_mesh.get_local_rank(), dp_size=dp_mesh.size(),
        dp_group=dp_mesh.get_group(), pp_rank=pp_mesh.get_local_rank(),
        pp_group=pp_mesh.get_group() if dims.pp > 1 else None,
    )


def barrier(layout: Layout) -> None:
    if layout.parallel:
        dist.barrier()


def gather_loader_states(layout: Layout, state: dict[str, Any]) -> list[dict[str, Any]]:
    """Every data-parallel rank's loader state, in dp-rank order, on every rank."""
    if layout.dp_size == 1:
        return [state]
    states: list[Any] = [None] * layout.dp_size
    dist.all_gather_object(states, state, group=layout.dp_group)
    return states


def resplit_loader_state(states: list[dict[str, Any]], dp_rank: int, dp_size: int) -> dict[str, Any]:
    """The loader state for `dp_rank` of `dp_size` from the states saved by every old dp rank.

    Same dp size: the rank's own state (exact resume). A new dp size cannot continue the old
    per-rank epoch orders (each split the documents for its own world size), so every new
    rank starts the epoch after the furthest one any old rank reached, at its start, with
    the tokens taken summed (mixture proportions continue). Deterministic: the resumed run
    reads the same batches whenever it is resumed at the same dp size; documents left
    unread in the old ranks' current epoch are skipped, none is read twice in an epoch.
    """
    if len(states) == dp_size:
        return states[dp_rank]
    state = dict(states[0], rank=dp_rank, world_size=dp_size, tail=[])
    state["sources"] = [
        dict(
            per_rank[0],
            epoch=max(s["epoch"] for s in per_rank) + 1,
            position=0,
            tokens_taken=sum(s["tokens_taken"] for s in per_rank),
        )
        for per_rank in zip(*(s["sources"] for s in states))
    ]
    return state


def virtual_dp_ranks(data: DataConfig, dp_rank: int, dp_size: int) -> list[int]:
    """The data-parallel shards (of data.read_as_dp, or of dp_size) that dp rank `dp_rank` reads."""
    return read_as_shards(data.read_as_dp, data.batch_size, dp_rank, dp_size)


def read_as_shards(
    read_as: int, batch_size: int, rank: int, size: int, flags: tuple[str, str] = ("data.read_as_dp=", "data.batch_size=")
) -> list[int]:
    """The shards (of read_as data-parallel ranks, or of size) that rank `rank` of `size`
    reads, batch_size // len(shards) rows each: read_as = m lets fewer processes read exactly
    the batches of an m-rank run. flags: how the two settings are named in errors."""
    if read_as == 1:
        return [rank]
    per_rank, rest = divmod(read_as, size)
    if read_as < 1 or rest or per_rank == 0 or batch_size % per_rank:
        raise ValueError(
            f"{flags[0]}{read_as} must be a multiple of the data-parallel size {size}, and "
            f"{flags[1]}{batch_size} a multiple of read_as_dp / dp = {max(per_rank, 1)}; "
            f"change {flags[0].rstrip('= ')} (1: read as this run's own ranks)"
        )
    return list(range(rank * per_rank, (rank + 1) * per_rank))
