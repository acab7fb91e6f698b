"""The order in which one rank reads one source's documents in one epoch.

Shards are permuted, then grouped (in that order) into blocks of at least `block_docs`
documents, and the documents of each block are permuted. The epoch's global sequence is the
blocks one after another; rank r of W reads global positions r, r + W, r + 2W, ... So ranks
are disjoint and cover the epoch (their counts differ by at most one), all ranks read the
same few shards at a time (downloads stay local to a block), and memory is one block's
index. Every permutation is seeded by (seed, source, epoch[, block]): the same arguments
give the same order on any machine, and each epoch is reshuffled. Without shuffling the
order is the shards' own.

Names: S shards, N documents of one block.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

DEFAULT_BLOCK_DOCS = 1 << 18


class EpochOrder:
    """`sample(k)` is the (shard, index in shard) of this rank's k-th document."""

    def __init__(
        self,
        shard_sizes: Sequence[int],
        *,
        seed: int,
        source: int,
        epoch: int,
        rank: int,
        world_size: int,
        shuffle: bool,
        block_docs: int = DEFAULT_BLOCK_DOCS,
    ):
        if not 0 <= rank < world_size:
            raise ValueError(f"rank must be in [0, world_size={world_size}), got {rank}")
        self.sizes_S = np.asarray(shard_sizes, dtype=np.int64)
        self.epoch = epoch
        self.seed_key = [seed, source, epoch]
        self.rank, self.world_size, self.shuffle = rank, world_size, shuffle
        num_shards = len(self.sizes_S)
        shard_order_S = _rng(self.seed_key).permutation(num_shards) if shuffle else np.arange(num_shards)
        self.blocks = _group(shard_order_S, self.sizes_S, block_docs if shuffle else None)
        block_sizes = [int(self.sizes_S[b].sum()) for b in self.blocks]
        self.block_starts = np.concatenate([[0], np.cumsum(block_sizes)]).astype(np.int64)
        total = int(self.block_starts[-1])
        self.num_documents = len(range(rank, total, world_size))
        self._cached_block = -1
        self._shard_N = self._index_N = np.empty(0, dtype=np.int64)

    def __len__(self) -> int:
        return self.num_documents

    def sample(self, k: int) -> tuple[int, int]:
        """(shard, index within shard) of this rank's k-th document, 0 <= k < len(self)."""
        if not 0 <= k < self.num_documents:
            raise IndexError(f"document {k} of an epoch with {self.num_documents} for this rank")
        position = self.rank + k * self.world_size
        block = int(np.searchsorted(self.block_starts, position, side="right")) - 1
        if block != self._cached_block:
            self._shard_N, self._index_N = self._block(block)
            self._cached_block = block
        j = position - int(self.block_starts[block])
        return int(self._shard_N[j]), int(self._index_N[j])

    def _block(self, block: int) -> tuple[np.ndarray, np.ndarray]:
        shards = self.blocks[block]
        sizes = self.sizes_S[shards]
        shard_N = np.repeat(shards, sizes)
        starts = np.repeat(np.cumsum(sizes) - sizes, sizes)
        index_N = np.arange(len(shard_N), dtype=np.int64) - starts
        if self.shuffle:
            perm_N = _rng([*self.seed_key, block + 1]).permutation(len(shard_N))
            shard_N, index_N = shard_N[perm_N], index_N[perm_N]
        return shard_N, index_N


def _rng(key: list[int]) -> np.random.Generator:
    return np.random.Generator(np.random.PCG64(np.random.SeedSequence(key)))


def _group(shard_order_S: np.ndarray, sizes_S: np.ndarray, block_docs: int | None) -> list[np.ndarray]:
    """Consecutive runs of `shard_order_S` with at least `block_docs` documents each (the
    last may have fewer); one block of everything when `block_docs` is None."""
    if block_docs is None:
        return [shard_order_S]
    blocks, current, count = [], [], 0
    for shard in shard_order_S:
        current.append(shard)
        count += int(sizes_S[shard])
        if count >= block_docs:
            blocks.append(np.array(current, dtype=np.int64))
            current, count = [], 0
    if current:
        blocks.append(np.array(current, dtype=np.int64))
    return blocks
