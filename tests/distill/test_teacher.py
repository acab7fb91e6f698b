"""Teacher import parity: braid's logits equal HF transformers' on a random tiny Llama.

Tolerance: float32 logits, atol 1e-5 (both sides compute the same float32 ops in a
different order).
"""

from __future__ import annotations

import pytest
import torch

from braid.distill.teacher import config_from_hf, load_llama
from tests.distill.conftest import save_tiny_llama


def _hf_logits(path, tokens_BT):
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM.from_pretrained(path, torch_dtype=torch.float32).eval()
    with torch.no_grad():
        return model(tokens_BT).logits


@pytest.mark.parametrize("tie", [False, True])
def test_logits_match_hf(tmp_path, tie):
    path = save_tiny_llama(tmp_path / "m", tie=tie)
    model, cfg = load_llama(path)
    assert cfg.tie_embeddings == tie and cfg.attention.num_kv_heads == 2 and cfg.attention.rope_theta == 500.0
    tokens_BT = torch.randint(0, cfg.vocab_size, (2, 19), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours_BTV = model(tokens_BT)
    torch.testing.assert_close(ours_BTV, _hf_logits(path, tokens_BT), atol=1e-5, rtol=1e-5)


def test_rejects_other_architectures():
    with pytest.raises(ValueError, match="model_type"):
        config_from_hf({"model_type": "gpt2"})
    with pytest.raises(ValueError, match="rope_scaling"):
        config_from_hf({"model_type": "llama", "rope_scaling": {"type": "linear"}})


def test_missing_checkpoint_is_explained(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json"):
        load_llama(tmp_path)
