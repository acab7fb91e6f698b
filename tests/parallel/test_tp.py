"""Tensor (+ sequence) parallelism equals one process: training, MatFormer widths, the
vocab-parallel cross-entropy, and loading single-process weights into a sharded model.

The parity standard: 5 AdamW steps at the parallel layout give the single-process losses and
final parameters on the same global batch, within rounding. Training runs in float64: Adam
divides each gradient by its running RMS, which amplifies rounding, so that in float32 the
single process itself moves up to 1e-4 away from its float64 twin in 5 steps (measured: GLA
projections), and any reordering of sums (a reduce-scatter instead of one matmul) does the
same. In float64 the layouts agree to TOL64; forward-only checks run in float32 within TOL.

Shapes: B batch, T time, V vocab, N tokens. Helpers here are shared with test_fsdp.py.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import get_state_dict, set_model_state_dict, set_state_dict
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import DTensor, Shard, distribute_tensor
from torch.utils._pytree import tree_map_only

from braid.configs import model_config
from braid.model import ModelConfig, build_model
from braid.model.block import Block
from braid.parallel import (
    ParallelConfig,
    ParallelDims,
    apply_tp,
    distribute_full_model,
    from_checkpoint_layout,
    gather_full_state_dict,
    parallel_cross_entropy,
    parallelize,
    to_checkpoint_layout,
)
from braid.parallel.testing import run_distributed, tmp_store_dir
from braid.parallel.tp import block_plan
from tests.helpers import ALL_KINDS, small_model_config

TOL = dict(rtol=1e-5, atol=1e-6)  # float32 rounding of reordered sums, no optimizer steps
TOL64 = dict(rtol=1e-9, atol=1e-12)  # float64 rounding after 5 AdamW steps
DTYPE = torch.float64
STEPS, LR, BATCH, SEQ = 5, 3e-3, 4, 16


def small_cfg(pattern: str = ALL_KINDS, **changes) -> ModelConfig:
    """The shared small model with vocab 96, so that it splits over 2 or 4 ranks."""
    return small_model_config(pattern, **{"vocab_size": 96, **changes})


def make_batches(cfg: ModelConfig, *, ignore: bool = False, seed: int = 0) -> list[tuple]:
    """STEPS global batches (tokens_BT, labels_BT, doc_ids_BT); document boundaries fall off
    the sequence-parallel shard boundaries, so a mixer that saw only its shard would differ."""
    g = torch.Generator().manual_seed(seed)
    batches = []
    for _ in range(STEPS):
        tokens_BT = torch.randint(0, cfg.vocab_size, (BATCH, SEQ), generator=g)
        labels_BT = torch.randint(0, cfg.vocab_size, (BATCH, SEQ), generator=g)
        if ignore:
            labels_BT[torch.rand(BATCH, SEQ, generator=g) < 0.2] = -100
        cuts_B = torch.randint(3, SEQ - 3, (BATCH,), generator=g)
        doc_ids_BT = (torch.arange(SEQ)[None, :] >= cuts_B[:, None]).long()
        batches.append((tokens_BT, labels_BT, doc_ids_BT))
    return batches


def train(model, batches, *, dp_rank: int = 0, dp_size: int = 1, dp_group=None) -> list[float]:
    """STEPS AdamW steps; this rank trains on its 1/dp_size of each batch's rows. Returns the
    global-batch losses (the mean of the data-parallel ranks' losses)."""
    opt = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=0.1)
    rows = BATCH // dp_size
    losses = []
    for tokens_BT, labels_BT, doc_ids_BT in batches:
        part = slice(dp_rank * rows, (dp_rank + 1) * rows)
        logits, aux = model(tokens_BT[part], doc_ids_BT[part], return_aux=True)
        loss = parallel_cross_entropy(logits, labels_BT[part]) + sum(aux.values())
        loss.backward()
        opt.step()
        opt.zero_grad()
        value = loss.detach().clone()
        if dp_size > 1:
            dist.all_reduce(value, group=dp_group)
            value /= dp_size
        losses.append(value.item())
    return losses


def portable(tree):
    """Tensors as numpy arrays: a worker's result must outlive the worker (torch would share
    tensors with the parent through file descriptors that die with it)."""
    return tree_map_only(torch.Tensor, lambda t: t.detach().numpy(), tree)


def tensors(tree):
    """The inverse of portable, in the parent process."""
    return tree_map_only(np.ndarray, torch.from_numpy, tree)


def float64_model(cfg: ModelConfig) -> torch.nn.Module:
    return build_model(cfg, seed=0).to(DTYPE)


def reference(cfg: ModelConfig, batches) -> tuple[list[float], dict[str, torch.Tensor]]:
    model = float64_model(cfg)
    return train(model, batches), model.state_dict()


