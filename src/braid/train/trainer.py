"""The Trainer: built from a TrainConfig by small build_* functions; `fit()` runs the loop.

The loop is: take grad_accum micro-batches, `engine_step`, update counters and the NaN
guard, call the hooks that are due. The engine (braid.train.step) is chosen by the layout:
one model (one process, TP, FSDP2, EP), this rank's pipeline stages (pp > 1), or DeepSpeed
(pp = 1, or this rank's pipeline stages under ZeRO-1).
SIGTERM or SIGUSR1 ends the loop after the current step with a checkpoint (the process
then exits 0; rerunning the same command resumes).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import random
import signal
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from braid.elastic.policy import build_policy
from braid.train.checkpoint import PartsState, latest_checkpoint, load_train_state, save_train_state
from braid.train.config import DataConfig, RunConfig, TrainConfig, config_to_dict, load_config_file, save_config
from braid.train.distributed import (
    Layout,
    barrier,
    build_layout,
    check_layout,
    gather_loader_states,
    local_device,
    resplit_loader_state,
    virtual_dp_ranks,
)
from braid.train.evaluate import load_run_tokenizer, sample_text, to_device, val_batches
from braid.train.hooks import Hook, default_hooks
from braid.train.metrics import MetricsLogger, ProgressBar, Throughput, device_peak_flops
from braid.train.optim import build_optimizer, lr_multiplier
from braid.train.step import (
    IGNORE_INDEX,
    DeepSpeedEngine,
    Engine,
    ModelEngine,
    NanGuard,
    PipelineDeepSpeedEngine,
    PipelineEngine,
    StepOutput,
    engine_step,
)

STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


@dataclass
class TrainState:
    step: int = 0  # optimizer steps done
    tokens: int = 0  # tokens consumed (including skipped steps)


def build_device(cfg: RunConfig) -> torch.device:
    """The training device; on CPU, also applies train.cpu_threads."""
    if cfg.device == "cuda" and not torch.cuda.is_available():
        raise ValueError("train.device=cuda but no CUDA device is visible; use train.device=cpu or auto")
    if cfg.device == "auto":
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    else:
        device = torch.device(cfg.device)
    if device.type == "cpu" and cfg.cpu_threads > 0:
        torch.set_num_threads(cfg.cpu_threads)
    return device


def build_autocast(cfg: RunConfig, device: torch.device) -> contextlib.AbstractContextManager:
    """bf16 autocast on CUDA ("auto") or when asked; plain float32 otherwise."""
    use_bf16 = cfg.dtype == "bfloat16" or (cfg.dtype == "auto" and device.type == "cuda")
    if not use_bf16:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def check_data(cfg: TrainConfig) -> None:
    """Fail early (before model work) when a data dir is missing or its vocab does not fit."""
    from braid.data import load_manifest

    for path in cfg.data.paths:
        vocab_size = load_manifest(path)["vocab_size"]
        if vocab_size > cfg.model.vocab_size:
            raise ValueError(
                f"data dir {path!r} has vocab_size {vocab_size} but model.vocab_size={cfg.model.vocab_size}; "
                f"set model.vocab_size={vocab_size}"
            )


def resolve_paths(cfg: TrainConfig) -> TrainConfig:
    """The config with absolute data paths and run dir, so config.yaml works from any cwd."""
    data = dataclasses.replace(
        cfg.data,
        path=str(Path(cfg.data.path).resolve()) if cfg.data.path else "",
        mixture=[dataclasses.replace(s, path=str(Path(s.path).resolve())) for s in cfg.data.mixture],
    )
    return dataclasses.replace(cfg, data=data, out_dir=str(Path(cfg.out_dir).resolve()))


def prepare_run_dir(cfg: TrainConfig) -> Path:
    """Create the run dir and write config.yaml, refusing to mix runs in one dir."""
    run_dir = Path(cfg.out_dir)
    saved = run_dir / "config.yaml"
    if latest_checkpoint(run_dir) is not None:
        if not cfg.checkpoint.resume:
            raise ValueError(
                f"run dir {str(run_dir)!r} has checkpoints but checkpoint.resume=false; "
                "pass a new --out dir, or drop checkpoint.resume=false to continue that run"
            )
        if saved.is_file() and load_config_file(saved).model != cfg.model:
            raise ValueError(
                f"run dir {str(run_dir)!r} holds checkpoints of a different model config; "
                "pass a new --out dir, or train with the model config saved in its config.yaml"
            )
    run_dir.mkdir(parents=True, exist_ok=True)
    save_config(cfg, saved)
    return run_dir


def build_model(cfg: TrainConfig, device: torch.device, layout: Layout | None = None) -> nn.Module:
    """The model from the seed; under a parallel layout every rank builds the full model with
    the same seed and `parallelize` cuts its shards, so the run starts from the
    single-process initialisation."""
    from braid.model import build_model as build_decoder
    from braid.parallel import parallelize

    model = build_decoder(cfg.model, device=device, seed=cfg.train.seed)
    if cfg.train.dtype == "float64":
        model = model.to(torch.float64)
    if layout is not None and layout.parallel:
        model = parallelize(model, layout.dims, layout.mesh)
    model.train()
    return model


def build_pipeline_engine(cfg: TrainConfig, device: torch.device, layout: Layout) -> PipelineEngine:
    """This rank's pipeline stages (build_stages), one AdamW each."""
    pipeline = build_stages(cfg, device, layout)
    optimizers = [build_optimizer(part, cfg.optim, device) for part in pipeline.modules]
    return PipelineEngine(pipeline, optimizers, layout)


