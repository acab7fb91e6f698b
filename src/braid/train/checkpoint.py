"""Atomic DCP checkpoints: model, optimizer, and the run's other state (step, loader, RNG).

Layout of a run dir:

    RUN/ckpt/step_000123/      a complete checkpoint (DCP files + COMPLETE)
    RUN/ckpt/step_000130.tmp/  one being written, or left by a crash: never loaded

A checkpoint is written into `step_N.tmp`, then the COMPLETE file (JSON metadata) is
written and synced, then the dir is renamed to `step_N`. Rename is atomic on POSIX, so a
dir without the suffix is always whole; `latest_checkpoint` also requires COMPLETE.
torch.distributed.checkpoint (DCP) runs in one process without a process group, and the
same files load under any sharding later. Under a process group every rank writes its
shards and rank 0 alone makes, completes and renames the dir. MatFormer weights under TP go
through braid.parallel's checkpoint layout (contiguous shards), an identity otherwise.

The model and optimizer state are keyed by the single-process parameter names (FQNs), the
optimizer's flattened ("state.<fqn>.exp_avg", "param_groups.<fqn>.lr"), so a checkpoint
holds no per-layout structure: one process, TP/FSDP2/EP, this rank's pipeline stages
(`PartsState`) and DeepSpeed (braid.parallel.deepspeed.DeepSpeedState) all write and read
the same keys, and each layout loads any other's checkpoint.
"""

from __future__ import annotations

import dataclasses
import io
import json
import os
import random
import re
import shutil
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_state_dict,
    set_model_state_dict,
    set_state_dict,
)

from braid.parallel import from_checkpoint_layout, to_checkpoint_layout

COMPLETE = "COMPLETE"
_STEP_DIR = re.compile(r"^step_(\d+)$")
FLAT = StateDictOptions(flatten_optimizer_state_dict=True)


class PartsState:
    """Model and optimizer state of model parts (one model, or this rank's pipeline stages,
    one optimizer each): {"model": {fqn: tensor}, "optim": {flattened key: value}}, keyed
    as in the single-process model (DTensors keep their global shapes)."""

    def __init__(self, parts: list[nn.Module], optimizers: list[torch.optim.Optimizer]):
        self.parts, self.optimizers = parts, optimizers

    def state_dict(self) -> dict[str, dict[str, Any]]:
        model, optim = {}, {}
        for part, optimizer in zip(self.parts, self.optimizers):
            model_sd, optim_sd = get_state_dict(part, optimizer, options=FLAT)
            model.update(model_sd)
            optim.update(optim_sd)
        return {"model": model, "optim": optim}

    def load_state_dict(self, state: dict[str, dict[str, Any]]) -> None:
        for part, optimizer in zip(self.parts, self.optimizers):
            own_model, own_optim = get_state_dict(part, optimizer, options=FLAT)
            set_state_dict(
                part, optimizer,
                model_state_dict={key: state["model"][key] for key in own_model},
                optim_state_dict={key: state["optim"][key] for key in own_optim},
                options=FLAT,
            )


def checkpoint_dir(run_dir: str | Path, step: int) -> Path:
    return Path(run_dir) / "ckpt" / f"step_{step:06d}"


def complete_checkpoints(run_dir: str | Path) -> list[Path]:
    """Complete checkpoints of a run, oldest first (`.tmp` dirs and dirs without COMPLETE skipped)."""
    root = Path(run_dir) / "ckpt"
    if not root.is_dir():
        return []
    found = []
    for path in root.iterdir():
        match = _STEP_DIR.match(path.name)
        if match and (path / COMPLETE).is_file():
            found.append((int(match.group(1)), path))
    return [path for _, path in sorted(found)]


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    """The newest complete checkpoint in `run_dir`, or None."""
    found = complete_checkpoints(run_dir)
    return found[-1] if found else None


def resolve_checkpoint(path: str | Path) -> Path:
    """A checkpoint dir from a run dir (its latest) or a checkpoint dir; ValueError if neither."""
    path = Path(path)
    if (path / COMPLETE).is_file():
        return path
    latest = latest_checkpoint(path)
    if latest is None:
        raise ValueError(
            f"{str(path)!r} is neither a run dir with a complete checkpoint (RUN/ckpt/step_N) nor a "
            "checkpoint dir; pass the --out dir of `braid train` or one of its ckpt/step_N dirs"
        )
    return latest


def run_dir_of(checkpoint: Path) -> Path:
    """The run dir holding `checkpoint` (RUN/ckpt/step_N -> RUN)."""
    return checkpoint.parent.parent


def capture_rng() -> dict[str, Any]:
    state = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _pack(obj: Any) -> bytes:
    # DCP flattens nested dicts and needs saved tensor shapes to match the load template;
    # the run's small, variably shaped state (RNG, loader, counters) travels as one blob.
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getvalue()


def _unpack(blob: bytes) -> Any:
    return torch.load(io.BytesIO(blob), weights_only=False)


