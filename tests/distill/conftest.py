"""Fixtures: a tiny randomly initialised HF Llama saved with save_pretrained (nothing downloaded)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch


def save_tiny_llama(out: Path, *, vocab_size: int = 96, tie: bool = False, seed: int = 0) -> Path:
    """A 2-layer GQA Llama (4 query heads, 2 KV heads, head_dim 8) with random weights."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=vocab_size, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
        rope_theta=500.0, rms_norm_eps=1e-5, tie_word_embeddings=tie,
    )
    model = LlamaForCausalLM(cfg).eval()
    with torch.no_grad():  # HF initialises norms to 1; random norms test that they are carried
        for name, param in model.named_parameters():
            if "norm" in name:
                param.uniform_(0.5, 1.5)
    model.save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def llama_dir(tmp_path_factory) -> Path:
    return save_tiny_llama(tmp_path_factory.mktemp("llama"))


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory) -> Path:
    """A prepared data dir (tokenizer of 320 tokens) made with braid.data, as tests/train does."""
    import json

    from braid.data import train_tokenizer
    from braid.data.prepare import prepare
    from tests.train.conftest import synthetic_documents

    root = tmp_path_factory.mktemp("data")
    corpus = root / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({"text": doc}) + "\n" for doc in synthetic_documents(200)))
    train_tokenizer([corpus], vocab_size=320, out_path=root / "tokenizer.json")
    prepare([corpus], root / "prepared", root / "tokenizer.json", val_fraction=0.1, num_workers=1, progress=False)
    return root / "prepared"
