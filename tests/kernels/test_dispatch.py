"""CPU tests of the fast-kernel plumbing: backend selection, doc ids -> varlen segments, the
SSD / GLA / conv mappings onto fla-style varlen kernels (run here with reference kernels in
fla's place, which do not run on CPU), FlexAttention mask functions, the chunked reference
linear cross-entropy, the SwiGLU activation, and braid's own Triton norm kernels run by
Triton's interpreter (TRITON_INTERPRET=1).

Shape legend: B batch, T time, H heads, P head dim, G groups, N state dim, K key dim,
V value dim, C channels, D model dim.
Tolerances: float64 mappings rtol=1e-9, atol=1e-10 (they are exact rewrites: any wrong
transpose, segment or state placement is an O(1) error). The Triton norm kernels compute in
float32: float32 inputs rtol=atol=1e-5 (observed ~1e-6); bfloat16 inputs rtol=atol=2e-2 (a
bf16 ulp is 2**-8 ~ 4e-3 relative, the output and gradients are rounded once more).
"""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F

import braid.kernels.backend as backend
from braid.kernels.backend import parse_spec, pick, use_backends
from braid.kernels.cross_entropy import linear_cross_entropy
from braid.kernels.cross_entropy import reference as ce_reference
from braid.kernels.gla.packed import gla_step_via_recurrent, gla_via_packed
from braid.kernels.gla.reference import gla_naive, gla_step_reference
from braid.kernels.norm.reference import gated_rms_norm_reference, rms_norm_reference
from braid.kernels.ssd.conv import causal_conv1d_reference
from braid.kernels.ssd.packed import causal_conv1d_via_packed, ssd_step_via_simple_gla, ssd_via_simple_gla
from braid.kernels.ssd.reference import ssd_naive, ssd_step_reference
from braid.kernels.swiglu import silu_mul
from braid.kernels.varlen import run_packed, segment_index_BT, segments, segments_from_doc_ids
from tests.helpers import run_interpreted

F64 = dict(rtol=1e-9, atol=1e-10)
TRITON_F32 = dict(rtol=1e-5, atol=1e-5)
TRITON_BF16 = dict(rtol=2e-2, atol=2e-2)


def _doc_ids(lengths_per_row: list[list[int]]) -> torch.Tensor:
    """(B, T) doc ids from document lengths per row; ids are unique across the batch."""
    rows, next_id = [], 0
    for lengths in lengths_per_row:
        row = []
        for length in lengths:
            row += [next_id] * length
            next_id += 1
        rows.append(row)
    return torch.tensor(rows)


# Backend selection.


def test_parse_spec():
    assert parse_spec("") == ("auto", {})
    assert parse_spec("reference") == ("reference", {})
    assert parse_spec(" reference , attention=flex,ssd = mamba_ssm") == (
        "reference", {"attention": "flex", "ssd": "mamba_ssm"}
    )


@pytest.mark.parametrize(
    "spec, message",
    [("fast", "'auto' or 'reference'"), ("conv2d=fla", "unknown op"), ("ssd=flash_attn", "no backend")],
)
def test_parse_spec_rejects_bad_specs(spec, message):
    with pytest.raises(ValueError, match=message):
        parse_spec(spec)


def test_use_backends_restores_the_previous_choice():
    before = backend.current_spec()
    with use_backends("reference,norm=liger"):
        assert backend.current_spec() == "reference,norm=liger"
    assert backend.current_spec() == before


def test_cpu_and_float64_tensors_take_the_reference():
    assert pick("ssd", torch.zeros(2)) == "reference"
    assert pick("norm", torch.zeros(2)) == "reference"
    assert not backend._plain_cuda([None])
    assert not backend._plain_cuda([torch.zeros(2, dtype=torch.float64)])


@pytest.fixture
def fake_gpu(monkeypatch):
    """Pretend every tensor is a plain CUDA tensor and every backend but flash_attn imports."""
    monkeypatch.setattr(backend, "_plain_cuda", lambda tensors: True)
    monkeypatch.setattr(backend, "available", lambda op, name: name != "flash_attn")


