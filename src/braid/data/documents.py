"""Input files to documents: .txt, .jsonl and their .gz, with errors naming file and line.

What a document is:
- `.jsonl` / `.jsonl.gz`: one JSON object per non-blank line; its `text_field` string is one
  document (an empty or whitespace-only text is an error: filter such records first).
- `.txt` / `.txt.gz`: paragraphs (runs of non-blank lines) are grouped, in file order, into
  documents of at most `max_doc_chars` characters, so a book becomes many documents. A
  paragraph longer than that is cut at line ends, and a line longer than that is cut every
  `max_doc_chars` characters. A document's text is exactly the file's text from its first to
  its last non-blank line (the blank lines between its paragraphs kept, the last line's
  newline dropped). Windows line ends (CRLF) are read as "\\n" and a UTF-8 BOM is dropped.

Files are read as bytes and decoded line by line, so invalid UTF-8 is reported with its line.
"""

from __future__ import annotations

import glob
import gzip
import json
import os
import zlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from braid.data.errors import DataError

SUFFIXES = (".txt", ".jsonl", ".txt.gz", ".jsonl.gz")
DEFAULT_MAX_DOC_CHARS = 4000


@dataclass(frozen=True)
class Document:
    """One document's text, where it starts (1-based line) and how far into the file
    (bytes on disk, compressed for .gz) reading had got when it was complete."""

    text: str
    path: str
    line: int
    end_byte: int


def expand_inputs(inputs: Sequence[str | os.PathLike] | str | os.PathLike) -> list[Path]:
    """Files, globs (`data/*.jsonl.gz`, `**` allowed) and directories (searched recursively
    for supported suffixes) to an ordered, de-duplicated list of files.

    Raises DataError for a missing file, a glob or directory matching nothing, or a file
    whose suffix is not one of .txt, .jsonl, .txt.gz, .jsonl.gz.
    """
    if isinstance(inputs, (str, os.PathLike)):
        inputs = [inputs]
    paths: list[Path] = []
    seen: set[Path] = set()
    for item in map(str, inputs):
        for path in _expand_one(item):
            check_suffix(path)
            if path.resolve() not in seen:
                seen.add(path.resolve())
                paths.append(path)
    if not paths:
        raise DataError("no input files given: pass .txt/.jsonl(.gz) files, globs or directories")
    return paths


def _expand_one(item: str) -> list[Path]:
    if glob.has_magic(item):
        matches = [Path(m) for m in sorted(glob.glob(item, recursive=True)) if os.path.isfile(m)]
        if not matches:
            raise DataError(f"the glob {item!r} matches no file", item)
        return matches
    path = Path(item)
    if path.is_dir():
        matches = sorted(p for p in path.rglob("*") if p.is_file() and p.name.endswith(SUFFIXES))
        if not matches:
            raise DataError(f"directory has no {'/'.join(SUFFIXES)} files", item)
        return matches
    if not path.is_file():
        raise DataError("input file does not exist", item)
    return [path]


def check_suffix(path: str | os.PathLike) -> str:
    """The format ("txt" or "jsonl") of `path`, from its suffix; DataError if unsupported."""
    name = os.fspath(path)
    for suffix in SUFFIXES:
        if name.endswith(suffix):
            return suffix.split(".")[1]
    raise DataError(f"unsupported file type; expected one of {', '.join(SUFFIXES)}", name)


def iter_documents(
    path: str | os.PathLike, text_field: str = "text", max_doc_chars: int = DEFAULT_MAX_DOC_CHARS
) -> Iterator[Document]:
    """The documents of one input file, in file order (see the module docstring)."""
    if max_doc_chars < 1:
        raise ValueError(f"max_doc_chars must be positive, got {max_doc_chars}")
    if check_suffix(path) == "jsonl":
        yield from _jsonl_documents(Path(path), text_field)
    else:
        yield from _txt_documents(Path(path), max_doc_chars)


def _open_binary(path: Path) -> tuple[BinaryIO, BinaryIO]:
    """(stream to read lines from, raw file whose position measures progress)."""
    raw = open(path, "rb")
    if path.name.endswith(".gz"):
        return gzip.GzipFile(fileobj=raw, mode="rb"), raw
    return raw, raw


def _read_lines(path: Path) -> Iterator[tuple[int, str, BinaryIO]]:
    """(1-based line number, decoded line with "\\n" line end, raw file): the raw file's
    tell() is how far reading has got, for progress (asked per document, not per line)."""
    stream, raw = _open_binary(path)
    with raw, stream:
        try:
            for line_no, data in enumerate(stream, start=1):
                yield line_no, _decode_line(data, path, line_no), raw
        except (OSError, EOFError, zlib.error) as error:
            raise DataError(f"cannot read the file ({error}); is it a valid gzip file?", path) from error


