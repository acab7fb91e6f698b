"""Teacher import: Hugging Face Llama-architecture checkpoints into braid's attention decoder.

A Llama checkpoint maps one to one onto pattern "A-" (attention + SwiGLU per block): HF's
q/k weights are already laid out for rotate-half RoPE, which is braid's convention, so no
permutation is needed. A .gguf file is read through transformers, which dequantises it and
undoes llama.cpp's interleaved q/k row order (`permute` in llama.cpp's convert_hf_to_gguf.py)
on load, so braid receives HF-layout weights either way. Legend: D d_model, V vocab.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import Tensor

from braid.model.config import AttentionConfig, MLPConfig, ModelConfig
from braid.model.decoder import Decoder

SUPPORTED_MODEL_TYPES = ("llama",)
_GGUF_NEEDS = "needs gguf and accelerate: pip install 'braid[teacher]'"

_LAYER_KEYS = {
    "self_attn.q_proj.weight": "mixer.wq.weight",
    "self_attn.k_proj.weight": "mixer.wk.weight",
    "self_attn.v_proj.weight": "mixer.wv.weight",
    "self_attn.o_proj.weight": "mixer.wo.weight",
    "mlp.gate_proj.weight": "ffn.w1.weight",
    "mlp.up_proj.weight": "ffn.w3.weight",
    "mlp.down_proj.weight": "ffn.w2.weight",
    "input_layernorm.weight": "mixer_norm.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
}


def config_from_hf(hf: dict) -> ModelConfig:
    """The braid ModelConfig of a HF Llama config.json dict; ValueError on unsupported features."""
    model_type = hf.get("model_type")
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ValueError(f"teacher: model_type {model_type!r} is not supported; braid imports {SUPPORTED_MODEL_TYPES}")
    if hf.get("rope_scaling"):
        raise ValueError(f"teacher: rope_scaling {hf['rope_scaling']} is not supported; use a model without it")
    if hf.get("attention_bias") or hf.get("mlp_bias"):
        raise ValueError("teacher: attention_bias/mlp_bias checkpoints are not supported (braid linears have no bias)")
    if hf.get("hidden_act", "silu") != "silu":
        raise ValueError(f"teacher: hidden_act {hf['hidden_act']!r} is not supported; braid's FFN is SwiGLU (silu)")
    num_heads = hf["num_attention_heads"]
    return ModelConfig(
        d_model=hf["hidden_size"],
        vocab_size=hf["vocab_size"],
        max_seq_len=hf.get("max_position_embeddings", 2048),
        pattern="A-",
        num_layers=hf["num_hidden_layers"],
        attention=AttentionConfig(
            num_heads=num_heads,
            num_kv_heads=hf.get("num_key_value_heads") or num_heads,
            head_dim=hf.get("head_dim") or hf["hidden_size"] // num_heads,
            rope_theta=float(hf.get("rope_theta", 10_000.0)),
        ),
        mlp=MLPConfig(d_ff=hf["intermediate_size"]),
        norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
        tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
    )


def braid_state_dict(hf_state: dict[str, Tensor], cfg: ModelConfig) -> dict[str, Tensor]:
    """Rename a HF Llama state dict to braid Decoder keys; ValueError on missing weights."""
    out = {"tok_embeddings.weight": hf_state["model.embed_tokens.weight"], "norm.weight": hf_state["model.norm.weight"]}
    if not cfg.tie_embeddings:
        out["output.weight"] = hf_state.get("lm_head.weight", hf_state["model.embed_tokens.weight"])
    for i in range(cfg.resolved_num_layers):
        for hf_key, braid_key in _LAYER_KEYS.items():
            name = f"model.layers.{i}.{hf_key}"
            if name not in hf_state:
                raise ValueError(f"teacher: checkpoint lacks {name}; is it a complete Llama checkpoint?")
            out[f"layers.{i}.{braid_key}"] = hf_state[name]
    return out


def _read_safetensors(path: Path) -> dict[str, Tensor]:
    from safetensors.torch import load_file

    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"teacher: no *.safetensors in {path}; save the model with save_pretrained")
    state: dict[str, Tensor] = {}
    for file in files:
        state.update(load_file(file))
    return state


def _read_gguf(path: Path) -> tuple[dict, dict[str, Tensor]]:
    try:
        import gguf  # noqa: F401  (transformers needs it to read GGUF)
        from transformers import AutoModelForCausalLM
    except ImportError as error:
        raise ValueError(f"teacher: reading {path} {_GGUF_NEEDS} ({error})") from error
    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, torch_dtype=torch.float32)
    return model.config.to_dict(), model.state_dict()


def save_gguf_tokenizer(gguf_path: str | Path, out_path: str | Path) -> Path:
    """Write the tokenizer embedded in a .gguf file as a HF tokenizer.json at `out_path`
    (for `braid data prepare --tokenizer`). transformers rebuilds it from the GGUF metadata."""
    gguf_path, out_path = Path(gguf_path), Path(out_path)
    try:
        import gguf  # noqa: F401  (transformers needs it to read GGUF)
        from transformers import AutoTokenizer
    except ImportError as error:
        raise ValueError(f"teacher: reading {gguf_path} {_GGUF_NEEDS} ({error})") from error
    tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    tokenizer.backend_tokenizer.save(str(out_path))
    return out_path


def load_llama(path: str | Path, dtype: torch.dtype = torch.float32) -> tuple[Decoder, ModelConfig]:
    """A braid Decoder (eval mode, `dtype`) and its config from a HF Llama checkpoint.

    `path` is a save_pretrained directory (config.json + *.safetensors) or a .gguf file
    (read through transformers, which needs the `gguf` package).
    """
    path = Path(path)
    if path.suffix == ".gguf":
        hf, hf_state = _read_gguf(path)
    elif (path / "config.json").exists():
        hf = json.loads((path / "config.json").read_text())
        hf_state = _read_safetensors(path)
    else:
        raise FileNotFoundError(f"teacher: {path} is neither a .gguf file nor a directory with config.json")
    cfg = config_from_hf(hf)
    model = Decoder(cfg)
    model.load_state_dict({k: v.to(dtype) for k, v in braid_state_dict(hf_state, cfg).items()}, strict=True)
    return model.to(dtype).eval(), cfg
