"""Parity tests for the GLA kernels: chunked vs the sequential recurrence, step, packing.

Legend: B batch, T time, H heads, K key head dim, V value head dim.
Tolerances: float64 comparisons use atol=rtol=1e-10 (observed errors ~1e-15).
"""

import pytest
import torch
import torch.nn.functional as F

from braid.kernels.gla import gla, gla_step
from braid.kernels.gla.reference import gla_naive

F64 = dict(atol=1e-10, rtol=1e-10)
B, H, K, V = 2, 2, 4, 3
CHUNK = 16


def make_inputs(T, dtype=torch.float64, seed=0, decay=3.0):
    gen = torch.Generator().manual_seed(seed)
    q_BTHK, k_BTHK = (torch.randn(B, T, H, K, generator=gen, dtype=dtype) for _ in range(2))
    v_BTHV = torch.randn(B, T, H, V, generator=gen, dtype=dtype)
    g_BTHK = F.logsigmoid(torch.randn(B, T, H, K, generator=gen, dtype=dtype)) * decay
    return q_BTHK, k_BTHK, v_BTHV, g_BTHK


def initial_state(dtype=torch.float64):
    return torch.randn(B, H, K, V, generator=torch.Generator().manual_seed(7), dtype=dtype)


def run_with_grads(fn, tensors, **kwargs):
    """Outputs and the gradients of a fixed random projection of them w.r.t. every input."""
    leaves = [t.detach().clone().requires_grad_(True) for t in tensors]
    init = kwargs.pop("initial_state_BHKV", None)
    if init is not None:
        init = init.detach().clone().requires_grad_(True)
        leaves.append(init)
    o_BTHV, state_BHKV = fn(*leaves[:4], initial_state_BHKV=init, return_final_state=True, **kwargs)
    gen = torch.Generator().manual_seed(1)
    loss = (o_BTHV * torch.randn(o_BTHV.shape, generator=gen, dtype=o_BTHV.dtype)).sum()
    loss = loss + (state_BHKV * torch.randn(state_BHKV.shape, generator=gen, dtype=state_BHKV.dtype)).sum()
    loss.backward()
    return [o_BTHV.detach(), state_BHKV.detach()] + [leaf.grad for leaf in leaves]


@pytest.mark.parametrize("T", [1, CHUNK - 1, CHUNK, CHUNK + 1, 63])
@pytest.mark.parametrize("with_state", [False, True])
def test_chunked_matches_naive_outputs_and_grads(T, with_state):
    inputs = make_inputs(T)
    init = initial_state() if with_state else None
    got = run_with_grads(gla, inputs, chunk_size=CHUNK, initial_state_BHKV=init)
    want = run_with_grads(gla_naive, inputs, initial_state_BHKV=init)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, **F64)


def test_strong_decay_is_finite_and_exact():
    """Log decays of -50 per step would overflow exp(-b) in a split form; the chunked form must not."""
    q_BTHK, k_BTHK, v_BTHV, g_BTHK = make_inputs(40)
    g_BTHK = g_BTHK - 50.0 * (torch.rand(g_BTHK.shape, generator=torch.Generator().manual_seed(3)) < 0.5)
    inputs = tuple(t.float() for t in (q_BTHK, k_BTHK, v_BTHV, g_BTHK))
    got = run_with_grads(gla, inputs, chunk_size=32)
    want = run_with_grads(gla_naive, inputs)
    for g, w in zip(got, want):
        assert torch.isfinite(g).all()
        torch.testing.assert_close(g, w, atol=1e-4, rtol=1e-4)


def test_causal():
    T, t = 40, 21
    q_BTHK, k_BTHK, v_BTHV, g_BTHK = make_inputs(T)
    base = gla(q_BTHK, k_BTHK, v_BTHV, g_BTHK, chunk_size=CHUNK)
    changed = [x.clone() for x in (q_BTHK, k_BTHK, v_BTHV, g_BTHK)]
    for x in changed:
        x[:, t:] = -10.0 * torch.rand_like(x[:, t:])
    out = gla(*changed, chunk_size=CHUNK)
    torch.testing.assert_close(out[:, :t], base[:, :t], atol=0, rtol=0)
    assert not torch.allclose(out[:, t], base[:, t])


