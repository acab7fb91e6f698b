"""ParallelConfig / ParallelDims validation (one process, fake world sizes: every bad layout
fails before any device work, with a message that says what to change) and the device mesh
(4 processes on gloo)."""

from __future__ import annotations

import dataclasses

import pytest

from braid.configs import model_config
from braid.parallel import ParallelConfig, ParallelDims
from braid.parallel.dims import matformer_bands
from braid.parallel.testing import run_distributed
from tests.parallel.test_tp import small_cfg

CFG = small_cfg()  # every mixer and FFN kind; vocab 96
SIX_EXPERTS = dataclasses.replace(CFG, moe=dataclasses.replace(CFG.moe, num_experts=6))


def dims(world_size: int, model_cfg=CFG, **layout) -> ParallelDims:
    return ParallelDims(ParallelConfig(**layout), world_size, model_cfg)


def test_dp_shard_fills_the_world_and_properties_follow():
    d = dims(16, tp=2, pp=2, dp_replicate=2)
    assert (d.pp, d.dp_replicate, d.dp_shard, d.tp, d.dp) == (2, 2, 2, 2, 4)
    assert d.fsdp_enabled and d.tp_enabled and d.pp_enabled and not d.ep_enabled
    assert d.num_stages == 2 and d.num_microbatches == 2
    assert not dims(2, tp=2).fsdp_enabled
    assert not dims(4, zero_engine="deepspeed", zero_stage=2).fsdp_enabled


@pytest.mark.parametrize(
    "world_size, layout, message",
    [
        (6, dict(tp=4), r"world size 6 is not divisible by dp_replicate\*tp\*pp = 1\*4\*1"),
        (8, dict(tp=2, dp_shard=2), r"pp\*dp_replicate\*dp_shard\*tp = 1\*1\*2\*2 = 4 but the world size is 8"),
        (4, dict(dp_shard=4, pp=2), r"= 8 but the world size is 4"),
    ],
)
def test_world_size_mismatch_says_what_to_change(world_size, layout, message):
    with pytest.raises(ValueError, match=message):
        dims(world_size, **layout)


@pytest.mark.parametrize(
    "field, value, message",
    [
        ("attention", dict(num_heads=3, num_kv_heads=3, head_dim=8), "attention.num_heads=3"),
        ("attention", dict(num_heads=4, num_kv_heads=1), "attention.num_kv_heads=1"),
        ("gla", dict(num_heads=1), "gla.num_heads=1"),
        ("mamba2", dict(head_dim=64, n_groups=1), r"the Mamba-2 heads \(expand\*d_model/head_dim\)=1"),
        ("mamba2", dict(head_dim=16, n_groups=1), "mamba2.n_groups=1"),
        ("mlp", dict(d_ff=51), "mlp.d_ff=51"),
        ("moe", dict(d_expert=17), "moe.d_expert=17"),
        ("moe", dict(d_shared=9), "the shared experts' hidden width=9"),
    ],
)
def test_tp_must_split_every_head_count_and_width(field, value, message):
    model_cfg = dataclasses.replace(CFG, **{field: dataclasses.replace(getattr(CFG, field), **value)})
    with pytest.raises(ValueError, match=f"tp=2 does not divide {message}"):
        dims(2, model_cfg, tp=2)


def test_tp_needs_a_divisible_vocab_and_balanced_matformer_bands():
    with pytest.raises(ValueError, match="tp=2 does not divide vocab_size"):
        dims(2, dataclasses.replace(CFG, vocab_size=97), tp=2)
    assert matformer_bands(CFG) == [8, 8, 16, 32]  # d_ff 64 at granularities (1/8, 1/4, 1/2, 1)
    odd = dataclasses.replace(CFG, matformer=dataclasses.replace(CFG.matformer, d_ff=40))  # bands 5, 5, 10, 20
    with pytest.raises(ValueError, match=r"tp=2 does not divide every MatFormer nesting band \[5, 5, 10, 20\]"):
        dims(2, odd, tp=2)


