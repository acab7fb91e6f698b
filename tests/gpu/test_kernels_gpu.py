"""GPU parity tests: every fast backend against its reference, outputs and gradients, float32
and bfloat16, odd lengths (T = 1, 63, 1000), packed documents, initial and final states; and
the whole model (tiny-hybrid) with fast kernels against BRAID_KERNELS=reference.

Run on the device machine: `pytest -m gpu tests/gpu -q` (skipped without CUDA).

Shapes use the head dims of the hybrid-374m benchmark (SSD H=32, P=64, N=128; GLA H=8,
K=64, V=128) so that fla autotunes once per machine for tests and benchmarks together.

Legend: B batch, T time, H heads, P head dim, G groups, N state dim, K key dim, V value dim,
C channels, D model dim, J kv heads, E experts, F expert width.

Error metric: relative_error(a, b) = ||a - b|| / ||b|| (Frobenius) per output and per gradient, the
reference computed in float32 from the same (possibly bf16) inputs.
Tolerances: FP32_TOL = 5e-3: fast kernels may run float32 matmuls in TF32 (fla does on
Hopper; 10-bit mantissa, ~1e-3 relative per product, averaging down over sums). BF16_TOL =
3e-2: bf16 inputs, bf16 intermediates (v = x * dt, kernel outputs) and bf16 outputs, each a
2**-8 relative rounding. Element-wise kernels (conv, norms, SwiGLU) use EXACT_FP32 = 1e-5
(float32 arithmetic in another order). The whole model under bf16 autocast uses
MODEL_BF16_TOL = 5e-2: two bf16 computations of six layers, forward and backward, compound
their per-op 2**-8 roundings differently. A masking or state bug is an O(0.1-1) error.
"""

from __future__ import annotations

import dataclasses
import sys

import pytest
import torch
import torch.nn.functional as F

from braid.configs import model_config
from braid.kernels.attention import FLEX_MIN_LEN, attention
from braid.kernels.attention.reference import attention_reference
from braid.kernels.backend import available, pick, unavailable_reason, use_backends
from braid.kernels.cross_entropy import linear_cross_entropy
from braid.kernels.cross_entropy.reference import linear_cross_entropy_reference
from braid.kernels.gla import gla, gla_step
from braid.kernels.gla.reference import gla_chunked, gla_step_reference
from braid.kernels.moe import grouped_swiglu, weighted_combine
from braid.kernels.moe.reference import grouped_swiglu_reference
from braid.kernels.norm import gated_rms_norm, rms_norm
from braid.kernels.norm.reference import gated_rms_norm_reference, rms_norm_reference
from braid.kernels.ssd import causal_conv1d, ssd, ssd_step
from braid.kernels.ssd.conv import causal_conv1d_reference
from braid.kernels.ssd.reference import ssd_chunked, ssd_step_reference
from braid.kernels.swiglu import silu_mul, silu_mul_stacked
from braid.kernels.swiglu.reference import silu_mul_reference, silu_mul_stacked_reference
from braid.model import build_model
from tests.helpers import relative_error

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]

FP32_TOL = 5e-3
BF16_TOL = 3e-2
EXACT_FP32 = 1e-5
MODEL_BF16_TOL = 5e-2
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
LENGTHS = (1, 63, 1000)
# (dtype, T, packed documents, initial state): odd lengths, documents and states. Kept few,
# float32 fewest, because every new kernel specialisation (dtype, state, varlen) compiles.
_BF16_SEQ = [(1, False, False), (1, True, True), (63, False, True), (63, True, True),
             (1000, False, False), (1000, True, False), (1000, True, True)]
_FP32_SEQ = [(63, True, True), (1000, False, False)]
SEQ_CASES = [(torch.bfloat16, *case) for case in _BF16_SEQ] + [(torch.float32, *case) for case in _FP32_SEQ]
SEQ_IDS = [
    f"{str(dtype)[6:]}_T{T}_{'docs' if docs else 'rows'}_{'state' if state else 'zero'}"
    for dtype, T, docs, state in SEQ_CASES
]


def _tol(dtype: torch.dtype, exact_fp32: bool = False) -> float:
    if dtype == torch.bfloat16:
        return BF16_TOL
    return EXACT_FP32 if exact_fp32 else FP32_TOL


def assert_rel_close(actual, expected, tol: float, name: str, floor: float = 1e-30) -> None:
    """relative_error(actual, expected) <= tol, the norm of `expected` taken as at least `floor`."""
    assert actual.shape == expected.shape, f"{name}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    assert torch.isfinite(actual).all(), f"{name}: non-finite values"
    error = relative_error(actual, expected, floor)
    assert error <= tol, f"{name}: relative error {error:.2e} > {tol:.0e}"


def doc_ids_for(B: int, T: int, seed: int = 0) -> torch.Tensor:
    """Random contiguous documents (mean length ~T/4, some of length 1), ids unique per row."""
    gen = torch.Generator().manual_seed(seed)
    starts_BT = torch.rand(B, T, generator=gen) < 4.0 / max(T, 1)
    starts_BT[:, 0] = True
    if T > 3:
        starts_BT[:, 2] = starts_BT[:, 3] = True  # a one-token document
    return starts_BT.cumsum(dim=1).cuda()


def run_with_grads(fn, leaves: dict, seed: int = 1):
    """fn(**leaves) -> tensor or tuple; returns the outputs and d(sum(out * cotangent))/d(leaf)."""
    leaves = {k: v.detach().clone().requires_grad_(v.is_floating_point()) for k, v in leaves.items() if v is not None}
    outs = fn(**leaves)
    outs = outs if isinstance(outs, tuple) else (outs,)
    gen = torch.Generator(device="cuda").manual_seed(seed)
    loss = sum((o.float() * torch.randn(o.shape, generator=gen, device="cuda")).sum() for o in outs)
    wrt = [v for v in leaves.values() if v.requires_grad]
    grads = torch.autograd.grad(loss, wrt)
    names = [k for k, v in leaves.items() if v.requires_grad]
    return [o.detach() for o in outs], dict(zip(names, grads))


def assert_parity(fast, ref, tol: float, grad_tol: float | None = None, zero_grads: tuple[str, ...] = ()) -> None:
    """Outputs and gradients relatively close. `zero_grads` names gradients that are exactly 0
    in exact arithmetic (e.g. dq of attention over one key: the softmax of one score has no
    gradient); a relative error is meaningless there, so both the fast and the reference
    gradient must be below tol times the call's largest other reference gradient norm."""
    (outs, grads), (ref_outs, ref_grads) = fast, ref
    grad_tol = tol if grad_tol is None else grad_tol
    for i, (out, ref_out) in enumerate(zip(outs, ref_outs, strict=True)):
        assert out.dtype == ref_out.dtype, f"output {i}: dtype {out.dtype} != {ref_out.dtype}"
        assert_rel_close(out, ref_out, tol, f"output {i}")
    scale = max(float(g.double().norm()) for name, g in ref_grads.items() if name not in zero_grads)
    for name, ref_grad in ref_grads.items():
        if name in zero_grads:
            for which, g in (("fast", grads[name]), ("reference", ref_grad)):
                size = float(g.double().norm())
                assert size <= grad_tol * scale, f"grad {name} ({which}) should be ~0: {size:.2e} vs scale {scale:.2e}"
        else:
            assert_rel_close(grads[name], ref_grad, grad_tol, f"grad {name}")


def require(op: str, backend: str) -> None:
    if not available(op, backend):
        pytest.skip(f"{backend} for {op} is unavailable: {unavailable_reason(op, backend)}")


# The whole model first: it exercises every fast path together (and is the one result to
# keep if the stage's time box cuts the run short).


def tiny_hybrid_bench_dims():
    """tiny-hybrid with the benchmark's fla head dims (SSD P=64, N=128; GLA K=64, V=128)."""
    cfg = model_config("tiny-hybrid")
    return dataclasses.replace(
        cfg,
        mamba2=dataclasses.replace(cfg.mamba2, head_dim=64, d_state=128, n_groups=2),
        gla=dataclasses.replace(cfg.gla, num_heads=1),
    )


