"""braid's GLA pass over the chunks (braid.kernels.gla.scan_triton: the states entering each
chunk, and their gradients) against the recurrence written out in float64, run by Triton's
interpreter on CPU tensors (TRITON_INTERPRET=1 in a child process): rows and packed
documents, partial last chunks, initial and final states, masked and multiple blocks, sequences of more
chunks than the pass takes in one step.

Tolerance: float32 inputs, 1e-5 relative to float64 (float32 products and sums). bf16 inputs
are checked on the GPU against fla's kernels (tests/gpu): with bf16 inputs the kernels round
the decayed operand to bf16 as fla does, and the interpreter's float32-to-bf16 conversion is
not round-to-nearest (0.0156 apart from torch's at most, over 256 N(0, 1) values; Triton 3.8),
so the oracle could not round the same way here.
"""

from __future__ import annotations

import math

import pytest
import torch
import triton

from tests.helpers import nan_filled_empty, relative_error, run_interpreted

CASES = [  # (name, lengths, packed, H, K, V, chunk, dtype, with initial state)
    ("rows", [100, 100], False, 2, 32, 48, 32, torch.float32, True),
    ("rows, no initial state", [100, 100], False, 2, 32, 64, 32, torch.float32, False),
    ("packed", [37, 93, 70], True, 2, 40, 32, 32, torch.float32, True),
    ("two blocks", [70], False, 1, 96, 80, 16, torch.float32, True),
    # more chunks than the pass takes in one step (scan_triton.STEP_PASS), ending part-way through a step
    ("rows, many chunks", [300, 300], False, 1, 16, 32, 16, torch.float32, True),
    ("packed, many chunks", [150, 45, 270], True, 1, 16, 16, 16, torch.float32, False),
]


def chunk_cumsum(step, lengths, chunk):
    """Cumulative sums of `step` over each chunk of each sequence (fla's chunk_local_cumsum)."""
    sums, start = [], 0
    for length in lengths:
        for s in range(start, start + length, chunk):
            sums.append(step[s:min(s + chunk, start + length)].cumsum(0))
        start += length
    return torch.cat(sums)


def oracle(a, b, gk, initial, lengths, chunk, scale, reverse):
    """(states, final) in float64 from the recurrence, sequence by sequence."""
    H, K, V = a.shape[1], a.shape[2], b.shape[2]
    states, finals, start = [], [], 0
    for n, length in enumerate(lengths):
        chunks = list(range(start, start + length, chunk))
        state = torch.zeros(H, K, V, dtype=torch.float64) if initial is None else initial[n].double()
        out = [None] * len(chunks)
        for index in (reversed(range(len(chunks))) if reverse else range(len(chunks))):
            s = chunks[index]
            e = min(s + chunk, start + length)
            g_last = gk[e - 1]
            if reverse:
                operand = (a[s:e] * scale).to(a.dtype)
                operand = (operand.float() * torch.exp2(gk[s:e].float())).to(a.dtype)
            else:
                operand = (a[s:e].float() * torch.exp2(g_last.float() - gk[s:e].float())).to(a.dtype)
            out[index] = state.clone()
            local = torch.einsum("thk,thv->hkv", operand.double(), b[s:e].to(a.dtype).double())
            state = torch.exp2(g_last.double())[:, :, None] * state + local
        states += out
        finals.append(state)
        start += length
    return torch.stack(states), torch.stack(finals)


