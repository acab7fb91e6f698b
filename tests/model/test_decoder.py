"""Whole-decoder properties for every mixer and FFN kind: causality, packing, generation
with state, parameter counts, meta builds, dtype policy."""

import dataclasses

import pytest
import torch

from braid.configs import MODEL_CONFIGS, model_config
from braid.model import ModelConfig, build_model, generate, num_params
from tests.helpers import small_model_config

# One small model per mixer kind (each with a different FFN), plus the full hybrid.
PATTERNS = {
    "mamba2": "M- ME",
    "gla": "GF G-",
    "attention": "A- AE",
    "sliding": "S8- S5F",
    "hybrid": "M- S8E GF A- M S6F",
}


def small_cfg(pattern: str) -> ModelConfig:
    return small_model_config(pattern)


def small_model(pattern: str, dtype=torch.float64):
    model = build_model(small_cfg(pattern), seed=1).to(dtype)
    return model.eval()


@pytest.mark.parametrize("kind", PATTERNS)
def test_causality(kind):
    model = small_model(PATTERNS[kind])
    tokens = torch.randint(0, 97, (2, 23), generator=torch.Generator().manual_seed(0))
    base = model(tokens)
    for t in (0, 9, 22):
        changed = tokens.clone()
        changed[:, t] = (changed[:, t] + 1) % 97
        out = model(changed)
        # float64: a leak from the future would be O(1); 1e-12 only admits rounding from
        # batched matmuls whose grouping changes (MoE routing of token t).
        torch.testing.assert_close(out[:, :t], base[:, :t], rtol=0, atol=1e-12)
        assert (out[:, t] - base[:, t]).abs().max() > 1e-6


@pytest.mark.parametrize("kind", PATTERNS)
def test_packed_documents_equal_documents_alone(kind):
    model = small_model(PATTERNS[kind])
    g = torch.Generator().manual_seed(1)
    doc_a, doc_b, doc_c = (torch.randint(0, 97, (1, n), generator=g) for n in (13, 20, 9))
    packed = torch.cat([doc_a, doc_b, doc_c], dim=1)
    doc_ids = torch.tensor([[0] * 13 + [1] * 20 + [2] * 9])
    out = model(packed, doc_ids)
    alone = torch.cat([model(doc_a), model(doc_b), model(doc_c)], dim=1)
    torch.testing.assert_close(out, alone, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("kind", PATTERNS)
def test_greedy_generation_with_state_equals_full_recompute(kind):
    model = small_model(PATTERNS[kind])
    prompt = torch.randint(0, 97, (2, 11), generator=torch.Generator().manual_seed(2))
    fast = generate(model, prompt, max_new_tokens=14, temperature=0)
    slow = prompt
    for _ in range(14):
        nxt = model(slow)[:, -1].argmax(-1, keepdim=True)
        slow = torch.cat([slow, nxt], dim=1)
    assert torch.equal(fast, slow)
    # The cached logits themselves match the full forward, position by position.
    caches = model.new_caches(2, fast.shape[1])
    step_logits = [model(fast[:, :11], caches=caches)]
    for t in range(11, fast.shape[1]):
        step_logits.append(model(fast[:, t : t + 1], caches=caches))
    torch.testing.assert_close(torch.cat(step_logits, 1), model(fast), rtol=1e-9, atol=1e-9)


def test_sampling_respects_top_k_and_seed():
    model = small_model(PATTERNS["hybrid"])
    prompt = torch.zeros(1, 3, dtype=torch.long)
    a = generate(model, prompt, 8, temperature=1.0, top_k=1)
    greedy = generate(model, prompt, 8, temperature=0)
    assert torch.equal(a, greedy)  # top_k=1 is greedy
    s1 = generate(model, prompt, 8, temperature=1.0, generator=torch.Generator().manual_seed(5))
    s2 = generate(model, prompt, 8, temperature=1.0, generator=torch.Generator().manual_seed(5))
    assert torch.equal(s1, s2)


@pytest.mark.parametrize("name", list(MODEL_CONFIGS))
def test_num_params_matches_built_model_on_meta(name):
    cfg = model_config(name)
    model = build_model(cfg, device="meta")
    assert sum(p.numel() for p in model.parameters()) == num_params(cfg)
    assert all(p.is_meta for p in model.parameters())


@pytest.mark.parametrize("name", ["tiny-hybrid", "tiny-dense", "tiny-mamba2", "tiny-gla"])
def test_tiny_configs_build_and_run(name):
    cfg = model_config(name)
    model = build_model(cfg, seed=0)
    tokens = torch.randint(0, cfg.vocab_size, (2, 40))
    logits, aux = model(tokens, return_aux=True)
    assert logits.shape == (2, 40, cfg.vocab_size) and torch.isfinite(logits).all()
    has_moe = any(s.ffn == "moe" for s in cfg.layers)
    assert set(aux) == ({"moe_load_balance", "moe_z_loss"} if has_moe else set())
    loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), tokens.flatten()) + sum(aux.values())
    loss.backward()
    assert all(p.grad is not None for p in model.parameters())


