"""braid.data: tokenizers, prepare (text/jsonl -> MDS shards), the packed streaming loader.

    tok = load_tokenizer(path)                    # tokenizer.json, tiktoken file or data dir
    train_tokenizer(files, vocab_size, out_path)  # byte-level BPE, "<|endoftext|>" = EOS
    prepare(inputs, out_dir, tokenizer_path)      # -> manifest dict; see prepare.py
    loader = PackedLoader(out_dir, split="train", seq_len=T, batch_size=B, rank=r, world_size=W)
    unigram_baseline(out_dir)                     # val nats/token of the train unigram model

PackedLoader is imported on first use: it pulls in torch and mosaicml-streaming (which
imports torchvision and transformers, seconds of CPU) that tokenizer worker processes and
`braid data tokenizer` do not need. `prepare` is imported here, eagerly, so that the name
is the function and not its submodule braid.data.prepare.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from braid.data.corpus import download_corpus
from braid.data.documents import Document, expand_inputs, iter_documents
from braid.data.errors import DataError
from braid.data.prepare import load_manifest, prepare, unigram_baseline
from braid.data.tokenizer import Tokenizer, load_tokenizer, train_tokenizer

if TYPE_CHECKING:
    from braid.data.loader import PackedLoader, SourceSpec, StackedLoader

__all__ = [
    "DataError",
    "Document",
    "PackedLoader",
    "SourceSpec",
    "StackedLoader",
    "Tokenizer",
    "download_corpus",
    "expand_inputs",
    "iter_documents",
    "load_manifest",
    "load_tokenizer",
    "prepare",
    "train_tokenizer",
    "unigram_baseline",
]


def __getattr__(name: str) -> Any:
    if name in ("PackedLoader", "SourceSpec", "StackedLoader"):
        from braid.data import loader

        return getattr(loader, name)
    raise AttributeError(f"module 'braid.data' has no attribute {name!r}")
