"""DeepSpeed ZeRO (stages 1, 2, 3) as braid's alternative data-parallel engine.

    mpu = DeepSpeedMPU.from_mesh(mesh)        # braid's world mesh (pp, dp_replicate, dp_shard, tp)
    engine = build_deepspeed_engine(model, optim_cfg, zero_stage=2, mpu=mpu, micro_batch_size=8)
    logits_BTV, aux = engine(tokens_BT, doc_ids_BT, return_aux=True)
    engine.backward(loss); engine.step()      # gradient averaging over dp, ZeRO, AdamW

The engine gets an explicit config: ZeRO stage, gradient clipping (DeepSpeed 0.19.8 clips
at 1.0 unless told otherwise), bf16 on GPU and fp32 on CPU, the micro-batch size and the
gradient-accumulation steps, and zero_allow_untested_optimizer for the client AdamW, whose
parameter groups are those of the single-process run (no decay for
model.no_weight_decay_names()). The `mpu` adapter answers the Megatron-style questions
DeepSpeed asks (data-, tensor-, pipeline- and model-parallel group, size and rank; 0.19.8
calls the names defined on DeepSpeedMPU) from process groups, so gradients are averaged
over the data-parallel ranks only.

Tensor parallelism: braid's TP makes every parameter a DTensor, which DeepSpeed 0.19.8 cannot
hold (measured on gloo): its engine registers a weakref.finalize on each parameter and then
calls module.to(device), which must swap DTensor parameters (torch.utils.swap_tensors) and
refuses tensors with weakrefs; past that, _broadcast_model calls dist.broadcast on DTensors
(no sharding strategy for c10d.broadcast_), ZeRO-1/2 copy DTensor gradients into flat plain
buckets (aten.copy_ with mixed Tensor and DTensor) and ZeRO-3 looks for ds_status on them.
So build_deepspeed_engine hands DeepSpeed plain local shards (tp_on_local_tensors): each TP
parameter is stored as its local shard and reads as a DTensor view of it while the model
runs forward, which works with ZeRO-1 and ZeRO-2 (activation checkpointing included).
ZeRO-3 gathers parameters in its own per-module hooks, which the views cannot follow: with
TP it raises, as do expert-parallel DTensors (their shards would be averaged over ranks that
hold other experts): use zero_engine="fsdp2" for those.

Pipeline parallelism: DeepSpeed allows ZeRO-1 only (its own PipelineEngine asserts it:
ZeRO-2 reduces and partitions gradients inside backward, ZeRO-3 gathers parameters in its
own forward hooks, and a pipeline schedule runs both itself). One engine holds all of a
rank's stages (`StageParts`, interleaved schedules have several), built in unmanaged
accumulation mode: the torch pipeline schedule runs backward with plain autograd into
param.grad (ZeRO-1 keeps full gradients; its gradient hooks only stage buffers outside the
engine's backward), and engine.step() reduces them over the data-parallel group
(reduce_gradients, as DeepSpeed's PipelineEngine does at ReduceGrads), clips and steps.
DeepSpeed's gradient norm sums the squares over the data-parallel group and then over the
mpu's model-parallel group, which DeepSpeedMPU.from_mesh makes the tp x pp ranks of one
replica: with every local stage in the one engine that is the whole model's norm, so
DeepSpeed's gradient_clipping clips at the single-process norm (and its non-finite check,
MAX-reduced over the same groups, skips the step on every stage at once).

On GPU DeepSpeed's bf16 mode casts every parameter to bf16 for compute (keeping float32
master weights), the SSM parameters (A_log, D, dt_bias) included: braid's rule that they
stay float32 holds under FSDP2 only.

On CPU DeepSpeed JIT-compiles a shared-memory comm op when it first initialises (about a
minute); TORCH_EXTENSIONS_DIR defaults here to a fixed cache so that it compiles once.
"""

from __future__ import annotations

import os
from typing import Any, NamedTuple

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor

__all__ = [
    "DeepSpeedMPU",
    "DeepSpeedState",
    "StageParts",
    "build_deepspeed_engine",
    "deepspeed_config",
    "param_groups",
    "tp_on_local_tensors",
]