def build_tiny_hybrid(train: bool):
    """On CUDA, with router weights scaled up so that every top-k choice has a margin far
    above kernel rounding: a flipped expert choice is a discrete jump no tolerance should absorb."""
    cfg = tiny_hybrid_bench_dims()
    model = build_model(cfg, device="cuda", seed=0).train(train)
    with torch.no_grad():
        for block in model.layers.values():
            if block.spec.ffn == "moe":
                block.ffn.router.weight.mul_(50.0)
    return cfg, model


def model_loss_and_grads(model, tokens_BT, doc_ids_BT, autocast: bool):
    model.zero_grad(set_to_none=True)
    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=autocast):
        logits_BTV, aux = model(tokens_BT, doc_ids_BT, return_aux=True)
        loss = F.cross_entropy(logits_BTV.float()[:, :-1].flatten(0, 1), tokens_BT[:, 1:].flatten())
        loss = loss + sum(aux.values())
    loss.backward()
    return logits_BTV.detach().float(), {n: p.grad.detach().clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("autocast", [False, True], ids=["fp32", "bf16_autocast"])
@pytest.mark.parametrize("docs", [False, True], ids=["rows", "docs"])
def test_whole_model_fast_vs_reference(autocast, docs):
    torch.manual_seed(0)
    cfg, model = build_tiny_hybrid(train=True)
    B, T = 2, 300
    tokens_BT = torch.randint(0, cfg.vocab_size, (B, T), device="cuda")
    doc_ids_BT = doc_ids_for(B, T) if docs else None
    logits, grads = model_loss_and_grads(model, tokens_BT, doc_ids_BT, autocast)
    with use_backends("reference"):
        ref_logits, ref_grads = model_loss_and_grads(model, tokens_BT, doc_ids_BT, autocast)
    tol = MODEL_BF16_TOL if autocast else FP32_TOL
    assert_rel_close(logits, ref_logits, tol, "logits")
    # A parameter whose gradient is (nearly) zero, e.g. an expert no token chose, is held to
    # the scale of the whole gradient instead of its own.
    floor = 1e-4 * torch.cat([g.flatten().double() for g in ref_grads.values()]).norm().item()
    for name, ref_grad in ref_grads.items():
        assert_rel_close(grads[name], ref_grad, tol, f"grad {name}", floor=floor)


def assert_causal(forward, vocab_size: int, B: int, T: int, cut: int, doc_ids_BT=None) -> None:
    """Changing the tokens from position `cut` on (train mode, bf16 autocast, no grad) leaves
    every logit before it bit-identical and moves a later one by more than 0.1."""
    tokens_BT = torch.randint(0, vocab_size, (B, T), device="cuda")
    changed_BT = tokens_BT.clone()
    changed_BT[:, cut:] = torch.randint(0, vocab_size, (B, T - cut), device="cuda")
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
        logits, changed = (forward(t, doc_ids_BT).float() for t in (tokens_BT, changed_BT))
    assert torch.equal(logits[:, :cut], changed[:, :cut])
    assert (logits[:, cut:] - changed[:, cut:]).abs().max() > 0.1  # the change reached the later logits


@pytest.mark.parametrize("docs", [False, True], ids=["rows", "docs"])
def test_whole_model_is_causal_on_fast_kernels(docs):
    """Changing the tokens from position `cut` on leaves every logit before it bit-identical
    (train mode, bf16 autocast): no fast kernel reads ahead, not even by rounding."""
    torch.manual_seed(0)
    cfg, model = build_tiny_hybrid(train=True)
    B, T = 2, 300
    assert_causal(model, cfg.vocab_size, B, T, cut=170, doc_ids_BT=doc_ids_for(B, T) if docs else None)


@pytest.mark.slow
@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
def test_bench_hybrid_is_causal_at_full_size(compiled):
    """hybrid-374m at its benchmark length (B1 T8192, train mode, bf16 autocast): changing the
    tokens from a cut one past a chunk boundary (4097) leaves every earlier logit bit-identical,
    with the kernels at the sizes and tile counts the benchmark trains with. (On a repeated
    random batch its loss falls far faster than llama-374m's: Mamba-2 memorises it; this rules
    out a read-ahead.)"""
    torch.manual_seed(0)
    cfg = model_config("hybrid-374m")
    model = build_model(cfg, device="cuda", seed=0).train()
    assert_causal(torch.compile(model) if compiled else model, cfg.vocab_size, 1, 8192, cut=4097)


@pytest.mark.parametrize("docs", [False, True], ids=["rows", "docs"])
def test_blocks_compile_without_graph_breaks(docs):
    """Every block of the tiny hybrid compiles as one graph (the fast kernels are custom ops,
    not graph breaks; with documents only the segment table is computed outside) and trains
    to the eager model's loss and gradients under bf16 autocast."""
    torch.manual_seed(0)
    cfg, model = build_tiny_hybrid(train=True)
    B, T = 2, 300
    tokens_BT = torch.randint(0, cfg.vocab_size, (B, T), device="cuda")
    doc_ids_BT = doc_ids_for(B, T) if docs else None
    logits, grads = model_loss_and_grads(model, tokens_BT, doc_ids_BT, autocast=True)
    torch._dynamo.reset()

    def under_autocast(block):
        def run(x_BTD):
            with torch.autocast("cuda", dtype=torch.bfloat16):
                return block(x_BTD, None)

        return run

    if not docs:
        x_BTD = torch.randn(B, T, cfg.d_model, device="cuda")
        explain = [torch._dynamo.explain(under_autocast(block))(x_BTD) for block in model.layers.values()]
        breaks = {
            f"{b.reason.splitlines()[0][:120]} at {b.user_stack[-1].filename}:{b.user_stack[-1].lineno}"
            for e in explain for b in e.break_reasons if b.user_stack
        }
        assert [e.graph_break_count for e in explain] == [0] * len(explain), sorted(breaks)
    for block in model.layers.values():
        block.compile(fullgraph=not docs)
    compiled_logits, compiled_grads = model_loss_and_grads(model, tokens_BT, doc_ids_BT, autocast=True)
    assert_rel_close(compiled_logits, logits, MODEL_BF16_TOL, "logits")
    floor = 1e-4 * torch.cat([g.flatten().double() for g in grads.values()]).norm().item()
    for name, grad in grads.items():
        assert_rel_close(compiled_grads[name], grad, MODEL_BF16_TOL, f"grad {name}", floor=floor)


def test_whole_model_decode_matches_full_forward():
    """Prefill then one-token steps through the fast step kernels equal the full forward."""
    torch.manual_seed(0)
    cfg, model = build_tiny_hybrid(train=False)
    tokens_BT = torch.randint(0, cfg.vocab_size, (2, 40), device="cuda")
    with torch.no_grad():
        full_BTV = model(tokens_BT)
        caches = model.new_caches(2, 40)
        steps = [model(tokens_BT[:, :37], caches=caches)]
        steps += [model(tokens_BT[:, t : t + 1], caches=caches) for t in range(37, 40)]
    assert_rel_close(torch.cat(steps, dim=1), full_BTV, FP32_TOL, "decoded logits")


# SSD (Mamba-2) and its conv.


def ssd_inputs(B, T, dtype, *, H=32, P=64, G=1, N=128, with_state=False, seed=0):
    gen = torch.Generator(device="cuda").manual_seed(seed)

    def randn(*shape, scale=1.0):
        return (torch.randn(*shape, generator=gen, device="cuda") * scale).to(dtype)

    return dict(
        x_BTHP=randn(B, T, H, P),
        dt_BTH=F.softplus(torch.randn(B, T, H, generator=gen, device="cuda") - 3.0),  # float32, as the model
        A_H=-torch.exp(torch.rand(H, generator=gen, device="cuda") * 2.7),
        B_BTGN=randn(B, T, G, N, scale=N**-0.5),
        C_BTGN=randn(B, T, G, N, scale=N**-0.5),
        D_H=torch.randn(H, generator=gen, device="cuda"),
        initial_state_BHPN=torch.randn(B, H, P, N, generator=gen, device="cuda") if with_state else None,
    )


@pytest.mark.parametrize("backend", ["fla", "mamba_ssm", "mamba_ssm+pass"])
@pytest.mark.parametrize("dtype, T, docs, with_state", SEQ_CASES, ids=SEQ_IDS)
def test_ssd(backend, dtype, T, docs, with_state):
    """"mamba_ssm+pass": mamba_ssm's SSD with braid's pass over the chunks (ssd_pass=triton)."""
    backend, _, with_pass = backend.partition("+")
    require("ssd", backend)
    if with_pass:
        require("ssd_pass", "triton")
    if backend == "mamba_ssm" and dtype == torch.float32:
        pytest.skip("mamba_ssm is benchmarked in bf16; its float32 path is not used here")
    if backend == "mamba_ssm" and docs and with_state:
        pytest.skip("mamba_ssm does not carry an initial state with documents (the dispatcher excludes it)")
    B = 2
    leaves = ssd_inputs(B, T, dtype, with_state=with_state)
    doc_ids = doc_ids_for(B, T) if docs else None
    kwargs = dict(chunk_size=64, doc_ids_BT=doc_ids, return_final_state=True)
    with use_backends(f"ssd={backend},ssd_pass={'triton' if with_pass else 'reference'}"):
        assert pick("ssd", *leaves.values()) == backend
        fast = run_with_grads(lambda **kw: ssd(**kw, **kwargs), leaves)
    ref = run_with_grads(lambda **kw: ssd_chunked(**kw, **kwargs), leaves)
    assert_parity(fast, ref, _tol(dtype))


# braid's mamba_ssm ops keep the forward's chunk states for the backward instead of recomputing
# them; that must leave mamba_ssm's numbers unchanged. LIBRARY_TOL: the same kernels in the
# same order, but some of them add partial sums with atomics (order varies run to run).
LIBRARY_TOL = 1e-5


@pytest.mark.parametrize("docs, with_state", [(False, False), (False, True), (True, False)],
                         ids=["rows", "state", "docs"])
def test_ssd_mamba_ssm_matches_the_library(docs, with_state):
    require("ssd", "mamba_ssm")
    from braid.kernels.ssd.mamba_ssm import _combined
    from braid.kernels.varlen import segment_index_BT

    B, T, chunk = 2, 1000, 64
    leaves = ssd_inputs(B, T, torch.bfloat16, with_state=with_state)
    doc_ids = doc_ids_for(B, T) if docs else None
    with use_backends("ssd=mamba_ssm,ssd_pass=reference"):
        ours = run_with_grads(lambda **kw: ssd(**kw, chunk_size=chunk, doc_ids_BT=doc_ids, return_final_state=True),
                              leaves)
    seq_idx = None if doc_ids is None else segment_index_BT(doc_ids)

    def library(x_BTHP, dt_BTH, A_H, B_BTGN, C_BTGN, D_H, initial_state_BHPN=None):
        return _combined.mamba_chunk_scan_combined(
            x_BTHP, dt_BTH, A_H, B_BTGN, C_BTGN, chunk, D=D_H, initial_states=initial_state_BHPN,
            seq_idx=seq_idx, return_final_states=True,
        )

    theirs = run_with_grads(library, leaves)
    assert_parity(ours, theirs, LIBRARY_TOL)


@pytest.mark.parametrize("docs, with_state", [(False, False), (False, True), (True, False), (True, True)],
                         ids=["rows", "state", "docs", "docs+state"])
def test_ssd_pass_triton_matches_mamba_ssm(docs, with_state):
    """braid's pass over the chunks (ssd_pass=triton) against mamba_ssm's _state_passing_fwd and
    _state_passing_bwd at hybrid-374m's shape (64 chunks of 128, H32, P64 x N128 states):
    float32 outputs within LIBRARY_TOL (the scan groups the float32 products in another
    order), bf16 outputs within one bf16 rounding (2^-8) of mamba_ssm's float32 ones, and
    bit-identical from run to run."""
    require("ssd", "mamba_ssm")
    require("ssd_pass", "triton")
    from braid.kernels.ssd.mamba_ssm import _combined
    from braid.kernels.ssd.pass_triton import state_pass, state_pass_backward
    from braid.kernels.varlen import segment_index_BT

    gen = torch.Generator(device="cuda").manual_seed(11)
    B, C, H, D, L = 2, 64, 32, 64 * 128, 128
    T = C * L - 37 if docs else C * L  # documents: a partial last chunk too
    seq_idx = segment_index_BT(doc_ids_for(B, T)) if docs else None

    def randn(*shape):
        return torch.randn(*shape, generator=gen, device="cuda")

    states, dbefore = randn(B, C, H, D), randn(B, C, H, D)
    dA_last = (-torch.rand(B, H, C, L, generator=gen, device="cuda").cumsum(-1) / L)[..., -1]  # a strided view
    initial, dfinal = (randn(B, H, D), randn(B, H, D)) if with_state else (None, None)
    before, final = _combined._state_passing_fwd(states, dA_last, initial_states=initial, seq_idx=seq_idx,
                                                 chunk_size=L)
    theirs = _combined._state_passing_bwd(
        before, dA_last, dbefore, dfinal_states=dfinal, seq_idx=seq_idx, chunk_size=L,
        has_initial_states=with_state, dstates_dtype=torch.float32, states_dtype=torch.float32,
    )

    def run(dtype):
        ours_before, ours_final = state_pass(states, dA_last, initial, seq_idx, L)
        return ours_before, ours_final, *state_pass_backward(ours_before, dA_last, dbefore, dfinal, seq_idx,
                                                             with_state, dtype, dtype, L)

    ours, again = run(torch.float32), run(torch.float32)
    assert all(a is b is None or torch.equal(a, b) for a, b in zip(ours, again))
    for name, a, b in zip(("before", "final", "dstates", "ddA", "dinitial"), ours, (before, final, *theirs)):
        if b is None:
            assert a is None, name
            continue
        err = relative_error(a, b)
        print(f"{name}: {err:.2e} relative to mamba_ssm's")
        assert err < LIBRARY_TOL, (name, err)
    low = run(torch.bfloat16)
    for name, a, b in (("dstates bf16", low[2], theirs[0]), ("before bf16", low[5], before),
                       ("dinitial bf16", low[4], theirs[2])):
        if b is None:
            continue
        assert a.dtype == torch.bfloat16, name
        err = relative_error(a, b)
        print(f"{name}: {err:.2e} relative to mamba_ssm's float32")
        assert err < 2**-8, (name, err)


@pytest.mark.parametrize("docs", [False, True], ids=["rows", "docs"])
def test_ssd_mamba_ssm_added_configs(docs):
    """Each config braid adds to mamba_ssm's autotune lists (EXTRA_CONFIGS), run alone, gives
    the reference's outputs and gradients."""
    require("ssd", "mamba_ssm")
    from braid.kernels.ssd import mamba_ssm as ours

    kernels = {key: getattr(sys.modules[f"mamba_ssm.ops.triton.{key[0]}"], key[1]) for key in ours.EXTRA_CONFIGS}
    if any(len(kernel.configs) == 1 for kernel in kernels.values()):
        pytest.skip("mamba_ssm's deterministic mode keeps one config per kernel; braid adds none")
    saved = {key: (kernel.configs, kernel.cache) for key, kernel in kernels.items()}
    try:
        for key, kernel in kernels.items():
            for kwargs, num_warps, num_stages in ours.EXTRA_CONFIGS[key]:
                added = [c for c in kernel.configs
                         if (c.kwargs, c.num_warps, c.num_stages) == (kwargs, num_warps, num_stages)]
                assert len(added) == 1, f"{key} lacks its added config"
                kernel.configs, kernel.cache = added, {}
        B, T = 2, 1000
        leaves = ssd_inputs(B, T, torch.bfloat16, with_state=False)
        kwargs = dict(chunk_size=128, doc_ids_BT=doc_ids_for(B, T) if docs else None, return_final_state=True)
        with use_backends("ssd=mamba_ssm"):
            fast = run_with_grads(lambda **kw: ssd(**kw, **kwargs), leaves)
        ref = run_with_grads(lambda **kw: ssd_chunked(**kw, **kwargs), leaves)
        assert_parity(fast, ref, _tol(torch.bfloat16))
    finally:
        for key, (configs, cache) in saved.items():
            kernels[key].configs, kernels[key].cache = configs, cache


def test_ssd_groups_with_fla():
    require("ssd", "fla")
    leaves = ssd_inputs(2, 200, torch.float32, H=8, G=4, with_state=True)
    kwargs = dict(doc_ids_BT=doc_ids_for(2, 200), return_final_state=True)
    with use_backends("ssd=fla"):
        fast = run_with_grads(lambda **kw: ssd(**kw, **kwargs), leaves)
    ref = run_with_grads(lambda **kw: ssd_chunked(**kw, **kwargs), leaves)
    assert_parity(fast, ref, FP32_TOL)


@pytest.mark.parametrize("dtype", list(DTYPES.values()), ids=list(DTYPES))
def test_ssd_step(dtype):
    require("ssd_step", "fla")
    seq = ssd_inputs(3, 1, dtype, G=2, with_state=True)
    args = (seq["x_BTHP"][:, 0], seq["dt_BTH"][:, 0], seq["A_H"], seq["B_BTGN"][:, 0], seq["C_BTGN"][:, 0])
    state_BHPN, D_H = seq["initial_state_BHPN"], seq["D_H"]
    with use_backends("ssd_step=fla"):
        assert pick("ssd_step", *args, state_BHPN) == "fla"
        y, new_state = ssd_step(*args, state_BHPN, D_H)
    y_ref, new_state_ref = ssd_step_reference(*args, state_BHPN, D_H)
    assert y.dtype == dtype and new_state.dtype == torch.float32
    assert_rel_close(y, y_ref, _tol(dtype), "y")
    assert_rel_close(new_state, new_state_ref, _tol(dtype), "state")


# fla's conv with every case; braid's own (conv_triton) runs sequences without states only.
CONV_CASES = [("fla", *case) for case in SEQ_CASES] + [("triton", *case) for case in SEQ_CASES if not case[3]]
CONV_IDS = [f"fla_{i}" for i in SEQ_IDS] + [f"triton_{i}" for i, case in zip(SEQ_IDS, SEQ_CASES) if not case[3]]


@pytest.mark.parametrize("backend, dtype, T, docs, with_state", CONV_CASES, ids=CONV_IDS)
def test_causal_conv1d(backend, dtype, T, docs, with_state):
    require("conv", backend)
    B, C, K = 2, 2304, 4  # Mamba-2's fused x/B/C width in hybrid-374m
    gen = torch.Generator(device="cuda").manual_seed(0)
    leaves = dict(
        x_BTC=torch.randn(B, T, C, generator=gen, device="cuda").to(dtype),
        weight_CK=torch.randn(C, K, generator=gen, device="cuda") * 0.5,
        bias_C=torch.randn(C, generator=gen, device="cuda"),
        initial_state_BCK=torch.randn(B, C, K - 1, generator=gen, device="cuda").to(dtype) if with_state else None,
    )
    kwargs = dict(doc_ids_BT=doc_ids_for(B, T) if docs else None, activation="silu",
                  return_final_state=backend == "fla")
    with use_backends(f"conv={backend}"):
        assert pick("conv", *leaves.values()) == backend
        fast = run_with_grads(lambda **kw: causal_conv1d(**kw, **kwargs), leaves)
    ref = run_with_grads(lambda **kw: causal_conv1d_reference(**kw, **kwargs), leaves)
    assert_parity(fast, ref, _tol(dtype, exact_fp32=True))


@pytest.mark.parametrize("docs", [False, True], ids=["rows", "documents"])
def test_conv_backward_tiles_agree(docs):
    """braid's conv backward with its first pass walking tiles (BWD_STEPS > 1) and the second on
    tiles of its own gives the defaults' dx bit for bit (the same dpre, the same taps in order) and
    their weight and bias gradients in float32 (partials grouped otherwise)."""
    require("conv", "triton")
    from braid.kernels.ssd.conv_triton import conv_backward

    B, T, C, K = 2, 8192, 2304, 4
    gen = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(B, T, C, generator=gen, device="cuda").to(torch.bfloat16)
    dy = torch.randn(B, T, C, generator=gen, device="cuda").to(torch.bfloat16)
    weight, bias = torch.randn(C, K, generator=gen, device="cuda") * 0.5, torch.randn(C, generator=gen, device="cuda")
    doc_ids = doc_ids_for(B, T) if docs else None
    want = conv_backward(dy, x, weight, bias, doc_ids, True)
    for tiles in (dict(block_t=16, block_c=64, num_warps=4, steps=16), dict(block_t=32, block_c=64, num_warps=8,
                                                                              steps=8, dx_tiles=(64, 64, 8))):
        dx, dw, db = conv_backward(dy, x, weight, bias, doc_ids, True, **tiles)
        assert torch.equal(dx, want[0]), tiles
        assert_rel_close(dw, want[1], EXACT_FP32, "dweight")
        assert_rel_close(db, want[2], EXACT_FP32, "dbias")


# GLA.


def gla_inputs(B, T, dtype, *, H=8, K=64, V=128, with_state=False, seed=0):
    gen = torch.Generator(device="cuda").manual_seed(seed)

    def randn(*shape):
        return torch.randn(*shape, generator=gen, device="cuda").to(dtype)

    return dict(
        q_BTHK=randn(B, T, H, K),
        k_BTHK=randn(B, T, H, K),
        v_BTHV=randn(B, T, H, V),
        g_BTHK=(F.logsigmoid(torch.randn(B, T, H, K, generator=gen, device="cuda") + 2.0) / 4).to(dtype),
        initial_state_BHKV=torch.randn(B, H, K, V, generator=gen, device="cuda") if with_state else None,
    )


# fla's GLA with its in-chunk steps and its pass over the chunks on fla's kernels or braid's.
GLA_INNER = {"fla": "gla_intra=reference,gla_scan=reference,gla_dv=reference",
             "triton": "gla_intra=triton,gla_scan=reference,gla_dv=reference",
             "triton+scan": "gla_intra=triton,gla_scan=triton,gla_dv=reference",
             "triton+dv": "gla_intra=triton,gla_scan=reference,gla_dv=triton"}


@pytest.mark.parametrize("intra", list(GLA_INNER))
@pytest.mark.parametrize("dtype, T, docs, with_state", SEQ_CASES, ids=SEQ_IDS)
def test_gla(dtype, T, docs, with_state, intra):
    """fla's GLA; its in-chunk steps, its pass over the chunks and its value gradient on fla's
    kernels or braid's."""
    require("gla", "fla")
    for op in ("gla_intra", "gla_scan", "gla_dv"):
        if f"{op}=triton" in GLA_INNER[intra]:
            require(op, "triton")
    B = 2
    leaves = gla_inputs(B, T, dtype, with_state=with_state)
    kwargs = dict(doc_ids_BT=doc_ids_for(B, T) if docs else None, return_final_state=True)
    with use_backends("gla=fla," + GLA_INNER[intra]):
        assert pick("gla", *leaves.values()) == "fla"
        fast = run_with_grads(lambda **kw: gla(**kw, **kwargs), leaves)
    ref = run_with_grads(lambda **kw: gla_chunked(**kw, **kwargs), leaves)
    # One token from a zero state: output and final state do not depend on the gate.
    assert_parity(fast, ref, _tol(dtype), zero_grads=("g_BTHK",) if T == 1 and not with_state else ())


@pytest.mark.parametrize("docs, with_state", [(False, False), (False, True), (True, False)],
                         ids=["rows", "state", "docs"])
def test_gla_fla_matches_the_library(docs, with_state):
    """braid's chunk_gla ops keep the gate cumsum and float32 chunk states for the backward;
    fla's ChunkGLAFunction recomputes them. The numbers must be fla's (with fla's in-chunk
    kernels: braid's own, the default, are closer to float64 than fla's TF32 dots, checked by
    test_gla_intra_triton_against_float64 and test_gla)."""
    require("gla", "fla")
    from fla.ops.gla import chunk_gla as fla_chunk_gla

    from braid.kernels.gla.fla import chunk_gla as braid_chunk_gla

    B, T = 2, 1000
    leaves = gla_inputs(B, T, torch.bfloat16, with_state=with_state)
    if docs:  # fla's varlen form: one packed row
        leaves = {name: t.flatten(0, 1)[None] if name != "initial_state_BHKV" else t for name, t in leaves.items()}
        cu_seqlens = torch.tensor([0, 300, 301, 640, 2 * T], device="cuda")  # one 1-token document
    else:
        cu_seqlens = None
    scale = leaves["q_BTHK"].shape[-1] ** -0.5

    def run(fn):
        def call(q_BTHK, k_BTHK, v_BTHV, g_BTHK, initial_state_BHKV=None):
            return fn(q_BTHK, k_BTHK, v_BTHV, g_BTHK, scale=scale, initial_state=initial_state_BHKV,
                      output_final_state=True, cu_seqlens=cu_seqlens)
        return run_with_grads(call, leaves)

    with use_backends("gla_intra=reference,gla_scan=reference,gla_dv=reference"):
        ours = run(braid_chunk_gla)
    assert_parity(ours, run(fla_chunk_gla), LIBRARY_TOL)


# (B, T, H, K, gate scale): hybrid-374m's shape, an odd length with a partial chunk and a
# masked channel block, and gates steep enough for the diagonal blocks' row-by-row pass.
GLA_INTRA_CASES = [(2, 8192, 8, 64, 2.0), (2, 1000, 4, 40, 2.0), (1, 1000, 4, 64, 300.0)]


@pytest.mark.parametrize("B, T, H, K, scale", GLA_INTRA_CASES, ids=["hybrid", "odd", "steep"])
def test_gla_intra_triton_against_float64(B, T, H, K, scale):
    """braid's in-chunk GLA kernels (backward dq, dk; forward scores A) within 1e-5 of float64
    (3xTF32 dots), bit-identical from run to run; fla's kernels (TF32 dots between sub-chunks)
    are printed beside them."""
    require("gla", "fla")
    require("gla_intra", "triton")
    from fla.ops.gla.chunk import chunk_gla_bwd_dqk_intra, chunk_gla_fwd_intra_gk
    from fla.ops.utils.constant import RCP_LN2
    from fla.ops.utils.cumsum import chunk_local_cumsum

    from braid.kernels.gla.intra_triton import gla_bwd_intra, gla_fwd_intra
    from tests.kernels.test_gla_intra import reference, reference_scores

    def per_row(oracle, *tensors, **kwargs):  # the CPU test's float64 oracles, (T, ...) a row at a time
        rows = [oracle(*(t[b].double() for t in tensors), [T], chunk, **kwargs) for b in range(B)]
        return torch.stack(rows) if isinstance(rows[0], torch.Tensor) else [torch.stack(r) for r in zip(*rows)]

    gen = torch.Generator(device="cuda").manual_seed(T + K)
    chunk = 64
    q, k = (torch.randn(B, T, H, K, generator=gen, device="cuda").to(torch.bfloat16) for _ in range(2))
    step = F.logsigmoid(torch.randn(B, T, H, K, generator=gen, device="cuda") * scale - scale / 4) / 16
    g = chunk_local_cumsum(step, chunk, scale=RCP_LN2)
    dA = torch.randn(B, T, H, chunk, generator=gen, device="cuda")
    want = per_row(reference, q, k, g, dA)
    ours = gla_bwd_intra(q, k, g, dA, chunk_size=chunk)
    again = gla_bwd_intra(q, k, g, dA, chunk_size=chunk)
    theirs = chunk_gla_bwd_dqk_intra(q=q, k=k, g=g, dA=dA, chunk_size=chunk)
    for name, a, b, w, f in zip(("dq", "dk"), ours, again, want, theirs):
        err = relative_error(a, w)
        print(f"{name}: braid {err:.2e}, fla {relative_error(f, w):.2e} (relative to float64)")
        assert err < 1e-5, (name, err)
        assert torch.equal(a, b), name
    # the forward's in-chunk scores A (fla leaves the blocks above the diagonal unwritten)
    scale = K**-0.5
    A = gla_fwd_intra(q, k, g, scale, chunk_size=chunk)
    position, column = torch.arange(T, device="cuda")[:, None] % chunk, torch.arange(chunk, device="cuda")
    lower = (position >= column).expand(B, H, T, chunk).permute(0, 2, 1, 3)  # (B, T, H, chunk)
    want_A = per_row(reference_scores, q, k, g, scale=scale)
    fla_A = chunk_gla_fwd_intra_gk(q=q, k=k, g=g, scale=scale, chunk_size=chunk)
    err = relative_error(A, want_A)
    print(f"A: braid {err:.2e}, fla {relative_error(torch.where(lower, fla_A, 0.0), want_A):.2e}")
    assert err < 1e-5, err
    assert not A[~lower].any()
    assert torch.equal(A, gla_fwd_intra(q, k, g, scale, chunk_size=chunk))


@pytest.mark.parametrize("docs, with_state", [(False, False), (False, True), (True, True)],
                         ids=["rows", "state", "docs-state"])
def test_gla_scan_triton_matches_the_library(docs, with_state):
    """braid's pass over the chunks (gla_scan=triton) against fla's chunk_fwd_h and chunk_bwd_dh
    at hybrid-374m's GLA shape, bf16: the same bf16 operands and float32 sums, each chunk's sum
    added to the decayed state after the dot instead of inside it (LIBRARY_TOL), and
    bit-identical from run to run."""
    require("gla", "fla")
    require("gla_scan", "triton")
    from fla.ops.common.chunk_h import chunk_bwd_dh, chunk_fwd_h
    from fla.ops.utils import prepare_chunk_indices
    from fla.ops.utils.constant import RCP_LN2
    from fla.ops.utils.cumsum import chunk_local_cumsum

    from braid.kernels.gla.scan_triton import gla_state_grads, gla_states

    gen = torch.Generator(device="cuda").manual_seed(7)
    B, T, H, K, V, chunk = 2, 8192, 8, 64, 128, 64
    cu_seqlens = chunk_indices = None
    if docs:
        B, T = 1, 2 * 1000
        cu_seqlens = torch.tensor([0, 300, 301, 640, T], device="cuda")
        chunk_indices = prepare_chunk_indices(cu_seqlens, chunk)
    N = B if cu_seqlens is None else cu_seqlens.numel() - 1
    q, k, do = (torch.randn(B, T, H, K if i < 2 else V, generator=gen, device="cuda").to(torch.bfloat16)
                for i in range(3))
    v = torch.randn(B, T, H, V, generator=gen, device="cuda").to(torch.bfloat16)
    step = F.logsigmoid(torch.randn(B, T, H, K, generator=gen, device="cuda")) / 16
    g = chunk_local_cumsum(step, chunk, scale=RCP_LN2, cu_seqlens=cu_seqlens)
    h0 = torch.randn(N, H, K, V, generator=gen, device="cuda") if with_state else None
    dht = torch.randn(N, H, K, V, generator=gen, device="cuda")
    scale = K**-0.5
    theirs = chunk_fwd_h(k=k, v=v, g=None, gk=g, gv=None, h0=h0, output_final_state=True, cu_seqlens=cu_seqlens,
                         chunk_size=chunk, states_in_fp32=True)
    theirs_grads = chunk_bwd_dh(q=q, k=k, v=v, g=None, gk=g, gv=None, do=do, h0=h0, dht=dht, scale=scale,
                                cu_seqlens=cu_seqlens, chunk_size=chunk, states_in_fp32=True)

    def run():
        return (*gla_states(k, v, g, h0, True, cu_seqlens, chunk, chunk_indices),
                *gla_state_grads(q, do, g, scale, dht, with_state, cu_seqlens, chunk, chunk_indices))

    ours, again = run(), run()
    assert all(a is b is None or torch.equal(a, b) for a, b in zip(ours, again))
    for name, a, b in zip(("h", "final", "dh", "dh0"), ours, (*theirs, *theirs_grads)):
        if b is None:
            assert a is None, name
            continue
        err = relative_error(a, b)
        print(f"{name}: {err:.2e} relative to fla's")
        assert err < LIBRARY_TOL, (name, err)


@pytest.mark.parametrize("K, V", [(64, 128), (32, 48), (128, 64)], ids=["K64V128", "K32V48", "K128V64"])
@pytest.mark.parametrize("docs", [False, True], ids=["rows", "docs"])
def test_gla_dv_triton_matches_the_library(docs, K, V):
    """braid's value-gradient kernel (gla_dv=triton) against fla's chunk_gla_bwd_dv and against
    float64, at hybrid-374m's GLA shape (K64 V128) and at other head dims (each a kernel of its
    own: a partial value block, two key blocks): with float32 do, both within EXACT_FP32 of
    float64 (braid's in-chunk dot in 3xTF32, fla's in float32 FMA; the decayed keys and dh
    rounded to bf16 in both, and in the oracle); with bf16 do, braid within one bf16 rounding
    (2^-8) of fla's; bit-identical from run to run."""
    require("gla", "fla")
    require("gla_dv", "triton")
    from fla.ops.gla.chunk import chunk_gla_bwd_dv
    from fla.ops.utils import prepare_chunk_indices
    from fla.ops.utils.constant import RCP_LN2
    from fla.ops.utils.cumsum import chunk_local_cumsum

    from braid.kernels.gla.dv_triton import gla_bwd_dv

    gen = torch.Generator(device="cuda").manual_seed(5)
    B, T, H, chunk = 2, 8192 if (K, V) == (64, 128) else 1024, 8, 64
    cu_seqlens = chunk_indices = lengths = None
    if docs:
        B, T = 1, 2 * 1000
        cu_seqlens = torch.tensor([0, 300, 301, 640, T], device="cuda")
        chunk_indices = prepare_chunk_indices(cu_seqlens, chunk)
        lengths = [300, 1, 339, T - 640]
    NT = -(-T // chunk) if cu_seqlens is None else chunk_indices.shape[0]
    k = torch.randn(B, T, H, K, generator=gen, device="cuda").to(torch.bfloat16)
    g = chunk_local_cumsum(F.logsigmoid(torch.randn(B, T, H, K, generator=gen, device="cuda")) / 16, chunk,
                           scale=RCP_LN2, cu_seqlens=cu_seqlens)
    A = torch.randn(B, T, H, chunk, generator=gen, device="cuda")
    dh = torch.randn(B, NT, H, K, V, generator=gen, device="cuda")
    varlen = dict(cu_seqlens=cu_seqlens, chunk_size=chunk, chunk_indices=chunk_indices)
    for dtype in (torch.float32, torch.bfloat16):
        do = torch.randn(B, T, H, V, generator=gen, device="cuda").to(dtype)
        ours, again = gla_bwd_dv(k, g, A, do, dh, **varlen), gla_bwd_dv(k, g, A, do, dh, **varlen)
        assert ours.dtype == dtype and torch.equal(ours, again)
        theirs = chunk_gla_bwd_dv(k=k, g=g, A=A, do=do, dh=dh, **varlen)
        if dtype == torch.bfloat16:
            err = relative_error(ours, theirs)
            print(f"bf16 do: {err:.2e} relative to fla's")
            assert err < 2**-8, err
            continue
        # the float64 oracle, chunk by chunk in dh's order, with the kernels' bf16 roundings of the key side
        segments = [(b, 0, T) for b in range(B)] if cu_seqlens is None else [
            (0, int(cu_seqlens[n]), length) for n, length in enumerate(lengths)]
        want = torch.zeros(B, T, H, V, dtype=torch.float64, device="cuda")
        dh_chunks = iter(dh.flatten(0, 1))
        for row, s0, length in segments:
            for s in range(s0, s0 + length, chunk):
                e = min(s + chunk, s0 + length)
                A_c = torch.tril(A[row, s:e, :, :e - s].double().permute(1, 0, 2))  # [h, s, t], s >= t
                want[row, s:e] = torch.einsum("hst,shv->thv", A_c, do[row, s:e].double())
                kg = (k[row, s:e].float() * torch.exp2(g[row, e - 1] - g[row, s:e])).to(k.dtype)
                want[row, s:e] += torch.einsum("thk,hkv->thv", kg.double(), next(dh_chunks).to(k.dtype).double())
        errs = relative_error(ours, want), relative_error(theirs, want)
        print(f"float32 do: braid {errs[0]:.2e}, fla {errs[1]:.2e} relative to float64")
        assert errs[0] < EXACT_FP32, errs


def _fwd_bwd(fn, leaves: dict, cotangents: list):
    """fn's outputs and the leaves' gradients of sum(out * cotangent), with no random numbers
    drawn, so that a CUDA graph can capture it."""
    outs = fn(**leaves)
    grads = torch.autograd.grad(outs, list(leaves.values()), cotangents)
    return [o.detach() for o in outs], dict(zip(leaves, grads))


def _graph_replay(fn, leaves: dict, cotangents: list):
    """_fwd_bwd captured in a CUDA graph (after warm-up on a side stream), then replayed."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):
            _fwd_bwd(fn, leaves, cotangents)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = _fwd_bwd(fn, leaves, cotangents)
    graph.replay()
    torch.cuda.synchronize()
    return captured


@pytest.mark.parametrize("op", ["ssd", "gla"])
def test_side_stream_overlap_gives_the_serial_results(op):
    """The mamba_ssm SSD and fla GLA ops run some kernels on a side stream beside the others
    (braid.kernels.streams). Eagerly and replayed from a CUDA graph, the results must be those
    of one stream (LIBRARY_TOL: the same kernels, some adding partial sums with atomics)."""
    from braid.kernels.streams import serial

    if op == "ssd":
        require("ssd", "mamba_ssm")
        spec, inputs = "ssd=mamba_ssm", ssd_inputs(2, 1000, torch.bfloat16, with_state=True)

        def fn(**kw):
            return ssd(**kw, chunk_size=64, return_final_state=True)
    else:
        require("gla", "fla")
        spec, inputs = "gla=fla", gla_inputs(2, 1000, torch.bfloat16, with_state=True)

        def fn(**kw):
            return gla(**kw, return_final_state=True)

    leaves = {name: t.detach().clone().requires_grad_() for name, t in inputs.items()}
    gen = torch.Generator(device="cuda").manual_seed(1)
    with use_backends(spec):
        with torch.no_grad():
            shapes = [(o.shape, o.dtype) for o in fn(**leaves)]
        cotangents = [torch.randn(shape, generator=gen, device="cuda").to(dtype) for shape, dtype in shapes]
        with serial():
            one_stream = _fwd_bwd(fn, leaves, cotangents)
        overlapped = _fwd_bwd(fn, leaves, cotangents)
        replayed = _graph_replay(fn, leaves, cotangents)
    assert_parity(overlapped, one_stream, LIBRARY_TOL)
    assert_parity(replayed, one_stream, LIBRARY_TOL)


@pytest.mark.parametrize("dtype", list(DTYPES.values()), ids=list(DTYPES))
def test_gla_step(dtype):
    require("gla_step", "fla")
    seq = gla_inputs(3, 1, dtype, with_state=True)
    args = [seq[name][:, 0] for name in ("q_BTHK", "k_BTHK", "v_BTHV", "g_BTHK")]
    with use_backends("gla_step=fla"):
        out, state = gla_step(*args, seq["initial_state_BHKV"])
    out_ref, state_ref = gla_step_reference(*args, seq["initial_state_BHKV"])
    assert out.dtype == dtype and state.dtype == torch.float32
    assert_rel_close(out, out_ref, _tol(dtype), "out")
    assert_rel_close(state, state_ref, _tol(dtype), "state")


# Attention.

# (backend, window, documents, dtype, T). Flex compiles once per shape, window and mask
# kind (a few seconds each): sdpa takes every length and dtype, flex the cases that matter.
ATTENTION_CASES = [
    *(("sdpa", None, False, dtype, T) for dtype in DTYPES.values() for T in LENGTHS),
    ("flex", 64, False, torch.bfloat16, 1000),
    ("flex", 64, False, torch.float32, 1000),
    ("flex", None, True, torch.bfloat16, 1000),
    ("flex", 64, True, torch.bfloat16, 63),
    ("flex", 64, True, torch.bfloat16, 1),
    ("flash_attn", 64, True, torch.bfloat16, 1000),
    ("flash_attn", 64, False, torch.bfloat16, 63),
    ("torch_flash", 64, True, torch.bfloat16, 1000),
    ("torch_flash", 64, False, torch.bfloat16, 63),
    ("torch_flash", None, True, torch.bfloat16, 1000),
    ("torch_flash", 1024, False, torch.bfloat16, 1),
    ("cudnn", 64, False, torch.bfloat16, 1000),
    ("cudnn", 64, True, torch.bfloat16, 1000),
    ("cudnn", None, True, torch.bfloat16, 1000),
    ("cudnn", 64, True, torch.bfloat16, 63),
    ("cudnn", 1024, False, torch.bfloat16, 2),
    ("cudnn", 1024, True, torch.bfloat16, 2),
]


def _attention_id(case) -> str:
    backend, window, docs, dtype, T = case
    return f"{backend}_w{window}_{'docs' if docs else 'rows'}_{str(dtype)[6:]}_T{T}"


@pytest.mark.parametrize("case", ATTENTION_CASES, ids=_attention_id)
def test_attention(case):
    backend, window, docs, dtype, T = case
    require("attention", backend)
    B, H, J, D = 2, 8, 2, 64
    gen = torch.Generator(device="cuda").manual_seed(0)
    leaves = {
        name: torch.randn(B, T, heads, D, generator=gen, device="cuda").to(dtype)
        for name, heads in (("q_BTHD", H), ("k_BSJD", J), ("v_BSJD", J))
    }
    kwargs = dict(window=window, doc_ids_BT=doc_ids_for(B, T) if docs else None)
    # Below one 128-token block auto passes flex by (FLEX_MIN_LEN): whichever backend auto
    # picks instead must give the reference's results.
    passed_by = backend == "flex" and T < FLEX_MIN_LEN
    with use_backends("auto" if passed_by else f"attention={backend}"):
        chosen = pick("attention", *leaves.values())
        assert chosen != "flex" if passed_by else chosen == backend
        fast = run_with_grads(lambda **kw: attention(**kw, **kwargs), leaves)
    ref = run_with_grads(lambda **kw: attention_reference(**kw, **kwargs), leaves)
    # One query and one key: the softmax of a single score is 1 whatever q and k are, so
    # their exact gradients are zero (checked against the call's other gradients).
    assert_parity(fast, ref, _tol(dtype), zero_grads=("q_BTHD", "k_BSJD") if T == 1 else ())


# Norms, SwiGLU, linear cross-entropy, MoE.

NORM_CASES = {  # (D, group_size, variant)
    "rms_residual": (1024, 1024, "plain"),
    "mamba_gate_then_norm": (2048, 1024, "gate_then_norm"),
    "gla_norm_then_gate": (1024, 128, "norm_then_gate"),
    "odd_group": (960, 96, "gate_then_norm"),
}


@pytest.mark.parametrize("backend", ["triton", "liger"])
@pytest.mark.parametrize("case", NORM_CASES)
@pytest.mark.parametrize("dtype", list(DTYPES.values()), ids=list(DTYPES))
def test_norms(backend, case, dtype):
    D, group_size, variant = NORM_CASES[case]
    op = "norm" if variant == "plain" else "gated_norm"
    if backend == "liger" and op == "gated_norm":
        pytest.skip("liger has no gated RMSNorm")
    require(op, backend)
    gen = torch.Generator(device="cuda").manual_seed(0)
    leaves = dict(
        x=torch.randn(3, 1001, D, generator=gen, device="cuda").to(dtype),
        gate=torch.randn(3, 1001, D, generator=gen, device="cuda").to(dtype) if variant != "plain" else None,
        weight=1 + 0.1 * torch.randn(D, generator=gen, device="cuda"),
    )
    before = variant == "norm_then_gate"
    if variant == "plain":
        fast_fn = lambda x, weight: rms_norm(x, weight, 1e-5)  # noqa: E731
        ref_fn = lambda x, weight: rms_norm_reference(x, weight, 1e-5)  # noqa: E731
    else:
        fast_fn = lambda x, gate, weight: gated_rms_norm(x, gate, weight, 1e-5, group_size, before)  # noqa: E731
        ref_fn = lambda x, gate, weight: gated_rms_norm_reference(x, gate, weight, 1e-5, group_size, before)  # noqa: E731
    with use_backends(f"{op}={backend}"):
        assert pick(op, *leaves.values()) == backend
        fast = run_with_grads(fast_fn, leaves)
    ref = run_with_grads(ref_fn, leaves)
    # The weight gradient sums 3003 rows: float32 in another order.
    assert_parity(fast, ref, _tol(dtype, exact_fp32=True), grad_tol=_tol(dtype, exact_fp32=True) * 10)


@pytest.mark.parametrize("dtype", list(DTYPES.values()), ids=list(DTYPES))
def test_silu_mul(dtype):
    require("swiglu", "liger")
    gen = torch.Generator(device="cuda").manual_seed(0)
    leaves = {name: torch.randn(5, 999, 2816, generator=gen, device="cuda").to(dtype) for name in ("gate", "up")}
    with use_backends("swiglu=liger"):
        fast = run_with_grads(silu_mul, leaves)
    ref = run_with_grads(silu_mul_reference, leaves)
    assert_parity(fast, ref, _tol(dtype, exact_fp32=True))


@pytest.mark.parametrize("dtype", list(DTYPES.values()), ids=list(DTYPES))
@pytest.mark.parametrize("N,F", [(32768, 1408), (999, 100), (3, 8)])
def test_silu_mul_stacked(dtype, N, F):
    """braid's stacked SwiGLU kernels against the reference (float32 element-wise work, rounded
    once), eagerly and compiled in one graph; the ops pass opcheck; two runs are bit-identical."""
    require("swiglu_stacked", "triton")
    gen = torch.Generator(device="cuda").manual_seed(N + F)
    leaves = {"h": (torch.randn(N, 2 * F, generator=gen, device="cuda") * 3).to(dtype)}
    with use_backends("swiglu_stacked=triton"):
        assert pick("swiglu_stacked", leaves["h"]) == "triton"
        fast = run_with_grads(silu_mul_stacked, leaves)
        again = run_with_grads(silu_mul_stacked, leaves)
        compiled = run_with_grads(torch.compile(silu_mul_stacked, fullgraph=True), leaves)
        h = leaves["h"].clone().requires_grad_(True)
        torch.library.opcheck(torch.ops.braid.silu_mul_stacked.default, (h,))
    ref = run_with_grads(silu_mul_stacked_reference, leaves)
    for other in (again, compiled):
        assert torch.equal(fast[0][0], other[0][0]) and torch.equal(fast[1]["h"], other[1]["h"])
    assert_parity(fast, ref, _tol(dtype, exact_fp32=True))


@pytest.mark.parametrize("dtype", list(DTYPES.values()), ids=list(DTYPES))
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_linear_cross_entropy(dtype, reduction):
    require("cross_entropy", "liger")
    gen = torch.Generator(device="cuda").manual_seed(0)
    N, D, V = 4097, 1024, 32000
    leaves = dict(
        hidden_ND=torch.randn(N, D, generator=gen, device="cuda").to(dtype),
        weight_VD=(torch.randn(V, D, generator=gen, device="cuda") * 0.02).to(dtype),
    )
    labels_N = torch.randint(0, V, (N,), generator=gen, device="cuda")
    labels_N[::7] = -100
    with use_backends("cross_entropy=liger"):
        assert pick("cross_entropy", *leaves.values()) == "liger"
        fast = run_with_grads(lambda **kw: linear_cross_entropy(**kw, labels_N=labels_N, reduction=reduction), leaves)
    ref = run_with_grads(
        lambda **kw: linear_cross_entropy_reference(**kw, labels_N=labels_N, reduction=reduction), leaves
    )
    assert_parity(fast, ref, _tol(dtype))


def test_linear_cross_entropy_under_autocast():
    """The trainer's case: float32 hidden and weight (master weights), bf16 autocast."""
    require("cross_entropy", "liger")
    gen = torch.Generator(device="cuda").manual_seed(0)
    leaves = dict(
        hidden_ND=torch.randn(2048, 1024, generator=gen, device="cuda"),
        weight_VD=torch.randn(32000, 1024, generator=gen, device="cuda") * 0.02,
    )
    labels_N = torch.randint(0, 32000, (2048,), generator=gen, device="cuda")
    with torch.autocast("cuda", dtype=torch.bfloat16), use_backends("cross_entropy=liger"):
        fast = run_with_grads(lambda **kw: linear_cross_entropy(**kw, labels_N=labels_N), leaves)
    ref = run_with_grads(lambda **kw: linear_cross_entropy_reference(**kw, labels_N=labels_N), leaves)
    assert_parity(fast, ref, BF16_TOL)


@pytest.mark.parametrize("autocast", [False, True], ids=["bf16_inputs", "fp32_under_autocast"])
def test_grouped_swiglu(autocast):
    require("moe", "grouped_mm")
    if torch.cuda.get_device_capability()[0] < 9:
        pytest.skip("torch._grouped_mm needs sm90+ here")
    gen = torch.Generator(device="cuda").manual_seed(0)
    E, D, F_ = 8, 1024, 1408
    counts_E = torch.tensor([700, 0, 3, 1200, 1, 999, 64, 129], device="cuda")
    dtype = torch.float32 if autocast else torch.bfloat16
    leaves = dict(
        x_sorted_ND=torch.randn(int(counts_E.sum()), D, generator=gen, device="cuda").to(dtype),
        w1_EDF=(torch.randn(E, D, F_, generator=gen, device="cuda") * D**-0.5).to(dtype),
        w3_EDF=(torch.randn(E, D, F_, generator=gen, device="cuda") * D**-0.5).to(dtype),
        w2_EFD=(torch.randn(E, F_, D, generator=gen, device="cuda") * F_**-0.5).to(dtype),
    )
    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=autocast), use_backends("moe=grouped_mm"):
        fast = run_with_grads(lambda **kw: grouped_swiglu(counts_E=counts_E, **kw), leaves)
    ref = run_with_grads(lambda **kw: grouped_swiglu_reference(counts_E=counts_E, **kw), leaves)
    assert_parity(fast, ref, BF16_TOL)


