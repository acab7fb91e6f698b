"""`braid launch slurm`: an sbatch script for a multi-node run, saved in the run directory.

    job = SlurmJob(nodes=8, gpus_per_node=8, partition="gpu", time="24:00:00")
    script = render_sbatch(job, run_dir="/runs/a", python="/venv/bin/python")
    path, script = prepare_run(cfg, job)   # cfg.out_dir gets launch.yaml, code/, launch.sbatch

The script starts one torchrun agent per node (srun), with c10d rendezvous on the job's
first host as `scontrol show hostnames` lists it. Slurm sends the batch shell SIGUSR1 two
minutes before the time limit (`--signal=B:USR1@120`); the shell forwards it through srun
and torchrun to the trainers, which checkpoint and exit, then requeues the job, which
resumes from the run dir. Preemption (SIGTERM to every step) checkpoints the same way and
Slurm requeues the job itself (`--requeue`).
"""

from __future__ import annotations

import re
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

from braid.launch.local import SIGNALS_TO_HANDLE

TIME_FORMAT = re.compile(r"^(\d+|\d+:\d{2}|\d+:\d{2}:\d{2}|\d+-\d+|\d+-\d+:\d{2}|\d+-\d+:\d{2}:\d{2})$")
NAME_FORMAT = re.compile(r"^[\w.+-]+$")
SIGNAL_LEAD_S = 120


@dataclass(frozen=True)
class SlurmJob:
    """The resources of one sbatch job (one torchrun agent per node, `gpus_per_node` workers each)."""

    nodes: int
    gpus_per_node: int
    partition: str
    time: str
    account: str | None = None
    job_name: str = "braid"
    cpus_per_task: int | None = None  # per node (the one task); None: the partition's default
    preflight: bool = False

    def __post_init__(self) -> None:
        if self.nodes < 1 or self.gpus_per_node < 1:
            raise ValueError(f"--nodes {self.nodes} --gpus-per-node {self.gpus_per_node}: both must be >= 1")
        if not TIME_FORMAT.match(self.time):
            raise ValueError(
                f"--time {self.time!r} is not a Slurm time limit: use MM, MM:SS, HH:MM:SS, D-HH, D-HH:MM or D-HH:MM:SS"
            )
        for flag, value in (("--partition", self.partition), ("--account", self.account), ("--job-name", self.job_name)):
            if value is not None and not NAME_FORMAT.match(value):
                raise ValueError(f"{flag} {value!r}: use letters, digits and . _ + - only")
        if self.cpus_per_task is not None and self.cpus_per_task < 1:
            raise ValueError(f"--cpus-per-task {self.cpus_per_task} must be >= 1")

    @property
    def world_size(self) -> int:
        return self.nodes * self.gpus_per_node


def _directives(job: SlurmJob, run_dir: str) -> list[str]:
    lines = [
        f"--job-name={job.job_name}",
        f"--partition={job.partition}",
        *([f"--account={job.account}"] if job.account else []),
        f"--nodes={job.nodes}",
        "--ntasks-per-node=1",
        f"--gpus-per-node={job.gpus_per_node}",
        *([f"--cpus-per-task={job.cpus_per_task}"] if job.cpus_per_task else []),
        f"--time={job.time}",
        "--exclusive",
        "--requeue",
        f"--signal=B:USR1@{SIGNAL_LEAD_S}",
        "--open-mode=append",
        f"--output={run_dir}/slurm/%x-%j.out",
    ]
    return [f"#SBATCH {line}" for line in lines]


