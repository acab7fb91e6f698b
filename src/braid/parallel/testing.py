"""Run a function on N local processes over gloo (CPU) or NCCL (GPU), for parity tests.

    results = run_distributed(fn, world_size=2, args=(...))   # fn(rank, world_size, *args)

`fn` must be importable (a module-level function). Each process initialises the default
process group, runs `fn`, and sends its return value back; an exception in any rank is
re-raised here with that rank's traceback.
"""

from __future__ import annotations

import gc
import os
import socket
import tempfile
import traceback

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank, world_size, backend, port, fn, args, queue) -> None:
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        WORLD_SIZE=str(world_size),
        LOCAL_RANK=str(rank),
        LOCAL_WORLD_SIZE=str(world_size),
    )
    torch.set_num_threads(1)
    try:
        if backend == "nccl":
            torch.cuda.set_device(rank)
        dist.init_process_group(backend, rank=rank, world_size=world_size)
        result = fn(rank, world_size, *args)
        queue.put((rank, "ok", result))
    except BaseException:  # report every failure to the parent, then exit
        queue.put((rank, "error", traceback.format_exc()))
    finally:
        # Collect DTensor/FSDP objects before teardown: avoids an intermittent abort in gloo.
        gc.collect()
        if dist.is_initialized():
            try:
                dist.barrier()
            finally:
                dist.destroy_process_group()


def run_distributed(fn, world_size: int, args: tuple = (), backend: str = "gloo", timeout: float = 600.0) -> list:
    """Run fn(rank, world_size, *args) on `world_size` processes; return the per-rank results."""
    ctx = mp.get_context("spawn")
    queue = ctx.SimpleQueue()
    port = _free_port()
    procs = [
        ctx.Process(target=_worker, args=(rank, world_size, backend, port, fn, args, queue))
        for rank in range(world_size)
    ]
    for p in procs:
        p.start()
    results: list = [None] * world_size
    errors = []
    for _ in range(world_size):
        rank, status, payload = queue.get()
        if status == "ok":
            results[rank] = payload
        else:
            errors.append(f"rank {rank}:\n{payload}")
            break
    for p in procs:
        p.join(timeout=timeout if not errors else 5)
        if p.is_alive():
            p.kill()
    if errors:
        raise RuntimeError("distributed run failed\n" + "\n".join(errors))
    return results


def tmp_store_dir() -> str:
    """A fresh temporary directory for file-based artefacts shared by the ranks of a test."""
    return tempfile.mkdtemp(prefix="braid-dist-")
