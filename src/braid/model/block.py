"""One block: an optional mixer sublayer then an optional FFN sublayer, each pre-norm residual.

Shapes: B batch, T time, D d_model.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from braid.model.attention import Attention
from braid.model.config import ModelConfig
from braid.model.gla import GatedLinearAttention
from braid.model.mamba2 import Mamba2
from braid.model.matformer import MatFormerFFN
from braid.model.mlp import SwiGLU
from braid.model.moe import MoE
from braid.model.norm import RMSNorm
from braid.model.pattern import LayerSpec


def build_mixer(cfg: ModelConfig, spec: LayerSpec) -> nn.Module:
    """The token mixer of one layer, chosen by the layer's pattern symbol."""
    if spec.mixer == "mamba2":
        return Mamba2(cfg.d_model, cfg.mamba2, norm_eps=cfg.norm_eps, n_groups=cfg.mamba2.layer_groups(spec.index))
    if spec.mixer == "gla":
        return GatedLinearAttention(cfg.d_model, cfg.gla, norm_eps=cfg.norm_eps)
    if spec.mixer in ("attention", "sliding"):
        window = None
        if spec.mixer == "sliding":
            window = spec.window if spec.window is not None else cfg.attention.window
        _, num_kv_heads = cfg.attention.layer_heads(spec.index)
        return Attention(cfg.d_model, cfg.attention, window=window, norm_eps=cfg.norm_eps, num_kv_heads=num_kv_heads)
    raise ValueError(f"layer {spec.index}: no mixer is registered for kind {spec.mixer!r}")


def build_ffn(cfg: ModelConfig, spec: LayerSpec) -> nn.Module:
    """The FFN of one layer, chosen by the layer's pattern symbol."""
    if spec.ffn == "mlp":
        return SwiGLU(cfg.d_model, cfg.mlp.hidden(spec.index))
    if spec.ffn == "moe":
        return MoE(cfg.d_model, cfg.moe)
    if spec.ffn == "matformer":
        return MatFormerFFN(cfg.d_model, cfg.matformer)
    raise ValueError(f"layer {spec.index}: no FFN is registered for kind {spec.ffn!r}")


NESTED_HEAD_MIXERS = ("attention", "sliding", "mamba2")  # mixers whose forward takes heads=


class Block(nn.Module):
    """x + mixer(norm(x)), then x + ffn(norm(x)); either sublayer may be absent.

    `width` is the MatFormer FFN width and `heads` the nested-heads fraction of the mixer
    (attention: KV heads, Mamba-2: B/C groups); other layer kinds ignore them.

    With LayerNorm Scaling ("The Curse of Depth") each norm's output is scaled by
    1/sqrt(layer depth), depth counted from 1.
    """

    def __init__(self, cfg: ModelConfig, spec: LayerSpec):
        super().__init__()
        self.spec = spec
        scale = 1.0 / math.sqrt(spec.index + 1) if cfg.layernorm_scaling else 1.0
        if spec.mixer is not None:
            self.mixer_norm = RMSNorm(cfg.d_model, cfg.norm_eps, scale)
            self.mixer = build_mixer(cfg, spec)
        if spec.ffn is not None:
            self.ffn_norm = RMSNorm(cfg.d_model, cfg.norm_eps, scale)
            self.ffn = build_ffn(cfg, spec)

    def forward(
        self,
        x_BTD: torch.Tensor,
        doc_ids_BT: torch.Tensor | None = None,
        cache=None,
        width: float | None = None,
        heads: float | None = None,
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        aux: dict[str, torch.Tensor] = {}
        if self.spec.mixer is not None:
            # heads by keyword: the TP plans prepare exactly the (x, doc_ids, cache) positionals.
            extra = {"heads": heads} if self.spec.mixer in NESTED_HEAD_MIXERS else {}
            x_BTD = x_BTD + self.mixer(self.mixer_norm(x_BTD), doc_ids_BT, cache, **extra)
        if self.spec.ffn is not None:
            h_BTD = self.ffn_norm(x_BTD)
            if self.spec.ffn == "matformer":
                y_BTD = self.ffn(h_BTD, width)
            elif self.spec.ffn == "moe":
                y_BTD, aux = self.ffn(h_BTD)
            else:
                y_BTD = self.ffn(h_BTD)
            x_BTD = x_BTD + y_BTD
        return x_BTD, aux

    def new_cache(self, batch_size: int, max_seq_len: int, device, dtype):
        if self.spec.mixer is None:
            return None
        return self.mixer.new_cache(batch_size, max_seq_len, device, dtype)
