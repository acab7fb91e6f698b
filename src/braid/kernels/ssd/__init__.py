"""Mamba-2 SSD scan and the depthwise causal convolution in front of it.

`ssd` validates its inputs and picks a backend (braid.kernels.backend): on CUDA fla's
chunk_simple_gla (braid.kernels.ssd.fla) or mamba_ssm's mamba_chunk_scan_combined
(braid.kernels.ssd.mamba_ssm), elsewhere the chunked pure-PyTorch reference (the CPU path).

Shape legend: B batch, T time, H heads, P head dim, G groups of B/C, N state dim.
"""

from __future__ import annotations

from torch import Tensor

from braid.kernels.backend import backend_module, pick
from braid.kernels.ssd.conv import causal_conv1d, causal_conv1d_step
from braid.kernels.ssd.reference import ssd_chunked, ssd_step_reference

__all__ = ["causal_conv1d", "causal_conv1d_step", "ssd", "ssd_step"]


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise ValueError(message)


def _require_float(**tensors: Tensor | None) -> None:
    for name, t in tensors.items():
        if t is not None:
            _require(t.is_floating_point(), f"{name} must be a floating-point tensor, got {t.dtype}")


def _check_heads(H: int, G: int, N: int, **vectors_H: Tensor | None) -> None:
    _require(
        G > 0 and H % G == 0,
        f"the number of heads H={H} must be a multiple of the number of B/C groups G={G}",
    )
    _require(N > 0, "the state dim N (last dim of B and C) must be positive")
    for name, v in vectors_H.items():
        if v is not None:
            _require(tuple(v.shape) == (H,), f"{name} must have shape (H,)=({H},), got {tuple(v.shape)}")


def _check_sequence_inputs(x_BTHP, dt_BTH, A_H, B_BTGN, C_BTGN, chunk_size, D_H, doc_ids_BT, initial_state_BHPN):
    _require_float(x=x_BTHP, dt=dt_BTH, A=A_H, B=B_BTGN, C=C_BTGN, D=D_H, initial_state=initial_state_BHPN)
    _require(x_BTHP.ndim == 4, f"x must be (batch, time, heads, head_dim), got shape {tuple(x_BTHP.shape)}")
    batch, T, H, P = x_BTHP.shape
    _require(T > 0, "ssd needs at least one time step (x has T=0)")
    _require(
        tuple(dt_BTH.shape) == (batch, T, H),
        f"dt must have shape (batch, time, heads)={(batch, T, H)} to match x, got {tuple(dt_BTH.shape)}",
    )
    _require(
        B_BTGN.ndim == 4 and tuple(B_BTGN.shape[:2]) == (batch, T),
        f"B must be (batch, time, groups, d_state) with batch, time={batch, T}, got {tuple(B_BTGN.shape)}",
    )
    _require(
        C_BTGN.shape == B_BTGN.shape,
        f"C must have the same shape as B {tuple(B_BTGN.shape)}, got {tuple(C_BTGN.shape)}",
    )
    G, N = B_BTGN.shape[2:]
    _check_heads(H, G, N, A=A_H, D=D_H)
    _require(
        isinstance(chunk_size, int) and chunk_size > 0, f"chunk_size must be a positive int, got {chunk_size!r}"
    )
    if doc_ids_BT is not None:
        _require(
            tuple(doc_ids_BT.shape) == (batch, T),
            f"doc_ids must have shape (batch, time)={(batch, T)}, got {tuple(doc_ids_BT.shape)}",
        )
        _require(
            not doc_ids_BT.is_floating_point() and not doc_ids_BT.is_complex(),
            f"doc_ids must be an integer tensor, got {doc_ids_BT.dtype}",
        )
    if initial_state_BHPN is not None:
        _require(
            tuple(initial_state_BHPN.shape) == (batch, H, P, N),
            f"initial_state must have shape (batch, heads, head_dim, d_state)={(batch, H, P, N)}, "
            f"got {tuple(initial_state_BHPN.shape)}",
        )


