"""Settings for the GPU tests (which check results, not speed).

Every Triton autotuner tries at most two of its configs (its first and its last), so the
first run of fla's kernels on a machine compiles a few kernels instead of dozens (minutes).
A kernel must be correct under every config it lists, and the production run autotunes
fully (Triton's disk cache keys results by the config list, so these runs do not leak
into it). BRAID_GPU_FULL_AUTOTUNE=1 tests with full autotuning. FlexAttention compiles
once per shape and mask, more times than dynamo's default recompile limit in one session.
"""

from __future__ import annotations

import os


def _two_configs_per_autotuner() -> None:
    try:
        from triton.runtime.autotuner import Autotuner
    except ImportError:
        return
    prune_configs = Autotuner.prune_configs

    def first_and_last(self, *args, **kwargs):
        configs = prune_configs(self, *args, **kwargs)
        return configs if len(configs) <= 2 else [configs[0], configs[-1]]

    Autotuner.prune_configs = first_and_last


def _raise_recompile_limit() -> None:
    import torch._dynamo.config as dynamo_config

    for name in ("recompile_limit", "cache_size_limit"):
        if hasattr(dynamo_config, name):
            setattr(dynamo_config, name, 64)


def pytest_configure(config) -> None:
    import torch

    if not torch.cuda.is_available():
        return
    if os.environ.get("BRAID_GPU_FULL_AUTOTUNE") != "1":
        _two_configs_per_autotuner()
    _raise_recompile_limit()
