"""Tensor parallelism with sequence parallelism (DTensor), one plan per mixer and FFN kind.

    apply_tp(model_part, tp_mesh, sequence_parallel=True)
    loss = parallel_cross_entropy(logits, labels)      # logits are vocab-sharded DTensors

A plan is data: a dict from a submodule name (relative to the block) to a ParallelStyle, or
to a tuple of styles applied in order. MIXER_PLANS and FFN_PLANS map each layer kind to the
function that builds its plan; a kind without one fails with an error that names it.

Activation layouts with sequence parallelism (R = Replicate, S(d) = Shard(d)):

    tokens R -> embedding (vocab-parallel) -> S(1) residual stream, this rank's T/tp tokens
    block:  norm (SequenceParallel) S(1) -> all-gather once per sublayer -> R
            mixer / FFN on all tokens, this rank's heads / hidden units
            output projection (row-parallel) -> reduce-scatter -> S(1) -> + residual
    final norm S(1) -> all-gather -> head (column-parallel) -> logits S(-1): vocab-sharded

Without sequence parallelism the residual stream is R on every rank and the row-parallel
outputs are all-reduced. Projections (nn.Linear) use torch's Colwise/RowwiseParallel; other
parameters use braid.parallel.styles (LocalShards, ReplicateParallel, PartialSumParallel).
After apply_tp every parameter is a DTensor of the TP mesh.

With expert parallelism (ep > 1, which then spans the TP group) the MoE is not split by
hidden units: it runs on this rank's T/tp tokens of the sequence-parallel residual stream
(`moe_local_plan`, SequenceLocal) and its parameters are left to braid.parallel.ep, which
shards the experts over the ep group; apply_tp(..., expert_parallel=True) selects that plan.

Modules compute on local shards: mixers infer their local head count from their inputs
(braid.model reshapes with -1 heads), MatFormer its local prefix from its local weight.

MatFormer: its hidden units form nested bands (between consecutive granularities). Each
rank must hold an equal share of every band, so that its local prefix of m_i / tp units is
exactly its part of the global prefix of m_i units at every width. The bands are cut into
equal sub-bands of gcd(band sizes) units and rank r holds the r-th part of every sub-band, in
order: the placement _StridedShard(dim, split_factor=number of sub-bands) is that permutation,
so the DTensor's global view keeps the single-process order. DCP cannot save such shards
directly: see braid.parallel.dcp_layout.

Legend: B batch, T time, D d_model, V vocab, N tokens (B*T), v local vocab (V / tp).
"""

from __future__ import annotations

import math
from collections.abc import Callable

from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Replicate, Shard
from torch.distributed.tensor.parallel import (
    ColwiseParallel,
    ParallelStyle,
    PrepareModuleInput,
    PrepareModuleOutput,
    RowwiseParallel,
    SequenceParallel,
    parallelize_module,
)
from torch.distributed.tensor.placement_types import Placement, _StridedShard

from braid.parallel.loss import parallel_cross_entropy
from braid.parallel.styles import LocalShards, PartialSumParallel, ReplicateParallel, SequenceLocal

Plan = dict[str, ParallelStyle | tuple[ParallelStyle, ...]]
PlanBuilder = Callable[[nn.Module, Placement], Plan]

__all__ = [
    "EP_FFN_PLANS",
    "FFN_PLANS",
    "MIXER_PLANS",
    "apply_tp",
    "block_plan",
    "decoder_plan",
    "parallel_cross_entropy",
]


def _mixer_input(residual: Placement) -> PrepareModuleInput:
    # One all-gather per mixer, not per projection; (x, doc_ids, cache) in, doc ids untouched.
    return PrepareModuleInput(
        input_layouts=(residual, None, None),
        desired_input_layouts=(Replicate(), None, None),
        use_local_output=False,
    )


def attention_plan(mixer: nn.Module, residual: Placement) -> Plan:
    """Query and key/value heads split over ranks (GQA groups stay whole)."""
    return {
        "mixer": _mixer_input(residual),
        "mixer.wq": ColwiseParallel(),
        "mixer.wk": ColwiseParallel(),
        "mixer.wv": ColwiseParallel(),
        "mixer.wo": RowwiseParallel(output_layouts=residual),
    }


def gla_plan(mixer: nn.Module, residual: Placement) -> Plan:
    """Heads split over ranks; the low-rank gate's down projection is replicated."""
    return {
        "mixer": _mixer_input(residual),
        "mixer.q_proj": ColwiseParallel(),
        "mixer.k_proj": ColwiseParallel(),
        "mixer.v_proj": ColwiseParallel(),
        "mixer.g_proj": ColwiseParallel(),
        "mixer.gk_down": ReplicateParallel(),
        "mixer.gk_up": ColwiseParallel(),
        "mixer.norm": LocalShards({"weight": Shard(0)}),
        "mixer.o_proj": RowwiseParallel(output_layouts=residual),
    }


