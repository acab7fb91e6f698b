"""Checkpoints at one layout resume at another on the same loss curve, and export.

Saved at tp2 (2 gloo processes) -> resumed in one process, and saved in one process ->
resumed at tp2: model, AdamW state, loader and counters carry over, so the 6-step loss
curve equals an uninterrupted single-process run (float64, rtol 1e-9, atol 1e-12: the
standard of tests/parallel). The model has MatFormer (strided TP shards, saved through the
checkpoint layout), MoE, GLA and attention layers. A dp2 (FSDP2) checkpoint resumes in one
process with the loader re-split (braid.train.distributed.resplit_loader_state).
`braid checkpoint export` of the tp2 checkpoint loads with `braid eval` in one process.
"""

from __future__ import annotations

import pytest
import torch

from braid.cli import main
from braid.parallel.testing import run_distributed
from braid.train import Trainer, load_trained
from braid.train.config import apply_overrides

from .conftest import tiny_config, train_losses

pytestmark = pytest.mark.distributed  # every test uses the 2-process launch of `runs`

TOL64 = dict(rtol=1e-9, atol=1e-12)
HALF, FULL = 3, 6
# A constant schedule: the lr of a step must not depend on train.steps, which the resume raises.
PARITY = ("train.dtype=float64", "schedule.kind=constant", "data.batch_size=2")


def _cfg(data_dir, out_dir, steps: int, *layout: str):
    return tiny_config(data_dir, out_dir, *PARITY, f"train.steps={steps}", *layout)


def _layouts_worker(rank, world_size, configs):
    return [Trainer(cfg).fit()["step"] for cfg in configs]


@pytest.fixture(scope="module")
def runs(data_dir, tmp_path_factory):
    """One 2-process launch (its start-up dominates): at tp2, the first half of one run and
    the second half of a run begun in one process; at dp2, the first half of another."""
    root = tmp_path_factory.mktemp("reshard")
    Trainer(_cfg(data_dir, root / "one_then_tp2", HALF)).fit()
    configs = [
        _cfg(data_dir, root / "tp2_then_one", HALF, "parallel.tp=2"),
        _cfg(data_dir, root / "one_then_tp2", FULL, "parallel.tp=2"),
        _cfg(data_dir, root / "dp2_then_one", HALF, "parallel.dp_shard=2"),
    ]
    assert run_distributed(_layouts_worker, 2, (configs,)) == [[HALF, FULL, HALF]] * 2
    return root


def _assert_same_curve(got: dict[int, float], expected: dict[int, float], name: str) -> None:
    assert sorted(got) == sorted(expected), name
    torch.testing.assert_close(
        torch.tensor([got[s] for s in sorted(got)]), torch.tensor([expected[s] for s in sorted(got)]),
        **TOL64, msg=lambda m: f"{name}: {m}",
    )


def test_tp2_to_one_process_and_one_process_to_tp2_continue_the_same_curve(runs, data_dir, tmp_path):
    Trainer(_cfg(data_dir, runs / "tp2_then_one", FULL)).fit()
    Trainer(_cfg(data_dir, tmp_path / "straight", FULL)).fit()

    expected = train_losses(tmp_path / "straight")
    assert sorted(expected) == list(range(1, FULL + 1))
    _assert_same_curve(train_losses(runs / "tp2_then_one"), expected, "tp2 -> one process")
    _assert_same_curve(train_losses(runs / "one_then_tp2"), expected, "one process -> tp2")


def test_export_of_a_tp2_checkpoint_loads_in_one_process_and_evaluates(runs, data_dir, tmp_path, capsys):
    tp2_checkpoint = runs / "tp2_then_one" / "ckpt" / f"step_{HALF:06d}"
    assert main(["checkpoint", "export", str(tp2_checkpoint), "--out", str(tmp_path / "export")]) == 0
    exported = load_trained(tmp_path / "export", device="cpu")
    from_checkpoint = load_trained(tp2_checkpoint, device="cpu")
    assert exported.step == HALF
    assert exported.cfg.parallel.tp == 1
    for name, value in from_checkpoint.model.state_dict().items():
        assert torch.equal(exported.model.state_dict()[name], value), name
    capsys.readouterr()
    assert main(["eval", str(tmp_path / "export"), "--data", str(data_dir), "--batches", "1"]) == 0
    assert "perplexity" in capsys.readouterr().out


def test_dp2_fsdp_checkpoint_resumes_in_one_process_with_the_loader_resplit(runs, data_dir):
    run_dir = runs / "dp2_then_one"
    trainer = Trainer(_cfg(data_dir, run_dir, FULL))
    assert trainer.state.step == HALF
    saved = trainer.loader.state_dict()
    assert (saved["rank"], saved["world_size"]) == (0, 1)
    assert saved["sources"][0]["position"] == 0 and saved["sources"][0]["epoch"] == 1
    summary = trainer.fit()
    assert summary["step"] == FULL and sorted(train_losses(run_dir)) == list(range(1, FULL + 1))
