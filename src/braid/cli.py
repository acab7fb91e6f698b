"""The `braid` command: train, eval, generate, checkpoint export, plot, configs, data, demo,
extract, elastic, launch, plan.

User errors (a bad config key, a missing data dir or checkpoint) print one line saying
what to change and exit 2
(BRAID_DEBUG=1 shows the traceback instead); a run stopped by the NaN guard exits 1; a run stopped by
SIGTERM/SIGUSR1 checkpoints and exits 0.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys

from braid.train.step import TrainingStopped


def cmd_train(args: argparse.Namespace) -> int:
    from braid.launch.env import export_torch_env
    from braid.train import load_config, train

    export_torch_env()  # under `srun` without torchrun: SLURM's rank variables -> torch's
    overrides = list(args.overrides) + ([f"out_dir={args.out}"] if args.out else [])
    cfg = load_config(args.config, overrides)
    if args.preflight:
        from braid.launch.preflight import preflight_for_training

        preflight_for_training(cfg)
    summary = train(cfg)
    if os.environ.get("RANK", "0") == "0":
        print(_summary_line(summary))
    _end_process_group()
    return 0


def _end_process_group() -> None:
    """Under torchrun the trainer made the default process group; end it cleanly."""
    import torch.distributed as dist

    if dist.is_initialized():
        dist.destroy_process_group()


def _summary_line(summary: dict) -> str:
    parts = [f"step {summary['step']}", f"loss {summary['loss']:.4f}"]
    if "val_loss" in summary:
        parts.append(f"val_loss {summary['val_loss']:.4f} (ppl {summary['val_ppl']:.2f})")
    if summary["stopped_by"]:
        parts.append(f"stopped by {summary['stopped_by']} (rerun the same command to resume)")
    return f"{', '.join(parts)}; run dir {summary['run_dir']}"


def cmd_eval(args: argparse.Namespace) -> int:
    from braid.train import evaluate, load_trained, val_batches

    from braid.data import load_manifest

    load_manifest(args.data)  # a missing or unfinished data dir fails here, before model work
    run = load_trained(args.ckpt)
    batches = val_batches(run.cfg.data, args.batches, data_dir=args.data)
    result = evaluate(run.model, batches, next(run.model.parameters()).device)
    print(
        f"{run.checkpoint} (step {run.step}) on {args.data} val: loss {result['val_loss']:.4f} nats/token, "
        f"perplexity {result['val_ppl']:.2f} over {result['val_tokens']} tokens"
    )
    return 0


def cmd_generate(args: argparse.Namespace) -> int:
    from braid.train import load_trained, sample_text
    from braid.train.evaluate import load_run_tokenizer

    run = load_trained(args.ckpt)
    tokenizer = load_run_tokenizer(run.cfg.data)
    top_k = args.top_k or None  # 0: sample from the whole vocabulary
    text = sample_text(run.model, tokenizer, args.prompt, args.max_new_tokens, args.temperature, top_k, args.seed)
    print(text)
    return 0


def cmd_checkpoint_export(args: argparse.Namespace) -> int:
    from braid.train.checkpoint import export_checkpoint

    out = export_checkpoint(args.ckpt, args.out)
    print(f"wrote {out}/model.safetensors and {out}/config.yaml (`braid eval {out}`, `braid generate {out}` load it)")
    return 0


def cmd_plot(args: argparse.Namespace) -> int:
    from braid.train import plot_run

    print(f"wrote {plot_run(args.run_dir)}")
    return 0


def cmd_configs(args: argparse.Namespace) -> int:
    from braid.configs.train import TRAIN_CONFIGS

    width = max(len(name) for name in TRAIN_CONFIGS)
    for name, fn in TRAIN_CONFIGS.items():
        cfg = fn()
        print(
            f"{name:<{width}}  {cfg.model.pattern!r}, d_model {cfg.model.d_model}, seq {cfg.data.seq_len}, "
            f"batch {cfg.data.batch_size}, {cfg.train.steps} steps, device {cfg.train.device}"
        )
    return 0


def cmd_kernels(args: argparse.Namespace) -> int:
    import torch

    from braid.kernels import backend, streams

    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "no CUDA device"
    side_stream = int(streams.enabled())
    with backend.use_backends(args.spec or backend.current_spec()):
        print(f"BRAID_KERNELS={backend.current_spec()}  BRAID_SIDE_STREAM={side_stream}  ({device})")
        print("\n".join(backend.report()))
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from braid.train.demo import run_demo

    return run_demo(args.out, args.data, args.overrides)


def _add_train(sub) -> None:
    p = sub.add_parser("train", help="train from a named config or YAML file (auto-resumes)")
    p.add_argument("config", help="a named config (see `braid configs`) or a YAML file")
    p.add_argument("overrides", nargs="*", help="dotted.key=value overrides, e.g. optim.lr=1e-3")
    p.add_argument("--out", help="run dir (default: the config's out_dir); resumes if it has a checkpoint")
    p.add_argument("--preflight", action="store_true", help="GEMM, all-reduce and free memory per rank before training")
    p.set_defaults(func=cmd_train)


def _add_eval(sub) -> None:
    p = sub.add_parser("eval", help="validation loss and perplexity of a checkpoint")
    p.add_argument("ckpt", help="a run dir (its latest checkpoint), a checkpoint dir or an exported dir")
    p.add_argument("--data", required=True, help="prepared data dir whose val split to use")
    p.add_argument("--batches", type=int, default=20, help="val batches to average over")
    p.set_defaults(func=cmd_eval)


def _add_generate(sub) -> None:
    p = sub.add_parser("generate", help="continue a prompt with a trained model")
    p.add_argument("ckpt", help="a run dir (its latest checkpoint) or a checkpoint dir")
    p.add_argument("--prompt", required=True)
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.8, help="0 is greedy")
    p.add_argument("--top-k", type=int, default=50, help="0 samples from the whole vocabulary")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_generate)


def _add_checkpoint(sub) -> None:
    p = sub.add_parser("checkpoint", help="checkpoint tools")
    tools = p.add_subparsers(dest="tool", required=True)
    export = tools.add_parser("export", help="consolidated safetensors + config.yaml of a checkpoint (any layout)")
    export.add_argument("ckpt", help="a run dir (its latest checkpoint) or a checkpoint dir")
    export.add_argument("--out", required=True, help="dir to write model.safetensors and config.yaml to")
    export.set_defaults(func=cmd_checkpoint_export)


def _add_small(sub) -> None:
    p = sub.add_parser("plot", help="write RUN_DIR/loss.png (train and val loss vs tokens)")
    p.add_argument("run_dir")
    p.set_defaults(func=cmd_plot)
    p = sub.add_parser("configs", help="list the named training configs")
    p.set_defaults(func=cmd_configs)
    p = sub.add_parser("kernels", help="which kernel backend each op runs here, and why the others do not")
    p.add_argument("--spec", default=None, help="a BRAID_KERNELS value to evaluate instead of the current one")
    p.set_defaults(func=cmd_kernels)
    p = sub.add_parser("demo", help="Gutenberg → tokenizer → shards → tiny-hybrid on CPU, in minutes")
    p.add_argument("--out", default="runs/demo", help="run dir (default runs/demo)")
    p.add_argument("--data", default="data/gutenberg", help="data dir, created if missing")
    p.add_argument("overrides", nargs="*", help="dotted.key=value overrides of the tiny-hybrid config")
    p.set_defaults(func=cmd_demo)


def cmd_distill(args: argparse.Namespace) -> int:
    from braid.distill.run import DistillConfig, distill, parse_stages, parse_student, parse_tokens
    from braid.launch.env import export_torch_env

    export_torch_env()  # under `srun` without torchrun: SLURM's rank variables -> torch's
    cfg = DistillConfig(
        teacher=args.teacher, data=args.data, out=args.out,
        stages=parse_stages(args.stages),
        tokens=tuple(parse_tokens(t) for t in args.tokens.split(",")),
        keep_attention=parse_student(args.student), seq_len=args.seq_len, batch_size=args.batch_size,
        checkpoint_every=args.checkpoint_every, device=args.device,
        ce_weight=args.ce_weight, temperature=args.kd_temperature, schedule=args.schedule, warmup_fraction=args.warmup,
        dtype=args.dtype, read_as_dp=args.read_as_dp, shard_teacher=args.shard_teacher,
    )
    if args.lr is not None:
        lrs = tuple(float(x) for x in args.lr.split(","))
        if len(lrs) != 3:
            raise SystemExit(f"--lr {args.lr!r}: give three peak learning rates, one per stage, e.g. 1e-3,1e-3,5e-4")
        cfg = dataclasses.replace(cfg, lr=lrs)
    try:
        losses = distill(cfg)
    finally:
        import gc

        gc.collect()  # FSDP/DTensor objects before the process group goes: avoids an abort in gloo
        _end_process_group()
    if os.environ.get("RANK", "0") == "0":
        print("; ".join(f"stage {s}: loss {loss:.4f}" for s, loss in losses.items()) + f"; run dir {args.out}")
    return 0


def _add_distill(sub) -> None:
    p = sub.add_parser(
        "distill", help="distill a HF Llama teacher into a Mamba-2/hybrid student (MOHAWK, resumable; torchrun: dp)"
    )
    p.add_argument("--teacher", required=True, help="HF Llama dir (config.json + safetensors) or a .gguf file")
    p.add_argument("--student", default="mamba2", help="'mamba2' or 'keep=I,J' (attention layers to keep)")
    p.add_argument("--stages", default="1,2,3", help="stages to run, e.g. 1,2,3")
    p.add_argument("--tokens", default="80M,160M,2.76B", help="token budget per stage, e.g. 80M,160M,2.76B")
    p.add_argument("--data", required=True, help="prepared data dir (tokenized with the teacher's tokenizer)")
    p.add_argument("--out", default="runs/distill", help="run dir; rerun the same command to resume")
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--batch-size", type=int, default=8,
                   help="rows per process (per rank under torchrun: the global batch is N times this)")
    p.add_argument("--checkpoint-every", type=int, default=500, help="steps between checkpoints within a stage")
    p.add_argument("--lr", default=None, help="peak learning rate per stage 1,2,3 (default 1e-3,1e-3,1e-4)")
    p.add_argument("--schedule", choices=("constant", "cosine"), default="constant",
                   help="lr per stage: constant, or cosine (warmup, then down to lr/10 at the stage's end)")
    p.add_argument("--warmup", type=float, default=0.05, help="cosine: warmup fraction of each stage's steps")
    p.add_argument("--ce-weight", type=float, default=0.0, help="stage 3: weight of cross-entropy on the data beside KL")
    p.add_argument("--kd-temperature", type=float, default=1.0, help="stage 3: softmax temperature of the KL")
    p.add_argument("--device", default="cpu", help="cpu or cuda (under torchrun: cuda:LOCAL_RANK)")
    p.add_argument("--dtype", choices=("float32", "float64"), default="float32",
                   help="teacher and student dtype (float64: exact checks)")
    p.add_argument("--read-as-dp", type=int, default=1,
                   help="read the batches of this many data-parallel ranks (a multiple of the processes), e.g. "
                        "to resume a torchrun run of N ranks in one process exactly: --read-as-dp N, N x batch")
    p.add_argument("--shard-teacher", action=argparse.BooleanOptionalAction, default=None,
                   help="under torchrun, FSDP2-shard the frozen teacher over the ranks (default on)")
    p.set_defaults(func=cmd_distill)


def build_parser() -> argparse.ArgumentParser:
    from braid.data.cli import register
    from braid.elastic.cli import register as register_elastic
    from braid.launch.cli import register as register_launch

    parser = argparse.ArgumentParser(prog="braid", description="Pretrain hybrid language models.")
    sub = parser.add_subparsers(dest="command", required=True)
    _add_train(sub)
    _add_eval(sub)
    _add_generate(sub)
    _add_checkpoint(sub)
    _add_small(sub)
    _add_distill(sub)
    register(sub)
    register_elastic(sub)
    register_launch(sub)
    return parser


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line, with dotted.key=value overrides allowed after options too
    (`braid plan CONFIG --nodes 8 parallel.tp=2`)."""
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra:
        if not hasattr(args, "overrides") or not all("=" in e and not e.startswith("-") for e in extra):
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
        args.overrides = [*(args.overrides or []), *extra]
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        return args.func(args) or 0
    except (ValueError, FileNotFoundError) as error:
        if os.environ.get("BRAID_DEBUG"):
            raise
        print(f"braid: error: {' '.join(str(error).split())}", file=sys.stderr)
        return 2
    except TrainingStopped as error:
        print(f"braid: {error}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
