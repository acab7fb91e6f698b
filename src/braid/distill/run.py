"""The distillation run behind `braid distill`: stages 1-3 in order, each resumable.

Layout of the run dir: metrics.jsonl (rows with a `stage` field) and stage{k}/ckpt/step_*
(the trainer's checkpoint format: student weights, optimizer, loader state, step). A rerun
loads each stage's latest checkpoint: a stage that reached its token budget is skipped
(its weights carry on to the next stage), a partial one, or one given a larger budget,
continues from there.

Under torchrun (`torchrun --nproc_per_node N -m braid.cli distill ...`) the run is data
parallel over N ranks (braid.distill.parallel): `batch_size` is each rank's batch, rank r
reads data shard r of N, the student is FSDP2-sharded (ZeRO-3) and the frozen teacher too
(`shard_teacher`, on by default there). Rank 0 alone prints and writes metrics.jsonl (the
loss of a row is the mean over ranks, i.e. over the global batch). Checkpoints hold every
rank's loader state ("loaders"): a run resumes exactly at the same number of ranks, or in
any number of processes that read as that many ranks (`read_as_dp`, batch_size the
per-process batch); at another data-parallel size the loaders restart at a new epoch
(braid.train.distributed.resplit_loader_state).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import re
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from braid.data.loader import PackedLoader, StackedLoader
from braid.distill.parallel import World, setup_world, shard_student, shard_teacher, stage_loss, virtual_ranks
from braid.distill.student import build_student
from braid.distill.teacher import load_llama
from braid.train.checkpoint import latest_checkpoint, load_checkpoint, load_model_weights, save_checkpoint
from braid.train.distributed import resplit_loader_state

_UNITS = {"": 1, "K": 10**3, "M": 10**6, "B": 10**9, "G": 10**9, "T": 10**12}
DTYPES = {"float32": torch.float32, "float64": torch.float64}


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
    batch_size: int = 8  # per process (per data-parallel rank under torchrun)
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
    # float32, or float64 (teacher and the whole student, SSM parameters too: for exact checks)
    dtype: str = "float32"
    # Read the batches of a run of this many data-parallel ranks (a multiple of the processes;
    # batch_size rows per process, split evenly over its shards): one process with
    # read_as_dp=N and batch_size N*b computes the steps of N ranks with batch_size b.
    read_as_dp: int = 1
    shard_teacher: bool | None = None  # FSDP2-shard the teacher over the ranks; None: when more than one


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
    if cfg.dtype not in DTYPES:
        raise ValueError(f"--dtype {cfg.dtype!r}: use one of {', '.join(DTYPES)}")


def distill(cfg: DistillConfig) -> dict[int, float]:
    """Run (or resume) every stage; returns {stage: last loss}. Under torchrun every rank
    calls it (see the module docstring)."""
    _check(cfg)
    world = setup_world(cfg.device)
    virtual_ranks(cfg.read_as_dp, cfg.batch_size, world.rank, world.world_size)  # fails before model work
    student, teacher = prepare_models(cfg, world)
    return run_stages(cfg, world, student, teacher)


def prepare_models(cfg: DistillConfig, world: World):
    """The frozen teacher and the student initialised from it, on this rank's device;
    FSDP2-sharded over the ranks under a process group (the teacher if cfg.shard_teacher)."""
    dtype = DTYPES[cfg.dtype]
    teacher, _ = load_llama(cfg.teacher, dtype)
    teacher.requires_grad_(False)
    if not world.parallel:
        teacher = teacher.to(world.device)
    torch.manual_seed(cfg.seed)
    student, _ = build_student(teacher, cfg.keep_attention)  # on the teacher's device
    if dtype == torch.float64:  # build_student keeps the SSM parameters float32; one dtype for FSDP2
        student = student.to(dtype)
    if world.parallel:
        # Built on the host: FSDP2 moves each unit to world.device as it shards it, so no
        # whole model ever sits on the card.
        shard_student(student, world.mesh)
        if cfg.shard_teacher is False:
            teacher = teacher.to(world.device)
        else:
            shard_teacher(teacher, world.mesh)
    return student, teacher


class _NoMetrics:
    """The metrics file of ranks other than 0."""

    def write(self, text: str) -> None:
        pass

    def flush(self) -> None:
        pass


def run_stages(cfg: DistillConfig, world: World, student, teacher) -> dict[int, float]:
    """Run (or resume) cfg's stages on models from prepare_models; {stage: last loss}."""
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    if world.is_main:
        (out / "student_config.json").write_text(json.dumps(dataclasses.asdict(student.cfg), indent=1))
    sink = open(out / "metrics.jsonl", "a") if world.is_main else contextlib.nullcontext(_NoMetrics())
    with sink as metrics:
        return {
            stage: _run_stage(stage, tokens, cfg, world, student, teacher, out / f"stage{stage}", metrics)
            for stage, tokens in zip(cfg.stages, cfg.tokens)
        }


