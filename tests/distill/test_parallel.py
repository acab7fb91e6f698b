"""`braid distill` data parallel over 2 gloo ranks (student and teacher FSDP2-sharded) equals
one process reading the same global batches (`read_as_dp=2`), and resumes across the two.

Float64 runs (teacher and student). Tolerances:
- stage 1 losses and all final weights: TOL64 (rtol 1e-9, atol 1e-12), the float64
  rounding bound of tests/parallel;
- stage 2 and 3 losses: TOL_F32 (rtol 1e-6, atol 1e-12): braid.distill.losses takes stage 2's
  MSE and stage 3's softmaxes in float32 whatever the model dtype, so each rank's loss is a
  float32 number, summed over its rows in another order than one process sums the global
  batch (the float32 ulp is 6e-8 to 1.2e-7 relative; 1e-6 is a few ulps of a few sums). Their
  gradients still agree to float64 rounding: the per-element float32 gradients differ only
  by the power-of-two factor of the row count, which FSDP's average over 2 ranks undoes.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from braid.distill.parallel import setup_world, virtual_ranks
from braid.distill.run import DistillConfig, distill, load_student
from braid.parallel.testing import run_distributed
from tests.distill.conftest import save_tiny_llama

TOL64 = dict(rtol=1e-9, atol=1e-12)
TOL_F32 = dict(rtol=1e-6, atol=1e-12)
SEQ, GLOBAL_BATCH = 16, 2
TOKENS_PER_STEP = SEQ * GLOBAL_BATCH
KEEP = (1,)  # layer 0 becomes Mamba-2, layer 1 keeps attention (a kept layer under FSDP too)


def _cfg(teacher: Path, data: Path, out: Path, steps: tuple[int, int, int], *, ranks: int) -> DistillConfig:
    """The run of 2 data-parallel ranks of 1 row each: at ranks=2 itself, at ranks=1 read in one process."""
    return DistillConfig(
        teacher=str(teacher), data=str(data), out=str(out), keep_attention=KEEP,
        tokens=tuple(s * TOKENS_PER_STEP for s in steps), seq_len=SEQ,
        batch_size=GLOBAL_BATCH // ranks, read_as_dp=1 if ranks == 2 else 2,
        dtype="float64", lr=(1e-2, 1e-2, 1e-2), ce_weight=0.5, block_size=8,
        checkpoint_every=1000,  # a checkpoint at the end of each stage only
    )


def _rows(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def _dp2_worker(rank, world_size, cfgs):
    import gc

    import torch.distributed as dist
    from torch.distributed.tensor import DTensor

    from braid.distill.losses import stage1_loss
    from braid.distill.parallel import local_numel
    from braid.distill.run import prepare_models, run_stages

    # 1. A whole run, with the models at hand to look at the teacher.
    world = setup_world("cpu")
    student, teacher = prepare_models(cfgs["whole"], world)
    params = list(teacher.parameters())
    teacher_info = {
        "local": local_numel(teacher),
        "total": sum(p.numel() for p in params),  # a DTensor's numel is its global one
        "all_dtensor": all(isinstance(p, DTensor) for p in params),
        "requires_grad": any(p.requires_grad for p in params),
        "student_dtensor": all(isinstance(p, DTensor) for p in student.parameters()),
    }
    run_stages(cfgs["whole"], world, student, teacher)
    teacher_info["grads"] = [p.grad is not None for p in params]
    # The stage losses of braid.distill.losses call submodules of the sharded modules
    # directly and so fail there: that is what the sharded versions are for.
    batch_BT = torch.zeros(1, SEQ, dtype=torch.long)
    try:
        stage1_loss(student, teacher, batch_BT, batch_BT, 8)
        teacher_info["plain_stage1"] = "ran"
    except Exception as error:  # noqa: BLE001 - any failure will do
        teacher_info["plain_stage1"] = type(error).__name__
    del student, teacher, params
    gc.collect()

    # 2. Stopped after 2 of 3 stage-3 steps, then resumed in place; a copy of the stopped
    # run goes to the parent to resume in one process.
    distill(cfgs["stopped"])
    if rank == 0:
        shutil.copytree(cfgs["stopped"].out, cfgs["copy"])
    dist.barrier()
    distill(cfgs["resumed"])
    # 3. A run the parent stopped in one process, resumed here at 2 ranks.
    distill(cfgs["from_one"])
    return teacher_info


def test_dp2_distill_equals_one_process_and_resumes_across_layouts(tmp_path, data_dir):
    teacher = save_tiny_llama(tmp_path / "teacher", vocab_size=320)
    run = {name: tmp_path / name for name in ("reference", "whole", "stopped", "copy", "from_one")}
    full, short = (2, 2, 3), (2, 2, 2)
    reference = _cfg(teacher, data_dir, run["reference"], full, ranks=1)
    distill(reference)
    distill(_cfg(teacher, data_dir, run["from_one"], short, ranks=1))  # stopped in one process
    cfgs = {
        "whole": _cfg(teacher, data_dir, run["whole"], full, ranks=2),
        "stopped": _cfg(teacher, data_dir, run["stopped"], short, ranks=2),
        "resumed": _cfg(teacher, data_dir, run["stopped"], full, ranks=2),
        "copy": str(run["copy"]),
        "from_one": _cfg(teacher, data_dir, run["from_one"], full, ranks=2),
    }
    infos = run_distributed(_dp2_worker, world_size=2, args=(cfgs,))
    distill(_cfg(teacher, data_dir, run["copy"], full, ranks=1))  # the dp2 stop resumed in one process

    # The teacher: every parameter a DTensor, each rank about half of it, frozen, no grads.
    for info in infos:
        assert info["all_dtensor"] and info["student_dtensor"] and not info["requires_grad"]
        assert abs(info["local"] - info["total"] / 2) <= 0.01 * info["total"], info
        assert not any(info["grads"])
        assert info["plain_stage1"] != "ran"
    assert infos[0]["local"] + infos[1]["local"] == infos[0]["total"]

    expected = _rows(run["reference"])
    assert [(r["stage"], r["step"], r["tokens"]) for r in expected] == [
        (1, 1, 32), (1, 2, 64), (2, 1, 32), (2, 2, 64), (3, 1, 32), (3, 2, 64), (3, 3, 96)
    ]
    final = load_student(run["reference"], 3, str(teacher), KEEP, dtype="float64").state_dict()
    for name in ("whole", "stopped", "copy", "from_one"):
        rows = _rows(run[name])
        # a resumed run logs each step once: the stopped part, then stage 3's step 3
        assert [(r["stage"], r["step"], r["tokens"]) for r in rows] == [
            (r["stage"], r["step"], r["tokens"]) for r in expected
        ], name
        _assert_losses(rows, expected, name)
        weights = load_student(run[name], 3, str(teacher), KEEP, dtype="float64").state_dict()
        for key, value in final.items():
            torch.testing.assert_close(weights[key], value, **TOL64, msg=lambda m, k=key, n=name: f"{n} {k}: {m}")
    changed = load_student(run["reference"], 1, str(teacher), KEEP, dtype="float64").state_dict()
    assert any(not torch.equal(changed[k], v) for k, v in final.items())  # the stages did train


def _assert_losses(rows: list[dict], expected: list[dict], name: str) -> None:
    for row, want in zip(rows, expected):
        tol = TOL64 if row["stage"] == 1 else TOL_F32
        got, ref = torch.tensor(row["loss"], dtype=torch.float64), torch.tensor(want["loss"], dtype=torch.float64)
        where = f"{name} stage {row['stage']} step {row['step']}"
        torch.testing.assert_close(got, ref, **tol, msg=lambda m: f"{where}: {m}")


def test_read_as_dp_must_fit_the_processes():
    assert virtual_ranks(1, 8, 1, 2) == [1]
    assert virtual_ranks(4, 8, 1, 2) == [2, 3]
    with pytest.raises(ValueError, match="--read-as-dp 3 must be a multiple"):
        virtual_ranks(3, 8, 0, 2)
    with pytest.raises(ValueError, match="--batch-size 3"):
        virtual_ranks(4, 3, 0, 2)


def test_cuda_ranks_need_a_card_each(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    for key, value in dict(WORLD_SIZE="2", RANK="1", LOCAL_RANK="1", LOCAL_WORLD_SIZE="2").items():
        monkeypatch.setenv(key, value)
    with pytest.raises(ValueError, match="2 processes on this node but 1 visible CUDA device"):
        setup_world("cuda")


@pytest.mark.slow
def test_torchrun_cli(tmp_path, data_dir):
    """`torchrun --nproc_per_node 2 -m braid.cli distill` runs the stages; rank 0 alone prints."""
    teacher = save_tiny_llama(tmp_path / "teacher", vocab_size=320)
    out = tmp_path / "run"
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")}
    env["OMP_NUM_THREADS"] = "1"
    command = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
        "-m", "braid.cli", "distill", "--teacher", str(teacher), "--student", "keep=1", "--stages", "1,3",
        "--tokens", f"{2 * TOKENS_PER_STEP},{2 * TOKENS_PER_STEP}", "--data", str(data_dir), "--out", str(out),
        "--seq-len", str(SEQ), "--batch-size", "1", "--checkpoint-every", "1",
    ]
    proc = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        stdout, stderr = proc.communicate(timeout=300)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # torchrun and its workers
        raise
    assert proc.returncode == 0, stderr[-3000:]
    assert stdout.count("run dir") == 1 and stdout.count("distill: stage 3") == 1, stdout
    rows = _rows(out)
    assert [(r["stage"], r["step"], r["tokens"]) for r in rows] == [(1, 1, 32), (1, 2, 64), (3, 1, 32), (3, 2, 64)]
    assert (out / "stage3" / "ckpt" / "step_000002" / "COMPLETE").is_file()


def test_config_fields_reach_the_cli():
    from braid.cli import parse_args

    args = parse_args(["distill", "--teacher", "t", "--data", "d", "--dtype", "float64", "--read-as-dp", "2",
                       "--no-shard-teacher"])
    assert (args.dtype, args.read_as_dp, args.shard_teacher) == ("float64", 2, False)
    assert {"dtype", "read_as_dp", "shard_teacher"} <= {f.name for f in dataclasses.fields(DistillConfig)}