def build_pipeline_deepspeed(cfg: TrainConfig, device: torch.device, layout: Layout) -> PipelineDeepSpeedEngine:
    """This rank's pipeline stages (build_stages) under one deepspeed engine in ZeRO-1
    (StageParts), with braid's AdamW groups and DeepSpeed clipping at optim.grad_clip."""
    from braid.parallel.deepspeed import DeepSpeedMPU, StageParts, build_deepspeed_engine

    pipeline = build_stages(cfg, device, layout)
    engine = build_deepspeed_engine(
        StageParts(pipeline.modules), cfg.optim, cfg.parallel.zero_stage, DeepSpeedMPU.from_mesh(layout.mesh),
        micro_batch_size=cfg.data.batch_size, managed_accumulation=False,
    )
    return PipelineDeepSpeedEngine(pipeline, engine, layout)


def build_stages(cfg: TrainConfig, device: torch.device, layout: Layout):
    """This rank's pipeline (braid.parallel.pipeline.Pipeline): its stages cut by cost (or
    parallel.pp_cut_points) from the seed's single-process model, each parallelized (TP, EP,
    AC, compile, FSDP2 unless zero_engine=deepspeed), in training mode."""
    from braid.model import build_model as build_decoder
    from braid.parallel import parallelize
    from braid.parallel.pipeline import build_pipeline

    dims, pcfg = layout.dims, cfg.parallel
    dtype = torch.float64 if cfg.train.dtype == "float64" else torch.float32
    full_state = _cast(build_decoder(cfg.model, device=device, seed=cfg.train.seed), dtype).state_dict()

    def parallelize_part(part: nn.Module) -> nn.Module:
        return parallelize(_cast(part, dtype), dims, layout.mesh)

    pipeline = build_pipeline(
        cfg.model, layout.pp_rank, dims.pp, pcfg.pp_schedule, dims.num_microbatches, pcfg.pp_stages_per_rank,
        group=layout.pp_group, device=device, cut_points=pcfg.pp_cut_points, seq_len=cfg.data.seq_len,
        parallelize_fn=parallelize_part, mesh=layout.mesh, state_dict=full_state,
    )
    for part in pipeline.modules:
        part.train()
    return pipeline


def _cast(module: nn.Module, dtype: torch.dtype) -> nn.Module:
    """train.dtype=float64 holds the whole model in float64 (as build_model does)."""
    return module.to(dtype) if dtype == torch.float64 else module


def build_deepspeed(cfg: TrainConfig, model: nn.Module, layout: Layout) -> DeepSpeedEngine:
    """A deepspeed engine (ZeRO cfg.parallel.zero_stage) over the parallelized model, with
    braid's AdamW groups and DeepSpeed clipping at optim.grad_clip."""
    from braid.parallel.deepspeed import DeepSpeedMPU, build_deepspeed_engine

    engine = build_deepspeed_engine(
        model, cfg.optim, cfg.parallel.zero_stage, DeepSpeedMPU.from_mesh(layout.mesh),
        micro_batch_size=cfg.data.batch_size, managed_accumulation=False,
    )
    return DeepSpeedEngine(engine, layout)


