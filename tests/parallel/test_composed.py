"""Expert parallelism composed with tensor, pipeline and data parallelism, each layout trained
through braid.parallel and compared with one process on the same global batches:

- 8 processes: pp2 x dp_shard2 x tp2 with ep2 on the MoE layers (the ep group is the TP
  group), ZeRO-3, 1F1B with 2 microbatches per data-parallel rank;
- 4 processes: tp2 x dp_shard2 with ep2 (the TP group) and with ep4 (TP x data-parallel).

5 AdamW steps on a model with every mixer and FFN kind (tests/helpers.py small_model_config,
MoE in two layers so that both pipeline stages have one) with aux-loss-free MoE balancing
on and MatFormer widths changing per step: the per-step losses
(averaged over the data-parallel ranks) and the final parameters and expert biases (gathered
to full tensors) equal the single-process run.

Tolerance: float64, rtol 1e-9 / atol 1e-12, as tests/parallel/test_pipeline.py and
test_tp.py. Not float32: AdamW divides each gradient element by its own RMS, so where an
element is mostly rounding, any reordered sum (TP's reduce-scatter, EP's all-to-all, data
parallel averaging) moves it by a visible fraction of lr; one float32 process drifts ~1e-4
from its own float64 twin in 5 steps.

The objective of a data-parallel step (as braid.train.step uses it): every rank's
cross-entropy summed over its targets, divided by the global target count and multiplied by
dp (data parallelism averages the gradients), plus the MoE aux losses of the global
(micro)batch. With pipeline parallelism the reference accumulates the global microbatches:
microbatch m of the global batch is microbatch m of every data-parallel rank's rows.

Legend: B batch, T time, V vocab, M microbatches.
"""

import dataclasses

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.distributed.tensor import Shard

from braid.model import ModelConfig, build_model
from braid.model.moe import MoE
from braid.parallel import ParallelConfig, ParallelDims, gather_full_state_dict, parallelize
from braid.parallel.ep import ExpertParallelMoE, update_moe_bias
from braid.parallel.loss import parallel_cross_entropy
from braid.parallel.pipeline import IGNORE_INDEX, build_pipeline, pipeline_step
from braid.parallel.testing import run_distributed
from tests.helpers import packed_batch, small_model_config

SEED = 3
STEPS = 5
LR = 3e-3
GLOBAL_BATCH, SEQ_LEN = 8, 24
WIDTHS = [None, 0.5, None, 0.25, None]  # MatFormer width per step
DTYPE = torch.float64
TOL64 = dict(rtol=1e-9, atol=1e-12)
PATTERN = "M- S8E GF AE M S6F"  # Mamba-2, sliding, GLA, attention; MoE, MLP, MatFormer
PP_LAYOUT = dict(pp=2, tp=2, dp_shard=2, ep=2, pp_microbatches=2)
FLAT_LAYOUTS = {"tp2_dp2_ep2": dict(tp=2, dp_shard=2, ep=2), "tp2_dp2_ep4": dict(tp=2, dp_shard=2, ep=4)}


def composed_cfg() -> ModelConfig:
    """Every kind, vocab and heads divisible by 2, balancing biases on (counts are synced)."""
    cfg = small_model_config(PATTERN, vocab_size=96)
    return dataclasses.replace(cfg, moe=dataclasses.replace(cfg.moe, bias_balancing=True, bias_update_rate=0.05))


def make_batch(step: int, vocab_size: int) -> dict[str, torch.Tensor]:
    return packed_batch(step, vocab_size, GLOBAL_BATCH, SEQ_LEN)


def num_targets(batch: dict[str, torch.Tensor]) -> int:
    return int((batch["labels"] != IGNORE_INDEX).sum())


def local_rows(batch: dict[str, torch.Tensor], dp_rank: int, dp: int) -> dict[str, torch.Tensor]:
    return {k: v.tensor_split(dp)[dp_rank] for k, v in batch.items()}


def global_microbatches(batch: dict[str, torch.Tensor], dp: int, microbatches: int) -> list[dict]:
    """Microbatch m of the global batch: microbatch m of every data-parallel rank's rows."""
    per_rank = [local_rows(batch, d, dp) for d in range(dp)]
    return [
        {k: torch.cat([rows[k].tensor_split(microbatches)[m] for rows in per_rank]) for k in batch}
        for m in range(microbatches)
    ]


def train_single_process(dp: int, microbatches: int) -> tuple[list[float], dict]:
    model = build_model(composed_cfg(), seed=SEED).to(DTYPE)
    opt = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=0.1)
    losses = []
    for step in range(STEPS):
        batch = make_batch(step, model.cfg.vocab_size)
        total = 0.0
        for mb in global_microbatches(batch, dp, microbatches):
            logits, aux = model(mb["input_ids"], mb["doc_ids"], widths=WIDTHS[step], return_aux=True)
            ce = F.cross_entropy(
                logits.flatten(0, 1), mb["labels"].flatten(), ignore_index=IGNORE_INDEX, reduction="sum"
            )
            loss = ce / num_targets(batch) + sum(aux.values()) / microbatches
            loss.backward()
            total += loss.item()
        opt.step()
        model.update_moe_bias()
        opt.zero_grad()
        losses.append(total)
    return losses, {k: v.detach().clone() for k, v in model.state_dict().items()}


def _setup(world_size: int, layout: dict) -> tuple[ModelConfig, ParallelDims, object]:
    cfg = composed_cfg()
    dims = ParallelDims(ParallelConfig(**layout), world_size, cfg)
    return cfg, dims, dims.build_mesh("cpu")


