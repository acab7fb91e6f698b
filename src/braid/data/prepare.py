"""Text/jsonl files -> tokenized documents in mosaicml-streaming MDS shards.

Output directory layout (`manifest.json` is written last, and the whole directory is built
as `DIR.tmp-*` and renamed at the end, so an interrupted run never looks complete):

    DIR/manifest.json       token/document/shard counts per split, vocab size, EOS id, ...
    DIR/tokenizer.json      the tokenizer the shards were made with
    DIR/train/, DIR/val/    MDS shards; one sample = {"tokens": one document's ids + EOS}
                            stored as ndarray:uint16 (uint32 if the vocabulary needs it)
    DIR/train_counts.npy    histogram (V,) of the train split's prediction targets
    DIR/val_counts.npy      same for val; unigram_baseline() reads both

The train/val split is decided per document by a keyed hash of its text (key = seed), so
it does not depend on file order, worker count or paths, and duplicate documents land on
the same side.

Names: V vocabulary size, N tokens of one document.
"""

from __future__ import annotations

import collections
import hashlib
import json
import multiprocessing
import os
import shutil
import time
import uuid
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import tokenizers
from tqdm import tqdm

from braid.data.documents import DEFAULT_MAX_DOC_CHARS, expand_inputs, iter_documents
from braid.data.errors import DataError
from braid.data.tokenizer import Tokenizer, load_tokenizer

FORMAT = "braid.mds.v1"
SPLITS = ("train", "val")
DEFAULT_VAL_FRACTION = 0.01
DEFAULT_SHARD_BYTES = 1 << 26
_BATCH_CHARS = 1 << 20
_BATCH_DOCS = 4096


