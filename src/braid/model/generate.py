"""Autoregressive generation with per-layer inference state (KV caches, SSM/GLA states).

Shapes: B batch, T prompt length, N new tokens, V vocab.
"""

from __future__ import annotations

import torch

from braid.model.decoder import Decoder, Widths


def sample_next(logits_BV: torch.Tensor, temperature: float, top_k: int | None, generator=None) -> torch.Tensor:
    """Greedy when temperature == 0, else softmax sampling restricted to the top_k logits."""
    if temperature == 0:
        return logits_BV.argmax(dim=-1)
    logits_BV = logits_BV.float() / temperature
    if top_k is not None:
        kth = torch.topk(logits_BV, min(top_k, logits_BV.shape[-1]), dim=-1).values[:, -1:]
        logits_BV = logits_BV.masked_fill(logits_BV < kth, float("-inf"))
    probs_BV = torch.softmax(logits_BV, dim=-1)
    return torch.multinomial(probs_BV, 1, generator=generator).squeeze(-1)


@torch.no_grad()
def generate(
    model: Decoder,
    tokens_BT: torch.Tensor,
    max_new_tokens: int,
    temperature: float = 1.0,
    top_k: int | None = None,
    *,
    widths: Widths = None,
    eos_id: int | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Prompt plus up to `max_new_tokens` sampled tokens, (B, T + N).

    The prompt is run once (prefill) and each new token once, through the caches; stops
    early when every row has produced `eos_id`.
    """
    if tokens_BT.ndim != 2 or tokens_BT.shape[1] == 0:
        raise ValueError(f"generate needs a (batch, time) prompt of at least one token, got {tuple(tokens_BT.shape)}")
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0 (0 is greedy), got {temperature}")
    batch, prompt_len = tokens_BT.shape
    caches = model.new_caches(batch, prompt_len + max_new_tokens)
    logits_BV = model(tokens_BT, caches=caches, widths=widths)[:, -1]
    out = [tokens_BT]
    done_B = torch.zeros(batch, dtype=torch.bool, device=tokens_BT.device)
    for _ in range(max_new_tokens):
        next_B = sample_next(logits_BV, temperature, top_k, generator)
        out.append(next_B[:, None])
        if eos_id is not None:
            done_B |= next_B == eos_id
            if bool(done_B.all()):
                break
        logits_BV = model(next_B[:, None], caches=caches, widths=widths)[:, -1]
    return torch.cat(out, dim=1)
