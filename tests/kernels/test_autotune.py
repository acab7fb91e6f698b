"""braid.kernels.autotune.add_configs on real Triton autotuners (no GPU needed: nothing is launched)."""

from __future__ import annotations

import pytest

triton = pytest.importorskip("triton")
tl = pytest.importorskip("triton.language")

from braid.kernels.autotune import add_configs  # noqa: E402


def _zero_out(nargs):
    nargs["y_ptr"].zero_()


def _autotuned(configs):
    @triton.autotune(configs=configs, key=["n"])
    @triton.jit
    def copy(x_ptr, y_ptr, n, BLOCK: tl.constexpr):
        offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        tl.store(y_ptr + offs, tl.load(x_ptr + offs, mask=offs < n), mask=offs < n)

    return copy


def test_add_configs_appends_new_ones_with_the_lists_pre_hook():
    library = [triton.Config({"BLOCK": b}, num_warps=4, num_stages=3, pre_hook=_zero_out) for b in (32, 64)]
    kernel = _autotuned(library)
    added = add_configs(kernel, [({"BLOCK": 64}, 4, 1), ({"BLOCK": 32}, 4, 3), ({"BLOCK": 64}, 4, 1)])
    assert added == 1  # (32, 4 warps, 3 stages) is the library's; the repeat is dropped
    assert kernel.configs[:2] == library
    new = kernel.configs[2]
    assert (new.kwargs, new.num_warps, new.num_stages) == ({"BLOCK": 64}, 4, 1)
    assert new.pre_hook is _zero_out


def test_add_configs_leaves_a_single_config_list_alone():
    # mamba_ssm keeps one config per kernel in deterministic mode; adding one would bring timing back.
    only = [triton.Config({"BLOCK": 32}, num_warps=4, num_stages=3)]
    kernel = _autotuned(only)
    assert add_configs(kernel, [({"BLOCK": 64}, 4, 1)]) == 0
    assert kernel.configs == only
