"""`braid launch local|slurm` and `braid plan` (registered on the main parser by `register`)."""

from __future__ import annotations

import argparse
import os
import shlex
import subprocess
import sys


def _overrides(args: argparse.Namespace) -> list[str]:
    return list(args.overrides) + ([f"out_dir={args.out}"] if args.out else [])


def cmd_launch_local(args: argparse.Namespace) -> int:
    from braid.launch.local import default_nproc, local_command
    from braid.parallel import ParallelDims
    from braid.train import load_config

    nproc = args.nproc or default_nproc()
    overrides = _overrides(args)
    cfg = load_config(args.config, overrides)
    ParallelDims(cfg.parallel, nproc, cfg.model)  # a bad layout fails here, not in every worker
    cmd, env = local_command(args.config, overrides, nproc, preflight=args.preflight)
    print(f"braid: {shlex.join(cmd)}", flush=True)
    if args.dry_run:
        return 0
    os.execve(cmd[0], cmd, env)  # the launcher becomes torchrun: signals reach it directly


def cmd_launch_slurm(args: argparse.Namespace) -> int:
    from braid.launch.slurm import SlurmJob, prepare_run
    from braid.train import load_config

    job = SlurmJob(
        nodes=args.nodes, gpus_per_node=args.gpus_per_node, partition=args.partition, time=args.time,
        account=args.account, job_name=args.job_name, cpus_per_task=args.cpus_per_task, preflight=args.preflight,
    )
    cfg = load_config(args.config, _overrides(args))
    path, script = prepare_run(cfg, job, command=shlex.join(["braid", *sys.argv[1:]]))
    print(script)
    print(f"braid: wrote {path} (code snapshot in {path.parent / 'code'})", flush=True)
    if not args.submit:
        print(f"braid: submit with `sbatch {path}` (or rerun with --submit)")
        return 0
    result = subprocess.run(["sbatch", str(path)], capture_output=True, text=True)
    if result.returncode != 0:
        raise ValueError(f"sbatch {path} failed: {result.stderr.strip() or result.stdout.strip()}")
    print(result.stdout.strip())
    return 0


def cmd_plan(args: argparse.Namespace) -> int:
    from braid.launch.plan import GPUS, fitting_layouts, format_plan, format_short, layout_overrides, plan, planning_config
    from braid.model import num_params

    cfg = planning_config(args.config, args.overrides)
    gpu = GPUS[args.gpu]
    world = args.nodes * args.gpus_per_node
    print(f"plan: {cfg.name} ({cfg.model.pattern!r}) on {args.nodes} nodes x {args.gpus_per_node} {args.gpu} = {world} GPUs")
    try:
        p = plan(cfg, args.nodes, args.gpus_per_node, gpu, args.mfu)
    except ValueError as error:
        print(f"layout: INVALID: {' '.join(str(error).split())}")
        p = None
    else:
        head = cfg.model.vocab_size * cfg.model.d_model
        print(
            f"model: {p.num_params:,} parameters on the meta device (formula: {num_params(cfg.model):,}; "
            f"embedding {head:,}, {'tied' if cfg.model.tie_embeddings else 'untied'} head), "
            f"{cfg.model.resolved_num_layers} blocks, {p.flops_per_step / p.tokens_per_step / 1e9:.1f} GFLOP/token"
        )
        print(format_plan(p))
        if p.fits:
            return 0
    fits = fitting_layouts(cfg, args.nodes, args.gpus_per_node, gpu, args.mfu)
    if not fits:
        print(f"suggestion: no layout of tp <= {args.gpus_per_node}, any pp, activation checkpointing fits; "
              "lower data.batch_size (raise optim.grad_accum to keep the batch) or data.seq_len, or add nodes")
        return 1
    print(f"suggestion: {layout_overrides(fits[0])}")
    print(format_plan(fits[0]))
    for other in fits[1:4]:
        print(f"  also fits: {format_short(other)}")
    return 1


def _add_launch(sub) -> None:
    p = sub.add_parser("launch", help="run `braid train` under torchrun on this node, or on a Slurm cluster")
    where = p.add_subparsers(dest="where", required=True)
    local = where.add_parser("local", help="torchrun --standalone on this node")
    local.add_argument("--nproc", type=int, default=0, help="worker processes (default: the visible GPUs, or 1)")
    slurm = where.add_parser("slurm", help="render (and with --submit, submit) an sbatch script")
    slurm.add_argument("--nodes", type=int, required=True)
    slurm.add_argument("--gpus-per-node", type=int, required=True)
    slurm.add_argument("--partition", required=True)
    slurm.add_argument("--time", required=True, help="time limit, e.g. 24:00:00 or 2-00:00:00")
    slurm.add_argument("--account")
    slurm.add_argument("--job-name", default="braid")
    slurm.add_argument("--cpus-per-task", type=int, help="CPU cores per node (one task per node)")
    slurm.add_argument("--submit", action="store_true", help="run sbatch on the script")
    for q in (local, slurm):
        q.add_argument("config", help="a named config (see `braid configs`) or a YAML file")
        q.add_argument("overrides", nargs="*", help="dotted.key=value overrides, e.g. parallel.tp=2")
        q.add_argument("--out", help="run dir (default: the config's out_dir)")
        q.add_argument("--preflight", action="store_true", help="measure GEMM, all-reduce and memory per rank first")
    local.add_argument("--dry-run", action="store_true", help="print the torchrun command, do not run it")
    local.set_defaults(func=cmd_launch_local)
    slurm.set_defaults(func=cmd_launch_slurm)


def _add_plan(sub) -> None:
    from braid.launch.plan import GPUS

    p = sub.add_parser("plan", help="memory per GPU and step time of a layout, without GPUs; suggests one that fits")
    p.add_argument("config", help="a training config (named or YAML) or a model config name")
    p.add_argument("overrides", nargs="*", help="dotted.key=value overrides, e.g. parallel.tp=2 data.batch_size=2")
    p.add_argument("--nodes", type=int, default=1)
    p.add_argument("--gpus-per-node", type=int, default=8)
    p.add_argument("--gpu", choices=sorted(GPUS), default="h100")
    p.add_argument("--mfu", type=float, default=0.4, help="assumed model FLOPs utilisation (default 0.4)")
    p.set_defaults(func=cmd_plan)


def register(sub) -> None:
    _add_launch(sub)
    _add_plan(sub)
