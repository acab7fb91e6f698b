"""Gated linear attention mixer (Yang et al. 2023), laid out as fla's GatedLinearAttention.

Legend: B batch, T time, D d_model, H heads, K key head dim, V value head dim,
R gate low rank.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from braid.kernels.gla import gla, gla_step
from braid.model.config import GLAConfig
from braid.model.norm import GatedRMSNorm


@dataclass
class GLACache:
    """Inference state of one GLA layer: the recurrent state, float32 (float64 for float64 models)."""

    state_BHKV: Tensor


class GatedLinearAttention(nn.Module):
    """y = o_proj(norm(gla(q, k, v, g), g_proj(x))) with a low-rank data-dependent decay
    g = logsigmoid(gk_up(gk_down(x))) / gate_logit_normalizer, per key dim."""

    def __init__(self, d_model: int, cfg: GLAConfig, *, norm_eps: float = 1e-5):
        super().__init__()
        cfg.validate(d_model)
        self.d_model = d_model
        self.num_heads = cfg.num_heads
        self.key_dim = cfg.key_dim(d_model)
        self.value_dim = cfg.value_dim(d_model)
        self.gate_logit_normalizer = cfg.gate_logit_normalizer
        self.chunk_size = cfg.chunk_size
        self.q_proj = nn.Linear(d_model, self.key_dim, bias=False)
        self.k_proj = nn.Linear(d_model, self.key_dim, bias=False)
        self.v_proj = nn.Linear(d_model, self.value_dim, bias=False)
        self.g_proj = nn.Linear(d_model, self.value_dim, bias=False)
        self.gk_down = nn.Linear(d_model, cfg.gate_low_rank, bias=False)
        self.gk_up = nn.Linear(cfg.gate_low_rank, self.key_dim, bias=True)
        head_v_dim = self.value_dim // self.num_heads
        self.norm = GatedRMSNorm(self.value_dim, eps=norm_eps, group_size=head_v_dim, norm_before_gate=True)
        self.o_proj = nn.Linear(self.value_dim, d_model, bias=False)

    def reset_parameters(self, std: float = 0.02) -> None:
        """Projections N(0, std); the gate's low-rank pair xavier_uniform(gain 2**-2.5) as fla does."""
        for linear in (self.q_proj, self.k_proj, self.v_proj, self.g_proj, self.o_proj):
            nn.init.normal_(linear.weight, mean=0.0, std=std)
        for linear in (self.gk_down, self.gk_up):
            nn.init.xavier_uniform_(linear.weight, gain=2**-2.5)
        nn.init.zeros_(self.gk_up.bias)
        nn.init.ones_(self.norm.weight)

    def _heads(self, x_BTD: Tensor, width: int) -> Tensor:
        # -1 heads: under tensor parallelism each rank holds only its own heads.
        return x_BTD.unflatten(-1, (-1, width // self.num_heads))

    def forward(self, x_BTD: Tensor, doc_ids_BT: Tensor | None = None, cache: GLACache | None = None) -> Tensor:
        """x_BTD -> y_BTD. With `cache`, runs incrementally (a prompt of any length, then
        usually one token at a time) and updates cache.state_BHKV in place; doc_ids_BT
        must then be None."""
        if x_BTD.ndim != 3 or x_BTD.shape[-1] != self.d_model:
            raise ValueError(f"GatedLinearAttention: x must be (B, T, {self.d_model}), got {tuple(x_BTD.shape)}")
        if cache is not None and doc_ids_BT is not None:
            raise ValueError(
                "GatedLinearAttention: doc_ids_BT must be None when a cache is given "
                "(incremental decoding runs one document per row)"
            )
        q_BTHK = self._heads(self.q_proj(x_BTD), self.key_dim)
        k_BTHK = self._heads(self.k_proj(x_BTD), self.key_dim)
        v_BTHV = self._heads(self.v_proj(x_BTD), self.value_dim)
        gate_logits_BTK = self.gk_up(self.gk_down(x_BTD))
        g_BTHK = self._heads(F.logsigmoid(gate_logits_BTK) / self.gate_logit_normalizer, self.key_dim)
        if cache is None:
            o_BTHV = gla(q_BTHK, k_BTHK, v_BTHV, g_BTHK, chunk_size=self.chunk_size, doc_ids_BT=doc_ids_BT)
        else:
            o_BTHV = self._incremental(q_BTHK, k_BTHK, v_BTHV, g_BTHK, cache)
        o_BTV = self.norm(o_BTHV.flatten(-2), self.g_proj(x_BTD))
        return self.o_proj(o_BTV)

    def _incremental(self, q_BTHK: Tensor, k_BTHK: Tensor, v_BTHV: Tensor, g_BTHK: Tensor, cache: GLACache) -> Tensor:
        if q_BTHK.shape[1] == 1:
            o_BHV, state_BHKV = gla_step(q_BTHK[:, 0], k_BTHK[:, 0], v_BTHV[:, 0], g_BTHK[:, 0], cache.state_BHKV)
            o_BTHV = o_BHV[:, None]
        else:
            o_BTHV, state_BHKV = gla(
                q_BTHK,
                k_BTHK,
                v_BTHV,
                g_BTHK,
                chunk_size=self.chunk_size,
                initial_state_BHKV=cache.state_BHKV,
                return_final_state=True,
            )
        cache.state_BHKV.copy_(state_BHKV)
        return o_BTHV

    def new_cache(self, batch_size: int, max_seq_len: int, device, dtype) -> GLACache:
        """An empty cache; the state's size does not depend on max_seq_len."""
        state_dtype = torch.promote_types(dtype, torch.float32)
        head_k, head_v = self.key_dim // self.num_heads, self.value_dim // self.num_heads
        state_BHKV = torch.zeros(batch_size, self.num_heads, head_k, head_v, device=device, dtype=state_dtype)
        return GLACache(state_BHKV=state_BHKV)
