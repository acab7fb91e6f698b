"""Activation checkpointing and per-block compilation of a Decoder (or a pipeline stage).

    apply_ac(model_part, "full")              # every block recomputed in backward
    apply_ac(model_part, "selective", every=2)  # blocks whose layer index % 2 == 0
    apply_compile(model_part)                 # torch.compile each block, in place

Blocks are replaced in model.layers by torch's checkpoint_wrapper (non-reentrant: MoE blocks
return aux losses in a dict, which the reentrant variant would cut from the graph). The
wrapper strips its prefix from state-dict keys, and DCP's FQNs ignore it.

The recomputation re-runs each block's forward in backward. MoE layers count routed tokens
(tokens_per_expert) in every training forward; the recompute restores the counts it found,
so a checkpointed step counts its tokens once.
"""

from __future__ import annotations

from contextlib import contextmanager, nullcontext

import torch
from torch import nn
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper

from braid.kernels.backend import probe_all

__all__ = ["apply_ac", "apply_compile", "checkpointed_layers"]


def apply_ac(model_part: nn.Module, mode: str, every: int = 1) -> nn.Module:
    """Checkpoint the blocks of `model_part` ("full": all; "selective": layer index % every == 0;
    "none": nothing). Returns model_part, changed in place."""
    if mode not in ("none", "full", "selective"):
        raise ValueError(f"activation checkpointing mode {mode!r} is not one of 'none', 'full', 'selective'")
    if every < 1:
        raise ValueError(f"activation checkpointing every={every} must be >= 1")
    if mode == "none":
        return model_part
    for key, block in model_part.layers.items():
        if mode == "full" or int(key) % every == 0:
            model_part.layers[key] = checkpoint_wrapper(
                block, preserve_rng_state=False, context_fn=lambda block=block: (nullcontext(), _keep_moe_counts(block))
            )
    return model_part


@contextmanager
def _keep_moe_counts(block: nn.Module):
    buffers = [b for name, b in block.named_buffers() if name.endswith("tokens_per_expert")]
    counts = [b.clone() for b in buffers]
    try:
        yield
    finally:
        with torch.no_grad():
            for buffer, count in zip(buffers, counts):
                buffer.copy_(count)


def checkpointed_layers(model_part: nn.Module) -> list[str]:
    """Keys of the blocks wrapped by apply_ac."""
    return [key for key, block in model_part.layers.items() if hasattr(block, "_checkpoint_wrapped_module")]


def apply_compile(model_part: nn.Module, **compile_kwargs) -> nn.Module:
    """torch.compile each block in place (nn.Module.compile: parameter names and state-dict
    keys are unchanged, so checkpoints load as before). Returns model_part. The kernel backends
    are imported first: dynamo must not trace their imports (fla's fails under it)."""
    probe_all()
    for block in model_part.layers.values():
        block.compile(**compile_kwargs)
    return model_part
