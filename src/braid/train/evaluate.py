"""Validation loss and perplexity, loading a trained run, and text samples.

Shapes: B batch, T time, V vocab.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from itertools import islice
from pathlib import Path

import torch
from torch import nn

from braid.train.checkpoint import (
    EXPORT_WEIGHTS,
    is_export_dir,
    load_model_weights,
    resolve_checkpoint,
    run_dir_of,
)
from braid.train.config import DataConfig, TrainConfig, load_config_file
from braid.train.step import IGNORE_INDEX, cross_entropy_sum


def val_batches(data: DataConfig, num_batches: int, data_dir: str | None = None) -> list[dict[str, torch.Tensor]]:
    """The first `num_batches` batches of the val split (unshuffled: the same every call).

    `data_dir` replaces the config's data source (e.g. `braid eval --data DIR`).
    """
    from braid.data import PackedLoader

    sources = data_dir if data_dir is not None else data.loader_sources()
    loader = PackedLoader(sources, split="val", seq_len=data.seq_len, batch_size=data.batch_size, shuffle=False)
    batches = list(islice(iter(loader), num_batches))
    if not batches:
        raise ValueError(f"the val split of {sources!r} is empty; prepare the data with a non-zero val fraction")
    return batches


def to_device(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    return {key: value.to(device, non_blocking=True) for key, value in batch.items()}


@torch.no_grad()
def evaluate(
    model: nn.Module,
    batches: list[dict[str, torch.Tensor]],
    device: torch.device,
    autocast: contextlib.AbstractContextManager | None = None,
) -> dict[str, float]:
    """Token-weighted mean cross-entropy (nats) and perplexity over `batches`."""
    was_training = model.training
    model.eval()
    loss_sum, num_targets = 0.0, 0
    for batch in batches:
        batch = to_device(batch, device)
        with autocast or contextlib.nullcontext():
            logits_BTV = model(batch["input_ids"], batch["doc_ids"])
        loss_sum += float(cross_entropy_sum(logits_BTV, batch["labels"]))
        num_targets += int((batch["labels"] != IGNORE_INDEX).sum())
    model.train(was_training)
    val_loss = loss_sum / max(num_targets, 1)
    return {"val_loss": val_loss, "val_ppl": math.exp(min(val_loss, 700.0)), "val_tokens": num_targets}


@dataclass
class TrainedRun:
    cfg: TrainConfig
    model: nn.Module
    checkpoint: Path
    step: int


def load_trained(path: str | Path, device: str | torch.device | None = None) -> TrainedRun:
    """The model of a run dir (latest checkpoint), of one checkpoint dir, or of a dir written
    by `braid checkpoint export`, in eval mode, on `device` (default: CUDA when there is one,
    else the CPU)."""
    from braid.model import build_model

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    if is_export_dir(path):
        return load_export(path, device)
    checkpoint = resolve_checkpoint(path)
    config_path = run_dir_of(checkpoint) / "config.yaml"
    if not config_path.is_file():
        raise ValueError(f"{str(config_path)!r} is missing; a run dir written by `braid train` holds it")
    cfg = load_config_file(config_path)
    if torch.device(device).type == "cpu" and cfg.train.cpu_threads > 0:
        torch.set_num_threads(cfg.train.cpu_threads)
    model = build_model(cfg.model, device=device, seed=cfg.train.seed)
    load_model_weights(checkpoint, model)
    model.eval()
    step = int(checkpoint.name.removeprefix("step_"))
    return TrainedRun(cfg, model, checkpoint, step)


def load_run_tokenizer(data: DataConfig):
    """The tokenizer stored with the (first) data dir by `braid data prepare`."""
    from braid.data import load_tokenizer

    return load_tokenizer(data.paths[0])


def sample_text(
    model: nn.Module,
    tokenizer,
    prompt: str,
    max_new_tokens: int,
    temperature: float = 1.0,
    top_k: int | None = None,
    seed: int = 0,
) -> str:
    """Continue `prompt` (stops at EOS); a private seeded generator leaves the global RNG alone."""
    from braid.model import generate

    ids = tokenizer.encode(prompt) or [tokenizer.eos_id]
    device = next(model.parameters()).device
    tokens_BT = torch.tensor([ids], dtype=torch.long, device=device)
    generator = torch.Generator(device).manual_seed(seed)
    was_training = model.training
    model.eval()
    out_BT = generate(
        model, tokens_BT, max_new_tokens, temperature=temperature, top_k=top_k,
        eos_id=tokenizer.eos_id, generator=generator,
    )
    model.train(was_training)
    return tokenizer.decode(out_BT[0].tolist())


def load_export(path: str | Path, device: str | torch.device = "cpu") -> TrainedRun:
    """The model of a dir written by `export_checkpoint` (consolidated safetensors), in eval mode."""
    from safetensors import safe_open
    from safetensors.torch import load_model

    from braid.model import build_model

    path = Path(path)
    cfg = load_config_file(path / "config.yaml")
    model = build_model(cfg.model, device=device, seed=cfg.train.seed)
    load_model(model, path / EXPORT_WEIGHTS, device=str(device))
    model.eval()
    with safe_open(path / EXPORT_WEIGHTS, "pt") as f:
        step = int(f.metadata().get("step", "0"))
    return TrainedRun(cfg, model, path, step)
