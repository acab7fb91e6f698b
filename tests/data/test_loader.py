"""PackedLoader: exact resume, determinism, disjoint ranks, epochs, labels and doc ids at
document boundaries, mixture token shares, validation repeatability, remote pass-through.

The rows of consecutive batches are consecutive windows of one token stream, so the stream
is the concatenation of all input_ids rows; the tests cut it at EOS into documents.
"""

from __future__ import annotations

import itertools
import json

import numpy as np
import pytest
import torch

from braid.data.loader import PackedLoader
from braid.data.order import EpochOrder
from braid.data.packing import pack_batch
from braid.data.prepare import prepare
from tests.data.conftest import read_split, write_jsonl

EOS = 0  # the fixture tokenizer's <|endoftext|>


def take(loader, n):
    return list(itertools.islice(iter(loader), n))


def first_documents(loader, n) -> list[tuple[int, ...]]:
    """The first n complete documents the loader yields."""
    batches, num_eos = [], 0
    for batch in loader:
        batches.append(batch)
        num_eos += int((batch["input_ids"] == EOS).sum())
        if num_eos >= n:
            return documents_of(stream_of(batches))[:n]
    raise AssertionError("unreachable: the loader is infinite")


def stream_of(batches) -> np.ndarray:
    return np.concatenate([b["input_ids"].reshape(-1).numpy() for b in batches])


def documents_of(stream: np.ndarray) -> list[tuple[int, ...]]:
    """Complete documents (ending with EOS) of a stream that starts at a document start."""
    ends = np.flatnonzero(stream == EOS)
    starts = np.concatenate([[0], ends[:-1] + 1])
    return [tuple(stream[s:e + 1]) for s, e in zip(starts, ends)]


def assert_same_batches(xs, ys):
    assert len(xs) == len(ys)
    for x, y in zip(xs, ys):
        assert x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)


def test_pack_batch_by_hand():
    pieces = [np.array([5, 6, EOS]), np.array([7, EOS]), np.array([8, 9, 10, EOS])]
    batch, tail = pack_batch(pieces, batch_size=2, seq_len=4)
    assert batch["input_ids"].tolist() == [[5, 6, 0, 7], [0, 8, 9, 10]]
    assert batch["labels"].tolist() == [[6, 0, -100, 0], [-100, 9, 10, 0]]
    assert batch["doc_ids"].tolist() == [[0, 0, 0, 1], [0, 1, 1, 1]]
    assert batch["doc_ids"].dtype == np.int32 and tail.tolist() == [EOS]


@pytest.mark.parametrize("world_size", [1, 2, 3])
@pytest.mark.parametrize("shuffle", [True, False])
def test_epoch_order_partitions_every_epoch(world_size, shuffle):
    sizes = [5, 0, 7, 3, 9]
    per_rank = []
    for rank in range(world_size):
        order = EpochOrder(sizes, seed=3, source=0, epoch=1, rank=rank, world_size=world_size,
                           shuffle=shuffle, block_docs=8)
        per_rank.append([order.sample(k) for k in range(len(order))])
    everything = sorted(s for samples in per_rank for s in samples)
    assert everything == [(shard, i) for shard, n in enumerate(sizes) for i in range(n)]
    assert max(map(len, per_rank)) - min(map(len, per_rank)) <= 1
    if not shuffle:
        assert per_rank[0] == everything[::world_size]
    again = EpochOrder(sizes, seed=3, source=0, epoch=2, rank=0, world_size=world_size, shuffle=shuffle, block_docs=8)
    assert ([again.sample(k) for k in range(len(again))] != per_rank[0]) == shuffle


def test_resume_is_exact(prepared):
    data_dir, _ = prepared
    loader = PackedLoader(data_dir, seq_len=64, batch_size=4, seed=5)
    iterator = iter(loader)
    for _ in range(7):
        next(iterator)
    state = json.loads(json.dumps(loader.state_dict()))  # plain Python: survives JSON
    expected = [next(iterator) for _ in range(100)]
    assert loader.state_dict()["sources"][0]["epoch"] >= 1, "the test should cross an epoch"
    resumed = PackedLoader(data_dir, seq_len=64, batch_size=4, seed=5)
    resumed.load_state_dict(state)
    assert_same_batches(take(resumed, 100), expected)


