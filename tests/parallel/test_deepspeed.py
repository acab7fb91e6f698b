"""DeepSpeed ZeRO-1, -2 and -3 at dp2 (2 gloo processes), and ZeRO-2 with tensor parallelism
at dp2 x tp2 (4 processes), train like one process on the global batch; the mpu adapter and
the layout checks.

Parity on the all-kinds tiny model with MoE bias balancing, 5 AdamW steps (two parameter
groups; no clipping at dp2), float32 (DeepSpeed keeps float32 master weights, so float64 is
not an option):
- the gradients DeepSpeed averaged at step 0 (dp2), and the per-step losses (mean over
  data-parallel ranks): rtol 1e-5 / atol 1e-6;
- the final parameters (ZeRO-3 gathered): no further from the single process than the single
  process is from itself when its initial weights move by about one ulp. A fixed 1e-6 is not
  reachable for any layout that changes summation order: measured on this model at lr 1e-2,
  one-ulp noise moves the single process's parameters by 2.8e-4 after 5 steps (1.2e-5 at
  lr 1e-3); DeepSpeed's deviation was 1.1e-5 (ZeRO-1/2) and 6e-5 (ZeRO-3), while its step-0
  gradients were within 7.5e-8.
The TP run also checkpoints every block and clips gradients at a norm the step-0 gradients
exceed, so DeepSpeed's norm over the TP shards (model-parallel group) is exercised.

Legend: B batch, T time, V vocab.
"""

import dataclasses
import os

import pytest
import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import DTensor

from braid.configs import model_config
from braid.model import ModelConfig, build_model
from braid.parallel.ac import apply_ac
from braid.parallel.deepspeed import EXTENSIONS_CACHE, DeepSpeedMPU, build_deepspeed_engine, param_groups
from braid.parallel.ep import apply_ep, apply_global_aux_losses, update_moe_bias
from braid.parallel.loss import parallel_cross_entropy
from braid.parallel.testing import run_distributed
from braid.parallel.tp import apply_tp

TOL = dict(rtol=1e-5, atol=1e-6)
NUM_STEPS = 5
GLOBAL_BATCH, SEQ_LEN, VOCAB = 4, 16, 96  # vocab and length divisible by tp=2
STAGES = (1, 2, 3)
TP_CLIP = 0.5
MESH_AXES = ("pp", "dp_replicate", "dp_shard", "tp")


@dataclasses.dataclass
class Optim:
    """The fields of braid.train.config.OptimConfig that build_deepspeed_engine reads."""

    lr: float = 1e-2
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = 1e-8
    weight_decay: float = 0.1
    grad_clip: float = 0.0
    grad_accum: int = 1


def ds_cfg() -> ModelConfig:
    cfg = model_config("tiny-hybrid")
    return dataclasses.replace(
        cfg,
        d_model=32,
        vocab_size=VOCAB,
        max_seq_len=64,
        pattern="M- S8E GF A- M S6F",
        tie_embeddings=False,
        attention=dataclasses.replace(cfg.attention, num_heads=4, num_kv_heads=2, window=8),
        mamba2=dataclasses.replace(cfg.mamba2, head_dim=16, d_state=8, n_groups=2, chunk_size=8),
        gla=dataclasses.replace(cfg.gla, num_heads=2, gate_low_rank=4, chunk_size=8),
        mlp=dataclasses.replace(cfg.mlp, d_ff=48),
        moe=dataclasses.replace(
            cfg.moe,
            num_experts=4,
            top_k=2,
            d_expert=16,
            num_shared_experts=1,
            d_shared=8,
            load_balance_coef=0.1,
            bias_balancing=True,
            bias_update_rate=0.05,
        ),
        matformer=dataclasses.replace(cfg.matformer, d_ff=64),
    )