def check_interpreted_gla_scan() -> None:
    """Run in the child process: every CASES case forward and backward, one "ok" line each."""
    assert triton.knobs.runtime.interpret, "TRITON_INTERPRET=1 must be set before triton is imported"
    from braid.kernels.gla.scan_triton import gla_state_grads, gla_states

    with nan_filled_empty():
        for name, lengths, packed, H, K, V, chunk, dtype, with_initial in CASES:
            gen = torch.Generator().manual_seed(len(name))
            total = sum(lengths)
            a = torch.randn(total, H, K, generator=gen).to(dtype)
            b = torch.randn(total, H, V, generator=gen).to(dtype)
            step = torch.nn.functional.logsigmoid(torch.randn(total, H, K, generator=gen) + 2) / 8 / math.log(2)
            gk = chunk_cumsum(step, lengths, chunk)
            initial = torch.randn(len(lengths), H, K, V, generator=gen) if with_initial else None
            for reverse in (False, True):
                scale = K**-0.5 if reverse else 1.0
                want_states, want_final = oracle(a, b, gk, initial, lengths, chunk, scale, reverse)
                if packed:
                    bounds = torch.tensor([0, *lengths]).cumsum(0)
                    pairs = [(i, c) for i, n in enumerate(lengths) for c in range(-(-n // chunk))]
                    rows = dict(cu_seqlens=bounds, chunk_indices=torch.tensor(pairs))
                    args = [t[None] for t in (a, b, gk)]
                else:
                    rows = {}
                    args = [t.reshape(len(lengths), lengths[0], *t.shape[1:]) for t in (a, b, gk)]
                if reverse:
                    states, final = gla_state_grads(*args, scale, dfinal_NHKV=initial, want_dinitial=True,
                                                    chunk_size=chunk, **rows)
                else:
                    states, final = gla_states(*args, initial_NHKV=initial, output_final_state=True,
                                               chunk_size=chunk, **rows)
                assert states.dtype == final.dtype == torch.float32
                err = relative_error(states.flatten(0, 1), want_states), relative_error(final, want_final)
                assert max(err) < 1e-5, (name, reverse, err)
                print(f"ok {name} {'backward' if reverse else 'forward'}: states {err[0]:.1e} final {err[1]:.1e}")


def test_gla_scan_matches_float64_interpreted():
    run_interpreted("tests.kernels.test_gla_scan:check_interpreted_gla_scan", 2 * len(CASES))


def test_gla_scan_needs_chunk_indices_with_documents():
    from braid.kernels.gla.scan_triton import gla_states

    x = torch.zeros(1, 8, 1, 16)
    with pytest.raises(ValueError, match="cu_seqlens needs chunk_indices"):
        gla_states(x, x, x, cu_seqlens=torch.tensor([0, 8]))


@pytest.mark.parametrize("varlen", [False, True], ids=["rows", "packed"])
@pytest.mark.parametrize("kernel", ["_local_states_kernel", "_pass_kernel"])
def test_gla_scan_kernels_compile_for_hopper(kernel, varlen):
    """Both kernels, forward and backward, compile to sm90 machine code with this machine's
    Triton and ptxas, no GPU needed."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from braid.kernels.gla import scan_triton

    fn = getattr(scan_triton, kernel)
    offsets = "*i64" if varlen else "constexpr"
    for reverse in (False, True):
        constants = dict(H=8, K=64, V=128, BT=64, BK=64, BV=64, NV=2, BLOCK=scan_triton.BLOCK_PASS,
                         STEP=scan_triton.STEP_PASS, IS_VARLEN=varlen, REVERSE=reverse,
                         EXACT_F32=False, HAS_INITIAL=True, HAS_FINAL=True)
        types = dict(a="*bf16", b="*bf16", gk="*fp32", out="*fp32", states="*fp32", initial="*fp32", final="*fp32",
                     cu_seqlens=offsets, chunk_indices=offsets, chunk_offsets=offsets, scale="fp32", T="i32",
                     **dict.fromkeys(constants, "constexpr"))
        signature = {name: types[name] for name in fn.arg_names}
        constants = {name: value for name, value in constants.items() if name in signature}
        if not varlen:
            constants.update({name: None for name in ("cu_seqlens", "chunk_indices", "chunk_offsets")
                              if name in signature})
        compiled = triton.compile(ASTSource(fn=fn, signature=signature, constexprs=constants),
                                  target=GPUTarget("cuda", 90, 32), options={"num_warps": 4, "num_stages": 2})
        assert len(compiled.asm["cubin"]) > 0
