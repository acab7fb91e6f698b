"""`braid train` with pipeline stages and with DeepSpeed ZeRO equals one process, and its
checkpoints load at other layouts.

- pp2 with 1F1B and with interleaved 1F1B (2 stages per rank), pp2 x tp2 (4 processes):
  losses, validation losses, gradient norms and final parameters equal the single-process
  trainer in float64 within rtol 1e-9, atol 1e-12 (the standard of tests/parallel). Each
  pipeline step splits a micro-batch of 2 rows into 2 pipeline microbatches, so the
  reference accumulates 4 micro-batches of 1 row (the MoE load-balancing loss is a
  per-forward statistic: only the same microbatches define the same objective; the loader
  packs rows as one stream, so the rows are the same).
- DeepSpeed ZeRO-1, 2 and 3 at dp2 (gradient accumulation 2, clipping at 0.5): DeepSpeed
  reduces float32 and bfloat16 only, so these run in float32. Losses and gradient norms
  within rtol 1e-5, atol 1e-6 of the single process on the stacked global batch (as
  tests/parallel/test_deepspeed.py); final parameters no further from it than the single
  process moves when its initial weights move by one float32 ulp (the noise floor of
  test_deepspeed.py: Adam's division by the gradient RMS amplifies reordered sums).
- Resharding: 2 steps at tp2 x dp2 (FSDP2), 2 more at pp2 x dp2 from its checkpoint, 2 more
  in one process (reading the two saved loader states as one global batch): the 6 losses
  and the final parameters equal an uninterrupted single-process run on the same global
  batches (float64, rtol 1e-9, atol 1e-12; MoE aux coefficients 0, since the pipeline's
  microbatches would change their per-forward statistic). A one-process checkpoint loads
  into DeepSpeed ZeRO-3 at dp2 and a DeepSpeed ZeRO-2 checkpoint into one process with
  every parameter and AdamW moment equal to the files; the ZeRO-2 run then continues in one
  process on its own loss curve (rtol 1e-5, atol 1e-6).

Marked slow (over ~40 s on 2 busy cores): the DeepSpeed launches (DeepSpeed's start-up),
the 4-process pp2 x tp2 run and the resharding chain.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil

import numpy as np
import pytest
import torch
from torch.distributed.tensor import DTensor

from braid.parallel import to_checkpoint_layout
from braid.parallel.deepspeed import EXTENSIONS_CACHE
from braid.parallel.testing import run_distributed
from braid.train import Trainer
from braid.train.checkpoint import latest_checkpoint
from braid.train.config import apply_overrides

from .conftest import tiny_config

pytestmark = pytest.mark.distributed

STEPS = 4
TOL64 = dict(rtol=1e-9, atol=1e-12)
TOL32 = dict(rtol=1e-5, atol=1e-6)
UNTIED = "model.tie_embeddings=false"  # a pipeline puts the embedding and the head on different stages
PP_BASE = ("train.dtype=float64", f"train.steps={STEPS}", "model.pattern=S16E GF A- S16E", "eval.every=2", UNTIED)
PP_RANK = ("data.batch_size=2", "optim.grad_accum=2", "eval.batches=2")
PP_REFERENCE = ("data.batch_size=1", "optim.grad_accum=4", "eval.batches=4")
PP_LAYOUTS = {
    "pp2_1f1b": ("parallel.pp=2",),
    "pp2_interleaved": (
        "parallel.pp=2", "parallel.pp_schedule=interleaved_1f1b", "parallel.pp_stages_per_rank=2",
        "parallel.pp_microbatches=2",
    ),
}
DS_BASE = ("train.dtype=float32", f"train.steps={STEPS}", "optim.grad_accum=2", "optim.grad_clip=0.5")
DS_STAGES = (1, 2, 3)
NO_AUX = ("model.moe.load_balance_coef=0", "model.moe.z_loss_coef=0")
RESHARD = ("train.dtype=float64", "schedule.kind=constant", "data.batch_size=2", "checkpoint.every=2", UNTIED, *NO_AUX)


class _StackedLoader:
    """The global batch of `num_ranks` data-parallel loaders, rows in rank order; it can
    continue from the per-rank loader states of a dp checkpoint."""

    def __init__(self, cfg, num_ranks: int):
        from braid.data import PackedLoader

        self.loaders = [
            PackedLoader(
                cfg.data.loader_sources(), split="train", seq_len=cfg.data.seq_len,
                batch_size=cfg.data.batch_size // num_ranks, seed=cfg.train.seed, rank=rank, world_size=num_ranks,
            )
            for rank in range(num_ranks)
        ]

    def load_states(self, states: list[dict]) -> None:
        for loader, state in zip(self.loaders, states, strict=True):
            loader.load_state_dict(state)

    def __iter__(self):
        for batches in zip(*self.loaders):
            yield {key: torch.cat([b[key] for b in batches]) for key in batches[0]}

    def state_dict(self) -> dict:
        return {}


def _rows(run_dir, key: str) -> dict[int, float]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {row["step"]: row[key] for row in rows if key in row}


def _full_model_state(trainer) -> dict[str, np.ndarray]:
    """This rank's parameters and buffers as single-process tensors (collective)."""
    state = to_checkpoint_layout(trainer.train_state.state_dict()["model"])
    full = {k: v.full_tensor() if isinstance(v, DTensor) else v for k, v in state.items()}
    return {k: v.detach().cpu().numpy().copy() for k, v in full.items()}


