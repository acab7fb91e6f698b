"""Where a program's chunk lies, for braid's GLA Triton kernels (intra_triton, scan_triton, dv_triton):
rows of T steps, or fla's varlen layout (documents packed in one row; chunk_indices holds a
(sequence, chunk) pair per chunk and cu_seqlens each sequence's first row)."""

from __future__ import annotations

import triton
import triton.language as tl
from torch import Tensor


def chunk_count(T: int, chunk_size: int, cu_seqlens: Tensor | None, chunk_indices: Tensor | None, caller: str) -> int:
    """The chunks each row holds (rows), or all of them (packed: chunk_indices' length); packed
    calls need chunk_indices (fla's prepare_chunk_indices)."""
    if cu_seqlens is None:
        return triton.cdiv(T, chunk_size)
    if chunk_indices is None:
        raise ValueError(f"{caller}: cu_seqlens needs chunk_indices (fla's prepare_chunk_indices)")
    return chunk_indices.shape[0]


@triton.jit
def chunk_in_sequence(cu_seqlens, chunk_indices, i_t, i_b, T, IS_VARLEN: tl.constexpr):
    """(the chunk's index in its sequence, the sequence's first row, its length) for program
    chunk i_t of row i_b."""
    if IS_VARLEN:
        i_n = tl.load(chunk_indices + i_t * 2).to(tl.int32)
        i_t = tl.load(chunk_indices + i_t * 2 + 1).to(tl.int32)
        bos = tl.load(cu_seqlens + i_n).to(tl.int64)
        eos = tl.load(cu_seqlens + i_n + 1).to(tl.int64)
    else:
        bos = i_b.to(tl.int64) * T
        eos = bos + T
    return i_t, bos, (eos - bos).to(tl.int32)


@triton.jit
def chunk_slot(i_c, i_b, T, BT: tl.constexpr, IS_VARLEN: tl.constexpr):
    """Program chunk i_c of row i_b's place among per-chunk tensors (the states and their
    gradients), int64: its index in the packed chunk list, or row i_b's chunks in order."""
    slot = i_c.to(tl.int64)
    if not IS_VARLEN:
        slot += i_b.to(tl.int64) * tl.cdiv(T, BT)
    return slot