def build_engine(cfg: TrainConfig, device: torch.device, layout: Layout) -> Engine:
    """The step's engine for the layout: pipeline stages (pp > 1; under DeepSpeed ZeRO-1 or
    FSDP2), DeepSpeed, or one model."""
    if layout.dims.pp > 1:
        if cfg.parallel.zero_engine == "deepspeed":
            return build_pipeline_deepspeed(cfg, device, layout)
        return build_pipeline_engine(cfg, device, layout)
    model = build_model(cfg, device, layout)
    if layout.parallel and cfg.parallel.zero_engine == "deepspeed":
        return build_deepspeed(cfg, model, layout)
    return ModelEngine(model, build_optimizer(model, cfg.optim, device), layout)


def build_train_state(engine: Engine):
    """What checkpoints save and load: model and optimizer state keyed by single-process names."""
    if isinstance(engine, (DeepSpeedEngine, PipelineDeepSpeedEngine)):
        from braid.parallel.deepspeed import DeepSpeedState

        return DeepSpeedState(engine.engine)
    return PartsState(engine.parts, engine.optimizers)


@torch.no_grad()
def evaluate_engine(
    engine: Engine, batches: list[dict[str, torch.Tensor]], device: torch.device, autocast
) -> dict[str, float]:
    """Token-weighted mean validation cross-entropy (nats) and perplexity, with the model
    parts in eval mode (under pp the batches go forward through the pipeline schedule)."""
    modes = [part.training for part in engine.parts]
    for part in engine.parts:
        part.eval()
    loss_sum, num_targets = 0.0, 0
    for batch in batches:
        batch = to_device(batch, device)
        loss_sum += engine.evaluate_batch(batch, autocast)
        num_targets += int((batch["labels"] != IGNORE_INDEX).sum())
    for part, mode in zip(engine.parts, modes):
        part.train(mode)
    val_loss = loss_sum / max(num_targets, 1)
    return {"val_loss": val_loss, "val_ppl": math.exp(min(val_loss, 700.0)), "val_tokens": num_targets}


def build_loader(data: DataConfig, seed: int, layout: Layout | None = None):
    """This rank's loader: data-parallel rank r of n reads shard r of n (TP and PP ranks share one).

    With data.read_as_dp = m (a multiple of n) rank r reads the shards r*m/n ... (r+1)*m/n - 1
    of m, batch_size*n/m rows each, stacked: the run sees the global batches of an m-rank run.
    """
    from braid.data import PackedLoader, StackedLoader

    rank, world_size = (layout.dp_rank, layout.dp_size) if layout is not None else (0, 1)
    virtual = virtual_dp_ranks(data, rank, world_size)
    loaders = [
        PackedLoader(
            data.loader_sources(), split="train", seq_len=data.seq_len, batch_size=data.batch_size // len(virtual),
            seed=seed, rank=v, world_size=world_size * len(virtual),
        )
        for v in virtual
    ]
    return loaders[0] if len(loaders) == 1 else StackedLoader(loaders)


class _NoMetrics:
    """The metrics sink of ranks other than 0: only rank 0 writes the run's files."""

    def log(self, row: dict[str, Any]) -> None:
        pass

    def close(self) -> None:
        pass


