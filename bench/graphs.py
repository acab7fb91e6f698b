"""A closure captured in a CUDA graph, for timing GPU work without the host's launch gaps
(what a CUDA-graphed training step sees). Shared by bench/blocks.py and bench/kernels.py."""

from __future__ import annotations

from collections.abc import Callable

import torch


def cuda_graph(run: Callable[[], object], warmup: int = 3) -> torch.cuda.CUDAGraph:
    """`run` captured in a CUDA graph after `warmup` calls on a side stream (autotuning,
    allocator pools), as torch.cuda.graphs documents. Raises what capture raises, e.g. for a
    closure that reads a value back to the host."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(warmup):
            run()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        run()
    return graph
