"""The distillation run behind `braid distill`: stages 1-3 in order, each resumable.

Layout of the run dir: metrics.jsonl (rows with a `stage` field) and stage{k}/ckpt/step_*
(the trainer's checkpoint format: student weights, optimizer, loader state, step). A rerun
loads each stage's latest checkpoint: a stage that reached its token budget is skipped
(its weights carry on to the next stage), a partial one, or one given a larger budget,
continues from there.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from braid.data.loader import PackedLoader
from braid.distill.losses import stage1_loss, stage2_loss, stage3_loss
from braid.distill.student import build_student
from braid.distill.teacher import load_llama
from braid.train.checkpoint import latest_checkpoint, load_checkpoint, load_model_weights, save_checkpoint

_UNITS = {"": 1, "K": 10**3, "M": 10**6, "B": 10**9, "G": 10**9, "T": 10**12}


@dataclass
class DistillConfig:
    """One run: the teacher, the student layout, the stages and their token budgets."""

    teacher: str
    data: str
    out: str
    stages: tuple[int, ...] = (1, 2, 3)
    tokens: tuple[int, ...] = (80_000_000, 160_000_000, 2_760_000_000)
    keep_attention: tuple[int, ...] = ()
    seq_len: int = 512
    batch_size: int = 8
    lr: tuple[float, ...] = (1e-3, 1e-3, 1e-4)  # peak per stage 1, 2, 3
    # "constant" (a larger budget continues a finished stage exactly), or "cosine": linear warmup
    # over warmup_fraction of each stage's steps, then cosine down to lr / 10 at its last step.
    schedule: str = "constant"
    warmup_fraction: float = 0.05
    temperature: float = 1.0
    ce_weight: float = 0.0
    block_size: int = 256  # stage-1 tile edge: memory O(seq_len * block); small tiles mean many small kernels
    checkpoint_every: int = 500
    seed: int = 0
    device: str = "cpu"


def parse_tokens(text: str) -> int:
    """'80M' -> 80_000_000, '2.76B' -> 2_760_000_000, '4096' -> 4096."""
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([KMBGT]?)\s*", text.upper())
    if not match:
        raise ValueError(f"token count {text!r} is not a number with an optional K/M/B/T suffix, e.g. 80M or 2.76B")
    return int(round(float(match.group(1)) * _UNITS[match.group(2)]))


def parse_stages(text: str) -> tuple[int, ...]:
    """--stages: '1,2,3' -> (1, 2, 3)."""
    try:
        return tuple(int(s) for s in text.split(","))
    except ValueError as error:
        raise ValueError(f"--stages {text!r}: give stage numbers separated by commas, e.g. 1,2,3") from error


def parse_student(text: str) -> tuple[int, ...]:
    """--student: 'mamba2' (every layer Mamba-2) or 'keep=I,J' (keep attention in layers I, J)."""
    if text == "mamba2":
        return ()
    if text.startswith("keep="):
        try:
            return tuple(int(i) for i in text[5:].split(",") if i)
        except ValueError as error:
            raise ValueError(f"--student {text!r}: keep= takes layer indices like keep=3,9") from error
    raise ValueError(f"--student {text!r} is not 'mamba2' or 'keep=I,J' (attention layers to keep)")


def _stage_loss(stage: int, cfg: DistillConfig, student, teacher, batch: dict) -> torch.Tensor:
    tokens_BT, doc_ids_BT = batch["input_ids"], batch["doc_ids"]
    if stage == 1:
        return stage1_loss(student, teacher, tokens_BT, doc_ids_BT, cfg.block_size)
    if stage == 2:
        return stage2_loss(student, teacher, tokens_BT, doc_ids_BT)
    return stage3_loss(student, teacher, tokens_BT, doc_ids_BT, batch["labels"], cfg.temperature, cfg.ce_weight)


_MIXING_PARAMS = ("B_proj.", "C_proj.", "dt_proj.", "conv_B.", "conv_C.", "dt_bias", "A_log")


def stage_parameters(stage: int, student) -> list[torch.nn.Parameter]:
    """What a stage trains: stage 1 the parameters of the Mamba-2 mixing matrices, stage 2
    the Mamba-2 blocks, stage 3 everything. Every one gets a gradient each step, so the
    optimizer state (and hence each checkpoint) always covers exactly these."""
    if stage == 3:
        return list(student.parameters())
    params = []
    for block in student.layers.values():
        if block.spec.mixer == "attention":
            continue
        for name, param in block.named_parameters():
            if stage == 2 or name.removeprefix("mixer.").startswith(_MIXING_PARAMS):
                params.append(param)
    return params


def _check(cfg: DistillConfig) -> None:
    if not cfg.stages or any(s not in (1, 2, 3) for s in cfg.stages) or list(cfg.stages) != sorted(set(cfg.stages)):
        raise ValueError(f"--stages {cfg.stages}: give increasing stages from 1, 2, 3, e.g. 1,2,3 or 3")
    if len(cfg.tokens) != len(cfg.stages):
        raise ValueError(f"--tokens has {len(cfg.tokens)} budgets for {len(cfg.stages)} stages; give one per stage")


def distill(cfg: DistillConfig) -> dict[int, float]:
    """Run (or resume) every stage; returns {stage: last loss}."""
    _check(cfg)
    device = torch.device(cfg.device)
    teacher, _ = load_llama(cfg.teacher)
    teacher = teacher.to(device).requires_grad_(False)
    torch.manual_seed(cfg.seed)
    student, student_cfg = build_student(teacher, cfg.keep_attention)
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "student_config.json").write_text(json.dumps(dataclasses.asdict(student_cfg), indent=1))
    results = {}
    with open(out / "metrics.jsonl", "a") as metrics:
        for stage, tokens in zip(cfg.stages, cfg.tokens):
            results[stage] = _run_stage(stage, tokens, cfg, student, teacher, out / f"stage{stage}", metrics)
    return results


def _stage_loader(cfg: DistillConfig, stage: int, teacher) -> PackedLoader:
    loader = PackedLoader(cfg.data, "train", cfg.seq_len, cfg.batch_size, seed=cfg.seed + stage)
    if loader.vocab_size > teacher.cfg.vocab_size:
        raise ValueError(
            f"data vocab {loader.vocab_size} exceeds the teacher's {teacher.cfg.vocab_size}; "
            "prepare the data with the teacher's tokenizer"
        )
    return loader


def _train_step(stage: int, cfg: DistillConfig, student, teacher, opt, batch: dict) -> float:
    loss = _stage_loss(stage, cfg, student, teacher, batch)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    return loss.item()


def stage_lr(peak: float, step: int, steps: int, schedule: str = "constant", warmup_fraction: float = 0.05) -> float:
    """lr of step `step` (0-based) of a stage of `steps`: `peak` throughout ("constant"), or
    ("cosine") linear warmup over warmup_fraction of the steps, then cosine from `peak` down to
    peak / 10 at the last step."""
    if schedule == "constant":
        return peak
    if schedule != "cosine":
        raise ValueError(f"schedule={schedule!r}: use 'constant' or 'cosine'")
    warmup = math.ceil(warmup_fraction * steps)
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - 1 - warmup)
    return peak * (0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress))))


def _run_stage(stage: int, tokens: int, cfg: DistillConfig, student, teacher, stage_dir: Path, metrics) -> float:
    """Train one stage to `tokens` tokens (resuming from its latest checkpoint); its last loss."""
    loader = _stage_loader(cfg, stage, teacher)
    opt = torch.optim.AdamW(stage_parameters(stage, student), lr=cfg.lr[stage - 1], weight_decay=0.0)
    tokens_per_step = cfg.seq_len * cfg.batch_size
    steps, step = max(1, math.ceil(tokens / tokens_per_step)), 0
    latest = latest_checkpoint(stage_dir)
    if latest is not None:
        extra = load_checkpoint(latest, student, opt)
        if extra["step"] >= steps:  # finished under this budget; a larger one continues it
            print(f"distill: stage {stage} already at step {extra['step']} of {steps}; skipped", flush=True)
            return extra["loss"]
        loader.load_state_dict(extra["loader"])
        step = extra["step"]
    batches, device = iter(loader), student.head_weight.device
    first_step, stage_start = step, time.time()
    while step < steps:
        start = time.time()
        for group in opt.param_groups:
            group["lr"] = stage_lr(cfg.lr[stage - 1], step, steps, cfg.schedule, cfg.warmup_fraction)
        loss = _train_step(stage, cfg, student, teacher, opt, {k: v.to(device) for k, v in next(batches).items()})
        step += 1
        row = {"stage": stage, "step": step, "loss": loss, "tokens": step * tokens_per_step,
               "step_time_s": time.time() - start}
        metrics.write(json.dumps(row) + "\n")
        metrics.flush()
        if step % cfg.checkpoint_every == 0 or step == steps:
            extra = {"step": step, "loader": loader.state_dict(), "loss": loss}
            save_checkpoint(stage_dir, step, student, opt, extra, keep_last=2)
    print(
        f"distill: stage {stage} steps {first_step + 1}-{steps} ({(steps - first_step) * tokens_per_step} tokens) "
        f"in {time.time() - stage_start:.1f}s, last loss {loss:.4f}",
        flush=True,
    )
    return loss


def load_student(run_dir: str | Path, stage: int, teacher_path: str, keep_attention=()):
    """The student after `stage` of a run (weights of that stage's latest checkpoint)."""
    teacher, _ = load_llama(teacher_path)
    student, _ = build_student(teacher, keep_attention)
    latest = latest_checkpoint(Path(run_dir) / f"stage{stage}")
    if latest is None:
        raise FileNotFoundError(f"no checkpoint of stage {stage} under {run_dir}; run `braid distill` first")
    load_model_weights(latest, student)
    return student
