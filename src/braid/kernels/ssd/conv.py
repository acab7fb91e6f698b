"""Depthwise causal 1-D convolution (Mamba's short conv), document-aware.

y_t = act(bias + sum_k weight[:, k] * x_{t-(K-1)+k}): the last tap multiplies the current
input, as in torch.nn.Conv1d with K-1 left padding. Computed in float32 (float64 for float64
inputs), returned in x's dtype.

Shape legend: B batch, T time, C channels, K taps. A conv state `state_BCK` holds the last
K-1 inputs, so its shape is (B, C, K-1).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from braid.kernels.backend import backend_module, pick
from braid.kernels.ssd.reference import compute_dtype

_ACTIVATIONS = {None: lambda y: y, "silu": F.silu}


def _check_activation(activation: str | None) -> None:
    if activation not in _ACTIVATIONS:
        raise ValueError(f"activation={activation!r} is not one of {sorted(_ACTIVATIONS, key=str)}")


def _check_weights(C: int, weight_CK: Tensor, bias_C: Tensor | None) -> None:
    if weight_CK.ndim != 2 or weight_CK.shape[0] != C or weight_CK.shape[1] < 1:
        raise ValueError(f"weight must have shape (channels={C}, taps>=1), got {tuple(weight_CK.shape)}")
    if bias_C is not None and tuple(bias_C.shape) != (C,):
        raise ValueError(f"bias must have shape (channels,)=({C},), got {tuple(bias_C.shape)}")


def _check_conv_inputs(x_BTC, weight_CK, bias_C, doc_ids_BT, initial_state_BCK, activation) -> None:
    if x_BTC.ndim != 3 or x_BTC.shape[1] == 0:
        raise ValueError(f"x must be (batch, time>=1, channels), got shape {tuple(x_BTC.shape)}")
    batch, T, C = x_BTC.shape
    _check_weights(C, weight_CK, bias_C)
    _check_activation(activation)
    if doc_ids_BT is not None and tuple(doc_ids_BT.shape) != (batch, T):
        raise ValueError(f"doc_ids must have shape (batch, time)={(batch, T)}, got {tuple(doc_ids_BT.shape)}")
    expected = (batch, C, weight_CK.shape[1] - 1)
    if initial_state_BCK is not None and tuple(initial_state_BCK.shape) != expected:
        raise ValueError(
            f"initial_state must hold the last K-1 inputs, shape (batch, channels, K-1)={expected}, "
            f"got {tuple(initial_state_BCK.shape)}"
        )


def causal_conv1d(
    x_BTC: Tensor,
    weight_CK: Tensor,
    bias_C: Tensor | None = None,
    *,
    doc_ids_BT: Tensor | None = None,
    initial_state_BCK: Tensor | None = None,
    activation: str | None = "silu",
    return_final_state: bool = False,
) -> Tensor | tuple[Tensor, Tensor]:
    """Depthwise causal conv over time; taps never reach across a document boundary.

    x_BTC: (B, T, C); weight_CK: (C, K); bias_C: (C,); doc_ids_BT: (B, T) ints;
    initial_state_BCK: (B, C, K-1), the inputs before x (zeros if None), seen only by the first
    document of each row; activation: "silu" or None.
    Returns y_BTC (x's dtype) and with `return_final_state` the last K-1 inputs (B, C, K-1),
    those of earlier documents zeroed. On CUDA this runs braid's own Triton conv
    (braid.kernels.ssd.conv_triton) for calls without states and fla's for calls with them
    (`BRAID_KERNELS=conv=fla` for all), elsewhere `causal_conv1d_reference`.
    """
    _check_conv_inputs(x_BTC, weight_CK, bias_C, doc_ids_BT, initial_state_BCK, activation)
    kwargs = dict(
        doc_ids_BT=doc_ids_BT, initial_state_BCK=initial_state_BCK, activation=activation,
        return_final_state=return_final_state,
    )
    with_state = initial_state_BCK is not None or return_final_state
    backend = pick("conv", x_BTC, weight_CK, bias_C, initial_state_BCK, unsupported=("triton",) if with_state else ())
    if backend == "fla":
        return backend_module("conv", "fla").causal_conv1d_fla(x_BTC, weight_CK, bias_C, **kwargs)
    if backend == "triton":
        return backend_module("conv", "triton").causal_conv1d_triton(
            x_BTC, weight_CK, bias_C, doc_ids_BT=doc_ids_BT, activation=activation
        )
    return causal_conv1d_reference(x_BTC, weight_CK, bias_C, **kwargs)


def causal_conv1d_reference(
    x_BTC: Tensor,
    weight_CK: Tensor,
    bias_C: Tensor | None = None,
    *,
    doc_ids_BT: Tensor | None = None,
    initial_state_BCK: Tensor | None = None,
    activation: str | None = "silu",
    return_final_state: bool = False,
) -> Tensor | tuple[Tensor, Tensor]:
    """The pure-PyTorch conv (the CPU path and the oracle); inputs as `causal_conv1d`, validated."""
    batch, T, C = x_BTC.shape
    K = weight_CK.shape[1]
    dtype = compute_dtype(x_BTC)
    if initial_state_BCK is None:
        initial_state_BCK = x_BTC.new_zeros(batch, C, K - 1)
    padded_BTC = torch.cat([initial_state_BCK.to(x_BTC.dtype).transpose(1, 2), x_BTC], dim=1)
    if doc_ids_BT is not None:
        padded_doc_BT = torch.cat([doc_ids_BT[:, :1].expand(batch, K - 1), doc_ids_BT], dim=1)

    weight_CK = weight_CK.to(dtype)
    y_BTC = x_BTC.new_zeros(batch, T, C, dtype=dtype)
    if bias_C is not None:
        y_BTC = y_BTC + bias_C.to(dtype)
    for k in range(K):
        tap_BTC = padded_BTC[:, k : k + T].to(dtype)
        if doc_ids_BT is not None:
            tap_BTC = tap_BTC * (padded_doc_BT[:, k : k + T] == doc_ids_BT)[..., None]
        y_BTC = y_BTC + tap_BTC * weight_CK[:, k]
    y_BTC = _ACTIVATIONS[activation](y_BTC).to(x_BTC.dtype)
    if not return_final_state:
        return y_BTC
    final_BCK = padded_BTC[:, T:].transpose(1, 2)
    if doc_ids_BT is not None:
        final_BCK = final_BCK * (padded_doc_BT[:, T:] == doc_ids_BT[:, -1:])[:, None, :]
    return y_BTC, final_BCK.contiguous()


def causal_conv1d_step(
    x_BC: Tensor,
    state_BCK: Tensor,
    weight_CK: Tensor,
    bias_C: Tensor | None = None,
    activation: str | None = "silu",
) -> tuple[Tensor, Tensor]:
    """One decoding step of `causal_conv1d`.

    x_BC: (B, C); state_BCK: (B, C, K-1), the previous K-1 inputs. Returns y_BC (x's dtype) and
    the new state (B, C, K-1) in x's dtype; the input state is not modified.
    """
    if x_BC.ndim != 2:
        raise ValueError(f"x must be (batch, channels), got shape {tuple(x_BC.shape)}")
    batch, C = x_BC.shape
    _check_weights(C, weight_CK, bias_C)
    _check_activation(activation)
    expected = (batch, C, weight_CK.shape[1] - 1)
    if tuple(state_BCK.shape) != expected:
        raise ValueError(f"state must have shape (batch, channels, K-1)={expected}, got {tuple(state_BCK.shape)}")
    dtype = compute_dtype(x_BC)
    window_BCK = torch.cat([state_BCK.to(x_BC.dtype), x_BC[..., None]], dim=-1)
    y_BC = (window_BCK.to(dtype) * weight_CK.to(dtype)).sum(dim=-1)
    if bias_C is not None:
        y_BC = y_BC + bias_C.to(dtype)
    return _ACTIVATIONS[activation](y_BC).to(x_BC.dtype), window_BCK[..., 1:]
