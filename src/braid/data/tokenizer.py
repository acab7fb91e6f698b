"""Tokenizers: load an HF `tokenizer.json` or a tiktoken-format file, train a byte-level BPE.

Both kinds load into the Rust `tokenizers` library (tiktoken files are converted, see
tiktoken_file.py), so there is one Tokenizer class with fast batch encoding. Special tokens
written literally in the text (e.g. "<|endoftext|>" inside a web page) are encoded as plain
text: the only end-of-text tokens in prepared data are the ones prepare appends.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable, Sequence
from pathlib import Path

import tokenizers
from tokenizers import decoders, models, pre_tokenizers, trainers

from braid.data import tiktoken_file
from braid.data.documents import DEFAULT_MAX_DOC_CHARS, expand_inputs, iter_documents
from braid.data.errors import DataError

EOS_TOKEN = "<|endoftext|>"
# Tried in order when a tokenizer.json does not say which token ends a document.
EOS_CANDIDATES = (EOS_TOKEN, "<|end_of_text|>", "</s>", "<eos>", "<|eos|>", "[EOS]")


class Tokenizer:
    """Text <-> token ids. `eos_id` ends every document; `vocab_size` is 1 + the largest id."""

    def __init__(self, backend: tokenizers.Tokenizer, eos_id: int, path: str | None = None):
        backend.encode_special_tokens = True
        self.backend = backend
        self.eos_id = eos_id
        self.path = path
        self.vocab_size = max(backend.get_vocab(with_added_tokens=True).values()) + 1

    def encode(self, text: str) -> list[int]:
        """Token ids of `text`, without BOS/EOS."""
        return self.backend.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        """`encode` of each text (threaded in Rust unless TOKENIZERS_PARALLELISM=false)."""
        return [e.ids for e in self.backend.encode_batch(list(texts), add_special_tokens=False)]

    def decode(self, ids: Iterable[int]) -> str:
        """Text of `ids`; special tokens are kept as their text."""
        return self.backend.decode([int(i) for i in ids], skip_special_tokens=False)

    def save(self, path: str | os.PathLike) -> None:
        """Write as tokenizer.json (atomically); `load_tokenizer` reads it back."""
        _atomic_write_text(Path(path), self.to_json())

    def to_json(self) -> str:
        """The tokenizer.json text."""
        return self.backend.to_str(pretty=False)

    def sha256(self) -> str:
        """Fingerprint of the tokenizer (its tokenizer.json), to check datasets agree."""
        return hashlib.sha256(self.to_json().encode("utf-8")).hexdigest()

    def __repr__(self) -> str:
        return f"Tokenizer(path={self.path!r}, vocab_size={self.vocab_size}, eos_id={self.eos_id})"


def load_tokenizer(
    path: str | os.PathLike, *, eos_token: str | None = None, pattern: str | None = None
) -> Tokenizer:
    """Load a tokenizer from a HF tokenizer.json, a tiktoken-format file, or a prepared data
    directory (its tokenizer.json, with the EOS recorded in manifest.json).

    eos_token: the token that ends documents, when the file does not make it clear.
    pattern: tiktoken files only: the pre-tokenisation regex ("gpt2", "cl100k", "o200k" or a
        regex) for files that are not one of the OpenAI encodings.
    """
    path = Path(path)
    if path.is_dir():
        return _load_data_dir_tokenizer(path)
    if not path.is_file():
        raise DataError("tokenizer file does not exist", path)
    if tiktoken_file.is_tiktoken_file(path):
        return _load_tiktoken(path, eos_token, pattern)
    try:
        backend = tokenizers.Tokenizer.from_file(str(path))
    except Exception as error:  # the Rust library raises a bare Exception
        raise DataError(f"not a valid tokenizer.json ({error})", path) from error
    return Tokenizer(backend, _eos_id(backend, eos_token, path), str(path))


def _load_data_dir_tokenizer(data_dir: Path) -> Tokenizer:
    manifest_path = data_dir / "manifest.json"
    if not manifest_path.is_file():
        raise DataError("not a prepared data directory (no manifest.json)", data_dir)
    manifest = json.loads(manifest_path.read_text())
    backend = tokenizers.Tokenizer.from_file(str(data_dir / manifest["tokenizer"]))
    return Tokenizer(backend, int(manifest["eos_id"]), str(data_dir / manifest["tokenizer"]))


def _load_tiktoken(path: Path, eos_token: str | None, pattern: str | None) -> Tokenizer:
    ranks = tiktoken_file.read_ranks(path)
    regex, special = tiktoken_file.layout_for(ranks, pattern)
    backend = tiktoken_file.tiktoken_to_backend(ranks, regex, special)
    return Tokenizer(backend, _eos_id(backend, eos_token, path), str(path))


def _eos_id(backend: tokenizers.Tokenizer, eos_token: str | None, path: Path) -> int:
    candidates = (eos_token,) if eos_token is not None else EOS_CANDIDATES
    for token in candidates:
        token_id = backend.token_to_id(token)
        if token_id is not None:
            return token_id
    specials = [t.content for t in backend.get_added_tokens_decoder().values() if t.special]
    raise DataError(
        f"cannot tell which token ends a document (tried {', '.join(candidates)}); "
        f"pass eos_token= one of its special tokens {specials[:20]}",
        path,
    )


def train_tokenizer(
    files: Sequence[str | os.PathLike] | str | os.PathLike,
    vocab_size: int,
    out_path: str | os.PathLike,
    *,
    text_field: str = "text",
    min_frequency: int = 2,
) -> Tokenizer:
    """Train a byte-level BPE (GPT-2 pre-tokenisation, every byte in the base alphabet, so
    any text round-trips) on the documents of `files` (.txt/.jsonl(.gz), globs, directories)
    and save it as tokenizer.json at `out_path`. "<|endoftext|>" is id 0 and the EOS.
    """
    if vocab_size < 257:
        raise ValueError(f"vocab_size must be at least 257 (256 bytes + <|endoftext|>), got {vocab_size}")
    paths = expand_inputs(files)
    backend = tokenizers.Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=[EOS_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    texts = (d.text for p in paths for d in iter_documents(p, text_field, DEFAULT_MAX_DOC_CHARS))
    backend.train_from_iterator(texts, trainer=trainer)
    tokenizer = Tokenizer(backend, backend.token_to_id(EOS_TOKEN), str(out_path))
    tokenizer.save(out_path)
    return tokenizer


def _atomic_write_text(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)
