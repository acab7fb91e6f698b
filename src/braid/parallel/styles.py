"""Tensor-parallel styles for the modules that torch's Colwise/Rowwise/SequenceParallel do not
cover: parameters that are not nn.Linear weights, replicated compute, and partial-sum FFNs.

Every parameter becomes a DTensor of the TP mesh (one mesh for gradient-norm clipping, fused
optimizers and checkpoints, whose global view stays the single-process tensor), while the
module's own code runs unchanged on local tensors: during its forward each listed parameter
reads as its local shard (`module.weight` is swapped for `weight.to_local()` by a pre-hook
and restored by a post-hook, the same way FSDP2 swaps in unsharded parameters).

Gradient convention of `PartialSumParallel` (MoE, MatFormer): the module runs on the
gathered input with its hidden units sharded, so its output is a partial sum and every local
gradient inside it is this rank's share of the true gradient: the input's gradient is marked
Partial (reduce-scattered), replicated parameters' gradients are all-reduced, and gradients
reaching replicated extra outputs (MoE aux losses, equal on every rank) are divided by the
number of ranks so that they too are shares.

`BatchReplicated` is the data-parallel counterpart: parameters replicated over ranks that
hold different tokens (an MoE's router under expert parallelism), gradients summed over them
and divided by how many of them are data-parallel ranks (the others, sequence-parallel ranks
of the same rows, hold shares of one loss).

`SequenceLocal` runs a module on this rank's own tokens of the sequence-parallel residual
stream (an MoE under expert parallelism with TP): no gather, no split weights. Its extra
outputs (MoE aux losses of the whole batch, equal on every rank) get their gradient divided
by the TP size, as under PartialSumParallel, because every TP rank backpropagates the same
loss.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Partial, Replicate, Shard, distribute_module, distribute_tensor
from torch.distributed.tensor.parallel import ParallelStyle
from torch.distributed.tensor.placement_types import Placement, _StridedShard
from torch.utils._pytree import tree_map_only

LocalView = Callable[[DTensor], torch.Tensor]


class _AllReduceGrad(torch.autograd.Function):
    """Identity forward; the backward sums the gradient over `group` and multiplies it by
    `scale` (Megatron's f operator for scale 1; 1 / group size averages)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, group: dist.ProcessGroup, scale: float) -> torch.Tensor:
        ctx.group, ctx.scale = group, scale
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        grad = grad.contiguous()
        dist.all_reduce(grad, group=ctx.group)
        return grad * ctx.scale if ctx.scale != 1.0 else grad, None, None


class ScaleGrad(torch.autograd.Function):
    """Identity forward; the backward multiplies the gradient by `scale`."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, scale: float) -> torch.Tensor:
        ctx.scale = scale
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad * ctx.scale, None


def _owner(module: nn.Module, path: str) -> tuple[nn.Module, str]:
    """(submodule, parameter name) for a dotted parameter path relative to `module`."""
    prefix, _, name = path.rpartition(".")
    owner = module.get_submodule(prefix) if prefix else module
    if name not in owner._parameters:
        raise ValueError(f"TP plan names parameter {path!r}, which {type(module).__name__} does not have")
    return owner, name


def _split_factor(placement: Placement) -> int:
    return placement.split_factor if isinstance(placement, _StridedShard) else 1


def _distribute_parameters(module: nn.Module, mesh: DeviceMesh, placements: dict[str, Placement]) -> None:
    for path, placement in placements.items():
        owner, name = _owner(module, path)
        param = owner._parameters[name]
        if isinstance(placement, Shard):
            size, parts = param.shape[placement.dim], mesh.size() * _split_factor(placement)
            if size % parts:
                raise ValueError(
                    f"{type(module).__name__}.{path}: dim {placement.dim} of size {size} does not split into "
                    f"{parts} equal parts ({mesh.size()} ranks x {_split_factor(placement)} bands); "
                    "choose a tp that divides it"
                )
        sharded = distribute_tensor(param.detach(), mesh, [placement])
        owner._parameters[name] = nn.Parameter(sharded, requires_grad=param.requires_grad)


def _install_local_views(module: nn.Module, views: dict[str, LocalView]) -> None:
    """During module's forward, each parameter at a path in `views` reads as views[path](param)."""
    targets = [(_owner(module, path), view) for path, view in views.items()]
    saved: list[list[tuple[nn.Module, str, nn.Parameter]]] = []

    def swap_in(mod, args):
        frame = []
        for (owner, name), view in targets:
            param = owner._parameters[name]
            frame.append((owner, name, param))
            owner._parameters[name] = view(param)
        saved.append(frame)

    def swap_back(mod, args, output):
        for owner, name, param in saved.pop():
            owner._parameters[name] = param

    module.register_forward_pre_hook(swap_in)
    module.register_forward_hook(swap_back, always_call=True)


def _to_local(param: DTensor) -> torch.Tensor:
    return param.to_local()


class LocalShards(ParallelStyle):
    """Shard a module's named parameters (paths relative to it, e.g. "conv_x.weight") as
    DTensors with the given placements; the module computes on their local shards.

    For per-head or per-channel parameters next to column-parallel projections (Mamba-2's
    conv, A_log, D, dt_bias and gated norm, GLA's gated norm): the module's input must already
    be this rank's channels, and its outputs stay local.
    """

    def __init__(self, placements: dict[str, Placement]):
        super().__init__()
        for path, placement in placements.items():
            if not isinstance(placement, Shard):
                raise ValueError(
                    f"LocalShards: {path} has placement {placement}; only Shard placements compute locally"
                )
        self.placements = dict(placements)

    def _apply(self, module: nn.Module, device_mesh: DeviceMesh) -> nn.Module:
        _distribute_parameters(module, device_mesh, self.placements)
        _install_local_views(module, {path: _to_local for path in self.placements})
        return module


class ReplicateParallel(ParallelStyle):
    """Every parameter replicated on the TP mesh and the module run whole on every rank: a
    small module that is not worth splitting (GLA's low-rank gate, norms without sequence
    parallelism). Inputs become Replicate DTensors; outputs are local tensors unless
    use_local_output=False."""

    def __init__(self, *, use_local_output: bool = True):
        super().__init__()
        self.use_local_output = use_local_output

    @staticmethod
    def _replicate_inputs(module, inputs, mesh):
        def replicate(x: torch.Tensor) -> DTensor:
            if isinstance(x, DTensor):
                return x.redistribute(placements=(Replicate(),))
            return DTensor.from_local(x, mesh, (Replicate(),), run_check=False)

        return tuple(replicate(x) if isinstance(x, torch.Tensor) else x for x in inputs)

    def _apply(self, module: nn.Module, device_mesh: DeviceMesh) -> nn.Module:
        def local_outputs(mod, outputs, mesh):
            return outputs.to_local() if self.use_local_output else outputs

        return distribute_module(module, device_mesh, None, self._replicate_inputs, local_outputs)


class PartialSumParallel(ParallelStyle):
    """A module whose output is a sum over hidden units split across the TP ranks (MoE
    experts sharded on d_expert, MatFormer's nested hidden units, a shared SwiGLU).

    The first input (activations in `input_layout`, Shard(1) with sequence parallelism) is
    gathered whole; the module computes on local parameter shards (`placements`; Replicate
    ones are used whole); the first output is a partial sum, reduced to `output_layout`.
    Further tensor outputs must be equal on every rank (e.g. aux losses). See the module
    docstring for the gradient convention.
    """

    def __init__(self, placements: dict[str, Placement], *, input_layout: Placement, output_layout: Placement):
        super().__init__()
        self.placements = dict(placements)
        self.input_layout = input_layout
        self.output_layout = output_layout

    def _apply(self, module: nn.Module, device_mesh: DeviceMesh) -> nn.Module:
        _distribute_parameters(module, device_mesh, self.placements)
        group, num_ranks = device_mesh.get_group(), device_mesh.size()

        def replicated_view(param: DTensor) -> torch.Tensor:
            return _AllReduceGrad.apply(param.to_local(), group, 1.0)

        views = {
            path: replicated_view if isinstance(placement, Replicate) else _to_local
            for path, placement in self.placements.items()
        }
        _install_local_views(module, views)

        def gather_input(mod, args):
            x = args[0]
            if not isinstance(x, DTensor):
                x = DTensor.from_local(x, device_mesh, (self.input_layout,), run_check=False)
            full = x.redistribute(placements=(Replicate(),)).to_local(grad_placements=(Partial(),))
            return (full, *args[1:])

        def reduce_output(mod, args, output):
            first, rest = (output[0], output[1:]) if isinstance(output, tuple) else (output, None)
            partial = DTensor.from_local(first, device_mesh, (Partial(),), run_check=False)
            reduced = partial.redistribute(placements=(self.output_layout,)).to_local()
            if rest is None:
                return reduced
            return _scale_extra_outputs((reduced, *rest), 1.0 / num_ranks)

        module.register_forward_pre_hook(gather_input)
        module.register_forward_hook(reduce_output)
        return module


def _scale_extra_outputs(output, scale: float):
    """Scale the gradient of every tensor output after the first."""
    if not isinstance(output, tuple):
        return output
    rest = tree_map_only(torch.Tensor, lambda t: ScaleGrad.apply(t, scale), output[1:])
    return (output[0], *rest)


class SequenceLocal(ParallelStyle):
    """A module run on this rank's own tokens under sequence parallelism: the first input
    (a DTensor in `input_layout`, Shard(1) on the TP mesh) becomes its local shard, the first
    output stays this rank's tokens (the local residual stream), and the gradients of further
    tensor outputs, equal on every rank, are divided by the number of ranks. Its parameters
    are left alone (expert parallelism distributes an MoE's next)."""

    def __init__(self, *, input_layout: Placement = Shard(1)):
        super().__init__()
        self.input_layout = input_layout

    def _apply(self, module: nn.Module, device_mesh: DeviceMesh) -> nn.Module:
        scale = 1.0 / device_mesh.size()

        def local_input(mod, args):
            x = args[0]
            if isinstance(x, DTensor):
                x = x.redistribute(placements=(self.input_layout,)).to_local()
            return (x, *args[1:])

        module.register_forward_pre_hook(local_input)
        module.register_forward_hook(lambda mod, args, output: _scale_extra_outputs(output, scale))
        return module


class BatchReplicated(ParallelStyle):
    """Named parameters (paths relative to the module) replicated over ranks that hold
    different tokens, e.g. an MoE's router and shared expert over the expert-parallel group:
    Replicate DTensors of that mesh, whose gradients are summed over it in backward and
    divided by `data_ranks`, the number of those ranks that hold different data-parallel
    batches (default: all of them, an average as data parallelism takes; ep/tp when the mesh
    spans a TP group whose ranks hold shares of one loss). FSDP can then shard the module
    over the remaining data-parallel ranks together with its expert-parallel weights."""

    def __init__(self, paths: list[str], *, data_ranks: int | None = None):
        super().__init__()
        self.paths = list(paths)
        self.data_ranks = data_ranks

    def _apply(self, module: nn.Module, device_mesh: DeviceMesh) -> nn.Module:
        _distribute_parameters(module, device_mesh, {path: Replicate() for path in self.paths})
        data_ranks = device_mesh.size() if self.data_ranks is None else self.data_ranks
        group, scale = device_mesh.get_group(), 1.0 / data_ranks

        def averaged_view(param: DTensor) -> torch.Tensor:
            return _AllReduceGrad.apply(param.to_local(), group, scale)

        _install_local_views(module, {path: averaged_view for path in self.paths})
        return module
