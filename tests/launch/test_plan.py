"""`braid plan` without GPUs: the 8B Mamba-2-Hybrid on 8 nodes x 8 H100, the memory formula
on hand-computable cases, layouts that cannot fit and the suggestion."""

from __future__ import annotations

import dataclasses

import pytest

from braid.cli import main
from braid.launch.plan import GPUS, GiB, estimate_memory, plan, planning_config, suggest_layout
from braid.model import build_model, flops_per_token, num_params
from braid.parallel import ParallelDims


def test_plan_8b_mamba2_hybrid_on_8_nodes_of_8_h100(capsys):
    cfg = planning_config("mamba2-hybrid-8b", [])
    p = plan(cfg, nodes=8, gpus_per_node=8, gpu=GPUS["h100"], mfu=0.4)
    assert p.num_params == num_params(cfg.model)
    assert 8.0e9 < p.num_params < 9.5e9
    assert p.dims.dp_shard == 64 and p.tokens_per_step == 64 * 4096
    assert p.flops_per_step == pytest.approx(flops_per_token(cfg.model, 4096) * 64 * 4096)
    assert p.step_s == pytest.approx(p.flops_per_step / (64 * 989e12 * 0.4))
    # ZeRO-3 over 64 ranks: 16 bytes per parameter / 64, plus two gathered blocks.
    static = p.memory.params + p.memory.grads + p.memory.optimizer
    assert static == pytest.approx(16 * p.num_params / 64, rel=1e-3)
    assert p.fits
    assert main(["plan", "mamba2-hybrid-8b", "--nodes", "8", "--gpus-per-node", "8", "--gpu", "h100"]) == 0
    out = capsys.readouterr().out
    assert "on 8 nodes x 8 h100 = 64 GPUs" in out and "fits" in out and "s/step" in out
    assert f"{p.num_params:,} parameters on the meta device" in out


def test_memory_formula_by_zero_stage_on_a_small_model():
    cfg = planning_config("llama-374m", ["data.batch_size=1", "parallel.zero_engine=deepspeed"])
    model = build_model(cfg.model, device="meta")
    n = sum(p.numel() for p in model.parameters())
    for stage, (params, grads) in {1: (2 * n, 2 * n), 2: (2 * n, 2 * n / 8), 3: (2 * n / 8, 2 * n / 8)}.items():
        pcfg = dataclasses.replace(cfg.parallel, zero_stage=stage)
        memory = estimate_memory(cfg, ParallelDims(pcfg, 8, cfg.model), model)
        assert memory.params == pytest.approx(params) and memory.grads == pytest.approx(grads)
        assert memory.optimizer == pytest.approx(12 * n / 8)
    no_ac = estimate_memory(cfg, ParallelDims(cfg.parallel, 8, cfg.model), model)
    full = dataclasses.replace(cfg.parallel, activation_checkpointing="full")
    ac = estimate_memory(cfg, ParallelDims(full, 8, cfg.model), model)
    # Full checkpointing keeps each block's input (d_model bf16 per token) plus one block's recompute.
    assert ac.activations < no_ac.activations / 5
    assert ac.activations > cfg.model.resolved_num_layers * 2 * cfg.model.d_model * cfg.data.seq_len


def test_tensor_and_pipeline_parallel_divide_parameters_and_activations():
    cfg = planning_config("mamba2-hybrid-8b", ["data.batch_size=8", "model.tie_embeddings=false"])
    model = build_model(cfg.model, device="meta")
    one = estimate_memory(cfg, ParallelDims(cfg.parallel, 64, cfg.model), model)
    tp = dataclasses.replace(cfg.parallel, tp=8)
    with_tp = estimate_memory(cfg, ParallelDims(tp, 64, cfg.model), model)
    assert with_tp.activations == pytest.approx(one.activations / 8, rel=1e-6)  # sequence parallel: all / tp
    assert with_tp.optimizer == pytest.approx(one.optimizer, rel=0.01)  # tp*dp_shard = 64 either way
    pp = dataclasses.replace(cfg.parallel, pp=4, pp_microbatches=8)
    with_pp = estimate_memory(cfg, ParallelDims(pp, 64, cfg.model), model)
    assert with_pp.in_flight == 4  # 1F1B: the first stage holds pp micro-batches
    gpipe = estimate_memory(cfg, ParallelDims(dataclasses.replace(pp, pp_schedule="gpipe"), 64, cfg.model), model)
    assert gpipe.in_flight == 8


def test_layout_that_cannot_fit_is_flagged_and_a_fitting_one_suggested(capsys):
    overrides = ["data.batch_size=16", "parallel.dp_shard=1", "parallel.dp_replicate=8"]
    cfg = planning_config("mamba2-hybrid-8b", overrides)
    p = plan(cfg, nodes=1, gpus_per_node=8, gpu=GPUS["h100"])
    assert not p.fits and p.memory.total > 80 * GiB
    best = suggest_layout(cfg, 1, 8, GPUS["h100"])
    assert best is not None and best.fits and best.memory.total <= 0.9 * 79.6 * GiB
    assert best.tokens_per_step == p.tokens_per_step, "the suggestion keeps the global batch (via grad_accum)"
    assert best.dims.dp * best.cfg.optim.grad_accum == 8
    assert main(["plan", "mamba2-hybrid-8b", *overrides, "--nodes", "1", "--gpus-per-node", "8"]) == 1
    out = capsys.readouterr().out
    assert "DOES NOT FIT" in out and "suggestion: parallel.tp=" in out


def test_invalid_layout_is_reported_with_the_reason(capsys):
    assert main(["plan", "mamba2-hybrid-8b", "parallel.tp=3", "--nodes", "1", "--gpus-per-node", "6"]) == 1
    out = capsys.readouterr().out
    assert "layout: INVALID: tp=3 does not divide" in out and "suggestion: parallel.tp=" in out


def test_plan_rejects_a_bad_mfu():
    cfg = planning_config("tiny-hybrid", [])
    with pytest.raises(ValueError, match="--mfu 1.5"):
        plan(cfg, 1, 1, GPUS["h100"], mfu=1.5)