def test_expert_weights_bf16_stacked_on_the_gpu():
    """The MoE's stacked bf16 copy (braid's Triton pass on CUDA) equals torch.cat then torch's
    cast, bit for bit, and its gradients are the stacked gradient's halves, cast back."""
    from braid.kernels.moe import grouped_mm  # noqa: F401 (registers the op)

    gen = torch.Generator(device="cuda").manual_seed(0)
    w1, w3 = (torch.randn(8, 1024, 1408, generator=gen, device="cuda").requires_grad_(True) for _ in range(2))
    w2 = torch.randn(8, 1408, 1024, generator=gen, device="cuda").requires_grad_(True)
    w13, w2_bf16 = torch.ops.braid.expert_weights_bf16_stacked(w1, w3, w2)
    assert torch.equal(w13, torch.cat([w1, w3], dim=-1).to(torch.bfloat16))
    assert torch.equal(w2_bf16, w2.to(torch.bfloat16))
    g13 = torch.randn(w13.shape, generator=gen, device="cuda").to(torch.bfloat16)
    g1, g3 = torch.autograd.grad(w13, (w1, w3), g13)
    assert torch.equal(g1, g13[..., :1408].float()) and torch.equal(g3, g13[..., 1408:].float())
    torch.library.opcheck(torch.ops.braid.expert_weights_bf16_stacked.default, (w1, w3, w2))


