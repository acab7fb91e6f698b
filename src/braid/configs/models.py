"""Named model configs: Python functions returning a complete ModelConfig.

The tiny ones are first-class: they run every code path on a CPU in seconds.
"""

from __future__ import annotations

from collections.abc import Callable

from braid.configs.bench import hybrid_374m
from braid.model.config import (
    AttentionConfig,
    GLAConfig,
    Mamba2Config,
    MatFormerConfig,
    MLPConfig,
    ModelConfig,
    MoEConfig,
)

_TINY_D = 128


def _tiny_subconfigs() -> dict:
    return dict(
        attention=AttentionConfig(num_heads=4, num_kv_heads=2, window=64),
        mamba2=Mamba2Config(d_state=16, head_dim=32, n_groups=2, chunk_size=32),
        gla=GLAConfig(num_heads=4, gate_low_rank=16, chunk_size=32),
        mlp=MLPConfig(d_ff=256),
        moe=MoEConfig(num_experts=4, top_k=2, d_expert=128, num_shared_experts=1, d_shared=64),
        matformer=MatFormerConfig(d_ff=384),
    )


def tiny_hybrid() -> ModelConfig:
    """Every mixer and FFN kind in six blocks (~1.5M parameters): the CPU demo and test model."""
    return ModelConfig(
        d_model=_TINY_D,
        vocab_size=4096,
        max_seq_len=512,
        pattern="M- S64E GF A- M- S32F",
        tie_embeddings=True,
        **_tiny_subconfigs(),
    )


def tiny_dense() -> ModelConfig:
    """A four-block Llama-style transformer."""
    return ModelConfig(d_model=_TINY_D, vocab_size=4096, max_seq_len=512, pattern="A-", num_layers=4,
                       tie_embeddings=True, **_tiny_subconfigs())


def tiny_mamba2() -> ModelConfig:
    """Pure Mamba-2: mixer-only blocks, as in the Mamba-2 paper."""
    return ModelConfig(d_model=_TINY_D, vocab_size=4096, max_seq_len=512, pattern="M", num_layers=6,
                       tie_embeddings=True, **_tiny_subconfigs())


def tiny_gla() -> ModelConfig:
    """GLA blocks with SwiGLU FFNs, as in the GLA paper."""
    return ModelConfig(d_model=_TINY_D, vocab_size=4096, max_seq_len=512, pattern="G-", num_layers=4,
                       tie_embeddings=True, **_tiny_subconfigs())


def llama_374m() -> ModelConfig:
    """The benchmark peer's shape (HF LlamaForCausalLM): 24 x (attention + SwiGLU)."""
    return ModelConfig(
        d_model=1024,
        vocab_size=32000,
        max_seq_len=2048,
        pattern="A-",
        num_layers=24,
        attention=AttentionConfig(num_heads=16, num_kv_heads=16, window=1024),
        mlp=MLPConfig(d_ff=2816),
    )


def hybrid_1b() -> ModelConfig:
    """A ~1.2B hybrid with every mixer and FFN kind: Mamba-2 and GLA carry most layers,
    sliding-window attention (1024) most of the attention, full attention at two layers
    (MASFormer), MoE and MatFormer FFNs among the dense ones."""
    return ModelConfig(
        d_model=2048,
        vocab_size=32000,
        max_seq_len=4096,
        pattern="M- S1024F GE M- S1024- A- M- GF M- S1024E G- M- S1024F A- M- GE",
        attention=AttentionConfig(num_heads=16, num_kv_heads=4, window=1024, rope_theta=500_000.0),
        mamba2=Mamba2Config(d_state=128, head_dim=64, n_groups=8, chunk_size=128),
        gla=GLAConfig(num_heads=16, chunk_size=64),
        mlp=MLPConfig(d_ff=5632),
        moe=MoEConfig(num_experts=8, top_k=2, d_expert=1408, num_shared_experts=1, d_shared=1408),
        matformer=MatFormerConfig(d_ff=5632),
    )


def hybrid_100m() -> ModelConfig:
    """A ~100M hybrid for multi-GPU layout proofs (bench/parallel_gpu.sh): 12 blocks at
    d_model 768 with Mamba-2 (4), GLA (3), sliding-window attention (3) and full attention
    at two layers; MoE (3: 8 experts, top-2, one shared), SwiGLU (3) and MatFormer (2) FFNs.
    Every head, group and expert count is even, so tp2, pp2 and ep2 (up to ep8) validate
    alone and together. 113M parameters, 89M without the tied embedding."""
    return ModelConfig(
        d_model=768,
        vocab_size=32000,
        max_seq_len=2048,
        pattern="M- S512E GF A- M- S512E G- M- S512F A- M- GE",
        tie_embeddings=True,
        attention=AttentionConfig(num_heads=12, num_kv_heads=4, window=512),
        mamba2=Mamba2Config(d_state=64, head_dim=64, n_groups=2, chunk_size=128),
        gla=GLAConfig(num_heads=6, chunk_size=64),
        mlp=MLPConfig(d_ff=2048),
        moe=MoEConfig(num_experts=8, top_k=2, d_expert=256, num_shared_experts=1, d_shared=256),
        matformer=MatFormerConfig(d_ff=2048),
    )


MAMBA2_HYBRID_8B_PATTERN = "M-M-M--M-M*-M-M-M-M--M*-M-M-M-M-M*--M-M-M-M-M*-M--M-M-M-"


def mamba2_hybrid_8b() -> ModelConfig:
    """The 8B Mamba-2-Hybrid of "An Empirical Study of Mamba-based Language Models"
    (Waleffe et al., 2024), Megatron-LM's published pattern: 24 Mamba-2, 4 attention and
    28 MLP sublayers (43% / 7% / 50%). Megatron counts 56 sublayers; braid merges each
    mixer with the MLP after it, giving the same function in fewer blocks. Megatron's MLP
    there is 16384 wide and not gated; braid's is SwiGLU, so 2/3 of that width
    (10944, a multiple of 64) keeps the MLP parameter count."""
    return ModelConfig(
        d_model=4096,
        vocab_size=256_000,
        max_seq_len=4096,
        pattern=MAMBA2_HYBRID_8B_PATTERN,
        attention=AttentionConfig(num_heads=32, num_kv_heads=8, window=4096),
        mamba2=Mamba2Config(d_state=128, head_dim=64, n_groups=8, expand=2, chunk_size=128),
        mlp=MLPConfig(d_ff=10944),
    )


MODEL_CONFIGS: dict[str, Callable[[], ModelConfig]] = {
    "tiny-hybrid": tiny_hybrid,
    "tiny-dense": tiny_dense,
    "tiny-mamba2": tiny_mamba2,
    "tiny-gla": tiny_gla,
    "llama-374m": llama_374m,
    "hybrid-374m": hybrid_374m,
    "hybrid-100m": hybrid_100m,
    "hybrid-1b": hybrid_1b,
    "mamba2-hybrid-8b": mamba2_hybrid_8b,
}


def model_config(name: str) -> ModelConfig:
    """The named model config `name` (see MODEL_CONFIGS)."""
    if name not in MODEL_CONFIGS:
        raise ValueError(f"unknown model config {name!r}; named configs are: {', '.join(MODEL_CONFIGS)}")
    return MODEL_CONFIGS[name]()
