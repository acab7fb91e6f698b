"""Causal self-attention mixer: full or sliding window, GQA, RoPE, document masks, KV cache.

Legend: B batch, T new tokens, S cached key slots, D d_model, H query heads, J key/value
heads, K head dim, R = H * K and r = J * K (heads flattened).

A sliding-window layer's cache is a ring buffer of exactly `window` slots: the token at
absolute position p lives in slot p % window, so decode memory never grows past the window.

Nested heads (elastic submodels): `heads=f` keeps the first f * J KV heads with their query
heads (query head h reads KV head h // (H / J), so a prefix of KV heads owns a prefix of
query heads): a prefix of the rows of wq, wk, wv and of the columns of wo. Heads never mix
before wo, so the result is exactly a model with only those heads (`sliced_state_dict`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from braid.kernels.attention import attention
from braid.model.config import AttentionConfig, nested_count
from braid.model.rope import apply_rope, positions_from_doc_ids, rope_cos_sin


@dataclass
class KVCache:
    """Keys and values of one layer, already rotated; pos_BS is each slot's absolute position
    (-1 = empty). Full attention fills slots 0, 1, ... in order; a sliding window uses a ring."""

    k_BSJK: Tensor
    v_BSJK: Tensor
    pos_BS: Tensor
    window: int | None
    seq_len: int = 0  # tokens seen so far = absolute position of the next token

    @property
    def num_slots(self) -> int:
        return self.k_BSJK.shape[1]


class Attention(nn.Module):
    """Causal multi-head attention with grouped-query KV heads and rotary positions."""

    def __init__(
        self,
        d_model: int,
        cfg: AttentionConfig,
        *,
        window: int | None = None,
        norm_eps: float = 1e-5,
        num_kv_heads: int | None = None,
    ):
        """`num_kv_heads` (default cfg.num_kv_heads): this layer's KV heads, each with
        cfg.num_heads / cfg.num_kv_heads query heads (extracted submodels have fewer)."""
        super().__init__()
        cfg.validate(d_model)
        if window is not None and window < 1:
            raise ValueError(f"Attention: window must be a positive int or None (full causal), got {window}")
        self.d_model = d_model
        self.num_kv_heads = cfg.num_kv_heads if num_kv_heads is None else num_kv_heads
        self.num_heads = self.num_kv_heads * (cfg.num_heads // cfg.num_kv_heads)
        self.head_dim = cfg.resolved_head_dim(d_model)
        self.rope_theta = cfg.rope_theta
        self.window = window
        self.wq = nn.Linear(d_model, self.num_heads * self.head_dim, bias=False)
        self.wk = nn.Linear(d_model, self.num_kv_heads * self.head_dim, bias=False)
        self.wv = nn.Linear(d_model, self.num_kv_heads * self.head_dim, bias=False)
        self.wo = nn.Linear(self.num_heads * self.head_dim, d_model, bias=False)

    def reset_parameters(self) -> None:
        for linear in (self.wq, self.wk, self.wv, self.wo):
            nn.init.normal_(linear.weight, mean=0.0, std=0.02)

    def forward(
        self,
        x_BTD: Tensor,
        doc_ids_BT: Tensor | None = None,
        cache: KVCache | None = None,
        heads: float | None = None,
    ) -> Tensor:
        """y_BTD for x_BTD (B, T, d_model); doc_ids_BT (B, T) integer keeps documents apart.

        With `cache`, runs incrementally (prefill of any length, then usually T=1) and updates
        the cache in place; doc_ids must then be None.
        heads: fraction of the KV heads (with their query heads) to use, a multiple of
            1 / num_kv_heads; None or 1.0 is all of them.
        """
        self._check_inputs(x_BTD, doc_ids_BT, cache)
        B, T, _ = x_BTD.shape
        prefix = None if heads is None or heads == 1.0 else self._prefix(heads)
        # -1 heads: under tensor parallelism each rank holds only its own heads.
        if prefix is None:
            q_BTR, k_BTr, v_BTr = self.wq(x_BTD), self.wk(x_BTD), self.wv(x_BTD)
        else:
            q_BTR, k_BTr, v_BTr = (F.linear(x_BTD, w) for w in prefix[:3])
        q_BTHK = q_BTR.view(B, T, -1, self.head_dim)
        k_BTJK = k_BTr.view(B, T, -1, self.head_dim)
        v_BTJK = v_BTr.view(B, T, -1, self.head_dim)
        pos_BT = self._positions(x_BTD, doc_ids_BT, cache)
        cos_BTK, sin_BTK = rope_cos_sin(pos_BT, self.head_dim, self.rope_theta, q_BTHK.dtype)
        q_BTHK = apply_rope(q_BTHK, cos_BTK, sin_BTK)
        k_BTJK = apply_rope(k_BTJK, cos_BTK, sin_BTK)
        if cache is None:
            o_BTHK = attention(q_BTHK, k_BTJK, v_BTJK, window=self.window, doc_ids_BT=doc_ids_BT)
        else:
            o_BTHK = self._attend_cached(q_BTHK, k_BTJK, v_BTJK, pos_BT, cache)
        if prefix is None:
            return self.wo(o_BTHK.flatten(2))
        return F.linear(o_BTHK.flatten(2), prefix[3])

    def sliced_state_dict(self, heads: float) -> dict[str, Tensor]:
        """The state dict (copied weights) of this layer with only the first `heads` of its KV heads."""
        names = ("wq.weight", "wk.weight", "wv.weight", "wo.weight")
        return {name: w.detach().clone() for name, w in zip(names, self._prefix(heads))}

    def _prefix(self, heads: float) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """wq (R, D), wk and wv (r, D), wo (D, R) of the first heads * J KV heads; R = r * H / J."""
        require_unsharded(self.wq.weight)
        num_kv = nested_count(heads, self.num_kv_heads, "KV heads")
        rows_q = num_kv * (self.num_heads // self.num_kv_heads) * self.head_dim
        rows_kv = num_kv * self.head_dim
        return (
            self.wq.weight[:rows_q], self.wk.weight[:rows_kv], self.wv.weight[:rows_kv], self.wo.weight[:, :rows_q]
        )

    def new_cache(self, batch_size: int, max_seq_len: int, device, dtype) -> KVCache:
        """An empty cache: max_seq_len slots for full attention, `window` slots (a ring) otherwise."""
        num_slots = max_seq_len if self.window is None else self.window
        shape = (batch_size, num_slots, self.num_kv_heads, self.head_dim)
        return KVCache(
            k_BSJK=torch.zeros(shape, device=device, dtype=dtype),
            v_BSJK=torch.zeros(shape, device=device, dtype=dtype),
            pos_BS=torch.full((batch_size, num_slots), -1, device=device, dtype=torch.int64),
            window=self.window,
        )

    def extra_repr(self) -> str:
        return (
            f"heads={self.num_heads}, kv_heads={self.num_kv_heads}, head_dim={self.head_dim}, "
            f"window={self.window}, rope_theta={self.rope_theta}"
        )

    def _check_inputs(self, x_BTD: Tensor, doc_ids_BT: Tensor | None, cache: KVCache | None) -> None:
        if x_BTD.ndim != 3 or x_BTD.shape[-1] != self.d_model:
            raise ValueError(f"Attention: x must be (B, T, {self.d_model}), got {tuple(x_BTD.shape)}")
        if doc_ids_BT is not None and doc_ids_BT.shape != x_BTD.shape[:2]:
            raise ValueError(f"Attention: doc_ids {tuple(doc_ids_BT.shape)} must be (B, T) = {tuple(x_BTD.shape[:2])}")
        if cache is None:
            return
        if doc_ids_BT is not None:
            raise ValueError("Attention: doc_ids must be None with a cache (decode one document per row)")
        if cache.window != self.window or cache.k_BSJK.shape[0] != x_BTD.shape[0]:
            raise ValueError(
                f"Attention: cache (window={cache.window}, batch={cache.k_BSJK.shape[0]}) does not fit this "
                f"layer (window={self.window}) and batch {x_BTD.shape[0]}; build it with this layer's new_cache"
            )
        if self.window is None and cache.seq_len + x_BTD.shape[1] > cache.num_slots:
            raise ValueError(
                f"Attention: {x_BTD.shape[1]} new tokens after {cache.seq_len} overflow the KV cache of "
                f"max_seq_len={cache.num_slots}; build the cache with a larger max_seq_len"
            )

    def _positions(self, x_BTD: Tensor, doc_ids_BT: Tensor | None, cache: KVCache | None) -> Tensor:
        if doc_ids_BT is not None:
            return positions_from_doc_ids(doc_ids_BT)
        B, T, _ = x_BTD.shape
        offset = 0 if cache is None else cache.seq_len
        return torch.arange(offset, offset + T, device=x_BTD.device).expand(B, T)

    def _attend_cached(self, q_BTHK: Tensor, k_BTJK: Tensor, v_BTJK: Tensor, pos_BT: Tensor, cache: KVCache) -> Tensor:
        k_BTJK, v_BTJK = k_BTJK.to(cache.k_BSJK.dtype), v_BTJK.to(cache.v_BSJK.dtype)
        # With nested heads only the first KV heads' slots are read and written (views).
        num_kv = k_BTJK.shape[2]
        k_cache_BSJK, v_cache_BSJK = cache.k_BSJK[:, :, :num_kv], cache.v_BSJK[:, :, :num_kv]
        if self.window is None:
            _write_slots(cache, k_cache_BSJK, v_cache_BSJK, k_BTJK, v_BTJK, pos_BT, slots=pos_BT[0])
            end = cache.seq_len + q_BTHK.shape[1]
            k_BSJK, v_BSJK, k_pos_BS = k_cache_BSJK[:, :end], v_cache_BSJK[:, :end], cache.pos_BS[:, :end]
        else:
            # Attend before writing: a prompt longer than the window would overwrite keys its
            # own early queries still need.
            k_BSJK = torch.cat((k_cache_BSJK, k_BTJK), dim=1)
            v_BSJK = torch.cat((v_cache_BSJK, v_BTJK), dim=1)
            k_pos_BS = torch.cat((cache.pos_BS, pos_BT), dim=1)
        o_BTHK = attention(
            q_BTHK, k_BSJK.to(q_BTHK.dtype), v_BSJK.to(q_BTHK.dtype),
            window=self.window, q_pos_BT=pos_BT, k_pos_BS=k_pos_BS,
        )
        if self.window is not None:
            kept = min(q_BTHK.shape[1], self.window)
            last = slice(q_BTHK.shape[1] - kept, None)
            _write_slots(
                cache, k_cache_BSJK, v_cache_BSJK, k_BTJK[:, last], v_BTJK[:, last], pos_BT[:, last],
                slots=pos_BT[0, last] % self.window,
            )
        cache.seq_len += q_BTHK.shape[1]
        return o_BTHK


def _write_slots(
    cache: KVCache, k_cache_BSJK: Tensor, v_cache_BSJK: Tensor, k_BTJK: Tensor, v_BTJK: Tensor, pos_BT: Tensor,
    slots: Tensor,
) -> None:
    """Write keys/values into `k_cache_BSJK`/`v_cache_BSJK` (the cache's tensors or views of
    their first KV heads) and positions into the cache, at `slots`."""
    k_cache_BSJK.index_copy_(1, slots, k_BTJK)
    v_cache_BSJK.index_copy_(1, slots, v_BTJK)
    cache.pos_BS.index_copy_(1, slots, pos_BT)


def require_unsharded(weight: Tensor) -> None:
    """Nested heads slice a global prefix, which a tensor-parallel shard does not hold."""
    from torch.distributed.tensor import DTensor

    if isinstance(weight, DTensor):
        raise ValueError(
            "nested heads (heads < 1) are not supported under tensor parallelism: each rank holds "
            "its own heads, not a prefix; train the heads axis with parallel.tp=1 or drop elastic.heads"
        )
