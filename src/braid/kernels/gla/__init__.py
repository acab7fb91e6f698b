"""Gated linear attention (Yang et al. 2023): public ops that validate inputs and dispatch.

On CUDA they run fla's chunk_gla / fused_recurrent_gla (braid.kernels.gla.fla), elsewhere
the pure-PyTorch references (see braid.kernels.backend).

Legend: B batch, T time, H heads, K key head dim, V value head dim.
"""

from __future__ import annotations

from torch import Tensor

from braid.kernels.backend import backend_module, pick
from braid.kernels.gla.reference import gla_chunked, gla_step_reference

__all__ = ["gla", "gla_step"]


def _check_float(name: str, t: Tensor) -> None:
    if not t.is_floating_point():
        raise ValueError(f"gla: {name} must be a floating-point tensor, got dtype {t.dtype}")


def _check_inputs(q: Tensor, k: Tensor, v: Tensor, g: Tensor, layout: str) -> None:
    """q, k, g share one shape; v matches them in every dim but the last."""
    ndim = layout.count(",") + 1
    for name, t in (("q", q), ("k", k), ("v", v), ("g", g)):
        if t.ndim != ndim:
            raise ValueError(f"gla: {name} must be {layout} ({ndim} dims), got shape {tuple(t.shape)}")
        _check_float(name, t)
    if k.shape != q.shape or g.shape != q.shape:
        raise ValueError(
            f"gla: q, k and g must share one {layout} shape, got q {tuple(q.shape)}, "
            f"k {tuple(k.shape)}, g {tuple(g.shape)}"
        )
    if v.shape[:-1] != q.shape[:-1]:
        raise ValueError(
            f"gla: v {tuple(v.shape)} must match q {tuple(q.shape)} in every dim but the last ({layout})"
        )


def _check_state(name: str, state_BHKV: Tensor, B: int, H: int, K: int, V: int) -> None:
    if tuple(state_BHKV.shape) != (B, H, K, V):
        raise ValueError(f"gla: {name} must have shape (B, H, K, V)={(B, H, K, V)}, got {tuple(state_BHKV.shape)}")
    _check_float(name, state_BHKV)


def gla(
    q_BTHK: Tensor,
    k_BTHK: Tensor,
    v_BTHV: Tensor,
    g_BTHK: Tensor,
    *,
    scale: float | None = None,
    chunk_size: int = 64,
    doc_ids_BT: Tensor | None = None,
    initial_state_BHKV: Tensor | None = None,
    return_final_state: bool = False,
):
    """Gated linear attention over a sequence.

        S_t = diag(exp(g_t)) S_{t-1} + k_t^T v_t        o_t = (scale * q_t) S_t

    q_BTHK, k_BTHK: queries and keys; v_BTHV: values; g_BTHK: per-key-dim log decay (<= 0,
    e.g. logsigmoid of a gate logit). scale defaults to K**-0.5. doc_ids_BT (integer,
    contiguous runs) restarts the state at every new document; initial_state_BHKV applies
    to each row's first document only. Computes in float32 (float64 for float64 inputs).

    Returns o_BTHV in v's dtype, and with return_final_state also the state after the last
    token (of the last document), float32 or float64, shape (B, H, K, V). chunk_size sets
    the reference's chunk; fla chooses its own.
    """
    _check_inputs(q_BTHK, k_BTHK, v_BTHV, g_BTHK, "(B, T, H, K)")
    B, T, H, K = q_BTHK.shape
    if T == 0:
        raise ValueError("gla: the sequence is empty (T=0); pass at least one token")
    if chunk_size <= 0:
        raise ValueError(f"gla: chunk_size must be positive, got {chunk_size}")
    if doc_ids_BT is not None:
        if tuple(doc_ids_BT.shape) != (B, T):
            raise ValueError(f"gla: doc_ids_BT must have shape (B, T)={(B, T)}, got {tuple(doc_ids_BT.shape)}")
        if doc_ids_BT.is_floating_point() or doc_ids_BT.is_complex():
            raise ValueError(f"gla: doc_ids_BT must be an integer tensor, got dtype {doc_ids_BT.dtype}")
    if initial_state_BHKV is not None:
        _check_state("initial_state_BHKV", initial_state_BHKV, B, H, K, v_BTHV.shape[-1])
    kwargs = dict(
        scale=scale, doc_ids_BT=doc_ids_BT, initial_state_BHKV=initial_state_BHKV,
        return_final_state=return_final_state,
    )
    if pick("gla", q_BTHK, k_BTHK, v_BTHV, g_BTHK, initial_state_BHKV) == "fla":
        return backend_module("gla", "fla").gla_fla(q_BTHK, k_BTHK, v_BTHV, g_BTHK, **kwargs)
    return gla_chunked(q_BTHK, k_BTHK, v_BTHV, g_BTHK, chunk_size=chunk_size, **kwargs)


def gla_step(
    q_BHK: Tensor, k_BHK: Tensor, v_BHV: Tensor, g_BHK: Tensor, state_BHKV: Tensor, scale: float | None = None
) -> tuple[Tensor, Tensor]:
    """One decode step of `gla`: returns o_BHV (v's dtype) and the new state_BHKV
    (float32, or float64 for float64 inputs). The input state is not modified."""
    _check_inputs(q_BHK, k_BHK, v_BHV, g_BHK, "(B, H, K)")
    B, H, K = q_BHK.shape
    _check_state("state_BHKV", state_BHKV, B, H, K, v_BHV.shape[-1])
    if pick("gla_step", q_BHK, k_BHK, v_BHV, g_BHK, state_BHKV) == "fla":
        return backend_module("gla_step", "fla").gla_step_fla(q_BHK, k_BHK, v_BHV, g_BHK, state_BHKV, scale)
    return gla_step_reference(q_BHK, k_BHK, v_BHV, g_BHK, state_BHKV, scale)

