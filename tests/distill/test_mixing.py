"""Stage 1: mixing matrices built tile by tile match the mixers' own outputs, and the
orientation loss trains.

Parity in float64 (atol 1e-10); training checks are relative drops, stated per test.
"""

from __future__ import annotations

import copy

import pytest
import torch

from braid.distill.mixing import dense_matrix, matrix_orientation_loss, mixing_matrix, orientation_loss
from braid.kernels.ssd import ssd
from braid.model.attention import Attention
from braid.model.config import AttentionConfig, Mamba2Config
from braid.model.mamba2 import Mamba2

D_MODEL = 16


def _attention(window=None) -> Attention:
    torch.manual_seed(0)
    attn = Attention(D_MODEL, AttentionConfig(num_heads=4, num_kv_heads=2, rope_theta=100.0), window=window)
    attn.reset_parameters()
    with torch.no_grad():  # larger scores so the softmax is far from uniform
        attn.wq.weight.mul_(20)
    return attn.double()


def _mamba(seed=0) -> Mamba2:
    torch.manual_seed(seed)
    cfg = Mamba2Config(d_state=4, d_conv=4, expand=1, head_dim=4, n_groups=4, chunk_size=8)
    mamba = Mamba2(D_MODEL, cfg).double()
    with torch.no_grad():  # dt near 1 and slow decay: entries of M of order 0.1, like a softmax row's
        mamba.B_proj.weight.mul_(10)
        mamba.C_proj.weight.mul_(10)
        mamba.dt_bias.fill_(0.5)
        mamba.A_log.uniform_(-3.0, -1.0)
    return mamba


DOCS_BT = torch.tensor([[0] * 4 + [1] * 7, [2] * 11])


@pytest.mark.parametrize("window", [None, 3])
@pytest.mark.parametrize("doc_ids_BT", [None, DOCS_BT])
def test_softmax_matrix_reproduces_attention(window, doc_ids_BT):
    attn = _attention(window)
    x_BTD = torch.randn(2, 11, D_MODEL, dtype=torch.float64)
    M_BHTT = dense_matrix(mixing_matrix(attn, x_BTD, doc_ids_BT, block_size=4), 11)
    v_BTHK = attn.wv(x_BTD).unflatten(-1, (2, 4)).repeat_interleave(2, dim=2)
    y_BTD = attn.wo(torch.einsum("bhts,bshk->bthk", M_BHTT, v_BTHK).flatten(2))
    torch.testing.assert_close(y_BTD, attn(x_BTD, doc_ids_BT), atol=1e-10, rtol=1e-10)


@pytest.mark.parametrize("doc_ids_BT", [None, DOCS_BT])
def test_ssd_matrix_reproduces_the_scan(doc_ids_BT):
    matrix = mixing_matrix(_mamba(), torch.randn(2, 11, D_MODEL, dtype=torch.float64), doc_ids_BT)
    x_BTHP = torch.randn(2, 11, 4, 4, dtype=torch.float64)
    A_H = torch.tensor([-0.5, -1.0, -2.0, -0.1], dtype=torch.float64)
    matrix.a_cum_BHT = (matrix.dt_BTH * A_H).cumsum(dim=1).permute(0, 2, 1)
    expected_BTHP = ssd(x_BTHP, matrix.dt_BTH, A_H, matrix.B_BTHN, matrix.C_BTHN, chunk_size=4, doc_ids_BT=doc_ids_BT)
    ours_BTHP = torch.einsum("bhts,bshp->bthp", dense_matrix(matrix, 11), x_BTHP)
    torch.testing.assert_close(ours_BTHP, expected_BTHP, atol=1e-10, rtol=1e-10)


def test_loss_does_not_depend_on_block_size():
    x_BTD = torch.randn(2, 13, D_MODEL, dtype=torch.float64)
    student, teacher = mixing_matrix(_mamba(), x_BTD), mixing_matrix(_attention(), x_BTD, block_size=5)
    whole = orientation_loss(student, teacher, 13, block_size=13)
    torch.testing.assert_close(orientation_loss(student, teacher, 13, block_size=3), whole, atol=1e-12, rtol=1e-12)


def _fit(student: Mamba2, teacher, x_BTD, steps: int, lr: float) -> list[float]:
    opt = torch.optim.Adam(student.parameters(), lr=lr)
    losses = []
    for _ in range(steps):
        loss = matrix_orientation_loss(student, teacher, x_BTD, block_size=6)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def test_loss_reaches_zero_for_a_representable_teacher():
    """Teacher: an SSD layer; student: the same layer with its B, C and dt projections
    perturbed by 20%. The loss is exactly 0 at the teacher's weights; 60 Adam steps must
    remove 99% of the starting loss (they reach about 0.4%)."""
    teacher = _mamba(seed=1)
    student = copy.deepcopy(teacher)
    x_BTD = torch.randn(2, 12, D_MODEL, dtype=torch.float64)
    assert matrix_orientation_loss(student, teacher, x_BTD).item() == 0.0
    with torch.no_grad():
        for proj in (student.B_proj, student.C_proj, student.dt_proj):
            proj.weight.add_(0.2 * proj.weight.std() * torch.randn_like(proj.weight))
    losses = _fit(student, teacher, x_BTD, steps=60, lr=1e-2)
    assert losses[-1] < 1e-2 * losses[0], (losses[0], losses[-1])


def test_loss_falls_against_softmax_attention():
    """An SSD cannot represent softmax exactly; 40 steps must still remove 80% of the
    distance (they remove about 94%)."""
    torch.manual_seed(2)
    x_BTD = torch.randn(2, 12, D_MODEL, dtype=torch.float64)
    losses = _fit(_mamba(), _attention(), x_BTD, steps=40, lr=1e-2)
    assert losses[-1] < 0.2 * losses[0], (losses[0], losses[-1])


def test_head_mismatch_is_explained():
    small = Mamba2(D_MODEL, Mamba2Config(d_state=4, expand=1, head_dim=8, n_groups=2))
    with pytest.raises(ValueError, match="student_config"):
        matrix_orientation_loss(small.double(), _attention(), torch.randn(1, 4, D_MODEL, dtype=torch.float64))
