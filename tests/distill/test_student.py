"""Student construction and the attention -> Mamba-2 weight transfer, piece by piece.

Exact checks (torch.equal) for copied weights; projections and the mixing matrix in float64
with atol 1e-12.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from braid.distill.mixing import dense_matrix, mixing_matrix
from braid.distill.student import build_student, student_config
from braid.distill.teacher import load_llama


@pytest.fixture(scope="module")
def teacher(llama_dir):
    model, _ = load_llama(llama_dir, dtype=torch.float64)
    return model


def test_config_lines_up_heads(teacher):
    cfg = student_config(teacher.cfg, keep_attention=[1])
    assert [spec.mixer for spec in cfg.layers] == ["mamba2", "attention"]
    m = cfg.mamba2
    assert (m.num_heads(cfg.d_model), m.head_dim, m.d_state, m.n_groups) == (4, 8, 8, 4)
    with pytest.raises(ValueError, match="keep_attention"):
        student_config(teacher.cfg, keep_attention=[5])


def test_shared_weights_are_copied(teacher):
    student, _ = build_student(teacher, keep_attention=[1])
    t_params = dict(teacher.named_parameters())
    for name, param in student.named_parameters():
        if ".mixer." not in name or name.startswith("layers.1."):
            assert torch.equal(param, t_params[name]), name


def test_projections_map_q_k_v_o(teacher):
    student, _ = build_student(teacher)
    attn, mamba = teacher.layers["0"].mixer, student.layers["0"].mixer
    x_BTD = torch.randn(2, 5, 32, dtype=torch.float64)
    k_BTJK = attn.wk(x_BTD).unflatten(-1, (2, 8))
    v_BTJK = attn.wv(x_BTD).unflatten(-1, (2, 8))
    torch.testing.assert_close(mamba.C_proj(x_BTD), attn.wq(x_BTD), atol=1e-12, rtol=0)
    # Query head h reads KV head h // 2 (4 query heads, 2 KV heads).
    B_BTHN, x_BTHP = mamba.B_proj(x_BTD).unflatten(-1, (4, 8)), mamba.x_proj(x_BTD).unflatten(-1, (4, 8))
    torch.testing.assert_close(B_BTHN, k_BTJK.repeat_interleave(2, dim=2), atol=1e-12, rtol=0)
    torch.testing.assert_close(x_BTHP, v_BTJK.repeat_interleave(2, dim=2), atol=1e-12, rtol=0)
    assert torch.equal(mamba.out_proj.weight, attn.wo.weight) and torch.equal(mamba.D, torch.zeros_like(mamba.D))


def test_transferred_mixing_matrix_is_silu_linear_attention(teacher):
    """With no decay (A -> 0) and constant dt the student's M is causal silu(q) silu(k)^T dt."""
    student, _ = build_student(teacher)
    attn, mamba = teacher.layers["0"].mixer, student.layers["0"].mixer
    with torch.no_grad():
        mamba.A_log.fill_(-60.0)
        mamba.dt_proj.weight.zero_()
        mamba.dt_bias.fill_(0.5)
    x_BTD = torch.randn(1, 6, 32, dtype=torch.float64)
    q_BTHK = F.silu(attn.wq(x_BTD)).unflatten(-1, (4, 8))
    k_BTHK = F.silu(attn.wk(x_BTD)).unflatten(-1, (2, 8)).repeat_interleave(2, dim=2)
    dt = F.softplus(torch.tensor(0.5, dtype=torch.float64))
    expected_BHTT = torch.einsum("bthk,bshk->bhts", q_BTHK, k_BTHK).tril() * dt
    torch.testing.assert_close(dense_matrix(mixing_matrix(mamba, x_BTD), 6), expected_BHTT, atol=1e-12, rtol=1e-12)


def test_all_attention_student_equals_teacher(teacher):
    student, _ = build_student(teacher, keep_attention=[0, 1])
    tokens_BT = torch.randint(0, teacher.cfg.vocab_size, (2, 9))
    with torch.no_grad():
        assert torch.equal(student(tokens_BT), teacher(tokens_BT))
