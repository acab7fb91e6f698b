"""The parallel layout: the user-facing `parallel.*` config, its validation against the world
size and the model (before any device work), and the device mesh.

    pcfg = ParallelConfig(tp=2, dp_shard=-1)          # dp_shard=-1: whatever the world leaves
    dims = ParallelDims(pcfg, world_size=8, model_cfg=cfg)   # raises ValueError on a bad layout
    mesh = dims.build_mesh("cuda")                     # axes pp, dp_replicate, dp_shard, tp
    dims.get_mesh("tp"), dims.get_mesh("dp"), dims.get_mesh("fsdp"), dims.ep_mesh

Mesh axes, outer to inner: pp, dp_replicate, dp_shard, tp (every axis exists, size 1 when
unused). Views kept on the dims object (slicing flattened views off the root is deprecated):

| name            | axes                                   | used by                          |
|-----------------|----------------------------------------|----------------------------------|
| dp              | dp_replicate x dp_shard, flattened     | data loading, loss averaging     |
| fsdp            | (dp_replicate, dp_shard), or dp_shard  | FSDP2 (2-D = HSDP)               |
| ep              | the inner ep/tp ranks of dp_shard x tp | expert parallelism               |
| dp_shard_mod_ep | the other dp_shard ranks               | FSDP of expert weights under EP  |
| ep_fsdp         | dp_shard_mod_ep (x dp_replicate)       | FSDP of MoE layers under EP      |
| moe_batch       | dp (x tp when ep spans tp), flattened  | MoE aux losses and expert loads  |

Expert parallelism borrows ranks that hold different tokens (as torchtitan does). With tp=1
those are data-parallel shard ranks: ep divides dp_shard. With tp > 1 and sequence
parallelism, each TP rank holds T/tp different tokens at the MoE input, so the ep group spans
the whole TP group and ep/tp inner dp_shard ranks: ep must be a multiple of tp and ep/tp
must divide dp_shard (braid.parallel.ep says how the MoE runs there).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

from braid.model.config import ModelConfig

ZERO_ENGINES = ("fsdp2", "deepspeed")
PP_SCHEDULES = ("1f1b", "interleaved_1f1b", "gpipe")
AC_MODES = ("none", "full", "selective")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
MESH_AXES = ("pp", "dp_replicate", "dp_shard", "tp")


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise ValueError(message)


@dataclass
class ParallelConfig:
    """How one training run is laid out over the devices (`parallel.*` in a run config).

    zero_stage: fsdp2 supports 3 (parameters resharded after forward) and 2 (kept
    gathered until backward); deepspeed supports 1, 2, 3 (only 1 with pp > 1).
    activation_checkpointing: "full" checkpoints every block, "selective" every
    `ac_every`-th block (layer index % ac_every == 0).
    param_dtype / reduce_dtype: FSDP2 mixed precision on GPU (compute copies of the
    parameters, gradient reduction); the SSM parameters stay float32 either way.
    pp_microbatches: None means one per pipeline stage (pp * pp_stages_per_rank).
    """

    dp_replicate: int = 1
    dp_shard: int = -1
    tp: int = 1
    pp: int = 1
    ep: int = 1
    sequence_parallel: bool = True
    zero_engine: str = "fsdp2"
    zero_stage: int = 3
    pp_schedule: str = "1f1b"
    pp_microbatches: int | None = None
    pp_stages_per_rank: int = 1
    pp_cut_points: tuple[int, ...] | None = None
    activation_checkpointing: str = "none"
    ac_every: int = 2
    compile: bool = False
    param_dtype: str = "bfloat16"
    reduce_dtype: str = "float32"

    def __post_init__(self) -> None:
        if self.pp_cut_points is not None:
            self.pp_cut_points = tuple(self.pp_cut_points)  # YAML gives lists
        self.validate()

    def validate(self) -> None:
        for name in ("dp_replicate", "tp", "pp", "ep", "pp_stages_per_rank", "ac_every"):
            value = getattr(self, name)
            _require(isinstance(value, int) and value >= 1, f"parallel.{name} must be an int >= 1, got {value!r}")
        _require(
            self.dp_shard == -1 or (isinstance(self.dp_shard, int) and self.dp_shard >= 1),
            f"parallel.dp_shard must be >= 1 or -1 (whatever the world size leaves), got {self.dp_shard!r}",
        )
        _require(
            self.zero_engine in ZERO_ENGINES,
            f"parallel.zero_engine={self.zero_engine!r} is not one of {ZERO_ENGINES}",
        )
        stages = (2, 3) if self.zero_engine == "fsdp2" else (1, 2, 3)
        _require(
            self.zero_stage in stages,
            f"parallel.zero_stage={self.zero_stage!r} is not supported by zero_engine={self.zero_engine!r} "
            f"(choose one of {stages}; ZeRO-1 needs zero_engine='deepspeed')",
        )
        _require(
            self.pp_schedule in PP_SCHEDULES,
            f"parallel.pp_schedule={self.pp_schedule!r} is not one of {PP_SCHEDULES}",
        )
        _require(
            self.pp_microbatches is None or (isinstance(self.pp_microbatches, int) and self.pp_microbatches >= 1),
            f"parallel.pp_microbatches must be an int >= 1 or None, got {self.pp_microbatches!r}",
        )
        _require(
            self.activation_checkpointing in AC_MODES,
            f"parallel.activation_checkpointing={self.activation_checkpointing!r} is not one of {AC_MODES}",
        )
        for name in ("param_dtype", "reduce_dtype"):
            value = getattr(self, name)
            _require(value in DTYPES, f"parallel.{name}={value!r} is not one of {tuple(DTYPES)}")

    @property
    def torch_param_dtype(self) -> torch.dtype:
        return DTYPES[self.param_dtype]

    @property
    def torch_reduce_dtype(self) -> torch.dtype:
        return DTYPES[self.reduce_dtype]


class ParallelDims:
    """A ParallelConfig resolved against a world size and checked against a model.

    Raises ValueError, saying what to change, when the layout cannot run: the product of
    the dims must be the world size, TP must split every head count and hidden width
    evenly, EP the experts, PP the layers.
    """

    def __init__(self, cfg: ParallelConfig, world_size: int, model_cfg: ModelConfig | None = None):
        _require(world_size >= 1, f"world_size must be >= 1, got {world_size}")
        self.cfg = cfg
        self.world_size = world_size
        self.dp_replicate, self.tp, self.pp, self.ep = cfg.dp_replicate, cfg.tp, cfg.pp, cfg.ep
        self.dp_shard = self._resolve_dp_shard()
        self._check_world()
        self._check_ep()
        if model_cfg is not None:
            check_model(self, model_cfg)
        self.world_mesh: DeviceMesh | None = None
        self._meshes: dict[str, DeviceMesh] = {}

    def _resolve_dp_shard(self) -> int:
        if self.cfg.dp_shard != -1:
            return self.cfg.dp_shard
        others = self.dp_replicate * self.tp * self.pp
        _require(
            self.world_size % others == 0,
            f"dp_shard=-1 cannot fill the world: world size {self.world_size} is not divisible by "
            f"dp_replicate*tp*pp = {self.dp_replicate}*{self.tp}*{self.pp} = {others}; "
            "change tp, pp or dp_replicate, or the number of processes",
        )
        return self.world_size // others

    def _check_world(self) -> None:
        product = self.pp * self.dp_replicate * self.dp_shard * self.tp
        _require(
            product == self.world_size,
            f"pp*dp_replicate*dp_shard*tp = {self.pp}*{self.dp_replicate}*{self.dp_shard}*{self.tp} = "
            f"{product} but the world size is {self.world_size}: make the product equal the number of "
            "processes (dp_shard=-1 fills in the rest)",
        )
        cfg = self.cfg
        if cfg.zero_engine == "deepspeed" and self.pp > 1:
            _require(
                cfg.zero_stage == 1,
                f"DeepSpeed with pipeline parallelism (pp={self.pp}) only allows ZeRO-1, got "
                f"parallel.zero_stage={cfg.zero_stage}: set parallel.zero_stage=1, or parallel.pp=1, or "
                "parallel.zero_engine=fsdp2",
            )

    def _check_ep(self) -> None:
        if self.ep == 1:
            return
        if self.tp == 1:
            _require(
                self.dp_shard % self.ep == 0,
                f"ep={self.ep} must divide dp_shard={self.dp_shard}: expert parallelism borrows "
                "data-parallel shard ranks; change ep or dp_shard",
            )
            return
        _require(
            self.cfg.sequence_parallel,
            f"ep={self.ep} with tp={self.tp} needs sequence_parallel=true: the MoE then runs on each TP "
            "rank's own tokens, which the ep group spans; set parallel.sequence_parallel=true, or ep=1 "
            "(experts split by hidden units under TP)",
        )
        _require(
            self.ep % self.tp == 0 and self.dp_shard % (self.ep // self.tp) == 0,
            f"ep={self.ep} with tp={self.tp}, dp_shard={self.dp_shard}: the ep group spans the whole TP "
            f"group and ep/tp dp_shard ranks, so ep must be tp times a divisor of dp_shard "
            f"(e.g. ep={self.tp} or ep={self.tp * self.dp_shard}); change ep",
        )

    @property
    def dp(self) -> int:
        """Data-parallel size: ranks holding different batches (dp_replicate * dp_shard)."""
        return self.dp_replicate * self.dp_shard

    @property
    def tp_enabled(self) -> bool:
        return self.tp > 1

    @property
    def pp_enabled(self) -> bool:
        return self.pp > 1

    @property
    def ep_enabled(self) -> bool:
        return self.ep > 1

    @property
    def ep_spans_tp(self) -> bool:
        """EP with TP: the MoE runs on each TP rank's sequence-parallel tokens, and the ep
        group is made of the TP group and ep/tp data-parallel shard ranks."""
        return self.ep > 1 and self.tp > 1

    @property
    def fsdp_enabled(self) -> bool:
        """FSDP2 runs when there is data parallelism and the ZeRO engine is fsdp2."""
        return self.dp > 1 and self.cfg.zero_engine == "fsdp2"

    @property
    def num_stages(self) -> int:
        return self.pp * self.cfg.pp_stages_per_rank

    @property
    def num_microbatches(self) -> int:
        return self.cfg.pp_microbatches if self.cfg.pp_microbatches is not None else self.num_stages

    def build_mesh(self, device_type: str = "cuda") -> DeviceMesh:
        """The world mesh (pp, dp_replicate, dp_shard, tp), with the views of the module
        docstring registered on this object. Every rank must call it (it creates groups)."""
        sizes = (self.pp, self.dp_replicate, self.dp_shard, self.tp)
        mesh = init_device_mesh(device_type, sizes, mesh_dim_names=MESH_AXES)
        views = {name: mesh[name] for name in MESH_AXES}
        views["dp"] = mesh["dp_replicate", "dp_shard"]._flatten("dp")
        views["fsdp"] = mesh["dp_replicate", "dp_shard"] if self.dp_replicate > 1 else mesh["dp_shard"]
        views.update(self._ep_views(mesh))
        if self.ep_spans_tp:
            views["moe_batch"] = mesh["dp_replicate", "dp_shard", "tp"]._flatten("moe_batch")
        else:
            views["moe_batch"] = views["dp"]
        self.world_mesh, self._meshes = mesh, views
        return mesh

    def _ep_views(self, mesh: DeviceMesh) -> dict[str, DeviceMesh]:
        ep_in_dp = self.ep // self.tp if self.ep_spans_tp else self.ep
        inner = "dp_shard_in_ep" if self.ep_spans_tp else "ep"
        # The axis by index: torch 2.11 rejects its name here.
        dp_shard_axis = MESH_AXES.index("dp_shard")
        ep_split = mesh._unflatten(dp_shard_axis, (self.dp_shard // ep_in_dp, ep_in_dp), ("dp_shard_mod_ep", inner))
        return {
            "ep": self._ep_mesh_spanning_tp(mesh, ep_in_dp) if self.ep_spans_tp else ep_split["ep"],
            "dp_shard_mod_ep": ep_split["dp_shard_mod_ep"],
            "ep_fsdp": (
                ep_split["dp_replicate", "dp_shard_mod_ep"] if self.dp_replicate > 1 else ep_split["dp_shard_mod_ep"]
            ),
        }

    def _ep_mesh_spanning_tp(self, mesh: DeviceMesh, ep_in_dp: int) -> DeviceMesh:
        """The ep mesh over (inner ep_in_dp ranks of dp_shard) x tp, flattened, built from the
        rank grid (slicing an unflattened axis together with "tp" is refused by torch 2.11)."""
        ranks = mesh.mesh.reshape(self.pp, self.dp_replicate, self.dp_shard // ep_in_dp, ep_in_dp, self.tp)
        groups = ranks.reshape(-1, ep_in_dp * self.tp)  # one row per ep group, dp_shard_in_ep outer
        return DeviceMesh(mesh.device_type, groups, mesh_dim_names=("ep_outer", "ep"))["ep"]

    def get_mesh(self, name: str) -> DeviceMesh:
        """A named view of the world mesh (see the module docstring); after build_mesh."""
        if self.world_mesh is None:
            raise ValueError("ParallelDims.get_mesh: call build_mesh(device_type) first")
        if name not in self._meshes:
            raise ValueError(f"ParallelDims.get_mesh: unknown mesh {name!r}; known: {sorted(self._meshes)}")
        return self._meshes[name]

    @property
    def ep_mesh(self) -> DeviceMesh:
        """The 1-D expert-parallel mesh (size ep: inner ranks of dp_shard, with the TP group when
        tp > 1); after build_mesh."""
        return self.get_mesh("ep")

    def __repr__(self) -> str:
        return (
            f"ParallelDims(world={self.world_size}: pp={self.pp}, dp_replicate={self.dp_replicate}, "
            f"dp_shard={self.dp_shard}, tp={self.tp}, ep={self.ep})"
        )


def check_model(dims: ParallelDims, model_cfg: ModelConfig) -> None:
    """Raise ValueError if `model_cfg` cannot be split as `dims` says."""
    kinds = {spec.mixer for spec in model_cfg.layers} | {spec.ffn for spec in model_cfg.layers}
    if dims.tp > 1:
        _check_tp(dims.tp, model_cfg, kinds, dims.ep > 1)
    if dims.ep > 1:
        _require("moe" in kinds, f"ep={dims.ep} but the model has no MoE layer (pattern symbol 'E'); set ep=1")
        _require(
            model_cfg.moe.num_experts % dims.ep == 0,
            f"moe.num_experts={model_cfg.moe.num_experts} is not divisible by ep={dims.ep}; "
            "choose an ep that divides the number of experts",
        )
    _check_pp(dims, model_cfg.resolved_num_layers)


def _check_tp(tp: int, cfg: ModelConfig, kinds: set, expert_parallel: bool) -> None:
    """expert_parallel: the MoE layers run on local tokens under EP, their widths unsplit."""
    def divisible(value: int, name: str, why: str = "") -> None:
        _require(value % tp == 0, f"tp={tp} does not divide {name}={value}{why}: choose a tp that divides it")

    divisible(cfg.vocab_size, "vocab_size", " (the embedding and the head are split by vocab)")
    if kinds & {"attention", "sliding"}:
        divisible(cfg.attention.num_heads, "attention.num_heads")
        divisible(cfg.attention.num_kv_heads, "attention.num_kv_heads")
    if "gla" in kinds:
        divisible(cfg.gla.num_heads, "gla.num_heads")
    if "mamba2" in kinds:
        divisible(cfg.mamba2.num_heads(cfg.d_model), "the Mamba-2 heads (expand*d_model/head_dim)")
        divisible(cfg.mamba2.n_groups, "mamba2.n_groups", " (each B/C and gated-norm group stays on one rank)")
    if "mlp" in kinds:
        divisible(cfg.mlp.d_ff, "mlp.d_ff")
    if "moe" in kinds and not expert_parallel:
        divisible(cfg.moe.d_expert, "moe.d_expert")
        if cfg.moe.num_shared_experts > 0:
            d_shared = cfg.moe.d_shared if cfg.moe.d_shared is not None else cfg.moe.d_expert
            divisible(d_shared * cfg.moe.num_shared_experts, "the shared experts' hidden width")
    if "matformer" in kinds:
        _check_matformer_bands(tp, cfg)


def matformer_bands(cfg: ModelConfig) -> list[int]:
    """Hidden units between consecutive MatFormer granularities: [m_1, m_2 - m_1, ...]."""
    mat = cfg.matformer
    bounds = [0] + [mat.hidden(g) for g in mat.granularities]
    return [hi - lo for lo, hi in zip(bounds, bounds[1:])]


def _check_matformer_bands(tp: int, cfg: ModelConfig) -> None:
    bands = matformer_bands(cfg)
    bad = [b for b in bands if b % tp]
    _require(
        not bad,
        f"tp={tp} does not divide every MatFormer nesting band {bands} (hidden units between "
        f"consecutive granularities {tuple(cfg.matformer.granularities)} of d_ff={cfg.matformer.d_ff}): "
        "each TP rank holds an equal share of every band; choose d_ff and granularities whose bands "
        f"are multiples of {tp}",
    )


def _check_pp(dims: ParallelDims, num_layers: int) -> None:
    cfg = dims.cfg
    if dims.pp > 1:
        interleaved = cfg.pp_schedule == "interleaved_1f1b"
        _require(
            (cfg.pp_stages_per_rank >= 2) == interleaved,
            f"pp_schedule={cfg.pp_schedule!r} with pp_stages_per_rank={cfg.pp_stages_per_rank}: "
            "'interleaved_1f1b' needs pp_stages_per_rank >= 2, '1f1b' and 'gpipe' need 1",
        )
        _require(
            dims.num_microbatches >= dims.pp,
            f"pp_microbatches={dims.num_microbatches} is smaller than pp={dims.pp}: the pipeline "
            f"would never fill; use at least {dims.pp}",
        )
    _require(
        num_layers >= dims.num_stages,
        f"{num_layers} layers cannot fill pp*pp_stages_per_rank = {dims.pp}*{cfg.pp_stages_per_rank} = "
        f"{dims.num_stages} pipeline stages: lower pp or pp_stages_per_rank",
    )
    if cfg.pp_cut_points is None:
        return
    cuts = cfg.pp_cut_points
    _require(
        len(cuts) == dims.num_stages - 1,
        f"parallel.pp_cut_points={cuts} gives {len(cuts) + 1} stages but pp*pp_stages_per_rank = "
        f"{dims.num_stages}: give {dims.num_stages - 1} cut points",
    )
    _require(
        all(a < b for a, b in zip((0,) + cuts, cuts + (num_layers,))),
        f"parallel.pp_cut_points={cuts} must be strictly increasing layer indices in (0, {num_layers}) "
        "(each stage needs at least one layer)",
    )

