"""Causal softmax attention: full or sliding window, GQA, document masks, KV-cache positions.

Legend: B batch, T queries, S keys, H query heads, J key/value heads (H % J == 0), D head dim.

`attention` validates its inputs and picks a backend (braid.kernels.backend). On CUDA: SDPA
in the inputs' dtype with is_causal (cuDNN) for full causal attention; for sliding windows
flash-attn (when it imports), cuDNN's banded kernels (nvidia-cudnn-frontend, when it imports),
FlexAttention block masks, then torch's built-in FlashAttention-2 (varlen, window); packed
documents try FlexAttention before cuDNN (DOCUMENT_ORDER, measured). The KV-cache path
(positions) and the CPU run `attention_sdpa`: SDPA in float32 with is_causal or an explicit
boolean mask. `attention_reference` (explicit softmax) is the oracle every backend is held to.
"""

from __future__ import annotations

import torch
from torch import Tensor

from braid.kernels.attention.reference import attention_mask, attention_reference, attention_sdpa
from braid.kernels.backend import backend_module, pick

__all__ = ["attention", "attention_mask", "attention_reference"]


def attention(
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
    """Causal softmax attention with GQA (J kv heads, H % J == 0). Returns o_BTHD.

    q_BTHD: (B, T, H, D); k_BSJD: (B, S, J, D); v_BSJD: (B, S, J, Dv), o has head dim Dv.
    Without positions: S == T and query t sees keys s <= t. With positions (the KV-cache
    path; q_pos_BT and k_pos_BS, integer): a query at absolute position p sees a key at
    position r iff r <= p, r >= 0 (negative = empty cache slot), and p - r < window when
    window is set. window=W: each query sees at most W keys (itself and the W-1 before it).
    doc_ids_BT (integer, same value = same document): only keys of the query's document are
    seen; keys take doc ids from k_doc_BS on the positions path, else from doc_ids_BT.
    scale defaults to D ** -0.5. Every query must see at least one key (true for valid
    inputs: a query always sees itself).
    """
    _check_qkv(q_BTHD, k_BSJD, v_BSJD)
    _check_mask_args(q_BTHD, k_BSJD, window, doc_ids_BT, q_pos_BT, k_pos_BS, k_doc_BS)
    if q_pos_BT is None:
        window = None if window is not None and window >= q_BTHD.shape[1] else window
        unsupported = _unsupported_backends(q_BTHD, v_BSJD, window, doc_ids_BT)
        order = DOCUMENT_ORDER if doc_ids_BT is not None else None
        backend = pick("attention", q_BTHD, k_BSJD, v_BSJD, unsupported=unsupported, order=order)
        if backend == "sdpa":
            return backend_module("attention", "sdpa").causal_sdpa(q_BTHD, k_BSJD, v_BSJD, scale=scale)
        if backend in BANDED_FUNCTIONS:
            banded = getattr(backend_module("attention", backend), BANDED_FUNCTIONS[backend])
            return banded(q_BTHD, k_BSJD, v_BSJD, window=window, doc_ids_BT=doc_ids_BT, scale=scale)
    return attention_sdpa(
        q_BTHD, k_BSJD, v_BSJD, window=window, doc_ids_BT=doc_ids_BT,
        q_pos_BT=q_pos_BT, k_pos_BS=k_pos_BS, k_doc_BS=k_doc_BS, scale=scale,
    )


# The backends for windows and documents, each one function of the same signature:
# (q_BTHD, k_BTJD, v_BTJD, *, window, doc_ids_BT, scale) -> o_BTHD.
BANDED_FUNCTIONS = {
    "flash_attn": "attention_flash",
    "cudnn": "attention_cudnn",
    "flex": "attention_flex",
    "torch_flash": "attention_torch_flash",
}

# With packed documents cuDNN's varlen path is slower than FlexAttention's block masks (window
# 1024, documents of ~1024 tokens, B2 T8192 H16 J4 D64, fwd+bwd on an H200, 2026-11-28: cuDNN 1.63
# and 1.92 ms, flex 1.11, torch flash 1.18 and 1.50; without documents cuDNN 1.01 and 0.88, flex
# 1.01): calls with documents try flex first.
DOCUMENT_ORDER = ("flash_attn", "flex", "cudnn", "torch_flash")

# Below one 128-token block, inductor finds no FlexAttention kernel for document masks
# (NoValidChoicesError; torch 2.11, H200, seen 2026-11-28): such short calls take the next backend.
FLEX_MIN_LEN = 128


def _unsupported_backends(q_BTHD: Tensor, v_BSJD: Tensor, window: int | None, doc_ids_BT: Tensor | None) -> list[str]:
    """Fast backends that cannot run this call (positions are never sent to them)."""
    unsupported = []
    if window is not None or doc_ids_BT is not None:
        unsupported.append("sdpa")
    if q_BTHD.shape[1] < FLEX_MIN_LEN:
        unsupported.append("flex")
    head_dim = q_BTHD.shape[-1]
    if q_BTHD.dtype not in (torch.float16, torch.bfloat16) or v_BSJD.shape[-1] != head_dim or head_dim > 256:
        unsupported += ["flash_attn", "cudnn", "torch_flash"]
    elif q_BTHD.shape[1] == 1 or head_dim % 8:
        unsupported.append("cudnn")  # cuDNN has no backward for one query and one key
    return unsupported


def _check_qkv(q_BTHD: Tensor, k_BSJD: Tensor, v_BSJD: Tensor) -> None:
    if q_BTHD.ndim != 4 or k_BSJD.ndim != 4 or v_BSJD.ndim != 4:
        raise ValueError(
            f"attention: q, k, v must be 4-d (batch, time, heads, head_dim); got shapes "
            f"{tuple(q_BTHD.shape)}, {tuple(k_BSJD.shape)}, {tuple(v_BSJD.shape)}"
        )
    if k_BSJD.shape[:3] != v_BSJD.shape[:3]:
        raise ValueError(f"attention: k {tuple(k_BSJD.shape)} and v {tuple(v_BSJD.shape)} differ in (B, S, J)")
    if q_BTHD.shape[0] != k_BSJD.shape[0] or q_BTHD.shape[3] != k_BSJD.shape[3]:
        raise ValueError(
            f"attention: q {tuple(q_BTHD.shape)} and k {tuple(k_BSJD.shape)} must agree in batch and head_dim"
        )
    H, J = q_BTHD.shape[2], k_BSJD.shape[2]
    if H % J:
        raise ValueError(f"attention: {J} key/value heads do not divide {H} query heads (GQA needs H % J == 0)")
    if not (q_BTHD.dtype == k_BSJD.dtype == v_BSJD.dtype) or not q_BTHD.is_floating_point():
        raise ValueError(
            f"attention: q, k, v need one floating dtype; got {q_BTHD.dtype}, {k_BSJD.dtype}, {v_BSJD.dtype}"
        )


def _check_mask_args(q_BTHD, k_BSJD, window, doc_ids_BT, q_pos_BT, k_pos_BS, k_doc_BS) -> None:
    B, T, S = q_BTHD.shape[0], q_BTHD.shape[1], k_BSJD.shape[1]
    if window is not None and (isinstance(window, bool) or not isinstance(window, int) or window < 1):
        raise ValueError(f"attention: window must be a positive int or None (full causal), got {window!r}")
    if (q_pos_BT is None) != (k_pos_BS is None):
        raise ValueError("attention: pass both q_pos_BT and k_pos_BS (the KV-cache path) or neither")
    if q_pos_BT is None and S != T:
        raise ValueError(f"attention: {S} keys for {T} queries; pass q_pos_BT and k_pos_BS when S != T")
    if k_doc_BS is not None and (doc_ids_BT is None or q_pos_BT is None):
        raise ValueError("attention: k_doc_BS is only meaningful with doc_ids_BT on the positions path")
    if q_pos_BT is not None and doc_ids_BT is not None and k_doc_BS is None:
        raise ValueError("attention: with positions and doc_ids_BT, also pass k_doc_BS (each key's document)")
    for name, ids, length in (
        ("doc_ids_BT", doc_ids_BT, T), ("q_pos_BT", q_pos_BT, T), ("k_pos_BS", k_pos_BS, S), ("k_doc_BS", k_doc_BS, S)
    ):
        _check_index_tensor(name, ids, B, length)


def _check_index_tensor(name: str, ids: Tensor | None, batch: int, length: int) -> None:
    if ids is None:
        return
    if ids.shape != (batch, length):
        raise ValueError(f"attention: {name} has shape {tuple(ids.shape)}, expected ({batch}, {length})")
    if ids.dtype.is_floating_point or ids.dtype == torch.bool:
        raise ValueError(f"attention: {name} must be an integer tensor, got {ids.dtype}")