class Trainer:
    """Owns the model, optimizer, loader, counters and sinks of one run: one process, or one
    rank of a torchrun launch laid out by `parallel.*` (validated before any model work)."""

    def __init__(self, cfg: TrainConfig, hooks: list[Hook] | None = None):
        cfg = resolve_paths(cfg)
        check_data(cfg)
        dims = check_layout(cfg)
        self.cfg = cfg
        self.device = local_device(build_device(cfg.train))
        self.layout = build_layout(dims, self.device)
        self.run_dir = prepare_run_dir(cfg) if self.layout.is_main else Path(cfg.out_dir)
        barrier(self.layout)
        self.autocast = build_autocast(cfg.train, self.device)
        seed_everything(cfg.train.seed)
        self.engine = build_engine(cfg, self.device, self.layout)
        self.train_state = build_train_state(self.engine)
        self.policy = build_policy(cfg.elastic, cfg.model)
        self.loader = build_loader(cfg.data, cfg.train.seed, self.layout)
        self.state = TrainState()
        self.nan_guard = NanGuard(cfg.nan_guard.max_consecutive, cfg.nan_guard.max_total)
        self.resumed_from = self._resume() if cfg.checkpoint.resume else None
        if self.layout.is_main:
            truncate_metrics(self.run_dir, self.state.step)
        self.hooks = default_hooks(self) + list(hooks or [])
        self.metrics = (
            MetricsLogger(self.run_dir, cfg.log, cfg.name, config_to_dict(cfg)) if self.layout.is_main else _NoMetrics()
        )
        self.throughput = Throughput(self._flops_per_token(), self._peak_flops())
        self.progress = ProgressBar(
            cfg.train.steps, self.state.step, cfg.log.progress and self.layout.is_main, quiet=not self.layout.is_main
        )
        self._init_loop_state()

    @property
    def model(self) -> nn.Module:
        """The model (DeepSpeed: the engine's module); under pp each rank holds stages only."""
        if len(self.engine.parts) != 1 or self.layout.dims.pp > 1:
            raise ValueError("under parallel.pp > 1 a rank holds pipeline stages: use trainer.engine.parts")
        return self.engine.parts[0]

    @property
    def optimizer(self) -> torch.optim.Optimizer:
        """The optimizer of a one-model engine (pipeline engines hold one per stage)."""
        return self.engine.optimizer

    def _init_loop_state(self) -> None:
        """What the loop tracks between steps and hooks (derived, so never checkpointed)."""
        self._batches: Iterator | None = None
        self._val_batches: list | None = None
        self.last = StepOutput(float("nan"), float("nan"), float("nan"), False)
        self.last_row: dict[str, Any] = {}
        self.last_val: dict[str, float] = {}
        self.last_val_step = -1
        self.window: list[StepOutput] = []  # steps since the last metrics row
        self.stop_signal: str | None = None
        self._saved_step = self.state.step if self.resumed_from else -1

    def _peak_flops(self) -> float | None:
        """The peak of all devices of the run: the token counts are those of the global batch."""
        peak = device_peak_flops(self.device, self.cfg.log.peak_flops)
        return peak * self.layout.dims.world_size if peak else None

    def _flops_per_token(self) -> float:
        from braid.model import flops_per_token

        return flops_per_token(self.cfg.model, self.cfg.data.seq_len)

    def lr_at(self, step: int) -> float:
        return self.cfg.optim.lr * lr_multiplier(step, self.cfg.schedule, self.cfg.train.steps)

    def fit(self) -> dict[str, Any]:
        """Train to train.steps (or until a stop signal); returns a summary of the run."""
        try:
            with self._stop_signals():
                while self.state.step < self.cfg.train.steps and not self._stop_agreed():
                    self._advance()
                    self._call_hooks()
                self._finish()
        finally:
            self.progress.close()
            self.metrics.close()
        return self.summary()

    def _advance(self) -> None:
        micro_batches = [to_device(self._next_batch(), self.device) for _ in range(self.cfg.optim.grad_accum)]
        self.last = engine_step(
            self.engine, micro_batches, self.lr_at(self.state.step),
            self.cfg.optim.grad_clip, self.autocast, widths=self.policy.widths(self.state.step),
            layout=self.layout,
        )
        self.state.step += 1
        tokens = sum(b["input_ids"].numel() for b in micro_batches) * self.layout.dp_size
        self.state.tokens += tokens
        self.throughput.add(tokens)
        self.window.append(self.last)
        if not self.last.updated:
            self.progress.write(f"step {self.state.step}: non-finite loss or grad norm, update skipped")
        self.nan_guard.update(self.last.updated, self.state.step)
        self.progress.update()

    def _call_hooks(self) -> None:
        for hook in self.hooks:
            if hook.due(self.state.step):
                hook.fn(self)
        if self.last_row.get("step") == self.state.step:
            self.progress.update_postfix(self.last_row)

    def _finish(self) -> None:
        if self.stop_signal is not None:
            self.save_checkpoint()
            self.progress.write(f"{self.stop_signal}: saved step {self.state.step} to {self.run_dir}/ckpt; exiting")
            return
        for hook in self.hooks:
            if hook.at_end:
                hook.fn(self)

    def _next_batch(self) -> dict[str, torch.Tensor]:
        if self._batches is None:  # after any resume: the iterator reads the loader's cursor
            self._batches = iter(self.loader)
        return next(self._batches)

    def validate(self) -> dict[str, float]:
        if self._val_batches is None:
            self._val_batches = val_batches(self.cfg.data, self.cfg.eval.batches)
        self.last_val = evaluate_engine(self.engine, self._val_batches, self.device, self.autocast)
        self.last_val_step = self.state.step
        return self.last_val

    def sample(self, prompt: str, max_new_tokens: int, temperature: float = 0.8, top_k: int | None = 50) -> str:
        tokenizer = load_run_tokenizer(self.cfg.data)
        return sample_text(self.model, tokenizer, prompt, max_new_tokens, temperature, top_k, self.cfg.train.seed)

    def save_checkpoint(self) -> Path | None:
        if self._saved_step == self.state.step:
            return None
        extra = {
            "step": self.state.step,
            "tokens": self.state.tokens,
            "nan_guard": self.nan_guard.state_dict(),
            "loaders": [
                state for states in gather_loader_states(self.layout, self._loader_states()) for state in states
            ],
        }
        path = save_train_state(self.run_dir, self.state.step, self.train_state, extra, self.cfg.checkpoint.keep_last)
        self._saved_step = self.state.step
        return path

    def _resume(self) -> Path | None:
        path = latest_checkpoint(self.run_dir)
        if path is None:
            return None
        extra = load_train_state(path, self.train_state)
        self.state = TrainState(step=extra["step"], tokens=extra["tokens"])
        self.nan_guard.load_state_dict(extra["nan_guard"])
        # Checkpoints before the parallel trainer hold one loader state under "loader".
        states = extra["loaders"] if "loaders" in extra else [extra["loader"]]
        virtual = virtual_dp_ranks(self.cfg.data, self.layout.dp_rank, self.layout.dp_size)
        mine = [resplit_loader_state(states, v, self.layout.dp_size * len(virtual)) for v in virtual]
        self.loader.load_state_dict(mine[0] if len(mine) == 1 else mine)
        return path

    def _loader_states(self) -> list[dict[str, Any]]:
        """This rank's loader states, one per data-parallel shard it reads (data.read_as_dp)."""
        state = self.loader.state_dict()
        return state if isinstance(state, list) else [state]

    def _stop_agreed(self) -> bool:
        """Whether any rank got a stop signal. Ranks receive it at different moments; without
        agreeing, one could start checkpointing (a collective) while another starts a step."""
        if not self.layout.parallel:
            return self.stop_signal is not None
        flag = torch.tensor([self.stop_signal is not None], dtype=torch.int32, device=self.device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        stop = bool(flag.item())
        if stop and self.stop_signal is None:
            self.stop_signal = "stop signal on another rank"
        return stop

    @contextlib.contextmanager
    def _stop_signals(self):
        """SIGTERM/SIGUSR1 set a flag; the loop checkpoints and ends after the current step."""

        def request_stop(signum, frame):
            self.stop_signal = signal.Signals(signum).name

        try:
            previous = {sig: signal.signal(sig, request_stop) for sig in STOP_SIGNALS}
        except ValueError:  # not the main thread: signals stay with the caller
            previous = {}
        try:
            yield
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)

    def summary(self) -> dict[str, Any]:
        return {
            "run_dir": str(self.run_dir),
            "step": self.state.step,
            "tokens": self.state.tokens,
            "loss": self.last_row.get("loss", self.last.loss),
            "skipped_steps": self.nan_guard.total,
            "stopped_by": self.stop_signal,
            **self.last_val,
        }


def truncate_metrics(run_dir: Path, step: int) -> None:
    """Drop metrics rows past `step` (written after the checkpoint a resumed run restarts from)."""
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return
    lines = [line for line in path.read_text().splitlines() if line.strip()]
    kept = [line for line in lines if json.loads(line)["step"] <= step]
    path.write_text("".join(line + "\n" for line in kept))


def train(cfg: TrainConfig, hooks: list[Hook] | None = None) -> dict[str, Any]:
    """Build a Trainer for `cfg` (resuming from its run dir if it has a checkpoint) and fit."""
    return Trainer(cfg, hooks).fit()