def mamba2_plan(mixer: nn.Module, residual: Placement) -> Plan:
    """Heads (and B/C groups, and gated-norm groups) split over ranks."""
    conv = LocalShards({"weight": Shard(0), "bias": Shard(0)})
    per_head = LocalShards({"dt_bias": Shard(0), "A_log": Shard(0), "D": Shard(0)})
    return {
        "mixer": (_mixer_input(residual), per_head),
        "mixer.z_proj": ColwiseParallel(),
        "mixer.x_proj": ColwiseParallel(),
        "mixer.B_proj": ColwiseParallel(),
        "mixer.C_proj": ColwiseParallel(),
        "mixer.dt_proj": ColwiseParallel(),
        "mixer.conv_x": conv,
        "mixer.conv_B": conv,
        "mixer.conv_C": conv,
        "mixer.norm": LocalShards({"weight": Shard(0)}),
        "mixer.out_proj": RowwiseParallel(output_layouts=residual),
    }


def mlp_plan(ffn: nn.Module, residual: Placement) -> Plan:
    """Megatron's MLP: gate and up projections by rows, down projection by columns."""
    return {
        "ffn": PrepareModuleInput(
            input_layouts=(residual,), desired_input_layouts=(Replicate(),), use_local_output=False
        ),
        "ffn.w1": ColwiseParallel(),
        "ffn.w3": ColwiseParallel(),
        "ffn.w2": RowwiseParallel(output_layouts=residual),
    }


def moe_plan(ffn: nn.Module, residual: Placement) -> Plan:
    """Every expert's hidden units (d_expert) split over ranks, router replicated, shared
    expert split like the MLP; the MoE's output is a partial sum over ranks."""
    placements: dict[str, Placement] = {"w1": Shard(2), "w3": Shard(2), "w2": Shard(1), "router.weight": Replicate()}
    if hasattr(ffn, "shared"):
        placements.update({"shared.w1.weight": Shard(0), "shared.w3.weight": Shard(0), "shared.w2.weight": Shard(1)})
    return {"ffn": PartialSumParallel(placements, input_layout=residual, output_layout=residual)}


def moe_local_plan(ffn: nn.Module, residual: Placement) -> Plan:
    """Under expert parallelism: the MoE runs on this rank's sequence-parallel tokens, its
    parameters untouched here (braid.parallel.ep shards the experts over the ep group, which
    spans the TP ranks, and replicates the router and shared expert)."""
    if not isinstance(residual, Shard):
        raise ValueError("an MoE under expert and tensor parallelism needs sequence_parallel=True")
    return {"ffn": SequenceLocal(input_layout=residual)}


def matformer_plan(ffn: nn.Module, residual: Placement) -> Plan:
    """Hidden units split over ranks so that every rank holds a share of every nesting band
    (see the module docstring)."""
    cfg = ffn.cfg
    bounds = [0] + [cfg.hidden(g) for g in cfg.granularities]
    sub_band = math.gcd(*(hi - lo for lo, hi in zip(bounds, bounds[1:])))
    num_sub_bands = cfg.d_ff // sub_band
    rows, cols = _StridedShard(0, split_factor=num_sub_bands), _StridedShard(1, split_factor=num_sub_bands)
    placements = {"w1.weight": rows, "w3.weight": rows, "w2.weight": cols}
    return {"ffn": PartialSumParallel(placements, input_layout=residual, output_layout=residual)}


MIXER_PLANS: dict[str, PlanBuilder] = {
    "attention": attention_plan,
    "sliding": attention_plan,
    "gla": gla_plan,
    "mamba2": mamba2_plan,
}
FFN_PLANS: dict[str, PlanBuilder] = {"mlp": mlp_plan, "moe": moe_plan, "matformer": matformer_plan}
EP_FFN_PLANS: dict[str, PlanBuilder] = {**FFN_PLANS, "moe": moe_local_plan}


def _norm_style(sequence_parallel: bool) -> ParallelStyle:
    return SequenceParallel() if sequence_parallel else ReplicateParallel()