EXTENSIONS_CACHE = os.path.join(os.path.expanduser("~"), ".cache", "braid-torch-extensions")
MESH_AXES = ("pp", "dp_replicate", "dp_shard", "tp")


class DeepSpeedMPU:
    """The Megatron-style model-parallel unit DeepSpeed takes as `mpu`, from process groups.

    dp_group: ranks that average gradients (hold different batches). tp_group, pp_group:
    tensor- and pipeline-parallel peers (None: this rank alone). model_parallel_group: the
    tp x pp ranks of one data-parallel replica, over which DeepSpeed sums gradient norms
    (None: tp_group when pp is 1, else required).
    """

    def __init__(
        self,
        dp_group: dist.ProcessGroup,
        tp_group: dist.ProcessGroup | None = None,
        pp_group: dist.ProcessGroup | None = None,
        model_parallel_group: dist.ProcessGroup | None = None,
    ):
        # DeepSpeed reduces over these groups even when they are trivial: give it real ones.
        alone = dist.new_subgroups(group_size=1)[0] if tp_group is None or pp_group is None else None
        self._dp = dp_group
        self._tp = tp_group if tp_group is not None else alone
        self._pp = pp_group if pp_group is not None else alone
        if model_parallel_group is None:
            if dist.get_world_size(self._pp) > 1:
                raise ValueError("DeepSpeedMPU: with pp > 1 pass model_parallel_group (the tp x pp ranks)")
            model_parallel_group = self._tp
        self._mp = model_parallel_group

    @classmethod
    def from_mesh(cls, mesh: DeviceMesh) -> DeepSpeedMPU:
        """From braid's world mesh with axes (pp, dp_replicate, dp_shard, tp) (ParallelDims).

        Creates the data-parallel and model-parallel groups (a collective: every rank calls it).
        """
        if tuple(mesh.mesh_dim_names or ()) != MESH_AXES:
            raise ValueError(
                f"DeepSpeedMPU.from_mesh needs the world mesh with axes {MESH_AXES}, got {mesh.mesh_dim_names}"
            )
        ranks_PRST = mesh.mesh
        num_pp, _, _, num_tp = ranks_PRST.shape
        dp_ranks = ranks_PRST.permute(0, 3, 1, 2).reshape(num_pp * num_tp, -1).tolist()
        mp_ranks = ranks_PRST.permute(1, 2, 0, 3).reshape(-1, num_pp * num_tp).tolist()
        dp_group = dist.new_subgroups_by_enumeration(dp_ranks)[0]
        mp_group = dist.new_subgroups_by_enumeration(mp_ranks)[0]
        return cls(dp_group, mesh.get_group("tp"), mesh.get_group("pp"), mp_group)

    def get_data_parallel_group(self) -> dist.ProcessGroup:
        return self._dp

    def get_data_parallel_world_size(self) -> int:
        return dist.get_world_size(self._dp)

    def get_data_parallel_rank(self) -> int:
        return dist.get_rank(self._dp)

    def get_data_parallel_group_ranks(self) -> list[int]:
        return dist.get_process_group_ranks(self._dp)

    def get_sequence_data_parallel_group(self) -> dist.ProcessGroup:
        return self._dp

    def get_sequence_data_parallel_world_size(self) -> int:
        return self.get_data_parallel_world_size()

    def get_sequence_data_parallel_rank(self) -> int:
        return self.get_data_parallel_rank()

    def get_sequence_parallel_group(self) -> dist.ProcessGroup:
        return _self_group()

    def get_sequence_parallel_world_size(self) -> int:
        return 1

    def get_sequence_parallel_rank(self) -> int:
        return 0

    def get_tensor_model_parallel_group(self) -> dist.ProcessGroup:
        return self._tp

    def get_tensor_model_parallel_world_size(self) -> int:
        return dist.get_world_size(self._tp)

    def get_tensor_model_parallel_rank(self) -> int:
        return dist.get_rank(self._tp)

    def get_tensor_model_parallel_src_rank(self) -> int:
        return dist.get_process_group_ranks(self._tp)[0]

    def get_pipeline_model_parallel_group(self) -> dist.ProcessGroup:
        return self._pp

    def get_pipeline_model_parallel_world_size(self) -> int:
        return dist.get_world_size(self._pp)

    def get_pipeline_model_parallel_rank(self) -> int:
        return dist.get_rank(self._pp)

    get_pipe_parallel_group = get_pipeline_model_parallel_group
    get_pipe_parallel_world_size = get_pipeline_model_parallel_world_size
    get_pipe_parallel_rank = get_pipeline_model_parallel_rank
    get_slice_parallel_group = get_tensor_model_parallel_group
    get_slice_parallel_world_size = get_tensor_model_parallel_world_size
    get_slice_parallel_rank = get_tensor_model_parallel_rank

    def get_model_parallel_group(self) -> dist.ProcessGroup:
        return self._mp

    def get_model_parallel_world_size(self) -> int:
        return dist.get_world_size(self._mp)

    def get_model_parallel_rank(self) -> int:
        return dist.get_rank(self._mp)


