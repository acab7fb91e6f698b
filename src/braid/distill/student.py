"""Student: a Mamba-2 (or hybrid) decoder of the teacher's shape, initialised from the teacher.

Mapping of one attention layer onto a Mamba-2 layer. Attention computes, per query head h,
y_t = sum_s softmax(q_t . k_s) v_s with q = wq x (H heads), k = wk x and v = wv x (J KV heads,
each shared by H/J query heads), output wo. SSD computes y_t = sum_s (C_t . B_s) decay dt_s x_s,
so C plays q, B plays k and x plays v. The SSD shares B and C per group and x is per head, hence:

    Mamba-2 heads      = H            (one SSD head per query head)
    Mamba-2 head_dim   = K            (x_h is v of head h's KV head)
    d_state            = K            (C_h . B_h is q_h . k_h)
    n_groups           = H            (each query needs its own C; a group per KV head, J,
                                       would force the queries of a group to share one C)
    expand             = H * K / d_model  (d_inner = H * K; must be a whole number)

    C_proj = wq;  B_proj = wk, each KV head repeated for its H/J query heads;
    x_proj = wv, repeated the same way;  out_proj = wo.

The convs start as identity taps (last tap 1, so the layer sees silu(q), silu(k), silu(v)),
D = 0 (attention has no skip), dt, A, z and the gated norm keep Mamba-2's initialisation:
they, RoPE (which the SSD lacks) and the softmax are what stages 1 and 2 must learn to
replace. Embeddings, norms, MLPs and the head are copied; kept attention layers are copied whole.

Legend: D d_model, H query heads, J KV heads, K head dim.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from braid.model.attention import Attention
from braid.model.config import Mamba2Config, ModelConfig
from braid.model.decoder import Decoder
from braid.model.mamba2 import Mamba2


def student_config(
    teacher_cfg: ModelConfig, keep_attention: Sequence[int] = (), *, d_conv: int = 4, chunk_size: int = 64
) -> ModelConfig:
    """The student config: teacher's layers with Mamba-2 mixers except `keep_attention` indices."""
    specs = teacher_cfg.layers
    if any(spec.mixer != "attention" or spec.ffn != "mlp" for spec in specs):
        raise ValueError(f"student_config: the teacher must be pattern 'A-' (a Llama), got {teacher_cfg.pattern!r}")
    bad = sorted(set(keep_attention) - set(range(len(specs))))
    if bad:
        raise ValueError(f"student_config: keep_attention {bad} are not layer indices 0..{len(specs) - 1}")
    att = teacher_cfg.attention
    head_dim = att.resolved_head_dim(teacher_cfg.d_model)
    d_inner = att.num_heads * head_dim
    if d_inner % teacher_cfg.d_model:
        raise ValueError(
            f"student_config: heads*head_dim={d_inner} is not a multiple of d_model={teacher_cfg.d_model}, "
            "so Mamba-2's d_inner = expand*d_model cannot hold the teacher's heads"
        )
    mamba2 = Mamba2Config(
        d_state=head_dim, d_conv=d_conv, expand=d_inner // teacher_cfg.d_model, head_dim=head_dim,
        n_groups=att.num_heads, chunk_size=chunk_size,
    )
    keep = set(keep_attention)
    pattern = " ".join("A-" if i in keep else "M-" for i in range(len(specs)))
    return teacher_cfg.replace(pattern=pattern, num_layers=None, mamba2=mamba2)


def _repeat_kv_rows(weight: torch.Tensor, num_kv_heads: int, num_heads: int) -> torch.Tensor:
    """(J*K, D) projection rows -> (H*K, D), each KV head's rows repeated for its query heads."""
    weight_JKD = weight.unflatten(0, (num_kv_heads, -1))
    return weight_JKD.repeat_interleave(num_heads // num_kv_heads, dim=0).flatten(0, 1)


@torch.no_grad()
def attention_to_mamba2(attn: Attention, mamba: Mamba2) -> None:
    """Initialise `mamba` from `attn` (see the module docstring for the mapping)."""
    H, J = attn.num_heads, attn.num_kv_heads
    if mamba.C_proj.weight.shape != attn.wq.weight.shape or mamba.num_heads != H:
        raise ValueError(
            f"attention_to_mamba2: Mamba-2 C_proj {tuple(mamba.C_proj.weight.shape)} and {mamba.num_heads} heads "
            f"do not fit wq {tuple(attn.wq.weight.shape)} and {H} heads; build the student with student_config"
        )
    mamba.C_proj.weight.copy_(attn.wq.weight)
    mamba.B_proj.weight.copy_(_repeat_kv_rows(attn.wk.weight, J, H))
    mamba.x_proj.weight.copy_(_repeat_kv_rows(attn.wv.weight, J, H))
    mamba.out_proj.weight.copy_(attn.wo.weight)
    for conv in (mamba.conv_x, mamba.conv_B, mamba.conv_C):
        conv.weight.zero_()
        conv.weight[:, -1] = 1.0
        conv.bias.zero_()
    mamba.D.zero_()


@torch.no_grad()
def transfer_weights(teacher: Decoder, student: Decoder) -> None:
    """Copy everything that has a counterpart from `teacher` into `student` (same shapes)."""
    student_params = dict(student.named_parameters())
    for name, param in teacher.named_parameters():
        if ".mixer." not in name:
            student_params[name].copy_(param)
    for key, block in student.layers.items():
        teacher_mixer = teacher.layers[key].mixer
        if isinstance(block.mixer, Attention):
            block.mixer.load_state_dict(teacher_mixer.state_dict())
        else:
            attention_to_mamba2(teacher_mixer, block.mixer)


def build_student(teacher: Decoder, keep_attention: Sequence[int] = (), **mamba_options) -> tuple[Decoder, ModelConfig]:
    """A student decoder initialised from `teacher`, on the teacher's device and dtype."""
    cfg = student_config(teacher.cfg, keep_attention, **mamba_options)
    weight = teacher.head_weight
    student = Decoder(cfg).to(device=weight.device)
    transfer_weights(teacher, student)
    return student.cast(weight.dtype), cfg