def assert_same_training(result: dict, expected_losses: list[float], expected_state: dict) -> None:
    torch.testing.assert_close(torch.tensor(result["losses"]), torch.tensor(expected_losses), **TOL64)
    assert result["state"].keys() == expected_state.keys()
    for name, value in expected_state.items():
        torch.testing.assert_close(result["state"][name], value, **TOL64, msg=lambda m, n=name: f"{n}: {m}")


TP_LAYOUTS = {
    "sp": dict(sequence_parallel=True),
    "no_sp": dict(sequence_parallel=False),
    "sp_full_ac": dict(sequence_parallel=True, activation_checkpointing="full"),
}


def _tp_worker(rank, world_size, cfg, batches):
    out = {}
    for name, layout in TP_LAYOUTS.items():
        dims = ParallelDims(ParallelConfig(tp=world_size, **layout), world_size, cfg)
        model = parallelize(float64_model(cfg), dims, dims.build_mesh("cpu"))
        out[name] = {"losses": train(model, batches), "state": gather_full_state_dict(model)}
    return portable(out)


@pytest.mark.distributed
def test_tp2_training_with_and_without_sequence_parallel_equals_single_process():
    cfg = small_cfg()
    batches = make_batches(cfg, ignore=True)
    losses, state = reference(cfg, batches)
    for result in tensors(run_distributed(_tp_worker, 2, (cfg, batches))):
        for name in TP_LAYOUTS:
            assert_same_training(result[name], losses, state)


WIDTHS = (0.125, 0.5, 1.0)


def _matformer_widths(mesh, cfg, tokens_BT, labels_BT, doc_ids_BT):
    model = apply_tp(float64_model(cfg), mesh)
    out = {}
    for width in WIDTHS:
        logits = model(tokens_BT, doc_ids_BT, widths=width)
        parallel_cross_entropy(logits, labels_BT).backward()
        grads = {name: p.grad.full_tensor() for name, p in model.named_parameters() if ".ffn.w" in name}
        out[width] = (logits.full_tensor(), grads)
        model.zero_grad()
    return out


def _vocab_parallel_loss(mesh, logits_NV, labels_N):
    sharded = distribute_tensor(logits_NV, mesh, [Shard(1)]).requires_grad_()
    loss = parallel_cross_entropy(sharded, labels_N)
    loss.backward()
    return loss.detach(), sharded.grad.full_tensor()


def _meta_init_logits(world_size, cfg, full_state, tokens_BT, doc_ids_BT):
    dims = ParallelDims(ParallelConfig(tp=world_size), world_size, cfg)
    model = parallelize(build_model(cfg, device="meta"), dims, dims.build_mesh("cpu"))
    model.to_empty(device="cpu")
    distribute_full_model(model, full_state)
    return model(tokens_BT, doc_ids_BT).full_tensor()


def _load(model, optimizer, path, *, with_optimizer: bool = True) -> None:
    """The trainer's DCP load, with the checkpoint layout of interleaved shards."""
    template = dict(zip(("model", "optim"), get_state_dict(model, optimizer)))
    if not with_optimizer:
        del template["optim"]
    state = to_checkpoint_layout(template)
    dcp.load(state, checkpoint_id=path)
    state = from_checkpoint_layout(state, template)
    if with_optimizer:
        set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
    else:
        set_model_state_dict(model, state["model"])


def _checkpoint_round_trip(world_size, cfg, single_path, tp_path, tokens_BT, labels_BT, doc_ids_BT):
    """Load a one-process checkpoint into a tp2 model (other seed), train a step, save model
    and optimizer at tp2, load them into a third tp2 model."""
    dims = ParallelDims(ParallelConfig(tp=world_size), world_size, cfg)
    models = [parallelize(build_model(cfg, seed=seed), dims, dims.build_mesh("cpu")) for seed in (1, 2)]
    optimizers = [torch.optim.AdamW(model.parameters(), lr=LR) for model in models]
    _load(models[0], optimizers[0], single_path, with_optimizer=False)
    logits = models[0](tokens_BT, doc_ids_BT)
    parallel_cross_entropy(logits, labels_BT).backward()
    optimizers[0].step()
    model_sd, optim_sd = get_state_dict(models[0], optimizers[0])
    dcp.save(to_checkpoint_layout({"model": model_sd, "optim": optim_sd}), checkpoint_id=tp_path)
    _load(models[1], optimizers[1], tp_path)
    same = [
        torch.equal(a.to_local(), b.to_local())
        for sd_a, sd_b in zip(get_state_dict(models[0], optimizers[0]), get_state_dict(models[1], optimizers[1]))
        for a, b in _dtensor_pairs(sd_a, sd_b)
    ]
    return {"logits": logits.full_tensor(), "state": gather_full_state_dict(models[0]), "reloaded": all(same)}


def _dtensor_pairs(a, b):
    if isinstance(a, dict):
        for key in a:
            yield from _dtensor_pairs(a[key], b[key])
    elif isinstance(a, DTensor):
        yield a, b