def _fit_worker(rank, world_size, configs):
    os.environ.setdefault("TORCH_EXTENSIONS_DIR", EXTENSIONS_CACHE)
    results = {}
    for name, cfg in configs.items():
        trainer = Trainer(cfg)
        summary = trainer.fit()
        results[name] = {"step": summary["step"], "state": _full_model_state(trainer)}
    return results


def _single_process(cfg, dp_size: int = 1, init_noise: float = 0.0) -> Trainer:
    trainer = Trainer(cfg)
    if dp_size > 1:
        trainer.loader = _StackedLoader(cfg, dp_size)
    if init_noise:
        gen = torch.Generator().manual_seed(0)
        with torch.no_grad():
            for param in trainer.model.parameters():
                param.mul_(1 + init_noise * torch.randn(param.shape, generator=gen, dtype=param.dtype))
    trainer.fit()
    return trainer


def _assert_same_rows(got_dir, expected_dir, key: str, tol: dict, name: str) -> None:
    got, expected = _rows(got_dir, key), _rows(expected_dir, key)
    assert sorted(got) == sorted(expected) and got, f"{name}: {key} at steps {sorted(got)} vs {sorted(expected)}"
    steps = sorted(got)
    torch.testing.assert_close(
        torch.tensor([got[s] for s in steps], dtype=torch.float64),
        torch.tensor([expected[s] for s in steps], dtype=torch.float64),
        **tol, msg=lambda m: f"{name} {key}: {m}",
    )


def _merged_state(per_rank: list[dict], name: str) -> dict[str, np.ndarray]:
    """The whole model from the ranks' parts (pipeline ranks hold disjoint stages)."""
    merged: dict[str, np.ndarray] = {}
    for result in per_rank:
        for key, value in result[name]["state"].items():
            if key in merged:
                np.testing.assert_array_equal(merged[key], value, err_msg=f"{name}: {key} differs between ranks")
            merged[key] = value
    return merged


def _assert_same_params(state: dict, reference: dict, name: str, skip: str | None = None) -> None:
    assert state.keys() == reference.keys(), name
    for key, value in reference.items():
        if skip is not None and key.endswith(skip):
            continue
        torch.testing.assert_close(
            torch.from_numpy(state[key]), value, **TOL64, msg=lambda m, k=key: f"{name} {k}: {m}"
        )