def block_plan(block: nn.Module, sequence_parallel: bool = True, expert_parallel: bool = False) -> Plan:
    """The TP plan of one Block: its norms plus the plans of its mixer and FFN kinds
    (EP_FFN_PLANS when the MoE experts are expert-parallel)."""
    residual = Shard(1) if sequence_parallel else Replicate()
    spec = block.spec
    plan: Plan = {}
    ffn_plans = EP_FFN_PLANS if expert_parallel else FFN_PLANS
    for sublayer, kind, registry in (("mixer", spec.mixer, MIXER_PLANS), ("ffn", spec.ffn, ffn_plans)):
        if kind is None:
            continue
        if kind not in registry:
            table = "MIXER_PLANS" if sublayer == "mixer" else "FFN_PLANS"
            raise ValueError(
                f"layer {spec.index}: no tensor-parallel plan for {sublayer} kind {kind!r}; add one to "
                f"braid.parallel.tp.{table} (plans exist for {sorted(registry)}) or run with tp=1"
            )
        plan[f"{sublayer}_norm"] = _norm_style(sequence_parallel)
        plan.update(registry[kind](getattr(block, sublayer), residual))
    return plan


def decoder_plan(model: nn.Module, sequence_parallel: bool = True) -> Plan:
    """Vocab-parallel embedding and head, and the final norm (entries for the parts present)."""
    residual = Shard(1) if sequence_parallel else Replicate()
    plan: Plan = {}
    if model.tok_embeddings is not None:
        plan["tok_embeddings"] = RowwiseParallel(input_layouts=Replicate(), output_layouts=residual)
    if model.norm is not None:
        # The head reads the gathered, replicated hidden states: its logits are vocab-sharded.
        if sequence_parallel:
            gather = PrepareModuleOutput(
                output_layouts=Shard(1), desired_output_layouts=Replicate(), use_local_output=False
            )
            plan["norm"] = (SequenceParallel(), gather)
        else:
            plan["norm"] = ReplicateParallel(use_local_output=False)
    if model.output is not None:
        plan["output"] = ColwiseParallel(input_layouts=Replicate(), output_layouts=Shard(-1), use_local_output=False)
    return plan


def apply_plan(module: nn.Module, tp_mesh: DeviceMesh, plan: Plan) -> None:
    """Apply every style of `plan` to the named submodules of `module`."""
    for name, styles in plan.items():
        target = module.get_submodule(name)
        for style in styles if isinstance(styles, tuple) else (styles,):
            parallelize_module(target, tp_mesh, style)


def apply_tp(
    model: nn.Module, tp_mesh: DeviceMesh, sequence_parallel: bool = True, expert_parallel: bool = False
) -> nn.Module:
    """Shard a Decoder (or a pipeline stage of one) over the 1-D `tp_mesh`, in place.

    The model must hold the same weights on every rank (built from one seed, or on meta).
    Its logits come out as DTensors sharded on the vocab: use parallel_cross_entropy. With
    sequence_parallel the sequence length must be a multiple of the TP size.
    expert_parallel: the MoE layers run on local tokens and keep their parameters whole,
    for braid.parallel.ep.apply_ep to shard next (needs sequence_parallel).
    """
    if tp_mesh.ndim != 1:
        raise ValueError(f"apply_tp needs a 1-D tp mesh, got dims {tp_mesh.mesh_dim_names}")
    plans = {key: block_plan(block, sequence_parallel, expert_parallel) for key, block in model.layers.items()}
    apply_plan(model, tp_mesh, decoder_plan(model, sequence_parallel))
    for key, block in model.layers.items():
        apply_plan(block, tp_mesh, plans[key])
    _check_all_sharded(model, skip_moe=expert_parallel)
    if sequence_parallel and model.tok_embeddings is not None:
        model.register_forward_pre_hook(_sequence_length_check(tp_mesh.size()), with_kwargs=True)
    return model


def _check_all_sharded(model: nn.Module, skip_moe: bool) -> None:
    moe_prefixes = tuple(
        f"layers.{key}.ffn." for key, block in model.layers.items() if skip_moe and block.spec.ffn == "moe"
    )
    plain = [
        name
        for name, param in model.named_parameters()
        if not isinstance(param, DTensor) and not (moe_prefixes and name.startswith(moe_prefixes))
    ]
    if plain:
        raise ValueError(
            f"tensor parallelism left parameters {plain[:4]} out of every plan; add their modules to the "
            "plan of their layer kind (ReplicateParallel to keep them whole)"
        )


def _sequence_length_check(tp: int):
    def check(module, args, kwargs):
        tokens_BT = args[0] if args else kwargs["tokens_BT"]
        if tokens_BT.shape[1] % tp:
            raise ValueError(
                f"sequence parallelism splits the {tokens_BT.shape[1]} tokens of each row over tp={tp} "
                "ranks: use a sequence length that is a multiple of tp, or sequence_parallel=False"
            )

    return check