def deepspeed_config(
    zero_stage: int,
    *,
    micro_batch_size: int,
    grad_accum: int,
    grad_clip: float,
    bf16: bool,
    managed_accumulation: bool = True,
) -> dict[str, Any]:
    """The explicit DeepSpeed config braid uses; every setting that matters is spelled out.

    managed_accumulation=False: engine.backward only accumulates and engine.step() is the
    step's boundary (reduce, clip, update), however many backwards the caller ran."""
    return {
        "managed_gradient_accumulation": managed_accumulation,
        "train_micro_batch_size_per_gpu": micro_batch_size,
        "gradient_accumulation_steps": grad_accum,
        "gradient_clipping": float(grad_clip),
        "zero_optimization": {"stage": zero_stage},
        "zero_allow_untested_optimizer": True,
        "bf16": {"enabled": bf16},
        "fp16": {"enabled": False},
        "steps_per_print": 2**31 - 1,
        "wall_clock_breakdown": False,
    }


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """AdamW groups of the single-process run (braid.train.optim's, names included): decay,
    and no decay for no_weight_decay_names()."""
    no_decay = model.no_weight_decay_names()
    named = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
    return [
        {"params": [p for name, p in named if name not in no_decay], "weight_decay": weight_decay, "name": "decay"},
        {"params": [p for name, p in named if name in no_decay], "weight_decay": 0.0, "name": "no_decay"},
    ]


class StageParts(nn.Module):
    """A rank's pipeline stages as the one module of a deepspeed engine (pp > 1, ZeRO-1).

    Its parameters are named "parts.<i>.<the stage's name>"; DeepSpeedState strips that
    prefix, so checkpoints keep the single-process names. Never called: the pipeline
    schedule runs the stages themselves.
    """

    def __init__(self, parts: list[nn.Module]):
        super().__init__()
        self.parts = nn.ModuleList(parts)

    def no_weight_decay_names(self) -> set[str]:
        return {f"parts.{i}.{name}" for i, part in enumerate(self.parts) for name in part.no_weight_decay_names()}

    def forward(self, *args, **kwargs):
        raise RuntimeError("StageParts holds pipeline stages for DeepSpeed; run them through the pipeline schedule")


