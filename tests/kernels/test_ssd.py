"""Parity tests for the SSD scan and the causal conv: chunked vs the naive recurrence (outputs
and gradients), causality, document packing, step vs scan, dtypes, input validation.

Shape legend: B batch, T time, H heads, P head dim, G groups, N state dim, C channels, K taps.
Tolerances: float64 comparisons use rtol=1e-9, atol=1e-10 (observed error ~1e-15: several
orders of headroom, yet any masking or decay bug shows up as O(1e-2) or more).
"""

import pytest
import torch
import torch.nn.functional as F

from braid.kernels.ssd import causal_conv1d, causal_conv1d_step, ssd, ssd_step
from braid.kernels.ssd.reference import ssd_naive

F64 = dict(rtol=1e-9, atol=1e-10)


def _inputs(B, T, H, P, G, N, *, dtype=torch.float64, seed=0, dt_scale=0.5, A_scale=3.0):
    gen = torch.Generator().manual_seed(seed)

    def randn(*shape):
        return torch.randn(*shape, generator=gen, dtype=torch.float64).to(dtype)

    return dict(
        x_BTHP=randn(B, T, H, P),
        dt_BTH=(torch.rand(B, T, H, generator=gen, dtype=torch.float64) * dt_scale + 0.01).to(dtype),
        A_H=-(torch.rand(H, generator=gen, dtype=torch.float64) * A_scale + 0.1).to(dtype),
        B_BTGN=randn(B, T, G, N),
        C_BTGN=randn(B, T, G, N),
        D_H=randn(H),
        initial_state_BHPN=randn(B, H, P, N),
    )


def _run_with_grads(fn, inputs, kwargs, seed=1):
    """Run fn, backprop fixed random cotangents of y and the final state; return outputs and grads."""
    leaves = {k: v.clone().requires_grad_(True) for k, v in inputs.items() if v is not None}
    y_BTHP, state_BHPN = fn(**leaves, **kwargs, return_final_state=True)
    gen = torch.Generator().manual_seed(seed)
    dy = torch.randn(y_BTHP.shape, generator=gen, dtype=y_BTHP.dtype)
    dstate = torch.randn(state_BHPN.shape, generator=gen, dtype=state_BHPN.dtype)
    grads = torch.autograd.grad((y_BTHP * dy).sum() + (state_BHPN * dstate).sum(), list(leaves.values()))
    return y_BTHP.detach(), state_BHPN.detach(), dict(zip(leaves, grads))


def _assert_parity(inputs, kwargs, **tol):
    y_ref, state_ref, grads_ref = _run_with_grads(ssd_naive, inputs, kwargs)
    y, state, grads = _run_with_grads(ssd, inputs, kwargs)
    torch.testing.assert_close(y, y_ref, **tol)
    torch.testing.assert_close(state, state_ref, **tol)
    for name in grads_ref:
        torch.testing.assert_close(grads[name], grads_ref[name], **tol, msg=lambda m, n=name: f"grad {n}: {m}")


SHAPES = [  # B, T, H, P, G, N, chunk
    (2, 1, 2, 3, 1, 4, 16),  # T=1
    (1, 63, 4, 2, 2, 3, 16),  # T=63, odd length
    (2, 17, 2, 3, 1, 4, 16),  # T=chunk+1
    (1, 48, 4, 2, 4, 2, 16),  # T a multiple of the chunk, one group per head
    (1, 20, 2, 2, 1, 3, 64),  # T shorter than the chunk
]


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"T{s[1]}_chunk{s[6]}_G{s[4]}")
@pytest.mark.parametrize("with_initial_state", [False, True])
@pytest.mark.parametrize("with_D", [False, True])
def test_chunked_matches_naive(shape, with_initial_state, with_D):
    B, T, H, P, G, N, chunk = shape
    inputs = _inputs(B, T, H, P, G, N)
    if not with_initial_state:
        inputs["initial_state_BHPN"] = None
    if not with_D:
        inputs["D_H"] = None
    _assert_parity(inputs, dict(chunk_size=chunk), **F64)


DOC_LAYOUTS = {  # lengths of consecutive documents in each row (T=40, chunk 8)
    "boundary_at_chunk_start": [[8, 16, 16], [24, 16]],
    "boundary_mid_chunk": [[5, 22, 13], [11, 29]],
    "single_token_docs": [[1, 1, 7, 1, 30], [39, 1]],
    "one_doc": [[40], [40]],
}


def _doc_ids(layout):
    return torch.stack([torch.repeat_interleave(torch.arange(len(row)), torch.tensor(row)) for row in layout])


@pytest.mark.parametrize("layout", DOC_LAYOUTS.values(), ids=DOC_LAYOUTS.keys())
@pytest.mark.parametrize("with_initial_state", [False, True])
def test_chunked_matches_naive_with_documents(layout, with_initial_state):
    inputs = _inputs(2, 40, 2, 3, 1, 4, seed=3)
    if not with_initial_state:
        inputs["initial_state_BHPN"] = None
    _assert_parity(inputs, dict(chunk_size=8, doc_ids_BT=_doc_ids(layout)), **F64)


