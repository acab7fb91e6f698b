"""SSD (Mamba-2) on mamba_ssm's Triton kernels (`mamba_chunk_scan_combined`).

`import mamba_ssm` fails on builds without its CUDA extensions (its package __init__ imports
selective_scan_cuda), yet its Triton SSD files need only triton and einops. So the package
is registered as an empty shell (its directory, __init__ not run) before importing
`mamba_ssm.ops.triton.ssd_combined`. Documents become mamba_ssm's seq_idx (each token's
segment number in its row); mamba_ssm carries an initial state into a row's first
segment only when no seq_idx is given, so doc ids with an initial state stay on the other
backends (the dispatcher excludes that call). Forward and backward run as custom ops
(`braid::mamba_ssd`, `braid::mamba_ssd_backward_kernels`), opaque but graph-breaking nowhere under
torch.compile; the backward's last sums run as torch ops after it (`decay_and_dt_grads`).
The pass over the chunks (state passing, forward and backward) runs on braid's kernels
(braid.kernels.ssd.pass_triton, op "ssd_pass") unless `BRAID_KERNELS=ssd_pass=reference`.

Shape legend: B batch, T time, H heads, P head dim, G groups of B/C, N state dim.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
import types

import torch
import torch.nn.functional as F
from torch import Tensor

from braid.kernels.autotune import add_configs
from braid.kernels.backend import backend_module, pick
from braid.kernels.custom_ops import cuda_op, drop_placeholder, optional_fake, optional_grad
from braid.kernels.streams import beside, join
from braid.kernels.varlen import segment_index_BT

SSD_COMBINED = "mamba_ssm.ops.triton.ssd_combined"


def _load_ssd_combined():
    """mamba_ssm's ssd_combined module: imported normally, else through an empty package shell."""
    try:
        return importlib.import_module(SSD_COMBINED)
    except ModuleNotFoundError as error:
        if error.name == "mamba_ssm":
            raise
    except ImportError:
        pass  # the package __init__ needs CUDA extensions that this build lacks
    spec = importlib.util.find_spec("mamba_ssm")
    shell = types.ModuleType("mamba_ssm")
    shell.__path__ = list(spec.submodule_search_locations)
    sys.modules["mamba_ssm"] = shell
    try:
        return importlib.import_module(SSD_COMBINED)
    except Exception as error:  # any failure of an optional backend's import means "not available"
        raise ImportError(f"mamba_ssm's Triton SSD does not load: {type(error).__name__}: {error}") from error


_combined = _load_ssd_combined()

# Configs added to mamba_ssm's autotune lists, (kwargs, num_warps, num_stages), by its module
# and kernel. Swept on an H200 at hybrid-374m's shape (B2 T8192 H32 P64 N128, chunk 128;
# docs/benchmarks.md, eleventh measurement): the library's best against the added one,
# chunk scan forward 183.7 -> 128.6 us and its dx backward 228.6 -> 183.3 us (both
# single-staged, which the library's lists lack), chunk states 86.4 -> 78.2 us, C·Bᵀ 11.1 -> 10.6 us.
_M64_N64_K32 = {"BLOCK_SIZE_M": 64, "BLOCK_SIZE_N": 64, "BLOCK_SIZE_K": 32}
_M64_N128_K64 = {"BLOCK_SIZE_M": 64, "BLOCK_SIZE_N": 128, "BLOCK_SIZE_K": 64}
EXTRA_CONFIGS = {
    ("ssd_chunk_scan", "_chunk_scan_fwd_kernel"): [(_M64_N64_K32, 4, 1)],
    ("ssd_combined", "_chunk_scan_chunk_state_bwd_dx_kernel"): [(_M64_N64_K32, 4, 1)],
    ("ssd_chunk_state", "_chunk_state_fwd_kernel"): [(_M64_N128_K64, 2, 4)],
    ("ssd_bmm", "_bmm_chunk_fwd_kernel"): [(_M64_N128_K64, 4, 4)],
}


def _add_extra_configs() -> None:
    """A kernel this mamba_ssm lacks (renamed in another version, or a test's stand-in module)
    is skipped rather than failing the import; the GPU test test_ssd_mamba_ssm_added_configs
    checks that each config was added."""
    for (module, kernel), configs in EXTRA_CONFIGS.items():
        autotuner = getattr(sys.modules.get(f"mamba_ssm.ops.triton.{module}"), kernel, None)
        if hasattr(autotuner, "configs"):
            add_configs(autotuner, configs)


_add_extra_configs()


