"""Launches that train: `braid launch local` under torchrun; the rendered sbatch script run
with stand-ins for srun and scontrol (tests/launch/fake_slurm) as two torchrun agents with
c10d rendezvous on localhost, equal to one 4-process agent; SIGUSR1 to the batch shell ->
checkpoint -> requeue -> the relaunch continues the same loss trajectory.

Parity in float64 within rtol 1e-9, atol 1e-12 (the standard of tests/train/test_parallel_train.py).
"""

from __future__ import annotations

import json
import os
import random
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from braid.cli import main
from braid.launch.slurm import SlurmJob, prepare_run
from braid.train.config import save_config

from .conftest import tiny_config, train_losses

TOL64 = dict(rtol=1e-9, atol=1e-12)
FAKE_SLURM = Path(__file__).parent / "fake_slurm"
REPO_SRC = Path(__file__).resolve().parents[2] / "src"


def _free_job_id() -> int:
    """A job id whose rendezvous port (20000 + id % 20000, as the script derives it) is free."""
    for _ in range(100):
        job_id = random.randrange(1, 20000)
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", 20000 + job_id))
            except OSError:
                continue
        return job_id
    raise RuntimeError("no free port in 20000-39999")


def _env(**extra: str) -> dict[str, str]:
    env = dict(os.environ, PYTHONPATH=str(REPO_SRC), OMP_NUM_THREADS="1", **extra)
    env.pop("WORLD_SIZE", None)
    return env


def _braid(*args: str, timeout: float = 240) -> subprocess.CompletedProcess:
    result = subprocess.run([sys.executable, "-m", "braid.cli", *args], env=_env(), capture_output=True,
                            text=True, timeout=timeout)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


def _sbatch_env(job_id: int, nodes: int, requeued: Path, restart: int = 0) -> dict[str, str]:
    return _env(
        PATH=f"{FAKE_SLURM}:{os.environ['PATH']}", SLURM_JOB_ID=str(job_id), SLURM_JOB_NODELIST="localhost",
        SLURM_NNODES=str(nodes), SLURM_RESTART_COUNT=str(restart), FAKE_SLURM_REQUEUED=str(requeued),
    )


def _assert_same_losses(got: dict[int, float], expected: dict[int, float]) -> None:
    assert sorted(got) == sorted(expected)
    torch.testing.assert_close(
        torch.tensor([got[s] for s in sorted(got)]), torch.tensor([expected[s] for s in sorted(expected)]), **TOL64
    )


def test_launch_local_dry_run_prints_the_torchrun_command(data_dir, tmp_path, capsys):
    config = tmp_path / "tiny.yaml"
    save_config(tiny_config(data_dir, tmp_path / "run"), config)
    assert main(["launch", "local", "--nproc", "2", str(config), "parallel.dp_shard=2", "--preflight", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "-m torch.distributed.run --standalone --nproc-per-node=2" in out
    assert "--signals-to-handle=SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1" in out
    assert f"-m braid.cli train {config} parallel.dp_shard=2 --preflight" in out
    assert main(["launch", "local", "--nproc", "3", str(config), "parallel.tp=2", "--dry-run"]) == 2
    assert "world size 3 is not divisible" in capsys.readouterr().err


@pytest.mark.slow
@pytest.mark.distributed
def test_launch_local_trains_with_preflight(data_dir, tmp_path):
    """The launch path end to end, kept small: 2 workers, 2 steps, preflight first."""
    config = tmp_path / "tiny.yaml"
    save_config(tiny_config(data_dir, tmp_path / "run", "train.steps=2", "parallel.dp_shard=2"), config)
    result = _braid("launch", "local", "--nproc", "2", str(config), "--preflight")
    assert "preflight: 2 ranks on 1 hosts" in result.stdout
    assert "step 2, loss" in result.stdout
    assert sorted(train_losses(tmp_path / "run")) == [1, 2]


@pytest.mark.slow
@pytest.mark.distributed
def test_two_node_sbatch_equals_one_node_four_processes(data_dir, tmp_path):
    parity = ("train.dtype=float64", "train.steps=3", "data.batch_size=2", "parallel.dp_shard=4")
    cfg = tiny_config(data_dir, tmp_path / "two_nodes", *parity)
    script, _ = prepare_run(cfg, SlurmJob(nodes=2, gpus_per_node=2, partition="cpu", time="10"))
    requeued = tmp_path / "requeued"
    result = subprocess.run(["bash", str(script)], env=_sbatch_env(_free_job_id(), 2, requeued),
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert not requeued.exists()

    one_node = tmp_path / "one.yaml"
    save_config(tiny_config(data_dir, tmp_path / "one_node", *parity), one_node)
    _braid("launch", "local", "--nproc", "4", str(one_node), timeout=300)
    _assert_same_losses(train_losses(tmp_path / "two_nodes"), train_losses(tmp_path / "one_node"))
    assert sorted(train_losses(tmp_path / "one_node")) == [1, 2, 3]


def _wait_for_step(run_dir: Path, step: int, proc: subprocess.Popen, timeout: float = 240) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"the job ended before step {step}: {proc.communicate()}")
        if (run_dir / "metrics.jsonl").is_file() and max(train_losses(run_dir), default=0) >= step:
            return
        time.sleep(0.05)
    raise AssertionError(f"no step {step} within {timeout} s")


@pytest.mark.slow
@pytest.mark.distributed
def test_sigusr1_checkpoints_requeues_and_the_relaunch_continues_the_trajectory(data_dir, tmp_path):
    steps = 30
    parity = ("train.dtype=float64", f"train.steps={steps}", "data.batch_size=2", "parallel.dp_shard=2")
    reference = tmp_path / "reference.yaml"
    save_config(tiny_config(data_dir, tmp_path / "reference", *parity), reference)
    _braid("launch", "local", "--nproc", "2", str(reference), timeout=300)

    cfg = tiny_config(data_dir, tmp_path / "job", *parity)
    script, _ = prepare_run(cfg, SlurmJob(nodes=1, gpus_per_node=2, partition="cpu", time="10"))
    job_id, requeued = _free_job_id(), tmp_path / "requeued"
    job = subprocess.Popen(["bash", str(script)], env=_sbatch_env(job_id, 1, requeued),
                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    _wait_for_step(tmp_path / "job", 3, job)
    job.send_signal(signal.SIGUSR1)  # what Slurm sends the batch shell 120 s before the time limit
    out, _ = job.communicate(timeout=240)
    assert "got SIGUSR1" in out and f"requeueing job {job_id}" in out, out[-3000:]
    assert requeued.read_text().split() == [str(job_id)]
    stopped_at = max(train_losses(tmp_path / "job"))
    assert 3 <= stopped_at < steps, out[-3000:]
    assert (tmp_path / "job" / "ckpt").is_dir()

    # Slurm reruns the same script after the requeue; the trainer resumes from the run dir.
    rerun = subprocess.run(["bash", str(script)], env=_sbatch_env(job_id, 1, tmp_path / "again", restart=1),
                           capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stdout[-3000:] + rerun.stderr[-3000:]
    assert not (tmp_path / "again").exists(), "a finished run does not requeue"
    _assert_same_losses(train_losses(tmp_path / "job"), train_losses(tmp_path / "reference"))
