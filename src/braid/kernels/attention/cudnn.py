"""Causal attention on cuDNN's fused flash kernels with a diagonal band: sliding windows and
packed documents at cuDNN speed (nvidia-cudnn-frontend's `cudnn::sdpa_fwd` / `sdpa_bwd` ops).

torch's own SDPA takes no window (a dense mask turns its fast kernels off); the cuDNN
frontend's torch ops expose the band: `window_left=W` with `is_causal` is exactly braid's
window (each query sees itself and the W-1 keys before it), and its varlen (THD) form with
cu_seqlens is braid's packed documents. GQA is native (H % J == 0). Only float16/bfloat16,
head dims up to 256 and a multiple of 8, more than one token (the dispatcher checks), on Hopper
and newer (validated there; braid.kernels.backend.KNOWN_BROKEN). Plans are built once per
shape and stride (first call) and cached by the frontend; the ops have fake kernels, so
torch.compile traces them as opaque calls, and they run inside CUDA graphs.

Legend: B batch, T time, H query heads, J key/value heads, D head dim, N = B*T tokens.
"""

from __future__ import annotations

import cudnn.sdpa.fwd.torch_op  # noqa: F401  (registers torch.ops.cudnn.sdpa_fwd / sdpa_bwd)
import torch
from torch import Tensor

from braid.kernels.attention.reference import attention_sdpa
from braid.kernels.varlen import segments


def attention_cudnn(
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
    scale = D**-0.5 if scale is None else scale
    band = -1 if window is None else window  # cuDNN's left bound: visible keys, the query's own included
    if doc_ids_BT is None:
        # BHSD views of the BTHD tensors (no copy: cuDNN reads the strides); o comes back in q's layout.
        o_BHTD, _ = torch.ops.cudnn.sdpa_fwd(
            q_BTHD.transpose(1, 2), k_BTJD.transpose(1, 2), v_BTJD.transpose(1, 2), scale,
            is_causal=True, window_left=band, return_lse=True,  # the backward needs the statistics
        )
        return o_BHTD.transpose(1, 2)
    seg = segments(doc_ids_BT)
    if seg.max_seqlen == 1:  # one-token documents only: cuDNN has no backward for them
        return attention_sdpa(q_BTHD, k_BTJD, v_BTJD, window=window, doc_ids_BT=doc_ids_BT, scale=scale)
    cu_seqlens = seg.cu_seqlens_int32
    o_NHD, _ = torch.ops.cudnn.sdpa_fwd(
        q_BTHD.reshape(B * T, H, D), k_BTJD.reshape(B * T, -1, D), v_BTJD.reshape(B * T, -1, v_BTJD.shape[-1]),
        scale, is_causal=True, window_left=band, cu_seqlens_q=cu_seqlens, cu_seqlens_kv=cu_seqlens,
        max_seqlen_q=seg.max_seqlen, max_seqlen_kv=seg.max_seqlen, return_lse=True,
    )
    return o_NHD.view(B, T, H, -1)
