"""Named model configs for the GPU benchmarks (bench/throughput.py, bench/kernels.py).

hybrid-374m has the active size of llama-374m (the HF Llama peer's shape) built from every
fast mixer path: per 12 blocks four Mamba-2, three GLA, four sliding-window (1024) and one
full-attention layer (two full-attention layers in 24, MASFormer-style), MoE FFNs at the
sliding-window layers. 378M parameters active per token (585M in all).
"""

from __future__ import annotations

from collections.abc import Callable

from braid.model.config import AttentionConfig, GLAConfig, Mamba2Config, MLPConfig, ModelConfig, MoEConfig

HYBRID_374M_PATTERN = "M- S1024E G- M- S1024E A- G- M- S1024E G- M- S1024E"


def hybrid_374m() -> ModelConfig:
    """24 blocks at d_model 1024, vocabulary 32000 (untied), context 8192."""
    return ModelConfig(
        d_model=1024,
        vocab_size=32000,
        max_seq_len=8192,
        pattern=HYBRID_374M_PATTERN,
        num_layers=24,
        attention=AttentionConfig(num_heads=16, num_kv_heads=4, window=1024),
        mamba2=Mamba2Config(d_state=128, head_dim=64, n_groups=1, expand=2, chunk_size=128),
        gla=GLAConfig(num_heads=8, chunk_size=64),
        mlp=MLPConfig(d_ff=2816),
        moe=MoEConfig(num_experts=8, top_k=2, d_expert=1408),
    )


BENCH_CONFIGS: dict[str, Callable[[], ModelConfig]] = {"hybrid-374m": hybrid_374m}
