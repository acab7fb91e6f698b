"""Token-mixing matrices, materialised block by block, and the stage-1 orientation loss.

A causal mixer computes y_t = sum_s M[t, s] v_s per head. For softmax attention
M = softmax(q k^T / sqrt(K) + causal mask); for Mamba-2's SSD
M[t, s] = (C_t . B_s) exp(a_{s+1} + ... + a_t) dt_s with a = dt * A (the D skip, the gate,
the norm and the projections are not part of M). MOHAWK's stage 1 fits the student's M to
the teacher's on the same input. Only one (query block x key block) tile of M ever exists:
each tile's loss is recomputed in backward (activation checkpointing), so memory is
O(T * block) however long T is.

Legend: B batch, T time, H heads, K q/k head dim, N SSD state dim, L query rows of a
tile, S key columns of a tile.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.checkpoint import checkpoint

from braid.model.attention import Attention
from braid.model.mamba2 import Mamba2
from braid.model.rope import apply_rope, positions_from_doc_ids, rope_cos_sin


def _allowed_BLS(t0: int, s0: int, L: int, S: int, doc_ids_BT: Tensor | None, window: int | None, device) -> Tensor:
    """Causal (and window, and same-document) mask of one tile, (B or 1, L, S) bool."""
    t_L = torch.arange(t0, t0 + L, device=device)
    s_S = torch.arange(s0, s0 + S, device=device)
    allowed_LS = s_S[None, :] <= t_L[:, None]
    if window is not None:
        allowed_LS = allowed_LS & (t_L[:, None] - s_S[None, :] < window)
    allowed_BLS = allowed_LS[None]
    if doc_ids_BT is not None:
        same_BLS = doc_ids_BT[:, t0 : t0 + L, None] == doc_ids_BT[:, None, s0 : s0 + S]
        allowed_BLS = allowed_BLS & same_BLS
    return allowed_BLS


@dataclass
class SoftmaxMatrix:
    """Softmax attention's mixing matrix from rotated q, k (KV heads expanded to H)."""

    q_BTHK: Tensor
    k_BTHK: Tensor
    lse_BHT: Tensor  # log of each row's softmax normaliser
    doc_ids_BT: Tensor | None
    window: int | None

    @property
    def batch_size(self) -> int:
        return self.q_BTHK.shape[0]

    @property
    def num_heads(self) -> int:
        return self.q_BTHK.shape[2]

    @property
    def dtype(self) -> torch.dtype:
        return self.q_BTHK.dtype

    def logits(self, t0: int, t1: int, s0: int, s1: int) -> Tensor:
        scale = self.q_BTHK.shape[-1] ** -0.5
        scores_BHLS = torch.einsum("blhk,bshk->bhls", self.q_BTHK[:, t0:t1], self.k_BTHK[:, s0:s1]) * scale
        allowed_BLS = _allowed_BLS(t0, s0, t1 - t0, s1 - s0, self.doc_ids_BT, self.window, scores_BHLS.device)
        return scores_BHLS.masked_fill(~allowed_BLS[:, None], float("-inf"))

    def block(self, t0: int, t1: int, s0: int, s1: int) -> Tensor:
        """M_BHLS for query rows t0:t1 and key columns s0:s1."""
        return (self.logits(t0, t1, s0, s1) - self.lse_BHT[:, :, t0:t1, None]).exp()


