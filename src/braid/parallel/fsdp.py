"""ZeRO with FSDP2: every block is one FSDP unit, then the root (embedding, norm, head).

    apply_fsdp(model_part, dims.get_mesh("fsdp"), reshard_after_forward=True)   # ZeRO-3
    apply_fsdp(model_part, mesh, reshard_after_forward=False)                   # ZeRO-2-like

A 2-D mesh (dp_replicate, dp_shard) gives HSDP: parameters sharded within dp_shard and
replicated across dp_replicate. TP parameters (DTensors of the tp mesh of the same root
mesh) are sharded further on their dim 0 (dim 1 for MatFormer's interleaved shards); FSDP2
composes the two.

Mixed precision (GPU): parameters all-gathered in `param_dtype`, gradients reduced in
`reduce_dtype`. Modules that keep float32 parameters (Mamba-2's A_log, D, dt_bias, listed in
`fp32_params`) are split in two units: their submodules (projections, convs, norm) under
the mixed policy, and the module itself, holding only those parameters, under a float32
policy that leaves its inputs uncast.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor, Shard
from torch.distributed.tensor.placement_types import _StridedShard

__all__ = ["apply_fsdp", "mixed_precision_policy"]


def mixed_precision_policy(param_dtype: torch.dtype, reduce_dtype: torch.dtype) -> MixedPrecisionPolicy:
    return MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=reduce_dtype)


def apply_fsdp(
    model_part: nn.Module,
    dp_mesh: DeviceMesh,
    *,
    reshard_after_forward: bool = True,
    mp_policy: MixedPrecisionPolicy | None = None,
) -> nn.Module:
    """fully_shard each block of model_part, then model_part itself, over `dp_mesh` (1-D, or
    2-D for HSDP). Returns model_part (now an FSDPModule), changed in place."""
    kwargs = dict(mesh=dp_mesh, reshard_after_forward=reshard_after_forward, shard_placement_fn=_shard_placement)
    if mp_policy is not None:
        kwargs["mp_policy"] = mp_policy
    for block in model_part.layers.values():
        if mp_policy is not None:
            _shard_fp32_modules(block, kwargs)
        fully_shard(block, **kwargs)
    fully_shard(model_part, **kwargs)
    return model_part


def _shard_placement(param: nn.Parameter) -> Shard | None:
    # A TP shard that interleaves dim 0 (MatFormer's nested bands) is split by FSDP on dim 1,
    # so that each rank's piece stays a plain block of its TP shard.
    if isinstance(param, DTensor) and any(isinstance(p, _StridedShard) and p.dim == 0 for p in param.placements):
        return Shard(1)
    return None


def _shard_fp32_modules(block: nn.Module, kwargs: dict) -> None:
    fp32_policy = MixedPrecisionPolicy(
        param_dtype=torch.float32, reduce_dtype=torch.float32, cast_forward_inputs=False
    )
    for module in block.modules():
        if not getattr(module, "fp32_params", ()):
            continue
        children = [child for child in module.children() if list(child.parameters())]
        if children:
            fully_shard(children, **kwargs)
        fully_shard(module, **{**kwargs, "mp_policy": fp32_policy})