@pytest.mark.parametrize("split", [5, CHUNK, CHUNK + 3])
def test_packed_documents_equal_separate_runs(split):
    """Row 0 packs docs [0, split) and [split, T); row 1 is one doc. The initial state applies
    to the first document only; the final state is the last document's."""
    T = 2 * CHUNK + 7
    q_BTHK, k_BTHK, v_BTHV, g_BTHK = make_inputs(T)
    init = initial_state()
    doc_ids_BT = torch.zeros(B, T, dtype=torch.long)
    doc_ids_BT[0, split:] = 1
    o_BTHV, state_BHKV = gla(
        q_BTHK, k_BTHK, v_BTHV, g_BTHK, chunk_size=CHUNK, doc_ids_BT=doc_ids_BT,
        initial_state_BHKV=init, return_final_state=True,
    )
    first = (slice(0, 1), slice(0, split))
    second = (slice(0, 1), slice(split, T))
    o_first = gla(*(x[first] for x in (q_BTHK, k_BTHK, v_BTHV, g_BTHK)), chunk_size=CHUNK, initial_state_BHKV=init[:1])
    o_second, state_second = gla(
        *(x[second] for x in (q_BTHK, k_BTHK, v_BTHV, g_BTHK)), chunk_size=CHUNK, return_final_state=True
    )
    o_row1, state_row1 = gla(
        *(x[1:] for x in (q_BTHK, k_BTHK, v_BTHV, g_BTHK)), chunk_size=CHUNK,
        initial_state_BHKV=init[1:], return_final_state=True,
    )
    torch.testing.assert_close(o_BTHV[0, :split], o_first[0], **F64)
    torch.testing.assert_close(o_BTHV[0, split:], o_second[0], **F64)
    torch.testing.assert_close(state_BHKV[0], state_second[0], **F64)
    torch.testing.assert_close(o_BTHV[1], o_row1[0], **F64)
    torch.testing.assert_close(state_BHKV[1], state_row1[0], **F64)


def test_packed_grads_match_naive():
    T = 2 * CHUNK + 5
    doc_ids_BT = torch.tensor([[0] * 3 + [1] * CHUNK + [2] * (T - CHUNK - 3), [4] * (T - 1) + [9]])
    inputs = make_inputs(T)
    got = run_with_grads(gla, inputs, chunk_size=CHUNK, doc_ids_BT=doc_ids_BT, initial_state_BHKV=initial_state())
    want = run_with_grads(gla_naive, inputs, doc_ids_BT=doc_ids_BT, initial_state_BHKV=initial_state())
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, **F64)


def test_step_matches_naive_and_keeps_input_state():
    T = 5
    q_BTHK, k_BTHK, v_BTHV, g_BTHK = make_inputs(T)
    init = initial_state()
    want_BTHV, want_state = gla_naive(q_BTHK, k_BTHK, v_BTHV, g_BTHK, initial_state_BHKV=init, return_final_state=True)
    state_BHKV = init.clone()
    for t in range(T):
        o_BHV, new_state = gla_step(q_BTHK[:, t], k_BTHK[:, t], v_BTHV[:, t], g_BTHK[:, t], state_BHKV)
        torch.testing.assert_close(o_BHV, want_BTHV[:, t], **F64)
        state_BHKV = new_state
    torch.testing.assert_close(state_BHKV, want_state, **F64)
    torch.testing.assert_close(init, initial_state(), atol=0, rtol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_low_precision_inputs_keep_dtype_and_match_float64(dtype):
    """float32 compute from bf16/fp32 inputs; compared against float64 on the same rounded inputs."""
    inputs = tuple(x.to(dtype) for x in make_inputs(CHUNK + 9))
    o_BTHV, state_BHKV = gla(*inputs, chunk_size=CHUNK, return_final_state=True)
    assert o_BTHV.dtype == dtype and state_BHKV.dtype == torch.float32
    want = gla_naive(*(x.double() for x in inputs))
    tol = dict(atol=1e-5, rtol=1e-5) if dtype == torch.float32 else dict(atol=2e-2, rtol=2e-2)
    torch.testing.assert_close(o_BTHV.double(), want, **tol)


def test_bad_inputs_raise_value_error():
    q_BTHK, k_BTHK, v_BTHV, g_BTHK = make_inputs(4)
    with pytest.raises(ValueError, match="share one"):
        gla(q_BTHK, k_BTHK[..., :2], v_BTHV, g_BTHK)
    with pytest.raises(ValueError, match="every dim but the last"):
        gla(q_BTHK, k_BTHK, v_BTHV[:, :3], g_BTHK)
    with pytest.raises(ValueError, match="4 dims"):
        gla(q_BTHK[0], k_BTHK[0], v_BTHV[0], g_BTHK[0])
    with pytest.raises(ValueError, match="doc_ids_BT"):
        gla(q_BTHK, k_BTHK, v_BTHV, g_BTHK, doc_ids_BT=torch.zeros(B, 3, dtype=torch.long))
    with pytest.raises(ValueError, match="integer"):
        gla(q_BTHK, k_BTHK, v_BTHV, g_BTHK, doc_ids_BT=torch.zeros(B, 4))
    with pytest.raises(ValueError, match="initial_state_BHKV"):
        gla(q_BTHK, k_BTHK, v_BTHV, g_BTHK, initial_state_BHKV=torch.zeros(B, H, V, K))
    with pytest.raises(ValueError, match="chunk_size"):
        gla(q_BTHK, k_BTHK, v_BTHV, g_BTHK, chunk_size=0)
    with pytest.raises(ValueError, match="state_BHKV"):
        gla_step(q_BTHK[:, 0], k_BTHK[:, 0], v_BTHV[:, 0], g_BTHK[:, 0], torch.zeros(B, H, K))