@dataclass
class SSDMatrix:
    """Mamba-2's mixing matrix from its (convolved) C, B, dt and the cumulative log decay."""

    C_BTHN: Tensor
    B_BTHN: Tensor
    dt_BTH: Tensor
    a_cum_BHT: Tensor  # cumsum over time of dt * A, float64: tiles take differences of it
    doc_ids_BT: Tensor | None

    @property
    def batch_size(self) -> int:
        return self.C_BTHN.shape[0]

    @property
    def num_heads(self) -> int:
        return self.C_BTHN.shape[2]

    @property
    def dtype(self) -> torch.dtype:
        return self.C_BTHN.dtype

    def block(self, t0: int, t1: int, s0: int, s1: int) -> Tensor:
        """M_BHLS for query rows t0:t1 and key columns s0:s1."""
        cb_BHLS = torch.einsum("blhn,bshn->bhls", self.C_BTHN[:, t0:t1], self.B_BTHN[:, s0:s1])
        log_decay_BHLS = (self.a_cum_BHT[:, :, t0:t1, None] - self.a_cum_BHT[:, :, None, s0:s1]).to(cb_BHLS.dtype)
        allowed_BLS = _allowed_BLS(t0, s0, t1 - t0, s1 - s0, self.doc_ids_BT, None, cb_BHLS.device)
        decay_BHLS = log_decay_BHLS.masked_fill(~allowed_BLS[:, None], float("-inf")).exp()
        return cb_BHLS * decay_BHLS * self.dt_BTH[:, s0:s1].permute(0, 2, 1)[:, :, None, :]