@pytest.mark.parametrize("split", [1, 8, 13, 30])
def test_packed_documents_equal_separate_runs(split):
    T, chunk = 31, 8
    inputs = _inputs(1, T, 4, 2, 2, 3, seed=5)
    h0 = inputs.pop("initial_state_BHPN")
    doc_ids_BT = (torch.arange(T) >= split).long()[None] + 7
    y, state = ssd(**inputs, chunk_size=chunk, doc_ids_BT=doc_ids_BT, initial_state_BHPN=h0, return_final_state=True)

    def part(sl):
        return {k: v[:, sl] if v.ndim > 1 else v for k, v in inputs.items()}

    y_first = ssd(**part(slice(0, split)), chunk_size=chunk, initial_state_BHPN=h0)
    y_second, state_second = ssd(**part(slice(split, T)), chunk_size=chunk, return_final_state=True)
    torch.testing.assert_close(y[:, :split], y_first, **F64)
    torch.testing.assert_close(y[:, split:], y_second, **F64)
    torch.testing.assert_close(state, state_second, **F64)


@pytest.mark.parametrize("t", [0, 7, 8, 20])
@pytest.mark.parametrize("with_docs", [False, True])
def test_causality(t, with_docs):
    inputs = _inputs(1, 21, 2, 2, 1, 3, seed=7)
    kwargs = dict(chunk_size=8, doc_ids_BT=_doc_ids([[5, 16]]) if with_docs else None)
    y = ssd(**inputs, **kwargs)
    changed = dict(inputs)
    for name in ("x_BTHP", "dt_BTH", "B_BTGN", "C_BTGN"):
        changed[name] = inputs[name].clone()
        changed[name][:, t] += 1.0
    y_changed = ssd(**changed, **kwargs)
    assert torch.equal(y[:, :t], y_changed[:, :t])
    assert not torch.allclose(y[:, t], y_changed[:, t])


@pytest.mark.parametrize("prefill", [1, 9, 16])
def test_steps_after_prefill_match_scan(prefill):
    T = 20
    inputs = _inputs(2, T, 4, 2, 2, 3, seed=9)
    y_full = ssd(**inputs, chunk_size=8)
    seq = {k: v for k, v in inputs.items() if v.ndim > 1 and k != "initial_state_BHPN"}
    y_pre, state = ssd(
        **{k: v[:, :prefill] for k, v in seq.items()},
        A_H=inputs["A_H"],
        D_H=inputs["D_H"],
        initial_state_BHPN=inputs["initial_state_BHPN"],
        chunk_size=8,
        return_final_state=True,
    )
    ys = [y_pre]
    for t in range(prefill, T):
        x_BHP, dt_BH, B_BGN, C_BGN = (seq[k][:, t] for k in ("x_BTHP", "dt_BTH", "B_BTGN", "C_BTGN"))
        y_BHP, state = ssd_step(x_BHP, dt_BH, inputs["A_H"], B_BGN, C_BGN, state, inputs["D_H"])
        ys.append(y_BHP[:, None])
    torch.testing.assert_close(torch.cat(ys, dim=1), y_full, **F64)


def test_strong_decay_float32_stays_accurate():
    """Decays of exp(-16) per token with boundaries everywhere: no NaN/inf, float32 ~ float64.

    Tolerance 1e-4 absolute: float32 rounding of O(1)-magnitude outputs, with no headroom for
    the catastrophic cancellation a -inf/huge log-decay at boundaries would cause.
    """
    T = 96
    inputs = _inputs(1, T, 2, 2, 1, 3, seed=11, dt_scale=4.0, A_scale=16.0)
    inputs["initial_state_BHPN"] = None
    doc_ids_BT = _doc_ids([[3, 29, 1, 40, 23]])
    y64 = ssd_naive(**inputs, doc_ids_BT=doc_ids_BT)
    y32 = ssd(**{k: v.float() if v is not None else v for k, v in inputs.items()}, chunk_size=32, doc_ids_BT=doc_ids_BT)
    assert torch.isfinite(y32).all()
    torch.testing.assert_close(y32.double(), y64, rtol=1e-4, atol=1e-4)


def test_dtypes():
    inputs = _inputs(1, 10, 2, 2, 1, 3, dtype=torch.bfloat16)
    y, state = ssd(**inputs, chunk_size=4, return_final_state=True)
    assert y.dtype == torch.bfloat16 and state.dtype == torch.float32
    y_step, state_step = ssd_step(
        inputs["x_BTHP"][:, 0], inputs["dt_BTH"][:, 0], inputs["A_H"], inputs["B_BTGN"][:, 0],
        inputs["C_BTGN"][:, 0], state,
    )
    assert y_step.dtype == torch.bfloat16 and state_step.dtype == torch.float32


