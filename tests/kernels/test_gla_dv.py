"""braid's GLA value-gradient kernel (braid.kernels.gla.dv_triton) against its definition written
out in float64, run by Triton's interpreter on CPU tensors (TRITON_INTERPRET=1 in a child
process): rows and packed documents, partial last chunks, masked and multiple key and value
blocks, chunks of 16, 32 and 64.

Tolerance: float32 inputs, 1e-5 relative to float64 (float32 products and sums; on a GPU the
in-chunk dot runs in 3xTF32). bf16 inputs, where the kernel rounds the decayed keys and dh to
bf16 as fla does, are checked on the GPU against fla's kernel (tests/gpu): the interpreter's
float32-to-bf16 conversion is not round-to-nearest.
"""

from __future__ import annotations

import math

import pytest
import torch
import triton

from tests.helpers import nan_filled_empty, relative_error, run_interpreted

CASES = [  # (name, lengths (one row each, or packed), packed, H, K, V, chunk)
    ("rows", [100, 100], False, 2, 32, 48, 64),
    ("packed, K 40", [37, 93, 70], True, 2, 40, 32, 32),
    ("two key blocks, three value blocks", [50], False, 1, 96, 160, 16),
]


def chunk_log2_gates(lengths, H, K, chunk, gen):
    """In-chunk cumulative log2 decays (g <= 0, falling), restarting at each sequence and chunk."""
    gates = []
    for length in lengths:
        step = torch.nn.functional.logsigmoid(torch.randn(length, H, K, generator=gen) + 2) / 8 / math.log(2)
        gates.append(torch.cat([step[s:s + chunk].cumsum(0) for s in range(0, length, chunk)]))
    return torch.cat(gates)


def reference(k, g, A, do, dh, lengths, chunk):
    """dv (T, H, V) in float64 from the definition, chunk by chunk; dh holds one (H, K, V) per
    chunk, in the order the chunks come."""
    dv = torch.zeros(do.shape, dtype=torch.float64)
    start, c = 0, 0
    for length in lengths:
        for s in range(start, start + length, chunk):
            e = min(s + chunk, start + length)
            n = e - s
            A_c = torch.tril(A[s:e, :, :n].double().permute(1, 0, 2))  # [h, s, t], s >= t
            dv[s:e] = torch.einsum("hst,shv->thv", A_c, do[s:e].double())
            decayed = k[s:e].double() * torch.exp2(g[e - 1].double() - g[s:e].double())
            dv[s:e] += torch.einsum("thk,hkv->thv", decayed, dh[c].double())
            c += 1
        start += length
    return dv


def check_interpreted_gla_dv() -> None:
    """Run in the child process: every CASES case, one "ok" line each."""
    assert triton.knobs.runtime.interpret, "TRITON_INTERPRET=1 must be set before triton is imported"
    from braid.kernels.gla.dv_triton import gla_bwd_dv

    with nan_filled_empty():
        for name, lengths, packed, H, K, V, chunk in CASES:
            gen = torch.Generator().manual_seed(len(name))
            total = sum(lengths)
            chunks = sum(-(-n // chunk) for n in lengths)
            k = torch.randn(total, H, K, generator=gen)
            g = chunk_log2_gates(lengths, H, K, chunk, gen)
            A = torch.randn(total, H, chunk, generator=gen)
            do = torch.randn(total, H, V, generator=gen)
            dh = torch.randn(chunks, H, K, V, generator=gen)
            want = reference(k, g, A, do, dh, lengths, chunk)
            if packed:
                bounds = torch.tensor([0, *lengths]).cumsum(0)
                pairs = [(i, c) for i, n in enumerate(lengths) for c in range(-(-n // chunk))]
                rows = dict(cu_seqlens=bounds, chunk_indices=torch.tensor(pairs))
                args = [t[None] for t in (k, g, A, do, dh)]
            else:
                rows = {}
                B = len(lengths)
                args = [t.reshape(B, -1, *t.shape[1:]) for t in (k, g, A, do, dh)]
            dv = gla_bwd_dv(*args, chunk_size=chunk, **rows)
            assert dv.dtype == do.dtype
            err = relative_error(dv.reshape(want.shape), want)
            assert err < 1e-5, (name, err)
            print(f"ok {name}: {err:.1e}")


def test_gla_dv_matches_float64_interpreted():
    run_interpreted("tests.kernels.test_gla_dv:check_interpreted_gla_dv", len(CASES))


def test_gla_dv_checks_its_arguments():
    from braid.kernels.gla.dv_triton import gla_bwd_dv

    k, A, do = torch.zeros(1, 8, 1, 16), torch.zeros(1, 8, 1, 64), torch.zeros(1, 8, 1, 16)
    with pytest.raises(ValueError, match="cu_seqlens needs chunk_indices"):
        gla_bwd_dv(k, k, A, do, do, cu_seqlens=torch.tensor([0, 8]))
    with pytest.raises(ValueError, match="is not the chunk size 32"):
        gla_bwd_dv(k, k, A, do, do, chunk_size=32)


@pytest.mark.parametrize("varlen", [False, True], ids=["rows", "packed"])
def test_gla_dv_kernel_compiles_for_hopper(varlen):
    """The kernel compiles to sm90 machine code with this machine's Triton and ptxas, no GPU
    needed (hybrid-374m's GLA: H8 K64 V128, chunk 64)."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from braid.kernels.gla import dv_triton

    fn = dv_triton._gla_bwd_dv_kernel
    offsets = "*i64" if varlen else "constexpr"
    constants = dict(H=8, K=64, V=128, BT=64, BK=dv_triton.BK, BV=dv_triton.BV, NV=128 // dv_triton.BV,
                     IS_VARLEN=varlen, EXACT_F32=False)
    types = dict(k="*bf16", g="*fp32", A="*fp32", do="*bf16", dh="*fp32", dv="*bf16", cu_seqlens=offsets,
                 chunk_indices=offsets, T="i32", **dict.fromkeys(constants, "constexpr"))
    signature = {name: types[name] for name in fn.arg_names}
    if not varlen:
        constants.update(cu_seqlens=None, chunk_indices=None)
    compiled = triton.compile(ASTSource(fn=fn, signature=signature, constexprs=constants),
                              target=GPUTarget("cuda", 90, 32),
                              options={"num_warps": dv_triton.NUM_WARPS, "num_stages": dv_triton.NUM_STAGES})
    assert len(compiled.asm["cubin"]) > 0
