"""Everything that knows about meshes: the parallel layout and its validation, tensor and
sequence parallelism, expert parallelism, pipeline stages, ZeRO (FSDP2 or DeepSpeed),
activation checkpointing and compile. Model code (braid.model) stays single-device.

    dims = ParallelDims(ParallelConfig(tp=2), world_size, model_cfg)
    mesh = dims.build_mesh("cuda")
    model = parallelize(build_model(model_cfg, device="meta"), dims, mesh)

See docs/parallel.md.
"""

from braid.parallel.ac import apply_ac, apply_compile
from braid.parallel.dcp_layout import from_checkpoint_layout, to_checkpoint_layout
from braid.parallel.dims import ParallelConfig, ParallelDims
from braid.parallel.fsdp import apply_fsdp
from braid.parallel.loss import parallel_cross_entropy
from braid.parallel.parallelize import distribute_full_model, gather_full_state_dict, parallelize
from braid.parallel.tp import FFN_PLANS, MIXER_PLANS, apply_tp

__all__ = [
    "FFN_PLANS",
    "MIXER_PLANS",
    "ParallelConfig",
    "ParallelDims",
    "apply_ac",
    "apply_compile",
    "apply_fsdp",
    "apply_tp",
    "distribute_full_model",
    "from_checkpoint_layout",
    "gather_full_state_dict",
    "parallel_cross_entropy",
    "parallelize",
    "to_checkpoint_layout",
]