BAD_INPUTS = {
    "heads_not_multiple_of_groups": (dict(B_BTGN=torch.zeros(1, 5, 3, 4), C_BTGN=torch.zeros(1, 5, 3, 4)), "multiple"),
    "dt_shape": (dict(dt_BTH=torch.zeros(1, 5, 3)), "dt must have shape"),
    "C_shape": (dict(C_BTGN=torch.zeros(1, 5, 1, 3)), "C must have the same shape"),
    "A_shape": (dict(A_H=torch.zeros(2, 1)), "A must have shape"),
    "doc_ids_float": (dict(doc_ids_BT=torch.zeros(1, 5)), "integer"),
    "initial_state_shape": (dict(initial_state_BHPN=torch.zeros(1, 4, 3, 5)), "initial_state must have shape"),
    "chunk_size": (dict(chunk_size=0), "chunk_size"),
}


@pytest.mark.parametrize("bad", BAD_INPUTS.values(), ids=BAD_INPUTS.keys())
def test_ssd_rejects_bad_inputs(bad):
    changes, match = bad
    inputs = dict(
        x_BTHP=torch.zeros(1, 5, 4, 3),
        dt_BTH=torch.zeros(1, 5, 4),
        A_H=torch.zeros(4),
        B_BTGN=torch.zeros(1, 5, 2, 4),
        C_BTGN=torch.zeros(1, 5, 2, 4),
    )
    inputs.update(changes)
    with pytest.raises(ValueError, match=match):
        ssd(**inputs)


def _conv_inputs(B, T, C, K, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return dict(
        x_BTC=torch.randn(B, T, C, generator=gen, dtype=torch.float64),
        weight_CK=torch.randn(C, K, generator=gen, dtype=torch.float64),
        bias_C=torch.randn(C, generator=gen, dtype=torch.float64),
        initial_state_BCK=torch.randn(B, C, K - 1, generator=gen, dtype=torch.float64),
    )


@pytest.mark.parametrize("K", [1, 2, 4])
@pytest.mark.parametrize("T", [1, 2, 9])
@pytest.mark.parametrize("activation", [None, "silu"])
def test_conv_matches_torch_conv1d(K, T, activation):
    inp = _conv_inputs(2, T, 3, K)
    leaves = {k: v.clone().requires_grad_(True) for k, v in inp.items()}
    y, final = causal_conv1d(**leaves, activation=activation, return_final_state=True)
    ref_leaves = {k: v.clone().requires_grad_(True) for k, v in inp.items()}
    padded_BCT = torch.cat([ref_leaves["initial_state_BCK"], ref_leaves["x_BTC"].transpose(1, 2)], dim=-1)
    y_ref = F.conv1d(padded_BCT, ref_leaves["weight_CK"][:, None], ref_leaves["bias_C"], groups=3).transpose(1, 2)
    y_ref = F.silu(y_ref) if activation == "silu" else y_ref
    torch.testing.assert_close(y, y_ref, **F64)
    torch.testing.assert_close(final, padded_BCT[..., T:].detach(), **F64)
    dy = torch.randn_like(y)
    grads = torch.autograd.grad((y * dy).sum(), list(leaves.values()))
    grads_ref = torch.autograd.grad((y_ref * dy).sum(), list(ref_leaves.values()))
    for g, g_ref in zip(grads, grads_ref):
        torch.testing.assert_close(g, g_ref, **F64)


@pytest.mark.parametrize("split", [1, 2, 5])
def test_conv_packed_documents_equal_separate_runs(split):
    inp = _conv_inputs(1, 7, 3, 4, seed=2)
    doc_ids_BT = (torch.arange(7) >= split).long()[None]
    y, final = causal_conv1d(**inp, doc_ids_BT=doc_ids_BT, return_final_state=True)
    w, b, h0 = inp["weight_CK"], inp["bias_C"], inp["initial_state_BCK"]
    y_first = causal_conv1d(inp["x_BTC"][:, :split], w, b, initial_state_BCK=h0)
    y_second, final_second = causal_conv1d(inp["x_BTC"][:, split:], w, b, return_final_state=True)
    torch.testing.assert_close(y[:, :split], y_first, **F64)
    torch.testing.assert_close(y[:, split:], y_second, **F64)
    torch.testing.assert_close(final, final_second, **F64)


def test_conv_steps_match_full():
    inp = _conv_inputs(2, 6, 3, 4, seed=4)
    y_full = causal_conv1d(**inp)
    state = inp["initial_state_BCK"]
    for t in range(6):
        y_BC, state = causal_conv1d_step(inp["x_BTC"][:, t], state, inp["weight_CK"], inp["bias_C"], "silu")
        torch.testing.assert_close(y_BC, y_full[:, t], **F64)
    torch.testing.assert_close(state, inp["x_BTC"][:, -3:].transpose(1, 2), **F64)


def test_conv_rejects_bad_inputs():
    inp = _conv_inputs(1, 4, 3, 4)
    with pytest.raises(ValueError, match="K-1"):
        causal_conv1d(inp["x_BTC"], inp["weight_CK"], initial_state_BCK=torch.zeros(1, 3, 4, dtype=torch.float64))
    with pytest.raises(ValueError, match="activation"):
        causal_conv1d(inp["x_BTC"], inp["weight_CK"], activation="relu")
    with pytest.raises(ValueError, match="weight must have shape"):
        causal_conv1d(inp["x_BTC"], inp["weight_CK"][:2])
