"""Mamba-2 mixer (SSD): projections, short causal convs, the SSD scan, gated RMSNorm, output.

Separate z/x/B/C/dt projections (rather than mamba_ssm's one in_proj) so tensor parallelism
can shard each by heads or groups; a training forward on unsharded weights still runs x, B
and C as one GEMM and one conv over their concatenated weights (`_xBC_fused`).

Shape legend: B batch, T time, D d_model, E d_inner (= expand * d_model), H heads,
P head dim, G groups of B/C, N state dim, K conv taps. Conv states `*_BCK` hold the last
K-1 inputs, shape (B, channels, K-1).

Nested heads (elastic submodels): `heads=f` keeps the first f * G B/C groups with their
heads (head h reads group h // (H / G), so a prefix of groups owns a prefix of heads): the
first rows of z/x/dt projections and of the x conv, of B/C projections and convs, of
A_log/D/dt_bias and of the gated-norm weight, and the first columns of out_proj. Exact
because the gated RMSNorm normalises each group separately (group_size = E / G), so a
kept group's output does not depend on the dropped ones (a norm over the whole of E would
not nest).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from braid.kernels.norm import gated_rms_norm
from braid.kernels.ssd import causal_conv1d, causal_conv1d_step, ssd, ssd_step
from braid.model.attention import require_unsharded
from braid.model.config import Mamba2Config, nested_count
from braid.model.norm import GatedRMSNorm


def _state_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


@dataclass
class Mamba2Cache:
    """Inference state of one Mamba-2 layer; updated in place by Mamba2.forward."""

    conv_x_BCK: Tensor  # (B, E, K-1), model dtype
    conv_B_BCK: Tensor  # (B, G*N, K-1), model dtype
    conv_C_BCK: Tensor  # (B, G*N, K-1), model dtype
    ssm_state_BHPN: Tensor  # (B, H, P, N), float32 (float64 for a float64 model)


class CausalConv1d(nn.Module):
    """Depthwise causal conv + SiLU over (B, T, C); `weight` (C, K), `bias` (C,)."""

    def __init__(self, channels: int, kernel_size: int):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(channels, kernel_size))
        self.bias = nn.Parameter(torch.empty(channels))

    def reset_parameters(self) -> None:
        bound = 1.0 / math.sqrt(self.weight.shape[1])
        nn.init.uniform_(self.weight, -bound, bound)
        nn.init.zeros_(self.bias)

    def forward(
        self,
        x_BTC: Tensor,
        doc_ids_BT: Tensor | None = None,
        state_BCK: Tensor | None = None,
        channels: int | None = None,
    ) -> Tensor:
        """y_BTC. With `state_BCK` (the last K-1 inputs) it continues from it and updates it in place.
        `channels`: use only the first `channels` filters (x_BTC then has that many channels)."""
        weight, bias = self.weight, self.bias
        if channels is not None:
            weight, bias = weight[:channels], bias[:channels]
        if state_BCK is None:
            return causal_conv1d(x_BTC, weight, bias, doc_ids_BT=doc_ids_BT, activation="silu")
        if x_BTC.shape[1] == 1:
            y_BC, new_state_BCK = causal_conv1d_step(x_BTC[:, 0], state_BCK, weight, bias, "silu")
            y_BTC = y_BC[:, None]
        else:
            y_BTC, new_state_BCK = causal_conv1d(
                x_BTC, weight, bias, initial_state_BCK=state_BCK, activation="silu", return_final_state=True
            )
        state_BCK.copy_(new_state_BCK)
        return y_BTC


class Mamba2(nn.Module):
    """Mamba-2 mixer following the braid mixer contract (see braid.model)."""

    fp32_params = ("dt_bias", "A_log", "D")

    def __init__(self, d_model: int, cfg: Mamba2Config, *, norm_eps: float = 1e-5, n_groups: int | None = None):
        """`n_groups` (default cfg.n_groups): this layer's B/C groups, each with
        cfg.num_heads / cfg.n_groups heads (extracted submodels have fewer)."""
        super().__init__()
        cfg.validate(d_model)
        self.cfg = cfg
        self.n_groups = cfg.n_groups if n_groups is None else n_groups
        self.num_heads = self.n_groups * (cfg.num_heads(d_model) // cfg.n_groups)
        d_inner = self.num_heads * cfg.head_dim
        bc_dim = self.n_groups * cfg.d_state
        self.z_proj = nn.Linear(d_model, d_inner, bias=False)
        self.x_proj = nn.Linear(d_model, d_inner, bias=False)
        self.B_proj = nn.Linear(d_model, bc_dim, bias=False)
        self.C_proj = nn.Linear(d_model, bc_dim, bias=False)
        self.dt_proj = nn.Linear(d_model, self.num_heads, bias=False)
        self.conv_x = CausalConv1d(d_inner, cfg.d_conv)
        self.conv_B = CausalConv1d(bc_dim, cfg.d_conv)
        self.conv_C = CausalConv1d(bc_dim, cfg.d_conv)
        self.dt_bias = nn.Parameter(torch.empty(self.num_heads, dtype=torch.float32))
        self.A_log = nn.Parameter(torch.empty(self.num_heads, dtype=torch.float32))
        self.D = nn.Parameter(torch.empty(self.num_heads, dtype=torch.float32))
        self.norm = GatedRMSNorm(d_inner, eps=norm_eps, group_size=d_inner // self.n_groups)
        self.out_proj = nn.Linear(d_inner, d_model, bias=False)
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """mamba_ssm's scheme: dt log-uniform in [dt_min, dt_max] (stored as inverse softplus),
        A uniform in A_init_range, D = 1; linears normal(0, 0.02); conv uniform(+-1/sqrt(K))."""
        cfg = self.cfg
        u_H = torch.rand_like(self.dt_bias)
        dt_H = torch.exp(u_H * (math.log(cfg.dt_max) - math.log(cfg.dt_min)) + math.log(cfg.dt_min))
        dt_H = dt_H.clamp(min=cfg.dt_init_floor)
        self.dt_bias.copy_(dt_H + torch.log(-torch.expm1(-dt_H)))
        self.A_log.copy_(torch.log(torch.empty_like(self.A_log).uniform_(*cfg.A_init_range)))
        self.D.fill_(1.0)
        for proj in (self.z_proj, self.x_proj, self.B_proj, self.C_proj, self.dt_proj, self.out_proj):
            nn.init.normal_(proj.weight, mean=0.0, std=0.02)
        for conv in (self.conv_x, self.conv_B, self.conv_C):
            conv.reset_parameters()
        nn.init.ones_(self.norm.weight)

    def new_cache(self, batch_size: int, max_seq_len: int, device, dtype) -> Mamba2Cache:
        """An empty cache; its size does not depend on `max_seq_len` (the state is constant-size)."""
        taps = self.cfg.d_conv - 1
        bc_dim = self.conv_B.weight.shape[0]
        return Mamba2Cache(
            conv_x_BCK=torch.zeros(batch_size, self.conv_x.weight.shape[0], taps, device=device, dtype=dtype),
            conv_B_BCK=torch.zeros(batch_size, bc_dim, taps, device=device, dtype=dtype),
            conv_C_BCK=torch.zeros(batch_size, bc_dim, taps, device=device, dtype=dtype),
            ssm_state_BHPN=torch.zeros(
                batch_size, self.num_heads, self.cfg.head_dim, self.cfg.d_state, device=device,
                dtype=_state_dtype(dtype),
            ),
        )

    def forward(
        self,
        x_BTD: Tensor,
        doc_ids_BT: Tensor | None = None,
        cache: Mamba2Cache | None = None,
        heads: float | None = None,
    ) -> Tensor:
        """y_BTD. With `cache`, continues from it (prefill of any T, then usually T=1 steps) and
        updates it in place; doc_ids must then be None.

        heads: fraction of the B/C groups (with their heads) to use, a multiple of 1 / n_groups;
        None or 1.0 is all of them.
        """
        if cache is not None and doc_ids_BT is not None:
            raise ValueError("Mamba2: doc_ids must be None when a cache is given (decode one document per row)")
        cfg = self.cfg
        size = None if heads is None or heads == 1.0 else self._nested_size(heads)
        E, GN, H = size if size is not None else (None, None, None)
        if cache is not None and size is not None:
            cache = _cache_prefix(cache, E, GN, H)
        conv_states = (cache.conv_x_BCK, cache.conv_B_BCK, cache.conv_C_BCK) if cache is not None else (None,) * 3
        # -1 heads and groups: under tensor parallelism each rank holds only its own.
        groups = (-1, cfg.d_state)
        z_BTE = _project(self.z_proj, x_BTD, E)
        if size is None and cache is None and _plain(self.x_proj, self.B_proj, self.C_proj):
            x_BTE, B_BTC, C_BTC = self._xBC_fused(x_BTD, doc_ids_BT)
        else:
            x_BTE = self.conv_x(_project(self.x_proj, x_BTD, E), doc_ids_BT, conv_states[0], E)
            B_BTC = self.conv_B(_project(self.B_proj, x_BTD, GN), doc_ids_BT, conv_states[1], GN)
            C_BTC = self.conv_C(_project(self.C_proj, x_BTD, GN), doc_ids_BT, conv_states[2], GN)
        B_BTGN, C_BTGN = B_BTC.unflatten(-1, groups), C_BTC.unflatten(-1, groups)
        state_dtype = _state_dtype(x_BTD.dtype)
        dt_bias_H, A_log_H, D_H = (_prefix(p, H) for p in (self.dt_bias, self.A_log, self.D))
        dt_BTH = F.softplus(_project(self.dt_proj, x_BTD, H).to(state_dtype) + dt_bias_H.to(state_dtype))
        A_H = -torch.exp(A_log_H.to(state_dtype))
        x_BTHP = x_BTE.unflatten(-1, (-1, cfg.head_dim))
        y_BTHP = self._scan(x_BTHP, dt_BTH, A_H, B_BTGN, C_BTGN, D_H, doc_ids_BT, cache)
        if size is None:
            return self.out_proj(self.norm(y_BTHP.flatten(-2), z_BTE))
        y_BTE = gated_rms_norm(y_BTHP.flatten(-2), z_BTE, self.norm.weight[:E], self.norm.eps, self.norm.group_size)
        return F.linear(y_BTE, self.out_proj.weight[:, :E])

    def _xBC_fused(self, x_BTD: Tensor, doc_ids_BT: Tensor | None) -> tuple[Tensor, Tensor, Tensor]:
        """conv_x(x_proj(x)), conv_B(B_proj(x)), conv_C(C_proj(x)) as one projection and one
        conv over their concatenated weights (each channel's conv is its own): one GEMM and
        one conv kernel instead of three of each, as mamba_ssm's fused in_proj does."""
        projections, convs = (self.x_proj, self.B_proj, self.C_proj), (self.conv_x, self.conv_B, self.conv_C)
        xBC_BTC = F.linear(x_BTD, torch.cat([p.weight for p in projections]))
        xBC_BTC = causal_conv1d(
            xBC_BTC, torch.cat([c.weight for c in convs]), torch.cat([c.bias for c in convs]),
            doc_ids_BT=doc_ids_BT, activation="silu",
        )
        return xBC_BTC.split([p.out_features for p in projections], dim=-1)

    def sliced_state_dict(self, heads: float) -> dict[str, Tensor]:
        """The state dict (copied weights) of this layer with only the first `heads` of its B/C groups."""
        E, GN, H = self._nested_size(heads)
        rows = {"z_proj": E, "x_proj": E, "B_proj": GN, "C_proj": GN, "dt_proj": H, "conv_x": E, "conv_B": GN,
                "conv_C": GN, "dt_bias": H, "A_log": H, "D": H, "norm": E}
        state = {}
        for name, value in self.state_dict().items():
            module = name.split(".")[0]
            kept = value[:, :E] if module == "out_proj" else value[: rows[module]]
            state[name] = kept.detach().clone()
        return state

    def _nested_size(self, heads: float) -> tuple[int, int, int]:
        """(E, G*N, H) kept by the first `heads` of the B/C groups."""
        require_unsharded(self.z_proj.weight)
        num_groups = nested_count(heads, self.n_groups, "Mamba-2 B/C groups")
        num_heads = num_groups * (self.num_heads // self.n_groups)
        return num_heads * self.cfg.head_dim, num_groups * self.cfg.d_state, num_heads

    def _scan(self, x_BTHP, dt_BTH, A_H, B_BTGN, C_BTGN, D_H, doc_ids_BT, cache: Mamba2Cache | None) -> Tensor:
        if cache is None:
            return ssd(
                x_BTHP, dt_BTH, A_H, B_BTGN, C_BTGN, chunk_size=self.cfg.chunk_size, D_H=D_H, doc_ids_BT=doc_ids_BT
            )
        if x_BTHP.shape[1] == 1:
            y_BHP, state_BHPN = ssd_step(
                x_BTHP[:, 0], dt_BTH[:, 0], A_H, B_BTGN[:, 0], C_BTGN[:, 0], cache.ssm_state_BHPN, D_H
            )
            y_BTHP = y_BHP[:, None]
        else:
            y_BTHP, state_BHPN = ssd(
                x_BTHP,
                dt_BTH,
                A_H,
                B_BTGN,
                C_BTGN,
                chunk_size=self.cfg.chunk_size,
                D_H=D_H,
                initial_state_BHPN=cache.ssm_state_BHPN,
                return_final_state=True,
            )
        cache.ssm_state_BHPN.copy_(state_BHPN)
        return y_BTHP


def _project(linear: nn.Linear, x_BTD: Tensor, rows: int | None) -> Tensor:
    """The linear's output, or only its first `rows` outputs (None: the module itself, so
    tensor-parallel hooks apply)."""
    return linear(x_BTD) if rows is None else F.linear(x_BTD, linear.weight[:rows])


def _plain(*linears: nn.Linear) -> bool:
    """Weights that are plain tensors (not DTensors sharded by tensor parallelism, which
    shard each projection by its own heads or groups: those keep their modules' hooks)."""
    return all(type(linear.weight) in (Tensor, nn.Parameter) for linear in linears)


def _prefix(t: Tensor, rows: int | None) -> Tensor:
    return t if rows is None else t[:rows]


def _cache_prefix(cache: Mamba2Cache, E: int, GN: int, H: int) -> Mamba2Cache:
    """Views of the cache's first channels and heads: updating them updates `cache`."""
    return Mamba2Cache(
        conv_x_BCK=cache.conv_x_BCK[:, :E],
        conv_B_BCK=cache.conv_B_BCK[:, :GN],
        conv_C_BCK=cache.conv_C_BCK[:, :GN],
        ssm_state_BHPN=cache.ssm_state_BHPN[:, :H],
    )