@pytest.mark.parametrize("N,K,D", [(16384, 2, 1024), (999, 3, 200), (5, 1, 64)])
def test_weighted_combine_triton_backward(N, K, D):
    """braid's Triton backward of the MoE's weighted combine against the reference's (dy_sorted
    is one product rounded to bf16 in both: equal; dgates a float32 sum over D in another order),
    eagerly and compiled in one graph; two runs are bit-identical; its op passes opcheck."""
    require("moe_combine", "triton")
    gen = torch.Generator(device="cuda").manual_seed(N + K + D)
    order_S = torch.randperm(N * K, generator=gen, device="cuda")
    unsort_S = torch.empty_like(order_S)
    unsort_S[order_S] = torch.arange(N * K, device="cuda")
    leaves = dict(
        y_sorted_SD=torch.randn(N * K, D, generator=gen, device="cuda").to(torch.bfloat16),
        gates_NK=torch.rand(N, K, generator=gen, device="cuda"),
    )

    def combine(y_sorted_SD, gates_NK):
        return weighted_combine(y_sorted_SD, gates_NK, order_S, unsort_S)

    with use_backends("moe_combine=triton"):
        assert pick("moe_combine", *leaves.values(), unsort_S) == "triton"
        fast = run_with_grads(combine, leaves)
        again = run_with_grads(combine, leaves)
        compiled = run_with_grads(torch.compile(combine, fullgraph=True), leaves)
        grad = torch.randn(N, D, generator=gen, device="cuda")
        torch.library.opcheck(
            torch.ops.braid.moe_combine_backward.default, (grad, leaves["y_sorted_SD"], leaves["gates_NK"], unsort_S)
        )
    with use_backends("moe_combine=reference"):
        ref = run_with_grads(combine, leaves)
    for other in (again, compiled):
        assert all(torch.equal(a, b) for a, b in zip(fast[1].values(), other[1].values()))
    assert torch.equal(fast[1]["y_sorted_SD"], ref[1]["y_sorted_SD"])
    assert_parity(fast, ref, EXACT_FP32)


