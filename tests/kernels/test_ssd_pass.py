"""braid's Mamba-2 pass over the chunks (braid.kernels.ssd.pass_triton: the state entering each
chunk, and the backward's gradients) against the recurrence written out in float64, run by
Triton's interpreter on CPU tensors (TRITON_INTERPRET=1 in a child process): rows with and
without initial and final states, documents (seq_idx) that start inside a chunk and at a
chunk's first token, a partial last chunk, chunk counts below, at and above a multiple of
the kernels' STEP, state sizes over one block and with a masked block.

Tolerance: float32 inputs, 1e-5 relative to float64 (float32 products and sums); outputs
cast to bf16 within 1e-2 (the interpreter's float32-to-bf16 conversion is not
round-to-nearest, one bf16 step apart at most). The GPU test (tests/gpu) checks the kernels
against mamba_ssm's.
"""

from __future__ import annotations

import pytest
import torch
import triton

from tests.helpers import nan_filled_empty, relative_error, run_interpreted

CASES = [  # (name, B, T, H, D, chunk L, seq_idx rows or None, initial / final states, bf16 outputs)
    ("rows", 2, 150, 2, 40, 16, None, False, False),
    ("rows, initial and final states", 2, 150, 2, 40, 16, None, True, False),
    ("two blocks, chunks a multiple of STEP", 1, 128, 1, 1100, 16, None, True, False),
    ("fewer chunks than STEP", 1, 40, 3, 24, 16, None, True, False),
    ("documents", 2, 150, 2, 40, 16, [[0] * 37 + [1] * 43 + [2] * 70, [0] * 64 + [1] * 80 + [2] * 6], False, False),
    ("documents, a later first document", 1, 100, 1, 24, 16, [[3] * 50 + [4] * 50], True, False),
    ("bf16 outputs", 1, 150, 2, 40, 16, None, True, True),
]


def decays(dA, seq_idx, T, L):
    """exp(dA) per chunk, (B, H, C) float64, 0 where chunk c's last token's document differs
    from chunk c-1's last token's (document 0 before the first chunk)."""
    decay = dA.double().exp()
    if seq_idx is not None:
        C = dA.shape[-1]
        last = torch.tensor([min((c + 1) * L, T) - 1 for c in range(C)])
        doc = seq_idx[:, last]
        before = torch.cat([torch.zeros_like(doc[:, :1]), doc[:, :-1]], dim=1)
        decay = torch.where((doc != before)[:, None, :], 0.0, decay)
    return decay


def oracle(states, dA, initial, dfinal, dbefore, seq_idx, T, L):
    """(before, final, dstates, ddA, dinitial) in float64 from the recurrence, chunk by chunk."""
    B, C, H, D = states.shape
    decay = decays(dA, seq_idx, T, L)
    state = torch.zeros(B, H, D, dtype=torch.float64) if initial is None else initial.double()
    before = []
    for c in range(C):
        before.append(state)
        state = decay[:, :, c, None] * state + states[:, c].double()
    before = torch.stack(before, dim=1)
    g = torch.zeros(B, H, D, dtype=torch.float64) if dfinal is None else dfinal.double()
    dstates, ddA = [None] * C, torch.zeros(B, H, C, dtype=torch.float64)
    for c in reversed(range(C)):
        dstates[c] = g
        ddA[:, :, c] = decay[:, :, c] * (before[:, c] * g).sum(-1)
        g = decay[:, :, c, None] * g + dbefore[:, c].double()
    return before, state, torch.stack(dstates, dim=1), ddA, g