def prepare(
    inputs: Sequence[str | os.PathLike] | str | os.PathLike,
    out_dir: str | os.PathLike,
    tokenizer_path: str | os.PathLike,
    *,
    text_field: str = "text",
    val_fraction: float = DEFAULT_VAL_FRACTION,
    seed: int = 0,
    num_workers: int | None = None,
    max_doc_chars: int = DEFAULT_MAX_DOC_CHARS,
    shard_bytes: int = DEFAULT_SHARD_BYTES,
    overwrite: bool = False,
    progress: bool = True,
) -> dict:
    """Tokenize `inputs` (.txt/.jsonl(.gz) files, globs, directories) into MDS shards in
    `out_dir` and return the manifest (also written to out_dir/manifest.json).

    num_workers: tokenizer processes (default: the CPUs this process may use); 1 tokenizes
        in this process.
    Raises DataError for bad inputs (naming file and line), and when `out_dir` exists
    (unless `overwrite`) or a split would be empty.
    """
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    if shard_bytes < 1024:
        raise ValueError(f"shard_bytes must be at least 1024, got {shard_bytes}")
    out = Path(out_dir)
    if out.exists() and not overwrite:
        raise DataError("output directory exists; pass --overwrite or choose another --out", out)
    paths = expand_inputs(inputs)
    tokenizer = load_tokenizer(tokenizer_path)
    if num_workers is None:
        num_workers = len(os.sched_getaffinity(0))
    if num_workers < 1:
        raise ValueError(f"num_workers must be at least 1 (1 tokenizes in this process), got {num_workers}")
    tmp = out.with_name(f"{out.name}.tmp-{uuid.uuid4().hex[:8]}")
    tmp.mkdir(parents=True)
    try:
        encoder_args = (tokenizer.to_json(), tokenizer.eos_id, seed, val_fraction)
        batches = _document_batches(paths, text_field, max_doc_chars)
        with _SplitWriters(tmp, tokenizer.vocab_size, shard_bytes) as writers, tqdm(
            total=sum(p.stat().st_size for p in paths), unit="B", unit_scale=True,
            desc="prepare", disable=not progress,
        ) as bar:
            for (docs, is_val), done_bytes in _encode_all(batches, encoder_args, num_workers):
                writers.write(docs, is_val)
                bar.update(done_bytes - bar.n)
                bar.set_postfix(tokens=writers.num_tokens(), refresh=False)
        manifest = _manifest(writers, tokenizer, paths, text_field, val_fraction, seed, max_doc_chars)
        tokenizer.save(tmp / "tokenizer.json")
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
        _move_into_place(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return manifest


def _document_batches(
    paths: list[Path], text_field: str, max_doc_chars: int
) -> Iterator[tuple[list[str], int]]:
    """(texts, input bytes read so far over all files), about 1 MiB of text per batch."""
    texts: list[str] = []
    chars, done = 0, 0
    for path in paths:
        for doc in iter_documents(path, text_field, max_doc_chars):
            texts.append(doc.text)
            chars += len(doc.text)
            if chars >= _BATCH_CHARS or len(texts) >= _BATCH_DOCS:
                yield texts, done + doc.end_byte
                texts, chars = [], 0
        done += path.stat().st_size
    if texts:
        yield texts, done


class _Encoder:
    """Tokenizes a batch of texts (+ EOS) and assigns each document to a split."""

    def __init__(self, tokenizer_json: str, eos_id: int, seed: int, val_fraction: float):
        self.tokenizer = Tokenizer(tokenizers.Tokenizer.from_str(tokenizer_json), eos_id)
        self.dtype = token_dtype(self.tokenizer.vocab_size)
        self.key = seed.to_bytes(16, "little", signed=True)
        self.val_fraction = val_fraction

    def __call__(self, texts: list[str]) -> tuple[list[np.ndarray], np.ndarray]:
        # One text at a time: parallelism comes from processes, so throughput is per process.
        docs = [np.array(self.tokenizer.encode(t) + [self.tokenizer.eos_id], self.dtype) for t in texts]
        return docs, np.array([self._is_val(t) for t in texts], dtype=bool)

    def _is_val(self, text: str) -> bool:
        digest = hashlib.blake2b(text.encode("utf-8"), digest_size=8, key=self.key).digest()
        return int.from_bytes(digest, "little") < self.val_fraction * 2.0**64


def token_dtype(vocab_size: int) -> str:
    """The smallest unsigned dtype holding every id of the vocabulary."""
    return "uint16" if vocab_size <= 1 << 16 else "uint32"


_worker_encoder: _Encoder | None = None


def _init_worker(tokenizer_json: str, eos_id: int, seed: int, val_fraction: float) -> None:
    global _worker_encoder
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    _worker_encoder = _Encoder(tokenizer_json, eos_id, seed, val_fraction)


def _encode_in_worker(texts: list[str]) -> tuple[list[np.ndarray], np.ndarray]:
    assert _worker_encoder is not None, "worker initializer did not run"
    return _worker_encoder(texts)


def _encode_all(batches, encoder_args: tuple, num_workers: int):
    """((docs, is_val), bytes done) per batch, in input order, with at most 2 batches per
    worker in flight (Pool.imap would read the whole input ahead into memory)."""
    if num_workers == 1:
        encoder = _Encoder(*encoder_args)
        for texts, done in batches:
            yield encoder(texts), done
        return
    # Not fork: the parent may hold torch, tokenizer or writer threads, which fork copies
    # broken. A fork server that preloads only this module (not __main__, which may be a
    # CLI importing torch) starts workers in well under a second.
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload([__name__])
    with context.Pool(num_workers, initializer=_init_worker, initargs=encoder_args) as pool:
        pending: collections.deque = collections.deque()
        for texts, done in batches:
            pending.append((pool.apply_async(_encode_in_worker, (texts,)), done))
            if len(pending) >= 2 * num_workers:
                result, done_bytes = pending.popleft()
                yield result.get(), done_bytes
        while pending:
            result, done_bytes = pending.popleft()
            yield result.get(), done_bytes


class _SplitWriters:
    """One MDSWriter per split plus its document/token counts and target histogram."""

    def __init__(self, root: Path, vocab_size: int, shard_bytes: int):
        from streaming import MDSWriter  # imports torchvision: keep it out of worker startup

        self.root, self.vocab_size = root, vocab_size
        columns = {"tokens": f"ndarray:{token_dtype(vocab_size)}"}
        self.writers = {s: MDSWriter(out=str(root / s), columns=columns, size_limit=shard_bytes) for s in SPLITS}
        self.num_documents = dict.fromkeys(SPLITS, 0)
        self.counts_V = {s: np.zeros(vocab_size, np.int64) for s in SPLITS}

    def write(self, docs: list[np.ndarray], is_val: np.ndarray) -> None:
        for split, chosen in (("train", ~is_val), ("val", is_val)):
            picked = [doc for doc, keep in zip(docs, chosen) if keep]
            for doc in picked:
                self.writers[split].write({"tokens": doc})
            if picked:
                # Targets are every token but a document's first (its label sits at the
                # previous document's EOS, which the loader masks).
                targets = np.concatenate([doc[1:] for doc in picked])
                self.counts_V[split] += np.bincount(targets, minlength=self.vocab_size)
                self.num_documents[split] += len(picked)

    def num_tokens(self, split: str | None = None) -> int:
        splits = SPLITS if split is None else (split,)
        return int(sum(self.counts_V[s].sum() + self.num_documents[s] for s in splits))

    def __enter__(self) -> _SplitWriters:
        return self

    def __exit__(self, exc_type, exc, traceback) -> None:
        for writer in self.writers.values():
            writer.finish()
        if exc_type is None:
            for split in SPLITS:
                np.save(self.root / f"{split}_counts.npy", self.counts_V[split])


def _manifest(writers: _SplitWriters, tokenizer: Tokenizer, paths: list[Path], text_field: str,
              val_fraction: float, seed: int, max_doc_chars: int) -> dict:
    splits = {}
    for split in SPLITS:
        index = json.loads((writers.root / split / "index.json").read_text())
        splits[split] = {
            "num_documents": writers.num_documents[split],
            "num_tokens": writers.num_tokens(split),
            "num_shards": len(index["shards"]),
        }
    if splits["train"]["num_documents"] == 0:
        raise DataError("no document landed in the train split; lower --val-fraction or add data")
    if val_fraction > 0 and splits["val"]["num_documents"] == 0:
        raise DataError(
            f"no document landed in the val split ({splits['train']['num_documents']} documents, "
            f"val_fraction {val_fraction}); raise --val-fraction or add data"
        )
    return {
        "format": FORMAT,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "tokenizer": "tokenizer.json",
        "tokenizer_sha256": tokenizer.sha256(),
        "vocab_size": tokenizer.vocab_size,
        "eos_id": tokenizer.eos_id,
        "token_dtype": token_dtype(tokenizer.vocab_size),
        "text_field": text_field,
        "val_fraction": val_fraction,
        "seed": seed,
        "max_doc_chars": max_doc_chars,
        "inputs": [str(p) for p in paths],
        "splits": splits,
        "unigram_counts": {s: f"{s}_counts.npy" for s in SPLITS},
    }


def _move_into_place(tmp: Path, out: Path) -> None:
    """Rename the finished `tmp` to `out`, replacing an existing `out` only now."""
    old = None
    if out.exists():
        old = out.with_name(f"{out.name}.old-{uuid.uuid4().hex[:8]}")
        os.rename(out, old)
    os.rename(tmp, out)
    if old is not None:
        shutil.rmtree(old)


def load_manifest(data_dir: str | os.PathLike) -> dict:
    """The manifest of a prepared directory; DataError if prepare did not finish there."""
    path = Path(data_dir) / "manifest.json"
    if not path.is_file():
        raise DataError("no manifest.json: not a prepared data directory, or prepare did not finish "
                        "(run `braid data prepare`)", data_dir)
    manifest = json.loads(path.read_text())
    if manifest.get("format") != FORMAT:
        raise DataError(f"unknown data format {manifest.get('format')!r}, expected {FORMAT!r}", path)
    return manifest


def unigram_baseline(data_dir: str | os.PathLike) -> float:
    """Validation cross-entropy (nats/token) of the add-one-smoothed unigram model of the
    train split, over the tokens the loader scores (all but each document's first).

    A trained model should beat this quickly; it is the loss of a model that learned token
    frequencies and nothing else.
    """
    manifest = load_manifest(data_dir)
    train_V = np.load(Path(data_dir) / manifest["unigram_counts"]["train"]).astype(np.float64)
    val_V = np.load(Path(data_dir) / manifest["unigram_counts"]["val"]).astype(np.float64)
    if val_V.sum() == 0:
        raise DataError("the val split is empty (prepared with val_fraction=0)", data_dir)
    log_p_V = np.log(train_V + 1.0) - np.log(train_V.sum() + len(train_V))
    return float(-(val_V * log_p_V).sum() / val_V.sum())