def build_deepspeed_engine(
    model: nn.Module,
    optim_cfg,
    zero_stage: int,
    mpu: DeepSpeedMPU | None = None,
    *,
    dp_group: dist.ProcessGroup | None = None,
    micro_batch_size: int = 1,
    grad_clip: float | None = None,
    managed_accumulation: bool = True,
):
    """deepspeed.initialize with braid's explicit config and AdamW; returns the engine.

    model: the model, or a rank's pipeline stages (StageParts), with the same weights on
        every data-parallel rank, after TP (its DTensors become local shards,
        tp_on_local_tensors; ZeRO 1 or 2 only) and activation checkpointing; no expert
        parallelism. optim_cfg: lr, betas, eps, weight_decay, grad_accum and grad_clip
        (braid.train.config.OptimConfig). zero_stage: 1, 2 or 3 (1 when pp > 1).
    mpu: the process groups (DeepSpeedMPU.from_mesh); or give dp_group alone for pure data
        parallelism; neither means every rank is data parallel.
    micro_batch_size: sequences per rank per micro-batch (DeepSpeed's batch bookkeeping).
    grad_clip: max gradient norm, 0 disables; default optim_cfg.grad_clip.
    managed_accumulation: False lets the caller run any number of backwards (with
        scale_wrt_gas=False) before the one engine.step() of an optimizer step (the trainer).
    """
    if mpu is None:
        mpu = DeepSpeedMPU(dp_group if dp_group is not None else dist.group.WORLD)
    elif dp_group is not None:
        raise ValueError("build_deepspeed_engine: give mpu or dp_group, not both (mpu holds the dp group)")
    _check_layout(model, zero_stage, mpu)
    for part in model.parts if isinstance(model, StageParts) else [model]:
        if any(isinstance(p, DTensor) for p in part.parameters()):
            tp_on_local_tensors(part)  # each stage: the schedule runs the stages, not the container
    os.environ.setdefault("TORCH_EXTENSIONS_DIR", EXTENSIONS_CACHE)
    import deepspeed  # slow to import; only the DeepSpeed engine needs it

    on_gpu = next(model.parameters()).device.type == "cuda"
    config = deepspeed_config(
        zero_stage,
        micro_batch_size=micro_batch_size,
        grad_accum=optim_cfg.grad_accum,
        grad_clip=optim_cfg.grad_clip if grad_clip is None else grad_clip,
        bf16=on_gpu,
        managed_accumulation=managed_accumulation,
    )
    optimizer = torch.optim.AdamW(
        param_groups(model, optim_cfg.weight_decay), lr=optim_cfg.lr, betas=tuple(optim_cfg.betas), eps=optim_cfg.eps
    )
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=config, mpu=mpu)
    return engine


def _check_layout(model: nn.Module, zero_stage: int, mpu: DeepSpeedMPU) -> None:
    if zero_stage not in (1, 2, 3):
        raise ValueError(f"DeepSpeed zero_stage must be 1, 2 or 3, got {zero_stage!r}")
    num_pp = mpu.get_pipeline_model_parallel_world_size()
    if num_pp > 1 and zero_stage > 1:
        raise ValueError(
            f"DeepSpeed with pipeline parallelism (pp={num_pp}) allows ZeRO-1 only, got zero_stage={zero_stage}: "
            "set zero_stage=1, or pp=1, or zero_engine='fsdp2'"
        )
    tp_ranks = dist.get_process_group_ranks(mpu.get_tensor_model_parallel_group())
    for name, param in model.named_parameters():
        if not isinstance(param, DTensor):
            continue
        if dist.get_process_group_ranks(param.device_mesh.get_group()) != tp_ranks:
            raise ValueError(
                f"{name} is a DTensor outside the tensor-parallel group (expert parallelism?): DeepSpeed would "
                "average its shards over data-parallel ranks that hold other shards; "
                "use zero_engine='fsdp2' with ep > 1"
            )
        if zero_stage == 3:
            raise ValueError(
                f"DeepSpeed ZeRO-3 cannot run tensor parallelism ({name} is a DTensor): it partitions parameters "
                "and gathers them in its own forward hooks, where braid's TP reads whole local shards; "
                "use zero_stage 1 or 2, or zero_engine='fsdp2'"
            )


class _LocalSpec(NamedTuple):
    owner: nn.Module
    name: str
    mesh: DeviceMesh
    placements: tuple
    shape: torch.Size
    stride: tuple[int, ...]


