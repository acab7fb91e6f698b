"""MOHAWK stages 1-3 as losses over a teacher and a student decoder of the same depth.

Stage 1 (matrix orientation) and stage 2 (hidden-state alignment) work layer by layer on
the teacher's own block inputs, so the layers train independently; stage 3 is end-to-end
knowledge distillation. The teacher always runs under no_grad.

Legend: B batch, T time, D d_model, V vocab.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from braid.distill.mixing import matrix_orientation_loss
from braid.model.decoder import Decoder


@torch.no_grad()
def teacher_block_inputs(teacher: Decoder, tokens_BT: Tensor, doc_ids_BT: Tensor | None = None) -> list[Tensor]:
    """The input h_BTD of every teacher block, plus the last block's output at the end."""
    h_BTD = teacher.tok_embeddings(tokens_BT)
    hidden = [h_BTD]
    for block in teacher.layers.values():
        h_BTD, _ = block(h_BTD, doc_ids_BT)
        hidden.append(h_BTD)
    return hidden


def _distilled_layers(student: Decoder, teacher: Decoder) -> list[str]:
    if list(student.layers) != list(teacher.layers):
        raise ValueError(
            f"distill: student layers {list(student.layers)} differ from the teacher's {list(teacher.layers)}; "
            "build the student with braid.distill.student_config"
        )
    return [key for key, block in student.layers.items() if block.spec.mixer != "attention"]


def stage1_loss(
    student: Decoder, teacher: Decoder, tokens_BT: Tensor, doc_ids_BT: Tensor | None = None, block_size: int = 64
) -> Tensor:
    """Mean over the student's non-attention layers of the mixing-matrix distance on the
    teacher's normed block input (layers independent: each sees the teacher's hidden state)."""
    hidden = teacher_block_inputs(teacher, tokens_BT, doc_ids_BT)
    keys = _distilled_layers(student, teacher)
    if not keys:
        raise ValueError("distill: the student keeps attention in every layer; stage 1 has nothing to fit")
    total = 0.0
    for key in keys:
        with torch.no_grad():
            x_BTD = teacher.layers[key].mixer_norm(hidden[int(key)])
        student_mixer, teacher_mixer = student.layers[key].mixer, teacher.layers[key].mixer
        total = total + matrix_orientation_loss(student_mixer, teacher_mixer, x_BTD, doc_ids_BT, block_size)
    return total / len(keys)


def stage2_loss(student: Decoder, teacher: Decoder, tokens_BT: Tensor, doc_ids_BT: Tensor | None = None) -> Tensor:
    """Mean over the student's non-attention blocks of the mean squared error between student
    and teacher block outputs, each block fed the teacher's block input."""
    hidden = teacher_block_inputs(teacher, tokens_BT, doc_ids_BT)
    keys = _distilled_layers(student, teacher)
    if not keys:
        raise ValueError("distill: the student keeps attention in every layer; stage 2 has nothing to fit")
    total = 0.0
    for key in keys:
        out_BTD, _ = student.layers[key](hidden[int(key)], doc_ids_BT)
        total = total + F.mse_loss(out_BTD.float(), hidden[int(key) + 1].float())
    return total / len(keys)


def kd_loss(
    student_BTV: Tensor,
    teacher_BTV: Tensor,
    temperature: float = 1.0,
    targets_BT: Tensor | None = None,
    ce_weight: float = 0.0,
) -> Tensor:
    """temperature^2 * KL(softmax(teacher/t) || softmax(student/t)) per token, plus
    ce_weight * cross-entropy on targets_BT (-100 ignored) when given."""
    if temperature <= 0:
        raise ValueError(f"kd_loss: temperature must be positive, got {temperature}")
    if student_BTV.shape != teacher_BTV.shape:
        raise ValueError(
            f"kd_loss: student logits {tuple(student_BTV.shape)} and teacher's {tuple(teacher_BTV.shape)} differ"
        )
    if ce_weight and targets_BT is None:
        raise ValueError("kd_loss: ce_weight > 0 needs targets_BT")
    log_p_student = F.log_softmax(student_BTV.float() / temperature, dim=-1).flatten(0, -2)
    log_p_teacher = F.log_softmax(teacher_BTV.float() / temperature, dim=-1).flatten(0, -2)
    loss = temperature**2 * F.kl_div(log_p_student, log_p_teacher, log_target=True, reduction="batchmean")
    if ce_weight:
        ce = F.cross_entropy(student_BTV.float().flatten(0, -2), targets_BT.flatten(), ignore_index=-100)
        loss = loss + ce_weight * ce
    return loss


def stage3_loss(
    student: Decoder,
    teacher: Decoder,
    tokens_BT: Tensor,
    doc_ids_BT: Tensor | None = None,
    targets_BT: Tensor | None = None,
    temperature: float = 1.0,
    ce_weight: float = 0.0,
) -> Tensor:
    """End-to-end knowledge distillation of the student's logits towards the frozen teacher's."""
    with torch.no_grad():
        teacher_BTV = teacher(tokens_BT, doc_ids_BT)
    return kd_loss(student(tokens_BT, doc_ids_BT), teacher_BTV, temperature, targets_BT, ce_weight)
