"""braid's GLA in-chunk kernels (braid.kernels.gla.intra_triton: the scores A forward, dq and dk
backward) against the definition
written out in float64, run by Triton's interpreter on CPU tensors (TRITON_INTERPRET=1 in a
child process): rows and packed documents, partial last chunks, channel blocks with masked
channels, two channel blocks, and gates steep enough that the diagonal blocks take the row-by-row pass.

Tolerance: A, dq and dk are float32 sums of float32 products (the interpreter's dots are float32;
on a GPU they run in 3xTF32), 1e-5 relative to float64.
"""

from __future__ import annotations

import math

import pytest
import torch
import triton

from tests.helpers import nan_filled_empty, relative_error, run_interpreted

CASES = [  # (name, lengths of the sequences (one row each, or packed), packed, H, K, chunk, gate scale, max_split)
    ("rows", [100, 100], False, 2, 32, 64, 2.0, None),
    ("rows row-by-row", [100, 100], False, 2, 32, 64, 2.0, -1.0),
    ("steep gates", [100, 100], False, 2, 32, 64, 300.0, None),
    ("packed, K 40", [37, 93, 70], True, 2, 40, 64, 2.0, None),
    ("short chunk", [10], False, 3, 16, 16, 2.0, None),
    ("two channel blocks, chunk 32", [30, 30], False, 2, 96, 32, 2.0, None),
]


def chunk_log2_gates(lengths, H, K, chunk, scale, gen):
    """In-chunk cumulative log2 decays (g <= 0, falling), restarting at each sequence and chunk."""
    gates = []
    for length in lengths:
        step = torch.nn.functional.logsigmoid(torch.randn(length, H, K, generator=gen, dtype=torch.float64) * scale
                                              - scale / 4) / 16 / math.log(2)
        chunks = [step[s:s + chunk].cumsum(0) for s in range(0, length, chunk)]
        gates.append(torch.cat(chunks))
    return gates


def reference(q, k, g, dA, lengths, chunk):
    """(dq, dk) in float64 from the definition, sequence by sequence, chunk by chunk; (T, H, K)
    float64 inputs on any device (tests/gpu runs it on the GPU, row by row)."""
    dq, dk = torch.zeros_like(q), torch.zeros_like(k)
    start = 0
    for length in lengths:
        for s in range(start, start + length, chunk):
            e = min(s + chunk, start + length)
            n = e - s
            gc = g[s:e]
            lower = torch.ones(n, n, dtype=torch.bool, device=q.device).tril()[:, :, None, None]
            exponent = torch.where(lower, gc[:, None] - gc[None, :], -math.inf)  # [i, j, H, K]
            decay = torch.exp2(exponent)
            dAc = dA[s:e, :, :n].permute(0, 2, 1)[..., None]  # [i, j, H, 1]
            dq[s:e] = (dAc * decay * k[None, s:e]).sum(1)
            dk[s:e] = (dAc * decay * q[s:e, None]).sum(0)
        start += length
    return dq, dk


def reference_scores(q, k, g, lengths, chunk, scale):
    """The in-chunk attention scores A (T, H, chunk) in float64: zero above the diagonal."""
    A = torch.zeros(q.shape[0], q.shape[1], chunk, dtype=torch.float64, device=q.device)
    start = 0
    for length in lengths:
        for s in range(start, start + length, chunk):
            e = min(s + chunk, start + length)
            n, gc = e - s, g[s:e]
            lower = torch.ones(n, n, dtype=torch.bool, device=q.device).tril()[:, :, None, None]
            decay = torch.exp2(torch.where(lower, gc[:, None] - gc[None, :], -math.inf))  # [i, j, H, K]
            A[s:e, :, :n] = (q[s:e, None] * k[None, s:e] * decay).sum(-1).permute(0, 2, 1) * scale
        start += length
    return A


def check_interpreted_gla_intra() -> None:
    """Run in the child process: every CASES case, one "ok" line each."""
    import triton

    from braid.kernels.gla.intra_triton import MAX_SPLIT, gla_bwd_intra, gla_fwd_intra

    assert triton.knobs.runtime.interpret, "TRITON_INTERPRET=1 must be set before triton is imported"
    with nan_filled_empty():
        _check_cases(gla_bwd_intra, gla_fwd_intra, MAX_SPLIT)


