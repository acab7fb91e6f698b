"""`braid plan`: will this layout fit, and how long is a step? Answered without GPUs.

    p = plan(cfg, nodes=8, gpus_per_node=8, gpu=GPUS["h100"], mfu=0.4)
    print(format_plan(p)); p.fits; suggest_layout(cfg, 8, 8, GPUS["h100"])

The layout is validated by ParallelDims (no process group); parameters come from the model
built on the meta device; per-GPU memory is a formula (docs/launch.md states it):

    static  = 2 B * N_pp,tp (bf16 params) + 2 B * N (bf16 grads) + 12 B * N (fp32 master, Adam m, v),
              each term divided by the ZeRO sharding degree its stage shards it over
    acts    = micro-batches in flight * sum over the rank's blocks of bytes/token * tokens / tp
    total   = static + ZeRO-3's gathered blocks + acts + logits, against 90% of the GPU's memory

Step time = training FLOPs per step / (GPUs * peak * MFU) * (1 + recompute) * (1 + bubble).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from braid.model.config import ModelConfig
from braid.model.pattern import LayerSpec
from braid.parallel.dims import ParallelConfig, ParallelDims
from braid.train.config import TrainConfig

GiB = 2**30
BF16 = 2  # bytes of a parameter, gradient or saved activation under bf16 mixed precision
OPTIMIZER_BYTES = 12  # fp32 master copy + Adam m and v
LOGIT_BYTES = 6  # bf16 logits + their fp32 log-softmax kept for the loss's backward
USABLE_FRACTION = 0.9  # the rest: CUDA context, NCCL buffers, allocator fragmentation
AC_ORDER = ("none", "selective", "full")


@dataclass(frozen=True)
class GpuSpec:
    name: str
    peak_flops: float  # dense bf16 FLOP/s
    memory_gib: float

    @property
    def usable_bytes(self) -> float:
        return USABLE_FRACTION * self.memory_gib * GiB


GPUS = {
    "h100": GpuSpec("H100 SXM", 989e12, 79.6),
    "h200": GpuSpec("H200 SXM", 989e12, 139.8),
    "a100": GpuSpec("A100 SXM 80GB", 312e12, 79.2),
    "b200": GpuSpec("B200", 2250e12, 178.4),
    "mi300x": GpuSpec("MI300X", 1307e12, 191.5),
}


@dataclass
class Memory:
    """Bytes per GPU on the fullest rank, by what holds them."""

    params: float
    grads: float
    optimizer: float
    gathered: float  # ZeRO-3: the root unit and the blocks being computed and prefetched, unsharded
    activations: float
    logits: float
    in_flight: int  # micro-batches whose activations are held at once

    @property
    def total(self) -> float:
        return self.params + self.grads + self.optimizer + self.gathered + self.activations + self.logits


@dataclass
class Plan:
    cfg: TrainConfig
    dims: ParallelDims
    gpu: GpuSpec
    num_params: int
    memory: Memory
    flops_per_step: float
    tokens_per_step: int
    step_s: float
    mfu: float

    @property
    def fits(self) -> bool:
        return self.memory.total <= self.gpu.usable_bytes


def planning_config(name_or_path: str, overrides: list[str]) -> TrainConfig:
    """A training config (named or YAML) with overrides, or a model config name (see
    MODEL_CONFIGS) trained at its max_seq_len with micro-batch 1 on the default data."""
    from braid.configs.models import MODEL_CONFIGS, model_config
    from braid.configs.train import DEFAULT_DATA, TRAIN_CONFIGS
    from braid.train.config import DataConfig, apply_overrides, load_config

    if name_or_path in TRAIN_CONFIGS or name_or_path not in MODEL_CONFIGS:
        return load_config(name_or_path, overrides)
    model = model_config(name_or_path)
    data = DataConfig(path=DEFAULT_DATA, seq_len=model.max_seq_len, batch_size=1)
    cfg = TrainConfig(model=model, data=data, name=name_or_path, out_dir=f"runs/{name_or_path}")
    return apply_overrides(cfg, overrides)


def _param_shares(model, cfg: ModelConfig, dims: ParallelDims) -> dict[str, float]:
    """Parameters per module group as one TP/EP rank holds them (before ZeRO): key "embed",
    "head" (final norm and untied output), each block index; "experts:<i>" the routed
    experts of block i (split by ep, else by tp). Matrices split by tp; vectors replicated."""
    shares: dict[str, float] = {}
    for name, p in model.named_parameters():
        parts = name.split(".")
        key = parts[1] if parts[0] == "layers" else ("embed" if parts[0] == "tok_embeddings" else "head")
        if p.ndim == 3:  # stacked routed experts (E, d_in, d_out)
            key = f"experts:{key}"
            share = p.numel() / (dims.ep if dims.ep > 1 else dims.tp)
        else:
            share = p.numel() / dims.tp if p.ndim == 2 else p.numel()
        shares[key] = shares.get(key, 0.0) + share
    return shares


def _stages(cfg: TrainConfig, dims: ParallelDims) -> list[list[list[int]]]:
    """Per pipeline rank, the layer ids of each of its stages (one stage per rank without PP)."""
    from braid.parallel.pipeline import split_layers, stage_ids_for_rank

    if dims.num_stages == 1:
        return [[list(range(cfg.model.resolved_num_layers))]]
    stages = split_layers(cfg.model, dims.num_stages, dims.cfg.pp_cut_points, seq_len=cfg.data.seq_len)
    return [[stages[s] for s in stage_ids_for_rank(r, dims.pp, dims.cfg.pp_stages_per_rank)] for r in range(dims.pp)]


def activation_elements(cfg: ModelConfig, spec: LayerSpec) -> tuple[float, float]:
    """Elements saved for the backward per token of one block: (tp-split part, d_model-wide
    part). The d_model-wide part (norm inputs and outputs) is split by tp only under
    sequence parallelism."""
    d, i = cfg.d_model, spec.index
    split = 0.0
    if spec.mixer in ("attention", "sliding"):
        heads, kv = cfg.attention.layer_heads(i)
        split += (2 * heads + 2 * kv) * cfg.attention.resolved_head_dim(d)  # q, k, v, attention output
    elif spec.mixer == "mamba2":
        m = cfg.mamba2
        di, gn = m.layer_d_inner(d, i), m.layer_groups(i) * m.d_state
        # z, x, B, C, dt projections; conv outputs x, B, C; scan output; gated-norm input, output
        split += 6 * di + 4 * gn + m.layer_num_heads(d, i)
    elif spec.mixer == "gla":
        g = cfg.gla
        kd, vd = g.key_dim(d), g.value_dim(d)
        split += 3 * kd + 4 * vd + g.gate_low_rank  # q, k, gk; v, gate, output, norm output; gate rank
    if spec.ffn == "mlp":
        split += 3 * cfg.mlp.hidden(i)  # gate, up, gate * up
    elif spec.ffn == "matformer":
        split += 3 * cfg.matformer.d_ff
    elif spec.ffn == "moe":
        m = cfg.moe
        shared = (m.d_shared or m.d_expert) * m.num_shared_experts
        split += m.top_k * (2 * d + 3 * m.d_expert) + 3 * shared + 2 * m.num_experts  # fp32 router logits
    wide = 2 * d * ((spec.mixer is not None) + (spec.ffn is not None))
    return split, wide


def _block_act_bytes(cfg: TrainConfig, dims: ParallelDims, spec: LayerSpec, tokens: float) -> tuple[float, float]:
    """(bytes kept between forward and backward, bytes of the full activations) of one block
    for `tokens` tokens, under activation checkpointing as configured."""
    split, wide = activation_elements(cfg.model, spec)
    sp = dims.tp if dims.cfg.sequence_parallel else 1
    full = BF16 * tokens * (split / dims.tp + wide / sp)
    ac = dims.cfg.activation_checkpointing
    checkpointed = ac == "full" or (ac == "selective" and spec.index % dims.cfg.ac_every == 0)
    kept = BF16 * tokens * cfg.model.d_model / sp if checkpointed else full  # the block's input only
    return kept, full


def _in_flight(dims: ParallelDims, pp_rank: int) -> int:
    """Micro-batches whose activations pipeline rank `pp_rank` holds at its peak: all of them
    under GPipe; under 1F1B (and, approximately, interleaved) pp - pp_rank of them."""
    if dims.pp == 1:
        return 1
    if dims.cfg.pp_schedule == "gpipe":
        return dims.num_microbatches
    return min(dims.num_microbatches, dims.pp - pp_rank)


def _zero_degrees(dims: ParallelDims) -> tuple[int, int]:
    """(sharding degree of dense parameters, of routed-expert parameters) for ZeRO."""
    if dims.cfg.zero_engine == "deepspeed":
        return dims.dp, dims.dp
    return dims.dp_shard, max(1, dims.dp_shard // dims.ep)


def estimate_memory(cfg: TrainConfig, dims: ParallelDims, model) -> Memory:
    """The fullest rank's memory for `cfg` at `dims` (model: the meta-device model)."""
    shares = _param_shares(model, cfg.model, dims)
    ranks = [
        _rank_memory(cfg, dims, shares, [i for ids in stages for i in ids], _in_flight(dims, pp_rank))
        for pp_rank, stages in enumerate(_stages(cfg, dims))
    ]
    return max(ranks, key=lambda memory: memory.total)