def softmax_matrix(
    mixer: Attention, x_BTD: Tensor, doc_ids_BT: Tensor | None = None, block_size: int = 64
) -> SoftmaxMatrix:
    """The mixing matrix of an Attention mixer on its input x_BTD (the normed block input)."""
    B, T, _ = x_BTD.shape
    q_BTHK = mixer.wq(x_BTD).view(B, T, -1, mixer.head_dim)
    k_BTJK = mixer.wk(x_BTD).view(B, T, -1, mixer.head_dim)
    if doc_ids_BT is not None:
        pos_BT = positions_from_doc_ids(doc_ids_BT)
    else:
        pos_BT = torch.arange(T, device=x_BTD.device).expand(B, T)
    cos_BTK, sin_BTK = rope_cos_sin(pos_BT, mixer.head_dim, mixer.rope_theta, q_BTHK.dtype)
    q_BTHK = apply_rope(q_BTHK, cos_BTK, sin_BTK)
    k_BTHK = apply_rope(k_BTJK, cos_BTK, sin_BTK).repeat_interleave(q_BTHK.shape[2] // k_BTJK.shape[2], dim=2)
    matrix = SoftmaxMatrix(q_BTHK, k_BTHK, q_BTHK.new_empty(0), doc_ids_BT, mixer.window)
    matrix.lse_BHT = _row_logsumexp(matrix, T, block_size)
    return matrix


def _row_logsumexp(matrix: SoftmaxMatrix, T: int, block_size: int) -> Tensor:
    """Each row's logsumexp, streamed over key blocks so no full row block is kept."""
    rows = []
    for t0 in range(0, T, block_size):
        t1 = min(t0 + block_size, T)
        lse_BHL = None
        for s0 in range(0, t1, block_size):
            tile_lse_BHL = matrix.logits(t0, t1, s0, min(s0 + block_size, T)).logsumexp(dim=-1)
            lse_BHL = tile_lse_BHL if lse_BHL is None else torch.logaddexp(lse_BHL, tile_lse_BHL)
        rows.append(lse_BHL)
    return torch.cat(rows, dim=-1)


def ssd_matrix(mixer: Mamba2, x_BTD: Tensor, doc_ids_BT: Tensor | None = None) -> SSDMatrix:
    """The mixing matrix of a Mamba2 mixer on its input x_BTD, as its forward computes it."""
    cfg = mixer.cfg
    compute = torch.float64 if x_BTD.dtype == torch.float64 else torch.float32
    B_BTGN = mixer.conv_B(mixer.B_proj(x_BTD), doc_ids_BT).unflatten(-1, (-1, cfg.d_state)).to(compute)
    C_BTGN = mixer.conv_C(mixer.C_proj(x_BTD), doc_ids_BT).unflatten(-1, (-1, cfg.d_state)).to(compute)
    heads_per_group = mixer.num_heads // B_BTGN.shape[2]
    dt_BTH = F.softplus(mixer.dt_proj(x_BTD).to(compute) + mixer.dt_bias.to(compute))
    A_H = -torch.exp(mixer.A_log.to(compute))
    return SSDMatrix(
        C_BTHN=C_BTGN.repeat_interleave(heads_per_group, dim=2),
        B_BTHN=B_BTGN.repeat_interleave(heads_per_group, dim=2),
        dt_BTH=dt_BTH,
        a_cum_BHT=(dt_BTH * A_H).double().cumsum(dim=1).permute(0, 2, 1),
        doc_ids_BT=doc_ids_BT,
    )


def mixing_matrix(mixer, x_BTD: Tensor, doc_ids_BT: Tensor | None = None, block_size: int = 64):
    """SoftmaxMatrix or SSDMatrix of `mixer` (Attention or Mamba2) on x_BTD (B, T, D)."""
    if x_BTD.ndim != 3:
        raise ValueError(f"mixing_matrix: x must be (B, T, D), got {tuple(x_BTD.shape)}")
    if isinstance(mixer, Attention):
        return softmax_matrix(mixer, x_BTD, doc_ids_BT, block_size)
    if isinstance(mixer, Mamba2):
        return ssd_matrix(mixer, x_BTD, doc_ids_BT)
    raise ValueError(f"mixing_matrix: no mixing matrix for {type(mixer).__name__}; use Attention or Mamba2")


def dense_matrix(matrix: SoftmaxMatrix | SSDMatrix, T: int) -> Tensor:
    """The whole M_BHTT (for tests and small T only)."""
    return matrix.block(0, T, 0, T)


def _tile_loss(student, teacher, t0: int, t1: int, s0: int, s1: int) -> Tensor:
    diff_BHLS = student.block(t0, t1, s0, s1) - teacher.block(t0, t1, s0, s1).to(student.dtype)
    return diff_BHLS.square().sum()


def orientation_loss(student, teacher, T: int, block_size: int = 64) -> Tensor:
    """sum_tiles ||M_student - M_teacher||_F^2 / (B * H * T): the squared Frobenius distance of
    the two mixing matrices (each a SoftmaxMatrix or SSDMatrix of the same B, H, T), per row.

    Only causal tiles are visited; each is recomputed in backward, never stored.
    """
    if block_size < 1:
        raise ValueError(f"orientation_loss: block_size must be positive, got {block_size}")
    total = None
    for t0 in range(0, T, block_size):
        t1 = min(t0 + block_size, T)
        for s0 in range(0, t1, block_size):
            s1 = min(s0 + block_size, T)
            tile = checkpoint(_tile_loss, student, teacher, t0, t1, s0, s1, use_reentrant=False)
            total = tile if total is None else total + tile
    return total / (student.batch_size * student.num_heads * T)


def matrix_orientation_loss(
    student_mixer, teacher_mixer, x_BTD: Tensor, doc_ids_BT: Tensor | None = None, block_size: int = 64
) -> Tensor:
    """Stage 1 loss of one layer: both mixers see x_BTD (B, T, D); the teacher is frozen.

    Both must have the same number of heads H (a student from student_config does).
    """
    with torch.no_grad():
        teacher = mixing_matrix(teacher_mixer, x_BTD, doc_ids_BT, block_size)
    return orientation_to(student_mixer, teacher, x_BTD, doc_ids_BT, block_size)


def orientation_to(student_mixer, teacher, x_BTD: Tensor, doc_ids_BT: Tensor | None, block_size: int) -> Tensor:
    """The student's half of matrix_orientation_loss: its mixing matrix on x_BTD against the
    teacher's, already materialised (lazily, as mixing_matrix returns it)."""
    student = mixing_matrix(student_mixer, x_BTD, doc_ids_BT, block_size)
    if student.num_heads != teacher.num_heads:
        raise ValueError(
            f"matrix_orientation_loss: student has {student.num_heads} heads, teacher {teacher.num_heads}; "
            "build the student with braid.distill.student_config so the heads line up"
        )
    return orientation_loss(student, teacher, x_BTD.shape[1], block_size)


__all__ = [
    "SSDMatrix", "SoftmaxMatrix", "dense_matrix", "matrix_orientation_loss", "mixing_matrix", "orientation_loss",
    "orientation_to",
]