@pytest.fixture(scope="module", autouse=True)
def cached_extensions():
    """DeepSpeed compiles its CPU shared-memory op on first init (about a minute): cache it."""
    os.environ.setdefault("TORCH_EXTENSIONS_DIR", EXTENSIONS_CACHE)


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return tmp_path_factory.mktemp("pp_ds")


@pytest.fixture(scope="module")
def pp_runs(data_dir, root):
    """One 2-process launch (its start-up dominates): pp2 with 1F1B and interleaved 1F1B."""
    configs = {
        name: tiny_config(data_dir, root / name, *PP_BASE, *PP_RANK, *layout) for name, layout in PP_LAYOUTS.items()
    }
    return run_distributed(_fit_worker, 2, (configs,))


@pytest.fixture(scope="module")
def ds_runs(data_dir, root):
    """One 2-process launch of DeepSpeed ZeRO-1/2/3 at dp2, and one loading a one-process
    checkpoint into ZeRO-3."""
    Trainer(tiny_config(data_dir, root / "one_then_ds3", *DS_BASE, "checkpoint.every=2", "train.steps=2")).fit()
    configs = {
        f"ds{stage}": tiny_config(
            data_dir, root / f"ds{stage}", *DS_BASE, "parallel.dp_shard=2", "parallel.zero_engine=deepspeed",
            f"parallel.zero_stage={stage}", "checkpoint.every=2", "checkpoint.keep_last=3",
        )
        for stage in DS_STAGES
    }
    ranks = run_distributed(_fit_worker, 2, (configs,))
    loaded = run_distributed(_load_worker, 2, (tiny_config(
        data_dir, root / "one_then_ds3", *DS_BASE, "parallel.dp_shard=2", "parallel.zero_engine=deepspeed",
        "parallel.zero_stage=3",
    ),))
    return ranks, loaded


def _load_worker(rank, world_size, cfg):
    """A trainer resumed from the run dir's checkpoint: its state and its validation loss."""
    os.environ.setdefault("TORCH_EXTENSIONS_DIR", EXTENSIONS_CACHE)
    trainer = Trainer(cfg)
    return {"state": _checkpoint_format(trainer), "val_loss": trainer.validate()["val_loss"]}


def _checkpoint_format(trainer) -> dict[str, np.ndarray]:
    """The trainer's model and AdamW state as flat single-process arrays (collective)."""
    state = to_checkpoint_layout(trainer.train_state.state_dict())
    return _flat_arrays(state)


def _flat_arrays(state: dict) -> dict[str, np.ndarray]:
    flat = {f"model.{k}": v for k, v in state["model"].items()}
    flat.update({f"optim.{k}": v for k, v in state["optim"].items() if k.startswith("state.")})
    flat = {k: v.full_tensor() if isinstance(v, DTensor) else v for k, v in flat.items()}
    return {k: np.asarray(v.detach().cpu().numpy(), dtype=np.float64).copy() for k, v in flat.items()}


def _saved(checkpoint, tmp_path) -> tuple[dict[str, np.ndarray], dict]:
    """The arrays of a checkpoint as written (read back without any model), and its extra."""
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    from braid.train.checkpoint import _unpack

    dcp_to_torch_save(checkpoint, tmp_path / "saved.pt")
    state = torch.load(tmp_path / "saved.pt", weights_only=False)
    return _flat_arrays(state), _unpack(state["extra"])


def _assert_equal_arrays(got: dict, expected: dict, name: str) -> None:
    assert got.keys() == expected.keys(), name
    for key, value in expected.items():
        np.testing.assert_array_equal(got[key], value, err_msg=f"{name}: {key}")


@pytest.fixture(scope="module")
def pp_reference(data_dir, root):
    return _single_process(tiny_config(data_dir, root / "pp_reference", *PP_BASE, *PP_REFERENCE))


