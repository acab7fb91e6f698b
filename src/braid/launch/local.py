"""`braid launch local`: torchrun (standalone, one node) running `braid train` with sane env.

    cmd, env = local_command("tiny-hybrid", ["parallel.tp=2"], nproc=2)
    os.execvpe(cmd[0], cmd, env)

torchrun forwards SIGTERM and SIGUSR1 to the workers (`--signals-to-handle`), so signalling
the launcher checkpoints the run; rerunning the same command resumes it.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping

# torchrun's default set plus SIGUSR1, the trainer's checkpoint-and-exit signal.
SIGNALS_TO_HANDLE = "SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1"
SHUTDOWN_TIMEOUT_S = 600  # how long torchrun lets signalled workers checkpoint before SIGKILL


def train_args(config: str, overrides: list[str], preflight: bool = False) -> list[str]:
    """`braid train`'s arguments as the workers run them (`-m braid.cli train ...`)."""
    return ["-m", "braid.cli", "train", config, *overrides] + (["--preflight"] if preflight else [])


def default_nproc() -> int:
    """The visible GPUs, or 1 on a machine without CUDA."""
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 1


def launch_env(nproc: int, env: Mapping[str, str] | None = None) -> dict[str, str]:
    """The environment for the workers: the caller's, plus defaults it does not set.

    OMP_NUM_THREADS splits the cores between the workers (torchrun would set 1 with a
    warning); PYTHONUNBUFFERED keeps the ranks' logs in order with the progress bar.
    """
    env = dict(os.environ if env is None else env)
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    env.setdefault("OMP_NUM_THREADS", str(max(1, cores // nproc)))
    env.setdefault("PYTHONUNBUFFERED", "1")
    env.setdefault("TORCH_NCCL_ASYNC_ERROR_HANDLING", "1")
    return env


def local_command(
    config: str, overrides: list[str], nproc: int, *, preflight: bool = False, env: Mapping[str, str] | None = None
) -> tuple[list[str], dict[str, str]]:
    """The torchrun command line and environment of a one-node launch of `nproc` workers."""
    if nproc < 1:
        raise ValueError(f"--nproc {nproc}: give at least 1 process")
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
        f"--signals-to-handle={SIGNALS_TO_HANDLE}", f"--shutdown-timeout={SHUTDOWN_TIMEOUT_S}",
        *train_args(config, overrides, preflight),
    ]
    return cmd, launch_env(nproc, env)
