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

from braid.distill.mixing import mixing_matrix, orientation_to
from braid.model.decoder import Decoder


def direct_call(module, fn, *args):
    """fn(*args): how the stage losses run work that belongs to `module` in one process. A
    sharded run passes braid.distill.parallel.fsdp_call, which gathers the module's weights
    around fn (FSDP2 gathers them only for the module's own forward)."""
    return fn(*args)


@torch.no_grad()
def teacher_block_inputs(
    teacher: Decoder, tokens_BT: Tensor, doc_ids_BT: Tensor | None = None, *, call=direct_call
) -> list[Tensor]:
    """The input h_BTD of every teacher block, plus the last block's output at the end."""
    return call(teacher, _block_inputs, teacher, tokens_BT, doc_ids_BT)


def _block_inputs(teacher: Decoder, tokens_BT: Tensor, doc_ids_BT: Tensor | None) -> list[Tensor]:
    h_BTD = teacher.tok_embeddings(tokens_BT)
    hidden = [h_BTD]
    for block in teacher.layers.values():
        h_BTD, _ = block(h_BTD, doc_ids_BT)
        hidden.append(h_BTD)
    return hidden


def _distilled_layers(student: Decoder, teacher: Decoder, stage: int) -> list[str]:
    if list(student.layers) != list(teacher.layers):
        raise ValueError(
            f"distill: student layers {list(student.layers)} differ from the teacher's {list(teacher.layers)}; "
            "build the student with braid.distill.student_config"
        )
    keys = [key for key, block in student.layers.items() if block.spec.mixer != "attention"]
    if not keys:
        raise ValueError(f"distill: the student keeps attention in every layer; stage {stage} has nothing to fit")
    return keys


def _student_input(h_BTD: Tensor, input_grad: bool) -> Tensor:
    """A block's input from the teacher; with input_grad a leaf that requires grad, so that a
    sharded block's FSDP post-backward hook (reshard, reduce-scatter) fires as soon as its own
    backward is done rather than at the end of the whole backward."""
    return h_BTD.detach().requires_grad_(True) if input_grad else h_BTD


def _teacher_mixing(block, h_BTD: Tensor, doc_ids_BT: Tensor | None, block_size: int):
    x_BTD = block.mixer_norm(h_BTD)
    return x_BTD, mixing_matrix(block.mixer, x_BTD, doc_ids_BT, block_size)


def stage1_loss(
    student: Decoder,
    teacher: Decoder,
    tokens_BT: Tensor,
    doc_ids_BT: Tensor | None = None,
    block_size: int = 64,
    *,
    call=direct_call,
    input_grad: bool = False,
) -> Tensor:
    """Mean over the student's non-attention layers of the mixing-matrix distance on the
    teacher's normed block input (layers independent: each sees the teacher's hidden state).
    call / input_grad: see direct_call and _student_input (sharded runs)."""
    hidden = teacher_block_inputs(teacher, tokens_BT, doc_ids_BT, call=call)
    keys = _distilled_layers(student, teacher, 1)
    total = 0.0
    for key in keys:
        teacher_block, student_block = teacher.layers[key], student.layers[key]
        with torch.no_grad():
            x_BTD, teacher_matrix = call(
                teacher_block, _teacher_mixing, teacher_block, hidden[int(key)], doc_ids_BT, block_size
            )
        x_BTD = _student_input(x_BTD, input_grad)
        total = total + call(
            student_block, orientation_to, student_block.mixer, teacher_matrix, x_BTD, doc_ids_BT, block_size
        )
    return total / len(keys)


def stage2_loss(
    student: Decoder,
    teacher: Decoder,
    tokens_BT: Tensor,
    doc_ids_BT: Tensor | None = None,
    *,
    call=direct_call,
    input_grad: bool = False,
) -> Tensor:
    """Mean over the student's non-attention blocks of the mean squared error between student
    and teacher block outputs, each block fed the teacher's block input."""
    hidden = teacher_block_inputs(teacher, tokens_BT, doc_ids_BT, call=call)
    total = 0.0
    keys = _distilled_layers(student, teacher, 2)
    for key in keys:
        out_BTD, _ = student.layers[key](_student_input(hidden[int(key)], input_grad), doc_ids_BT)
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