def _kernel_layouts(x, B, C):
    """x, B and C as mamba_ssm's kernels take them: B and C contiguous, x with a stride-1 last
    or time dim (mamba_ssm's own check; a slice of a wider tensor is then read in place)."""
    x = x if x.stride(-1) == 1 or x.stride(1) == 1 else x.contiguous()
    return x, B.contiguous(), C.contiguous()


def _state_passing_fwd(states, dA_last, initial_states, seq_idx, chunk_size):
    """(states entering each chunk, final states), float32: braid's pass over the chunks (op
    "ssd_pass", backend "triton": braid.kernels.ssd.pass_triton) or mamba_ssm's."""
    if pick("ssd_pass", states, dA_last) == "triton":
        return backend_module("ssd_pass", "triton").state_pass(states, dA_last, initial_states, seq_idx, chunk_size)
    return _combined._state_passing_fwd(
        states, dA_last, initial_states=initial_states, seq_idx=seq_idx, chunk_size=chunk_size
    )


def _state_passing_bwd(states, dA_last, dstates, dfinal_states, seq_idx, has_initial_states, dtype, chunk_size):
    """(chunk terms' gradients in dtype, dA_last's gradient, initial states' gradient or None,
    states in dtype): the pass's backward on braid's kernel ("ssd_pass") or mamba_ssm's."""
    if pick("ssd_pass", states, dA_last, dstates) == "triton":
        return backend_module("ssd_pass", "triton").state_pass_backward(
            states, dA_last, dstates, dfinal_states, seq_idx, has_initial_states, dtype, dtype, chunk_size
        )
    return _combined._state_passing_bwd(
        states, dA_last, dstates, dfinal_states=dfinal_states, seq_idx=seq_idx, chunk_size=chunk_size,
        has_initial_states=has_initial_states, dstates_dtype=dtype, states_dtype=dtype,
    )


# mamba_ssm's forward and backward as two custom ops with fake kernels: torch.compile keeps
# them as opaque nodes of one graph (no graph break around each SSD, so the projections, conv
# and gated norm around it fuse, and gradients are summed inside the compiled backward).
#
# Both run mamba_ssm's kernels in the order its _mamba_chunk_scan_combined_fwd / _bwd run them,
# with one change: the forward keeps what the backward would otherwise recompute (dt and the
# cumulative decay per chunk, the float32 states entering each chunk, C·Bᵀ per chunk), so the
# backward skips four kernels (a hybrid-374m Mamba-2 layer at B2 T8192, H32 P64 N128, went
# from 3.04 to 2.91 ms fwd+bwd on an H200; it keeps about 140 MB more per layer). The states
# are passed in float32 instead of x's dtype: mamba_ssm's scan kernel casts them to C's dtype
# on load, so the output is the same, and the backward gets the float32 states its own
# recomputation makes, so the gradients are mamba_ssm's.
@cuda_op(
    "mamba_ssd",
    "(Tensor x, Tensor dt, Tensor A, Tensor B, Tensor C, Tensor? D, Tensor? initial_states, "
    "Tensor? seq_idx, int chunk_size) -> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)",
)
def _mamba_ssd(x, dt, A, B, C, D, initial_states, seq_idx, chunk_size):
    x, B, C = _kernel_layouts(x, B, C)
    N = B.shape[-1]
    dA_cumsum, dt_chunks = _combined._chunk_cumsum_fwd(dt, A, chunk_size)
    states = _combined._chunk_state_fwd(B, x, dt_chunks, dA_cumsum, seq_idx=seq_idx, states_in_fp32=True)
    states, final_states = _state_passing_fwd(
        states.flatten(-2), dA_cumsum[..., -1], None if initial_states is None else initial_states.flatten(-2),
        seq_idx, chunk_size,
    )
    states, final_states = states.unflatten(-1, (-1, N)), final_states.unflatten(-1, (-1, N))
    CB = _combined._bmm_chunk_fwd(C, B, chunk_size, seq_idx=seq_idx, output_dtype=torch.float32)
    out, _ = _combined._chunk_scan_fwd(CB, x, dt_chunks, dA_cumsum, C, states, D=D, seq_idx=seq_idx)
    return out, final_states.float(), dt_chunks, dA_cumsum, states, CB


