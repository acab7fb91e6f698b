"""Wrapping a library's CUDA kernels as torch custom ops, so torch.compile keeps each call as
one opaque node of its graph (a graph break otherwise) and CUDA graphs capture it.

The pattern (braid.kernels.ssd.mamba_ssm, braid.kernels.ssd.fla, braid.kernels.gla.fla): a
forward op and a backward op over the library's own forward and backward functions, each
with a fake kernel giving its outputs' shapes and dtypes, and `register_autograd` wiring
the backward op to the forward one. The real kernels cast and make contiguous what they
return, so the fakes hold exactly; an optional input that is absent gets an empty tensor as
its gradient placeholder (`optional_grad`), since ops return tensors only, and the autograd
function turns it back into None (`drop_placeholder`).
"""

from __future__ import annotations

import torch
from torch import Tensor


def cuda_op(name: str, schema: str):
    """Decorator: a CUDA-only custom op `braid::name` with an explicit schema, mutating nothing."""
    return torch.library.custom_op(f"braid::{name}", mutates_args=(), device_types="cuda", schema=schema)


def optional_grad(grad: Tensor | None, like: Tensor | None, anchor: Tensor) -> Tensor:
    """The gradient of an optional input `like`, in its dtype and contiguous; an empty tensor
    on `anchor`'s device where the input is absent."""
    return anchor.new_empty(0) if like is None else grad.to(like.dtype).contiguous()


def optional_fake(like: Tensor | None, anchor: Tensor) -> Tensor:
    """optional_grad's fake: an empty tensor of `like`'s shape and dtype, or the empty placeholder."""
    return anchor.new_empty(0) if like is None else like.new_empty(like.shape)


def drop_placeholder(grad: Tensor, like: Tensor | None) -> Tensor | None:
    """What autograd takes for an optional input: its gradient, or None where it was absent."""
    return None if like is None else grad