def test_pick_follows_preference_and_unsupported(fake_gpu):
    t = torch.zeros(1)
    assert pick("attention", t) == "sdpa"
    assert pick("attention", t, unsupported=["sdpa"]) == "cudnn"  # flash_attn does not import
    assert pick("attention", t, unsupported=["sdpa", "cudnn"]) == "flex"
    assert pick("ssd", t) == "fla"
    assert pick("ssd", t, unsupported=["fla"]) == "mamba_ssm"
    assert pick("ssd", t, unsupported=["fla", "mamba_ssm"]) == "reference"


def test_conv_prefers_braids_kernel_and_fla_takes_states(fake_gpu):
    t = torch.zeros(1)
    assert pick("conv", t) == "triton"
    assert pick("conv", t, unsupported=["triton"]) == "fla"  # calls with conv states
    with use_backends("conv=fla"):
        assert pick("conv", t) == "fla"


def test_opt_in_backends_run_only_when_named(fake_gpu, monkeypatch):
    monkeypatch.setattr(backend, "OPT_IN", frozenset({("conv", "triton")}))
    t = torch.zeros(1)
    assert pick("conv", t) == "fla"
    assert pick("conv", t, unsupported=["fla"]) == "reference"  # triton is opt-in
    with use_backends("conv=triton"):
        assert pick("conv", t) == "triton"


