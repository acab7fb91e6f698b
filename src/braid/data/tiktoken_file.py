r"""tiktoken-format BPE files (one `base64(token bytes) rank` per line, e.g. GPT-2's
`gpt2.tiktoken`) converted to an equivalent `tokenizers` byte-level BPE.

The file holds only the ranks, so the pre-tokenisation regex and the special tokens come from
the known OpenAI layouts (recognised by the number of ranks) or from the caller. The merges
are recovered from the ranks: every split of a token into two tokens is a merge, ordered by
the rank of the merged token, which is the order tiktoken applies them in. The two agree
except where two different overlapping pairs make the same token (a tie tiktoken breaks by
position); the parity test against the `tiktoken` library checks this on realistic text.

The patterns are tiktoken's with its possessive quantifiers written as plain ones (same
matches here; Oniguruma reads `{1,3}+` as a repetition, not as possessive) and `$` as `\z`
(Oniguruma's `$` is end of line, tiktoken's end of text).
"""

from __future__ import annotations

import base64
import binascii
import os
from pathlib import Path

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers

from braid.data.errors import DataError

ENDOFTEXT = "<|endoftext|>"

PATTERNS = {
    "gpt2": r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+""",
    "cl100k": (
        r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"""
        r"""|\s+\z|\s*[\r\n]|\s+(?!\S)|\s"""
    ),
    "o200k": "|".join(
        [
            r"""[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?""",
            r"""[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?""",
            r"""\p{N}{1,3}""",
            r""" ?[^\s\p{L}\p{N}]+[\r\n/]*""",
            r"""\s*[\r\n]+""",
            r"""\s+(?!\S)""",
            r"""\s+""",
        ]
    ),
}

# Number of ranks -> (pattern, special tokens) of the OpenAI encodings.
KNOWN_LAYOUTS = {
    50256: ("gpt2", {ENDOFTEXT: 50256}),
    50280: ("gpt2", {ENDOFTEXT: 50256}),
    100256: (
        "cl100k",
        {
            ENDOFTEXT: 100257,
            "<|fim_prefix|>": 100258,
            "<|fim_middle|>": 100259,
            "<|fim_suffix|>": 100260,
            "<|endofprompt|>": 100276,
        },
    ),
    199998: ("o200k", {ENDOFTEXT: 199999, "<|endofprompt|>": 200018}),
}


def read_ranks(path: str | os.PathLike) -> dict[bytes, int]:
    """token bytes -> rank, from a tiktoken-format file; DataError names the bad line."""
    ranks: dict[bytes, int] = {}
    with open(path, "rb") as f:
        for line_no, line in enumerate(f, start=1):
            if not line.strip():
                continue
            token, rank = _parse_line(line, path, line_no)
            if token in ranks:
                raise DataError(f"token {token!r} appears twice", path, line_no)
            ranks[token] = rank
    if not ranks:
        raise DataError("empty tiktoken file", path)
    missing = [b for b in range(256) if bytes([b]) not in ranks]
    if missing:
        raise DataError(f"not a byte-level BPE: single bytes {missing[:8]} have no rank", path)
    if len(set(ranks.values())) != len(ranks):
        raise DataError("two tokens share a rank", path)
    return ranks


def _parse_line(line: bytes, path: str | os.PathLike, line_no: int) -> tuple[bytes, int]:
    fields = line.split()
    if len(fields) != 2:
        raise DataError("expected `base64-token rank`", path, line_no)
    try:
        return base64.b64decode(fields[0], validate=True), int(fields[1])
    except (binascii.Error, ValueError) as error:
        raise DataError(f"bad token or rank ({error})", path, line_no) from None


def layout_for(ranks: dict[bytes, int], pattern: str | None) -> tuple[str, dict[str, int]]:
    """(regex, special tokens) for these ranks: a known OpenAI layout, else `pattern`
    (a name in PATTERNS or a regex; GPT-2's by default) with <|endoftext|> after the last rank."""
    name, special = KNOWN_LAYOUTS.get(len(ranks), ("gpt2", {ENDOFTEXT: max(ranks.values()) + 1}))
    if pattern is not None:
        name = pattern
    return PATTERNS.get(name, name), special


def tiktoken_to_backend(
    ranks: dict[bytes, int], pattern: str, special_tokens: dict[str, int]
) -> Tokenizer:
    """A `tokenizers` byte-level BPE that encodes like tiktoken with these ranks."""
    byte_to_char = _bytes_to_unicode()

    def to_str(token: bytes) -> str:
        return "".join(byte_to_char[b] for b in token)

    vocab = {to_str(token): rank for token, rank in ranks.items()}
    vocab.update(special_tokens)
    merges = [(to_str(left), to_str(right)) for left, right in _merges(ranks)]
    backend = Tokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False))
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(pattern), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    backend.decoder = decoders.ByteLevel()
    backend.add_special_tokens(list(special_tokens))
    return backend


def _merges(ranks: dict[bytes, int]) -> list[tuple[bytes, bytes]]:
    """Every (left, right) split of every token into two ranked tokens, in the order
    tiktoken would merge them (rank of the result, then of the parts)."""
    found = []
    for token, rank in ranks.items():
        for cut in range(1, len(token)):
            left, right = token[:cut], token[cut:]
            if left in ranks and right in ranks:
                found.append((rank, ranks[left], ranks[right], left, right))
    found.sort()
    return [(left, right) for *_, left, right in found]


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character map (what ByteLevel uses)."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    printable += list(range(ord("®"), ord("ÿ") + 1))
    chars = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in chars:
            chars[b] = chr(256 + extra)
            extra += 1
    return chars


def is_tiktoken_file(path: str | os.PathLike) -> bool:
    """Whether `path` looks like a tiktoken file rather than a JSON tokenizer."""
    if Path(path).suffix == ".tiktoken":
        return True
    if Path(path).suffix == ".json":
        return False
    with open(path, "rb") as f:
        return not f.read(64).lstrip().startswith(b"{")