_BODY = """\
set -uo pipefail

RUN_DIR={run_dir}
PYTHON={python}
export PYTHONPATH="$RUN_DIR/code${{PYTHONPATH:+:$PYTHONPATH}}"   # the code snapshot, not the live checkout
export PYTHONUNBUFFERED=1
export OMP_NUM_THREADS=${{OMP_NUM_THREADS:-$(( ${{SLURM_CPUS_PER_TASK:-{gpus}}} / {gpus} ))}}
export NCCL_DEBUG=${{NCCL_DEBUG:-WARN}}
export TORCH_NCCL_ASYNC_ERROR_HANDLING=${{TORCH_NCCL_ASYNC_ERROR_HANDLING:-1}}
export TORCH_NCCL_DUMP_ON_TIMEOUT=${{TORCH_NCCL_DUMP_ON_TIMEOUT:-1}}

# Rendezvous on the job's first compute node (never the login node that submitted it).
HEAD_NODE=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
PORT=$(( 20000 + SLURM_JOB_ID % 20000 ))
echo "braid: job $SLURM_JOB_ID restart ${{SLURM_RESTART_COUNT:-0}} on $SLURM_JOB_NODELIST, rendezvous $HEAD_NODE:$PORT"

# USR1 ({lead} s before the time limit) and TERM (preemption, scancel) go to the trainers,
# which checkpoint and exit 0; after USR1 the job requeues itself and resumes.
requeue=0
srun_pid=""
forward() {{
    echo "braid: got SIG$1 at $(date -u +%FT%TZ): checkpointing"
    if [ "$1" = USR1 ]; then requeue=1; fi
    kill -s "$1" "$srun_pid" 2>/dev/null
}}
trap 'forward USR1' USR1
trap 'forward TERM' TERM

srun --kill-on-bad-exit=1 --ntasks-per-node=1 --nodes={nodes} \\
    "$PYTHON" -m torch.distributed.run \\
    --nnodes={nodes} --nproc-per-node={gpus} \\
    --rdzv-id="$SLURM_JOB_ID" --rdzv-backend=c10d --rdzv-endpoint="$HEAD_NODE:$PORT" \\
    --signals-to-handle={signals} --shutdown-timeout={shutdown} \\
    {train} &
srun_pid=$!
while :; do
    wait "$srun_pid"
    rc=$?
    kill -0 "$srun_pid" 2>/dev/null || break   # wait returned early for a trapped signal
done

if [ "$requeue" = 1 ]; then
    echo "braid: requeueing job $SLURM_JOB_ID to resume from $RUN_DIR"
    scontrol requeue "$SLURM_JOB_ID"
fi
exit "$rc"
"""


def render_sbatch(job: SlurmJob, run_dir: str | Path, python: str = sys.executable, command: str = "") -> str:
    """The sbatch script of `job` training the config saved as RUN_DIR/launch.yaml.

    `command` (the `braid launch slurm ...` line that made it) is kept as a comment."""
    from braid.launch.local import train_args

    run_dir = str(Path(run_dir).resolve())
    train = " ".join(train_args("$RUN_DIR/launch.yaml", [], job.preflight)).replace("$RUN_DIR", '"$RUN_DIR"', 1)
    header = ["#!/bin/bash", *_directives(job, run_dir)]
    if command:
        header.append(f"# Made by: {command}")
    body = _BODY.format(
        run_dir=_quote(run_dir), python=_quote(python), gpus=job.gpus_per_node, nodes=job.nodes,
        signals=SIGNALS_TO_HANDLE, shutdown=SIGNAL_LEAD_S - 10, lead=SIGNAL_LEAD_S, train=train,
    )
    return "\n".join(header) + "\n\n" + body


def _quote(text: str) -> str:
    if re.fullmatch(r"[\w./+-]+", text):
        return text
    return "'" + text.replace("'", "'\\''") + "'"


def snapshot_code(run_dir: Path) -> Path:
    """Copy the braid package that is running now to RUN_DIR/code/braid (replacing an older
    copy), so that a queued or requeued job runs the code it was launched with."""
    import braid

    source = Path(braid.__file__).resolve().parent
    target = run_dir / "code" / "braid"
    if target.exists():
        shutil.rmtree(target)
    shutil.copytree(source, target, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    return target


def prepare_run(cfg, job: SlurmJob, command: str = "", python: str = sys.executable) -> tuple[Path, str]:
    """Write the run dir of a Slurm launch of `cfg` (a TrainConfig whose out_dir is the run
    dir): launch.yaml (the config with overrides applied and absolute paths), the code
    snapshot, the slurm/ log dir and launch.sbatch. Returns (script path, script text).

    The layout is checked against nodes * gpus_per_node first, so a bad layout fails here
    rather than after the job waited in the queue."""
    from braid.parallel import ParallelDims
    from braid.train.config import save_config
    from braid.train.trainer import resolve_paths

    ParallelDims(cfg.parallel, job.world_size, cfg.model)
    cfg = resolve_paths(cfg)
    run_dir = Path(cfg.out_dir)
    if any(c.isspace() for c in str(run_dir)):
        raise ValueError(f"run dir {str(run_dir)!r} contains whitespace, which #SBATCH --output cannot hold; use another --out")
    (run_dir / "slurm").mkdir(parents=True, exist_ok=True)
    save_config(cfg, run_dir / "launch.yaml")
    snapshot_code(run_dir)
    script = render_sbatch(job, run_dir, python, command)
    path = run_dir / "launch.sbatch"
    path.write_text(script)
    return path, script
