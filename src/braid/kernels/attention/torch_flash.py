"""Causal attention on PyTorch's built-in FlashAttention-2 (`torch.nn.attention.varlen`):
sliding windows and packed documents without the flash-attn package.

Every CUDA build of torch ships FlashAttention-2; `varlen_attn` exposes its variable-length
entry point with a (left, right) window, which is exactly braid's causal window and document
masking: each row, or each document with doc ids, is one sequence of the packed batch. Only
for float16/bfloat16 and head dims up to 256 (the dispatcher checks). Torch versions whose
`varlen_attn` has no `enable_gqa` get key/value heads repeated for their query heads.

Legend: B batch, T time, H query heads, J key/value heads, D head dim, N = B*T tokens.
"""

from __future__ import annotations

import inspect

import torch
from torch import Tensor
from torch.nn.attention.varlen import varlen_attn

from braid.kernels.varlen import segments

_NATIVE_GQA = "enable_gqa" in inspect.signature(varlen_attn).parameters
_row_starts: dict[tuple, Tensor] = {}


@torch.compiler.disable
def _rows_cu_seqlens(B: int, T: int, device: torch.device) -> Tensor:
    """cu_seqlens (B+1,) int32 of B rows of T tokens: one sequence per row (cached)."""
    key = (B, T, str(device))
    if key not in _row_starts:
        _row_starts[key] = torch.arange(0, (B + 1) * T, T, dtype=torch.int32, device=device)
    return _row_starts[key]


def attention_torch_flash(
    q_BTHD: Tensor,
    k_BTJD: Tensor,
    v_BTJD: Tensor,
    *,
    window: int | None = None,
    doc_ids_BT: Tensor | None = None,
    scale: float | None = None,
) -> Tensor:
    """Causal attention, each query seeing at most `window` keys (itself included). o_BTHD."""
    B, T, H, D = q_BTHD.shape
    if doc_ids_BT is None:
        cu_seqlens, max_len = _rows_cu_seqlens(B, T, q_BTHD.device), T
    else:
        seg = segments(doc_ids_BT)
        cu_seqlens, max_len = seg.cu_seqlens_int32, seg.max_seqlen
    window_size = (-1, 0) if window is None else (window - 1, 0)
    kwargs = {}
    J = k_BTJD.shape[2]
    if J != H:
        if _NATIVE_GQA:
            kwargs["enable_gqa"] = True
        else:
            k_BTJD, v_BTJD = (t.repeat_interleave(H // J, dim=2) for t in (k_BTJD, v_BTJD))
    o_NHD = varlen_attn(
        q_BTHD.reshape(B * T, H, D), k_BTJD.reshape(B * T, -1, D), v_BTJD.reshape(B * T, -1, v_BTJD.shape[-1]),
        cu_seqlens, cu_seqlens, max_len, max_len, scale=scale, window_size=window_size, **kwargs,
    )
    return o_NHD.view(B, T, H, -1)
