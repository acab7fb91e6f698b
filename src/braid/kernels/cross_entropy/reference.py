"""Pure-PyTorch linear + cross-entropy, chunked over tokens (the CPU path and the oracle).

Each chunk's loss runs under activation checkpointing, so the backward recomputes one
chunk's logits at a time: memory stays at one chunk of logits (about CHUNK_ELEMENTS
floats) instead of N x V.

Legend: N tokens, D hidden dim, V vocabulary, n tokens of one chunk.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

CHUNK_ELEMENTS = 1 << 24  # logits held at once: 64 MiB in float32


def _chunk_loss_sum(hidden_nD: torch.Tensor, weight_VD: torch.Tensor, labels_n: torch.Tensor, ignore_index: int):
    dtype = torch.promote_types(hidden_nD.dtype, torch.float32)
    with torch.autocast(hidden_nD.device.type, enabled=False):
        logits_nV = hidden_nD.to(dtype) @ weight_VD.to(dtype).T
        return F.cross_entropy(logits_nV, labels_n, ignore_index=ignore_index, reduction="sum")


def linear_cross_entropy_reference(
    hidden_ND: torch.Tensor,
    weight_VD: torch.Tensor,
    labels_N: torch.Tensor,
    ignore_index: int = -100,
    reduction: str = "mean",
) -> torch.Tensor:
    """`braid.kernels.cross_entropy.linear_cross_entropy` in float32 (float64 for float64)."""
    num_tokens, vocab = hidden_ND.shape[0], weight_VD.shape[0]
    rows = max(1, CHUNK_ELEMENTS // vocab)
    dtype = torch.promote_types(hidden_ND.dtype, torch.float32)
    total = hidden_ND.new_zeros((), dtype=dtype)
    needs_grad = torch.is_grad_enabled() and (hidden_ND.requires_grad or weight_VD.requires_grad)
    for start in range(0, num_tokens, rows):
        chunk = (hidden_ND[start : start + rows], weight_VD, labels_N[start : start + rows], ignore_index)
        if needs_grad:
            total = total + checkpoint(_chunk_loss_sum, *chunk, use_reentrant=False)
        else:
            total = total + _chunk_loss_sum(*chunk)
    if reduction == "sum":
        return total
    return total / (labels_N != ignore_index).sum().to(dtype)
