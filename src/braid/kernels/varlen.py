"""Packed documents as variable-length sequences: doc ids -> cu_seqlens (FlashAttention's format).

A batch of B rows of T tokens is flattened into one row of B*T tokens cut into segments:
a segment starts at every row start and wherever the doc id changes, so rows are
boundaries too. Kernels that take cu_seqlens (fla, flash-attn) then never let a state,
a conv tap or attention cross a segment boundary.

Legend: B batch, T time, S segments.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass(frozen=True)
class Segments:
    """The segments of a (B, T) batch of doc ids, flattened to B*T tokens."""

    cu_seqlens: Tensor  # (S+1,) int64 on the doc ids' device: segment s is [cu[s], cu[s+1])
    cu_seqlens_cpu: Tensor  # the same on the CPU (kernels plan their grids from it without a sync)
    first_B: Tensor  # (B,) int64: index of each row's first segment (where an initial state applies)
    last_B: Tensor  # (B,) int64: index of each row's last segment (whose final state is returned)
    max_seqlen: int

    @property
    def num_segments(self) -> int:
        return self.cu_seqlens_cpu.numel() - 1

    @property
    def cu_seqlens_int32(self) -> Tensor:
        return self.cu_seqlens.to(torch.int32)


def starts_BT(doc_ids_BT: Tensor) -> Tensor:
    """True where a segment starts: t = 0 and wherever the doc id differs from the token before."""
    starts = torch.ones_like(doc_ids_BT, dtype=torch.bool)
    starts[:, 1:] = doc_ids_BT[:, 1:] != doc_ids_BT[:, :-1]
    return starts


def segment_index_BT(doc_ids_BT: Tensor) -> Tensor:
    """Each token's segment number within its row, from 0 (int32; mamba_ssm's seq_idx)."""
    return (starts_BT(doc_ids_BT).cumsum(dim=1) - 1).to(torch.int32)


def segments_from_doc_ids(doc_ids_BT: Tensor) -> Segments:
    """Segments of doc_ids_BT (B, T), integer, one contiguous run per document. One host sync."""
    if doc_ids_BT.ndim != 2 or doc_ids_BT.is_floating_point() or doc_ids_BT.dtype == torch.bool:
        raise ValueError(
            f"doc ids must be an integer (B, T) tensor, got {doc_ids_BT.dtype} of shape {tuple(doc_ids_BT.shape)}"
        )
    B, T = doc_ids_BT.shape
    starts_cpu = starts_BT(doc_ids_BT).flatten().nonzero().flatten().cpu()
    cu_cpu = torch.cat([starts_cpu, torch.tensor([B * T])])
    first_B = (starts_cpu % T == 0).nonzero().flatten()
    last_B = torch.cat([first_B[1:] - 1, torch.tensor([starts_cpu.numel() - 1])])
    device = doc_ids_BT.device
    return Segments(
        cu_seqlens=cu_cpu.to(device, non_blocking=True),
        cu_seqlens_cpu=cu_cpu,
        first_B=first_B.to(device, non_blocking=True),
        last_B=last_B.to(device, non_blocking=True),
        max_seqlen=int(cu_cpu.diff().max()),
    )


class _LastSegments:
    """One-entry cache: every layer of a forward pass passes the same doc ids tensor."""

    def __init__(self):
        self.ref = None
        self.version = -1
        self.value: Segments | None = None

    def get(self, doc_ids_BT: Tensor) -> Segments:
        if self.ref is None or self.ref() is not doc_ids_BT or self.version != doc_ids_BT._version:
            self.value = segments_from_doc_ids(doc_ids_BT)
            self.ref = weakref.ref(doc_ids_BT)
            self.version = doc_ids_BT._version
        return self.value


_cache = _LastSegments()


@torch.compiler.disable
def segments(doc_ids_BT: Tensor) -> Segments:
    """`segments_from_doc_ids`, computed once per doc ids tensor (and in-place version)."""
    return _cache.get(doc_ids_BT)


def per_segment_states(state_Bx: Tensor | None, seg: Segments) -> Tensor | None:
    """Row initial states (B, ...) placed at the rows' first segments, zeros elsewhere: (S, ...)."""
    if state_Bx is None:
        return None
    zeros_Sx = state_Bx.new_zeros(seg.num_segments, *state_Bx.shape[1:])
    return zeros_Sx.index_copy(0, seg.first_B, state_Bx)


def run_packed(
    kernel,
    tensors_BTx: tuple[Tensor, ...],
    *,
    doc_ids_BT: Tensor | None,
    initial_state_Bx: Tensor | None,
    return_final_state: bool,
    **kwargs,
) -> tuple[Tensor, Tensor | None]:
    """Call a kernel with fla's varlen convention on a (B, T, ...) batch with doc ids.

    The kernel takes tensors (B, T, ...) and keywords initial_state (one per sequence),
    output_final_state, cu_seqlens and cu_seqlens_cpu, and returns (out, final_state or None).
    With doc ids the batch is flattened to one row of segments; the rows' initial states go
    to their first segments and each row's final state is read from its last one.
    Returns out (B, T, ...) and the final states (B, ...) or None.
    """
    if doc_ids_BT is None:
        return kernel(*tensors_BTx, initial_state=initial_state_Bx, output_final_state=return_final_state, **kwargs)
    seg = segments(doc_ids_BT)
    B, T = doc_ids_BT.shape
    out_1Nx, final_Sx = kernel(
        *(t.reshape(1, B * T, *t.shape[2:]) for t in tensors_BTx),
        initial_state=per_segment_states(initial_state_Bx, seg),
        output_final_state=return_final_state,
        cu_seqlens=seg.cu_seqlens,
        cu_seqlens_cpu=seg.cu_seqlens_cpu,
        **kwargs,
    )
    final_Bx = final_Sx[seg.last_B] if return_final_state else None
    return out_1Nx.view(B, T, *out_1Nx.shape[2:]), final_Bx
