"""Pipeline parallelism: the cost-balanced stage split, stage slices that chain to the full
model (aux-loss gradients included), and training at pp=2 (1F1B, interleaved 1F1B with 4
stages, GPipe) and pp=2 x tp=2 equal to one process on the same global batches.

The reference accumulates the pipeline's microbatches (as the trainer's gradient
accumulation does) rather than running one batch: the MoE load-balancing loss is a
per-forward statistic, so only the same microbatches define the same objective.

Tolerance: training runs in float64 and matches to rtol 1e-9 / atol 1e-12 (as
test_tp.py). Not float32, because AdamW divides each gradient element by its own RMS:
where an element is mostly rounding, a reordered sum (TP's reduce-scatter) moves it by a
visible fraction of lr. Measured here in float32 after 5 steps: pp2 within rtol 1e-5 /
atol 1e-6 of the single process, pp2 x tp2 off by 1.3e-6 (relative 1.2e-4) on one element
of 1536 (an MLP w3 entry).
"""

import dataclasses
import itertools

import pytest
import torch
import torch.nn.functional as F

from braid.configs import model_config
from braid.model import ModelConfig, build_model
from braid.parallel import ParallelConfig, ParallelDims, gather_full_state_dict, parallelize
from braid.parallel import pipeline as pipeline_module
from braid.parallel.pipeline import (
    IGNORE_INDEX,
    CostWeights,
    StageDecoder,
    build_pipeline,
    build_stage_modules,
    layer_costs,
    pipeline_eval,
    pipeline_step,
    split_layers,
    stage_ids_for_rank,
)
from braid.parallel.testing import run_distributed
from tests.helpers import ALL_KINDS, packed_batch, small_model_config

SEED = 3
STEPS = 5
MICROBATCHES = 4
LR = 3e-3
WIDTHS = [None, 0.5, None, 0.25, None]  # MatFormer width per step
LAYOUTS = {"1f1b": 1, "interleaved_1f1b": 2, "gpipe": 1}  # schedule -> stages per rank
TP_LAYOUTS = {"1f1b": 1, "interleaved_1f1b": 2}
VOCAB = {1: 97, 2: 96}  # tp -> vocab size (the vocab-parallel head needs tp | vocab)
EVAL_STEP = 99  # the batch pipeline_eval is checked on, after training
DTYPE = torch.float64
TOL64 = dict(rtol=1e-9, atol=1e-12)  # float64 rounding after 5 AdamW steps


def small_cfg(pattern: str = ALL_KINDS, **changes) -> ModelConfig:
    """The shared small model with aux-loss-free MoE balancing on, so update_moe_bias runs per stage too."""
    cfg = small_model_config(pattern)
    return dataclasses.replace(cfg, **{"moe": dataclasses.replace(cfg.moe, bias_balancing=True), **changes})


make_batch = packed_batch


def train_single_process(cfg: ModelConfig) -> tuple[list[float], list[dict], dict]:
    """The trainer's step on one process: accumulate MICROBATCHES, CE over the step's targets."""
    model = build_model(cfg, seed=SEED).to(DTYPE)
    opt = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=0.1)
    losses, auxes = [], []
    for step in range(STEPS):
        batch = make_batch(step, cfg.vocab_size)
        num_targets = int((batch["labels"] != IGNORE_INDEX).sum())
        total, aux_total = 0.0, {}
        for tokens, labels, doc_ids in zip(*(batch[k].tensor_split(MICROBATCHES) for k in batch)):
            logits, aux = model(tokens, doc_ids, widths=WIDTHS[step], return_aux=True)
            ce = F.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=IGNORE_INDEX, reduction="sum")
            loss = ce / num_targets + sum(aux.values()) / MICROBATCHES
            loss.backward()
            total += loss.item()
            for name, value in aux.items():
                aux_total[name] = aux_total.get(name, 0.0) + value.item() / MICROBATCHES
        opt.step()
        model.update_moe_bias()
        opt.zero_grad()
        losses.append(total)
        auxes.append(aux_total)
    return losses, auxes, {k: v.detach().clone() for k, v in model.state_dict().items()}, _eval_ce_sum(model)


@torch.no_grad()
def _eval_ce_sum(model) -> float:
    """Summed cross-entropy of the evaluation batch, in eval mode (what pipeline_eval returns)."""
    model.eval()
    batch = make_batch(EVAL_STEP, model.cfg.vocab_size)
    logits = model(batch["input_ids"], batch["doc_ids"])
    model.train()
    ce = F.cross_entropy(logits.flatten(0, 1), batch["labels"].flatten(), ignore_index=IGNORE_INDEX, reduction="sum")
    return ce.item()


