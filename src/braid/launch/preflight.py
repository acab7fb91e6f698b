"""Preflight: every rank measures its GEMM TFLOP/s, the all-reduce bus bandwidth and its free
memory before training; rank 0 prints one line per rank, by host, and names the slow ones.

    reports = preflight(torch.device("cuda"))   # every rank; raises PreflightError on failures

On CUDA: bf16 GEMMs, NCCL all-reduce, free memory per GPU. On CPU: float32 GEMMs and gloo
(so it runs in tests). A rank is slow when its GEMM rate or free memory is below
`slow_fraction` of the median over ranks; slow ranks are reported, failed ones stop the run.
"""

from __future__ import annotations

import socket
import statistics
import time
from dataclasses import dataclass

import torch
import torch.distributed as dist


class PreflightError(ValueError):
    """A rank failed a preflight check; the message names its host."""


@dataclass
class RankReport:
    rank: int
    host: str
    device: str
    gemm_tflops: float | None = None
    allreduce_gbps: float | None = None  # bus bandwidth, GB/s (nccl-tests' busbw)
    free_gib: float | None = None
    total_gib: float | None = None
    error: str | None = None

    def line(self) -> str:
        def fmt(value, spec):
            return "n/a" if value is None else format(value, spec)

        memory = "n/a" if self.free_gib is None else f"{self.free_gib:.1f}/{self.total_gib:.1f} GiB free"
        text = (
            f"rank {self.rank:>4} {self.host} {self.device}: GEMM {fmt(self.gemm_tflops, '.2f')} TFLOP/s, "
            f"all-reduce {fmt(self.allreduce_gbps, '.2f')} GB/s, {memory}"
        )
        return text + (f"; FAILED: {self.error}" if self.error else "")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def gemm_tflops(device: torch.device, size: int | None = None, iters: int = 10) -> float:
    """Dense matmul rate: bf16 8192^3 on CUDA, float32 512^3 on CPU (sizes that run in ~1 s)."""
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    size = size or (8192 if device.type == "cuda" else 512)
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    a @ b  # warm-up (kernel selection, allocation)
    _sync(device)
    start = time.perf_counter()
    for _ in range(iters):
        a @ b
    _sync(device)
    return 2 * size**3 * iters / (time.perf_counter() - start) / 1e12


def allreduce_gbps(device: torch.device, megabytes: float | None = None, iters: int = 5) -> float | None:
    """All-reduce bus bandwidth over the default group in GB/s: 2(n-1)/n * bytes / time, the
    figure nccl-tests prints as busbw. 256 MB on CUDA, 4 MB on CPU. None without a group."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return None
    megabytes = megabytes or (256 if device.type == "cuda" else 4)
    n = dist.get_world_size()
    x = torch.ones(int(megabytes * 1e6) // 4, device=device, dtype=torch.float32)
    dist.all_reduce(x)  # warm-up: the communicator is built lazily
    _sync(device)
    dist.barrier()
    start = time.perf_counter()
    for _ in range(iters):
        dist.all_reduce(x)
    _sync(device)
    seconds = (time.perf_counter() - start) / iters
    return 2 * (n - 1) / n * x.numel() * 4 / seconds / 1e9


def free_memory_gib(device: torch.device) -> tuple[float | None, float | None]:
    if device.type != "cuda":
        return None, None
    free, total = torch.cuda.mem_get_info(device)
    return free / 2**30, total / 2**30


def measure(device: torch.device) -> RankReport:
    """This rank's report. A local check that raises is recorded as the rank's error (the run
    stops after every rank has reported); every rank still joins the all-reduce, so one
    failing GPU does not leave the others waiting in a collective it never enters."""
    rank = dist.get_rank() if dist.is_initialized() else 0
    report = RankReport(rank, socket.gethostname(), str(device))
    try:
        report.free_gib, report.total_gib = free_memory_gib(device)
        report.gemm_tflops = gemm_tflops(device)
    except (RuntimeError, torch.cuda.OutOfMemoryError) as error:
        report.error = f"{type(error).__name__}: {error}"
    try:
        report.allreduce_gbps = allreduce_gbps(device)
    except (RuntimeError, torch.cuda.OutOfMemoryError) as error:
        report.error = "; ".join(filter(None, [report.error, f"all-reduce: {type(error).__name__}: {error}"]))
    return report


def slow_ranks(reports: list[RankReport], slow_fraction: float = 0.8) -> list[tuple[RankReport, str]]:
    """(report, why) for each rank whose GEMM rate or free memory is below slow_fraction of
    the median over ranks."""
    slow = []
    for field, unit in (("gemm_tflops", "TFLOP/s"), ("free_gib", "GiB free")):
        values = [getattr(r, field) for r in reports if getattr(r, field) is not None]
        if not values:
            continue
        median = statistics.median(values)
        for r in reports:
            value = getattr(r, field)
            if value is not None and value < slow_fraction * median:
                slow.append((r, f"{value:.2f} {unit} < {slow_fraction:.0%} of the median {median:.2f}"))
    return slow


def summarize(reports: list[RankReport], slow_fraction: float = 0.8) -> str:
    """The report rank 0 prints: a line per rank, then the slow and failed ranks by host."""
    lines = [f"preflight: {len(reports)} ranks on {len({r.host for r in reports})} hosts"]
    lines += ["  " + r.line() for r in reports]
    for r, why in slow_ranks(reports, slow_fraction):
        lines.append(f"preflight: SLOW rank {r.rank} on {r.host}: {why}")
    for r in reports:
        if r.error:
            lines.append(f"preflight: FAILED rank {r.rank} on {r.host}: {r.error}")
    return "\n".join(lines)


def preflight(device: torch.device, slow_fraction: float = 0.8) -> list[RankReport]:
    """Measure on every rank (the default group must exist when the world has several
    ranks), print the summary on rank 0, and return every rank's report on every rank.
    Raises PreflightError, naming the hosts, if any rank failed a check."""
    mine = measure(device)
    if dist.is_initialized() and dist.get_world_size() > 1:
        reports: list = [None] * dist.get_world_size()
        dist.all_gather_object(reports, mine)
    else:
        reports = [mine]
    if mine.rank == 0:
        print(summarize(reports, slow_fraction), flush=True)
    failed = [r for r in reports if r.error]
    if failed:
        hosts = ", ".join(f"rank {r.rank} on {r.host}" for r in failed)
        raise PreflightError(f"preflight failed on {hosts}: drain or exclude those nodes (sbatch --exclude) and relaunch")
    return reports


def preflight_for_training(cfg) -> list[RankReport]:
    """`braid train --preflight`: the trainer's device and process group, then preflight.
    The trainer reuses the group (init_process_group is a no-op once it exists)."""
    from braid.train.distributed import init_process_group, local_device
    from braid.train.trainer import build_device

    device = local_device(build_device(cfg.train))
    init_process_group(device)
    return preflight(device)
