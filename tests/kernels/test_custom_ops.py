"""The fast backends' custom ops (mamba_ssm, fla, braid's conv and router), checked on the CPU
through their fake kernels: schema, output shapes and dtypes, and the autograd wiring
(forward op -> backward op -> gradients for exactly the inputs that need them). Their numbers are the GPU tests' (tests/gpu).

The backends' packages are not installed here, so each test puts a stand-in for the
package's module in sys.modules before importing the braid wrapper (the ops never run a
real kernel under FakeTensorMode).
"""

from __future__ import annotations

import importlib
import importlib.util
import itertools
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



@pytest.mark.parametrize("T,L", [(100, 32), (64, 16)])
def test_mamba_ssd_decay_grads_follow_mamba_ssms_sums(mamba_ssm_wrapper, T, L):
    """decay_and_dt_grads (the SSD backward's tail, moved out of the op into the traced backward)
    against mamba_ssm's definition written out per chunk and position in float64: the last
    position takes the chunk-to-chunk term, ddA_prev is reverse-cumsummed over the chunk,
    ddt = ddA * A + ddt_chunks where dt >= 0 (else 0), dA = sum of ddA * dt. (On an interpreted
    copy of mamba_ssm's `_chunk_cumsum_bwd` kernel, ddt came out bit-identical and dA within
    7e-8 relative, float32.)"""
    gen = torch.Generator().manual_seed(T)
    B, H, nc = 2, 3, -(-T // L)

    def r(*shape):
        return torch.randn(*shape, generator=gen, dtype=torch.float64)

    ddA_in, ddA_next, ddA_prev, ddt_chunks = (r(B, H, nc, L) for _ in range(4))
    last = r(B, H, nc)
    A, dt = -r(H).abs(), r(B, T, H)
    dt_chunks = torch.nn.functional.pad(dt.clamp(min=0).transpose(1, 2), (0, nc * L - T)).unflatten(-1, (nc, L))
    ddt, dA = mamba_ssm_wrapper.decay_and_dt_grads(ddA_in, ddA_next, ddA_prev, last, ddt_chunks, dt_chunks, dt, A)
    want_ddt, want_dA = torch.zeros(B, T, H, dtype=torch.float64), torch.zeros(H, dtype=torch.float64)
    for b, h, c in itertools.product(range(B), range(H), range(nc)):
        for l in range(L):
            t = c * L + l
            # every position from l on, and the last position's chunk-to-chunk term
            later = ddA_prev[b, h, c, l:].sum() + last[b, h, c]
            ddA = ddA_in[b, h, c, l] + ddA_next[b, h, c, l] + later
            if t < T:
                want_ddt[b, t, h] = 0.0 if dt[b, t, h] < 0 else ddA * A[h] + ddt_chunks[b, h, c, l]
                want_dA[h] += ddA * dt_chunks[b, h, c, l]
    torch.testing.assert_close(ddt, want_ddt, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(dA, want_dA, rtol=1e-12, atol=1e-12)

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


def test_triton_router_op_shapes_and_gradients():
    from braid.kernels.moe.router_triton import router_logits_triton

    with FakeTensorMode():
        x = torch.empty(40, 24, dtype=BF16, requires_grad=True)
        weight = torch.empty(8, 24, requires_grad=True)
        logits = router_logits_triton(x, weight)
        assert (logits.shape, logits.dtype) == ((40, 8), torch.float32)
        dx, dweight = torch.autograd.grad(logits.sum(), [x, weight])
        assert (dx.shape, dx.dtype, dweight.shape, dweight.dtype) == (x.shape, BF16, weight.shape, torch.float32)