def _forward_worker(rank, world_size, matformer_case, loss_case, meta_case, checkpoint_case):
    mesh = init_device_mesh("cpu", (world_size,), mesh_dim_names=("tp",))
    return portable(
        {
            "widths": _matformer_widths(mesh, *matformer_case),
            "loss": _vocab_parallel_loss(mesh, *loss_case),
            "meta": _meta_init_logits(world_size, *meta_case),
            "checkpoint": _checkpoint_round_trip(world_size, *checkpoint_case),
        }
    )


@pytest.mark.distributed
@pytest.mark.filterwarnings("ignore:torch.distributed is disabled")
def test_matformer_widths_loss_meta_init_and_checkpoints_under_tp2():
    """One launch, four checks: (1) MatFormer at every width (logits and FFN gradients)
    equals one process; (2) the vocab-parallel cross-entropy equals F.cross_entropy, value
    and gradient; (3) a model parallelized on the meta device and loaded with
    distribute_full_model computes the single-process logits; (4) DCP checkpoints move
    between one process and tp2 both ways (MatFormer's interleaved shards included), and a
    tp2 checkpoint of model and optimizer reloads exactly at tp2."""
    mat_cfg = small_cfg("GF AF")
    tokens_BT, labels_BT, doc_ids_BT = make_batches(mat_cfg)[0]
    g = torch.Generator().manual_seed(3)
    logits_NV = torch.randn(10, 96, generator=g) * 3
    labels_N = torch.randint(0, 96, (10,), generator=g)
    labels_N[2] = -100
    cfg = small_cfg()
    single = build_model(cfg, seed=0)
    single_path, tp_path = tmp_store_dir(), tmp_store_dir()
    dcp.save({"model": single.state_dict()}, checkpoint_id=single_path, no_dist=True)
    cases = (
        (mat_cfg, tokens_BT, labels_BT, doc_ids_BT),
        (logits_NV, labels_N),
        (cfg, single.state_dict(), tokens_BT, doc_ids_BT),
        (cfg, single_path, tp_path, tokens_BT, labels_BT, doc_ids_BT),
    )
    results = tensors(run_distributed(_forward_worker, 2, cases))

    mat_single = float64_model(mat_cfg)
    for width in WIDTHS:
        logits = mat_single(tokens_BT, doc_ids_BT, widths=width)
        F.cross_entropy(logits.flatten(0, 1), labels_BT.flatten()).backward()
        expected_grads = {name: p.grad.clone() for name, p in mat_single.named_parameters()}
        mat_single.zero_grad()
        for result in results:
            got_logits, got_grads = result["widths"][width]
            torch.testing.assert_close(got_logits, logits, **TOL64)
            assert len(got_grads) == 6  # w1, w3, w2 of both MatFormer layers
            for name, grad in got_grads.items():
                expected = expected_grads[name]
                torch.testing.assert_close(grad, expected, **TOL64, msg=lambda m, n=name: f"{width} {n}: {m}")

    plain = logits_NV.clone().requires_grad_()
    expected = F.cross_entropy(plain, labels_N)
    expected.backward()
    expected_logits = single(tokens_BT, doc_ids_BT)
    for result in results:
        loss, grad = result["loss"]
        torch.testing.assert_close(loss, expected.detach(), **TOL)
        torch.testing.assert_close(grad, plain.grad, **TOL)
        torch.testing.assert_close(result["meta"], expected_logits, **TOL)
        torch.testing.assert_close(result["checkpoint"]["logits"], expected_logits, **TOL)
        assert result["checkpoint"]["reloaded"]

    restored = build_model(cfg, seed=3).state_dict()
    dcp.load({"model": restored}, checkpoint_id=tp_path, no_dist=True)
    for name, value in results[0]["checkpoint"]["state"].items():
        assert torch.equal(restored[name], value), name


def test_parallel_cross_entropy_of_plain_logits_is_cross_entropy():
    g = torch.Generator().manual_seed(4)
    logits_BTV = torch.randn(2, 5, 11, generator=g)
    labels_BT = torch.randint(0, 11, (2, 5), generator=g)
    labels_BT[0, 1] = -100
    expected = F.cross_entropy(logits_BTV.flatten(0, 1), labels_BT.flatten())
    torch.testing.assert_close(parallel_cross_entropy(logits_BTV, labels_BT), expected, rtol=0, atol=0)
    with pytest.raises(ValueError, match="labels"):
        parallel_cross_entropy(logits_BTV, labels_BT[:, :4])


def test_a_layer_kind_without_a_plan_is_named():
    cfg = small_cfg("M-")
    spec = cfg.layers[0]
    block = Block(cfg, spec)
    block.spec = dataclasses.replace(spec, mixer="rwkv")
    with pytest.raises(ValueError, match="layer 0: no tensor-parallel plan for mixer kind 'rwkv'"):
        block_plan(block)
    block.spec = dataclasses.replace(spec, ffn="kan")
    with pytest.raises(ValueError, match="no tensor-parallel plan for ffn kind 'kan'"):
        block_plan(block)