def _train_pipelined(rank: int, world_size: int, tp: int, layouts: dict[str, int], split_loop: bool = False) -> dict:
    """Every layout through braid.parallel's API, as the trainer calls it. split_loop: drive
    the schedules as on torches whose step cannot take pre-split microbatches (2.11)."""
    if split_loop:
        pipeline_module.SCHEDULE_TAKES_MICROBATCHES = False
    cfg = small_cfg(vocab_size=VOCAB[tp])
    full_state = build_model(cfg, seed=SEED).to(DTYPE).state_dict()
    results = {}
    for schedule, stages_per_rank in layouts.items():
        pcfg = ParallelConfig(
            pp=2, tp=tp, pp_schedule=schedule, pp_stages_per_rank=stages_per_rank, pp_microbatches=MICROBATCHES
        )
        dims = ParallelDims(pcfg, world_size, cfg)
        mesh = dims.build_mesh("cpu")
        pp_mesh = dims.get_mesh("pp")
        pipe = build_pipeline(
            cfg,
            pp_mesh.get_local_rank(),
            dims.pp,
            pcfg.pp_schedule,
            dims.num_microbatches,
            pcfg.pp_stages_per_rank,
            group=pp_mesh.get_group(),
            cut_points=pcfg.pp_cut_points,
            parallelize_fn=lambda part: parallelize(part.to(DTYPE), dims, mesh),
            mesh=mesh,
            state_dict=full_state,
        )
        params = [p for module in pipe.modules for p in module.parameters()]
        opt = torch.optim.AdamW(params, lr=LR, weight_decay=0.1)
        losses, auxes = [], []
        for step in range(STEPS):
            out = pipeline_step(pipe, make_batch(step, cfg.vocab_size), widths=WIDTHS[step])
            opt.step()
            for module in pipe.modules:
                module.update_moe_bias()
            opt.zero_grad()
            losses.append(out.loss.item())
            auxes.append({name: value.item() for name, value in out.aux.items()})
        ce_sum = pipeline_eval(pipe, make_batch(EVAL_STEP, cfg.vocab_size)).item()
        state = [{k: v.numpy().copy() for k, v in gather_full_state_dict(m).items()} for m in pipe.modules]
        results[schedule] = {
            "losses": losses, "aux": auxes, "state": state, "layer_ids": pipe.layer_ids, "eval": ce_sum
        }
    return results


@pytest.fixture(scope="module")
def pp2_runs():
    return run_distributed(_train_pipelined, 2, (1, LAYOUTS))


@pytest.fixture(scope="module")
def pp2_split_loop_runs():
    return run_distributed(_train_pipelined, 2, (1, {"1f1b": 1, "interleaved_1f1b": 2}, True))


@pytest.fixture(scope="module")
def pp2_tp2_runs():
    return run_distributed(_train_pipelined, 4, (2, TP_LAYOUTS))


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Run like the workers: on a busy 2-core box, 2 intra-op threads made it 20x slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def reference_runs():
    return {tp: train_single_process(small_cfg(vocab_size=VOCAB[tp])) for tp in VOCAB}


def check_equal_to_reference(per_rank: list[dict], num_stages: int, reference) -> None:
    """Losses and aux on every rank, and the final state dict of every pipeline (one per TP
    rank: world ranks are laid out (pp, tp), tp innermost), equal to the reference."""
    ref_losses, ref_aux, ref_state, ref_eval = reference
    for r in per_rank:  # every rank reports the whole pipeline's loss, aux and eval CE
        torch.testing.assert_close(r["losses"], ref_losses, **TOL64)
        torch.testing.assert_close(r["eval"], ref_eval, **TOL64)
        for aux, ref in zip(r["aux"], ref_aux):
            assert aux.keys() == ref.keys() == {"moe_load_balance", "moe_z_loss"}
            torch.testing.assert_close(aux, ref, **TOL64)
    tp = len(per_rank) // 2
    for pipeline in (per_rank[t::tp] for t in range(tp)):
        stage_layers = [ids for r in pipeline for ids in r["layer_ids"]]
        assert len(stage_layers) == num_stages and sorted(sum(stage_layers, [])) == list(range(6))
        state = {}
        for r in pipeline:
            for part in r["state"]:
                assert not state.keys() & part.keys(), "a parameter lives on two stages"
                state.update({k: torch.from_numpy(v) for k, v in part.items()})
        assert state.keys() == ref_state.keys()
        for name, value in state.items():
            torch.testing.assert_close(value, ref_state[name], **TOL64, msg=lambda m: f"{name}: {m}")