@pytest.mark.parametrize(
    "world_size, model_cfg, layout, message",
    [
        (4, CFG, dict(ep=4, dp_shard=2, dp_replicate=2), "ep=4 must divide dp_shard=2"),
        (2, small_cfg("M- A-"), dict(ep=2), "ep=2 but the model has no MoE layer"),
        (8, SIX_EXPERTS, dict(ep=4), "num_experts=6 is not divisible by ep=4"),
        (4, CFG, dict(ep=2, dp_shard=2, tp=2, sequence_parallel=False), "needs sequence_parallel=true"),
        (8, CFG, dict(ep=2, dp_shard=2, tp=4), "ep must be tp times a divisor of dp_shard"),
        (12, CFG, dict(ep=8, dp_shard=3, tp=4), "ep must be tp times a divisor of dp_shard"),
        (8, CFG, dict(ep=8, dp_shard=2, tp=2, dp_replicate=2), "ep must be tp times a divisor of dp_shard"),
        (8, SIX_EXPERTS, dict(ep=4, dp_shard=4, tp=2), "num_experts=6 is not divisible by ep=4"),
    ],
)
def test_expert_parallel_borrows_data_parallel_ranks(world_size, model_cfg, layout, message):
    with pytest.raises(ValueError, match=message):
        dims(world_size, model_cfg, **layout)


@pytest.mark.parametrize(
    "world_size, layout",
    [(2, dict(tp=2)), (2, dict(pp=2)), (2, dict(dp_shard=2, ep=2)), (2, dict(tp=2, ep=2)),
     (8, dict(tp=2, pp=2, dp_shard=2, ep=2)), (8, dict(tp=2, dp_shard=4, ep=8))],
)
def test_hybrid_100m_takes_the_gpu_proof_layouts(world_size, layout):
    assert dims(world_size, model_config("hybrid-100m"), **layout).world_size == world_size


def test_expert_parallel_with_tp_spans_the_tp_group():
    assert dims(2, tp=2, ep=2).ep_spans_tp  # no data parallelism: ep is the TP group
    assert dims(8, tp=2, dp_shard=4, ep=4).ep_spans_tp
    assert not dims(4, dp_shard=4, ep=2).ep_spans_tp
    # The experts are not split by hidden units under EP, so tp need not divide d_expert.
    odd_experts = dataclasses.replace(CFG, moe=dataclasses.replace(CFG.moe, d_expert=17, d_shared=9))
    assert dims(4, odd_experts, tp=2, dp_shard=2, ep=2).ep == 2


@pytest.mark.parametrize(
    "layout, message",
    [
        (dict(pp=8), "6 layers cannot fill pp\\*pp_stages_per_rank = 8\\*1 = 8"),
        (
            dict(pp=2, pp_schedule="interleaved_1f1b", pp_stages_per_rank=4),
            "cannot fill pp\\*pp_stages_per_rank = 2\\*4",
        ),
        (dict(pp=2, pp_stages_per_rank=2), "'interleaved_1f1b' needs pp_stages_per_rank >= 2"),
        (dict(pp=2, pp_schedule="interleaved_1f1b"), "'interleaved_1f1b' needs pp_stages_per_rank >= 2"),
        (dict(pp=2, pp_microbatches=1), "pp_microbatches=1 is smaller than pp=2"),
        (dict(pp=2, pp_cut_points=(1, 3)), "gives 3 stages but pp\\*pp_stages_per_rank = 2"),
        (dict(pp=2, pp_cut_points=(6,)), "must be strictly increasing layer indices in \\(0, 6\\)"),
        (dict(pp=2, zero_engine="deepspeed", zero_stage=2), "only allows ZeRO-1"),
    ],
)
def test_pipeline_layouts(layout, message):
    with pytest.raises(ValueError, match=message):
        dims(layout["pp"], **layout)


def test_valid_pipeline_layouts_pass():
    cut = dims(2, pp=2, pp_cut_points=[2])
    assert cut.cfg.pp_cut_points == (2,)  # YAML lists become tuples
    interleaved = dims(4, pp=2, pp_schedule="interleaved_1f1b", pp_stages_per_rank=2, pp_microbatches=4)
    assert (interleaved.num_stages, interleaved.num_microbatches, interleaved.dp_shard) == (4, 4, 2)
    assert dims(2, pp=2, zero_engine="deepspeed", zero_stage=1).pp == 2