def _rank_memory(cfg: TrainConfig, dims: ParallelDims, shares: dict, layer_ids: list[int], in_flight: int) -> Memory:
    """Memory of a rank holding blocks `layer_ids` (and the embedding / head with the first /
    last block) with `in_flight` micro-batches of activations."""
    specs = cfg.model.layers
    last = specs[-1].index in layer_ids
    root = (["embed"] if 0 in layer_ids else []) + (["head"] if last else [])
    dense = sum(shares.get(k, 0.0) for k in [str(i) for i in layer_ids] + root)
    experts = sum(shares.get(f"experts:{i}", 0.0) for i in layer_ids)
    dense_deg, expert_deg = _zero_degrees(dims)
    n_sharded, n_full = dense / dense_deg + experts / expert_deg, dense + experts
    stage = dims.cfg.zero_stage
    gathered = 0.0
    if stage == 3 and dense_deg > 1:  # the root unit stays gathered all step; two blocks at a time
        blocks = [shares.get(str(i), 0.0) + shares.get(f"experts:{i}", 0.0) for i in layer_ids]
        gathered = BF16 * (sum(shares.get(k, 0.0) for k in root) + 2 * max(blocks))
    tokens = cfg.data.seq_len * cfg.data.batch_size / (dims.num_microbatches if dims.pp > 1 else 1)
    acts = [_block_act_bytes(cfg, dims, specs[i], tokens) for i in layer_ids]
    recompute = max(full for _, full in acts) if dims.cfg.activation_checkpointing != "none" else 0.0
    return Memory(
        params=BF16 * (n_sharded if stage == 3 else n_full),
        grads=BF16 * (n_sharded if stage >= 2 else n_full),
        optimizer=OPTIMIZER_BYTES * n_sharded,
        gathered=gathered,
        activations=in_flight * sum(kept for kept, _ in acts) + recompute,
        logits=in_flight * tokens * LOGIT_BYTES * cfg.model.vocab_size / dims.tp if last else 0.0,
        in_flight=in_flight,
    )