@pytest.mark.parametrize("name", PP_LAYOUTS)
def test_pp2_trainer_equals_single_process(name, pp_runs, pp_reference, root):
    ranks = pp_runs
    assert [r[name]["step"] for r in ranks] == [STEPS, STEPS]
    for key in ("loss", "ce", "grad_norm", "val_loss"):
        _assert_same_rows(root / name, pp_reference.run_dir, key, TOL64, name)
    reference = {k: v for k, v in pp_reference.model.state_dict().items()}
    _assert_same_params(_merged_state(ranks, name), reference, name)


def _max_deviation(state: dict, reference: dict) -> float:
    assert state.keys() == reference.keys()
    return max(
        (torch.from_numpy(state[k]).double() - v.double()).abs().max().item()
        for k, v in reference.items()
        if not k.endswith("tokens_per_expert")  # zeroed by every bias update
    )


@pytest.fixture(scope="module")
def ds_reference(data_dir, root):
    def run(out: str, init_noise: float) -> Trainer:
        cfg = tiny_config(data_dir, root / out, *DS_BASE, "data.batch_size=8")
        return _single_process(cfg, dp_size=2, init_noise=init_noise)

    reference, noisy = run("ds_reference", 0.0), run("ds_noisy", 2.0**-23)
    state = reference.model.state_dict()
    noise_floor = _max_deviation({k: v.numpy() for k, v in noisy.model.state_dict().items()}, state)
    return reference, state, noise_floor


@pytest.mark.slow
@pytest.mark.parametrize("stage", DS_STAGES)
def test_deepspeed_zero_at_dp2_equals_single_process(stage, ds_runs, ds_reference, root):
    ranks, _ = ds_runs
    name = f"ds{stage}"
    reference, state, noise_floor = ds_reference
    assert [r[name]["step"] for r in ranks] == [STEPS, STEPS]
    for key in ("loss", "ce", "grad_norm"):
        _assert_same_rows(root / name, reference.run_dir, key, TOL32, name)
    assert min(_rows(root / name, "grad_norm").values()) > 0.5, "the clip at optim.grad_clip=0.5 is active"
    for rank in ranks:
        deviation = _max_deviation(rank[name]["state"], state)
        assert deviation <= noise_floor, f"{name}: params off by {deviation:.2e} > noise floor {noise_floor:.2e}"


@pytest.mark.slow
def test_one_process_checkpoint_loads_into_zero3_and_a_zero2_checkpoint_into_one_process(
    ds_runs, data_dir, root, tmp_path
):
    _, loaded = ds_runs
    saved, _ = _saved(latest_checkpoint(root / "one_then_ds3"), tmp_path)
    assert any(k.endswith("exp_avg_sq") and np.abs(v).sum() > 0 for k, v in saved.items())
    one = Trainer(tiny_config(data_dir, root / "one_then_ds3", *DS_BASE, "train.steps=2"))
    val_loss = one.validate()["val_loss"]
    for rank in loaded:  # what DeepSpeed holds in its partitions, and computes with
        _assert_equal_arrays(rank["state"], saved, "one process -> ZeRO-3")
        torch.testing.assert_close(rank["val_loss"], val_loss, **TOL32)

    run_dir = tmp_path / "ds2_then_one"
    shutil.copytree(root / "ds2", run_dir)
    shutil.rmtree(latest_checkpoint(run_dir))  # resume from step 2 of 4
    saved, extra = _saved(latest_checkpoint(run_dir), tmp_path)
    cfg = tiny_config(data_dir, run_dir, *DS_BASE, "data.batch_size=8")
    one = Trainer(cfg)
    assert one.state.step == 2
    _assert_equal_arrays(_checkpoint_format(one), saved, "ZeRO-2 -> one process")
    one.loader = _StackedLoader(cfg, 2)
    one.loader.load_states(extra["loaders"])
    one.fit()
    _assert_same_rows(run_dir, root / "ds2", "loss", TOL32, "ZeRO-2 -> one process")


def _reshard_worker(rank, world_size, configs):
    return [Trainer(cfg).fit()["step"] for cfg in configs]


