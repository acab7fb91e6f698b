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

- DeepSpeed ZeRO-1 with pipeline stages, pp2 x dp2 (4 processes; gradient accumulation 2,
  2 pipeline microbatches, clipping at 0.5, float32; each rank's AdamW holds half its
  stage): 5 steps log the losses, gradient norms and validation loss of the single process
  on the same microbatches (the MoE aux statistics span the dp ranks, so a reference
  micro-batch is pipeline microbatch m of both ranks) within rtol 1e-5, atol 1e-6 (the
  DeepSpeed tolerance above) and end within the same one-ulp noise floor. The clip is
  active at every step, so DeepSpeed clips at the whole model's norm (measured: a
  per-stage norm fails the losses). Its step-2 checkpoint gives one process every parameter and AdamW
  moment of the files and continues there on the pp2 x dp2 loss curve (rtol 1e-5,
  atol 1e-6); a one-process checkpoint loads into pp2 x dp2 ZeRO-1 with every parameter and
  moment equal to the files. Interleaved pp2 (2 stages per rank in one engine) x tp2
  ZeRO-1 equals the single process likewise. pp > 1 with ZeRO-2/3 is refused before any
  model work, saying to set parallel.zero_stage=1.

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


PPDS_STEPS = 5
PPDS_BASE = ("train.dtype=float32", f"train.steps={PPDS_STEPS}", "optim.grad_accum=2", "optim.grad_clip=0.5", UNTIED)
# Each rank's micro-batch of 2 rows runs as 2 pipeline microbatches of 1 row. The MoE aux
# losses are statistics of each forward over the dp ranks (apply_global_aux_losses), so the
# reference accumulates 4 micro-batches of 2 rows: pipeline microbatch m of both dp ranks.
PPDS_RANK = (
    "data.batch_size=2", "eval.batches=2", "parallel.pp=2", "parallel.dp_shard=2",
    "parallel.zero_engine=deepspeed", "parallel.zero_stage=1",
)
PPDS_REFERENCE = ("data.batch_size=2", "optim.grad_accum=4", "eval.batches=2")
PPDS_GLOBAL = "data.batch_size=4"  # the global batch of the 2 dp ranks, as _MicrobatchLoader reads it


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


class _MicrobatchLoader(_StackedLoader):
    """The global pipeline microbatches of `num_ranks` data-parallel loaders: for each
    micro-batch, pipeline microbatch m of every rank (rows in rank order), m = 0..M-1."""

    def __init__(self, cfg, num_ranks: int, num_microbatches: int = 2):
        super().__init__(cfg, num_ranks)
        self.num_microbatches = num_microbatches

    def __iter__(self):
        for batches in zip(*self.loaders):
            splits = [{k: v.tensor_split(self.num_microbatches) for k, v in b.items()} for b in batches]
            for m in range(self.num_microbatches):
                yield {key: torch.cat([split[key][m] for split in splits]) for key in batches[0]}


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
    _perturb(trainer.model, init_noise)
    trainer.fit()
    return trainer


def _perturb(model, init_noise: float) -> None:
    """Scale every weight by (1 + init_noise * N(0, 1)), seeded: the noise-floor runs."""
    if not init_noise:
        return
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for param in model.parameters():
            param.mul_(1 + init_noise * torch.randn(param.shape, generator=gen, dtype=param.dtype))


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


def _ppds_worker(rank, world_size, fit_cfg, load_cfg):
    """Fit pp2 x dp2 ZeRO-1; then load a one-process checkpoint at that layout."""
    os.environ.setdefault("TORCH_EXTENSIONS_DIR", EXTENSIONS_CACHE)
    trainer = Trainer(fit_cfg)
    summary = trainer.fit()
    fitted = {"step": summary["step"], "state": _full_model_state(trainer)}
    # ZeRO-1: this rank's AdamW holds its dp share of its stage's parameters
    fitted["partition"] = sum(t.numel() for t in trainer.engine.engine.optimizer.single_partition_of_fp32_groups)
    fitted["stage_params"] = sum(p.numel() for part in trainer.engine.parts for p in part.parameters())
    del trainer
    loaded = Trainer(load_cfg)
    return {"fit": fitted, "load": {"state": _checkpoint_format(loaded), "val_loss": loaded.validate()["val_loss"]}}


