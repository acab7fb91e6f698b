"""Pure-PyTorch causal attention: the explicit-softmax oracle and the CPU path.

Legend: B batch, T queries, S keys, H query heads, J key/value heads (GQA, H % J == 0),
G = H // J query heads per key/value head, D head dim.

Both functions take already-validated inputs (see braid.kernels.attention.attention) and
compute in float32, or float64 when the inputs are float64, returning the input dtype.
Query head h reads key/value head h // G, as HF Llama's repeat_kv and SDPA's enable_gqa do.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def attention_mask(
    num_queries: int,
    num_keys: int,
    *,
    window: int | None = None,
    doc_ids_BT: Tensor | None = None,
    q_pos_BT: Tensor | None = None,
    k_pos_BS: Tensor | None = None,
    k_doc_BS: Tensor | None = None,
    device: torch.device | str | None = None,
) -> Tensor:
    """mask_BTS (bool, True = visible; B is 1 when nothing depends on the batch row).

    Without positions, query t sits at position t and key s at position s (S == T).
    A key at position r is visible from a query at position p iff 0 <= r <= p,
    p - r < window (when set) and both belong to the same document (when doc ids are set).
    """
    if q_pos_BT is None:
        q_pos_BT = torch.arange(num_queries, device=device)[None]
        k_pos_BS = torch.arange(num_keys, device=device)[None]
    q_pos_BT1 = q_pos_BT[:, :, None]
    k_pos_B1S = k_pos_BS[:, None, :]
    mask_BTS = (k_pos_B1S <= q_pos_BT1) & (k_pos_B1S >= 0)
    if window is not None:
        mask_BTS = mask_BTS & (q_pos_BT1 - k_pos_B1S < window)
    if doc_ids_BT is not None:
        k_doc_BS = doc_ids_BT if k_doc_BS is None else k_doc_BS
        mask_BTS = mask_BTS & (doc_ids_BT[:, :, None] == k_doc_BS[:, None, :])
    return mask_BTS


def attention_reference(
    q_BTHD: Tensor,
    k_BSJD: Tensor,
    v_BSJD: Tensor,
    *,
    window: int | None = None,
    doc_ids_BT: Tensor | None = None,
    q_pos_BT: Tensor | None = None,
    k_pos_BS: Tensor | None = None,
    k_doc_BS: Tensor | None = None,
    scale: float | None = None,
) -> Tensor:
    """The oracle: explicit boolean mask, scores and softmax. o_BTHD."""
    B, T, H, D = q_BTHD.shape
    S, J = k_BSJD.shape[1], k_BSJD.shape[2]
    G = H // J
    dtype = _compute_dtype(q_BTHD.dtype)
    scale = D**-0.5 if scale is None else scale
    mask_BTS = attention_mask(
        T, S, window=window, doc_ids_BT=doc_ids_BT, q_pos_BT=q_pos_BT,
        k_pos_BS=k_pos_BS, k_doc_BS=k_doc_BS, device=q_BTHD.device,
    )
    q_BJGTD = q_BTHD.to(dtype).reshape(B, T, J, G, D).permute(0, 2, 3, 1, 4)
    k_BJ1SD = k_BSJD.to(dtype).permute(0, 2, 1, 3)[:, :, None]
    v_BJ1SD = v_BSJD.to(dtype).permute(0, 2, 1, 3)[:, :, None]
    scores_BJGTS = (q_BJGTD @ k_BJ1SD.transpose(-1, -2)) * scale
    scores_BJGTS = scores_BJGTS.masked_fill(~mask_BTS[:, None, None], float("-inf"))
    o_BJGTD = scores_BJGTS.softmax(dim=-1) @ v_BJ1SD
    return o_BJGTD.permute(0, 3, 1, 2, 4).reshape(B, T, H, -1).to(q_BTHD.dtype)


def attention_sdpa(
    q_BTHD: Tensor,
    k_BSJD: Tensor,
    v_BSJD: Tensor,
    *,
    window: int | None = None,
    doc_ids_BT: Tensor | None = None,
    q_pos_BT: Tensor | None = None,
    k_pos_BS: Tensor | None = None,
    k_doc_BS: Tensor | None = None,
    scale: float | None = None,
) -> Tensor:
    """The CPU path: SDPA (tiled, no T x S float scores) with is_causal or a boolean mask. o_BTHD."""
    T, H = q_BTHD.shape[1], q_BTHD.shape[2]
    S, J = k_BSJD.shape[1], k_BSJD.shape[2]
    dtype = _compute_dtype(q_BTHD.dtype)
    q_BHTD, k_BJSD, v_BJSD = (x.to(dtype).transpose(1, 2) for x in (q_BTHD, k_BSJD, v_BSJD))
    window_covers_all = window is None or window >= T
    plain_causal = window_covers_all and doc_ids_BT is None and q_pos_BT is None
    mask_B1TS = None
    if not plain_causal:
        mask_B1TS = attention_mask(
            T, S, window=window, doc_ids_BT=doc_ids_BT, q_pos_BT=q_pos_BT,
            k_pos_BS=k_pos_BS, k_doc_BS=k_doc_BS, device=q_BTHD.device,
        )[:, None]
    o_BHTD = F.scaled_dot_product_attention(
        q_BHTD, k_BJSD, v_BJSD, attn_mask=mask_B1TS, is_causal=plain_causal,
        scale=scale, enable_gqa=H != J,
    )
    return o_BHTD.transpose(1, 2).to(q_BTHD.dtype)