@pytest.mark.slow
def test_tp2_dp2_checkpoint_resumes_at_pp2_dp2_then_in_one_process_on_the_same_curve(data_dir, tmp_path):
    run_dir = tmp_path / "reshard"
    configs = [
        tiny_config(data_dir, run_dir, *RESHARD, "train.steps=2", "parallel.tp=2", "parallel.dp_shard=2"),
        tiny_config(data_dir, run_dir, *RESHARD, "train.steps=4", "parallel.pp=2", "parallel.dp_shard=2"),
    ]
    assert run_distributed(_reshard_worker, 4, (configs,)) == [[2, 4]] * 4

    one = Trainer(tiny_config(data_dir, run_dir, *RESHARD, "train.steps=6", "data.batch_size=4"))
    assert one.state.step == 4
    one.loader = _StackedLoader(one.cfg, 2)
    one.loader.load_states(_saved(latest_checkpoint(run_dir), tmp_path)[1]["loaders"])
    one.fit()

    straight = tiny_config(data_dir, tmp_path / "straight", *RESHARD, "train.steps=6", "data.batch_size=4")
    reference = _single_process(straight, dp_size=2)
    assert sorted(_rows(run_dir, "loss")) == list(range(1, 7))
    _assert_same_rows(run_dir, reference.run_dir, "loss", TOL64, "tp2xdp2 -> pp2xdp2 -> one process")
    # tokens_per_expert: without bias balancing a rank-local routing count, not trained state
    state = {k: v.numpy() for k, v in one.model.state_dict().items()}
    _assert_same_params(state, reference.model.state_dict(), "resharded", skip="tokens_per_expert")


@pytest.mark.slow
def test_pp2_tp2_trainer_equals_single_process(data_dir, tmp_path, pp_reference):
    cfg = tiny_config(data_dir, tmp_path / "pp2_tp2", *PP_BASE, *PP_RANK, "parallel.pp=2", "parallel.tp=2")
    ranks = run_distributed(_fit_worker, 4, ({"pp2_tp2": cfg},))
    assert [r["pp2_tp2"]["step"] for r in ranks] == [STEPS] * 4
    for key in ("loss", "ce", "grad_norm", "val_loss"):
        _assert_same_rows(tmp_path / "pp2_tp2", pp_reference.run_dir, key, TOL64, "pp2 x tp2")
    _assert_same_params(_merged_state(ranks, "pp2_tp2"), pp_reference.model.state_dict(), "pp2 x tp2")


def test_trainer_layout_errors_say_what_to_change(data_dir, tmp_path, monkeypatch):
    from braid.train.distributed import check_layout

    cfg = tiny_config(data_dir, tmp_path / "run", "parallel.pp=2")
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ValueError, match="set tie_embeddings=False"):
        check_layout(cfg)
    cfg = apply_overrides(cfg, [UNTIED])
    with pytest.raises(ValueError, match="pp_cut_points"):
        check_layout(apply_overrides(cfg, ["parallel.pp_cut_points=[3]"]))
    with pytest.raises(ValueError, match="log.sample_every=0"):
        check_layout(apply_overrides(cfg, ["log.sample_every=5"]))
    ds = apply_overrides(cfg, ["parallel.zero_engine=deepspeed", "parallel.zero_stage=1"])
    with pytest.raises(ValueError, match="set parallel.zero_engine=fsdp2 to pipeline, or parallel.pp=1"):
        check_layout(ds)
    with pytest.raises(ValueError, match="set train.dtype=float32"):
        check_layout(apply_overrides(ds, ["parallel.pp=1", "train.dtype=float64"]))
    with pytest.raises(ValueError, match="parallel.ep=1"):
        check_layout(apply_overrides(ds, ["parallel.pp=1", "parallel.ep=2", "parallel.dp_shard=2"]))
    assert check_layout(cfg).pp == 2
    assert dataclasses.replace(cfg.parallel, pp=1).pp == 1