def tp_on_local_tensors(model: nn.Module) -> nn.Module:
    """Make a TP model's DTensor parameters plain local shards that DeepSpeed ZeRO-1/2 can own.

    Each parameter becomes its local shard (an nn.Parameter, flagged tensor_model_parallel
    when sharded, for DeepSpeed's gradient norm); while the model (or a block, when
    activation checkpointing recomputes it) runs forward, the parameter reads as
    DTensor.from_local(shard) with its TP placements, so the TP styles compute unchanged and
    gradients reach the local shards through DTensor's own backward. Returns model.
    """
    specs = []
    for owner in model.modules():
        for name, param in list(owner._parameters.items()):
            if isinstance(param, DTensor):
                specs.append(_LocalSpec(owner, name, param.device_mesh, param.placements, param.shape, param.stride()))
                local = nn.Parameter(param.to_local().detach(), requires_grad=param.requires_grad)
                local.tensor_model_parallel = any(not p.is_replicate() for p in param.placements)
                local.dtensor_spec = specs[-1]  # for checkpoints: the global tensor of this shard
                owner._parameters[name] = local
    _install_dtensor_views(model, specs)
    for block in getattr(model, "layers", {}).values():
        # Activation checkpointing recomputes the wrapped block, not its wrapper.
        block = getattr(block, "_checkpoint_wrapped_module", block)
        owned = {id(m) for m in block.modules()}
        _install_dtensor_views(block, [s for s in specs if id(s.owner) in owned])
    return model


def _install_dtensor_views(module: nn.Module, specs: list[_LocalSpec]) -> None:
    swapped: list[list[tuple[_LocalSpec, nn.Parameter]]] = []

    def swap_in(mod, args):
        frame = []
        for spec in specs:
            local = spec.owner._parameters[spec.name]
            if isinstance(local, DTensor):
                continue  # an enclosing module swapped it in already
            spec.owner._parameters[spec.name] = DTensor.from_local(
                local, spec.mesh, spec.placements, run_check=False, shape=spec.shape, stride=spec.stride
            )
            frame.append((spec, local))
        swapped.append(frame)

    def swap_back(mod, args, output):
        for spec, local in swapped.pop():
            spec.owner._parameters[spec.name] = local

    module.register_forward_pre_hook(swap_in, prepend=True)
    module.register_forward_hook(swap_back, always_call=True)


OPTIM_STATES = ("exp_avg", "exp_avg_sq")  # AdamW's per-parameter state besides "step"


