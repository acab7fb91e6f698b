"""Causal attention on flash-attn (2.x): sliding windows and packed documents (varlen).

Only for float16/bfloat16, equal q/k/v head dims up to 256 (the dispatcher checks).

Legend: B batch, T time, H query heads, J key/value heads, D head dim.
"""

from __future__ import annotations

from flash_attn import flash_attn_func, flash_attn_varlen_func
from torch import Tensor

from braid.kernels.varlen import segments


def attention_flash(
    q_BTHD: Tensor,
    k_BTJD: Tensor,
    v_BTJD: Tensor,
    *,
    window: int | None = None,
    doc_ids_BT: Tensor | None = None,
    scale: float | None = None,
) -> Tensor:
    """Causal attention, each query seeing at most `window` keys (itself included). o_BTHD."""
    window_size = (-1, -1) if window is None else (window - 1, 0)
    if doc_ids_BT is None:
        return flash_attn_func(q_BTHD, k_BTJD, v_BTJD, softmax_scale=scale, causal=True, window_size=window_size)
    seg = segments(doc_ids_BT)
    cu_seqlens = seg.cu_seqlens_int32
    o_NHD = flash_attn_varlen_func(
        q_BTHD.flatten(0, 1), k_BTJD.flatten(0, 1), v_BTJD.flatten(0, 1),
        cu_seqlens, cu_seqlens, seg.max_seqlen, seg.max_seqlen,
        softmax_scale=scale, causal=True, window_size=window_size,
    )
    return o_NHD.view(q_BTHD.shape)