def _reference_and_noise_floor(cfg, loader_cfg=None) -> tuple[Trainer, dict, float]:
    """The single process (on the pipeline microbatches of loader_cfg's global batch read by
    2 dp ranks, one per micro-batch; its own loader without one), its final state, and how
    far its parameters move when its initial weights move by one float32 ulp."""

    def run(out: str, init_noise: float) -> Trainer:
        trainer = Trainer(dataclasses.replace(cfg, out_dir=f"{cfg.out_dir}{out}"))
        if loader_cfg is not None:
            trainer.loader = _MicrobatchLoader(loader_cfg, 2)
        _perturb(trainer.model, init_noise)
        trainer.fit()
        return trainer

    reference, noisy = run("", 0.0), run("_noisy", 2.0**-23)
    state = reference.model.state_dict()
    return reference, state, _max_deviation({k: v.numpy() for k, v in noisy.model.state_dict().items()}, state)


def _merged_ranks(per_rank: list[dict]) -> dict[str, np.ndarray]:
    """The whole model from the ranks' full states: pipeline ranks hold disjoint stages,
    data- and tensor-parallel replicas of a stage equal weights."""
    merged: dict[str, np.ndarray] = {}
    for state in per_rank:
        for key, value in state.items():
            if key in merged and not key.endswith("tokens_per_expert"):  # a rank-local routing count
                np.testing.assert_array_equal(merged[key], value, err_msg=f"{key} differs between ranks")
            merged[key] = value
    return merged


@pytest.fixture(scope="module")
def ppds_runs(data_dir, root):
    """One 4-process launch: pp2 x dp2 DeepSpeed ZeRO-1 for 5 steps (checkpoints at 2, 4, 5),
    and a one-process step-2 checkpoint loaded at that layout."""
    Trainer(tiny_config(data_dir, root / "one_then_ppds", *PPDS_BASE, "checkpoint.every=2", "train.steps=2")).fit()
    fit_cfg = tiny_config(
        data_dir, root / "ppds", *PPDS_BASE, *PPDS_RANK, "checkpoint.every=2", "checkpoint.keep_last=3"
    )
    load_cfg = tiny_config(data_dir, root / "one_then_ppds", *PPDS_BASE, *PPDS_RANK, "train.steps=2")
    return run_distributed(_ppds_worker, 4, (fit_cfg, load_cfg))


@pytest.fixture(scope="module")
def ppds_reference(data_dir, root):
    cfg = tiny_config(data_dir, root / "ppds_reference", *PPDS_BASE, *PPDS_REFERENCE)
    return _reference_and_noise_floor(cfg, tiny_config(data_dir, root / "unused", *PPDS_BASE, PPDS_GLOBAL))


@pytest.mark.slow
def test_deepspeed_zero1_at_pp2_dp2_equals_single_process(ppds_runs, ppds_reference, root):
    reference, state, noise_floor = ppds_reference
    assert [r["fit"]["step"] for r in ppds_runs] == [PPDS_STEPS] * 4
    for rank in ppds_runs:  # optimizer states sharded over the 2 dp ranks (plus alignment padding)
        assert rank["fit"]["stage_params"] / 2 <= rank["fit"]["partition"] < rank["fit"]["stage_params"] / 2 + 16
    # dp replicas of a stage hold equal weights after ZeRO-1's all-gather (_merged_ranks checks)
    _assert_run_equals_reference(root / "ppds", [r["fit"]["state"] for r in ppds_runs], reference, state,
                                 noise_floor, "pp2 x dp2 ZeRO-1")


def _assert_run_equals_reference(run_dir, rank_states, reference, state, noise_floor, what: str) -> None:
    """Logged losses, gradient norms and validation within TOL32 of the one-process run, the
    clip active (optim.grad_clip=0.5), final parameters within the run-to-run noise floor."""
    for key in ("loss", "ce", "grad_norm", "val_loss"):
        _assert_same_rows(run_dir, reference.run_dir, key, TOL32, what)
    assert min(_rows(run_dir, "grad_norm").values()) > 0.5, "the clip at optim.grad_clip=0.5 is active"
    deviation = _max_deviation(_merged_ranks(rank_states), state)
    assert deviation <= noise_floor, f"params off by {deviation:.2e} > noise floor {noise_floor:.2e}"


