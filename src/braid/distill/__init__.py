"""Distilling transformers into SSMs (MOHAWK): teacher import, student init, stage losses."""

from braid.distill.losses import kd_loss, stage1_loss, stage2_loss, stage3_loss, teacher_block_inputs
from braid.distill.mixing import matrix_orientation_loss, mixing_matrix
from braid.distill.student import attention_to_mamba2, build_student, student_config, transfer_weights
from braid.distill.teacher import config_from_hf, load_llama, save_gguf_tokenizer

__all__ = [
    "attention_to_mamba2",
    "build_student",
    "config_from_hf",
    "kd_loss",
    "load_llama",
    "matrix_orientation_loss",
    "mixing_matrix",
    "save_gguf_tokenizer",
    "stage1_loss",
    "stage2_loss",
    "stage3_loss",
    "student_config",
    "teacher_block_inputs",
    "transfer_weights",
]