def test_tiny_hybrid_size():
    assert 1_000_000 <= num_params(model_config("tiny-hybrid")) <= 2_000_000


def test_init_is_seeded_and_leaves_global_rng_alone():
    cfg = small_cfg(PATTERNS["hybrid"])
    torch.manual_seed(123)
    before = torch.rand(1)
    torch.manual_seed(123)
    a = build_model(cfg, seed=7)
    after = torch.rand(1)
    b = build_model(cfg, seed=7)
    c = build_model(cfg, seed=8)
    assert torch.equal(before, after)
    for (name, pa), pb, pc in zip(a.state_dict().items(), b.state_dict().values(), c.state_dict().values()):
        assert torch.equal(pa, pb), name
    assert not torch.equal(a.layers["0"].mixer.x_proj.weight, c.layers["0"].mixer.x_proj.weight)


def test_init_scheme():
    cfg = small_cfg(PATTERNS["hybrid"])
    model = build_model(cfg, seed=0)
    mamba = model.layers["0"].mixer
    A = -torch.exp(mamba.A_log)
    assert (A <= -cfg.mamba2.A_init_range[0]).all() and (A >= -cfg.mamba2.A_init_range[1]).all()
    dt = torch.nn.functional.softplus(mamba.dt_bias)
    assert (dt >= cfg.mamba2.dt_init_floor * 0.999).all() and (dt <= cfg.mamba2.dt_max * 1.001).all()
    assert torch.equal(mamba.D, torch.ones_like(mamba.D))
    assert torch.equal(model.norm.weight, torch.ones_like(model.norm.weight))
    # Scaled residual init: output projections are narrower than input projections.
    attn = model.layers["3"].mixer
    assert attn.wo.weight.std() < 0.7 * attn.wq.weight.std()


def test_ssm_parameters_stay_fp32_under_bf16():
    model = build_model(small_cfg(PATTERNS["hybrid"]), dtype=torch.bfloat16)
    fp32 = model.fp32_param_names()
    assert {"layers.0.mixer.A_log", "layers.0.mixer.D", "layers.0.mixer.dt_bias"} <= fp32
    for name, p in model.named_parameters():
        assert p.dtype == (torch.float32 if name in fp32 else torch.bfloat16), name
    out = model(torch.randint(0, 97, (1, 17)))
    assert out.dtype == torch.bfloat16 and torch.isfinite(out.float()).all()


def test_no_weight_decay_names():
    model = build_model(small_cfg(PATTERNS["hybrid"]))
    names = model.no_weight_decay_names()
    assert "norm.weight" in names and "layers.0.mixer_norm.weight" in names
    assert "layers.0.mixer.A_log" in names and "layers.2.mixer.gk_up.bias" in names
    assert "layers.0.mixer.x_proj.weight" not in names and "tok_embeddings.weight" not in names


def test_layernorm_scaling():
    cfg = dataclasses.replace(small_cfg("A- A- A-"), layernorm_scaling=True)
    model = build_model(cfg)
    assert [model.layers[str(i)].mixer_norm.scale for i in range(3)] == pytest.approx([1.0, 2**-0.5, 3**-0.5])


def test_widths_and_decoder_slices():
    cfg = small_cfg(PATTERNS["hybrid"])
    model = build_model(cfg).double().eval()
    tokens = torch.randint(0, 97, (1, 12))
    full = model(tokens)
    torch.testing.assert_close(model(tokens, widths=1.0), full)
    assert not torch.allclose(model(tokens, widths=0.25), full)
    per_layer = [None, None, 0.5, None, None, 1.0]
    torch.testing.assert_close(model(tokens, widths=per_layer), model(tokens, widths={2: 0.5}))
    with pytest.raises(ValueError, match="one width per layer"):
        model(tokens, widths=[0.5, 1.0])
    # A pipeline stage is a slice of the same class; chaining slices equals the whole model.
    from braid.model import Decoder

    first = Decoder(cfg, layer_ids=[0, 1, 2], head=False).double()
    second = Decoder(cfg, layer_ids=[3, 4, 5], embed=False).double()
    first.load_state_dict(model.state_dict(), strict=False)
    second.load_state_dict(model.state_dict(), strict=False)
    torch.testing.assert_close(second(first(tokens)), full)


def test_moe_bias_update_runs_through_decoder():
    cfg = small_cfg("AE")
    cfg = dataclasses.replace(cfg, moe=dataclasses.replace(cfg.moe, bias_balancing=True, bias_update_rate=0.1))
    model = build_model(cfg).train()
    model(torch.randint(0, 97, (2, 16)))
    bias_before = model.layers["0"].ffn.expert_bias.clone()
    model.update_moe_bias()
    assert not torch.equal(model.layers["0"].ffn.expert_bias, bias_before)
