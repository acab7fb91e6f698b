"""All initialisation in one place.

| parameter                                              | init                                   |
|--------------------------------------------------------|----------------------------------------|
| tok_embeddings, output (untied head)                   | normal(0, init_std)                    |
| input projections: wq wk wv, z/x/B/C/dt_proj,          | normal(0, init_std)                    |
|   q/k/v/g_proj, w1 w3 (dense, MatFormer, experts),     |                                        |
|   router                                               |                                        |
| output projections: wo, out_proj, o_proj, w2           | normal(0, init_std / sqrt(2 * layers)) |
|   (dense, MatFormer, experts, shared expert)           |   (scaled residual init, GPT-2)        |
| RMSNorm / gated RMSNorm weights                        | 1                                      |
| Mamba-2 dt_bias                                        | softplus^-1(dt), dt ~ logU(dt_min,     |
|                                                        |   dt_max), floored at dt_init_floor    |
| Mamba-2 A_log, D                                       | log U(A_init_range), 1                 |
| Mamba-2 causal conv                                    | U(+-1/sqrt(kernel)), bias 0            |
| GLA gate gk_down, gk_up                                | xavier_uniform(gain 2^-2.5), bias 0    |
| MoE expert_bias, tokens_per_expert (buffers)           | 0                                      |

Module-specific parts (Mamba-2, GLA gates, MoE buffers) come from each module's
`reset_parameters`; this function then applies the table's generic rows by name.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from braid.model.config import ModelConfig

OUTPUT_PROJECTIONS = frozenset({"wo", "out_proj", "o_proj", "w2"})
MODULE_INITIALISED = frozenset({"gk_down", "gk_up"})


@torch.no_grad()
def init_weights(model: nn.Module, cfg: ModelConfig, seed: int = 0) -> None:
    """Initialise every parameter and buffer of `model` (a Decoder or a slice of one)."""
    std = cfg.init_std
    out_std = std / math.sqrt(2 * cfg.resolved_num_layers)
    devices = [p.device for p in model.parameters() if p.device.type == "cuda"][:1]
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        for module in model.modules():
            if module is not model and hasattr(module, "reset_parameters") and not isinstance(
                module, (nn.Linear, nn.Embedding)
            ):
                module.reset_parameters()
        for name, module in model.named_modules():
            leaf = name.rsplit(".", 1)[-1]
            if isinstance(module, nn.Embedding):
                nn.init.normal_(module.weight, 0.0, std)
            elif isinstance(module, nn.Linear) and leaf not in MODULE_INITIALISED:
                nn.init.normal_(module.weight, 0.0, out_std if leaf in OUTPUT_PROJECTIONS else std)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif type(module).__name__ == "MoE":
                for p_name, param in module.named_parameters(recurse=False):
                    nn.init.normal_(param, 0.0, out_std if p_name in OUTPUT_PROJECTIONS else std)
            elif "norm" in type(module).__name__.lower() and hasattr(module, "weight"):
                nn.init.ones_(module.weight)
