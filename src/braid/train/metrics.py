"""Metrics: throughput and MFU, the progress bar, metrics.jsonl, TensorBoard and W&B.

Every sink takes the same flat rows ({"step": ..., "loss": ...}); `MetricsLogger` fans a
row out to the sinks that are on.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from braid.train.config import LogConfig

# Dense bf16 tensor-core peak per device (FLOP/s), matched on the CUDA device name.
PEAK_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12}


def device_peak_flops(device: torch.device, override: float = 0.0) -> float | None:
    """Peak FLOP/s for MFU: `override` when set, else from the CUDA device name; None if unknown."""
    if override > 0:
        return override
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, peak in PEAK_FLOPS.items():
        if key in name:
            return peak
    return None


class Throughput:
    """Tokens/s and MFU over the window since the last `rate()` call."""

    def __init__(self, flops_per_token: float, peak_flops: float | None):
        self.flops_per_token = flops_per_token
        self.peak_flops = peak_flops
        self._start = time.perf_counter()
        self._tokens = 0

    def add(self, tokens: int) -> None:
        self._tokens += tokens

    def rate(self) -> dict[str, float | None]:
        """tokens_per_s and mfu over the window, and peak_mem_gib (peak_memory_gib)."""
        now = time.perf_counter()
        tokens_per_s = self._tokens / max(now - self._start, 1e-9)
        self._start, self._tokens = now, 0
        mfu = None
        if self.peak_flops:
            mfu = self.flops_per_token * tokens_per_s / self.peak_flops
        return {"tokens_per_s": tokens_per_s, "mfu": mfu, "peak_mem_gib": peak_memory_gib()}


def peak_memory_gib() -> float | None:
    """The most CUDA memory this process's tensors held on its current device since the
    previous call (torch.cuda.max_memory_allocated, GiB; the peak is reset after reading);
    None when CUDA is not in use (CPU runs)."""
    if not torch.cuda.is_available() or not torch.cuda.is_initialized():
        return None
    peak = torch.cuda.max_memory_allocated() / 2**30
    torch.cuda.reset_peak_memory_stats()
    return peak


def _json_value(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)  # JSON has no NaN/inf literals
    return value


class MetricsLogger:
    """Writes rows to RUN/metrics.jsonl, and to TensorBoard and W&B when `cfg` asks."""

    def __init__(self, run_dir: Path, cfg: LogConfig, run_name: str, config_dict: dict):
        self.path = run_dir / "metrics.jsonl"
        self._file = open(self.path, "a")
        self._tb = None
        self._wandb = None
        if cfg.tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(log_dir=str(run_dir / "tb"))
        if cfg.wandb:
            self._wandb = _start_wandb(cfg, run_name, config_dict)

    def log(self, row: dict[str, Any]) -> None:
        row = {key: _json_value(value) for key, value in row.items()}
        self._file.write(json.dumps(row) + "\n")
        self._file.flush()
        step = row["step"]
        numbers = {k: v for k, v in row.items() if k != "step" and isinstance(v, (int, float))}
        if self._tb is not None:
            for key, value in numbers.items():
                self._tb.add_scalar(key, value, step)
        if self._wandb is not None:
            self._wandb.log(numbers, step=step)

    def close(self) -> None:
        self._file.close()
        if self._tb is not None:
            self._tb.close()
        if self._wandb is not None:
            self._wandb.finish()


def _start_wandb(cfg: LogConfig, run_name: str, config_dict: dict):
    try:
        import wandb
    except ImportError:
        raise ValueError("log.wandb=true but wandb is not installed: `pip install wandb` or set log.wandb=false")
    return wandb.init(project=cfg.wandb_project, name=run_name, config=config_dict, resume="allow")


class ProgressBar:
    """tqdm over optimizer steps: loss, tokens/s and MFU in the postfix; tqdm gives the ETA.

    `quiet` also drops the messages of `write` (ranks other than 0 of a parallel run)."""

    def __init__(self, total_steps: int, start_step: int, enabled: bool, quiet: bool = False):
        self._quiet = quiet
        self._bar = tqdm(
            total=total_steps, initial=start_step, disable=not enabled, unit="step", dynamic_ncols=True
        )

    def update(self) -> None:
        self._bar.update(1)

    def update_postfix(self, row: dict[str, Any]) -> None:
        mfu = row.get("mfu")
        self._bar.set_postfix(
            {
                "loss": f"{row['loss']:.4f}",
                "tok/s": f"{row['tokens_per_s']:.0f}",
                "mfu": "n/a" if mfu is None else f"{100 * mfu:.1f}%",
            }
        )

    def write(self, message: str) -> None:
        if not self._quiet:
            self._bar.write(message)

    def close(self) -> None:
        self._bar.close()


def read_metrics(run_dir: str | Path) -> list[dict[str, Any]]:
    """The rows of RUN/metrics.jsonl (train rows have "loss", validation rows "val_loss")."""
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        raise ValueError(f"{str(path)!r} does not exist; pass a run dir written by `braid train`")
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