def test_same_seed_rank_world_give_same_batches_and_other_seeds_do_not(prepared):
    data_dir, _ = prepared
    make = lambda seed: take(PackedLoader(data_dir, seq_len=16, batch_size=2, seed=seed, rank=1, world_size=2), 5)
    assert_same_batches(make(0), make(0))
    assert not torch.equal(make(0)[0]["input_ids"], make(1)[0]["input_ids"])


def test_ranks_read_disjoint_documents_that_cover_the_epoch(prepared):
    data_dir, _ = prepared
    all_docs = {tuple(d) for d in read_split(data_dir, "train")}
    world_size, seen = 3, []
    for rank in range(world_size):
        loader = PackedLoader(data_dir, seq_len=32, batch_size=2, seed=0, rank=rank, world_size=world_size)
        epoch_docs = len(EpochOrder([len(all_docs)], seed=0, source=0, epoch=0, rank=rank,
                                    world_size=world_size, shuffle=True))
        docs = first_documents(loader, epoch_docs)
        assert len(set(docs)) == epoch_docs
        seen.append(set(docs))
    assert all(not (a & b) for a, b in itertools.combinations(seen, 2))
    assert set.union(*seen) == all_docs


def test_epochs_repeat_every_document_once_and_reshuffle(prepared):
    data_dir, _ = prepared
    all_docs = sorted(tuple(d) for d in read_split(data_dir, "train"))
    n = len(all_docs)
    docs = first_documents(PackedLoader(data_dir, seq_len=64, batch_size=4, seed=2), 2 * n)
    assert sorted(docs[:n]) == all_docs and sorted(docs[n:2 * n]) == all_docs
    assert docs[:n] != docs[n:2 * n]


def test_labels_and_doc_ids_follow_document_boundaries(prepared):
    data_dir, _ = prepared
    T = 24
    batches = take(PackedLoader(data_dir, seq_len=T, batch_size=3, seed=4), 11)
    stream = stream_of(batches)
    rows = 0
    for batch in batches[:-1]:
        ids, labels, doc_ids = (batch[k].numpy() for k in ("input_ids", "labels", "doc_ids"))
        for row in range(ids.shape[0]):
            window = stream[rows * T:rows * T + T + 1]
            at_eos = ids[row] == EOS
            assert np.array_equal(ids[row], window[:-1])
            assert np.array_equal(labels[row], np.where(at_eos, -100, window[1:]))
            assert doc_ids[row][0] == 0
            assert np.array_equal(np.diff(doc_ids[row]), at_eos[:-1].astype(np.int32))
            rows += 1
    assert (batches[0]["labels"] == -100).any(), "the rows should contain document boundaries"
    assert batches[0]["input_ids"].dtype == torch.int64 and batches[0]["doc_ids"].dtype == torch.int32


def test_validation_loader_gives_the_same_batches_in_shard_order(prepared):
    data_dir, _ = prepared
    loader = PackedLoader(data_dir, split="val", seq_len=16, batch_size=2, shuffle=False)
    first, second = take(loader, 6), take(loader, 6)
    assert_same_batches(first, second)
    val_stream = np.concatenate(read_split(data_dir, "val"))
    stream = stream_of(first)
    assert np.array_equal(stream, np.resize(val_stream, len(stream)))