def _decode_line(data: bytes, path: Path, line_no: int) -> str:
    try:
        line = data.decode("utf-8")
    except UnicodeDecodeError as error:
        raise DataError(
            f"invalid UTF-8 (byte {error.start} of the line: {data[error.start:error.start + 4]!r}); "
            "re-encode the file as UTF-8",
            path,
            line_no,
        ) from None
    if line_no == 1 and line.startswith("\ufeff"):
        line = line[1:]
    if line.endswith("\r\n"):
        line = line[:-2] + "\n"
    return line


def _jsonl_documents(path: Path, text_field: str) -> Iterator[Document]:
    found = False
    for line_no, line, raw in _read_lines(path):
        if not line.strip():
            continue
        text = _json_text(line, text_field, path, line_no)
        found = True
        yield Document(text, str(path), line_no, raw.tell())
    if not found:
        raise DataError("no records: the file is empty", path)


def _json_text(line: str, text_field: str, path: Path, line_no: int) -> str:
    try:
        record = json.loads(line)
    except json.JSONDecodeError as error:
        raise DataError(f"invalid JSON ({error.msg} at column {error.colno})", path, line_no) from None
    if not isinstance(record, dict):
        raise DataError(f"expected a JSON object, got {type(record).__name__}", path, line_no)
    if text_field not in record:
        fields = ", ".join(map(repr, list(record)[:10]))
        raise DataError(
            f"missing field {text_field!r} (the record has {fields}); pass --text-field", path, line_no
        )
    text = record[text_field]
    if not isinstance(text, str):
        raise DataError(f"field {text_field!r} is a {type(text).__name__}, not a string", path, line_no)
    if not text.strip():
        raise DataError(f"empty text in field {text_field!r}; drop empty records first", path, line_no)
    return text


def _txt_documents(path: Path, max_chars: int) -> Iterator[Document]:
    doc = _DocumentBuilder(path)
    found = False
    for piece_line, piece, end_byte in _txt_pieces(path, max_chars):
        if doc.chars and doc.chars + len(piece) > max_chars:
            found = True
            yield doc.pop()
        doc.add(piece_line, piece, end_byte)
    if doc.chars:
        found = True
        yield doc.pop()
    if not found:
        raise DataError("no text: the file is empty or only whitespace", path)


class _DocumentBuilder:
    """Accumulates pieces (paragraphs, or parts of long ones) into one document."""

    def __init__(self, path: Path):
        self.path = path
        self.pieces: list[str] = []
        self.chars, self.line, self.end_byte = 0, 0, 0

    def add(self, line: int, piece: str, end_byte: int) -> None:
        if not self.pieces:
            self.line = line
        self.pieces.append(piece)
        self.chars += len(piece)
        self.end_byte = end_byte

    def pop(self) -> Document:
        text = _strip_blank_tail("".join(self.pieces))
        document = Document(text, str(self.path), self.line, self.end_byte)
        self.pieces, self.chars = [], 0
        return document


def _strip_blank_tail(text: str) -> str:
    """Drop trailing whitespace-only lines and the final newline, keep trailing spaces of
    the last non-blank line."""
    lines = text.split("\n")
    while lines and not lines[-1].strip():
        lines.pop()
    return "\n".join(lines)


def _txt_pieces(path: Path, max_chars: int) -> Iterator[tuple[int, str, int]]:
    """(first line, text, raw bytes read) of each paragraph with its trailing blank lines;
    a paragraph over `max_chars` is cut at line ends, a line over it every `max_chars`."""
    piece: list[str] = []
    chars, start, seen_blank = 0, 0, False
    for line_no, line, raw in _read_lines(path):
        if not line.strip():
            if piece:
                piece.append(line)
                chars += len(line)
                seen_blank = True
            continue
        if piece and (seen_blank or chars + len(line) > max_chars):
            yield start, "".join(piece), raw.tell()
            piece, chars, seen_blank = [], 0, False
        *heads, tail = [line[i:i + max_chars] for i in range(0, len(line), max_chars)]
        for head in heads:
            yield line_no, head, raw.tell()
        if not piece:
            start = line_no
        piece.append(tail)
        chars += len(tail)
    if piece:
        yield start, "".join(piece), path.stat().st_size
