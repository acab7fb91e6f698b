"""Fixtures for the data tests: tiny synthetic corpora, a small trained tokenizer, prepared
datasets, and a reader that goes through streaming's own MDSReader (not the loader's path)."""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pytest

from braid.data.prepare import prepare
from braid.data.tokenizer import train_tokenizer

WORDS = ("the king queen of and to be or not that is question whether nobler mind suffer slings "
         "arrows outrageous fortune take arms against sea troubles by opposing end them").split()


def make_texts(num_docs: int, seed: int, words=WORDS, min_words: int = 3, max_words: int = 30) -> list[str]:
    """Distinct documents ("doc N: ..." makes each unique) of random words."""
    rng = random.Random(seed)
    return [f"doc {i}: " + " ".join(rng.choices(words, k=rng.randint(min_words, max_words)))
            for i in range(num_docs)]


def write_jsonl(path: Path, texts: list[str], field: str = "text") -> Path:
    path.write_text("".join(json.dumps({field: t, "id": i}) + "\n" for i, t in enumerate(texts)))
    return path


def read_split(data_dir: Path, split: str) -> list[np.ndarray]:
    """Every document of a split in shard order, read with streaming's MDSReader.get_item."""
    from streaming.base.format import reader_from_json

    index = json.loads((Path(data_dir) / split / "index.json").read_text())
    docs = []
    for info in index["shards"]:
        reader = reader_from_json(str(data_dir), split, info)
        docs.extend(reader.get_item(i)["tokens"] for i in range(reader.samples))
    return docs


@pytest.fixture(scope="session")
def tokenizer_path(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("tokenizer")
    corpus = write_jsonl(root / "corpus.jsonl", make_texts(300, seed=1))
    out = root / "tokenizer.json"
    train_tokenizer([corpus], vocab_size=300, out_path=out)
    return out


@pytest.fixture(scope="session")
def prepared(tmp_path_factory, tokenizer_path) -> tuple[Path, list[str]]:
    """A dataset of 400 distinct short documents in several shards; returns (dir, texts)."""
    root = tmp_path_factory.mktemp("prepared")
    texts = make_texts(400, seed=2)
    inputs = write_jsonl(root / "docs.jsonl", texts)
    prepare([inputs], root / "data", tokenizer_path, val_fraction=0.1, num_workers=1,
            shard_bytes=4096, progress=False)
    return root / "data", texts
