"""ZeRO with FSDP2 (2 and 3), HSDP, TP x FSDP, expert parallelism through `parallelize`, and
activation checkpointing / compile: 5 training steps equal the single process on the same
global batch (losses and final parameters, float64 within TOL64; see test_tp.py for why).

Data-parallel ranks train on their rows of each global batch; the MoE aux losses are those of
the global batch (braid.parallel.ep), so the reference is one process on the whole batch.
"""

from __future__ import annotations

import pytest
import torch
from torch.distributed.fsdp import FSDPModule

from braid.model import build_model
from braid.parallel import (
    ParallelConfig,
    ParallelDims,
    apply_ac,
    apply_compile,
    apply_fsdp,
    gather_full_state_dict,
    parallelize,
)
from braid.parallel.ac import checkpointed_layers
from braid.parallel.ep import sync_moe_load
from braid.parallel.fsdp import mixed_precision_policy
from braid.parallel.testing import run_distributed
from tests.parallel.test_tp import (
    TOL64,
    assert_same_training,
    float64_model,
    make_batches,
    portable,
    reference,
    small_cfg,
    tensors,
    train,
)


def _train_layout(cfg, batches, world_size, **layout) -> dict:
    dims = ParallelDims(ParallelConfig(**layout), world_size, cfg)
    mesh = dims.build_mesh("cpu")
    model = parallelize(float64_model(cfg), dims, mesh)
    dp_mesh = dims.get_mesh("dp")
    dp_rank, dp_size = dp_mesh.get_local_rank(), dp_mesh.size()
    losses = train(model, batches, dp_rank=dp_rank, dp_size=dp_size, dp_group=dp_mesh.get_group())
    sync_moe_load(model, dp_mesh)  # the counts of the whole batch, to compare with one process
    return {"losses": losses, "state": gather_full_state_dict(model), "fsdp": isinstance(model, FSDPModule)}


DP2_LAYOUTS = {
    "zero3": dict(dp_shard=2, zero_stage=3),
    "zero2_selective_ac": dict(dp_shard=2, zero_stage=2, activation_checkpointing="selective", ac_every=2),
    "zero3_full_ac": dict(dp_shard=2, zero_stage=3, activation_checkpointing="full"),
    "ep2_zero3": dict(dp_shard=2, ep=2, zero_stage=3),
}


def _dp2_worker(rank, world_size, cfg, batches):
    out = {name: _train_layout(cfg, batches, world_size, **layout) for name, layout in DP2_LAYOUTS.items()}
    out["mixed_precision"] = _mixed_precision_dtypes(cfg, world_size)
    return portable(out)


def _mixed_precision_dtypes(cfg, world_size) -> dict[str, torch.dtype]:
    """The dtypes a Mamba-2 mixer sees in its forward under a bf16 FSDP2 policy."""
    dims = ParallelDims(ParallelConfig(dp_shard=world_size), world_size, cfg)
    dims.build_mesh("cpu")
    model = build_model(cfg, seed=0)
    policy = mixed_precision_policy(torch.bfloat16, torch.float32)
    apply_fsdp(model, dims.get_mesh("fsdp"), mp_policy=policy)
    mixer = model.layers["0"].mixer
    seen = {}

    def record(module, args):
        seen.update({name: getattr(mixer, name).dtype for name in ("A_log", "D", "dt_bias")})
        seen["z_proj.weight"] = mixer.z_proj.weight.dtype

    mixer.z_proj.register_forward_pre_hook(record)
    tokens_BT, _, doc_ids_BT = make_batches(cfg)[0]
    model(tokens_BT[:2], doc_ids_BT[:2])
    return {name: str(dtype) for name, dtype in seen.items()}


@pytest.mark.distributed
def test_dp2_zero2_zero3_activation_checkpointing_and_ep_equal_single_process():
    cfg = small_cfg()
    batches = make_batches(cfg)
    losses, state = reference(cfg, batches)
    for result in tensors(run_distributed(_dp2_worker, 2, (cfg, batches))):
        for name in DP2_LAYOUTS:
            assert result[name]["fsdp"], name
            assert_same_training(result[name], losses, state)
        assert result["mixed_precision"] == {
            "A_log": "torch.float32",
            "D": "torch.float32",
            "dt_bias": "torch.float32",
            "z_proj.weight": "torch.bfloat16",
        }


GRID_LAYOUTS = {
    "tp2_dp2": dict(tp=2, dp_shard=2, zero_stage=3),
    "hsdp2x2": dict(dp_replicate=2, dp_shard=2, zero_stage=3),
}


def _grid_worker(rank, world_size, cfg, batches):
    return portable({name: _train_layout(cfg, batches, world_size, **layout) for name, layout in GRID_LAYOUTS.items()})


@pytest.mark.distributed
def test_tp2_x_fsdp2_and_hsdp_2x2_equal_single_process():
    cfg = small_cfg()
    batches = make_batches(cfg)
    losses, state = reference(cfg, batches)
    for result in tensors(run_distributed(_grid_worker, 4, (cfg, batches))):
        for name in GRID_LAYOUTS:
            assert_same_training(result[name], losses, state)


def test_activation_checkpointing_equals_plain_and_counts_tokens_once():
    cfg = small_cfg()
    tokens_BT, labels_BT, doc_ids_BT = make_batches(cfg)[0]
    plain, checkpointed = float64_model(cfg), apply_ac(float64_model(cfg), "full")
    assert checkpointed_layers(checkpointed) == list(checkpointed.layers.keys())
    assert checkpointed.state_dict().keys() == plain.state_dict().keys()
    for model in (plain, checkpointed):
        logits, aux = model(tokens_BT, doc_ids_BT, return_aux=True)
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), labels_BT.flatten()) + sum(aux.values())
        loss.backward()
    for (name, p), (_, q) in zip(plain.named_parameters(), checkpointed.named_parameters()):
        torch.testing.assert_close(q.grad, p.grad, **TOL64, msg=lambda m, n=name: f"{n}: {m}")
    counts = plain.layers["1"].ffn.tokens_per_expert
    assert counts.sum() == tokens_BT.numel() * cfg.moe.top_k
    torch.testing.assert_close(checkpointed.layers["1"].ffn.tokens_per_expert, counts, rtol=0, atol=0)


def test_selective_checkpointing_wraps_every_nth_layer_and_compile_keeps_names():
    cfg = small_cfg()
    model = apply_ac(build_model(cfg, device="meta"), "selective", every=2)
    assert checkpointed_layers(model) == ["0", "2", "4"]
    keys = build_model(cfg, device="meta").state_dict().keys()
    apply_compile(model)
    assert all(block._compiled_call_impl is not None for block in model.layers.values())
    assert model.state_dict().keys() == keys
    with pytest.raises(ValueError, match="'partial'"):
        apply_ac(model, "partial")
