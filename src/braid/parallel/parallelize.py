"""The one entry point that turns a single-device model (or pipeline stage) into a parallel one.

    dims = ParallelDims(pcfg, world_size, model_cfg)
    mesh = dims.build_mesh("cuda")
    model = build_model(cfg, device="meta")          # or a stage: Decoder(cfg, layer_ids=...)
    model = parallelize(model, dims, mesh, pcfg)      # TP -> EP -> AC -> compile -> ZeRO
    model.to_empty(device="cuda"); distribute_full_model(model, full_state_dict)

The order is fixed (torchtitan's): tensor parallelism first (it shards whole weights),
expert parallelism (braid.parallel.ep), activation checkpointing, compile, then ZeRO, which
must see the final module tree to shard it. Pipeline parallelism splits the model into stage
parts before this (braid.parallel.pipeline calls parallelize on each part). With
zero_engine="deepspeed" ZeRO is left to braid.parallel.deepspeed, which wraps the optimizer.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    set_model_state_dict,
)
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor
from torch.distributed.tensor.parallel import parallelize_module

from braid.parallel.ac import apply_ac, apply_compile
from braid.parallel.dcp_layout import to_checkpoint_layout
from braid.parallel.dims import ParallelConfig, ParallelDims
from braid.parallel.ep import EXPERT_WEIGHTS, apply_ep, apply_global_aux_losses
from braid.parallel.fsdp import apply_fsdp, mixed_precision_policy
from braid.parallel.styles import BatchReplicated
from braid.parallel.tp import apply_tp

__all__ = ["distribute_full_model", "gather_full_state_dict", "parallelize"]


def parallelize(
    model_part: nn.Module, dims: ParallelDims, mesh: DeviceMesh, pcfg: ParallelConfig | None = None
) -> nn.Module:
    """Apply the layout of `dims` to `model_part` in place and return it.

    model_part: a Decoder or a pipeline stage of one, on the meta device or holding the same
        weights on every rank (build_model with one seed).
    mesh: the world mesh from dims.build_mesh. pcfg: defaults to dims.cfg.
    Mixed precision (pcfg.param_dtype / reduce_dtype) applies through FSDP2 on GPU meshes.
    """
    pcfg = dims.cfg if pcfg is None else pcfg
    if mesh is not dims.world_mesh:
        raise ValueError("parallelize: pass the mesh returned by dims.build_mesh(device_type)")
    if pcfg != dims.cfg:
        raise ValueError("parallelize: pcfg differs from the ParallelConfig the dims were built from")
    if dims.tp > 1:
        apply_tp(model_part, dims.get_mesh("tp"), pcfg.sequence_parallel, expert_parallel=dims.ep > 1)
    _apply_expert_parallel(model_part, dims)
    apply_ac(model_part, pcfg.activation_checkpointing, pcfg.ac_every)
    if pcfg.compile:
        apply_compile(model_part)
    if dims.fsdp_enabled:
        _apply_zero(model_part, dims, pcfg, mesh.device_type)
    return model_part


def _has_moe(model_part: nn.Module) -> bool:
    return any(block.spec.ffn == "moe" for block in model_part.layers.values())


def _apply_expert_parallel(model_part: nn.Module, dims: ParallelDims) -> None:
    """EP shards the experts and replicates the router and shared expert over the ep group
    (their gradients summed over it, divided by its data-parallel ranks: BatchReplicated);
    without EP, data parallelism still needs the MoE aux losses of the global batch (both
    in braid.parallel.ep). With TP the ep group spans the TP ranks (see ParallelDims)."""
    if not _has_moe(model_part) or (dims.ep == 1 and dims.dp == 1):
        return
    if dims.ep == 1:
        apply_global_aux_losses(model_part, dims.get_mesh("dp"))
        return
    seq_mesh = dims.get_mesh("tp") if dims.ep_spans_tp else None
    apply_ep(model_part, dims.ep_mesh, batch_group=dims.get_mesh("moe_batch"), seq_mesh=seq_mesh)
    data_ranks = dims.ep // dims.tp if dims.ep_spans_tp else dims.ep
    for moe in _moe_layers(model_part):
        replicated = [name for name, _ in moe.named_parameters() if name not in EXPERT_WEIGHTS]
        parallelize_module(moe, dims.ep_mesh, BatchReplicated(replicated, data_ranks=data_ranks))


def _moe_layers(model_part: nn.Module) -> list[nn.Module]:
    return [block.ffn for block in model_part.layers.values() if block.spec.ffn == "moe"]


def _apply_zero(model_part: nn.Module, dims: ParallelDims, pcfg: ParallelConfig, device_type: str) -> None:
    mp_policy = None
    if device_type != "cpu":
        mp_policy = mixed_precision_policy(pcfg.torch_param_dtype, pcfg.torch_reduce_dtype)
    reshard = pcfg.zero_stage == 3
    if dims.ep > 1:
        _shard_experts(model_part, dims, reshard, mp_policy)
    apply_fsdp(model_part, dims.get_mesh("fsdp"), reshard_after_forward=reshard, mp_policy=mp_policy)


def _shard_experts(
    model_part: nn.Module, dims: ParallelDims, reshard: bool, mp_policy: MixedPrecisionPolicy | None
) -> None:
    """Each MoE is its own FSDP unit over the data-parallel ranks outside the ep group
    (ep_fsdp): its expert weights are sharded over ep already, and its router and shared
    expert, replicated over ep, have their gradients reduced over ep in backward
    (BatchReplicated, applied with EP) before FSDP averages over ep_fsdp."""
    kwargs = dict(mesh=dims.get_mesh("ep_fsdp"), reshard_after_forward=reshard)
    if mp_policy is not None:
        kwargs["mp_policy"] = mp_policy
    for moe in _moe_layers(model_part):
        fully_shard(moe, **kwargs)


def distribute_full_model(model_part: nn.Module, full_state_dict: dict[str, torch.Tensor]) -> None:
    """Load single-process weights (e.g. build_model(cfg, seed=s).state_dict()) into a
    parallelized model part: every DTensor takes its own shard, so a parallel run starts from
    exactly the single-process initialisation. Keys of other pipeline stages are ignored;
    a key of this part missing from `full_state_dict` raises ValueError."""
    own_keys = list(get_model_state_dict(model_part).keys())
    missing = [key for key in own_keys if key not in full_state_dict]
    if missing:
        raise ValueError(
            f"distribute_full_model: the state dict lacks {len(missing)} keys of this model part, e.g. "
            f"{missing[:3]}; pass the full model's state dict"
        )
    own = {key: full_state_dict[key] for key in own_keys}
    set_model_state_dict(model_part, own, options=StateDictOptions(full_state_dict=True, strict=True))


def gather_full_state_dict(model_part: nn.Module) -> dict[str, torch.Tensor]:
    """The single-process state dict of a parallelized model part (full tensors, on every
    rank; keys as in the unparallelized model)."""
    sharded = to_checkpoint_layout(get_model_state_dict(model_part))
    return {key: value.full_tensor() if isinstance(value, DTensor) else value for key, value in sharded.items()}
