"""sbatch rendering for several layouts: `bash -n` plus content checks, and the run dir it writes."""

from __future__ import annotations

import subprocess

import pytest

from braid.launch.slurm import SlurmJob, prepare_run, render_sbatch
from braid.train.config import load_config_file

from .conftest import tiny_config

LAYOUTS = [  # (nodes, gpus per node, account, preflight)
    (1, 8, None, False),
    (2, 4, "proj-a", True),
    (64, 8, "llm", False),
]


def _bash_syntax_ok(script: str) -> None:
    result = subprocess.run(["bash", "-n"], input=script, text=True, capture_output=True)
    assert result.returncode == 0, result.stderr


@pytest.mark.parametrize("nodes, gpus, account, preflight", LAYOUTS)
def test_render_sbatch_layouts(nodes, gpus, account, preflight, tmp_path):
    job = SlurmJob(nodes=nodes, gpus_per_node=gpus, partition="gpu", time="1-00:00:00", account=account,
                   preflight=preflight)
    script = render_sbatch(job, tmp_path / "run", python="/opt/venv/bin/python", command="braid launch slurm ...")
    _bash_syntax_ok(script)
    lines = script.splitlines()
    assert lines[0] == "#!/bin/bash"
    directives = [line for line in lines if line.startswith("#SBATCH")]
    for expected in (f"--nodes={nodes}", "--ntasks-per-node=1", f"--gpus-per-node={gpus}", "--partition=gpu",
                     "--time=1-00:00:00", "--requeue", "--signal=B:USR1@120", "--open-mode=append"):
        assert f"#SBATCH {expected}" in directives
    assert ("#SBATCH --account=" + account in directives) if account else not any("account" in d for d in directives)
    assert 'HEAD_NODE=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)' in script
    assert "MASTER_ADDR" not in script and "hostname" not in script.replace("hostnames", "")  # never the login node
    srun = script[script.index("srun "):script.index("srun_pid=$!")]
    assert f"--nodes={nodes}" in srun and "--ntasks-per-node=1" in srun
    assert f"--nnodes={nodes} --nproc-per-node={gpus}" in srun
    assert '--rdzv-backend=c10d --rdzv-endpoint="$HEAD_NODE:$PORT"' in srun
    assert "--signals-to-handle=SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1" in srun
    assert "PYTHON=/opt/venv/bin/python\n" in script and '"$PYTHON" -m torch.distributed.run' in srun
    assert "--shutdown-timeout=110" in srun  # the trainers' time to checkpoint before torchrun kills them
    assert srun.rstrip().endswith(("--preflight &" if preflight else 'launch.yaml &'))
    assert 'export PYTHONPATH="$RUN_DIR/code' in script
    for env in ("OMP_NUM_THREADS", "NCCL_DEBUG", "TORCH_NCCL_ASYNC_ERROR_HANDLING"):
        assert f"export {env}=" in script
    assert "trap 'forward USR1' USR1" in script and 'scontrol requeue "$SLURM_JOB_ID"' in script


def test_bad_job_arguments_raise():
    with pytest.raises(ValueError, match="--time '25 hours'"):
        SlurmJob(nodes=1, gpus_per_node=8, partition="gpu", time="25 hours")
    with pytest.raises(ValueError, match="--partition 'gpu; rm'"):
        SlurmJob(nodes=1, gpus_per_node=8, partition="gpu; rm", time="10:00")
    with pytest.raises(ValueError, match="both must be >= 1"):
        SlurmJob(nodes=0, gpus_per_node=8, partition="gpu", time="10:00")


def test_prepare_run_writes_config_snapshot_and_script(data_dir, tmp_path):
    run_dir = tmp_path / "run@dir"  # paths with shell-special characters are quoted in the script
    cfg = tiny_config(data_dir, run_dir, "parallel.dp_shard=4")
    job = SlurmJob(nodes=2, gpus_per_node=2, partition="gpu", time="30")
    path, script = prepare_run(cfg, job, command="braid launch slurm tiny-hybrid")
    assert path == run_dir / "launch.sbatch" and path.read_text() == script
    _bash_syntax_ok(script)
    assert f"RUN_DIR='{run_dir}'" in script
    saved = load_config_file(run_dir / "launch.yaml")
    assert saved.parallel.dp_shard == 4 and saved.out_dir == str(run_dir) and saved.data.path == str(data_dir)
    assert (run_dir / "code" / "braid" / "launch" / "slurm.py").is_file()
    assert not list((run_dir / "code").rglob("__pycache__"))
    assert (run_dir / "slurm").is_dir()
    with pytest.raises(ValueError, match="world size is 6"):
        prepare_run(cfg, SlurmJob(nodes=3, gpus_per_node=2, partition="gpu", time="30"))
    with pytest.raises(ValueError, match="contains whitespace"):
        prepare_run(tiny_config(data_dir, tmp_path / "run dir", "parallel.dp_shard=4"), job)