def _dp_mean(value: float, dims: ParallelDims) -> float:
    total = torch.tensor(value, dtype=DTYPE)
    dist.all_reduce(total, group=dims.get_mesh("dp").get_group())
    return float(total) / dims.dp


def _check_moes_are_expert_parallel(parts, dims: ParallelDims) -> None:
    moes = [m for part in parts for m in part.modules() if isinstance(m, MoE)]
    assert moes and all(isinstance(m, ExpertParallelMoE) for m in moes)  # every stage has an MoE
    for moe in moes:  # experts sharded over ep (FSDP may shard them further over ep_fsdp)
        axes = moe.w1.device_mesh.mesh_dim_names
        assert "ep" in axes and moe.w1.placements[axes.index("ep")] == Shard(0)


def _final_state(parts) -> dict:
    state = {}
    for part in parts:
        state.update({k: v.numpy().copy() for k, v in gather_full_state_dict(part).items()})
    return state


def _train_pipelined(rank: int, world_size: int, layout: dict) -> dict:
    cfg, dims, mesh = _setup(world_size, layout)
    full_state = build_model(cfg, seed=SEED).to(DTYPE).state_dict()
    pp_mesh, dp_mesh = dims.get_mesh("pp"), dims.get_mesh("dp")
    pipe = build_pipeline(
        cfg,
        pp_mesh.get_local_rank(),
        dims.pp,
        "1f1b",
        dims.num_microbatches,
        group=pp_mesh.get_group(),
        parallelize_fn=lambda part: parallelize(part.to(DTYPE), dims, mesh),
        mesh=mesh,
        state_dict=full_state,
    )
    _check_moes_are_expert_parallel(pipe.modules, dims)
    params = [p for module in pipe.modules for p in module.parameters()]
    opt = torch.optim.AdamW(params, lr=LR, weight_decay=0.1)
    losses = []
    for step in range(STEPS):
        batch = make_batch(step, cfg.vocab_size)
        rows = local_rows(batch, dp_mesh.get_local_rank(), dims.dp)
        # Divided by the global targets / dp: data parallelism averages the gradients.
        out = pipeline_step(pipe, rows, num_targets=num_targets(batch) / dims.dp, widths=WIDTHS[step])
        opt.step()
        for module in pipe.modules:
            update_moe_bias(module, dp_mesh)
        opt.zero_grad()
        losses.append(_dp_mean(out.loss.item(), dims))
    return {"losses": losses, "state": _final_state(pipe.modules)}


def _train_flat(rank: int, world_size: int, layouts: dict[str, dict]) -> dict:
    results = {}
    for name, layout in layouts.items():
        cfg, dims, mesh = _setup(world_size, layout)
        model = parallelize(build_model(cfg, seed=SEED).to(DTYPE), dims, mesh)
        _check_moes_are_expert_parallel([model], dims)
        dp_mesh = dims.get_mesh("dp")
        opt = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=0.1)
        losses = []
        for step in range(STEPS):
            batch = make_batch(step, cfg.vocab_size)
            rows = local_rows(batch, dp_mesh.get_local_rank(), dims.dp)
            logits, aux = model(rows["input_ids"], rows["doc_ids"], widths=WIDTHS[step], return_aux=True)
            ce_sum = parallel_cross_entropy(logits, rows["labels"]) * num_targets(rows)
            loss = ce_sum * dims.dp / num_targets(batch) + sum(aux.values())
            loss.backward()
            opt.step()
            update_moe_bias(model, dp_mesh)
            opt.zero_grad()
            losses.append(_dp_mean(loss.item(), dims))
        results[name] = {"losses": losses, "state": _final_state([model])}
    return results


def check_equal_to_reference(per_rank: list[dict], reference: tuple[list[float], dict]) -> None:
    ref_losses, ref_state = reference
    for r in per_rank:
        torch.testing.assert_close(r["losses"], ref_losses, **TOL64)
        assert r["state"], "no parameters gathered"
        for name, value in r["state"].items():
            if name.endswith("tokens_per_expert"):
                continue  # rank-local counts by design; their sums move the biases checked here
            torch.testing.assert_close(torch.from_numpy(value), ref_state[name], **TOL64, msg=lambda m: f"{name}: {m}")
    gathered = set().union(*(r["state"] for r in per_rank))
    assert gathered == set(ref_state), "some parameters live on no stage"
    biases = [v for k, v in ref_state.items() if k.endswith("expert_bias")]
    assert biases and all(b.abs().sum() > 0 for b in biases)  # balancing moved the biases


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Run like the workers: on a busy 2-core box more intra-op threads are slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.distributed
@pytest.mark.slow
def test_pp2_dp2_tp2_ep2_equals_single_process():
    per_rank = run_distributed(_train_pipelined, 8, (PP_LAYOUT,))
    check_equal_to_reference(per_rank, train_single_process(dp=2, microbatches=2))


@pytest.mark.distributed
@pytest.mark.parametrize(
    "name", [pytest.param("tp2_dp2_ep2", marks=pytest.mark.slow), "tp2_dp2_ep4"]  # ep2: also in the 8-rank run
)
def test_tp2_dp2_with_ep_equals_single_process(name):
    per_rank = run_distributed(_train_flat, 4, ({name: FLAT_LAYOUTS[name]},))
    check_equal_to_reference([r[name] for r in per_rank], train_single_process(dp=2, microbatches=1))
