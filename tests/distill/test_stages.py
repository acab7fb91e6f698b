"""MOHAWK stages 1-3 on a tiny imported Llama: each loss trains, the teacher stays frozen.

Training checks are relative drops stated per test; exact checks in float64 with atol 1e-12.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from braid.distill import (
    build_student,
    kd_loss,
    load_llama,
    stage1_loss,
    stage2_loss,
    stage3_loss,
    teacher_block_inputs,
)


@pytest.fixture(scope="module")
def teacher(llama_dir):
    model, _ = load_llama(llama_dir)
    for param in model.parameters():
        param.requires_grad_(False)
    return model


def _tokens(vocab: int, T: int = 16):
    return torch.randint(0, vocab, (2, T), generator=torch.Generator().manual_seed(0))


def _train(loss_fn, student, steps: int, lr: float) -> list[float]:
    opt = torch.optim.Adam(student.parameters(), lr=lr)
    losses = []
    for _ in range(steps):
        loss = loss_fn()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def test_block_inputs_chain_to_the_final_hidden_state(teacher):
    tokens_BT = _tokens(teacher.cfg.vocab_size)
    hidden = teacher_block_inputs(teacher, tokens_BT)
    assert len(hidden) == teacher.cfg.resolved_num_layers + 1
    with torch.no_grad():
        torch.testing.assert_close(teacher.norm(hidden[-1]), teacher(tokens_BT, return_hidden=True), atol=0, rtol=0)


def test_stage1_loss_falls(teacher):
    """12 Adam steps on the mixers must remove a third of the matrix distance."""
    student, _ = build_student(teacher, keep_attention=[1])
    tokens_BT, docs_BT = _tokens(teacher.cfg.vocab_size), torch.tensor([[0] * 6 + [1] * 10] * 2)
    losses = _train(lambda: stage1_loss(student, teacher, tokens_BT, docs_BT, block_size=8), student, 12, 1e-2)
    assert losses[-1] < 0.67 * losses[0], (losses[0], losses[-1])
    assert all(p.grad is None for p in teacher.parameters())


def test_stage2_loss_falls(teacher):
    """12 Adam steps must remove half of the block-output error."""
    student, _ = build_student(teacher)
    tokens_BT = _tokens(teacher.cfg.vocab_size)
    losses = _train(lambda: stage2_loss(student, teacher, tokens_BT), student, 12, 1e-2)
    assert losses[-1] < 0.5 * losses[0], (losses[0], losses[-1])


def test_stage3_loss_falls(teacher):
    """12 Adam steps of KD at temperature 2 must remove half of the loss."""
    student, _ = build_student(teacher)
    tokens_BT = _tokens(teacher.cfg.vocab_size)
    losses = _train(lambda: stage3_loss(student, teacher, tokens_BT, temperature=2.0), student, 12, 1e-2)
    assert losses[-1] < 0.5 * losses[0], (losses[0], losses[-1])


def test_kd_loss_is_the_tempered_kl():
    student_BTV = torch.randn(2, 3, 7, dtype=torch.float64)
    teacher_BTV = torch.randn(2, 3, 7, dtype=torch.float64)
    p_teacher = F.softmax(teacher_BTV / 3.0, dim=-1)
    kl = (p_teacher * (p_teacher.log() - F.log_softmax(student_BTV / 3.0, dim=-1))).sum(-1).mean()
    torch.testing.assert_close(kd_loss(student_BTV, teacher_BTV, 3.0).double(), 9.0 * kl, atol=1e-6, rtol=1e-6)
    assert kd_loss(teacher_BTV, teacher_BTV, 3.0).item() == pytest.approx(0.0, abs=1e-6)
    targets_BT = torch.randint(0, 7, (2, 3))
    ce = F.cross_entropy(student_BTV.flatten(0, 1), targets_BT.flatten())
    with_ce = kd_loss(student_BTV, teacher_BTV, 3.0, targets_BT, ce_weight=0.5).double()
    torch.testing.assert_close(with_ce, 9.0 * kl + 0.5 * ce, atol=1e-6, rtol=1e-6)
    with pytest.raises(ValueError, match="targets"):
        kd_loss(student_BTV, teacher_BTV, ce_weight=1.0)