def _check_cases(gla_bwd_intra, gla_fwd_intra, MAX_SPLIT) -> None:
    for name, lengths, packed, H, K, chunk, scale, max_split in CASES:
        gen = torch.Generator().manual_seed(len(name))
        total = sum(lengths)
        q64 = torch.randn(total, H, K, generator=gen, dtype=torch.float64)
        k64 = torch.randn(total, H, K, generator=gen, dtype=torch.float64)
        g64 = torch.cat(chunk_log2_gates(lengths, H, K, chunk, scale, gen))
        # the steep case's first diagonal block spans more than MAX_SPLIT: its row-by-row pass runs
        assert ((g64[:16] - g64[0]).abs().max().item() > MAX_SPLIT) == (scale > 100), name
        dA64 = torch.randn(total, H, chunk, generator=gen, dtype=torch.float64)
        q, k = q64.to(torch.bfloat16), k64.to(torch.bfloat16)
        g, dA = g64.float(), dA64.float()
        want_dq, want_dk = reference(q.double(), k.double(), g.double(), dA.double(), lengths, chunk)
        scale = K**-0.5
        want_A = reference_scores(q.double(), k.double(), g.double(), lengths, chunk, scale)
        kwargs = dict(chunk_size=chunk, max_split=MAX_SPLIT if max_split is None else max_split)
        if packed:
            bounds = torch.tensor([0, *lengths]).cumsum(0)
            pairs = [(i, c) for i, n in enumerate(lengths) for c in range(-(-n // chunk))]
            varlen = dict(cu_seqlens=bounds, chunk_indices=torch.tensor(pairs))
            dq, dk = gla_bwd_intra(q[None], k[None], g[None], dA[None], **varlen, **kwargs)
            A = gla_fwd_intra(q[None], k[None], g[None], scale, **varlen, **kwargs)
            dq, dk, A = dq[0], dk[0], A[0]
        else:
            rows = len(lengths)
            shape = (rows, lengths[0])
            q, k, g, dA = (t.reshape(*shape, *t.shape[1:]) for t in (q, k, g, dA))
            dq, dk = gla_bwd_intra(q, k, g, dA, **kwargs)
            A = gla_fwd_intra(q, k, g, scale, **kwargs)
            dq, dk, A = dq.flatten(0, 1), dk.flatten(0, 1), A.flatten(0, 1)
        assert dq.dtype == dk.dtype == A.dtype == torch.float32
        err = relative_error(dq, want_dq), relative_error(dk, want_dk), relative_error(A, want_A)
        assert max(err) < 1e-5, (name, err)
        assert (A[want_A == 0] == 0).all(), name  # zero above the diagonal, where fla leaves it unwritten
        print(f"ok {name}: dq {err[0]:.1e} dk {err[1]:.1e} A {err[2]:.1e}")


def test_gla_bwd_intra_matches_float64_interpreted():
    run_interpreted("tests.kernels.test_gla_intra:check_interpreted_gla_intra", len(CASES))



@pytest.mark.parametrize("varlen", [False, True], ids=["rows", "packed"])
@pytest.mark.parametrize("kernel", ["_gla_fwd_intra_kernel", "_gla_bwd_intra_kernel"])
def test_gla_intra_kernels_compile_for_hopper(kernel, varlen):
    """Both kernels compile to sm90 machine code with this machine's Triton and ptxas, no GPU
    needed (the interpreter above runs the Python, not the compiler)."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from braid.kernels.gla import intra_triton

    fn = getattr(intra_triton, kernel)
    constants = dict(H=8, K=64, BT=64, BC=16, BK=64, NC=4, NK=1, IS_VARLEN=varlen, MAX_R=64.0)
    offsets = "*i64" if varlen else "constexpr"
    types = dict(q="*bf16", k="*bf16", g="*fp32", A="*fp32", dA="*fp32", dq="*fp32", dk="*fp32", scale="fp32",
                 T="i32", cu_seqlens=offsets, chunk_indices=offsets, **dict.fromkeys(constants, "constexpr"))
    signature = {name: types[name] for name in fn.arg_names}
    constants = {name: value for name, value in constants.items() if name in signature}
    if not varlen:
        constants.update(cu_seqlens=None, chunk_indices=None)
    compiled = triton.compile(ASTSource(fn=fn, signature=signature, constexprs=constants),
                              target=GPUTarget("cuda", 90, 32), options={"num_warps": 2, "num_stages": 3})
    assert len(compiled.asm["cubin"]) > 0
