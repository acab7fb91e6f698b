"""Pure-PyTorch gated linear attention: the chunked form (the CPU path), the sequential
recurrence (the test oracle) and the single decode step.

    S_t = diag(exp(g_t)) S_{t-1} + k_t^T v_t        o_t = (scale * q_t) S_t

Legend: B batch, T time, H heads, K key head dim, V value head dim, N chunks, C chunk
length (query position), J chunk length (key position).

Inputs are not validated here; `braid.kernels.gla.gla` does that.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def compute_dtype(*tensors: Tensor | None) -> torch.dtype:
    """float64 if any input is float64, else float32."""
    if any(t is not None and t.dtype == torch.float64 for t in tensors):
        return torch.float64
    return torch.float32


def _same_doc_as_previous_BT(doc_ids_BT: Tensor | None, B: int, T: int, device) -> Tensor:
    """True where token t continues the document of token t-1 (t=0 continues the initial state)."""
    if doc_ids_BT is None:
        return torch.ones(B, T, dtype=torch.bool, device=device)
    first_B1 = torch.ones_like(doc_ids_BT[:, :1], dtype=torch.bool)
    return torch.cat([first_B1, doc_ids_BT[:, 1:] == doc_ids_BT[:, :-1]], dim=1)


def gla_naive(
    q_BTHK: Tensor,
    k_BTHK: Tensor,
    v_BTHV: Tensor,
    g_BTHK: Tensor,
    *,
    scale: float | None = None,
    doc_ids_BT: Tensor | None = None,
    initial_state_BHKV: Tensor | None = None,
    return_final_state: bool = False,
):
    """The recurrence one token at a time; the state restarts at zero at each new document."""
    B, T, H, K = q_BTHK.shape
    V = v_BTHV.shape[-1]
    dtype = compute_dtype(q_BTHK, k_BTHK, v_BTHV, g_BTHK, initial_state_BHKV)
    scale = K**-0.5 if scale is None else scale
    out_dtype = v_BTHV.dtype
    q_BTHK, k_BTHK, v_BTHV, g_BTHK = (t.to(dtype) for t in (q_BTHK, k_BTHK, v_BTHV, g_BTHK))
    state_BHKV = q_BTHK.new_zeros(B, H, K, V)
    if initial_state_BHKV is not None:
        state_BHKV = initial_state_BHKV.to(dtype)
    carry_BT = _same_doc_as_previous_BT(doc_ids_BT, B, T, q_BTHK.device).to(dtype)
    outputs = []
    for t in range(T):
        state_BHKV = state_BHKV * carry_BT[:, t, None, None, None]
        o_BHV, state_BHKV = gla_step_reference(
            q_BTHK[:, t], k_BTHK[:, t], v_BTHV[:, t], g_BTHK[:, t], state_BHKV, scale
        )
        outputs.append(o_BHV)
    o_BTHV = torch.stack(outputs, dim=1).to(out_dtype)
    return (o_BTHV, state_BHKV) if return_final_state else o_BTHV


def gla_step_reference(
    q_BHK: Tensor, k_BHK: Tensor, v_BHV: Tensor, g_BHK: Tensor, state_BHKV: Tensor, scale: float | None = None
) -> tuple[Tensor, Tensor]:
    """One token: returns o_BHV (dtype of v) and the new state (float32, or float64)."""
    dtype = compute_dtype(q_BHK, k_BHK, v_BHV, g_BHK, state_BHKV)
    scale = q_BHK.shape[-1] ** -0.5 if scale is None else scale
    out_dtype = v_BHV.dtype
    q_BHK, k_BHK, v_BHV, g_BHK, state_BHKV = (t.to(dtype) for t in (q_BHK, k_BHK, v_BHV, g_BHK, state_BHKV))
    new_state_BHKV = g_BHK.exp()[..., None] * state_BHKV + k_BHK[..., None] * v_BHV[..., None, :]
    o_BHV = torch.einsum("bhk,bhkv->bhv", q_BHK * scale, new_state_BHKV)
    return o_BHV.to(out_dtype), new_state_BHKV


def _to_chunks(x_BTHD: Tensor, num_chunks: int, chunk_size: int) -> Tensor:
    """(B, T, H, D) zero-padded to N*C tokens -> (B, H, N, C, D)."""
    pad = num_chunks * chunk_size - x_BTHD.shape[1]
    x_BTHD = F.pad(x_BTHD, (0, 0, 0, 0, 0, pad))
    return x_BTHD.unflatten(1, (num_chunks, chunk_size)).permute(0, 3, 1, 2, 4)


def _doc_masks(doc_ids_BT: Tensor | None, B: int, N: int, C: int, device):
    """Same-document masks (float 0/1) for the chunked form.

    same_BNCJ: query i and key j are in one document.
    carry_in_BNC: token i is in the document of the state entering its chunk (the token
        before the chunk; for the first chunk, the row's first document).
    to_last_BNJ: key j is in the document of its chunk's last token.
    carry_out_BN: the state entering the chunk survives to the chunk's end.
    """
    if doc_ids_BT is None:
        ones = torch.ones(B, N, C, device=device)
        return ones[..., None].expand(B, N, C, C), ones, ones, ones[..., 0]
    T = doc_ids_BT.shape[1]
    doc_BT = torch.cat([doc_ids_BT, doc_ids_BT[:, -1:].expand(B, N * C - T)], dim=1)
    doc_BNC = doc_BT.view(B, N, C)
    prev_BN = torch.cat([doc_BT[:, :1], doc_BNC[:, :-1, -1]], dim=1)
    last_BN = doc_BNC[:, :, -1]
    same_BNCJ = doc_BNC[..., :, None] == doc_BNC[..., None, :]
    carry_in_BNC = doc_BNC == prev_BN[..., None]
    to_last_BNJ = doc_BNC == last_BN[..., None]
    carry_out_BN = last_BN == prev_BN
    return same_BNCJ.float(), carry_in_BNC.float(), to_last_BNJ.float(), carry_out_BN.float()


def _intra_chunk_scores(q_BHNCK: Tensor, k_BHNCK: Tensor, b_BHNCK: Tensor) -> Tensor:
    """scores[i, j] = sum_k q_ik k_jk exp(b_ik - b_jk) for j <= i, else 0.

    The decay is exponentiated as an explicit difference per key dim, set to 0 above
    the diagonal before exp so that masked entries cannot overflow (inf * 0 = nan).
    """
    C = q_BHNCK.shape[-2]
    causal_CJ = torch.ones(C, C, dtype=torch.bool, device=q_BHNCK.device).tril()
    diff_BHNCJK = b_BHNCK[..., :, None, :] - b_BHNCK[..., None, :, :]
    diff_BHNCJK = torch.where(causal_CJ[..., None], diff_BHNCJK, 0.0)
    scores_BHNCJ = torch.einsum("bhnik,bhnjk,bhnijk->bhnij", q_BHNCK, k_BHNCK, diff_BHNCJK.exp())
    return scores_BHNCJ * causal_CJ


def gla_chunked(
    q_BTHK: Tensor,
    k_BTHK: Tensor,
    v_BTHV: Tensor,
    g_BTHK: Tensor,
    *,
    scale: float | None = None,
    chunk_size: int = 64,
    doc_ids_BT: Tensor | None = None,
    initial_state_BHKV: Tensor | None = None,
    return_final_state: bool = False,
):
    """Chunked GLA: attention-like within chunks of `chunk_size`, a recurrence across them.

    Same contract as `braid.kernels.gla.gla`. The intra-chunk decay is materialised per key
    dim, so memory grows as B*H*T*chunk_size*K.
    """
    B, T, H, K = q_BTHK.shape
    V = v_BTHV.shape[-1]
    dtype = compute_dtype(q_BTHK, k_BTHK, v_BTHV, g_BTHK, initial_state_BHKV)
    scale = K**-0.5 if scale is None else scale
    N, C = -(-T // chunk_size), chunk_size
    q_BHNCK, k_BHNCK, v_BHNCV, g_BHNCK = (
        _to_chunks(t.to(dtype), N, C) for t in (q_BTHK, k_BTHK, v_BTHV, g_BTHK)
    )
    q_BHNCK = q_BHNCK * scale
    b_BHNCK = g_BHNCK.cumsum(dim=-2)
    same_BNCJ, carry_in_BNC, to_last_BNJ, carry_out_BN = (
        m.to(dtype)[:, None] for m in _doc_masks(doc_ids_BT, B, N, C, q_BHNCK.device)
    )
    scores_BHNCJ = _intra_chunk_scores(q_BHNCK, k_BHNCK, b_BHNCK) * same_BNCJ
    o_BHNCV = scores_BHNCJ @ v_BHNCV

    q_decayed_BHNCK = q_BHNCK * b_BHNCK.exp() * carry_in_BNC[..., None]
    b_last_BHNK = b_BHNCK[..., -1, :]
    k_decayed_BHNCK = k_BHNCK * (b_last_BHNK[..., None, :] - b_BHNCK).exp() * to_last_BNJ[..., None]
    state_BHKV = q_BHNCK.new_zeros(B, H, K, V)
    if initial_state_BHKV is not None:
        state_BHKV = initial_state_BHKV.to(dtype)
    inter_outputs = []
    for n in range(N):
        inter_outputs.append(q_decayed_BHNCK[:, :, n] @ state_BHKV)
        carried_BHKV = state_BHKV * b_last_BHNK[:, :, n, :, None].exp() * carry_out_BN[:, :, n, None, None]
        state_BHKV = carried_BHKV + k_decayed_BHNCK[:, :, n].transpose(-1, -2) @ v_BHNCV[:, :, n]
    o_BHNCV = o_BHNCV + torch.stack(inter_outputs, dim=2)

    o_BTHV = o_BHNCV.permute(0, 2, 3, 1, 4).reshape(B, N * C, H, V)[:, :T].to(v_BTHV.dtype)
    return (o_BTHV, state_BHKV) if return_final_state else o_BTHV
