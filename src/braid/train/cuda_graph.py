"""A whole training step (forward, backward, optimizer) captured once as a CUDA graph and
replayed: one launch per step instead of thousands, for models whose step is host-bound
(many small kernels: hybrids of custom Triton mixers, small models, short sequences).

    step = GraphedStep(train_step, tokens_BT, labels_BT)   # warms up, then captures
    loss = step(next_tokens_BT, next_labels_BT)            # copies inputs in, replays

`train_step(*inputs) -> loss` must run forward, backward and `optimizer.step()` with
static shapes and no host synchronisation (no `.item()`, `.tolist()`, `.cpu()`, no
data-dependent shapes), leave gradients to be overwritten (set_to_none zeroing, as the
first capture finds them None), and use an optimizer built with `capturable=True`.
Autocast's weight-cast cache must be off inside it (`torch.autocast(..., cache_enabled=False)`):
a cached cast made during capture would be read after the graph's memory is reused.

The inputs are copied into static buffers before each replay; the loss returned is a
fresh copy (the graph's own output buffer is rewritten by the next replay).
"""

from __future__ import annotations

from collections.abc import Callable

import torch


class GraphedStep:
    """Capture `step_fn(*inputs)` after `warmup` eager calls on a side stream (lazy
    initialisation, optimizer state, Triton autotuning all happen there, outside the graph)."""

    def __init__(self, step_fn: Callable[..., torch.Tensor], *example_inputs: torch.Tensor | None, warmup: int = 3):
        if not torch.cuda.is_available():
            raise RuntimeError("GraphedStep captures CUDA graphs: it needs a CUDA device")
        if warmup < 1:
            raise ValueError(f"warmup={warmup}: capture needs at least one eager step first (lazy state, autotuning)")
        self.static_inputs = [None if x is None else x.clone() for x in example_inputs]
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(warmup):
                step_fn(*self.static_inputs)
        torch.cuda.current_stream().wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.static_loss = step_fn(*self.static_inputs)

    def __call__(self, *inputs: torch.Tensor | None) -> torch.Tensor:
        if len(inputs) != len(self.static_inputs):
            raise ValueError(f"GraphedStep: got {len(inputs)} inputs, captured with {len(self.static_inputs)}")
        for static, new in zip(self.static_inputs, inputs):
            if (static is None) != (new is None):
                raise ValueError("GraphedStep: an input is None now and was not at capture, or the reverse")
            if static is not None:
                if new.shape != static.shape or new.dtype != static.dtype:
                    raise ValueError(
                        f"GraphedStep: input {tuple(new.shape)} {new.dtype} differs from the captured "
                        f"{tuple(static.shape)} {static.dtype}; graphs replay fixed shapes"
                    )
                static.copy_(new, non_blocking=True)
        self.graph.replay()
        return self.static_loss.clone()
