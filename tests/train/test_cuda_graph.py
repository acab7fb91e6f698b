"""GraphedStep: a whole training step replayed as one CUDA graph trains like the eager step.

The graphed run executes the same kernels in the same order as the eager one (capture
records, replay runs), so losses and parameters should agree to the last bit; the check
allows float32 rounding (rtol 1e-5, atol 1e-6) in case the library picks another
algorithm inside a capture. Runs on the device machine (`-m gpu`).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from braid.kernels.backend import use_backends
from braid.model import build_model
from braid.train.cuda_graph import GraphedStep
from tests.helpers import ALL_KINDS, small_model_config

WARMUP, STEPS = 2, 5


def _batches(vocab_size: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    gen = torch.Generator(device="cuda").manual_seed(0)
    out = []
    for _ in range(1 + STEPS):
        tokens = torch.randint(0, vocab_size, (4, 49), generator=gen, device="cuda")
        out.append((tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous()))
    return out


def _train(graphed: bool) -> tuple[list[float], dict[str, torch.Tensor]]:
    cfg = small_model_config(ALL_KINDS)
    model = build_model(cfg, device="cuda", seed=0).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.1, fused=True, capturable=True)

    def step(tokens_BT, labels_BT):
        with torch.autocast("cuda", dtype=torch.bfloat16, cache_enabled=False):
            logits_BTV, aux = model(tokens_BT, return_aux=True)
            loss = F.cross_entropy(logits_BTV.float().flatten(0, 1), labels_BT.flatten()) + sum(aux.values())
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.detach()

    batches = _batches(cfg.vocab_size)
    if graphed:
        run = GraphedStep(step, *batches[0], warmup=WARMUP)  # WARMUP eager steps on batch 0
    else:
        for _ in range(WARMUP):
            step(*batches[0])
        run = step
    losses = [float(run(*batch)) for batch in batches[1:]]
    return losses, {k: v.detach().clone() for k, v in model.state_dict().items()}


@pytest.mark.gpu
@pytest.mark.parametrize("kernels", ["auto", "auto,ssd=reference,gla=reference,conv=reference"])
def test_graphed_step_trains_like_the_eager_step(kernels):
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    with use_backends(kernels):
        eager_losses, eager_state = _train(graphed=False)
        graph_losses, graph_state = _train(graphed=True)
    torch.testing.assert_close(graph_losses, eager_losses, rtol=1e-5, atol=1e-6)
    assert eager_losses[-1] < eager_losses[0]  # it trains
    for name, value in eager_state.items():
        torch.testing.assert_close(graph_state[name], value, rtol=1e-5, atol=1e-6, msg=lambda m: f"{name}: {m}")


def test_graphed_step_needs_cuda_and_a_warmup(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(RuntimeError, match="needs a CUDA device"):
        GraphedStep(lambda: torch.zeros(()))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    with pytest.raises(ValueError, match="at least one eager step"):
        GraphedStep(lambda: torch.zeros(()), warmup=0)