@pytest.mark.distributed
@pytest.mark.parametrize("schedule", LAYOUTS)
def test_pp2_training_equals_single_process(schedule, pp2_runs, reference_runs):
    check_equal_to_reference([run[schedule] for run in pp2_runs], 2 * LAYOUTS[schedule], reference_runs[1])


@pytest.mark.distributed
@pytest.mark.parametrize("schedule", ["1f1b", "interleaved_1f1b"])
def test_pp2_through_the_schedules_microbatch_loop_equals_single_process(schedule, pp2_split_loop_runs, reference_runs):
    """The path torch 2.11 takes (its step only splits whole batches): same training, same eval."""
    check_equal_to_reference([run[schedule] for run in pp2_split_loop_runs], 2 * LAYOUTS[schedule], reference_runs[1])


@pytest.mark.distributed
@pytest.mark.parametrize("schedule", TP_LAYOUTS)
def test_pp2_tp2_training_equals_single_process(schedule, pp2_tp2_runs, reference_runs):
    check_equal_to_reference([run[schedule] for run in pp2_tp2_runs], 2 * TP_LAYOUTS[schedule], reference_runs[2])


def test_reference_training_moves_every_parameter(reference_runs):
    """The parity above is not vacuous: 5 steps change every parameter of the model."""
    start = build_model(small_cfg(), seed=SEED).to(DTYPE).state_dict()
    _, _, final, _ = reference_runs[1]
    moved = {k for k, v in final.items() if not torch.equal(v, start[k])}
    params = {k for k, _ in build_model(small_cfg(), device="meta").named_parameters()}
    assert params <= moved


def test_stage_slices_chain_to_full_model_with_aux_gradients():
    """Three StageDecoders run in sequence give the full model's logits, and backward of the
    CE alone through them (aux attached by _AuxGrad) gives the gradients of
    CE + aux_scale * sum(aux) of the full model."""
    cfg, aux_scale = small_cfg(), 0.25
    full = build_model(cfg, seed=SEED).to(torch.float64)
    batch = make_batch(0, cfg.vocab_size, batch_size=2)
    tokens, labels, doc_ids = batch["input_ids"], batch["labels"], batch["doc_ids"]
    logits, aux = full(tokens, doc_ids, return_aux=True)
    ce = F.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=IGNORE_INDEX)
    (ce + aux_scale * sum(aux.values())).backward()

    stage_layers = [[0, 1], [2, 3, 4], [5]]  # MoE only in layer 1
    parts = [StageDecoder(cfg, layer_ids=ids, embed=i == 0, head=i == 2) for i, ids in enumerate(stage_layers)]
    h = tokens
    for part in parts:
        part.to(torch.float64).load_state_dict({k: full.state_dict()[k] for k in part.state_dict()})
        h = part(h, doc_ids, aux_scale=aux_scale)
    torch.testing.assert_close(h, logits, rtol=1e-12, atol=1e-12)
    F.cross_entropy(h.flatten(0, 1), labels.flatten(), ignore_index=IGNORE_INDEX).backward()
    assert parts[0].aux_log[0].keys() == {"moe_load_balance", "moe_z_loss"} and parts[2].aux_log == [{}]
    grads = {k: p.grad for part in parts for k, p in part.named_parameters()}
    assert grads.keys() == dict(full.named_parameters()).keys()
    for name, param in full.named_parameters():
        # float64: only the order of summing CE and aux gradients differs.
        torch.testing.assert_close(grads[name], param.grad, rtol=1e-10, atol=1e-12, msg=lambda m: f"{name}: {m}")


def test_stage_modules_on_meta_cover_the_full_state_dict_once():
    cfg = small_cfg()
    full_keys = set(build_model(cfg, device="meta").state_dict())
    for pp_size, per_rank in [(1, 1), (2, 1), (3, 2), (2, 3)]:
        keys: list[str] = []
        for rank in range(pp_size):
            stage_ids, layer_ids, modules = build_stage_modules(cfg, rank, pp_size, per_rank)
            assert stage_ids == stage_ids_for_rank(rank, pp_size, per_rank)
            assert all(p.is_meta for m in modules for p in m.parameters())
            assert [sorted(int(k) for k in m.layers) for m in modules] == layer_ids
            keys += [k for m in modules for k in m.state_dict()]
        assert len(keys) == len(set(keys)) and set(keys) == full_keys


