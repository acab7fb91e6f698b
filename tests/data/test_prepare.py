"""prepare: documents survive the round trip through MDS shards exactly, the split and the
shards do not depend on worker count, failures leave nothing that looks complete, and the
unigram baseline equals a direct computation."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from braid.data.documents import iter_documents
from braid.data.errors import DataError
from braid.data.prepare import load_manifest, prepare, unigram_baseline
from braid.data.tokenizer import load_tokenizer
from tests.data.conftest import make_texts, read_split, write_jsonl


def test_round_trip_keeps_every_document_and_count(prepared, tokenizer_path):
    data_dir, texts = prepared
    tok = load_tokenizer(tokenizer_path)
    manifest = load_manifest(data_dir)
    decoded = []
    for split in ("train", "val"):
        docs = read_split(data_dir, split)
        assert all(doc[-1] == tok.eos_id and tok.eos_id not in doc[:-1] for doc in docs)
        assert manifest["splits"][split]["num_documents"] == len(docs)
        assert manifest["splits"][split]["num_tokens"] == sum(len(d) for d in docs)
        decoded += [tok.decode(doc[:-1]) for doc in docs]
    assert sorted(decoded) == sorted(texts)
    assert manifest["splits"]["train"]["num_shards"] > 3, "the fixture should span several shards"
    assert 0 < manifest["splits"]["val"]["num_documents"] < 80
    assert (data_dir / "tokenizer.json").read_text() == load_tokenizer(tokenizer_path).to_json()
    assert manifest["token_dtype"] == "uint16" and read_split(data_dir, "val")[0].dtype == np.uint16


def test_txt_documents_round_trip_in_order(tmp_path, tokenizer_path):
    book = tmp_path / "book.txt"
    book.write_text("\n\n".join(make_texts(80, seed=5)) + "\n")
    prepare([book], tmp_path / "out", tokenizer_path, val_fraction=0.0, num_workers=1,
            max_doc_chars=300, progress=False)
    tok = load_tokenizer(tokenizer_path)
    expected = [d.text for d in iter_documents(book, max_doc_chars=300)]
    assert [tok.decode(d[:-1]) for d in read_split(tmp_path / "out", "train")] == expected
    assert load_manifest(tmp_path / "out")["splits"]["val"]["num_documents"] == 0


def test_split_and_shards_do_not_depend_on_workers_or_file_order(tmp_path, tokenizer_path):
    texts = make_texts(300, seed=6)
    a = write_jsonl(tmp_path / "a.jsonl", texts[:150])
    b = write_jsonl(tmp_path / "b.jsonl", texts[150:])
    kwargs = dict(val_fraction=0.2, shard_bytes=2048, progress=False)
    one = prepare([a, b], tmp_path / "one", tokenizer_path, num_workers=1, **kwargs)
    two = prepare([a, b], tmp_path / "two", tokenizer_path, num_workers=2, **kwargs)
    swapped = prepare([b, a], tmp_path / "swapped", tokenizer_path, num_workers=1, **kwargs)
    assert one["splits"] == two["splits"]
    for split in ("train", "val"):
        for shard in sorted((tmp_path / "one" / split).glob("*.mds")):
            assert shard.read_bytes() == (tmp_path / "two" / split / shard.name).read_bytes()
        docs = {tuple(d) for d in read_split(tmp_path / "one", split)}
        assert docs == {tuple(d) for d in read_split(tmp_path / "swapped", split)}
    assert swapped["splits"]["val"]["num_documents"] == one["splits"]["val"]["num_documents"]


def test_failure_leaves_no_output(tmp_path, tokenizer_path):
    good = write_jsonl(tmp_path / "good.jsonl", make_texts(50, seed=7))
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine"}\n{"text": "broken\n')
    with pytest.raises(DataError, match=f"^{bad}:2: invalid JSON"):
        prepare([good, bad], tmp_path / "out", tokenizer_path, num_workers=1, progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.jsonl", "good.jsonl"]


def test_existing_output_needs_overwrite(tmp_path, tokenizer_path):
    inputs = write_jsonl(tmp_path / "in.jsonl", make_texts(60, seed=8))
    out = tmp_path / "out"
    out.mkdir()
    (out / "old").write_text("x")
    with pytest.raises(DataError, match="output directory exists"):
        prepare([inputs], out, tokenizer_path, num_workers=1, progress=False)
    prepare([inputs], out, tokenizer_path, val_fraction=0.2, num_workers=1, overwrite=True, progress=False)
    assert not (out / "old").exists() and (out / "manifest.json").is_file()
    assert [p.name for p in tmp_path.iterdir() if ".tmp-" in p.name or ".old-" in p.name] == []


def test_empty_validation_split_is_an_error(tmp_path, tokenizer_path):
    inputs = write_jsonl(tmp_path / "in.jsonl", make_texts(3, seed=9))
    with pytest.raises(DataError, match="no document landed in the val split"):
        prepare([inputs], tmp_path / "out", tokenizer_path, val_fraction=0.001, num_workers=1, progress=False)


def test_unigram_baseline_matches_direct_computation(prepared):
    data_dir, _ = prepared
    vocab_size = load_manifest(data_dir)["vocab_size"]
    train = np.zeros(vocab_size)
    for doc in read_split(data_dir, "train"):
        np.add.at(train, doc[1:], 1)
    targets = np.concatenate([doc[1:] for doc in read_split(data_dir, "val")])
    log_p = np.log((train + 1) / (train.sum() + vocab_size))
    expected = -log_p[targets].mean()
    assert unigram_baseline(data_dir) == pytest.approx(expected, rel=1e-12)
    assert 1.0 < expected < np.log(vocab_size)


def test_manifest_is_last_and_names_everything(prepared):
    data_dir, _ = prepared
    manifest = json.loads((data_dir / "manifest.json").read_text())
    for name in (manifest["tokenizer"], *manifest["unigram_counts"].values()):
        assert (Path(data_dir) / name).is_file()
    assert manifest["vocab_size"] == 300 and manifest["eos_id"] == 0
