"""PackedLoader: packed fixed-length batches with document ids from prepared MDS shards.

Why not StreamingDataset: its sample order depends on its canonical-node partitioning and
process-global shared memory, it resumes at whole samples across the global batch (not a
packing buffer), and reshuffling epochs means recreating iterators. This loader instead
reads the shards with streaming's own pieces (Stream for local/remote directories and
downloads, MDSReader for the index and sample decoding) and keeps the order itself:

- order.py decides which documents each rank reads (disjoint, seeded, reshuffled per epoch);
- mixtures interleave whole documents from the sources by a deterministic deficit rule:
  the next document comes from the source furthest below its token proportion, so token
  shares stay within (sources + 1) * longest document / tokens seen of the proportions;
- packing.py lays documents end to end into rows (labels -100 across document boundaries);
- the state (per source: epoch, position, tokens taken; plus the unused tail of the last
  document) is a small dict of plain Python values, restored exactly by load_state_dict.

Iteration never ends: each source moves to its next (reshuffled) epoch when it runs out.
A shuffle=False loader (validation) restarts from the beginning on every `iter()`, so it
gives the same batches every time; take as many as you need with itertools.islice.

Names: B batch rows, T sequence length.
"""

from __future__ import annotations

import collections
import contextlib
import fcntl
import hashlib
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from braid.data.errors import DataError
from braid.data.order import DEFAULT_BLOCK_DOCS, EpochOrder
from braid.data.packing import pack_batch
from braid.data.prepare import load_manifest

STATE_FORMAT = "braid.packed_loader.v1"
_MAX_OPEN_SHARDS = 128


@dataclass(frozen=True)
class SourceSpec:
    """One dataset of a mixture: a prepared directory (`local`), or a `remote` URL (any
    mosaicml-streaming remote: s3://, gs://, ..., or a path) cached in `local`."""

    local: str
    remote: str | None = None
    proportion: float = 1.0

    @property
    def name(self) -> str:
        return self.remote or self.local


def parse_sources(sources: Any, cache_dir: str | os.PathLike | None = None) -> list[SourceSpec]:
    """Normalise `sources`: a directory or URL; or a list whose items are a directory/URL,
    a (directory/URL, proportion) pair, or a dict with keys local/remote/proportion.
    URLs (with "://") are cached under `cache_dir` (default ~/.cache/braid/data)."""
    if isinstance(sources, (str, os.PathLike, dict)):
        sources = [sources]
    if isinstance(sources, tuple) and len(sources) == 2 and isinstance(sources[1], (int, float)):
        sources = [sources]
    specs = [_parse_one(item, cache_dir) for item in sources]
    if not specs:
        raise ValueError("no data sources given")
    for spec in specs:
        if not spec.proportion > 0:
            raise ValueError(f"source {spec.name}: proportion must be positive, got {spec.proportion}")
    return specs


def _parse_one(item: Any, cache_dir: str | os.PathLike | None) -> SourceSpec:
    proportion = 1.0
    if isinstance(item, (tuple, list)) and len(item) == 2:
        item, proportion = item
    if isinstance(item, dict):
        unknown = set(item) - {"local", "remote", "proportion"}
        if unknown or not (item.get("local") or item.get("remote")):
            raise ValueError(f"a source dict takes local and/or remote, and proportion; got {item}")
        remote = item.get("remote")
        local = item.get("local") or _cache_path(remote, cache_dir)
        return SourceSpec(str(local), remote and str(remote), float(item.get("proportion", proportion)))
    if not isinstance(item, (str, os.PathLike)):
        raise ValueError(f"a source is a directory, URL, (path, proportion) or dict; got {item!r}")
    if "://" in str(item):
        return SourceSpec(_cache_path(str(item), cache_dir), str(item), float(proportion))
    return SourceSpec(str(item), None, float(proportion))


def _cache_path(remote: str, cache_dir: str | os.PathLike | None) -> str:
    root = Path(cache_dir or os.environ.get("BRAID_DATA_CACHE", Path.home() / ".cache" / "braid" / "data"))
    return str(root / hashlib.blake2s(remote.encode(), digest_size=8).hexdigest())


