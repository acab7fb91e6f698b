"""Extra autotune configs for library Triton kernels.

A library's kernel carries the configs its authors tuned on their GPUs. Where a sweep on ours
found a faster one (docs/benchmarks.md, eleventh measurement: mamba_ssm's SSD kernels on an
H200 ran up to 30% faster single-staged), braid appends it to the kernel's list. The
autotuner still times every config on the first call of each shape and keeps the fastest,
so an added config can only win where it is faster; the library's own configs stay.

A list of one config is left alone: mamba_ssm cuts its lists to one in deterministic mode
(MAMBA_DETERMINISTIC=1 or torch.use_deterministic_algorithms), so that no timing decides
the order of its sums.
"""

from __future__ import annotations

from collections.abc import Iterable


def add_configs(kernel, configs: Iterable[tuple[dict, int, int]]) -> int:
    """Append `configs`, (kwargs, num_warps, num_stages) each, to the autotuned Triton kernel
    `kernel` (a triton Autotuner), with the pre-hook its own configs run (e.g. zeroing an
    accumulated output). Configs it already has, and lists of one config, are skipped.
    Returns how many were added."""
    import triton

    existing = list(kernel.configs)
    if len(existing) < 2:
        return 0
    hook = existing[0].pre_hook
    seen = {_signature(c.kwargs, c.num_warps, c.num_stages) for c in existing}
    added = 0
    for kwargs, num_warps, num_stages in configs:
        signature = _signature(kwargs, num_warps, num_stages)
        if signature in seen:
            continue
        seen.add(signature)
        existing.append(triton.Config(dict(kwargs), num_warps=num_warps, num_stages=num_stages, pre_hook=hook))
        added += 1
    kernel.configs = existing
    return added


def _signature(kwargs: dict, num_warps: int, num_stages: int) -> tuple:
    return tuple(sorted(kwargs.items())), num_warps, num_stages