def global_batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Tokens (B, T+1) and packed document ids (B, T): two documents per row."""
    tokens = torch.randint(0, VOCAB, (GLOBAL_BATCH, SEQ_LEN + 1), generator=torch.Generator().manual_seed(step))
    doc_ids = torch.tensor([[0] * 9 + [1] * (SEQ_LEN - 9)] * GLOBAL_BATCH)
    return tokens, doc_ids


def step_loss(model, tokens: torch.Tensor, doc_ids: torch.Tensor) -> torch.Tensor:
    logits_BTV, aux = model(tokens[:, :-1], doc_ids, return_aux=True)  # vocab-sharded DTensor under TP
    return parallel_cross_entropy(logits_BTV, tokens[:, 1:]) + sum(aux.values())


def _reference(init_noise: float = 0.0, grad_clip: float = 0.0) -> dict:
    """One process on the global batch; init_noise: relative noise on the initial weights."""
    model = build_model(ds_cfg(), seed=5).train()
    with torch.no_grad():
        gen = torch.Generator().manual_seed(0)
        for param in model.parameters():
            param.mul_(1 + init_noise * torch.randn(param.shape, generator=gen))
    opt = Optim()
    optimizer = torch.optim.AdamW(param_groups(model, opt.weight_decay), lr=opt.lr, betas=opt.betas, eps=opt.eps)
    losses = []
    for step in range(NUM_STEPS):
        loss = step_loss(model, *global_batch(step))
        optimizer.zero_grad()
        loss.backward()
        if step == 0:
            grads = {name: p.grad.clone() for name, p in model.named_parameters()}
        if grad_clip > 0:
            norm = torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
            assert step > 0 or norm > grad_clip  # the clip is active
        optimizer.step()
        model.update_moe_bias()
        losses.append(loss.item())
    return {"loss": losses, "grads": grads, "state": {k: v.clone() for k, v in model.state_dict().items()}}


def _full_state(engine, zero_stage: int) -> dict[str, torch.Tensor]:
    import deepspeed

    model = engine.module
    if zero_stage < 3:
        return {k: v.clone() for k, v in model.state_dict().items()}
    with deepspeed.zero.GatheredParameters(list(model.parameters())):
        return {k: v.clone() for k, v in model.state_dict().items()}


def _zero_worker(rank: int, world_size: int) -> dict:
    from deepspeed.utils import safe_get_full_grad

    rows = slice(rank * GLOBAL_BATCH // world_size, (rank + 1) * GLOBAL_BATCH // world_size)
    results = {}
    for stage in STAGES:
        model = apply_global_aux_losses(build_model(ds_cfg(), seed=5).train(), dist.group.WORLD)
        engine = build_deepspeed_engine(model, Optim(), stage, dp_group=dist.group.WORLD, micro_batch_size=2)
        losses = []
        for step in range(NUM_STEPS):
            tokens, doc_ids = global_batch(step)
            loss = step_loss(engine, tokens[rows], doc_ids[rows])
            engine.backward(loss)
            if step == 0:
                grads = {name: safe_get_full_grad(p).clone() for name, p in engine.module.named_parameters()}
            engine.step()
            update_moe_bias(engine.module, dist.group.WORLD)
            losses.append(loss.item())
        # numpy: torch tensors would travel through shared memory that dies with this process
        results[stage] = {
            "loss": losses,
            "grads": {k: v.numpy() for k, v in grads.items()},
            "state": {k: v.numpy() for k, v in _full_state(engine, stage).items()},
        }
    return results


@pytest.fixture(scope="module", autouse=True)
def cached_extensions():
    """DeepSpeed compiles its CPU shared-memory op on first init (about a minute): cache it."""
    os.environ.setdefault("TORCH_EXTENSIONS_DIR", EXTENSIONS_CACHE)


def _max_deviation(state: dict, ref_state: dict) -> float:
    assert state.keys() == ref_state.keys()
    # tokens_per_expert: zeroed by every bias update, in both runs
    return max(
        (torch.as_tensor(state[name]) - value).abs().max().item()
        for name, value in ref_state.items()
        if not name.endswith("tokens_per_expert")
    )


@pytest.mark.distributed
def test_zero_stages_at_dp2_equal_single_process():
    ranks = run_distributed(_zero_worker, 2)
    ref = _reference()
    assert any(v.abs().sum() > 0 for k, v in ref["state"].items() if k.endswith("expert_bias"))
    noise_floor = _max_deviation(_reference(init_noise=2.0**-23)["state"], ref["state"])
    for stage in STAGES:
        for step in range(NUM_STEPS):
            mean_loss = sum(r[stage]["loss"][step] for r in ranks) / len(ranks)
            torch.testing.assert_close(mean_loss, ref["loss"][step], **TOL, msg=f"ZeRO-{stage} loss at step {step}")
        for rank, r in enumerate(ranks):
            for name, grad in ref["grads"].items():
                got = torch.as_tensor(r[stage]["grads"][name])
                torch.testing.assert_close(got, grad, **TOL, msg=lambda m, n=name: f"ZeRO-{stage} grad {n}: {m}")
            deviation = _max_deviation(r[stage]["state"], ref["state"])
            assert deviation <= noise_floor, f"ZeRO-{stage} rank {rank}: params off {deviation:.2e} > {noise_floor:.2e}"


def _gathered_state(model, specs: dict) -> dict[str, torch.Tensor]:
    """The single-process state dict of a TP model whose parameters are local shards."""
    state = model.state_dict()
    for name, param in model.named_parameters():
        name = name.replace("_checkpoint_wrapped_module.", "")
        mesh, placements, shape, stride = specs[name]
        full = DTensor.from_local(param.detach(), mesh, placements, run_check=False, shape=shape, stride=stride)
        state[name] = full.full_tensor()
    return state


def _tp_worker(rank: int, world_size: int) -> dict:
    mesh = init_device_mesh("cpu", (1, 1, 2, 2), mesh_dim_names=MESH_AXES)
    dp_mesh = mesh["dp_shard"]
    dp_rank = dp_mesh.get_local_rank()
    rows = slice(dp_rank * GLOBAL_BATCH // 2, (dp_rank + 1) * GLOBAL_BATCH // 2)
    model = apply_tp(build_model(ds_cfg(), seed=5).train(), mesh["tp"])
    apply_ac(apply_global_aux_losses(model, dp_mesh), "full")
    specs = {
        name.replace("_checkpoint_wrapped_module.", ""): (p.device_mesh, p.placements, p.shape, p.stride())
        for name, p in model.named_parameters()
    }
    optim = dataclasses.replace(Optim(), grad_clip=TP_CLIP)
    engine = build_deepspeed_engine(model, optim, 2, mpu=DeepSpeedMPU.from_mesh(mesh), micro_batch_size=2)
    assert not any(isinstance(p, DTensor) for p in model.parameters())  # DeepSpeed holds local shards
    losses = []
    for step in range(NUM_STEPS):
        tokens, doc_ids = global_batch(step)
        loss = step_loss(engine, tokens[rows], doc_ids[rows])
        engine.backward(loss)
        engine.step()
        update_moe_bias(engine.module, dp_mesh)
        losses.append(loss.item())
    state = {k: v.numpy() for k, v in _gathered_state(model, specs).items()}
    return {"dp_rank": dp_rank, "loss": losses, "state": state}


@pytest.mark.distributed
def test_zero2_with_tp_at_dp2_tp2_equals_single_process():
    ranks = run_distributed(_tp_worker, 4)
    ref = _reference(grad_clip=TP_CLIP)
    noise_floor = _max_deviation(_reference(init_noise=2.0**-23, grad_clip=TP_CLIP)["state"], ref["state"])
    for r in ranks:
        partner = next(p for p in ranks if p["dp_rank"] != r["dp_rank"])
        for step in range(NUM_STEPS):
            mean_loss = (r["loss"][step] + partner["loss"][step]) / 2
            torch.testing.assert_close(mean_loss, ref["loss"][step], **TOL, msg=f"TP loss at step {step}")
        deviation = _max_deviation(r["state"], ref["state"])
        assert deviation <= noise_floor, f"TP: params off by {deviation:.2e} > {noise_floor:.2e}"


def _mpu_worker(rank: int, world_size: int) -> dict:
    mesh = init_device_mesh("cpu", (1, 1, 2, 1), mesh_dim_names=MESH_AXES)
    mpu = DeepSpeedMPU.from_mesh(mesh)
    answers = {
        "dp": (mpu.get_data_parallel_world_size(), mpu.get_data_parallel_rank(), mpu.get_data_parallel_group_ranks()),
        "tp": (mpu.get_tensor_model_parallel_world_size(), mpu.get_tensor_model_parallel_rank()),
        "pp": (mpu.get_pipeline_model_parallel_world_size(), mpu.get_pipe_parallel_rank()),
        "mp": (mpu.get_model_parallel_world_size(), mpu.get_model_parallel_rank()),
    }
    pp_mesh = init_device_mesh("cpu", (2, 1, 1, 1), mesh_dim_names=MESH_AXES)
    pp_mpu = DeepSpeedMPU.from_mesh(pp_mesh)
    answers["pp_mesh"] = (pp_mpu.get_data_parallel_world_size(), pp_mpu.get_model_parallel_world_size())
    model = build_model(ds_cfg(), seed=0)
    with pytest.raises(ValueError, match="allows ZeRO-1 only"):
        build_deepspeed_engine(model, Optim(), 2, mpu=pp_mpu)
    with pytest.raises(ValueError, match="zero_stage must be 1, 2 or 3"):
        build_deepspeed_engine(model, Optim(), 0, mpu=mpu)
    with pytest.raises(ValueError, match="outside the tensor-parallel group"):
        build_deepspeed_engine(apply_ep(model, mesh["dp_shard"]), Optim(), 1, mpu=mpu)
    tp_mesh = init_device_mesh("cpu", (1, 1, 1, 2), mesh_dim_names=MESH_AXES)
    with pytest.raises(ValueError, match="ZeRO-3 cannot run tensor parallelism"):
        tp_model = apply_tp(build_model(ds_cfg(), seed=0), tp_mesh["tp"])
        build_deepspeed_engine(tp_model, Optim(), 3, mpu=DeepSpeedMPU.from_mesh(tp_mesh))
    return answers


@pytest.mark.distributed
def test_mpu_from_mesh_and_layout_errors():
    ranks = run_distributed(_mpu_worker, 2)
    for rank, answers in enumerate(ranks):
        assert answers["dp"] == (2, rank, [0, 1])
        assert answers["tp"] == (1, 0) and answers["pp"] == (1, 0) and answers["mp"] == (1, 0)
        assert answers["pp_mesh"] == (1, 2)