@contextlib.contextmanager
def _file_lock(directory: str):
    """Serialise downloads into one cache directory across the processes of a node."""
    os.makedirs(directory, exist_ok=True)
    with open(os.path.join(directory, ".braid.lock"), "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _stream(spec: SourceSpec, split: str | None):
    from streaming.base.stream import Stream

    stream = Stream(remote=spec.remote, local=spec.local, split=split)
    stream.apply_default(
        {"split": None, "download_retry": 2, "download_timeout": 600.0, "validate_hash": None, "keep_zip": False}
    )
    return stream


def _source_manifest(spec: SourceSpec) -> dict:
    if spec.remote is not None and not os.path.isfile(os.path.join(spec.local, "manifest.json")):
        with _file_lock(spec.local):
            if not os.path.isfile(os.path.join(spec.local, "manifest.json")):
                _stream(spec, None)._download_file("manifest.json")
    return load_manifest(spec.local)


class _ShardSet:
    """The shards of one source's split: document counts, and documents read by memory map
    (streaming's MDSReader opens the file for every sample)."""

    def __init__(self, spec: SourceSpec, split: str):
        from streaming.base.world import World

        self.stream = _stream(spec, split)
        self.directory = os.path.join(spec.local, split)
        if spec.remote is None and not os.path.isfile(os.path.join(self.directory, "index.json")):
            raise DataError(f"no {split!r} split (no {split}/index.json); splits are train and val", spec.local)
        with _file_lock(spec.local):
            world = World(num_nodes=1, ranks_per_node=1, workers_per_rank=1, worker=0)
            self.readers = self.stream.get_shards(world, allow_unsafe_types=False)
        for reader in self.readers:
            if reader.column_names != ["tokens"] or not reader.column_encodings[0].startswith("ndarray"):
                raise DataError(f"shards are not braid documents (columns {reader.column_names})", self.directory)
        self.sizes = [reader.samples for reader in self.readers]
        self._maps: collections.OrderedDict[int, np.memmap] = collections.OrderedDict()

    def read(self, shard: int, index: int) -> np.ndarray:
        """Token ids (N,) of document `index` of `shard`."""
        data = self._map(shard)
        begin, end = data[4 * (1 + index): 4 * (3 + index)].view(np.uint32)
        return self.readers[shard].decode_sample(data[begin:end].tobytes())["tokens"]

    def _map(self, shard: int) -> np.memmap:
        if shard in self._maps:
            self._maps.move_to_end(shard)
            return self._maps[shard]
        reader = self.readers[shard]
        path = os.path.join(self.directory, reader.raw_data.basename)
        if not os.path.isfile(path):
            with _file_lock(self.stream.local):
                self.stream.prepare_shard(reader)
        self._maps[shard] = np.memmap(path, dtype=np.uint8, mode="r")
        if len(self._maps) > _MAX_OPEN_SHARDS:
            self._maps.popitem(last=False)
        return self._maps[shard]


class _Cursor:
    """Where reading stands (the loader's state): per source the epoch, the position within
    this rank's epoch and the tokens taken so far; and the unused tail of the last document."""

    def __init__(self, num_sources: int):
        self.epochs = [0] * num_sources
        self.positions = [0] * num_sources
        self.taken = [0] * num_sources
        self.tail = np.empty(0, dtype=np.int64)
        self.orders: dict[int, EpochOrder] = {}  # a cache, rebuilt from the epochs


class PackedLoader:
    """Infinite iterator of packed batches for one rank.

    Each batch: input_ids (B,T) int64, labels (B,T) int64 (the next token, -100 where it is
    in another document), doc_ids (B,T) int32 (equal exactly within one document of a row).

    sources: a prepared directory (or remote URL), or a list of (directory, proportion)
        pairs (or dicts, see parse_sources) mixed by token share.
    seed, rank, world_size: the order is a function of these (and the data) only; ranks
        read disjoint documents. Each iter() continues from the loader's state (what
        state_dict saves). shuffle=False reads in shard order and restarts on every iter()
        (validation: the same batches every time). cache_dir: where remote sources are cached.
    """

    def __init__(
        self,
        sources: Any,
        split: str = "train",
        seq_len: int = 2048,
        batch_size: int = 8,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        shuffle: bool = True,
        *,
        cache_dir: str | os.PathLike | None = None,
        shuffle_block_docs: int = DEFAULT_BLOCK_DOCS,
    ):
        _check_args(seq_len, batch_size, seed, rank, world_size, shuffle_block_docs)
        self.specs = parse_sources(sources, cache_dir)
        self.split, self.seq_len, self.batch_size = split, seq_len, batch_size
        self.seed, self.rank, self.world_size, self.shuffle = seed, rank, world_size, shuffle
        self.shuffle_block_docs = shuffle_block_docs
        manifests = [_source_manifest(spec) for spec in self.specs]
        _check_same_tokenizer(self.specs, manifests)
        self.vocab_size, self.eos_id = int(manifests[0]["vocab_size"]), int(manifests[0]["eos_id"])
        self._shards = [_ShardSet(spec, split) for spec in self.specs]
        self.num_documents = [sum(s.sizes) for s in self._shards]
        for spec, count in zip(self.specs, self.num_documents):
            if count == 0:
                raise DataError(f"the {split} split is empty (was it prepared with --val-fraction 0?)", spec.name)
            if count < world_size:
                raise DataError(f"the {split} split has {count} documents, fewer than world_size "
                                f"{world_size}: every rank needs at least one", spec.name)
        total = sum(spec.proportion for spec in self.specs)
        self.proportions = [spec.proportion / total for spec in self.specs]
        self._cursor = _Cursor(len(self.specs))

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        cursor = self._cursor if self.shuffle else _Cursor(len(self.specs))
        while True:
            yield self._next_batch(cursor)

    def _next_batch(self, cursor: _Cursor) -> dict[str, torch.Tensor]:
        need = self.batch_size * self.seq_len + 1
        pieces, count = [cursor.tail], len(cursor.tail)
        while count < need:
            source = self._pick_source(cursor)
            doc = self._shards[source].read(*self._next_document(cursor, source))
            cursor.taken[source] += len(doc)
            pieces.append(doc)
            count += len(doc)
        # The tail is always part of the last piece: before it was read, count <= B*T.
        batch, cursor.tail = pack_batch(pieces, self.batch_size, self.seq_len)
        return {key: torch.from_numpy(np.ascontiguousarray(value)) for key, value in batch.items()}

    def _pick_source(self, cursor: _Cursor) -> int:
        deficits = [taken / p for taken, p in zip(cursor.taken, self.proportions)]
        return deficits.index(min(deficits))

    def _next_document(self, cursor: _Cursor, source: int) -> tuple[int, int]:
        order = self._order(cursor, source)
        if cursor.positions[source] == len(order):
            cursor.epochs[source] += 1
            cursor.positions[source] = 0
            order = self._order(cursor, source)
        cursor.positions[source] += 1
        return order.sample(cursor.positions[source] - 1)

    def _order(self, cursor: _Cursor, source: int) -> EpochOrder:
        order = cursor.orders.get(source)
        if order is None or order.epoch != cursor.epochs[source]:
            order = EpochOrder(
                self._shards[source].sizes, seed=self.seed, source=source, epoch=cursor.epochs[source],
                rank=self.rank, world_size=self.world_size, shuffle=self.shuffle,
                block_docs=self.shuffle_block_docs,
            )
            cursor.orders[source] = order
        return order

    def state_dict(self) -> dict[str, Any]:
        """Plain-Python state (ints, floats, strings, lists) for this rank: save it with each
        checkpoint; load_state_dict on a new loader continues with exactly the next batches."""
        cursor = self._cursor
        return {
            "format": STATE_FORMAT,
            "split": self.split,
            "seed": self.seed,
            "shuffle": self.shuffle,
            "shuffle_block_docs": self.shuffle_block_docs,
            "rank": self.rank,
            "world_size": self.world_size,
            "sources": [
                {"name": spec.name, "num_documents": n, "proportion": p, "epoch": e, "position": k, "tokens_taken": t}
                for spec, n, p, e, k, t in zip(self.specs, self.num_documents, self.proportions,
                                               cursor.epochs, cursor.positions, cursor.taken)
            ],
            "tail": cursor.tail.tolist(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from `state` (from state_dict of a loader over the same data, seed,
        shuffle, rank and world size; seq_len and batch_size may differ)."""
        _check_state(self, state)
        cursor = _Cursor(len(self.specs))
        for source, saved in enumerate(state["sources"]):
            cursor.epochs[source] = int(saved["epoch"])
            cursor.positions[source] = int(saved["position"])
            cursor.taken[source] = int(saved["tokens_taken"])
        cursor.tail = np.asarray(state["tail"], dtype=np.int64)
        self._cursor = cursor


def _check_args(seq_len: int, batch_size: int, seed: int, rank: int, world_size: int, block_docs: int) -> None:
    if seq_len < 1 or batch_size < 1:
        raise ValueError(f"seq_len and batch_size must be positive, got {seq_len} and {batch_size}")
    if seed < 0:
        raise ValueError(f"seed must be non-negative, got {seed}")
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"need 0 <= rank < world_size, got rank {rank} and world_size {world_size}")
    if block_docs < 1:
        raise ValueError(f"shuffle_block_docs must be positive, got {block_docs}")


def _check_same_tokenizer(specs: Sequence[SourceSpec], manifests: Sequence[dict]) -> None:
    fingerprints = {m["tokenizer_sha256"] for m in manifests}
    if len(fingerprints) > 1:
        names = ", ".join(f"{s.name} ({m['tokenizer_sha256'][:8]})" for s, m in zip(specs, manifests))
        raise ValueError(f"the sources were prepared with different tokenizers: {names}; "
                         "prepare them all with the same --tokenizer")


def _check_state(loader: PackedLoader, state: dict[str, Any]) -> None:
    if state.get("format") != STATE_FORMAT:
        raise ValueError(f"not a PackedLoader state (format {state.get('format')!r}, expected {STATE_FORMAT!r})")
    for key in ("split", "seed", "shuffle", "shuffle_block_docs", "rank", "world_size"):
        if state[key] != getattr(loader, key):
            raise ValueError(
                f"loader state was saved with {key}={state[key]!r} but this loader has "
                f"{key}={getattr(loader, key)!r}; an exact resume needs the same value (a fresh "
                "loader, without load_state_dict, starts the data over)"
            )
    saved = [(s["num_documents"], round(s["proportion"], 12)) for s in state["sources"]]
    mine = [(n, round(p, 12)) for n, p in zip(loader.num_documents, loader.proportions)]
    if saved != mine:
        raise ValueError(f"loader state is for other data (documents, proportion per source: {saved}, "
                         f"this loader: {mine}); resume with the same sources")


class StackedLoader:
    """Several PackedLoaders read as one: each batch is their batches' rows stacked in order
    (labels and doc ids too). The trainer uses it to read a larger data-parallel run's shards
    in fewer processes (data.read_as_dp); its state is the list of the loaders' states."""

    def __init__(self, loaders: Sequence[PackedLoader]):
        if not loaders:
            raise ValueError("StackedLoader needs at least one loader")
        self.loaders = list(loaders)

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        for batches in zip(*self.loaders):
            yield {key: torch.cat([batch[key] for batch in batches]) for key in batches[0]}

    def state_dict(self) -> list[dict[str, Any]]:
        return [loader.state_dict() for loader in self.loaders]

    def load_state_dict(self, states: list[dict[str, Any]]) -> None:
        if len(states) != len(self.loaders):
            raise ValueError(f"{len(states)} loader states for a StackedLoader of {len(self.loaders)} loaders")
        for loader, state in zip(self.loaders, states):
            loader.load_state_dict(state)
