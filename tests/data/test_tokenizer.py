"""Tokenizers: trained BPE round-trips text; tiktoken-format files encode exactly like the
tiktoken library (parity on every OpenAI pre-tokenisation pattern); errors name the file."""

from __future__ import annotations

import base64
import json
import random

import pytest

from braid.data.errors import DataError
from braid.data.tiktoken_file import _bytes_to_unicode
from braid.data.tokenizer import load_tokenizer, train_tokenizer

# tiktoken 0.14's own patterns (tiktoken_ext/openai_public.py), possessive quantifiers and all.
REFERENCE_PATTERNS = {
    "gpt2": r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}++| ?\p{N}++| ?[^\s\p{L}\p{N}]++|\s++$|\s+(?!\S)|\s""",
    "cl100k": r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}++|\p{N}{1,3}+| ?[^\s\p{L}\p{N}]++[\r\n]*+|\s++$|\s*[\r\n]|\s+(?!\S)|\s""",
    "o200k": "|".join([
        r"""[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?""",
        r"""[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?""",
        r"""\p{N}{1,3}""", r""" ?[^\s\p{L}\p{N}]+[\r\n/]*""", r"""\s*[\r\n]+""", r"""\s+(?!\S)""", r"""\s+""",
    ]),
}

PIECES = ("The quick brown fox don't it's we'll I'm 12345 3.14159 naïve café ÜBER Ünïcödé 日本語 😀 "
          "---- \t tabs  two  spaces\n\n<|endoftext|> nbsp\u00a0ideographic\u3000space HTTPServer x/y/z 'Quoted' CamelCase").split(" ")
SEPARATORS = [" ", " ", "", "\n", "  ", "\t", "'s ", "\r\n", "   \n"]


def random_text(rng: random.Random, num_pieces: int) -> str:
    return "".join(rng.choice(PIECES) + rng.choice(SEPARATORS) for _ in range(num_pieces))


def test_trained_tokenizer_round_trips_any_text(tokenizer_path):
    tok = load_tokenizer(tokenizer_path)
    assert tok.eos_id == 0 and tok.vocab_size == 300
    rng = random.Random(0)
    for _ in range(50):
        text = random_text(rng, 40)
        assert tok.decode(tok.encode(text)) == text


def test_literal_special_token_in_text_is_not_eos(tokenizer_path):
    tok = load_tokenizer(tokenizer_path)
    ids = tok.encode("a<|endoftext|>b")
    assert tok.eos_id not in ids
    assert tok.decode(ids + [tok.eos_id]) == "a<|endoftext|>b<|endoftext|>"


def test_data_dir_loads_its_tokenizer_with_the_manifest_eos(tmp_path, tokenizer_path):
    (tmp_path / "tokenizer.json").write_text(tokenizer_path.read_text())
    (tmp_path / "manifest.json").write_text(json.dumps({"tokenizer": "tokenizer.json", "eos_id": 7}))
    tok = load_tokenizer(tmp_path)
    assert tok.encode("the king") == load_tokenizer(tokenizer_path).encode("the king") and tok.eos_id == 7


@pytest.fixture(scope="module")
def synthetic_ranks(tmp_path_factory) -> tuple[dict[bytes, int], object]:
    """Ranks of a realistic BPE (trained here on mixed-script text), written as a tiktoken file:
    single bytes first, then the merged tokens in the order BPE learned them."""
    root = tmp_path_factory.mktemp("tiktoken")
    rng = random.Random(1)
    (root / "corpus.txt").write_text("\n\n".join(random_text(rng, 200) for _ in range(100)))
    trained = train_tokenizer([root / "corpus.txt"], 1200, root / "bpe.json")
    char_to_byte = {c: b for b, c in _bytes_to_unicode().items()}
    ranks = {bytes([b]): b for b in range(256)}
    for token, _ in sorted(trained.backend.get_vocab(with_added_tokens=False).items(), key=lambda kv: kv[1]):
        if token != "<|endoftext|>":
            ranks.setdefault(bytes(char_to_byte[c] for c in token), len(ranks))
    path = root / "synthetic.tiktoken"
    path.write_text("".join(f"{base64.b64encode(t).decode()} {r}\n" for t, r in ranks.items()))
    return ranks, path


@pytest.mark.parametrize("pattern", sorted(REFERENCE_PATTERNS))
def test_tiktoken_file_encodes_like_tiktoken(synthetic_ranks, pattern):
    tiktoken = pytest.importorskip("tiktoken")
    ranks, path = synthetic_ranks
    reference = tiktoken.Encoding("synthetic", pat_str=REFERENCE_PATTERNS[pattern], mergeable_ranks=ranks,
                                  special_tokens={"<|endoftext|>": len(ranks)})
    ours = load_tokenizer(path, pattern=pattern)
    assert ours.eos_id == len(ranks) and ours.vocab_size == len(ranks) + 1
    rng = random.Random(2)
    for _ in range(200):
        text = random_text(rng, 60)
        ids = ours.encode(text)
        assert ids == reference.encode_ordinary(text), text
        assert ours.decode(ids) == text


def test_known_openai_layout_picks_pattern_and_eos(tmp_path):
    # 50256 ranks is GPT-2's r50k layout: <|endoftext|> = 50256.
    ranks = [bytes([b]) for b in range(256)] + [f"t{i}".encode() for i in range(50256 - 256)]
    path = tmp_path / "gpt2like.tiktoken"
    path.write_text("".join(f"{base64.b64encode(t).decode()} {r}\n" for r, t in enumerate(ranks)))
    tok = load_tokenizer(path)
    assert tok.eos_id == 50256 and tok.vocab_size == 50257


def test_bad_tiktoken_line_is_named(tmp_path):
    path = tmp_path / "bad.tiktoken"
    lines = [f"{base64.b64encode(bytes([b])).decode()} {b}" for b in range(256)]
    lines.insert(3, "not-base64!! x")
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(DataError, match=f"^{path}:4: "):
        load_tokenizer(path)


def test_tokenizer_errors_name_the_file(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        load_tokenizer(tmp_path / "missing.json")
    broken = tmp_path / "broken.json"
    broken.write_text("{not json")
    with pytest.raises(DataError, match=f"^{broken}: not a valid tokenizer.json"):
        load_tokenizer(broken)


def test_tokenizer_without_known_eos_asks_for_one(tmp_path):
    from tokenizers import Tokenizer, models

    path = tmp_path / "noeos.json"
    Tokenizer(models.BPE(vocab={"a": 0, "b": 1}, merges=[])).save(str(path))
    with pytest.raises(DataError, match="pass eos_token="):
        load_tokenizer(path)
    assert load_tokenizer(path, eos_token="b").eos_id == 1


def test_vocab_size_too_small_is_rejected(tmp_path):
    (tmp_path / "a.txt").write_text("text\n")
    with pytest.raises(ValueError, match="at least 257"):
        train_tokenizer([tmp_path / "a.txt"], 100, tmp_path / "t.json")