def step_overhead(dims: ParallelDims) -> float:
    """Factor on the step time beyond model FLOPs: recomputation under activation
    checkpointing (the forward is 1/3 of the FLOPs) and the pipeline bubble."""
    ac = dims.cfg.activation_checkpointing
    recompute = {"none": 0.0, "full": 1 / 3, "selective": 1 / (3 * dims.cfg.ac_every)}[ac]
    bubble = (dims.pp - 1) / (dims.num_microbatches * dims.cfg.pp_stages_per_rank) if dims.pp > 1 else 0.0
    return (1 + recompute) * (1 + bubble)


def plan(cfg: TrainConfig, nodes: int, gpus_per_node: int, gpu: GpuSpec, mfu: float = 0.4, model=None) -> Plan:
    """Validate cfg.parallel on nodes * gpus_per_node GPUs (ValueError says what to change)
    and estimate its memory per GPU and step time. `model`: the meta model, if built."""
    from braid.model import build_model, flops_per_token

    if not 0 < mfu <= 1:
        raise ValueError(f"--mfu {mfu} must be in (0, 1], e.g. 0.4")
    world = nodes * gpus_per_node
    dims = ParallelDims(cfg.parallel, world, cfg.model)
    if dims.pp > 1:
        _stages(cfg, dims)  # tied embeddings cannot be pipelined: raises
        if cfg.data.batch_size % dims.num_microbatches:
            raise ValueError(
                f"data.batch_size={cfg.data.batch_size} is not a multiple of pp_microbatches={dims.num_microbatches}: "
                "raise data.batch_size or set parallel.pp_microbatches to a divisor of it"
            )
    model = build_model(cfg.model, device="meta") if model is None else model
    tokens = cfg.data.seq_len * cfg.data.batch_size * cfg.optim.grad_accum * dims.dp
    flops = flops_per_token(cfg.model, cfg.data.seq_len) * tokens
    step_s = flops / (world * gpu.peak_flops * mfu) * step_overhead(dims)
    return Plan(
        cfg, dims, gpu, sum(p.numel() for p in model.parameters()), estimate_memory(cfg, dims, model),
        flops, tokens, step_s, mfu,
    )


