"""The Trainer end to end: loss falls, exact resume, atomic checkpoints, NaN guard, signals."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

import braid.train.checkpoint as checkpoint_module
from braid.train import Hook, Trainer, TrainingStopped, latest_checkpoint, load_config_file, save_config, train
from braid.train.step import train_step

from .conftest import tiny_config, train_losses

REQUIRED_KEYS = {"step", "loss", "lr", "tokens", "tokens_per_s", "grad_norm", "mfu"}


class Killed(Exception):
    """Stands for the process dying: raised from a hook, so nothing after it runs."""


def kill_at(step: int) -> Hook:
    def fn(trainer):
        raise Killed(f"killed after step {trainer.state.step}")

    return Hook("kill", step, fn)


def test_tiny_run_loss_falls_and_writes_its_run_dir(trained_run, data_dir):
    from braid.data import unigram_baseline

    run_dir, summary = trained_run
    losses = train_losses(run_dir)
    assert sorted(losses) == list(range(1, 41))
    first, last = sum(losses[s] for s in range(1, 6)) / 5, sum(losses[s] for s in range(36, 41)) / 5
    assert last < first - 1.0, f"train loss fell only from {first:.3f} to {last:.3f} in 40 steps"
    assert summary["val_loss"] < unigram_baseline(data_dir), "40 steps should beat the unigram baseline here"
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert all(REQUIRED_KEYS <= row.keys() for row in rows if "loss" in row)
    val_rows = [row for row in rows if "val_loss" in row]
    assert [row["step"] for row in val_rows] == [20, 40]
    assert val_rows[-1]["val_ppl"] == pytest.approx(math.exp(val_rows[-1]["val_loss"]), rel=1e-9)
    assert latest_checkpoint(run_dir).name == "step_000040"
    assert load_config_file(run_dir / "config.yaml").train.steps == 40
    assert list((run_dir / "tb").glob("events.out.tfevents.*")), "log.tensorboard=true writes events"


def test_mixture_of_sources_trains(data_dir, tmp_path):
    mixture = f"data.mixture=[{{path: {data_dir}, weight: 3}}, {{path: {data_dir}, weight: 1}}]"
    summary = train(tiny_config(data_dir, tmp_path / "run", "data.path=", mixture, "train.steps=2"))
    assert summary["step"] == 2 and math.isfinite(summary["loss"])


def test_kill_and_resume_equals_uninterrupted_run(data_dir, tmp_path):
    args = ("train.steps=8", "checkpoint.every=3", "optim.grad_accum=2")
    full = train(tiny_config(data_dir, tmp_path / "full", *args))
    with pytest.raises(Killed):
        train(tiny_config(data_dir, tmp_path / "killed", *args), hooks=[kill_at(5)])
    assert latest_checkpoint(tmp_path / "killed").name == "step_000003"
    resumed = Trainer(tiny_config(data_dir, tmp_path / "killed", *args))
    assert resumed.state.step == 3
    summary = resumed.fit()
    expected, got = train_losses(tmp_path / "full"), train_losses(tmp_path / "killed")
    assert sorted(got) == list(range(1, 9)), "the resumed run must rewrite steps 4-5 once, not twice"
    for step in expected:  # fp32 on CPU: the same ops in the same order, so equal to rounding
        assert got[step] == pytest.approx(expected[step], abs=1e-6), f"step {step}"
    assert summary["tokens"] == full["tokens"]
    full_model = Trainer(tiny_config(data_dir, tmp_path / "full", *args)).model
    for (name, a), b in zip(full_model.state_dict().items(), resumed.model.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6, msg=f"{name} differs after resume")


def test_crash_while_saving_leaves_previous_checkpoint_in_use(data_dir, tmp_path, monkeypatch):
    real_save = checkpoint_module.dcp.save
    calls = []

    def crashing_save(state, checkpoint_id):
        calls.append(checkpoint_id)
        real_save(state, checkpoint_id=checkpoint_id)
        if len(calls) == 2:  # the second checkpoint dies after its data, before COMPLETE
            raise OSError("disk full")

    monkeypatch.setattr(checkpoint_module.dcp, "save", crashing_save)
    cfg = tiny_config(data_dir, tmp_path / "run", "train.steps=6", "checkpoint.every=2")
    with pytest.raises(OSError, match="disk full"):
        train(cfg)
    ckpt = tmp_path / "run" / "ckpt"
    assert (ckpt / "step_000004.tmp").is_dir() and not (ckpt / "step_000004").exists()
    (ckpt / "step_000009").mkdir()  # no COMPLETE marker: never taken as a checkpoint
    (ckpt / "step_000010.tmp").mkdir()
    (ckpt / "step_000010.tmp" / "COMPLETE").write_text("{}")
    assert latest_checkpoint(tmp_path / "run").name == "step_000002"
    monkeypatch.setattr(checkpoint_module.dcp, "save", real_save)
    trainer = Trainer(cfg)
    assert trainer.resumed_from.name == "step_000002" and trainer.state.step == 2
    trainer.fit()
    assert latest_checkpoint(tmp_path / "run").name == "step_000006"
    assert not list(ckpt.glob("*.tmp")), "stale .tmp dirs are removed after the next good save"


def poison_logits(model, is_on) -> None:
    """Forward hook: NaN logits while `is_on()`."""

    def hook(module, inputs, output):
        if not is_on():
            return output
        logits, aux = output
        return logits * float("nan"), aux

    model.register_forward_hook(hook)


def test_non_finite_step_skips_the_update(data_dir, tmp_path):
    trainer = Trainer(tiny_config(data_dir, tmp_path / "run"))
    batch = next(iter(trainer.loader))
    before = {name: p.detach().clone() for name, p in trainer.model.named_parameters()}
    poison_logits(trainer.model, lambda: True)
    out = train_step(trainer.model, trainer.optimizer, [batch], 1e-3, 1.0, trainer.autocast)
    assert not out.updated and math.isnan(out.loss)
    for name, p in trainer.model.named_parameters():
        assert torch.equal(p, before[name]), f"{name} changed on a skipped step"
        assert p.grad is None
    assert not trainer.optimizer.state, "a skipped step must not touch the optimizer state"


def test_nan_guard_stops_after_consecutive_skips(data_dir, tmp_path):
    cfg = tiny_config(data_dir, tmp_path / "run", "train.steps=20", "nan_guard.max_consecutive=3")
    trainer = Trainer(cfg)
    poison_logits(trainer.model, lambda: trainer.state.step in (2, 5, 6, 7, 8, 9))
    with pytest.raises(TrainingStopped) as info:
        trainer.fit()
    message = str(info.value)
    assert "stopped at step 8" in message and "3 consecutive steps (4 skipped in all" in message
    assert "optim.lr" in message, "the message must say what to try"
    assert trainer.nan_guard.total == 4


def test_sigterm_checkpoints_and_exits_cleanly(data_dir, tmp_path):
    config = tmp_path / "run.yaml"
    save_config(tiny_config(data_dir, tmp_path / "run", "train.steps=100000"), config)
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "braid.cli", "train", str(config)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
    )
    metrics = tmp_path / "run" / "metrics.jsonl"
    deadline = time.time() + 60
    while not (metrics.is_file() and metrics.read_text().count("\n") >= 2):
        assert proc.poll() is None, proc.communicate()
        assert time.time() < deadline, "training did not start within 60 s"
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    assert "stopped by SIGTERM" in out
    saved = latest_checkpoint(tmp_path / "run")
    last_logged = max(train_losses(tmp_path / "run"))
    assert saved.name == f"step_{last_logged:06d}", "the checkpoint must be of the last finished step"
    resumed = Trainer(tiny_config(data_dir, tmp_path / "run", f"train.steps={last_logged + 1}"))
    assert resumed.state.step == last_logged