def _stage_loader(cfg: DistillConfig, stage: int, teacher, world: World) -> PackedLoader | StackedLoader:
    """This process's loader: shard v of world_size * len(shards) for each of its virtual ranks."""
    shards = virtual_ranks(cfg.read_as_dp, cfg.batch_size, world.rank, world.world_size)
    loaders = [
        PackedLoader(
            cfg.data, "train", cfg.seq_len, cfg.batch_size // len(shards), seed=cfg.seed + stage,
            rank=v, world_size=world.world_size * len(shards),
        )
        for v in shards
    ]
    if loaders[0].vocab_size > teacher.cfg.vocab_size:
        raise ValueError(
            f"data vocab {loaders[0].vocab_size} exceeds the teacher's {teacher.cfg.vocab_size}; "
            "prepare the data with the teacher's tokenizer"
        )
    return loaders[0] if len(loaders) == 1 else StackedLoader(loaders)


def _loader_states(loader, world: World) -> list[dict]:
    """Every data shard's loader state, in shard order (the same list on every rank)."""
    state = loader.state_dict()
    return [s for states in world.gather(state if isinstance(state, list) else [state]) for s in states]


def _resume_loader(loader, extra: dict, cfg: DistillConfig, world: World) -> None:
    # Checkpoints of one-process runs before data parallelism hold one state under "loader".
    states = extra["loaders"] if "loaders" in extra else [extra["loader"]]
    shards = virtual_ranks(cfg.read_as_dp, cfg.batch_size, world.rank, world.world_size)
    mine = [resplit_loader_state(states, v, world.world_size * len(shards)) for v in shards]
    loader.load_state_dict(mine[0] if len(mine) == 1 else mine)


def _train_step(stage: int, cfg: DistillConfig, world: World, student, teacher, opt, batch: dict) -> float:
    loss = stage_loss(
        stage, student, teacher, batch, world,
        block_size=cfg.block_size, temperature=cfg.temperature, ce_weight=cfg.ce_weight,
    )
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    return world.mean(loss.item())


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


def _run_stage(
    stage: int, tokens: int, cfg: DistillConfig, world: World, student, teacher, stage_dir: Path, metrics
) -> float:
    """Train one stage to `tokens` tokens (resuming from its latest checkpoint); its last loss."""
    loader = _stage_loader(cfg, stage, teacher, world)
    opt = torch.optim.AdamW(stage_parameters(stage, student), lr=cfg.lr[stage - 1], weight_decay=0.0)
    tokens_per_step = cfg.seq_len * cfg.batch_size * world.world_size
    steps, step = max(1, math.ceil(tokens / tokens_per_step)), 0
    latest = latest_checkpoint(stage_dir)
    if latest is not None:
        extra = load_checkpoint(latest, student, opt)
        if extra["step"] >= steps:  # finished under this budget; a larger one continues it
            if world.is_main:
                print(f"distill: stage {stage} already at step {extra['step']} of {steps}; skipped", flush=True)
            return extra["loss"]
        _resume_loader(loader, extra, cfg, world)
        step = extra["step"]
    batches, device = iter(loader), world.device
    first_step, stage_start = step, time.time()
    while step < steps:
        start = time.time()
        for group in opt.param_groups:
            group["lr"] = stage_lr(cfg.lr[stage - 1], step, steps, cfg.schedule, cfg.warmup_fraction)
        batch = {k: v.to(device) for k, v in next(batches).items()}
        loss = _train_step(stage, cfg, world, student, teacher, opt, batch)
        step += 1
        row = {"stage": stage, "step": step, "loss": loss, "tokens": step * tokens_per_step,
               "step_time_s": time.time() - start}
        metrics.write(json.dumps(row) + "\n")
        metrics.flush()
        if step % cfg.checkpoint_every == 0 or step == steps:
            extra = {"step": step, "loaders": _loader_states(loader, world), "loss": loss}
            save_checkpoint(stage_dir, step, student, opt, extra, keep_last=2)
    if world.is_main:
        print(
            f"distill: stage {stage} steps {first_step + 1}-{steps} ({(steps - first_step) * tokens_per_step} tokens) "
            f"in {time.time() - stage_start:.1f}s, last loss {loss:.4f}",
            flush=True,
        )
    return loss


def load_student(run_dir: str | Path, stage: int, teacher_path: str, keep_attention=(), dtype: str = "float32"):
    """The student after `stage` of a run (weights of that stage's latest checkpoint, saved
    at any number of ranks), in one process; `dtype` as the run's."""
    teacher, _ = load_llama(teacher_path, DTYPES[dtype])
    student, _ = build_student(teacher, keep_attention)
    if DTYPES[dtype] == torch.float64:
        student = student.to(torch.float64)
    latest = latest_checkpoint(Path(run_dir) / f"stage{stage}")
    if latest is None:
        raise FileNotFoundError(f"no checkpoint of stage {stage} under {run_dir}; run `braid distill` first")
    load_model_weights(latest, student)
    return student