def candidate_layouts(cfg: TrainConfig, nodes: int, gpus_per_node: int):
    """Layouts to try: tp within a node (1, 2, 4, 8), any pp that divides the rest, each
    activation checkpointing mode; ZeRO-3 (ZeRO-1 for DeepSpeed with pp) over the remaining
    GPUs, one pipeline micro-batch per sequence of the batch. The run's other parallel
    settings are kept (ep where it still divides)."""
    world = nodes * gpus_per_node
    base = cfg.parallel
    for tp in (t for t in (1, 2, 4, 8, 16) if t <= gpus_per_node and gpus_per_node % t == 0):
        for pp in (p for p in range(1, world // tp + 1) if (world // tp) % p == 0):
            if pp > min(cfg.model.resolved_num_layers, cfg.data.batch_size) or (pp > 1 and cfg.model.tie_embeddings):
                continue
            for ac in AC_ORDER:
                ep = base.ep if (world // (tp * pp)) % base.ep == 0 and tp == 1 else 1
                zero = (1 if pp > 1 else 3) if base.zero_engine == "deepspeed" else 3
                yield dataclasses.replace(
                    base, tp=tp, pp=pp, dp_replicate=1, dp_shard=-1, ep=ep, activation_checkpointing=ac,
                    zero_stage=zero, pp_stages_per_rank=1, pp_schedule="1f1b" if pp > 1 else base.pp_schedule,
                    pp_microbatches=cfg.data.batch_size if pp > 1 else None, pp_cut_points=None,
                )


def _global_sequences(cfg: TrainConfig, world: int) -> int | None:
    """Sequences per optimizer step of cfg's layout; None if the layout is invalid."""
    try:
        dims = ParallelDims(cfg.parallel, world, cfg.model)
    except ValueError:
        return None
    return cfg.data.batch_size * cfg.optim.grad_accum * dims.dp


def fitting_layouts(cfg: TrainConfig, nodes: int, gpus_per_node: int, gpu: GpuSpec, mfu: float = 0.4) -> list[Plan]:
    """The valid candidate layouts that fit, best first: least step overhead (recompute and
    pipeline bubble; at a fixed MFU that is the most tokens/s), then least tensor
    parallelism, then least pipeline parallelism. optim.grad_accum is rescaled so that each
    keeps the global batch of `cfg` (layouts that cannot are skipped)."""
    from braid.model import build_model

    world = nodes * gpus_per_node
    target = _global_sequences(cfg, world)
    model = build_model(cfg.model, device="meta")
    fits = []
    for pcfg in candidate_layouts(cfg, nodes, gpus_per_node):
        dp = world // (pcfg.tp * pcfg.pp)
        accum = cfg.optim.grad_accum if target is None else target // (cfg.data.batch_size * dp)
        if accum < 1 or (target is not None and accum * cfg.data.batch_size * dp != target):
            continue
        candidate = dataclasses.replace(cfg, parallel=pcfg, optim=dataclasses.replace(cfg.optim, grad_accum=accum))
        try:
            p = plan(candidate, nodes, gpus_per_node, gpu, mfu, model=model)
        except ValueError:
            continue
        if p.fits:
            fits.append(p)
    return sorted(fits, key=_preference)


def _preference(p: Plan) -> tuple:
    return (round(step_overhead(p.dims), 6), p.dims.tp, p.dims.pp, AC_ORDER.index(p.dims.cfg.activation_checkpointing))


def suggest_layout(cfg: TrainConfig, nodes: int, gpus_per_node: int, gpu: GpuSpec, mfu: float = 0.4) -> Plan | None:
    """The best layout of `fitting_layouts`, or None if none fits."""
    fits = fitting_layouts(cfg, nodes, gpus_per_node, gpu, mfu)
    return fits[0] if fits else None


def layout_overrides(p: Plan) -> str:
    """The overrides that select `p`'s layout (and its gradient accumulation)."""
    dims, c = p.dims, p.dims.cfg
    parts = [f"parallel.tp={dims.tp}", f"parallel.pp={dims.pp}", f"parallel.dp_shard={dims.dp_shard}"]
    parts += [f"parallel.dp_replicate={dims.dp_replicate}"] if dims.dp_replicate > 1 else []
    parts += [f"parallel.ep={dims.ep}"] if dims.ep > 1 else []
    parts += [f"parallel.pp_microbatches={dims.num_microbatches}"] if dims.pp > 1 else []
    parts += [f"parallel.zero_stage={c.zero_stage}", f"parallel.activation_checkpointing={c.activation_checkpointing}"]
    parts += [f"optim.grad_accum={p.cfg.optim.grad_accum}"]
    return " ".join(parts)


def _gib(n: float) -> str:
    return f"{n / GiB:7.2f} GiB"


def _duration(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.1f} s"
    if seconds < 2 * 3600:
        return f"{seconds / 60:.1f} min"
    if seconds < 2 * 86400:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 86400:.1f} days"


def format_short(p: Plan) -> str:
    """One line: a layout's overrides, memory and step time."""
    return (
        f"{layout_overrides(p)}: {p.memory.total / GiB:.1f} GiB, {p.step_s:.2f} s/step "
        f"(overhead {step_overhead(p.dims):.2f})"
    )


def format_plan(p: Plan) -> str:
    """What `braid plan` prints for one layout."""
    d, c, m, cfg = p.dims, p.dims.cfg, p.memory, p.cfg
    world = d.world_size
    micro = cfg.data.batch_size // (d.num_microbatches if d.pp > 1 else 1)
    zero = f"{c.zero_engine} ZeRO-{c.zero_stage}" if d.dp > 1 else "no data parallelism"
    lines = [
        f"layout: pp {d.pp} x dp_replicate {d.dp_replicate} x dp_shard {d.dp_shard} x tp {d.tp} = {world} GPUs"
        f" (ep {d.ep}), {zero}, activation checkpointing {c.activation_checkpointing}"
        + (f", {c.pp_schedule} with {d.num_microbatches} micro-batches" if d.pp > 1 else ""),
        f"memory per GPU (fullest rank; micro-batch {micro} x {cfg.data.seq_len} tokens, {m.in_flight} in flight):",
        f"  parameters (bf16)               {_gib(m.params)}",
        f"  gradients (bf16)                {_gib(m.grads)}",
        f"  optimizer (fp32 master, m, v)   {_gib(m.optimizer)}",
        f"  gathered blocks (ZeRO-3)        {_gib(m.gathered)}",
        f"  activations                     {_gib(m.activations)}",
        f"  logits (bf16 + fp32 loss)       {_gib(m.logits)}",
        f"  total                           {_gib(m.total)} of {p.gpu.usable_bytes / GiB:.1f} GiB usable "
        f"({USABLE_FRACTION:.0%} of {p.gpu.memory_gib} GiB): " + ("fits" if p.fits else "DOES NOT FIT"),
        f"step: {p.tokens_per_step:,} tokens (batch {cfg.data.batch_size} x accum {cfg.optim.grad_accum} x dp {d.dp}"
        f" x seq {cfg.data.seq_len}), {p.flops_per_step / 1e15:,.1f} PFLOP",
        f"  at MFU {p.mfu:.0%} on {world} x {p.gpu.name} ({p.gpu.peak_flops / 1e12:.0f} TFLOP/s bf16 dense)"
        f" x overhead {step_overhead(d):.2f} (recompute, pipeline bubble): {p.step_s:.2f} s/step, "
        f"{p.tokens_per_step / p.step_s:,.0f} tokens/s; {cfg.train.steps:,} steps in {_duration(p.step_s * cfg.train.steps)}",
    ]
    return "\n".join(lines)
