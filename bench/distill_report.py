"""Helpers of bench/distill_smollm2.sh: the teacher's tokenizer, the from-scratch control's
config, held-out evaluation of every model, and the markdown table.

    python bench/distill_report.py tokenizer --gguf G --out DIR/tokenizer.json
    python bench/distill_report.py stages --distill-run R
    python bench/distill_report.py scratch-config --distill-run R --data D --tokens N \
        --seq-len T --batch-size B --out-run S --yaml S.yaml [--lr 1e-3] [--device cuda]
    python bench/distill_report.py evaluate --models teacher,init,stage1,stage2,stage3,scratch \
        --gguf G --data D --distill-run R --scratch-run S --seq-len T --batch-size B \
        --results results.json [--device cuda]
    python bench/distill_report.py table --results results.json

Every model is scored on the same val batches of D (the first --batches, default: as many
whole batches as the val split holds): token-weighted cross-entropy and its perplexity.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

MODELS = ("teacher", "init", "stage1", "stage2", "stage3", "scratch")
LABELS = {
    "teacher": "teacher: SmolLM2-135M-Instruct (Q4_1 GGUF, dequantised to fp32)",
    "init": "student at init (teacher weights mapped, no training)",
    "stage1": "student after stage 1",
    "stage2": "student after stage 2",
    "stage3": "distilled student (after stage 3)",
    "scratch": "same-shape student trained from scratch",
}


def cmd_stages(args) -> None:
    """Per stage of a distill run: steps, tokens, seconds in steps, first and last loss."""
    path = Path(args.distill_run) / "metrics.jsonl"
    rows = [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []
    for stage in sorted({row["stage"] for row in rows}):
        rs = [row for row in rows if row["stage"] == stage]
        later = [row["step_time_s"] for row in rs[1:]] or [rs[0]["step_time_s"]]
        print(f"stage {stage}: {len(rs)} steps, {rs[-1]['tokens']} tokens, "
              f"{sum(row['step_time_s'] for row in rs):.1f}s in steps ({sum(later) / len(later):.3f}s/step "
              f"after the first), loss {rs[0]['loss']:.4f} -> {rs[-1]['loss']:.4f}")


def cmd_tokenizer(args) -> None:
    from braid.data import load_tokenizer
    from braid.distill.teacher import save_gguf_tokenizer

    tokenizer = load_tokenizer(save_gguf_tokenizer(args.gguf, args.out))
    print(f"wrote {args.out}: vocab {tokenizer.vocab_size}, document end {tokenizer.eos_id} "
          f"({tokenizer.backend.id_to_token(tokenizer.eos_id)})")


def cmd_scratch_config(args) -> None:
    from braid.distill.baseline import run_student_config, scratch_config
    from braid.train.config import save_config

    cfg = scratch_config(
        run_student_config(args.distill_run), args.data, args.out_run, args.tokens, args.seq_len,
        args.batch_size, lr=args.lr, device=args.device,
    )
    save_config(cfg, args.yaml)
    print(f"wrote {args.yaml}: {cfg.train.steps} steps of {args.seq_len}x{args.batch_size} tokens, lr {args.lr}")


def _val_batches(args) -> list[dict[str, torch.Tensor]]:
    from braid.data import load_manifest
    from braid.train.config import DataConfig
    from braid.train.evaluate import val_batches

    num = args.batches
    if num is None:
        val_tokens = load_manifest(args.data)["splits"]["val"]["num_tokens"]
        num = max(1, val_tokens // (args.seq_len * args.batch_size))
    return val_batches(DataConfig(path=args.data, seq_len=args.seq_len, batch_size=args.batch_size), num)


def _distilled_student(teacher, run_dir: Path, stage: int):
    """The student after `stage` of a distill run (its latest checkpoint), or None."""
    from braid.distill.student import build_student
    from braid.train.checkpoint import latest_checkpoint, load_model_weights

    latest = latest_checkpoint(run_dir / f"stage{stage}")
    if latest is None:
        return None
    student, _ = build_student(teacher)
    load_model_weights(latest, student)
    return student


def _stage_tokens(run_dir: Path) -> dict[int, int]:
    """Tokens each stage of a distill run trained on (from its metrics rows)."""
    tokens: dict[int, int] = {}
    path = run_dir / "metrics.jsonl"
    if path.is_file():
        for line in path.read_text().splitlines():
            row = json.loads(line)
            tokens[row["stage"]] = max(tokens.get(row["stage"], 0), row["tokens"])
    return tokens


def _models(names: list[str], args):
    """Yield (name, model or None, tokens trained) in order, loading the teacher once."""
    from braid.distill.student import build_student
    from braid.distill.teacher import load_llama
    from braid.train.checkpoint import latest_checkpoint
    from braid.train.evaluate import load_trained

    run_dir = Path(args.distill_run) if args.distill_run else None
    teacher = None
    if any(name != "scratch" for name in names):
        teacher, _ = load_llama(args.gguf)
    stage_tokens = _stage_tokens(run_dir) if run_dir else {}
    for name in names:
        if name == "teacher":
            yield name, teacher, None
        elif name == "init":
            torch.manual_seed(0)  # braid distill's seed: the same dt, A, gate init as its student
            yield name, build_student(teacher)[0], 0
        elif name.startswith("stage"):
            stage = int(name.removeprefix("stage"))
            tokens = sum(t for s, t in stage_tokens.items() if s <= stage)
            yield name, _distilled_student(teacher, run_dir, stage), tokens
        elif name == "scratch":
            if latest_checkpoint(args.scratch_run) is None:
                yield name, None, None
                continue
            run = load_trained(args.scratch_run, "cpu")
            yield name, run.model, run.step * run.cfg.data.seq_len * run.cfg.data.batch_size


def cmd_evaluate(args) -> None:
    from braid.train.evaluate import evaluate

    names = args.models.split(",")
    unknown = sorted(set(names) - set(MODELS))
    if unknown:
        raise SystemExit(f"--models: unknown {unknown}; choose from {','.join(MODELS)}")
    results_path = Path(args.results)
    results = json.loads(results_path.read_text()) if results_path.is_file() else {}
    batches, device = _val_batches(args), torch.device(args.device)
    for name, model, tokens in _models(names, args):
        if model is None:
            print(f"evaluate: {name}: no checkpoint, skipped", flush=True)
            continue
        start = time.time()
        model = model.to(device)
        row = evaluate(model, batches, device)
        row["train_tokens"] = tokens
        results[name] = row
        model.to("cpu")
        print(f"evaluate: {name}: val loss {row['val_loss']:.4f} nats/token, ppl {row['val_ppl']:.2f} "
              f"over {row['val_tokens']} tokens ({time.time() - start:.1f}s)", flush=True)
        results_path.write_text(json.dumps(results, indent=1))


def table(results: dict) -> str:
    lines = ["| model | tokens trained | val loss (nats/token) | val ppl |", "|---|---:|---:|---:|"]
    for name in MODELS:
        if name in results:
            row = results[name]
            tokens = "pretrained" if row["train_tokens"] is None else f"{row['train_tokens']:,}"
            lines.append(f"| {LABELS[name]} | {tokens} | {row['val_loss']:.4f} | {row['val_ppl']:.2f} |")
    if "stage3" in results and "scratch" in results:
        won = results["stage3"]["val_loss"] < results["scratch"]["val_loss"]
        lines.append("")
        lines.append(f"distilled student {'beats' if won else 'does NOT beat'} the from-scratch student "
                     f"({results['stage3']['val_ppl']:.2f} vs {results['scratch']['val_ppl']:.2f} ppl)")
    return "\n".join(lines)


def cmd_table(args) -> None:
    print(table(json.loads(Path(args.results).read_text())))


def _data_args(p) -> None:
    p.add_argument("--data", required=True, help="prepared data dir (teacher's tokenizer)")
    p.add_argument("--seq-len", type=int, required=True)
    p.add_argument("--batch-size", type=int, required=True)
    p.add_argument("--device", default="cpu")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("tokenizer", help="write the GGUF's tokenizer as tokenizer.json")
    p.add_argument("--gguf", required=True)
    p.add_argument("--out", required=True)
    p.set_defaults(func=cmd_tokenizer)
    p = sub.add_parser("stages", help="per-stage steps, seconds and losses of a distill run")
    p.add_argument("--distill-run", required=True)
    p.set_defaults(func=cmd_stages)
    p = sub.add_parser("scratch-config", help="YAML for `braid train`: the student's shape, from scratch")
    _data_args(p)
    p.add_argument("--distill-run", required=True, help="a `braid distill` run dir (its student_config.json)")
    p.add_argument("--tokens", type=int, required=True)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--out-run", required=True, help="run dir of the scratch training")
    p.add_argument("--yaml", required=True)
    p.set_defaults(func=cmd_scratch_config)
    p = sub.add_parser("evaluate", help="held-out loss/ppl of the named models, merged into --results")
    _data_args(p)
    p.add_argument("--models", default=",".join(MODELS))
    p.add_argument("--gguf")
    p.add_argument("--distill-run")
    p.add_argument("--scratch-run")
    p.add_argument("--batches", type=int, help="val batches (default: every whole batch of the val split)")
    p.add_argument("--results", required=True)
    p.set_defaults(func=cmd_evaluate)
    p = sub.add_parser("table", help="markdown table of --results")
    p.add_argument("--results", required=True)
    p.set_defaults(func=cmd_table)
    args = parser.parse_args(argv)
    args.func(args)


if __name__ == "__main__":
    main()