def check_interpreted_ssd_pass() -> None:
    """Run in the child process: every CASES case forward and backward, one "ok" line each."""
    assert triton.knobs.runtime.interpret, "TRITON_INTERPRET=1 must be set before triton is imported"
    from braid.kernels.ssd.pass_triton import state_pass, state_pass_backward

    with nan_filled_empty():
        for name, B, T, H, D, L, docs, with_states, bf16 in CASES:
            gen = torch.Generator().manual_seed(len(name))
            C = -(-T // L)
            states = torch.randn(B, C, H, D, generator=gen)
            dA = -torch.rand(B, H, C, L, generator=gen).cumsum(-1) / 4  # mamba_ssm's in-chunk cumsum
            dA_last = dA[..., -1]  # a strided view, as braid passes it
            initial = torch.randn(B, H, D, generator=gen) if with_states else None
            dfinal = torch.randn(B, H, D, generator=gen) if with_states else None
            dbefore = torch.randn(B, C, H, D, generator=gen)
            seq_idx = None if docs is None else torch.tensor(docs, dtype=torch.int32)
            want = oracle(states, dA_last, initial, dfinal, dbefore, seq_idx, T, L)

            before, final = state_pass(states, dA_last, initial, seq_idx, chunk_size=L)
            assert before.dtype == final.dtype == torch.float32
            err = relative_error(before, want[0]), relative_error(final, want[1])
            assert max(err) < 1e-5, (name, "forward", err)
            print(f"ok {name} forward: before {err[0]:.1e} final {err[1]:.1e}")

            low = torch.bfloat16 if bf16 else None
            dstates, ddA, dinitial, cast = state_pass_backward(
                before, dA_last, dbefore, dfinal, seq_idx, want_dinitial=with_states, dstates_dtype=low,
                states_dtype=low, chunk_size=L,
            )
            assert ddA.shape == (B, H, C) and ddA.dtype == torch.float32
            tol = 1e-2 if bf16 else 1e-5
            err = [relative_error(dstates, want[2]), relative_error(ddA, want[3]), relative_error(cast, want[0])]
            if with_states:
                err.append(relative_error(dinitial, want[4]))
            else:
                assert dinitial is None
            assert dstates.dtype == cast.dtype == (low or torch.float32)
            assert max(err) < tol, (name, "backward", err)
            print(f"ok {name} backward: " + " ".join(f"{e:.1e}" for e in err))


def test_ssd_pass_matches_float64_interpreted():
    run_interpreted("tests.kernels.test_ssd_pass:check_interpreted_ssd_pass", 2 * len(CASES))


def test_ssd_pass_cases_cover_the_kernels_blocks_and_steps():
    """The cases keep covering a state over more than one block, and chunk counts below, at a
    multiple of and above STEP, whatever the kernels' BLOCK and STEP are set to."""
    from braid.kernels.ssd.pass_triton import BLOCK, STEP

    chunks = [-(-T // L) for _, _, T, _, _, L, *_ in CASES]
    assert max(D for _, _, _, _, D, *_ in CASES) > BLOCK
    assert min(chunks) < STEP
    assert any(c % STEP == 0 for c in chunks) and any(c > STEP and c % STEP for c in chunks)


def test_ssd_pass_needs_chunk_size_with_documents():
    from braid.kernels.ssd.pass_triton import state_pass, state_pass_backward

    x, dA, seq_idx = torch.zeros(1, 2, 1, 8), torch.zeros(1, 1, 2), torch.zeros(1, 20, dtype=torch.int32)
    with pytest.raises(ValueError, match="seq_idx needs chunk_size"):
        state_pass(x, dA, seq_idx_BT=seq_idx)
    with pytest.raises(ValueError, match="seq_idx needs chunk_size"):
        state_pass_backward(x, dA, x, seq_idx_BT=seq_idx)


@pytest.mark.parametrize("documents", [False, True], ids=["rows", "documents"])
@pytest.mark.parametrize("kernel", ["_pass_fwd_kernel", "_pass_bwd_kernel"])
def test_ssd_pass_kernels_compile_for_hopper(kernel, documents):
    """Both kernels compile to sm90 machine code with this machine's Triton and ptxas, no GPU
    needed (hybrid-374m's state size, P64 x N128 per head)."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from braid.kernels.ssd import pass_triton

    fn = getattr(pass_triton, kernel)
    constants = dict(H=32, BLOCK=pass_triton.BLOCK, STEP=pass_triton.STEP, HAS_INITIAL=True, HAS_DFINAL=True,
                     HAS_DINITIAL=True, HAS_SEQ_IDX=documents, CAST=True)
    types = dict(states="*fp32", before="*fp32", dbefore="*fp32", out="*fp32", final="*fp32", initial="*fp32",
                 dfinal="*fp32", dA="*fp32", dstates="*bf16", ddA_parts="*fp32", dinitial="*bf16",
                 before_cast="*bf16", seq_idx="*i32" if documents else "constexpr",
                 **dict.fromkeys(("D", "n_chunks", "T", "L"), "i32"),
                 **dict.fromkeys(("stride_ab", "stride_ah", "stride_ac", "stride_sb"), "i32"),
                 **dict.fromkeys(constants, "constexpr"))
    signature = {name: types[name] for name in fn.arg_names}
    constants = {name: value for name, value in constants.items() if name in signature}
    if not documents:
        constants["seq_idx"] = None
    compiled = triton.compile(ASTSource(fn=fn, signature=signature, constexprs=constants),
                              target=GPUTarget("cuda", 90, 32), options={"num_warps": pass_triton.NUM_WARPS})
    assert len(compiled.asm["cubin"]) > 0
