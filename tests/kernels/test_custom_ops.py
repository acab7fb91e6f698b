"""The fast backends' custom ops (mamba_ssm, fla and braid's conv), checked on the CPU
through their fake kernels: schema, output shapes and dtypes, and the autograd wiring
(forward op -> backward op -> gradients for exactly the inputs that need them). Their numbers are the GPU tests' (tests/gpu).

The backends' packages are not installed here, so each test puts a stand-in for the
package's module in sys.modules before importing the braid wrapper (the ops never run a
real kernel under FakeTensorMode).
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
import types

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

BF16 = torch.bfloat16


_imported: dict[str, types.ModuleType] = {}


def import_over_stand_ins(name: str, stand_ins: dict[str, tuple[str, ...]]) -> types.ModuleType:
    """The braid module `name`, imported with empty stand-ins (attributes None) for the
    backend package's modules it imports (the first key is the package), then taken out of
    sys.modules again so that backend probes do not see it; where the package is installed,
    the real module. Once per process either way: its custom ops register once (a later real
    import stops at the missing package, before registering them)."""
    package = next(iter(stand_ins))
    if name in sys.modules or importlib.util.find_spec(package) is not None:
        return importlib.import_module(name)  # the real backend is installed: the real wrapper
    if name not in _imported:
        with pytest.MonkeyPatch.context() as patch:
            for module, attributes in stand_ins.items():
                stand_in = types.ModuleType(module)
                stand_in.__path__ = []
                stand_in.__dict__.update(dict.fromkeys(attributes))
                patch.setitem(sys.modules, module, stand_in)
            _imported[name] = importlib.import_module(name)
            del sys.modules[name]
    return _imported[name]


@pytest.fixture
def mamba_ssm_wrapper():
    return import_over_stand_ins(
        "braid.kernels.ssd.mamba_ssm",
        {"mamba_ssm": (), "mamba_ssm.ops": (), "mamba_ssm.ops.triton": (), "mamba_ssm.ops.triton.ssd_combined": ()},
    )


FLA = {
    "fla": (), "fla.ops": (), "fla.ops.utils": ("prepare_chunk_indices",),
    "fla.ops.utils.constant": ("RCP_LN2",), "fla.ops.utils.cumsum": ("chunk_local_cumsum",),
    "fla.ops.common": (), "fla.ops.common.chunk_h": ("chunk_bwd_dh", "chunk_fwd_h"),
    "fla.ops.gla": ("fused_recurrent_gla",),
    "fla.ops.gla.chunk": ("chunk_gla_bwd_dA", "chunk_gla_bwd_dqk_intra", "chunk_gla_bwd_dqkg", "chunk_gla_bwd_dv",
                          "chunk_gla_fwd_intra_gk", "chunk_gla_fwd_o_gk"),
    "fla.ops.simple_gla": ("chunk_simple_gla", "fused_recurrent_simple_gla"),
    "fla.modules": (), "fla.modules.causal_conv1d": (),
    "fla.modules.causal_conv1d.ops": ("causal_conv1d_fwd", "causal_conv1d_bwd"),
}


def _leaves(d="cpu", batch=2, T=96, H=4, P=8, G=2, N=16):
    def leaf(*shape, dtype=torch.float32):
        return torch.empty(*shape, device=d, dtype=dtype, requires_grad=True)

    return leaf(batch, T, H, P, dtype=BF16), leaf(batch, T, H), leaf(H), leaf(batch, T, G, N, dtype=BF16), \
        leaf(batch, T, G, N, dtype=BF16), leaf(H), leaf(batch, H, P, N)


@pytest.mark.parametrize("with_D", [True, False])
@pytest.mark.parametrize("with_state", [True, False])
def test_mamba_ssd_op_shapes_and_gradients(mamba_ssm_wrapper, with_D, with_state):
    module = mamba_ssm_wrapper
    with FakeTensorMode():
        x, dt, A, B, C, D, state = _leaves()
        D = D if with_D else None
        state = state if with_state else None
        y, final = module.ssd_mamba_ssm(
            x, dt, A, B, C, chunk_size=32, D_H=D, initial_state_BHPN=state, return_final_state=True
        )
        assert (y.shape, y.dtype) == (x.shape, BF16)
        assert (final.shape, final.dtype) == ((2, 4, 8, 16), torch.float32)
        wrt = [t for t in (x, dt, A, B, C, D, state) if t is not None]
        grads = torch.autograd.grad(y.float().sum() + final.sum(), wrt)
        for grad, leaf in zip(grads, wrt):
            assert (grad.shape, grad.dtype) == (leaf.shape, leaf.dtype)


def test_mamba_ssd_op_takes_documents(mamba_ssm_wrapper):
    with FakeTensorMode():
        x, dt, A, B, C, D, _ = _leaves(T=10)
        doc_ids_BT = torch.tensor([[0] * 4 + [1] * 6, [2] * 10])
        y = mamba_ssm_wrapper.ssd_mamba_ssm(x, dt, A, B, C, chunk_size=32, D_H=D, doc_ids_BT=doc_ids_BT)
        assert y.shape == x.shape
        assert torch.autograd.grad(y.float().sum(), [x])[0].shape == x.shape


@pytest.mark.parametrize("with_state", [True, False])
def test_fla_conv_op_shapes_and_gradients(with_state):
    module = import_over_stand_ins("braid.kernels.ssd.fla", FLA)
    with FakeTensorMode():
        x = torch.empty(2, 40, 24, dtype=BF16, requires_grad=True)
        weight = torch.empty(24, 4, requires_grad=True)
        bias = torch.empty(24, requires_grad=True)
        state = torch.empty(2, 24, 3, dtype=BF16, requires_grad=True) if with_state else None
        y, final = module.causal_conv1d_fla(
            x, weight, bias, initial_state_BCK=state, activation="silu", return_final_state=True
        )
        assert (y.shape, y.dtype, final.shape, final.dtype) == (x.shape, BF16, (2, 24, 3), BF16)
        wrt = [t for t in (x, weight, bias, state) if t is not None]
        for grad, leaf in zip(torch.autograd.grad(y.float().sum() + final.float().sum(), wrt), wrt):
            assert (grad.shape, grad.dtype) == (leaf.shape, leaf.dtype)


@pytest.mark.parametrize("with_state", [True, False])
def test_fla_chunk_gla_op_shapes_and_gradients(with_state):
    module = import_over_stand_ins("braid.kernels.gla.fla", FLA)
    with FakeTensorMode():
        q, k = (torch.empty(2, 100, 4, 16, dtype=BF16, requires_grad=True) for _ in range(2))
        v = torch.empty(2, 100, 4, 32, dtype=BF16, requires_grad=True)
        g = torch.empty(2, 100, 4, 16, requires_grad=True)
        state = torch.empty(2, 4, 16, 32, requires_grad=True) if with_state else None
        o, final = module.gla_fla(q, k, v, g, initial_state_BHKV=state, return_final_state=True)
        assert (o.shape, o.dtype, final.shape, final.dtype) == (v.shape, BF16, (2, 4, 16, 32), torch.float32)
        wrt = [t for t in (q, k, v, g, state) if t is not None]
        for grad, leaf in zip(torch.autograd.grad(o.float().sum() + final.sum(), wrt), wrt):
            assert (grad.shape, grad.dtype) == (leaf.shape, leaf.dtype)


@pytest.mark.parametrize("with_bias", [True, False])
def test_triton_conv_op_shapes_and_gradients(with_bias):
    from braid.kernels.ssd.conv_triton import causal_conv1d_triton

    with FakeTensorMode():
        x = torch.empty(2, 40, 24, dtype=BF16, requires_grad=True)
        weight = torch.empty(24, 4, requires_grad=True)
        bias = torch.empty(24, requires_grad=True) if with_bias else None
        y = causal_conv1d_triton(x, weight, bias, doc_ids_BT=torch.zeros(2, 40, dtype=torch.int64))
        assert (y.shape, y.dtype) == (x.shape, BF16)
        wrt = [t for t in (x, weight, bias) if t is not None]
        for grad, leaf in zip(torch.autograd.grad(y.float().sum(), wrt), wrt):
            assert (grad.shape, grad.dtype) == (leaf.shape, leaf.dtype)
