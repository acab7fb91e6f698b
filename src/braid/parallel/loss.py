"""Cross-entropy for plain logits and for vocab-sharded logits (a TP model's head output).

Legend: N tokens, V vocab, v this rank's vocab slice (V / tp).

The vocab-parallel path is Megatron's: each rank holds logits for its slice of the vocab;
the max, the sum of exponentials and the target logit are all-reduced over the TP group, so
no rank ever holds a full (N, V) row. The backward needs no communication.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.distributed.tensor import DTensor, Shard

__all__ = ["parallel_cross_entropy"]


def parallel_cross_entropy(logits: torch.Tensor, labels: torch.Tensor, ignore_index: int = -100) -> torch.Tensor:
    """Mean cross-entropy over the targets that are not `ignore_index`, computed in float32
    (float64 for float64 logits).

    logits: (..., V), a plain tensor or a DTensor sharded on its last (vocab) dim over a 1-D
    mesh (braid's TP head output); labels: (...) integer. Returns a plain scalar, equal on
    every rank of the TP group (NaN when every target is ignored, as F.cross_entropy).
    """
    if isinstance(labels, DTensor):
        labels = labels.full_tensor()
    if logits.shape[:-1] != labels.shape:
        raise ValueError(
            f"parallel_cross_entropy: logits {tuple(logits.shape)} must be labels {tuple(labels.shape)} + (V,)"
        )
    if labels.dtype.is_floating_point:
        raise ValueError(f"parallel_cross_entropy: labels must be integer class ids, got {labels.dtype}")
    if isinstance(logits, DTensor) and not _vocab_sharded(logits):
        logits = logits.full_tensor()
    if not isinstance(logits, DTensor):
        logits_NV = logits.reshape(-1, logits.shape[-1])
        return F.cross_entropy(_compute_dtype(logits_NV), labels.reshape(-1), ignore_index=ignore_index)
    mesh = logits.device_mesh
    vocab = logits.shape[-1]
    if vocab % mesh.size():
        raise ValueError(f"parallel_cross_entropy: vocab {vocab} is not divisible by the {mesh.size()} TP ranks")
    local_NV = logits.to_local().reshape(-1, vocab // mesh.size())
    start = mesh.get_local_rank() * local_NV.shape[1]
    return _VocabParallelCrossEntropy.apply(local_NV, labels.reshape(-1), start, ignore_index, mesh.get_group())


def _compute_dtype(x: torch.Tensor) -> torch.Tensor:
    return x.to(torch.promote_types(x.dtype, torch.float32))


def _vocab_sharded(logits: DTensor) -> bool:
    placements = logits.placements
    last = logits.ndim - 1
    return (
        logits.device_mesh.ndim == 1
        and type(placements[0]) is Shard
        and placements[0].dim in (last, -1)
    )


class _VocabParallelCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits_Nv, labels_N, start: int, ignore_index: int, group) -> torch.Tensor:
        x_Nv = _compute_dtype(logits_Nv)
        max_N = x_Nv.max(dim=-1).values
        dist.all_reduce(max_N, op=dist.ReduceOp.MAX, group=group)
        shifted_Nv = x_Nv - max_N[:, None]
        exp_Nv = shifted_Nv.exp()
        sum_exp_N = exp_Nv.sum(dim=-1)
        dist.all_reduce(sum_exp_N, group=group)
        valid_N = labels_N != ignore_index
        local_N = labels_N - start
        here_N = valid_N & (local_N >= 0) & (local_N < x_Nv.shape[1])
        index_N = torch.where(here_N, local_N, 0)
        target_N = shifted_Nv.gather(1, index_N[:, None]).squeeze(1) * here_N
        dist.all_reduce(target_N, group=group)
        loss_N = (sum_exp_N.log() - target_N) * valid_N
        num_valid = valid_N.sum()
        ctx.save_for_backward(exp_Nv / sum_exp_N[:, None], index_N, here_N, valid_N, num_valid)
        ctx.dtype = logits_Nv.dtype
        return loss_N.sum() / num_valid

    @staticmethod
    def backward(ctx, grad_loss):
        softmax_Nv, index_N, here_N, valid_N, num_valid = ctx.saved_tensors
        grad_Nv = softmax_Nv.clone()
        rows = torch.arange(grad_Nv.shape[0], device=grad_Nv.device)
        grad_Nv[rows, index_N] -= here_N.to(grad_Nv.dtype)
        grad_Nv *= valid_N[:, None] * (grad_loss / num_valid)
        return grad_Nv.to(ctx.dtype), None, None, None, None
