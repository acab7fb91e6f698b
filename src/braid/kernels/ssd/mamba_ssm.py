"""SSD (Mamba-2) on mamba_ssm's Triton kernels (`mamba_chunk_scan_combined`).

`import mamba_ssm` fails on builds without its CUDA extensions (its package __init__ imports
selective_scan_cuda), yet its Triton SSD files need only triton and einops. So the package
is registered as an empty shell (its directory, __init__ not run) before importing
`mamba_ssm.ops.triton.ssd_combined`. Documents become mamba_ssm's seq_idx (each token's
segment number in its row); mamba_ssm carries an initial state into a row's first
segment only when no seq_idx is given, so doc ids with an initial state stay on the other
backends (the dispatcher excludes that call). Forward and backward run as custom ops
(`braid::mamba_ssd`, `braid::mamba_ssd_backward`), opaque but graph-breaking nowhere under
torch.compile.

Shape legend: B batch, T time, H heads, P head dim, G groups of B/C, N state dim.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
import types

import torch
from torch import Tensor

from braid.kernels.custom_ops import cuda_op, drop_placeholder, optional_fake, optional_grad
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


# mamba_ssm's forward and backward as two custom ops with fake kernels: torch.compile keeps
# them as opaque nodes of one graph (no graph break around each SSD, so the projections, conv
# and gated norm around it fuse, and gradients are summed inside the compiled backward).
@cuda_op(
    "mamba_ssd",
    "(Tensor x, Tensor dt, Tensor A, Tensor B, Tensor C, Tensor? D, Tensor? initial_states, "
    "Tensor? seq_idx, int chunk_size) -> (Tensor, Tensor)",
)
def _mamba_ssd(x, dt, A, B, C, D, initial_states, seq_idx, chunk_size):
    out, _, _, _, _, final_states = _combined._mamba_chunk_scan_combined_fwd(
        x, dt, A, B, C, chunk_size, D=D, initial_states=initial_states, seq_idx=seq_idx
    )
    return out.to(x.dtype).contiguous(), final_states.float().contiguous()


@_mamba_ssd.register_fake
def _(x, dt, A, B, C, D, initial_states, seq_idx, chunk_size):
    batch, _, heads, head_dim = x.shape
    return x.new_empty(x.shape), x.new_empty((batch, heads, head_dim, B.shape[-1]), dtype=torch.float32)


@cuda_op(
    "mamba_ssd_backward",
    "(Tensor dout, Tensor? dfinal_states, Tensor x, Tensor dt, Tensor A, Tensor B, Tensor C, Tensor out, "
    "Tensor? D, Tensor? initial_states, Tensor? seq_idx, int chunk_size) "
    "-> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)",
)
def _mamba_ssd_backward(dout, dfinal_states, x, dt, A, B, C, out, D, initial_states, seq_idx, chunk_size):
    dx, ddt, dA, dB, dC, dD, _, _, dinitial = _combined._mamba_chunk_scan_combined_bwd(
        dout.contiguous(), x, dt, A, B, C, out, chunk_size, D=D, initial_states=initial_states,
        dfinal_states=dfinal_states, seq_idx=seq_idx,
    )
    grads = [dx.to(x.dtype), ddt.to(dt.dtype), dA.to(A.dtype), dB.to(B.dtype), dC.to(C.dtype)]
    return (*(g.contiguous() for g in grads), optional_grad(dD, D, x), optional_grad(dinitial, initial_states, x))


@_mamba_ssd_backward.register_fake
def _(dout, dfinal_states, x, dt, A, B, C, out, D, initial_states, seq_idx, chunk_size):
    return (x.new_empty(x.shape), dt.new_empty(dt.shape), A.new_empty(A.shape), B.new_empty(B.shape),
            C.new_empty(C.shape), optional_fake(D, x), optional_fake(initial_states, x))


def _setup_context(ctx, inputs, output):
    x, dt, A, B, C, D, initial_states, seq_idx, chunk_size = inputs
    ctx.save_for_backward(x, dt, A, B, C, output[0], D, initial_states, seq_idx)
    ctx.chunk_size = chunk_size


def _backward(ctx, dout, dfinal_states):
    x, dt, A, B, C, out, D, initial_states, seq_idx = ctx.saved_tensors
    dx, ddt, dA, dB, dC, dD, dinitial = torch.ops.braid.mamba_ssd_backward(
        dout, dfinal_states, x, dt, A, B, C, out, D, initial_states, seq_idx, ctx.chunk_size
    )
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
    y_BTHP, final_BHPN = torch.ops.braid.mamba_ssd(
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
