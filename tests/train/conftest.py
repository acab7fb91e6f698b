"""Fixtures: a tiny prepared dataset (session-scoped), a tiny model config, a trained run."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

from braid.configs.train import train_config
from braid.train.config import TrainConfig, apply_overrides

SUBJECTS = ["the cat", "a dog", "my friend", "the old man", "a small bird", "the teacher"]
VERBS = ["sees", "likes", "follows", "finds", "carries", "watches"]
OBJECTS = ["the ball", "a red box", "the river", "some bread", "the long road", "a green hat"]
ENDINGS = ["every day.", "in the morning.", "near the house.", "with great care.", "again and again."]


def synthetic_documents(num_docs: int, seed: int = 0) -> list[str]:
    """Short documents from a tiny grammar: learnable structure, so the loss can fall fast."""
    rng = random.Random(seed)
    docs = []
    for _ in range(num_docs):
        sentences = [
            f"{rng.choice(SUBJECTS)} {rng.choice(VERBS)} {rng.choice(OBJECTS)} {rng.choice(ENDINGS)}"
            for _ in range(rng.randint(2, 6))
        ]
        docs.append(" ".join(s.capitalize() for s in sentences))
    return docs


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory) -> Path:
    """A prepared data dir (tokenizer of 320 tokens, ~10% val) made with braid.data."""
    from braid.data import train_tokenizer
    from braid.data.prepare import prepare  # `braid.data.prepare` may be the submodule once imported

    root = tmp_path_factory.mktemp("data")
    corpus = root / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({"text": doc}) + "\n" for doc in synthetic_documents(600)))
    train_tokenizer([corpus], vocab_size=320, out_path=root / "tokenizer.json")
    prepare([corpus], root / "prepared", root / "tokenizer.json", val_fraction=0.1, num_workers=1, progress=False)
    return root / "prepared"


def tiny_config(data_dir: Path, out_dir: Path, *overrides: str) -> TrainConfig:
    """tiny-hybrid shrunk to run in well under a second a step on CPU (attention, sliding
    window + MoE, GLA + MatFormer blocks), on `data_dir`, logging every step."""
    from braid.data import load_manifest

    vocab_size = load_manifest(data_dir)["vocab_size"]
    base = [
        "model.d_model=32",
        f"model.vocab_size={vocab_size}",
        "model.max_seq_len=32",
        "model.pattern=S16E GF A-",
        "model.moe.d_expert=32",
        "model.moe.d_shared=16",
        "model.matformer.d_ff=64",
        "model.mlp.d_ff=64",
        f"data.path={data_dir}",
        "data.seq_len=32",
        "data.batch_size=4",
        f"out_dir={out_dir}",
        "optim.lr=3e-3",
        "schedule.warmup_steps=2",
        "train.steps=10",
        "train.device=cpu",
        "train.cpu_threads=1",
        "checkpoint.every=0",
        "log.every=1",
        "log.progress=false",
        "eval.every=0",
        "eval.batches=2",
    ]
    return apply_overrides(train_config("tiny-hybrid"), base + list(overrides))


def train_losses(run_dir: Path) -> dict[int, float]:
    """Step -> train loss from a run's metrics.jsonl."""
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {row["step"]: row["loss"] for row in rows if "loss" in row}


@pytest.fixture(scope="session")
def trained_run(data_dir, tmp_path_factory) -> tuple[Path, dict]:
    """A 40-step run (validation every 20 steps, TensorBoard on); returns (run dir, fit summary)."""
    from braid.train import train

    run_dir = tmp_path_factory.mktemp("runs") / "trained"
    summary = train(tiny_config(data_dir, run_dir, "train.steps=40", "eval.every=20", "log.tensorboard=true"))
    return run_dir, summary