@pytest.fixture(scope="module")
def two_sources(tmp_path_factory, tokenizer_path):
    """Two datasets over disjoint letters (and no spaces), so every non-EOS token names its
    source; documents of 10 to 60 characters."""
    root = tmp_path_factory.mktemp("mixture")
    rng = np.random.default_rng(0)
    dirs = []
    for name, letters, count in (("a", "abcdefghijklm", 150), ("b", "nopqrstuvwxyz", 80)):
        texts = ["".join(rng.choice(list(letters), size=rng.integers(10, 61))) for _ in range(count)]
        prepare([write_jsonl(root / f"{name}.jsonl", texts)], root / name, tokenizer_path,
                val_fraction=0.0, num_workers=1, progress=False)
        dirs.append(root / name)
    token_sets = [{t for d in read_split(p, "train") for t in d} - {EOS} for p in dirs]
    assert not token_sets[0] & token_sets[1], "the two sources must not share tokens"
    return dirs, token_sets


def test_mixture_token_shares_match_proportions(two_sources):
    (dir_a, dir_b), (tokens_a, _) = two_sources
    loader = PackedLoader([(dir_a, 1.0), (dir_b, 3.0)], seq_len=64, batch_size=4, seed=0)
    stream = stream_of(take(loader, 40))
    # An EOS belongs to the document it ends, i.e. to the token before it.
    owner = np.where(stream == EOS, np.roll(stream, 1), stream)
    share_a = np.isin(owner, list(tokens_a)).mean()
    longest = max(len(d) for p in (dir_a, dir_b) for d in read_split(p, "train"))
    # The deficit rule keeps each share within (sources + 1) * longest / tokens of its target.
    assert abs(share_a - 0.25) <= 3 * longest / len(stream)
    assert 3 * longest / len(stream) < 0.05, "the bound must be tight enough to mean something"


def test_mixture_resume_is_exact(two_sources):
    (dir_a, dir_b), _ = two_sources
    make = lambda: PackedLoader([(dir_a, 0.5), (dir_b, 0.5)], seq_len=20, batch_size=2, seed=1)
    loader = make()
    take(loader, 9)
    state = loader.state_dict()
    expected = take(loader, 30)
    resumed = make()
    resumed.load_state_dict(state)
    assert_same_batches(take(resumed, 30), expected)


def test_remote_source_is_cached_and_reads_the_same(prepared, tmp_path):
    data_dir, _ = prepared
    remote = PackedLoader({"remote": str(data_dir), "local": str(tmp_path / "cache")}, seq_len=16, batch_size=2)
    assert_same_batches(take(remote, 5), take(PackedLoader(data_dir, seq_len=16, batch_size=2), 5))
    assert (tmp_path / "cache" / "manifest.json").is_file() and list((tmp_path / "cache" / "train").glob("*.mds"))


def test_state_from_another_layout_or_dataset_is_refused(prepared, two_sources):
    data_dir, _ = prepared
    state = PackedLoader(data_dir, seq_len=8, batch_size=1, rank=0, world_size=2).state_dict()
    with pytest.raises(ValueError, match="world_size=2"):
        PackedLoader(data_dir, seq_len=8, batch_size=1, rank=0, world_size=3).load_state_dict(state)
    with pytest.raises(ValueError, match="other data"):
        PackedLoader(two_sources[0][0], seq_len=8, batch_size=1, rank=0, world_size=2).load_state_dict(state)


def test_bad_arguments_are_explained(prepared, tmp_path, tokenizer_path):
    data_dir, _ = prepared
    with pytest.raises(ValueError, match="rank < world_size"):
        PackedLoader(data_dir, rank=2, world_size=2)
    with pytest.raises(ValueError, match="proportion must be positive"):
        PackedLoader([(data_dir, 0.0)])
    with pytest.raises(ValueError, match="no manifest.json"):
        PackedLoader(tmp_path)
    with pytest.raises(ValueError, match="fewer than world_size"):
        PackedLoader(data_dir, split="val", rank=0, world_size=1000)
    with pytest.raises(ValueError, match="no 'test' split"):
        PackedLoader(data_dir, split="test")


def test_empty_split_is_explained(two_sources):
    (dir_a, _), _ = two_sources
    with pytest.raises(ValueError, match="val split is empty"):
        PackedLoader(dir_a, split="val", shuffle=False)
