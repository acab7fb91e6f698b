"""Parameter counts and FLOPs per token, computed from the config alone (for MFU and planning).

Forward FLOPs count 2 per multiply-add of every matmul plus the sequence-mixing work of each
mixer kind; training FLOPs are 3x forward (backward = 2x forward). Attention counts the
causal half of the score matrix (the convention of the peer's MFU formula:
6*N + 6*L*h*S per token for a transformer).
"""

from __future__ import annotations

from braid.model.config import ModelConfig
from braid.model.pattern import LayerSpec


def _mixer_params(cfg: ModelConfig, spec: LayerSpec) -> tuple[int, int]:
    """(matmul parameters, other parameters) of a layer's mixer."""
    d = cfg.d_model
    if spec.mixer in ("attention", "sliding"):
        a = cfg.attention
        hd = a.resolved_head_dim(d)
        num_heads, num_kv_heads = a.layer_heads(spec.index)
        return d * hd * (2 * num_heads + 2 * num_kv_heads), 0
    if spec.mixer == "mamba2":
        m = cfg.mamba2
        d_inner, heads = m.layer_d_inner(d, spec.index), m.layer_num_heads(d, spec.index)
        gn = m.layer_groups(spec.index) * m.d_state
        matmul = d * (2 * d_inner + 2 * gn + heads) + d_inner * d
        conv = (d_inner + 2 * gn) * (m.d_conv + 1)
        return matmul, conv + 3 * heads + d_inner
    if spec.mixer == "gla":
        g = cfg.gla
        kd, vd = g.key_dim(d), g.value_dim(d)
        matmul = d * (2 * kd + 2 * vd) + d * g.gate_low_rank + g.gate_low_rank * kd + vd * d
        return matmul, kd + vd
    return 0, 0


def _ffn_params(cfg: ModelConfig, spec: LayerSpec) -> tuple[int, int]:
    """(total parameters, parameters active per token) of a layer's FFN."""
    d = cfg.d_model
    if spec.ffn == "mlp":
        n = 3 * d * cfg.mlp.hidden(spec.index)
        return n, n
    if spec.ffn == "matformer":
        n = 3 * d * cfg.matformer.d_ff
        return n, n
    if spec.ffn == "moe":
        m = cfg.moe
        expert = 3 * d * m.d_expert
        shared = 3 * d * (m.d_shared or m.d_expert) * m.num_shared_experts
        router = d * m.num_experts
        return m.num_experts * expert + shared + router, m.top_k * expert + shared + router
    return 0, 0


def layer_params(cfg: ModelConfig, spec: LayerSpec) -> int:
    """Parameters of one block, norms included."""
    mix_mm, mix_other = _mixer_params(cfg, spec)
    ffn_total, _ = _ffn_params(cfg, spec)
    norms = cfg.d_model * ((spec.mixer is not None) + (spec.ffn is not None))
    return mix_mm + mix_other + ffn_total + norms


def num_params(cfg: ModelConfig, *, embeddings: bool = True) -> int:
    """Parameters of the whole decoder (equal to the built model's count)."""
    n = sum(layer_params(cfg, spec) for spec in cfg.layers) + cfg.d_model  # final norm
    head = cfg.vocab_size * cfg.d_model
    if embeddings:
        n += head
    if not cfg.tie_embeddings:
        n += head
    return n


def _mixing_flops(cfg: ModelConfig, spec: LayerSpec, seq_len: int) -> float:
    """Forward sequence-mixing FLOPs per token beyond the projections."""
    d = cfg.d_model
    if spec.mixer in ("attention", "sliding"):
        a = cfg.attention
        window = seq_len
        if spec.mixer == "sliding":
            window = min(seq_len, spec.window or a.window)
        # Mean number of keys a query sees: causal with a window of `window` keys.
        mean_keys = (window * (window + 1) / 2 + (seq_len - window) * window) / seq_len
        return 4.0 * a.layer_heads(spec.index)[0] * a.resolved_head_dim(d) * mean_keys
    if spec.mixer == "mamba2":
        m = cfg.mamba2
        q, n, p = m.chunk_size, m.d_state, m.head_dim
        h, g = m.layer_num_heads(d, spec.index), m.layer_groups(spec.index)
        conv = 2 * m.d_conv * (h * p + 2 * g * n)
        return h * (2 * q * p + 4 * n * p) + g * 2 * q * n + conv
    if spec.mixer == "gla":
        g = cfg.gla
        kh, vh = g.key_dim(d) // g.num_heads, g.value_dim(d) // g.num_heads
        return g.num_heads * (2 * g.chunk_size * (kh + vh) + 4 * kh * vh)
    return 0.0


def layer_flops(cfg: ModelConfig, spec: LayerSpec, seq_len: int) -> dict[str, float]:
    """Forward FLOPs per token of one block, split into its mixer and its FFN."""
    mix_mm, _ = _mixer_params(cfg, spec)
    _, ffn_active = _ffn_params(cfg, spec)
    return {
        "mixer": 2.0 * mix_mm + _mixing_flops(cfg, spec, seq_len),
        "ffn": 2.0 * ffn_active,
    }


def flops_by_kind(cfg: ModelConfig, seq_len: int) -> dict[str, float]:
    """Training FLOPs per token summed per mixer and FFN kind (and the head)."""
    totals: dict[str, float] = {}
    for spec in cfg.layers:
        f = layer_flops(cfg, spec, seq_len)
        if spec.mixer is not None:
            totals[spec.mixer] = totals.get(spec.mixer, 0.0) + 3 * f["mixer"]
        if spec.ffn is not None:
            totals[spec.ffn] = totals.get(spec.ffn, 0.0) + 3 * f["ffn"]
    totals["head"] = 3 * 2.0 * cfg.d_model * cfg.vocab_size
    return totals


def flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
    """Training (forward + backward) FLOPs per token at sequence length `seq_len`."""
    return sum(flops_by_kind(cfg, seq_len).values())