def save_checkpoint(
    run_dir: str | Path,
    step: int,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    extra: dict[str, Any],
    keep_last: int,
) -> Path:
    """Write checkpoint `step` of `model` and `optimizer` (see save_train_state)."""
    return save_train_state(run_dir, step, PartsState([model], [optimizer]), extra, keep_last)


def save_train_state(run_dir: str | Path, step: int, train_state, extra: dict[str, Any], keep_last: int) -> Path:
    """Write checkpoint `step` atomically and keep only the newest `keep_last`; returns its dir.

    train_state: its state_dict() gives {"model": ..., "optim": ...} (PartsState, DeepSpeedState).
    `extra` is any picklable state (loader state, counters); RNG states are added here.
    """
    final = checkpoint_dir(run_dir, step)
    tmp = final.with_name(final.name + ".tmp")
    if _is_main():
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    _barrier()
    state = to_checkpoint_layout(train_state.state_dict())
    state["extra"] = _pack({**extra, "rng": capture_rng()})
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*torch.distributed is disabled.*")
        dcp.save(state, checkpoint_id=tmp)
    _barrier()
    if _is_main():
        _write_complete(tmp, {"step": step, "time": time.time()})
        if final.exists():  # re-saving a step after a resume: replace it
            shutil.rmtree(final)
        os.replace(tmp, final)
        _fsync_dir(final.parent)
        prune_checkpoints(run_dir, keep_last)
    _barrier()
    return final


def _is_main() -> bool:
    return not dist.is_initialized() or dist.get_rank() == 0


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def _write_complete(path: Path, meta: dict) -> None:
    with open(path / COMPLETE, "w") as f:
        json.dump(meta, f)
        f.flush()
        os.fsync(f.fileno())


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def prune_checkpoints(run_dir: str | Path, keep_last: int) -> None:
    """Delete all but the newest `keep_last` complete checkpoints, and stale `.tmp` dirs."""
    for path in complete_checkpoints(run_dir)[:-keep_last]:
        shutil.rmtree(path)
    for path in (Path(run_dir) / "ckpt").glob("step_*.tmp"):
        shutil.rmtree(path, ignore_errors=True)


def load_checkpoint(path: str | Path, model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """Load `model` and `optimizer` in place (see load_train_state); returns the saved `extra`."""
    return load_train_state(path, PartsState([model], [optimizer]))


def load_train_state(path: str | Path, train_state) -> dict[str, Any]:
    """Load a checkpoint (written at any layout) into `train_state` (PartsState,
    DeepSpeedState), restore RNG states; returns the saved `extra`."""
    template = train_state.state_dict()
    state = {**to_checkpoint_layout(template), "extra": b""}
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*torch.distributed is disabled.*")
        dcp.load(state, checkpoint_id=Path(path))
    extra = _unpack(state.pop("extra"))
    train_state.load_state_dict(from_checkpoint_layout(state, template))
    restore_rng(extra.pop("rng"))
    return extra


def load_model_weights(path: str | Path, model: nn.Module) -> None:
    """Load only the model weights of checkpoint `path` (for eval and generation)."""
    state = {"model": get_model_state_dict(model)}
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*torch.distributed is disabled.*")
        dcp.load(state, checkpoint_id=Path(path))
    set_model_state_dict(model, state["model"])


EXPORT_WEIGHTS = "model.safetensors"


def is_export_dir(path: str | Path) -> bool:
    """Whether `path` was written by `export_checkpoint` (weights + config.yaml)."""
    path = Path(path)
    return (path / EXPORT_WEIGHTS).is_file() and (path / "config.yaml").is_file()


def export_checkpoint(path: str | Path, out_dir: str | Path) -> Path:
    """Write checkpoint `path` (a run dir: its latest; or a ckpt/step_N dir, saved at any
    layout) as one consolidated `model.safetensors` (single-process parameter names, the
    step in its metadata) and the run's `config.yaml` with the default (one-process)
    parallel layout, into `out_dir`. Runs in one process; returns `out_dir`."""
    from safetensors.torch import save_model

    from braid.model import build_model
    from braid.parallel import ParallelConfig
    from braid.train.config import load_config_file, save_config

    checkpoint = resolve_checkpoint(path)
    config_path = run_dir_of(checkpoint) / "config.yaml"
    if not config_path.is_file():
        raise ValueError(f"{str(config_path)!r} is missing; a run dir written by `braid train` holds it")
    cfg = load_config_file(config_path)
    model = build_model(cfg.model, device="cpu", seed=cfg.train.seed)
    load_model_weights(checkpoint, model)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    step = checkpoint.name.removeprefix("step_").lstrip("0") or "0"
    save_model(model, str(out_dir / EXPORT_WEIGHTS), metadata={"step": step})
    save_config(dataclasses.replace(cfg, parallel=ParallelConfig()), out_dir / "config.yaml")
    return out_dir