@_mamba_ssd.register_fake
def _(x, dt, A, B, C, D, initial_states, seq_idx, chunk_size):
    batch, T, H, P = x.shape
    G, N = B.shape[-2:]
    chunks = -(-T // chunk_size)
    f32 = {"dtype": torch.float32}
    per_chunk = x.new_empty((batch, H, chunks, chunk_size), **f32)
    return (
        x.new_empty(x.shape), x.new_empty((batch, H, P, N), **f32), per_chunk, torch.empty_like(per_chunk),
        x.new_empty((batch, chunks, H, P, N), **f32), x.new_empty((batch, chunks, G, chunk_size, chunk_size), **f32),
    )


# The backward op returns the decay's gradient terms unsummed: their sums and the chunk-cumsum
# backward (mamba_ssm's eager tail, about ten small kernels a layer) run in the traced backward,
# where inductor fuses them, and dA comes out without atomics. A custom op's name changes with
# its outputs: inductor's on-disk graph cache knows an op by name, not by its fake, and reused
# a graph compiled against the earlier outputs (an assert_size_stride failure; H200, 2026-11-29).
@cuda_op(
    "mamba_ssd_backward_kernels",
    "(Tensor dout, Tensor? dfinal_states, Tensor x, Tensor dt, Tensor A, Tensor B, Tensor C, Tensor? D, "
    "Tensor? initial_states, Tensor? seq_idx, Tensor dt_chunks, Tensor dA_cumsum, Tensor states, Tensor CB) "
    "-> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)",
)
def _mamba_ssd_backward_kernels(dout, dfinal_states, x, dt, A, B, C, D, initial_states, seq_idx, dt_chunks,
                                dA_cumsum, states, CB):
    x, B, C = _kernel_layouts(x, B, C)
    dout = dout.contiguous()
    G, N = B.shape[-2:]
    # Two side-stream blocks overlap kernels that do not wait for each other (the same kernels
    # and sums as mamba_ssm's backward): the in-chunk terms, which need no state gradients,
    # beside the state-gradient pass; then dB and dC beside dx.
    with beside(x.device):
        dCB = _combined._chunk_scan_bwd_dcb(x, dt_chunks, dA_cumsum, dout, seq_idx=seq_idx, ngroups=G).to(CB.dtype)
        ddA = _combined._chunk_scan_bwd_ddAcs_stable(x, dt_chunks, dA_cumsum, dout, CB)
    dstates = _combined._chunk_scan_bwd_dstates(C, dA_cumsum, dout, seq_idx=seq_idx, dtype=states.dtype)
    # dstates[c] is the gradient of the state entering chunk c; states comes back in x's dtype.
    dstates, ddA_chunk_last, dinitial, states = _state_passing_bwd(
        states.flatten(-2), dA_cumsum[..., -1], dstates.flatten(-2),
        None if dfinal_states is None else dfinal_states.flatten(-2), seq_idx, initial_states is not None, x.dtype,
        dt_chunks.shape[-1],
    )
    states, dstates = states.unflatten(-1, (-1, N)), dstates.unflatten(-1, (-1, N))
    with beside(x.device):
        dB, ddA_next = _combined._chunk_state_bwd_db(x, dt_chunks, dA_cumsum, dstates, seq_idx=seq_idx, B=B, ngroups=G)
        dC, ddA_prev = _combined._chunk_scan_bwd_dC(states, dA_cumsum, dout, seq_idx=seq_idx, C=C, ngroups=G)
        dB = _combined._bmm_chunk_bwd(C, dCB, residual=dB)
        dC = _combined._bmm_chunk_bwd(B, dCB.transpose(-1, -2), residual=dC)
    dx, ddt_chunks, dD = _combined._chunk_scan_chunk_state_bwd_dx(
        x, dt_chunks, dA_cumsum, B, CB, dout, dstates, D=D, seq_idx=seq_idx
    )
    join(x.device)
    if dinitial is not None:
        dinitial = dinitial.unflatten(-1, (-1, N))
    grads = [dx.to(x.dtype), dB.to(B.dtype), dC.to(C.dtype)]
    return (*(g.contiguous() for g in grads), ddt_chunks, ddA, ddA_next, ddA_prev, ddA_chunk_last,
            optional_grad(dD, D, x), optional_grad(dinitial, initial_states, x))


@_mamba_ssd_backward_kernels.register_fake
def _(dout, dfinal_states, x, dt, A, B, C, D, initial_states, seq_idx, dt_chunks, dA_cumsum, states, CB):
    per_chunk = dt_chunks.new_empty(dt_chunks.shape)
    return (x.new_empty(x.shape), B.new_empty(B.shape), C.new_empty(C.shape), per_chunk,
            torch.empty_like(per_chunk), torch.empty_like(per_chunk), torch.empty_like(per_chunk),
            per_chunk.new_empty(per_chunk.shape[:-1]), optional_fake(D, x), optional_fake(initial_states, x))


def decay_and_dt_grads(ddA_in, ddA_next, ddA_prev, ddA_chunk_last, ddt_chunks, dt_chunks, dt, A):
    """(ddt, dA) from the decay's gradient terms, in plain torch ops: the tail of mamba_ssm's
    backward (its eager sums and `_chunk_cumsum_bwd` kernel, without dt bias or softplus, which
    braid applies outside), here in the traced backward so that inductor fuses it.

    The decay's gradient has three terms: the in-chunk scan's (ddA_in), the states' use in later
    chunks (a reverse cumsum of ddA_prev, whose last position also takes the chunk-to-chunk
    passing's ddA_chunk_last), and the chunk states' (ddA_next); summed in mamba_ssm's order.
    All (B, H, chunks, L) float32 but ddA_chunk_last (B, H, chunks); dt (B, T, H) is the op's
    input and dt_chunks its per-chunk copy (0 past T). dA is summed without atomics, so in a
    fixed order (mamba_ssm adds per-chunk partials atomically)."""
    L, T = ddA_prev.shape[-1], dt.shape[1]
    ddA_prev = ddA_prev + F.pad(ddA_chunk_last.unsqueeze(-1), (L - 1, 0))
    ddA = ddA_in + (ddA_next + ddA_prev.flip(-1).cumsum(dim=-1).flip(-1))
    ddt_BHT = (ddA * A.to(ddA.dtype)[:, None, None] + ddt_chunks).flatten(2)[..., :T]
    ddt_BTH = torch.where(dt < 0, 0.0, ddt_BHT.transpose(1, 2))  # dt was clamped to [0, inf) forward
    dA_H = (ddA * dt_chunks).sum(dim=(0, 2, 3))
    return ddt_BTH.to(dt.dtype), dA_H.to(A.dtype)


def _setup_context(ctx, inputs, output):
    x, dt, A, B, C, D, initial_states, seq_idx, chunk_size = inputs
    ctx.save_for_backward(x, dt, A, B, C, D, initial_states, seq_idx, *output[2:])


def _backward(ctx, dout, dfinal_states, *_kept):
    x, dt, A, B, C, D, initial_states, seq_idx, *kept = ctx.saved_tensors
    dx, dB, dC, ddt_chunks, ddA, ddA_next, ddA_prev, ddA_chunk_last, dD, dinitial = (
        torch.ops.braid.mamba_ssd_backward_kernels(
            dout, dfinal_states, x, dt, A, B, C, D, initial_states, seq_idx, *kept
        )
    )
    dt_chunks = kept[0]
    ddt, dA = decay_and_dt_grads(ddA, ddA_next, ddA_prev, ddA_chunk_last, ddt_chunks, dt_chunks, dt, A)
    return dx, ddt, dA, dB, dC, drop_placeholder(dD, D), drop_placeholder(dinitial, initial_states), None, None


_mamba_ssd.register_autograd(_backward, setup_context=_setup_context)


def _chunk_length(chunk_size: int) -> int:
    """mamba_ssm's tiles need a power-of-two chunk of at least 16; other values fall back to 64."""
    return chunk_size if chunk_size >= 16 and chunk_size & (chunk_size - 1) == 0 else 64


def ssd_mamba_ssm(
    x_BTHP: Tensor,
    dt_BTH: Tensor,
    A_H: Tensor,
    B_BTGN: Tensor,
    C_BTGN: Tensor,
    *,
    chunk_size: int = 64,
    D_H: Tensor | None = None,
    doc_ids_BT: Tensor | None = None,
    initial_state_BHPN: Tensor | None = None,
    return_final_state: bool = False,
) -> Tensor | tuple[Tensor, Tensor]:
    """`braid.kernels.ssd.ssd` on mamba_chunk_scan_combined (inputs already validated;
    not with doc ids and an initial state together)."""
    if doc_ids_BT is not None and initial_state_BHPN is not None:
        raise ValueError("ssd_mamba_ssm: doc ids with an initial state are not supported; use the fla backend")
    seq_idx_BT = None if doc_ids_BT is None else segment_index_BT(doc_ids_BT)
    y_BTHP, final_BHPN, *_kept = torch.ops.braid.mamba_ssd(
        x_BTHP,
        dt_BTH,
        A_H.float(),
        B_BTGN.to(x_BTHP.dtype),
        C_BTGN.to(x_BTHP.dtype),
        None if D_H is None else D_H.float(),
        None if initial_state_BHPN is None else initial_state_BHPN.float(),
        seq_idx_BT,
        _chunk_length(chunk_size),
    )
    return (y_BTHP, final_BHPN) if return_final_state else y_BTHP
