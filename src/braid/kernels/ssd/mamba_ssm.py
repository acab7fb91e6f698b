"""SSD (Mamba-2) on mamba_ssm's Triton kernels (`mamba_chunk_scan_combined`).

`import mamba_ssm` fails on builds without its CUDA extensions (its package __init__ imports
selective_scan_cuda), yet its Triton SSD files need only triton and einops. So the package
is registered as an empty shell (its directory, __init__ not run) before importing
`mamba_ssm.ops.triton.ssd_combined`. Documents become mamba_ssm's seq_idx (each token's
segment number in its row); mamba_ssm carries an initial state into a row's first
segment only when no seq_idx is given, so doc ids with an initial state stay on the other
backends (the dispatcher excludes that call).

Shape legend: B batch, T time, H heads, P head dim, G groups of B/C, N state dim.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
import types

import torch
from torch import Tensor

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


# Opaque to torch.compile (a graph break): dynamo does not trace mamba_ssm's Python.
mamba_chunk_scan_combined = torch.compiler.disable(_load_ssd_combined().mamba_chunk_scan_combined)


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
    out = mamba_chunk_scan_combined(
        x_BTHP,
        dt_BTH,
        A_H.float(),
        B_BTGN.to(x_BTHP.dtype),
        C_BTGN.to(x_BTHP.dtype),
        _chunk_length(chunk_size),
        D=None if D_H is None else D_H.float(),
        initial_states=None if initial_state_BHPN is None else initial_state_BHPN.float(),
        seq_idx=seq_idx_BT,
        return_final_states=return_final_state,
    )
    if not return_final_state:
        return out.to(x_BTHP.dtype)
    y_BTHP, final_BHPN = out
    return y_BTHP.to(x_BTHP.dtype), final_BHPN.float()