class DeepSpeedState:
    """The model and AdamW state of a deepspeed engine in braid's checkpoint format
    (braid.train.checkpoint): single-process FQNs, full tensors (DTensors of the TP mesh for
    TP shards, so DCP reshards them) and the flattened optimizer keys of
    torch.distributed.checkpoint.state_dict. A DeepSpeed checkpoint thus loads at any other
    layout and engine, and any layout's checkpoint loads into DeepSpeed ZeRO 1, 2 or 3.

    Collective over the data-parallel ranks (DeepSpeed gathers the ZeRO partitions): every
    rank calls state_dict and load_state_dict.
    """

    def __init__(self, engine):
        self.engine = engine
        self.module = engine.module
        # A rank's pipeline stages (StageParts): each keeps the single-process names.
        self.parts = list(self.module.parts) if isinstance(self.module, StageParts) else [self.module]
        self.zero3 = engine.zero_optimization_stage() == 3
        self.params = []
        for part in self.parts:
            no_decay = part.no_weight_decay_names()
            self.params += [(_clean(name), param, int(name in no_decay)) for name, param in part.named_parameters()]

    def state_dict(self) -> dict[str, dict[str, Any]]:
        from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

        model, optim = self._buffers(), {}
        step = self._step()
        if step > 0:
            self._link_optimizer_state()
        for fqn, param, group in self.params:
            model[fqn] = _as_global(safe_get_full_fp32_param(param), param)
            for key in OPTIM_STATES:
                value = safe_get_full_optimizer_state(param, key) if step > 0 else None
                optim[f"state.{fqn}.{key}"] = _as_global(value, param)
            optim[f"state.{fqn}.step"] = torch.tensor(float(step))
            for key, value in self._hyperparameters(group).items():
                optim[f"param_groups.{fqn}.{key}"] = value
        return {"model": model, "optim": optim}

    def load_state_dict(self, state: dict[str, dict[str, Any]]) -> None:
        from deepspeed.utils import safe_set_full_fp32_param, safe_set_full_optimizer_state

        step = {float(state["optim"][f"state.{fqn}.step"]) for fqn, _, _ in self.params}
        assert len(step) == 1, "every parameter's AdamW step count must be the same"
        self._init_optimizer_state(step.pop())
        for fqn, param, _ in self.params:
            full = _to_local(state["model"][fqn])
            safe_set_full_fp32_param(param, full)
            self._set_model_param(param, full)
            for key in OPTIM_STATES:
                safe_set_full_optimizer_state(param, _to_local(state["optim"][f"state.{fqn}.{key}"]), key)
        with torch.no_grad():
            for part in self.parts:
                for name, buffer in part.named_buffers():
                    if _clean(name) in state["model"]:
                        buffer.copy_(state["model"][_clean(name)])

    def _buffers(self) -> dict[str, torch.Tensor]:
        names = {fqn for fqn, _, _ in self.params}
        return {
            _clean(name): value.clone()
            for part in self.parts
            for name, value in part.state_dict().items()
            if _clean(name) not in names
        }

    def _inner_optimizer(self) -> torch.optim.Optimizer:
        return self.engine.optimizer.optimizer

    def _step(self) -> int:
        states = list(self._inner_optimizer().state.values())
        return int(states[0]["step"]) if states and "step" in states[0] else 0

    def _hyperparameters(self, group: int) -> dict[str, Any]:
        return {key: value for key, value in self.engine.optimizer.param_groups[group].items() if key != "params"}

    def _init_optimizer_state(self, step: float) -> None:
        """AdamW state on DeepSpeed's flat partitions (zeros until loaded), so that the
        per-parameter setters find it before the first step, and the step count."""
        inner = self._inner_optimizer()
        if self.zero3:
            flats = list(self.engine.optimizer.fp32_partitioned_groups_flat)
        else:
            flats = [flat for group in inner.param_groups for flat in group["params"]]
        for flat in flats:
            state = inner.state[flat]
            for key in OPTIM_STATES:
                state.setdefault(key, torch.zeros_like(flat, memory_format=torch.preserve_format))
            state["step"] = torch.tensor(step)
        self._link_optimizer_state()

    def _link_optimizer_state(self) -> None:
        """Point ZeRO-1/2's per-parameter views at the AdamW state of every group: 0.19.8
        links them once, right after the first group's first step, which leaves the later
        groups' views empty (ZeRO-3 reads the state directly)."""
        if not self.zero3:
            self.engine.optimizer._hp_optimizer_states_linked = False
            self.engine.optimizer._lazy_init_hp_params_optimizer_state()

    def _set_model_param(self, param: nn.Parameter, full: torch.Tensor) -> None:
        """The module's own copy of the weights (DeepSpeed's compute copy of its fp32 master)."""
        if not self.zero3:
            with torch.no_grad():
                param.copy_(full.view_as(param))
            return
        import deepspeed

        # ZeRO-3 runs without TP or pp, so its data-parallel group is the world, holding rank 0.
        with deepspeed.zero.GatheredParameters([param], modifier_rank=0), torch.no_grad():
            param.copy_(full.view_as(param))


def _clean(name: str) -> str:
    return name.replace("_checkpoint_wrapped_module.", "")


def _as_global(value: torch.Tensor | None, param: nn.Parameter) -> torch.Tensor:
    """A full (local, under TP) value as the single-process tensor: a DTensor of the TP mesh
    for TP shards; zeros where DeepSpeed has no state yet (before the first step)."""
    shape = getattr(param, "ds_shape", param.shape)
    value = torch.zeros(shape, dtype=torch.float32, device=param.device) if value is None else value.detach()
    value = value.reshape(shape).clone()
    spec = getattr(param, "dtensor_spec", None)
    if spec is None:
        return value
    return DTensor.from_local(
        value, spec.mesh, spec.placements, run_check=False, shape=spec.shape, stride=spec.stride
    )


def _to_local(value: torch.Tensor) -> torch.Tensor:
    return value.to_local() if isinstance(value, DTensor) else value