def ssd(
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
    """Multi-head SSD scan (Mamba-2).

    h_t = exp(dt_t * A) h_{t-1} + dt_t * x_t B_t^T ;  y_t = h_t C_t + D * x_t

    x_BTHP: (B, T, H, P); dt_BTH: (B, T, H), already positive (softplus(dt + dt_bias) is the
    caller's); A_H: (H,), negative (= -exp(A_log)); B_BTGN, C_BTGN: (B, T, G, N) with H % G == 0,
    head h reading group h // (H // G); D_H: (H,) skip; doc_ids_BT: (B, T) ints, equal values
    marking one contiguous document, and no state crosses a document boundary;
    initial_state_BHPN: (B, H, P, N), the state before the first token, applied to the first
    document of each row only.

    Returns y_BTHP in x's dtype, and with `return_final_state` also the state after the last
    token (of the last document only), (B, H, P, N) in float32 (float64 for float64 x).
    chunk_size sets the reference's chunk; the fast backends choose their own.
    """
    _check_sequence_inputs(x_BTHP, dt_BTH, A_H, B_BTGN, C_BTGN, chunk_size, D_H, doc_ids_BT, initial_state_BHPN)
    kwargs = dict(
        D_H=D_H, doc_ids_BT=doc_ids_BT, initial_state_BHPN=initial_state_BHPN, return_final_state=return_final_state
    )
    unsupported = ("mamba_ssm",) if doc_ids_BT is not None and initial_state_BHPN is not None else ()
    backend = pick("ssd", x_BTHP, dt_BTH, A_H, B_BTGN, C_BTGN, D_H, initial_state_BHPN, unsupported=unsupported)
    if backend == "fla":
        return backend_module("ssd", "fla").ssd_fla(x_BTHP, dt_BTH, A_H, B_BTGN, C_BTGN, **kwargs)
    if backend == "mamba_ssm":
        module = backend_module("ssd", "mamba_ssm")
        return module.ssd_mamba_ssm(x_BTHP, dt_BTH, A_H, B_BTGN, C_BTGN, chunk_size=chunk_size, **kwargs)
    return ssd_chunked(x_BTHP, dt_BTH, A_H, B_BTGN, C_BTGN, chunk_size=chunk_size, **kwargs)


def ssd_step(
    x_BHP: Tensor,
    dt_BH: Tensor,
    A_H: Tensor,
    B_BGN: Tensor,
    C_BGN: Tensor,
    state_BHPN: Tensor,
    D_H: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """One decoding step of `ssd` for a single token.

    x_BHP: (B, H, P); dt_BH: (B, H); A_H: (H,); B_BGN, C_BGN: (B, G, N); state_BHPN: (B, H, P, N).
    Returns y_BHP (x's dtype) and the new state (float32, float64 for float64 x); the input
    state is not modified.
    """
    _require_float(x=x_BHP, dt=dt_BH, A=A_H, B=B_BGN, C=C_BGN, state=state_BHPN, D=D_H)
    _require(x_BHP.ndim == 3, f"x must be (batch, heads, head_dim), got shape {tuple(x_BHP.shape)}")
    batch, H, P = x_BHP.shape
    _require(tuple(dt_BH.shape) == (batch, H), f"dt must have shape {(batch, H)}, got {tuple(dt_BH.shape)}")
    _require(
        B_BGN.ndim == 3 and B_BGN.shape[0] == batch and C_BGN.shape == B_BGN.shape,
        f"B and C must both be (batch={batch}, groups, d_state), got {tuple(B_BGN.shape)} and {tuple(C_BGN.shape)}",
    )
    G, N = B_BGN.shape[1:]
    _check_heads(H, G, N, A=A_H, D=D_H)
    _require(
        tuple(state_BHPN.shape) == (batch, H, P, N),
        f"state must have shape (batch, heads, head_dim, d_state)={(batch, H, P, N)}, got {tuple(state_BHPN.shape)}",
    )
    if pick("ssd_step", x_BHP, dt_BH, A_H, B_BGN, C_BGN, state_BHPN, D_H) == "fla":
        return backend_module("ssd_step", "fla").ssd_step_fla(x_BHP, dt_BH, A_H, B_BGN, C_BGN, state_BHPN, D_H)
    return ssd_step_reference(x_BHP, dt_BH, A_H, B_BGN, C_BGN, state_BHPN, D_H)