@pytest.mark.slow
def test_deepspeed_zero1_interleaved_pp2_tp2_equals_single_process(data_dir, tmp_path):
    """Two stages per rank in one engine, TP on local shards (4 processes, dp 1)."""
    layout = (
        "model.pattern=S16E GF A- S16E", "parallel.pp=2", "parallel.pp_schedule=interleaved_1f1b",
        "parallel.pp_stages_per_rank=2", "parallel.pp_microbatches=2", "parallel.tp=2",
        "parallel.zero_engine=deepspeed", "parallel.zero_stage=1", "data.batch_size=2", "eval.batches=2",
    )
    cfg = tiny_config(data_dir, tmp_path / "pp2i_tp2", *PPDS_BASE, *layout)
    ranks = run_distributed(_fit_worker, 4, ({"pp2i_tp2": cfg},))
    assert [r["pp2i_tp2"]["step"] for r in ranks] == [PPDS_STEPS] * 4
    reference, state, noise_floor = _reference_and_noise_floor(tiny_config(
        data_dir, tmp_path / "reference", *PPDS_BASE, "model.pattern=S16E GF A- S16E",
        "data.batch_size=1", "optim.grad_accum=4", "eval.batches=4",
    ))
    _assert_run_equals_reference(tmp_path / "pp2i_tp2", [r["pp2i_tp2"]["state"] for r in ranks], reference, state,
                                 noise_floor, "interleaved pp2 x tp2 ZeRO-1")


@pytest.mark.slow
def test_pp2_zero1_checkpoint_resumes_in_one_process_and_a_one_process_checkpoint_loads_into_it(
    ppds_runs, data_dir, root, tmp_path
):
    saved, _ = _saved(latest_checkpoint(root / "one_then_ppds"), tmp_path)
    loaded = {}
    for rank in ppds_runs:  # what the ZeRO-1 partitions hold after loading, all stages together
        loaded.update(rank["load"]["state"])
    _assert_equal_arrays(loaded, saved, "one process -> pp2 x dp2 ZeRO-1")
    one = Trainer(tiny_config(data_dir, root / "one_then_ppds", *PPDS_BASE, *PPDS_REFERENCE, "train.steps=2"))
    val_loss = one.validate()["val_loss"]  # on the rows of the pp ranks' validation batches
    for rank in ppds_runs:
        torch.testing.assert_close(rank["load"]["val_loss"], val_loss, **TOL32)

    run_dir = tmp_path / "ppds_then_one"
    shutil.copytree(root / "ppds", run_dir)
    for checkpoint in sorted((run_dir / "ckpt").iterdir())[1:]:
        shutil.rmtree(checkpoint)  # resume from step 2 of 5
    saved, extra = _saved(latest_checkpoint(run_dir), tmp_path)
    assert any(k.endswith("exp_avg_sq") and np.abs(v).sum() > 0 for k, v in saved.items())
    one = Trainer(tiny_config(data_dir, run_dir, *PPDS_BASE, *PPDS_REFERENCE))
    assert one.state.step == 2
    _assert_equal_arrays(_checkpoint_format(one), saved, "pp2 x dp2 ZeRO-1 -> one process")
    one.loader = _MicrobatchLoader(tiny_config(data_dir, run_dir, *PPDS_BASE, PPDS_GLOBAL), 2)
    one.loader.load_states(extra["loaders"])
    one.fit()
    assert sorted(_rows(run_dir, "loss")) == list(range(1, PPDS_STEPS + 1))
    _assert_same_rows(run_dir, root / "ppds", "loss", TOL32, "pp2 x dp2 ZeRO-1 -> one process")


@pytest.mark.parametrize("stage", (2, 3))
def test_deepspeed_with_pp_refuses_zero2_and_zero3(stage, data_dir, tmp_path, monkeypatch):
    from braid.train.distributed import check_layout

    monkeypatch.setenv("WORLD_SIZE", "4")
    cfg = tiny_config(
        data_dir, tmp_path / "run", *PPDS_BASE, "parallel.pp=2", "parallel.zero_engine=deepspeed",
        f"parallel.zero_stage={stage}",
    )
    with pytest.raises(ValueError, match=f"parallel.pp=2 and parallel.zero_stage={stage}") as error:
        check_layout(cfg)
    assert "set parallel.zero_stage=1" in str(error.value) and "parallel.zero_engine=fsdp2" in str(error.value)
    assert check_layout(apply_overrides(cfg, ["parallel.zero_stage=1"])).pp == 2


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
    ds = apply_overrides(cfg, ["parallel.zero_engine=deepspeed", "parallel.zero_stage=2"])
    with pytest.raises(ValueError, match="set parallel.zero_stage=1"):
        check_layout(ds)
    with pytest.raises(ValueError, match="set train.dtype=float32"):
        check_layout(apply_overrides(ds, ["parallel.pp=1", "train.dtype=float64"]))
    with pytest.raises(ValueError, match="parallel.ep=1"):
        check_layout(apply_overrides(ds, ["parallel.pp=1", "parallel.ep=2", "parallel.dp_shard=2"]))
    assert check_layout(cfg).pp == 2
    assert dataclasses.replace(cfg.parallel, pp=1).pp == 1
