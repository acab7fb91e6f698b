"""A side CUDA stream for the independent halves of one op's kernels.

Some backward passes split into parts that do not wait for each other: mamba_ssm's SSD
backward gets C·Bᵀ's gradient and the decay's in-chunk gradient without the state gradients
that its other kernels wait for; fla's GLA backward gets the in-chunk dq and dk without the
state-gradient scan. Queued on one stream they run one after the other, each below the
card's bandwidth; on two streams they overlap.

    with beside(x.device):      # starts after everything queued so far on the current stream
        a = kernel_a(...)       # runs on the side stream
    b = kernel_b(...)           # the current stream, at the same time
    join(x.device)              # the current stream waits for the side stream
    c = kernel_c(a, b)

Each op that forks joins before it returns, and every side block starts with a wait on the
current stream. So a block the caching allocator hands out again on either stream is never
reused before its last use on the other (no record_stream needed), and a CUDA graph capture
takes the fork and the join as edges of its graph. The results are those of one stream: the
same kernels run on the same inputs.

BRAID_SIDE_STREAM=0 (read at import) or `serial()` keeps everything on the current stream,
to profile kernels one at a time or to rule the overlap out.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

import torch

_enabled = os.environ.get("BRAID_SIDE_STREAM", "1") != "0"
_side_streams: dict[int, torch.cuda.Stream] = {}


def enabled() -> bool:
    """Whether `beside` blocks run on the side stream (BRAID_SIDE_STREAM, not under `serial()`)."""
    return _enabled


def _side(device: torch.device) -> torch.cuda.Stream:
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _side_streams:
        _side_streams[index] = torch.cuda.Stream(device=index)
    return _side_streams[index]


@contextlib.contextmanager
def beside(device: torch.device) -> Iterator[None]:
    """Launch the block's kernels on `device`'s side stream, after all work queued so far on
    the current stream (on the current stream itself when the overlap is off)."""
    if not _enabled:
        yield
        return
    side = _side(device)
    side.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(side):
        yield


def join(device: torch.device) -> None:
    """Make the current stream wait for all work queued on `device`'s side stream."""
    if _enabled:
        torch.cuda.current_stream(device).wait_stream(_side(device))


@contextlib.contextmanager
def serial() -> Iterator[None]:
    """Within the block, `beside` runs its kernels on the current stream."""
    global _enabled
    before, _enabled = _enabled, False
    try:
        yield
    finally:
        _enabled = before