ROUTER_CASES = [(16384, 1024, 8), (1000, 72, 5), (3, 1024, 64), (129, 256, 16)]  # (N, D, E)


def _router_inputs(N: int, D: int, E: int, x_dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator(device="cuda").manual_seed(N + D + E)
    x_ND = torch.randn(N, D, generator=gen, device="cuda").to(x_dtype)
    return x_ND, torch.randn(E, D, generator=gen, device="cuda") * D**-0.5


@pytest.mark.parametrize("N,D,E", ROUTER_CASES)
@pytest.mark.parametrize("x_dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
def test_router_logits_triton(N, D, E, x_dtype):
    """braid's Triton router against float64 products of the same inputs: logits, the weight
    gradient and a float32 dx are float32 sums (EXACT_FP32), a bf16 dx is rounded once; two runs
    agree bit for bit (fixed tiles, no atomics)."""
    require("router", "triton")
    from braid.kernels.moe import router_logits

    x_ND, weight_ED = _router_inputs(N, D, E, x_dtype)
    dlogits_NE = torch.randn(N, E, device="cuda")
    runs = []
    for _ in range(2):
        x, w = x_ND.clone().requires_grad_(True), weight_ED.clone().requires_grad_(True)
        with use_backends("router=triton"):
            logits = router_logits(x, w)
        logits.backward(dlogits_NE)
        runs.append((logits.detach(), x.grad, w.grad))
    logits, dx, dw = runs[0]
    assert all(torch.equal(a, b) for a, b in zip(runs[0], runs[1]))
    x64, w64, dl64 = x_ND.double(), weight_ED.double(), dlogits_NE.double()
    assert logits.dtype == torch.float32 and dx.dtype == x_dtype and dw.dtype == torch.float32
    assert relative_error(logits, x64 @ w64.T) < EXACT_FP32
    assert relative_error(dw, dl64.T @ x64) < EXACT_FP32
    assert relative_error(dx, dl64 @ w64) < (EXACT_FP32 if x_dtype == torch.float32 else 1e-2)


def test_router_logits_triton_stays_float32_when_compiled_under_autocast():
    """Compiled under bf16 autocast, the router's backward still sums in float32 (the reference's
    autocast-disabled linear gets a bf16 backward there), in one graph; and the op passes opcheck."""
    require("router", "triton")
    from braid.kernels.moe import router_logits

    x_ND, weight_ED = _router_inputs(4096, 1024, 8, torch.bfloat16)
    dlogits_NE = torch.randn(4096, 8, device="cuda")
    w = weight_ED.clone().requires_grad_(True)
    with use_backends("router=triton"):
        compiled = torch.compile(router_logits, fullgraph=True)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            logits = compiled(x_ND, w)
        logits.backward(dlogits_NE)
        torch.library.opcheck(torch.ops.braid.router_logits.default, (x_ND, weight_ED.requires_grad_(True)))
    assert logits.dtype == torch.float32
    assert relative_error(w.grad, dlogits_NE.double().T @ x_ND.double()) < EXACT_FP32
