"""Where a process stands in a launch: rank, local rank and world size from torchrun or SLURM.

    env = DistEnv.from_environ()            # torchrun's RANK/LOCAL_RANK/WORLD_SIZE, else SLURM_*
    export_torch_env()                      # `srun python -m braid.cli train ...`: SLURM -> torch vars
    torchrun_args_from_slurm(os.environ, nproc_per_node=8)   # one torchrun agent per node

torchrun's variables win when both are set (inside our sbatch script SLURM describes the
one torchrun task per node, torchrun the workers). With neither, the process is alone.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass

DEFAULT_PORT = 29500
TORCHRUN_VARS = ("RANK", "LOCAL_RANK", "WORLD_SIZE")


def _int(env: Mapping[str, str], name: str, default: int | None = None) -> int:
    raw = env.get(name)
    if raw is None:
        if default is None:
            raise ValueError(f"{name} is not set; launch with torchrun or srun, or unset the other rank variables")
        return default
    match = re.match(r"\d+", raw.strip())  # SLURM_TASKS_PER_NODE may read "4(x2)"
    if match is None:
        raise ValueError(f"{name}={raw!r} is not a non-negative integer")
    return int(match.group())


@dataclass(frozen=True)
class DistEnv:
    """One process's coordinates in a launch; `source` is "torchrun", "slurm" or "single"."""

    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    local_world_size: int = 1
    node_rank: int = 0
    num_nodes: int = 1
    source: str = "single"

    def __post_init__(self) -> None:
        if not 0 <= self.rank < self.world_size:
            raise ValueError(f"rank {self.rank} is outside world size {self.world_size} ({self.source} variables)")
        if not 0 <= self.local_rank < self.local_world_size:
            raise ValueError(
                f"local rank {self.local_rank} is outside local world size {self.local_world_size} "
                f"({self.source} variables)"
            )

    @classmethod
    def from_environ(cls, env: Mapping[str, str] | None = None) -> DistEnv:
        env = os.environ if env is None else env
        if all(name in env for name in TORCHRUN_VARS):
            world = _int(env, "WORLD_SIZE")
            local_world = _int(env, "LOCAL_WORLD_SIZE", world)
            return cls(
                rank=_int(env, "RANK"), local_rank=_int(env, "LOCAL_RANK"), world_size=world,
                local_world_size=local_world, node_rank=_int(env, "GROUP_RANK", 0),
                num_nodes=max(1, world // local_world), source="torchrun",
            )
        # The step's variables, which only srun sets: a batch script itself is no rank of a step.
        if "SLURM_PROCID" in env and "SLURM_STEP_NUM_TASKS" in env:
            return cls(
                rank=_int(env, "SLURM_PROCID"), local_rank=_int(env, "SLURM_LOCALID", 0),
                world_size=_int(env, "SLURM_STEP_NUM_TASKS"), local_world_size=_int(env, "SLURM_STEP_TASKS_PER_NODE", 1),
                node_rank=_int(env, "SLURM_NODEID", 0), num_nodes=_int(env, "SLURM_STEP_NUM_NODES", 1), source="slurm",
            )
        return cls()


def expand_nodelist(nodelist: str) -> list[str]:
    """Host names of a SLURM node list, as `scontrol show hostnames` prints them.

    "gpu[01-03,07],login2" -> ["gpu01", "gpu02", "gpu03", "gpu07", "login2"] (zero padding kept).
    """
    hosts: list[str] = []
    for match in re.finditer(r"([^,\[]+)(?:\[([^\]]+)\])?([^,\[]*)", nodelist):
        prefix, ranges, suffix = match.groups()
        if ranges is None:
            hosts.append(prefix + suffix)
            continue
        for part in ranges.split(","):
            lo, _, hi = part.partition("-")
            if not lo.isdigit() or (hi and not hi.isdigit()):
                raise ValueError(f"node list {nodelist!r}: range {part!r} is not N or N-M")
            for i in range(int(lo), int(hi or lo) + 1):
                hosts.append(f"{prefix}{i:0{len(lo)}d}{suffix}")
    if not hosts:
        raise ValueError(f"node list {nodelist!r} names no host")
    return hosts


def slurm_port(env: Mapping[str, str]) -> int:
    """A rendezvous port for this job: MASTER_PORT if set, else derived from the job id so that
    two jobs sharing a head node do not collide."""
    if "MASTER_PORT" in env:
        return _int(env, "MASTER_PORT")
    return 20000 + _int(env, "SLURM_JOB_ID", 0) % 20000


def torchrun_args_from_slurm(env: Mapping[str, str], nproc_per_node: int) -> list[str]:
    """torchrun's arguments for one agent per node of the SLURM job described by `env`:
    c10d rendezvous on the job's first host (never the login node that submitted it)."""
    if "SLURM_JOB_NODELIST" not in env:
        raise ValueError("SLURM_JOB_NODELIST is not set: run inside a SLURM allocation (sbatch or salloc)")
    head = expand_nodelist(env["SLURM_JOB_NODELIST"])[0]
    return [
        f"--nnodes={_int(env, 'SLURM_NNODES')}",
        f"--nproc-per-node={nproc_per_node}",
        f"--rdzv-id={env.get('SLURM_JOB_ID', 'braid')}",
        "--rdzv-backend=c10d",
        f"--rdzv-endpoint={head}:{slurm_port(env)}",
    ]


def export_torch_env(env: dict[str, str] | None = None) -> DistEnv:
    """Under `srun` without torchrun (one task per GPU), set the variables torch.distributed
    reads (RANK, LOCAL_RANK, WORLD_SIZE, LOCAL_WORLD_SIZE, MASTER_ADDR, MASTER_PORT) from
    SLURM's. Leaves torchrun's untouched; returns where this process stands."""
    env = os.environ if env is None else env
    dist_env = DistEnv.from_environ(env)
    if dist_env.source != "slurm" or dist_env.world_size == 1:
        return dist_env
    env.update(
        RANK=str(dist_env.rank), LOCAL_RANK=str(dist_env.local_rank), WORLD_SIZE=str(dist_env.world_size),
        LOCAL_WORLD_SIZE=str(dist_env.local_world_size), GROUP_RANK=str(dist_env.node_rank),
    )
    env.setdefault("MASTER_ADDR", expand_nodelist(env["SLURM_JOB_NODELIST"])[0])
    env.setdefault("MASTER_PORT", str(slurm_port(env)))
    return dist_env
