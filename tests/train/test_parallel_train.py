"""`braid train` at a parallel layout equals one process: the Trainer under tp2, dp2 (FSDP2,
ZeRO-3) and ep2 (experts split over the 2 data-parallel ranks, FSDP2) on 2 gloo processes
logs the single-process loss trajectory on the same global batches (with gradient
accumulation and gradient clipping over DTensors of several meshes).

Parity runs in float64 (train.dtype=float64) within rtol 1e-9, atol 1e-12, the standard of
tests/parallel (docs/parallel.md: in float32 Adam's division by the gradient RMS amplifies
the rounding of reordered sums to ~1e-4 in a few steps). The dp2 reference is one process
reading as two data-parallel ranks (data.read_as_dp=2: rank 0's rows, then rank 1's).
"""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from braid.parallel.testing import run_distributed
from braid.train import Trainer
from braid.train.config import apply_overrides
from braid.train.distributed import check_layout, resplit_loader_state

from .conftest import tiny_config, train_losses

STEPS = 4
TOL64 = dict(rtol=1e-9, atol=1e-12)
PARITY = ("train.dtype=float64", f"train.steps={STEPS}", "data.batch_size=2", "optim.grad_accum=2")


def _single_process_losses(cfg) -> dict[int, float]:
    trainer = Trainer(cfg)
    trainer.fit()
    return train_losses(trainer.run_dir)


def _grad_norms(run_dir) -> list[float]:
    """Pre-clipping gradient norms by step (most exceed optim.grad_clip=1: clipping is active)."""
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [row["grad_norm"] for row in rows if "grad_norm" in row]


def _layouts_worker(rank, world_size, configs):
    summaries = {name: Trainer(cfg).fit() for name, cfg in configs.items()}
    return {name: summary["step"] for name, summary in summaries.items()}


@pytest.mark.distributed
def test_tp2_dp2_fsdp_and_ep2_trainers_equal_single_process(data_dir, tmp_path):
    base = tiny_config(data_dir, tmp_path / "unused", *PARITY)
    configs = {
        "tp2": apply_overrides(base, [f"out_dir={tmp_path / 'tp2'}", "parallel.tp=2"]),
        "dp2": apply_overrides(base, [f"out_dir={tmp_path / 'dp2'}", "parallel.dp_shard=2"]),
        "ep2": apply_overrides(base, [f"out_dir={tmp_path / 'ep2'}", "parallel.dp_shard=2", "parallel.ep=2"]),
    }
    steps = run_distributed(_layouts_worker, 2, (configs,))
    assert steps == [{"tp2": STEPS, "dp2": STEPS, "ep2": STEPS}] * 2

    single = _single_process_losses(dataclasses.replace(base, out_dir=str(tmp_path / "one")))
    stacked_cfg = apply_overrides(base, [f"out_dir={tmp_path / 'one_dp2'}", "data.batch_size=4", "data.read_as_dp=2"])
    stacked = _single_process_losses(stacked_cfg)
    assert sorted(single) == list(range(1, STEPS + 1))
    for name, expected in (("tp2", single), ("dp2", stacked), ("ep2", stacked)):
        got = train_losses(tmp_path / name)
        assert sorted(got) == sorted(expected), name
        torch.testing.assert_close(
            torch.tensor([got[s] for s in sorted(got)]), torch.tensor([expected[s] for s in sorted(got)]),
            **TOL64, msg=lambda m, n=name: f"{n}: {m}",
        )
        reference_dir = tmp_path / ("one" if name == "tp2" else "one_dp2")
        torch.testing.assert_close(
            torch.tensor(_grad_norms(tmp_path / name)), torch.tensor(_grad_norms(reference_dir)), **TOL64
        )
    rows = [json.loads(line) for line in (tmp_path / "dp2" / "metrics.jsonl").read_text().splitlines()]
    assert rows[0]["tokens"] == 2 * 2 * 2 * base.data.seq_len, "tokens count the global batch (dp * accum * B * T)"


def test_parallel_overrides_and_layout_validation(data_dir, tmp_path, monkeypatch):
    cfg = tiny_config(data_dir, tmp_path / "run", "parallel.tp=2", "parallel.sequence_parallel=false")
    assert cfg.parallel.tp == 2 and cfg.parallel.sequence_parallel is False
    monkeypatch.setenv("WORLD_SIZE", "3")
    with pytest.raises(ValueError, match="world size 3 is not divisible"):
        check_layout(cfg)
    with pytest.raises(ValueError, match="set tie_embeddings=False to pipeline"):
        check_layout(apply_overrides(cfg, ["parallel.tp=1", "parallel.pp=3"]))
    with pytest.raises(ValueError, match="unknown key 'tq'"):
        apply_overrides(cfg, ["parallel.tq=2"])
    with pytest.raises(ValueError, match="log.sample_every=0"):
        check_layout(apply_overrides(cfg, ["log.sample_every=5"]))
    monkeypatch.setenv("WORLD_SIZE", "1")
    assert check_layout(apply_overrides(cfg, ["parallel.tp=1"])).world_size == 1


def test_loader_resplit_keeps_same_size_and_restarts_the_next_epoch_otherwise():
    def state(rank, world, epoch, position, taken):
        sources = [{"name": "d", "num_documents": 10, "proportion": 1.0, "epoch": epoch, "position": position,
                    "tokens_taken": taken}]
        return {"format": 1, "split": "train", "seed": 0, "rank": rank, "world_size": world, "sources": sources,
                "tail": [1, 2]}

    old = [state(0, 2, 3, 4, 100), state(1, 2, 2, 5, 90)]
    assert resplit_loader_state(old, 1, 2) is old[1]
    new = resplit_loader_state(old, 2, 3)
    assert (new["rank"], new["world_size"], new["tail"]) == (2, 3, [])
    assert new["sources"][0] | {} == {**old[0]["sources"][0], "epoch": 4, "position": 0, "tokens_taken": 190}


def test_read_as_dp_checkpoints_the_shards_of_the_larger_run(data_dir, tmp_path):
    """One process reading as dp2 saves the two shards' loader states a dp2 run would save,
    and resumes them exactly: 2 + 2 steps equal 4 uninterrupted steps."""
    cfg = tiny_config(data_dir, tmp_path / "whole", "train.steps=4", "data.batch_size=4", "data.read_as_dp=2")
    whole = _single_process_losses(cfg)
    part = apply_overrides(cfg, [f"out_dir={tmp_path / 'parts'}", "train.steps=2", "checkpoint.every=2"])
    Trainer(part).fit()
    resumed = Trainer(apply_overrides(part, ["train.steps=4"]))
    states = resumed.loader.state_dict()
    assert [s["rank"] for s in states] == [0, 1] and {s["world_size"] for s in states} == {2}
    resumed.fit()
    got = train_losses(tmp_path / "parts")
    assert sorted(got) == [1, 2, 3, 4]
    torch.testing.assert_close(torch.tensor([got[s] for s in range(1, 5)]), torch.tensor([whole[s] for s in range(1, 5)]))
    with pytest.raises(ValueError, match="read_as_dp=3 must be a multiple"):
        Trainer(apply_overrides(cfg, [f"out_dir={tmp_path / 'bad'}", "data.read_as_dp=3"]))
