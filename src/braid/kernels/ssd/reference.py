"""Pure-PyTorch SSD (Mamba-2) references: the chunked matmul form of the SSD paper (the CPU
path) and the sequential recurrence (the test oracle), plus the single-token step.

Recurrence, per head h (head h reads group h // (H // G) of B and C):
    state_t = exp(dt_t * A) * state_{t-1} + dt_t * x_t B_t^T        (P x N)
    y_t     = state_t C_t + D * x_t

Shape legend: B batch, T time, H heads, P head dim, G groups of B/C, N state dim,
K chunks, L position inside a chunk (the output side), S position inside a chunk (the input side).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


def compute_dtype(x: Tensor) -> torch.dtype:
    """float64 for float64 inputs, float32 for everything else."""
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _heads_from_groups(t_xGN: Tensor, num_heads: int) -> Tensor:
    """Repeat each group (dim -2) for the heads that share it: (..., G, N) -> (..., H, N)."""
    return t_xGN.repeat_interleave(num_heads // t_xGN.shape[-2], dim=-2)


def _pad_time(t_BTx: Tensor, pad: int) -> Tensor:
    """Zero-pad dim 1 at the end by `pad` steps."""
    if pad == 0:
        return t_BTx
    return torch.cat([t_BTx, t_BTx.new_zeros(t_BTx.shape[0], pad, *t_BTx.shape[2:])], dim=1)


def _segsum_exp(a_BHKL: Tensor) -> Tensor:
    """decay_BHKLS[..., l, s] = exp(a_{s+1} + ... + a_l) for l >= s, else 0.

    Each entry is a masked cumulative sum of the summands themselves, never a difference of
    two long cumulative sums, so short segments keep full precision.
    """
    L = a_BHKL.shape[-1]
    ones_LS = torch.ones(L, L, dtype=torch.bool, device=a_BHKL.device)
    summands_BHKLS = torch.where(ones_LS.tril(-1), a_BHKL[..., :, None], 0.0)
    return summands_BHKLS.cumsum(dim=-2).exp() * ones_LS.tril(0)


@dataclass
class _DocMasks:
    """Multiplicative same-document masks for one padded, chunked batch of doc ids."""

    same_doc_BKLS: Tensor  # token l and token s of a chunk share a document
    in_last_doc_BKL: Tensor  # token shares the document of its chunk's last token
    in_first_doc_BKL: Tensor  # token shares the document of its chunk's first token
    continues_BK: Tensor  # chunk's first token continues the previous chunk's last document

    @classmethod
    def build(cls, doc_BKL: Tensor, dtype: torch.dtype) -> _DocMasks:
        first_BK = doc_BKL[:, :, 0]
        # The first chunk "continues" its own first document: that is where initial_state applies.
        prev_last_BK = torch.cat([first_BK[:, :1], doc_BKL[:, :-1, -1]], dim=1)
        return cls(
            same_doc_BKLS=(doc_BKL[..., :, None] == doc_BKL[..., None, :]).to(dtype),
            in_last_doc_BKL=(doc_BKL == doc_BKL[..., -1:]).to(dtype),
            in_first_doc_BKL=(doc_BKL == first_BK[..., None]).to(dtype),
            continues_BK=(first_BK == prev_last_BK).to(dtype),
        )


def _pass_states(
    chunk_states_BKHPN: Tensor,
    chunk_log_decay_BHK: Tensor,
    initial_state_BHPN: Tensor,
    masks: _DocMasks | None,
) -> tuple[Tensor, Tensor]:
    """Carry the state across chunks. Returns the state entering each chunk and the final state."""
    state_BHPN = initial_state_BHPN
    entering = []
    for k in range(chunk_states_BKHPN.shape[1]):
        decay_BH = chunk_log_decay_BHK[:, :, k].exp()
        if masks is not None:
            state_BHPN = state_BHPN * masks.continues_BK[:, k, None, None, None]
            # The carried state reaches the chunk's end only if no document starts inside it.
            decay_BH = decay_BH * masks.in_first_doc_BKL[:, k, -1, None]
        entering.append(state_BHPN)
        state_BHPN = state_BHPN * decay_BH[..., None, None] + chunk_states_BKHPN[:, k]
    return torch.stack(entering, dim=1), state_BHPN


def ssd_chunked(
    x_BTHP: Tensor,
    dt_BTH: Tensor,
    A_H: Tensor,
    B_BTGN: Tensor,
    C_BTGN: Tensor,
    *,
    chunk_size: int = 64,
    D_H: Tensor | None = None,
    doc_ids_BT: Tensor | None = None,
    initial_state_BHPN: Tensor | None = None,
    return_final_state: bool = False,
) -> Tensor | tuple[Tensor, Tensor]:
    """Chunked SSD: quadratic attention-like form inside chunks, a linear scan across them.

    Inputs are not validated here (see braid.kernels.ssd.ssd). T is padded internally to a
    multiple of the chunk length with dt = 0 (no decay, no input), which leaves the state intact.
    """
    dtype = compute_dtype(x_BTHP)
    batch, T, H, P = x_BTHP.shape
    N = B_BTGN.shape[-1]
    L = min(chunk_size, T)
    K = -(-T // L)

    def chunked(t_BTx: Tensor) -> Tensor:
        return _pad_time(t_BTx.to(dtype), K * L - T).unflatten(1, (K, L))

    x_BKLHP = chunked(x_BTHP)
    dt_BKLH = chunked(dt_BTH)
    B_BKLHN = chunked(_heads_from_groups(B_BTGN, H))
    C_BKLHN = chunked(_heads_from_groups(C_BTGN, H))
    xdt_BKLHP = x_BKLHP * dt_BKLH[..., None]
    a_BHKL = (dt_BKLH * A_H.to(dtype)).permute(0, 3, 1, 2)
    a_cum_BHKL = a_BHKL.cumsum(dim=-1)
    masks = None
    if doc_ids_BT is not None:
        doc_BT = torch.cat([doc_ids_BT, doc_ids_BT[:, -1:].expand(batch, K * L - T)], dim=1)
        masks = _DocMasks.build(doc_BT.view(batch, K, L), dtype)

    decay_BHKLS = _segsum_exp(a_BHKL)
    to_end_BHKS = (a_cum_BHKL[..., -1:] - a_cum_BHKL).exp()
    from_start_BHKL = a_cum_BHKL.exp()
    if masks is not None:
        decay_BHKLS = decay_BHKLS * masks.same_doc_BKLS[:, None]
        to_end_BHKS = to_end_BHKS * masks.in_last_doc_BKL[:, None]
        from_start_BHKL = from_start_BHKL * masks.in_first_doc_BKL[:, None]

    scores_BHKLS = torch.einsum("bklhn,bkshn->bhkls", C_BKLHN, B_BKLHN) * decay_BHKLS
    y_BKLHP = torch.einsum("bhkls,bkshp->bklhp", scores_BHKLS, xdt_BKLHP)

    chunk_states_BKHPN = torch.einsum("bkshn,bhks,bkshp->bkhpn", B_BKLHN, to_end_BHKS, xdt_BKLHP)
    if initial_state_BHPN is None:
        initial_state_BHPN = x_BKLHP.new_zeros(batch, H, P, N)
    entering_BKHPN, final_BHPN = _pass_states(
        chunk_states_BKHPN, a_cum_BHKL[..., -1], initial_state_BHPN.to(dtype), masks
    )
    y_BKLHP = y_BKLHP + torch.einsum("bklhn,bkhpn,bhkl->bklhp", C_BKLHN, entering_BKHPN, from_start_BHKL)

    if D_H is not None:
        y_BKLHP = y_BKLHP + x_BKLHP * D_H.to(dtype)[:, None]
    y_BTHP = y_BKLHP.flatten(1, 2)[:, :T].to(x_BTHP.dtype)
    return (y_BTHP, final_BHPN) if return_final_state else y_BTHP


def ssd_step_reference(
    x_BHP: Tensor,
    dt_BH: Tensor,
    A_H: Tensor,
    B_BGN: Tensor,
    C_BGN: Tensor,
    state_BHPN: Tensor,
    D_H: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """One recurrence step. Returns y_BHP (dtype of x) and the new state (float32/float64)."""
    dtype = compute_dtype(x_BHP)
    H = x_BHP.shape[1]
    x_BHP32 = x_BHP.to(dtype)
    dt_BH32 = dt_BH.to(dtype)
    B_BHN = _heads_from_groups(B_BGN.to(dtype), H)
    C_BHN = _heads_from_groups(C_BGN.to(dtype), H)
    decay_BH = (dt_BH32 * A_H.to(dtype)).exp()
    update_BHPN = (dt_BH32[..., None] * x_BHP32)[..., None] * B_BHN[:, :, None, :]
    new_state_BHPN = state_BHPN.to(dtype) * decay_BH[..., None, None] + update_BHPN
    y_BHP = torch.einsum("bhpn,bhn->bhp", new_state_BHPN, C_BHN)
    if D_H is not None:
        y_BHP = y_BHP + x_BHP32 * D_H.to(dtype)[:, None]
    return y_BHP.to(x_BHP.dtype), new_state_BHPN


def ssd_naive(
    x_BTHP: Tensor,
    dt_BTH: Tensor,
    A_H: Tensor,
    B_BTGN: Tensor,
    C_BTGN: Tensor,
    *,
    chunk_size: int = 64,
    D_H: Tensor | None = None,
    doc_ids_BT: Tensor | None = None,
    initial_state_BHPN: Tensor | None = None,
    return_final_state: bool = False,
) -> Tensor | tuple[Tensor, Tensor]:
    """The recurrence one token at a time (tests only). `chunk_size` is accepted and unused."""
    batch, T, H, P = x_BTHP.shape
    state_BHPN = initial_state_BHPN
    if state_BHPN is None:
        state_BHPN = x_BTHP.new_zeros(batch, H, P, B_BTGN.shape[-1], dtype=compute_dtype(x_BTHP))
    ys = []
    for t in range(T):
        if doc_ids_BT is not None and t > 0:
            same_doc_B = doc_ids_BT[:, t] == doc_ids_BT[:, t - 1]
            state_BHPN = state_BHPN * same_doc_B[:, None, None, None]
        y_BHP, state_BHPN = ssd_step_reference(
            x_BTHP[:, t], dt_BTH[:, t], A_H, B_BTGN[:, t], C_BTGN[:, t], state_BHPN, D_H
        )
        ys.append(y_BHP)
    y_BTHP = torch.stack(ys, dim=1)
    return (y_BTHP, state_BHPN.to(compute_dtype(x_BTHP))) if return_final_state else y_BTHP