def test_stage_ids_are_loop_style():
    assert stage_ids_for_rank(1, 4, 3) == [1, 5, 9]
    assert stage_ids_for_rank(0, 2) == [0]
    with pytest.raises(ValueError, match="pp_rank=2"):
        stage_ids_for_rank(2, 2)


def _max_stage_cost(costs, split):
    return max(sum(costs[i] for i in ids) for ids in split)


@pytest.mark.parametrize("pattern", ["M- S8E GF A- M S6F A- ME", "AE A- A- A- GF M"])
@pytest.mark.parametrize("weights", [CostWeights(), CostWeights(1.0, 0.0), CostWeights(0.0, 1.0)])
def test_split_is_contiguous_and_minimises_the_costliest_stage(pattern, weights):
    cfg = small_cfg(pattern)
    num_layers = cfg.resolved_num_layers
    costs = layer_costs(cfg, seq_len=32, weights=weights)
    assert len(costs) == num_layers and all(c > 0 for c in costs)
    for num_stages in range(1, num_layers + 1):
        split = split_layers(cfg, num_stages, seq_len=32, weights=weights)
        assert [i for ids in split for i in ids] == list(range(num_layers))
        assert len(split) == num_stages and all(split)
        brute = min(
            _max_stage_cost(costs, split_layers(cfg, num_stages, list(cuts)))
            for cuts in itertools.combinations(range(1, num_layers), num_stages - 1)
        )
        assert _max_stage_cost(costs, split) == pytest.approx(brute, rel=1e-12)


def test_split_counts_embedding_head_and_expert_parameters():
    dense = small_cfg("A-", num_layers=8)
    assert split_layers(dense, 2, weights=CostWeights(1.0, 0.0)) == [list(range(4)), list(range(4, 8))]
    # A large vocabulary makes the head's FLOPs (last stage) outweigh a few layers.
    big_head = small_cfg("A-", num_layers=8, vocab_size=2048)
    first, last = split_layers(big_head, 2, weights=CostWeights(1.0, 0.0))
    assert len(first) > len(last)
    # The embedding's parameters weigh on the first stage only when parameters count.
    assert split_layers(big_head, 2, weights=CostWeights(0.0, 1.0)) == [list(range(4)), list(range(4, 8))]
    # 64 experts hold far more parameters than they compute with: by parameters the MoE
    # layer gets a stage of its own, by FLOPs it shares one.
    moe = small_cfg("AE A- A- A-", moe=dataclasses.replace(small_cfg().moe, num_experts=64))
    assert split_layers(moe, 2, weights=CostWeights(0.0, 1.0))[0] == [0]
    assert split_layers(moe, 2, weights=CostWeights(1.0, 0.0))[0] == [0, 1]


def test_manual_cut_points():
    cfg = small_cfg()
    assert split_layers(cfg, 3, [1, 4]) == [[0], [1, 2, 3], [4, 5]]
    for cuts, match in [
        ([2], "has 1 entries; 3 stages need 2"),
        ([3, 2], "strictly increasing"),
        ([2, 2], "strictly increasing"),
        ([0, 3], r"must lie in 1\.\.5"),
        ([3, 6], r"must lie in 1\.\.5"),
        ([1.5, 3], "ints"),
    ]:
        with pytest.raises(ValueError, match=match):
            split_layers(cfg, 3, cuts)


def test_split_errors_say_what_to_change():
    with pytest.raises(ValueError, match="between 1 and 6 stages"):
        split_layers(small_cfg(), 7)
    with pytest.raises(ValueError, match="set tie_embeddings=False"):
        split_layers(small_cfg(tie_embeddings=True), 2)
    with pytest.raises(ValueError, match="must be >= 0"):
        CostWeights(-1.0, 1.0)


@pytest.mark.parametrize(
    "schedule, microbatches, per_rank, match",
    [
        ("zero_bubble", 4, 1, "not one of"),
        ("interleaved_1f1b", 4, 1, "pp_stages_per_rank >= 2"),
        ("1f1b", 4, 2, "set pp_stages_per_rank=1 or pp_schedule='interleaved_1f1b'"),
        ("1f1b", 1, 1, "use at least 2 microbatches"),
    ],
)
def test_build_pipeline_rejects_bad_layouts(schedule, microbatches, per_rank, match):
    with pytest.raises(ValueError, match=match):
        build_pipeline(small_cfg(), 0, 2, schedule, microbatches, per_rank)