def test_report_says_what_runs_and_why_the_others_do_not(fake_gpu, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    reasons = {"flash_attn": "ModuleNotFoundError"}
    monkeypatch.setattr(backend, "unavailable_reason", lambda op, name: reasons.get(name))
    rows = {row.split()[0]: row for row in backend.report()}
    assert list(rows) == list(backend.FAST_BACKENDS)
    assert rows["ssd"].startswith("ssd            runs fla ")
    assert " runs triton " in rows["conv"] and "fla (available)" in rows["conv"]
    assert "flash_attn (unavailable: ModuleNotFoundError)" in rows["attention"]
    with use_backends("reference,conv=fla"):
        rows = {row.split()[0]: row for row in backend.report()}
    assert " runs fla " in rows["conv"] and " runs reference " in rows["ssd"]
    monkeypatch.setattr(backend, "OPT_IN", frozenset({("conv", "triton")}))
    rows = {row.split()[0]: row for row in backend.report()}
    assert " runs fla " in rows["conv"] and "triton (available, opt-in)" in rows["conv"]


def test_forced_backends_fall_back_when_missing_or_unsupported(fake_gpu):
    t = torch.zeros(1)
    with use_backends("attention=flash_attn"):
        assert pick("attention", t) == "reference"
    with use_backends("ssd=mamba_ssm"):
        assert pick("ssd", t) == "mamba_ssm"
        assert pick("ssd", t, unsupported=["mamba_ssm"]) == "reference"
    with use_backends("reference,norm=liger"):
        assert pick("norm", t) == "liger"
        assert pick("ssd", t) == "reference"


def test_elementwise_ops_leave_fusion_to_torch_compile(fake_gpu, monkeypatch):
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    t = torch.zeros(1)
    assert pick("norm", t) == "reference"
    assert pick("swiglu", t) == "reference"
    assert pick("attention", t) == "sdpa"


def record_unsupported(monkeypatch, module) -> list[tuple[str, ...]]:
    """Replace `module.pick` by one that records each call's `unsupported` and picks the reference."""
    seen = []

    def recording_pick(op, *tensors, unsupported=()):
        seen.append(tuple(unsupported))
        return "reference"

    monkeypatch.setattr(module, "pick", recording_pick)
    return seen


def test_ssd_dispatch_excludes_mamba_ssm_for_documents_with_a_state(fake_gpu, monkeypatch):
    from braid.kernels import ssd as ssd_module

    seen = record_unsupported(monkeypatch, ssd_module)
    B, T, H, P, G, N = 1, 5, 2, 2, 1, 3
    args = (torch.randn(B, T, H, P), torch.rand(B, T, H), -torch.rand(H), torch.randn(B, T, G, N))
    args += (torch.randn(B, T, G, N),)
    doc_ids = torch.tensor([[0, 0, 1, 1, 1]])
    ssd_module.ssd(*args, doc_ids_BT=doc_ids)
    ssd_module.ssd(*args, doc_ids_BT=doc_ids, initial_state_BHPN=torch.zeros(B, H, P, N))
    assert seen == [(), ("mamba_ssm",)]


def test_conv_dispatch_keeps_states_off_the_triton_conv(fake_gpu, monkeypatch):
    from braid.kernels.ssd import conv as conv_module

    seen = record_unsupported(monkeypatch, conv_module)
    x, weight = torch.randn(1, 5, 3), torch.randn(3, 4)
    conv_module.causal_conv1d(x, weight)
    conv_module.causal_conv1d(x, weight, initial_state_BCK=torch.zeros(1, 3, 3))
    conv_module.causal_conv1d(x, weight, return_final_state=True)
    assert seen == [(), ("triton",), ("triton",)]


@pytest.mark.parametrize("cudnn_imports", [False, True], ids=["no_cudnn_frontend", "cudnn_frontend"])
def test_attention_dispatch_routes_windows_and_documents(fake_gpu, monkeypatch, cudnn_imports):
    from types import SimpleNamespace

    from braid.kernels import attention as attention_module

    monkeypatch.setattr(backend, "available", lambda op, name: name != "flash_attn" and (cudnn_imports or name != "cudnn"))
    calls = []
    fake = SimpleNamespace(
        causal_sdpa=lambda q, k, v, scale: calls.append(("sdpa", None, None)) or q,
        attention_cudnn=lambda q, k, v, window, doc_ids_BT, scale: calls.append(("cudnn", window, doc_ids_BT)) or q,
        attention_flex=lambda q, k, v, window, doc_ids_BT, scale: calls.append(("flex", window, doc_ids_BT)) or q,
        attention_torch_flash=lambda q, k, v, window, doc_ids_BT, scale: calls.append(("torch_flash", window, None))
        or q,
    )
    monkeypatch.setattr(attention_module, "backend_module", lambda op, name: fake)
    T = attention_module.FLEX_MIN_LEN + 2
    q = torch.randn(1, T, 2, 8, dtype=torch.bfloat16)
    doc_ids = (torch.arange(T) >= T // 2).long()[None]
    attention_module.attention(q, q, q)
    attention_module.attention(q, q, q, window=T)  # a window covering T is full causal
    attention_module.attention(q, q, q, window=3)
    attention_module.attention(q, q, q, window=8, doc_ids_BT=doc_ids)
    short = torch.randn(1, 6, 2, 8, dtype=torch.bfloat16)
    attention_module.attention(short, short, short, window=3)  # under one flex block
    attention_module.attention(q.float(), q.float(), q.float(), window=3)  # cudnn: half precision only
    banded = "cudnn" if cudnn_imports else "flex"
    # Documents try flex first (DOCUMENT_ORDER); under one flex block cuDNN takes them.
    short_docs = doc_ids[:, :6]
    attention_module.attention(short, short, short, window=3, doc_ids_BT=short_docs)
    assert calls == [
        ("sdpa", None, None), ("sdpa", None, None), (banded, 3, None), ("flex", 8, doc_ids),
        ("cudnn" if cudnn_imports else "torch_flash", 3, None), ("flex", 3, None),
        ("cudnn", 3, short_docs) if cudnn_imports else ("torch_flash", 3, None),
    ]


# Doc ids -> varlen segments.


def test_segments_cut_at_documents_and_rows():
    doc_ids = torch.tensor([[3, 3, 4, 4, 4], [4, 4, 4, 5, 5]])  # row 1 continues doc 4: still a new segment
    seg = segments_from_doc_ids(doc_ids)
    assert seg.cu_seqlens.tolist() == [0, 2, 5, 8, 10]
    assert seg.first_B.tolist() == [0, 2]
    assert seg.last_B.tolist() == [1, 3]
    assert seg.max_seqlen == 3
    assert seg.num_segments == 4
    assert segment_index_BT(doc_ids).tolist() == [[0, 0, 1, 1, 1], [0, 0, 0, 1, 1]]


def test_segments_of_single_token_rows():
    seg = segments_from_doc_ids(torch.tensor([[7], [7], [8]]))
    assert seg.cu_seqlens.tolist() == [0, 1, 2, 3]
    assert seg.first_B.tolist() == seg.last_B.tolist() == [0, 1, 2]


def test_segments_are_cached_per_tensor_and_version():
    doc_ids = torch.tensor([[0, 0, 1]])
    first = segments(doc_ids)
    assert segments(doc_ids) is first
    doc_ids[0, 2] = 0
    assert segments(doc_ids).cu_seqlens.tolist() == [0, 3]


def test_segments_reject_float_doc_ids():
    with pytest.raises(ValueError, match="integer"):
        segments_from_doc_ids(torch.zeros(1, 3))


# The mappings onto fla-style varlen kernels, with reference kernels in fla's place.


def _varlen_kernel(run_one):
    """A kernel with fla's varlen convention from run_one(tensors (1, L, ...), state | None, **kw) -> (out, final)."""

    def kernel(*tensors, initial_state=None, output_final_state=False, cu_seqlens=None, cu_seqlens_cpu=None, **kw):
        if cu_seqlens is None:
            out, final = run_one(tensors, initial_state, **kw)
            return out, final if output_final_state else None
        assert tensors[0].shape[0] == 1 and torch.equal(cu_seqlens.cpu(), cu_seqlens_cpu)
        bounds = cu_seqlens_cpu.tolist()
        outs, finals = [], []
        for s, (start, end) in enumerate(zip(bounds[:-1], bounds[1:])):
            state = None if initial_state is None else initial_state[s : s + 1]
            out, final = run_one(tuple(t[:, start:end] for t in tensors), state, **kw)
            outs.append(out)
            finals.append(final)
        return torch.cat(outs, dim=1), torch.cat(finals) if output_final_state else None

    return kernel


def _gla_one(tensors, state, scale):
    q, k, v, g = tensors
    return gla_naive(q, k, v, g, scale=scale, initial_state_BHKV=state, return_final_state=True)


def _simple_gla_one(tensors, state, scale):
    q, k, v, g_BTH = tensors
    return _gla_one((q, k, v, g_BTH[..., None].expand_as(q)), state, scale)


def _fla_conv_one(tensors, state_BCK, weight, bias, activation):
    """fla's conv: a K-slot state whose oldest slot the conv never reads; final = last K inputs."""
    (x_BTC,) = tensors
    K = weight.shape[1]
    braid_state = None if state_BCK is None else state_BCK[..., 1:]
    y = causal_conv1d_reference(x_BTC, weight, bias, initial_state_BCK=braid_state, activation=activation)
    if state_BCK is None:
        state_BCK = x_BTC.new_zeros(x_BTC.shape[0], x_BTC.shape[2], K)
    padded_BTC = torch.cat([state_BCK.transpose(1, 2), x_BTC], dim=1)
    return y, padded_BTC[:, -K:].transpose(1, 2)


def _grads(fn, leaves: dict, seed: int = 1):
    """Outputs and gradients of sum(out * fixed random cotangents) over every returned tensor."""
    leaves = {k: v.clone().requires_grad_(True) for k, v in leaves.items() if v is not None}
    outs = fn(**leaves)
    outs = outs if isinstance(outs, tuple) else (outs,)
    gen = torch.Generator().manual_seed(seed)
    loss = sum((o * torch.randn(o.shape, generator=gen, dtype=o.dtype)).sum() for o in outs)
    grads = torch.autograd.grad(loss, list(leaves.values()))
    return [o.detach() for o in outs], dict(zip(leaves, grads))


def _assert_same(fast, ref, tol):
    (outs, grads), (ref_outs, ref_grads) = fast, ref
    for out, ref_out in zip(outs, ref_outs, strict=True):
        torch.testing.assert_close(out, ref_out, **tol)
    for name in ref_grads:
        torch.testing.assert_close(grads[name], ref_grads[name], **tol, msg=lambda m, n=name: f"grad {n}: {m}")


LAYOUTS = {  # document lengths per row, T = 9
    "no_docs": None,
    "docs": [[2, 6, 1], [9]],
    "single_tokens": [[1] * 9, [4, 5]],
}


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("with_state", [False, True])
def test_ssd_via_simple_gla_matches_the_recurrence(layout, with_state):
    gen = torch.Generator().manual_seed(0)
    B, T, H, P, G, N = 2, 9, 4, 3, 2, 5
    doc_ids = None if LAYOUTS[layout] is None else _doc_ids(LAYOUTS[layout])
    leaves = dict(
        x_BTHP=torch.randn(B, T, H, P, generator=gen, dtype=torch.float64),
        dt_BTH=torch.rand(B, T, H, generator=gen, dtype=torch.float64) * 0.5 + 0.01,
        A_H=-torch.rand(H, generator=gen, dtype=torch.float64) * 3 - 0.1,
        B_BTGN=torch.randn(B, T, G, N, generator=gen, dtype=torch.float64),
        C_BTGN=torch.randn(B, T, G, N, generator=gen, dtype=torch.float64),
        D_H=torch.randn(H, generator=gen, dtype=torch.float64),
        initial_state_BHPN=torch.randn(B, H, P, N, generator=gen, dtype=torch.float64) if with_state else None,
    )
    kernel = _varlen_kernel(_simple_gla_one)
    common = dict(doc_ids_BT=doc_ids, return_final_state=True)
    fast = _grads(lambda **kw: ssd_via_simple_gla(kernel, **kw, **common), leaves)
    ref = _grads(lambda **kw: ssd_naive(**kw, **common), leaves)
    _assert_same(fast, ref, F64)


def test_ssd_step_via_recurrent_simple_gla():
    gen = torch.Generator().manual_seed(0)
    B, H, P, G, N = 2, 4, 3, 2, 5
    args = (
        torch.randn(B, H, P, generator=gen, dtype=torch.float64),
        torch.rand(B, H, generator=gen, dtype=torch.float64),
        -torch.rand(H, generator=gen, dtype=torch.float64),
        torch.randn(B, G, N, generator=gen, dtype=torch.float64),
        torch.randn(B, G, N, generator=gen, dtype=torch.float64),
        torch.randn(B, H, P, N, generator=gen, dtype=torch.float64),
        torch.randn(H, generator=gen, dtype=torch.float64),
    )

    def recurrent(q, k, v, g, scale, initial_state, output_final_state):
        g_BHK = g[:, 0, :, None].expand_as(q[:, 0])
        o_BHV, state = gla_step_reference(q[:, 0], k[:, 0], v[:, 0], g_BHK, initial_state, scale)
        return o_BHV[:, None], state

    y, state = ssd_step_via_simple_gla(recurrent, *args)
    y_ref, state_ref = ssd_step_reference(*args)
    torch.testing.assert_close(y, y_ref, **F64)
    torch.testing.assert_close(state, state_ref, **F64)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("with_state", [False, True])
def test_gla_via_packed_matches_the_recurrence(layout, with_state):
    gen = torch.Generator().manual_seed(0)
    B, T, H, K, V = 2, 9, 2, 3, 4
    doc_ids = None if LAYOUTS[layout] is None else _doc_ids(LAYOUTS[layout])
    leaves = dict(
        q_BTHK=torch.randn(B, T, H, K, generator=gen, dtype=torch.float64),
        k_BTHK=torch.randn(B, T, H, K, generator=gen, dtype=torch.float64),
        v_BTHV=torch.randn(B, T, H, V, generator=gen, dtype=torch.float64),
        g_BTHK=F.logsigmoid(torch.randn(B, T, H, K, generator=gen, dtype=torch.float64)),
        initial_state_BHKV=torch.randn(B, H, K, V, generator=gen, dtype=torch.float64) if with_state else None,
    )
    kernel = _varlen_kernel(_gla_one)
    common = dict(doc_ids_BT=doc_ids, return_final_state=True, scale=0.7)
    fast = _grads(lambda **kw: gla_via_packed(kernel, **kw, **common), leaves)
    ref = _grads(lambda **kw: gla_naive(**kw, **common), leaves)
    _assert_same(fast, ref, F64)


def test_gla_step_via_recurrent():
    gen = torch.Generator().manual_seed(0)
    B, H, K, V = 2, 2, 3, 4
    args = [torch.randn(B, H, K, generator=gen, dtype=torch.float64) for _ in range(2)]
    args += [torch.randn(B, H, V, generator=gen, dtype=torch.float64)]
    args += [F.logsigmoid(torch.randn(B, H, K, generator=gen, dtype=torch.float64))]
    args += [torch.randn(B, H, K, V, generator=gen, dtype=torch.float64)]

    def recurrent(q, k, v, gk, scale, initial_state, output_final_state):
        o_BHV, state = gla_step_reference(q[:, 0], k[:, 0], v[:, 0], gk[:, 0], initial_state, scale)
        return o_BHV[:, None], state

    out, state = gla_step_via_recurrent(recurrent, *args, scale=0.5)
    out_ref, state_ref = gla_step_reference(*args, scale=0.5)
    torch.testing.assert_close(out, out_ref, **F64)
    torch.testing.assert_close(state, state_ref, **F64)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("with_state", [False, True])
def test_conv_via_packed_matches_the_reference(layout, with_state):
    gen = torch.Generator().manual_seed(0)
    B, T, C, K = 2, 9, 3, 4
    doc_ids = None if LAYOUTS[layout] is None else _doc_ids(LAYOUTS[layout])
    leaves = dict(
        x_BTC=torch.randn(B, T, C, generator=gen, dtype=torch.float64),
        weight_CK=torch.randn(C, K, generator=gen, dtype=torch.float64),
        bias_C=torch.randn(C, generator=gen, dtype=torch.float64),
        initial_state_BCK=torch.randn(B, C, K - 1, generator=gen, dtype=torch.float64) if with_state else None,
    )
    kernel = _varlen_kernel(_fla_conv_one)
    common = dict(doc_ids_BT=doc_ids, return_final_state=True, activation="silu")
    fast = _grads(lambda **kw: causal_conv1d_via_packed(kernel, **kw, **common), leaves)
    ref = _grads(lambda **kw: causal_conv1d_reference(**kw, **common), leaves)
    _assert_same(fast, ref, F64)


def test_run_packed_without_documents_passes_the_batch_through():
    kernel = _varlen_kernel(lambda tensors, state: (tensors[0] * 2, tensors[0].sum(1)))
    x = torch.randn(2, 3, 4)
    out, final = run_packed(kernel, (x,), doc_ids_BT=None, initial_state_Bx=None, return_final_state=True)
    torch.testing.assert_close(out, x * 2)
    torch.testing.assert_close(final, x.sum(1))


# FlexAttention masks (the flex kernel itself compiles only on GPUs; eager flex runs here).


@pytest.mark.parametrize("window", [None, 1, 4])
def test_flex_mask_mods_match_the_reference_mask(window):
    from torch.nn.attention.flex_attention import create_mask

    from braid.kernels.attention.flex import causal_mask_mod, document_mask_mod
    from braid.kernels.attention.reference import attention_mask

    doc_ids = _doc_ids([[3, 7, 1], [11]])
    T = doc_ids.shape[1]
    plain = create_mask(causal_mask_mod(window), 1, 1, T, T, device="cpu")
    docs = create_mask(document_mask_mod(doc_ids, window), 2, 1, T, T, device="cpu")
    assert torch.equal(plain[:, 0], attention_mask(T, T, window=window))
    assert torch.equal(docs[:, 0], attention_mask(T, T, window=window, doc_ids_BT=doc_ids))


def test_flex_block_masks_with_eager_flex_match_the_reference():
    from torch.nn.attention.flex_attention import flex_attention

    from braid.kernels.attention.flex import block_mask
    from braid.kernels.attention.reference import attention_reference

    gen = torch.Generator().manual_seed(0)
    B, T, H, J, D = 2, 11, 4, 2, 8
    q, k, v = (torch.randn(B, T, n, D, generator=gen) for n in (H, J, J))
    doc_ids = _doc_ids([[5, 6], [2, 2, 7]])
    mask = block_mask(T, 3, doc_ids, torch.device("cpu"))
    assert block_mask(T, 3, doc_ids, torch.device("cpu")) is mask
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # eager flex warns that it is unfused
        o_BHTD = flex_attention(*(t.transpose(1, 2) for t in (q, k, v)), block_mask=mask, enable_gqa=True)
    expected = attention_reference(q, k, v, window=3, doc_ids_BT=doc_ids)
    torch.testing.assert_close(o_BHTD.transpose(1, 2), expected, rtol=1e-5, atol=1e-5)


# Linear + cross-entropy (reference) and the SwiGLU activation.


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_chunked_linear_cross_entropy_matches_full_logits(reduction, monkeypatch):
    monkeypatch.setattr(ce_reference, "CHUNK_ELEMENTS", 3 * 11)  # 3 tokens per chunk: 7 tokens -> 3 chunks
    gen = torch.Generator().manual_seed(0)
    N, D, V = 7, 5, 11
    hidden = torch.randn(N, D, generator=gen, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(V, D, generator=gen, dtype=torch.float64, requires_grad=True)
    labels = torch.randint(0, V, (N,), generator=gen)
    labels[[1, 5]] = -100
    loss = linear_cross_entropy(hidden, weight, labels, reduction=reduction)
    expected = F.cross_entropy(hidden @ weight.T, labels, ignore_index=-100, reduction=reduction)
    torch.testing.assert_close(loss, expected, **F64)
    grads = torch.autograd.grad(loss, (hidden, weight))
    expected_grads = torch.autograd.grad(expected, (hidden, weight))
    for g, e in zip(grads, expected_grads):
        torch.testing.assert_close(g, e, **F64)


def test_linear_cross_entropy_computes_in_float32_under_autocast():
    gen = torch.Generator().manual_seed(0)
    hidden, weight = torch.randn(4, 8, generator=gen), torch.randn(16, 8, generator=gen)
    labels = torch.randint(0, 16, (4,), generator=gen)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = linear_cross_entropy(hidden, weight, labels)
    assert loss.dtype == torch.float32
    torch.testing.assert_close(loss, F.cross_entropy(hidden @ weight.T, labels), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize(
    "shapes, labels_dtype, reduction, message",
    [
        (((4, 8), (16, 7)), torch.int64, "mean", "one D"),
        (((4, 8), (16, 8)), torch.float32, "mean", "integer"),
        (((4, 8), (16, 8)), torch.int64, "none", "reduction"),
    ],
)
def test_linear_cross_entropy_rejects_bad_inputs(shapes, labels_dtype, reduction, message):
    (hidden_shape, weight_shape) = shapes
    with pytest.raises(ValueError, match=message):
        linear_cross_entropy(
            torch.zeros(hidden_shape), torch.zeros(weight_shape), torch.zeros(4, dtype=labels_dtype),
            reduction=reduction,
        )


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_silu_mul(dtype):
    gen = torch.Generator().manual_seed(0)
    gate, up = (torch.randn(3, 5, generator=gen).to(dtype) for _ in range(2))
    expected = (F.silu(gate.double()) * up.double()).to(dtype)
    torch.testing.assert_close(silu_mul(gate, up), expected, rtol=0, atol=0)
    with pytest.raises(ValueError, match="one shape"):
        silu_mul(gate, up[:, :4])


# braid's Triton norm kernels under Triton's interpreter.
#
# TRITON_INTERPRET must be set before triton is first imported (triton.language's own jit
# helpers such as tl.sum are built at that import), so the checks run in a fresh process.

NORM_CASES = [  # (rows, D, group_size, variant)
    (5, 40, 40, "plain"),
    (7, 48, 16, "gate_then_norm"),
    (3, 36, 12, "norm_then_gate"),  # group of 12: the tile of 16 is masked
    (1, 33, 33, "norm_then_gate"),
]


def _norm_pair(module, variant, group_size):
    eps = 1e-5
    if variant == "plain":
        return (lambda x, z, w: module.rms_norm_triton(x, w, eps)), (lambda x, z, w: rms_norm_reference(x, w, eps))
    before = variant == "norm_then_gate"
    return (
        lambda x, z, w: module.gated_rms_norm_triton(x, z, w, eps, group_size, before),
        lambda x, z, w: gated_rms_norm_reference(x, z, w, eps, group_size, before),
    )


def check_interpreted_norm_kernels() -> None:
    """Run in the child process: every NORM_CASES case in float32 and bfloat16, outputs and grads."""
    import triton

    from braid.kernels.norm import triton as kernels

    assert triton.knobs.runtime.interpret, "TRITON_INTERPRET=1 must be set before triton is imported"
    for rows, D, group_size, variant in NORM_CASES:
        for dtype in (torch.float32, torch.bfloat16):
            gen = torch.Generator().manual_seed(0)
            leaves = dict(
                x=torch.randn(2, rows, D, generator=gen).to(dtype),
                z=torch.randn(2, rows, D, generator=gen).to(dtype) if variant != "plain" else None,
                w=1 + 0.5 * torch.randn(D, generator=gen),
            )
            fast_fn, ref_fn = _norm_pair(kernels, variant, group_size)
            fast = _grads(lambda x, w, z=None, fn=fast_fn: fn(x, z, w), leaves)
            ref = _grads(lambda x, w, z=None, fn=ref_fn: fn(x, z, w), leaves)
            assert fast[0][0].dtype == dtype
            _assert_same(fast, ref, TRITON_F32 if dtype == torch.float32 else TRITON_BF16)
            print(f"ok {variant} rows={rows} D={D} group={group_size} {dtype}")


def test_triton_norm_kernels_match_the_reference_interpreted():
    run_interpreted("tests.kernels.test_dispatch:check_interpreted_norm_kernels", 2 * len(NORM_CASES), timeout=300)


def test_backend_probe_runs_outside_torch_compile(monkeypatch):
    """The first probe of a backend (its import) may be reached inside a torch.compile trace: it
    runs eagerly (dynamo tracing fla's import fails), and the compiled function still works."""
    monkeypatch.setattr(backend, "_probed", {})
    monkeypatch.setattr(backend, "_broken", {})
    imported = []
    monkeypatch.setattr(backend, "_probe", lambda module: imported.append(torch.compiler.is_compiling()))

    @torch.compile(backend="eager")
    def f(x):
        return x + 1 if backend.available("gla", "fla") else x - 1

    assert f(torch.zeros(2)).tolist() == [1.0, 1.0]
    assert imported == [False]
    backend.probe_all()
    assert set(backend._probed) == set(backend.BACKEND_MODULES.values())


def test_backend_module_lookup_is_traced_without_a_graph_break():
    """Every fast kernel call goes through backend_module: once loaded it is a dict lookup that
    dynamo traces (importlib.import_module, which dynamo skips, was a graph break per call)."""
    backend.backend_module("attention", "sdpa")

    def f(x):
        module = backend.backend_module("attention", "sdpa")
        return x + len(module.__name__)

    explain = torch._dynamo.explain(f)(torch.zeros(2))
    assert explain.graph_break_count == 0, explain.break_reasons
    assert torch.compile(f, backend="eager", fullgraph=True)(torch.zeros(2)).tolist() == [28.0, 28.0]