@pytest.mark.parametrize(
    "fields, message",
    [
        (dict(zero_engine="zero"), "zero_engine='zero' is not one of"),
        (dict(zero_stage=1), "ZeRO-1 needs zero_engine='deepspeed'"),
        (dict(zero_engine="deepspeed", zero_stage=4), "zero_stage=4 is not supported"),
        (dict(pp_schedule="zb"), "pp_schedule='zb'"),
        (dict(activation_checkpointing="some"), "activation_checkpointing='some'"),
        (dict(param_dtype="fp8"), "param_dtype='fp8'"),
        (dict(tp=0), "parallel.tp must be an int >= 1"),
        (dict(dp_shard=0), "dp_shard must be >= 1 or -1"),
        (dict(pp_microbatches=0), "pp_microbatches must be an int >= 1 or None"),
    ],
)
def test_config_fields_are_validated_when_built(fields, message):
    with pytest.raises(ValueError, match=message):
        ParallelConfig(**fields)


def test_meshes_are_built_before_use():
    with pytest.raises(ValueError, match="call build_mesh"):
        dims(1).get_mesh("tp")


def _mesh_worker(rank, world_size):
    out = {}
    for name, layout in {
        "tp2_dp2": dict(tp=2, dp_shard=2),
        "hsdp": dict(dp_replicate=2, dp_shard=2),
        "ep": dict(dp_shard=4, ep=2),
        "tp2_ep2": dict(tp=2, dp_shard=2, ep=2),
        "tp2_ep4": dict(tp=2, dp_shard=2, ep=4),
    }.items():
        d = dims(world_size, **layout)
        world = d.build_mesh("cpu")
        views = ("tp", "dp", "fsdp", "ep", "dp_shard_mod_ep", "ep_fsdp", "moe_batch")
        out[name] = {"axes": world.mesh_dim_names, "shape": tuple(world.shape)}
        out[name].update({view: d.get_mesh(view).mesh.tolist() for view in views})
        out[name]["fsdp_axes"] = d.get_mesh("fsdp").mesh_dim_names
    return out


@pytest.mark.distributed
def test_mesh_axes_and_views_on_four_ranks():
    results = run_distributed(_mesh_worker, 4)
    for rank, out in enumerate(results):
        assert out["tp2_dp2"]["axes"] == ("pp", "dp_replicate", "dp_shard", "tp")
        assert out["tp2_dp2"]["shape"] == (1, 1, 2, 2)
        # tp is the inner axis: ranks {0, 1} and {2, 3} split the heads, {0, 2} and {1, 3} the batch.
        assert out["tp2_dp2"]["tp"] == [[0, 1], [2, 3]][rank // 2]
        assert out["tp2_dp2"]["dp"] == [[0, 2], [1, 3]][rank % 2]
        assert out["hsdp"]["fsdp_axes"] == ("dp_replicate", "dp_shard")
        assert out["hsdp"]["fsdp"] == [[0, 1], [2, 3]]
        assert out["hsdp"]["dp"] == [0, 1, 2, 3]
        # ep takes the inner ranks of dp_shard; experts are FSDP-sharded over the others.
        assert out["ep"]["ep"] == [[0, 1], [2, 3]][rank // 2]
        assert out["ep"]["dp_shard_mod_ep"] == [[0, 2], [1, 3]][rank % 2]
        assert out["ep"]["ep_fsdp"] == out["ep"]["dp_shard_mod_ep"]
        assert out["ep"]["moe_batch"] == out["ep"]["dp"] == [0, 1, 2, 3]
        # With TP the ep group spans the TP group ({0, 1}, {2, 3}) and ep/tp dp_shard ranks;
        # the MoE's tokens (aux losses, loads) are split over every data and TP rank.
        assert out["tp2_ep2"]["ep"] == [[0, 1], [2, 3]][rank // 2]
        assert out["tp2_ep2"]["ep_fsdp"] == [[0, 2], [1, 3]][rank % 2]
        assert out["tp2_ep2"]["moe_batch"] == [0, 1, 2, 3]
        assert out["tp2_ep4"]["ep"] == [0, 1, 2, 3]
        assert out["tp2_ep4"]["ep_fsdp"] == [rank]
