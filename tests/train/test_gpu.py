"""The CUDA path of the Trainer: bf16 autocast, fused AdamW, MFU from the device, DCP resume.

Runs on the device machine (`-m gpu`). The data comes from an in-memory stand-in for
PackedLoader, so no prepared shards (or mosaicml-streaming) are needed there.
"""

from __future__ import annotations

import itertools

import pytest
import torch

import braid.train.trainer as trainer_module
from braid.configs.train import train_config
from braid.train import Hook, Trainer, apply_overrides, latest_checkpoint

from .conftest import train_losses

pytestmark = pytest.mark.gpu

VOCAB, SEQ, BATCH = 256, 64, 4


class MemoryLoader:
    """A resumable stream of packed batches of a periodic token sequence (learnable)."""

    def __init__(self, seed: int = 0):
        self.position = seed

    def __iter__(self):
        while True:
            start = self.position * BATCH * SEQ
            tokens = (torch.arange(start, start + BATCH * (SEQ + 1)) * 7 % 97).view(BATCH, SEQ + 1)
            self.position += 1
            yield {
                "input_ids": tokens[:, :-1].clone(),
                "labels": tokens[:, 1:].clone(),
                "doc_ids": torch.zeros(BATCH, SEQ, dtype=torch.int32),
            }

    def state_dict(self) -> dict:
        return {"position": self.position}

    def load_state_dict(self, state: dict) -> None:
        self.position = state["position"]


@pytest.fixture(autouse=True)
def memory_data(monkeypatch):
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    monkeypatch.setattr(trainer_module, "check_data", lambda cfg: None)
    monkeypatch.setattr(trainer_module, "build_loader", lambda data, seed, layout=None: MemoryLoader())
    monkeypatch.setattr(
        trainer_module, "val_batches", lambda data, n, **kw: list(itertools.islice(iter(MemoryLoader(10_000)), n))
    )


def gpu_config(out_dir, *overrides: str):
    base = [
        f"model.vocab_size={VOCAB}", f"model.max_seq_len={SEQ}", f"data.seq_len={SEQ}",
        f"data.batch_size={BATCH}", "data.path=unused", f"out_dir={out_dir}", "train.device=cuda",
        "train.dtype=auto", "train.steps=30", "schedule.warmup_steps=3", "log.every=1",
        "log.progress=false", "eval.every=0", "eval.batches=2", "checkpoint.every=10",
    ]
    return apply_overrides(train_config("tiny-hybrid"), base + list(overrides))


def test_cuda_run_uses_bf16_fused_adamw_and_device_mfu(tmp_path):
    trainer = Trainer(gpu_config(tmp_path / "run"))
    assert trainer.device.type == "cuda" and isinstance(trainer.autocast, torch.autocast)
    assert all(group["fused"] for group in trainer.optimizer.param_groups)
    summary = trainer.fit()
    losses = train_losses(tmp_path / "run")
    assert losses[30] < losses[1] - 1.0, f"loss fell only from {losses[1]:.3f} to {losses[30]:.3f}"
    assert trainer.last_row["mfu"] is not None and 0 < trainer.last_row["mfu"] < 1
    assert summary["val_loss"] < losses[1]


class Killed(Exception):
    pass


def test_cuda_kill_and_resume_follows_the_same_trajectory(tmp_path):
    full = gpu_config(tmp_path / "full")
    Trainer(full).fit()

    def kill(trainer):
        raise Killed

    with pytest.raises(Killed):
        Trainer(gpu_config(tmp_path / "killed"), hooks=[Hook("kill", 15, kill)]).fit()
    assert latest_checkpoint(tmp_path / "killed").name == "step_000010"
    Trainer(gpu_config(tmp_path / "killed")).fit()
    expected, got = train_losses(tmp_path / "full"), train_losses(tmp_path / "killed")
    assert sorted(got) == list(range(1, 31))
    # bf16 autocast, and CUDA reductions (MoE scatter/index_add backward) are not bitwise
    # deterministic, so runs agree to bf16 rounding rather than exactly.
    for step in expected:
        assert got[step] == pytest.approx(expected[step], abs=2e-2), f"step {step}"
