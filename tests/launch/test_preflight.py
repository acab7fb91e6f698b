"""Preflight on CPU/gloo: every rank's GEMM rate, all-reduce bandwidth; slow and failing ranks
named by host."""

from __future__ import annotations

import pytest
import torch

from braid.launch import preflight as pf
from braid.launch.preflight import PreflightError, RankReport, preflight, slow_ranks, summarize
from braid.parallel.testing import run_distributed


def _preflight_worker(rank, world_size):
    healthy = [(r.rank, r.host, r.gemm_tflops, r.allreduce_gbps, r.free_gib, r.error)
               for r in preflight(torch.device("cpu"))]
    if rank == 1:
        def broken(device, size=None, iters=10):
            raise RuntimeError("CUBLAS_STATUS_EXECUTION_FAILED (simulated)")

        pf.gemm_tflops = broken
    try:
        preflight(torch.device("cpu"))
    except PreflightError as error:
        return healthy, str(error)
    return healthy, None


@pytest.mark.distributed
def test_preflight_over_gloo_measures_every_rank_and_a_failing_rank_stops_all_by_host():
    import socket

    results = run_distributed(_preflight_worker, 2)
    (healthy, failure), (healthy_1, failure_1) = results
    assert healthy == healthy_1, "every rank gets every rank's report"
    assert [row[0] for row in healthy] == [0, 1]
    for _, host, gemm, allreduce, free, error in healthy:
        assert host and gemm > 0 and allreduce > 0 and free is None and error is None
    host = socket.gethostname()
    for message in (failure, failure_1):
        assert message is not None, "every rank raises PreflightError"
        assert f"rank 1 on {host}" in message and "rank 0" not in message


def test_summary_names_slow_and_failed_ranks_by_host():
    reports = [
        RankReport(0, "node01", "cuda:0", gemm_tflops=700.0, allreduce_gbps=350.0, free_gib=78.0, total_gib=79.6),
        RankReport(1, "node01", "cuda:1", gemm_tflops=690.0, allreduce_gbps=350.0, free_gib=78.0, total_gib=79.6),
        RankReport(2, "node02", "cuda:0", gemm_tflops=410.0, allreduce_gbps=350.0, free_gib=78.0, total_gib=79.6),
        RankReport(3, "node02", "cuda:1", gemm_tflops=700.0, allreduce_gbps=350.0, free_gib=30.0, total_gib=79.6),
        RankReport(4, "node03", "cuda:0", error="RuntimeError: CUDA error: ECC"),
    ]
    slow = {(r.rank, why.split()[1]) for r, why in slow_ranks(reports)}
    assert slow == {(2, "TFLOP/s"), (3, "GiB")}
    text = summarize(reports)
    assert "preflight: 5 ranks on 3 hosts" in text
    assert "SLOW rank 2 on node02: 410.00 TFLOP/s < 80% of the median 695.00" in text
    assert "SLOW rank 3 on node02: 30.00 GiB free" in text
    assert "FAILED rank 4 on node03: RuntimeError: CUDA error: ECC" in text
    assert "node01" not in "\n".join(line for line in text.splitlines() if "SLOW" in line or "FAILED" in line)


def test_single_process_preflight_reports_gemm_and_no_allreduce(capsys):
    (report,) = preflight(torch.device("cpu"))
    assert report.gemm_tflops > 0 and report.allreduce_gbps is None and report.error is None
    assert "all-reduce n/a GB/s" in capsys.readouterr().out


@pytest.mark.gpu
def test_preflight_on_cuda_reports_bf16_gemm_and_free_memory():
    (report,) = preflight(torch.device("cuda", 0))
    assert report.error is None and report.gemm_tflops > 50  # an H100 runs bf16 8192^3 at several hundred
    assert 0 < report.free_gib <= report.total_gib


def _nccl_worker(rank, world_size):
    (report, *_) = preflight(torch.device("cuda", rank))
    return report.allreduce_gbps


@pytest.mark.gpu
@pytest.mark.distributed
def test_preflight_over_nccl_on_every_visible_gpu():
    world = torch.cuda.device_count()
    if world < 2:
        pytest.skip("needs 2 GPUs")
    bandwidths = run_distributed(_nccl_worker, world, backend="nccl")
    assert all(b is not None and b > 1 for b in bandwidths)
