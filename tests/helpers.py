"""Shared test fixtures that are plain functions (importable by spawned test processes)."""

import contextlib
import dataclasses
import math

import torch

from braid.configs import model_config
from braid.data.packing import IGNORE_INDEX
from braid.model import ModelConfig

ALL_KINDS = "M- S8E GF A- M S6F"  # Mamba-2, GLA, sliding and full attention; MLP, MoE, MatFormer


def small_model_config(pattern: str = ALL_KINDS, **changes) -> ModelConfig:
    """A few-thousand-parameter model with every sub-config shrunk to fit T ~ 16-64 tests."""
    cfg = model_config("tiny-hybrid")
    small = dataclasses.replace(
        cfg,
        d_model=32,
        vocab_size=97,
        max_seq_len=64,
        pattern=pattern,
        tie_embeddings=False,
        attention=dataclasses.replace(cfg.attention, num_heads=4, num_kv_heads=2, window=8),
        mamba2=dataclasses.replace(cfg.mamba2, head_dim=16, d_state=8, n_groups=2, chunk_size=8),
        gla=dataclasses.replace(cfg.gla, num_heads=2, gate_low_rank=4, chunk_size=8),
        mlp=dataclasses.replace(cfg.mlp, d_ff=48),
        moe=dataclasses.replace(cfg.moe, num_experts=4, top_k=2, d_expert=16, d_shared=8),
        matformer=dataclasses.replace(cfg.matformer, d_ff=64),
    )
    return dataclasses.replace(small, **changes)


def packed_batch(step: int, vocab_size: int, batch_size: int = 8, seq_len: int = 24) -> dict[str, torch.Tensor]:
    """Packed rows of random documents (seeded by step); no target crosses a document end."""
    g = torch.Generator().manual_seed(100 + step)
    tokens = torch.randint(0, vocab_size, (batch_size, seq_len), generator=g)
    doc_ids = torch.cumsum((torch.rand(batch_size, seq_len, generator=g) < 0.15).long(), dim=1)
    labels = tokens.roll(-1, dims=1)
    labels[:, -1] = IGNORE_INDEX
    labels[:, :-1][doc_ids[:, 1:] != doc_ids[:, :-1]] = IGNORE_INDEX
    return {"input_ids": tokens, "labels": labels, "doc_ids": doc_ids}


def relative_error(actual: torch.Tensor, expected: torch.Tensor, floor: float = 1e-30) -> float:
    """||actual - expected|| / ||expected|| in float64, the norm of expected taken as at least `floor`."""
    return ((actual.double() - expected.double()).norm() / expected.double().norm().clamp_min(floor)).item()


@contextlib.contextmanager
def nan_filled_empty():
    """torch.empty returns NaN-filled tensors inside: a kernel output that a kernel leaves
    unwritten then shows in the comparison instead of passing on leftover memory."""
    empty = torch.empty
    torch.empty = lambda *args, **kwargs: empty(*args, **kwargs).fill_(math.nan)
    try:
        yield
    finally:
        torch.empty = empty


def run_interpreted(check: str, expected_oks: int, timeout: int = 600) -> None:
    """Run `check` ("tests.module:function") in a child process under Triton's interpreter
    (TRITON_INTERPRET=1 must be set before triton is imported, so not in this process); the
    check prints one "ok ..." line per case, and `expected_oks` of them must appear."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    module, function = check.split(":")
    child = f"from {module} import {function}; {function}()"
    env = dict(os.environ, TRITON_INTERPRET="1")
    root = Path(__file__).resolve().parents[1]
    result = subprocess.run(
        [sys.executable, "-c", child], cwd=root, env=env, capture_output=True, text=True, timeout=timeout
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.count("ok ") == expected_oks, result.stdout
