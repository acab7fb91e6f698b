"""Model configuration: typed dataclasses, validated when built.

Every size is explicit; nothing is inferred at forward time. A bad value raises
ValueError with a message that says what to change.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from braid.model.pattern import FFN_KINDS, MIXER_KINDS, LayerSpec, parse_pattern


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise ValueError(message)


def nested_count(fraction: float, total: int, what: str) -> int:
    """How many of `total` nested units (KV heads, B/C groups) a head fraction keeps.

    The fraction must keep a whole, non-empty prefix: fraction * total a positive integer.
    """
    kept = fraction * total
    _require(
        0 < fraction <= 1 and abs(kept - round(kept)) < 1e-9 and round(kept) >= 1,
        f"heads fraction {fraction} of {total} {what} is not a whole number of them; "
        f"use a multiple of 1/{total} in (0, 1]",
    )
    return int(round(kept))


@dataclass
class AttentionConfig:
    """Causal softmax attention with GQA and RoPE; full or sliding window per layer."""

    num_heads: int = 4
    num_kv_heads: int = 4
    head_dim: int | None = None  # default: d_model // num_heads
    rope_theta: float = 10_000.0
    window: int = 512  # default window of sliding-window layers ('S' without digits)
    # Extracted submodels: KV heads per layer (0 for layers without attention); each keeps
    # num_heads / num_kv_heads query heads per KV head. Empty: num_kv_heads everywhere.
    kv_heads_per_layer: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        self.kv_heads_per_layer = tuple(int(j) for j in self.kv_heads_per_layer)  # YAML gives lists

    def layer_heads(self, layer: int) -> tuple[int, int]:
        """(query heads, KV heads) of layer `layer`."""
        num_kv = self.kv_heads_per_layer[layer] if self.kv_heads_per_layer else self.num_kv_heads
        return num_kv * (self.num_heads // self.num_kv_heads), num_kv

    def validate(self, d_model: int) -> None:
        _require(self.num_heads > 0, f"attention.num_heads must be positive, got {self.num_heads}")
        _require(
            self.num_kv_heads > 0 and self.num_heads % self.num_kv_heads == 0,
            f"attention.num_kv_heads={self.num_kv_heads} must divide attention.num_heads="
            f"{self.num_heads} (grouped-query attention shares each KV head across a group)",
        )
        if self.head_dim is None:
            _require(
                d_model % self.num_heads == 0,
                f"attention.num_heads={self.num_heads} does not divide d_model={d_model}: "
                "choose heads that divide d_model or set attention.head_dim",
            )
        _require(self.window > 0, f"attention.window must be positive, got {self.window}")
        _require(self.rope_theta > 0, f"attention.rope_theta must be positive, got {self.rope_theta}")

    def resolved_head_dim(self, d_model: int) -> int:
        return self.head_dim if self.head_dim is not None else d_model // self.num_heads


@dataclass
class Mamba2Config:
    """Mamba-2 (SSD) mixer; names follow mamba_ssm's Mamba2."""

    d_state: int = 64
    d_conv: int = 4
    expand: int = 2
    head_dim: int = 64
    n_groups: int = 1
    chunk_size: int = 64
    dt_min: float = 0.001
    dt_max: float = 0.1
    dt_init_floor: float = 1e-4
    A_init_range: tuple[float, float] = (1.0, 16.0)
    # Extracted submodels: B/C groups per layer (0 for layers without Mamba-2), each with its
    # num_heads / n_groups heads, so d_inner shrinks with them. Empty: n_groups everywhere.
    groups_per_layer: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        self.A_init_range = tuple(self.A_init_range)  # YAML gives lists
        self.groups_per_layer = tuple(int(g) for g in self.groups_per_layer)

    def d_inner(self, d_model: int) -> int:
        return self.expand * d_model

    def num_heads(self, d_model: int) -> int:
        return self.d_inner(d_model) // self.head_dim

    def layer_groups(self, layer: int) -> int:
        return self.groups_per_layer[layer] if self.groups_per_layer else self.n_groups

    def layer_num_heads(self, d_model: int, layer: int) -> int:
        return self.layer_groups(layer) * (self.num_heads(d_model) // self.n_groups)

    def layer_d_inner(self, d_model: int, layer: int) -> int:
        return self.layer_num_heads(d_model, layer) * self.head_dim

    def validate(self, d_model: int) -> None:
        d_inner = self.d_inner(d_model)
        _require(
            d_inner % self.head_dim == 0,
            f"mamba2.head_dim={self.head_dim} does not divide d_inner=expand*d_model={d_inner}",
        )
        num_heads = d_inner // self.head_dim
        _require(
            self.n_groups > 0 and num_heads % self.n_groups == 0,
            f"mamba2.n_groups={self.n_groups} must divide the number of Mamba-2 heads "
            f"{num_heads} (= expand*d_model/head_dim)",
        )
        _require(self.d_state > 0, f"mamba2.d_state must be positive, got {self.d_state}")
        _require(self.d_conv >= 1, f"mamba2.d_conv must be at least 1, got {self.d_conv}")
        _require(self.chunk_size > 0, f"mamba2.chunk_size must be positive, got {self.chunk_size}")
        _require(
            0 < self.dt_min <= self.dt_max,
            f"mamba2.dt_min={self.dt_min} and dt_max={self.dt_max} need 0 < dt_min <= dt_max",
        )
        lo, hi = self.A_init_range
        _require(0 < lo <= hi, f"mamba2.A_init_range={self.A_init_range} needs 0 < low <= high")


@dataclass
class GLAConfig:
    """Gated linear attention (Yang et al. 2023); names follow fla's GatedLinearAttention."""

    num_heads: int = 4
    expand_k: float = 0.5
    expand_v: float = 1.0
    gate_low_rank: int = 16
    gate_logit_normalizer: float = 16.0
    chunk_size: int = 64

    def key_dim(self, d_model: int) -> int:
        return int(d_model * self.expand_k)

    def value_dim(self, d_model: int) -> int:
        return int(d_model * self.expand_v)

    def validate(self, d_model: int) -> None:
        _require(self.num_heads > 0, f"gla.num_heads must be positive, got {self.num_heads}")
        for name in ("key_dim", "value_dim"):
            dim = getattr(self, name)(d_model)
            _require(
                dim > 0 and dim % self.num_heads == 0,
                f"gla.num_heads={self.num_heads} does not divide gla {name}={dim} "
                f"(d_model*expand_{name[0]}); change gla.num_heads or gla.expand_{name[0]}",
            )
        _require(self.gate_low_rank > 0, f"gla.gate_low_rank must be positive, got {self.gate_low_rank}")
        _require(self.gate_logit_normalizer > 0, "gla.gate_logit_normalizer must be positive")
        _require(self.chunk_size > 0, f"gla.chunk_size must be positive, got {self.chunk_size}")


@dataclass
class MLPConfig:
    """Dense SwiGLU FFN.

    `d_ff_per_layer` (empty: every dense layer has `d_ff`) gives one hidden width per layer
    of the stack, 0 for layers without a dense FFN; extracted MatFormer submodels use it.
    """

    d_ff: int = 512
    d_ff_per_layer: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        self.d_ff_per_layer = tuple(int(d) for d in self.d_ff_per_layer)  # YAML gives lists

    def validate(self, d_model: int) -> None:
        _require(self.d_ff > 0, f"mlp.d_ff must be positive, got {self.d_ff}")

    def hidden(self, layer: int) -> int:
        return self.d_ff_per_layer[layer] if self.d_ff_per_layer else self.d_ff


@dataclass
class MoEConfig:
    """Dropless top-k mixture of SwiGLU experts."""

    num_experts: int = 8
    top_k: int = 2
    d_expert: int = 256
    score: str = "softmax"  # "softmax" or "sigmoid"
    num_shared_experts: int = 0
    d_shared: int | None = None  # default: d_expert
    load_balance_coef: float = 0.01
    z_loss_coef: float = 0.001
    bias_balancing: bool = False  # aux-loss-free balancing (DeepSeek-V3)
    bias_update_rate: float = 0.001

    def validate(self, d_model: int) -> None:
        _require(self.num_experts > 0, f"moe.num_experts must be positive, got {self.num_experts}")
        _require(
            0 < self.top_k <= self.num_experts,
            f"moe.top_k={self.top_k} must be between 1 and moe.num_experts={self.num_experts}",
        )
        _require(self.d_expert > 0, f"moe.d_expert must be positive, got {self.d_expert}")
        _require(
            self.score in ("softmax", "sigmoid"),
            f"moe.score={self.score!r} is not one of 'softmax', 'sigmoid'",
        )
        _require(self.num_shared_experts >= 0, "moe.num_shared_experts must be >= 0")
        _require(self.load_balance_coef >= 0 and self.z_loss_coef >= 0, "moe loss coefficients must be >= 0")


@dataclass
class MatFormerConfig:
    """Nested SwiGLU FFN: width w uses the first round(w * d_ff) hidden units."""

    d_ff: int = 512
    granularities: tuple[float, ...] = (0.125, 0.25, 0.5, 1.0)

    def __post_init__(self) -> None:
        self.granularities = tuple(float(g) for g in self.granularities)  # YAML gives lists

    def validate(self, d_model: int) -> None:
        _require(self.d_ff > 0, f"matformer.d_ff must be positive, got {self.d_ff}")
        grans = tuple(self.granularities)
        _require(len(grans) > 0, "matformer.granularities must not be empty")
        _require(
            all(0 < g <= 1 for g in grans) and list(grans) == sorted(set(grans)),
            f"matformer.granularities={grans} must be increasing fractions in (0, 1]",
        )
        _require(grans[-1] == 1.0, f"matformer.granularities={grans} must end with 1.0 (the full width)")
        for g in grans:
            _require(
                round(g * self.d_ff) >= 1,
                f"matformer granularity {g} of d_ff={self.d_ff} leaves no hidden unit",
            )

    def hidden(self, width: float) -> int:
        if width not in self.granularities:
            raise ValueError(
                f"MatFormer width {width} is not one of matformer.granularities={tuple(self.granularities)}"
            )
        return int(round(width * self.d_ff))


@dataclass
class ModelConfig:
    """A decoder: embedding, `num_layers` blocks tiled from `pattern`, final norm, head.

    See docs/model.md for the pattern grammar. `num_layers=None` takes the pattern's
    own length (as Megatron's hybrid_override_pattern does).
    """

    d_model: int = 128
    vocab_size: int = 4096
    max_seq_len: int = 256
    pattern: str = "A-"
    num_layers: int | None = None
    attention: AttentionConfig = field(default_factory=AttentionConfig)
    mamba2: Mamba2Config = field(default_factory=Mamba2Config)
    gla: GLAConfig = field(default_factory=GLAConfig)
    mlp: MLPConfig = field(default_factory=MLPConfig)
    moe: MoEConfig = field(default_factory=MoEConfig)
    matformer: MatFormerConfig = field(default_factory=MatFormerConfig)
    norm_eps: float = 1e-5
    tie_embeddings: bool = False
    layernorm_scaling: bool = False  # scale each norm's output by 1/sqrt(layer depth)
    init_std: float = 0.02

    def __post_init__(self) -> None:
        self.validate()

    @property
    def layers(self) -> list[LayerSpec]:
        return parse_pattern(self.pattern, self.num_layers)

    @property
    def resolved_num_layers(self) -> int:
        return len(self.layers)

    def validate(self) -> None:
        _require(self.d_model > 0, f"d_model must be positive, got {self.d_model}")
        _require(self.vocab_size > 0, f"vocab_size must be positive, got {self.vocab_size}")
        _require(self.max_seq_len > 0, f"max_seq_len must be positive, got {self.max_seq_len}")
        _require(self.norm_eps > 0, f"norm_eps must be positive, got {self.norm_eps}")
        layers = self.layers  # raises on a bad pattern
        mixers = {spec.mixer for spec in layers}
        ffns = {spec.ffn for spec in layers}
        if mixers & {"attention", "sliding"}:
            self.attention.validate(self.d_model)
        for spec in layers:
            if spec.window is not None:
                _require(
                    spec.window <= self.max_seq_len,
                    f"layer {spec.index}: sliding window {spec.window} is larger than the context "
                    f"max_seq_len={self.max_seq_len}; use full attention ('A') or a smaller window",
                )
        if "mamba2" in mixers:
            self.mamba2.validate(self.d_model)
        if "gla" in mixers:
            self.gla.validate(self.d_model)
        if "mlp" in ffns:
            self.mlp.validate(self.d_model)
        if self.mlp.d_ff_per_layer:
            self._validate_d_ff_per_layer(layers)
        _validate_per_layer(
            self.attention.kv_heads_per_layer, "attention.kv_heads_per_layer", layers,
            lambda spec: spec.mixer in ("attention", "sliding"), "an attention mixer",
        )
        _validate_per_layer(
            self.mamba2.groups_per_layer, "mamba2.groups_per_layer", layers,
            lambda spec: spec.mixer == "mamba2", "a Mamba-2 mixer",
        )
        if "moe" in ffns:
            self.moe.validate(self.d_model)
        if "matformer" in ffns:
            self.matformer.validate(self.d_model)

    def _validate_d_ff_per_layer(self, layers: list[LayerSpec]) -> None:
        per_layer = self.mlp.d_ff_per_layer
        _require(
            len(per_layer) == len(layers),
            f"mlp.d_ff_per_layer has {len(per_layer)} entries but the model has {len(layers)} layers; "
            "give one width per layer (0 where the layer has no dense '-' FFN) or leave it empty",
        )
        for spec, d_ff in zip(layers, per_layer):
            dense = spec.ffn == "mlp"
            _require(
                d_ff > 0 if dense else d_ff == 0,
                f"mlp.d_ff_per_layer[{spec.index}]={d_ff}: layer {spec.index} ({spec.symbol!r}) needs "
                + ("a positive width" if dense else "0 (it has no dense '-' FFN)"),
            )

    def replace(self, **changes) -> ModelConfig:
        return dataclasses.replace(self, **changes)


def _validate_per_layer(counts: tuple[int, ...], name: str, layers: list[LayerSpec], has, kind: str) -> None:
    """A per-layer count: one entry per layer, positive where the layer has `kind`, else 0."""
    if not counts:
        return
    _require(
        len(counts) == len(layers),
        f"{name} has {len(counts)} entries but the model has {len(layers)} layers; "
        f"give one count per layer (0 where the layer has no {kind}) or leave it empty",
    )
    for spec, count in zip(layers, counts):
        _require(
            count > 0 if has(spec) else count == 0,
            f"{name}[{spec.index}]={count}: layer {spec.index} ({spec.symbol!r}) needs "
            + ("a positive count" if has(spec) else f"0 (it has no {kind})"),
        )


SUBCONFIGS = {
    "attention": AttentionConfig,
    "mamba2": Mamba2Config,
    "gla": GLAConfig,
    "mlp": MLPConfig,
    "moe": MoEConfig,
    "matformer": MatFormerConfig,
}

__all__ = [
    "AttentionConfig",
    "FFN_KINDS",
    "GLAConfig",
    "MIXER_KINDS",
    "MLPConfig",
    "Mamba2Config",
    "MatFormerConfig",
    "ModelConfig",
    "MoEConfig",
    "SUBCONFIGS",
    "nested_count",
]
