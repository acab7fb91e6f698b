"""Single-device model code: config, layer pattern, mixers, FFNs, decoder, init, FLOPs."""

from __future__ import annotations

import torch

from braid.model.config import (
    AttentionConfig,
    GLAConfig,
    Mamba2Config,
    MatFormerConfig,
    MLPConfig,
    ModelConfig,
    MoEConfig,
)
from braid.model.decoder import Decoder, Submodel
from braid.model.flops import flops_by_kind, flops_per_token, layer_flops, num_params
from braid.model.generate import generate
from braid.model.init import init_weights
from braid.model.pattern import LayerSpec, format_pattern, parse_pattern


def build_model(
    cfg: ModelConfig, device: str | torch.device = "cpu", seed: int = 0, dtype: torch.dtype | None = None
) -> Decoder:
    """Build on the meta device, materialise on `device`, initialise (seeded).

    `dtype` casts the parameters (SSM parameters stay float32); `device="meta"` returns
    the uninitialised meta model (for planning and parameter counts).
    """
    with torch.device("meta"):
        model = Decoder(cfg)
    if torch.device(device).type == "meta":
        return model
    model.to_empty(device=device)
    init_weights(model, cfg, seed)
    if dtype is not None:
        model.cast(dtype)
    return model


__all__ = [
    "AttentionConfig",
    "Decoder",
    "GLAConfig",
    "LayerSpec",
    "MLPConfig",
    "Mamba2Config",
    "MatFormerConfig",
    "ModelConfig",
    "MoEConfig",
    "Submodel",
    "build_model",
    "flops_by_kind",
    "flops_per_token",
    "format_pattern",
    "generate",
    "init_weights",
    "layer_flops",
    "num_params",
    "parse_pattern",
]
