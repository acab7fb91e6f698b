"""Input files -> documents: .txt grouping keeps the file's exact text, formats agree, and
every kind of bad input raises DataError naming the file and the line."""

from __future__ import annotations

import gzip
import json

import pytest

from braid.data.documents import expand_inputs, iter_documents
from braid.data.errors import DataError
from tests.data.conftest import make_texts, write_jsonl


def test_txt_groups_paragraphs_and_keeps_the_exact_text(tmp_path):
    paragraphs = [t.replace(": ", ":\n") for t in make_texts(60, seed=3)]
    text = "\n\n" + "\n\n\n".join(paragraphs) + "\n  \n" + "x" * 250 + "\n"
    path = tmp_path / "book.txt"
    path.write_text(text)
    docs = list(iter_documents(path, max_doc_chars=120))
    assert len(docs) > 10
    position = 0
    for doc in docs:
        assert 0 < len(doc.text) <= 120
        start = text.index(doc.text, position)
        assert not text[position:start].strip(), "text between documents must be blank"
        assert text.count("\n", 0, start) + 1 == doc.line
        position = start + len(doc.text)
    assert not text[position:].strip(), "every non-blank character is in some document"


def test_a_book_without_blank_lines_is_cut_at_line_ends(tmp_path):
    lines = [f"line {i} of a long speech" for i in range(100)]
    path = tmp_path / "speech.txt"
    path.write_text("\n".join(lines) + "\n")
    docs = list(iter_documents(path, max_doc_chars=200))
    assert len(docs) > 5
    assert "\n".join(d.text for d in docs) == "\n".join(lines)


def test_crlf_bom_and_gzip_read_like_plain_text(tmp_path):
    plain = tmp_path / "a.txt"
    plain.write_text("first para\nline two\n\nsecond para\n")
    windows = tmp_path / "b.txt.gz"
    with gzip.open(windows, "wb") as f:
        f.write(b"\xef\xbb\xbffirst para\r\nline two\r\n\r\nsecond para\r\n")
    assert [d.text for d in iter_documents(plain)] == [d.text for d in iter_documents(windows)]
    assert [d.text for d in iter_documents(plain)] == ["first para\nline two\n\nsecond para"]


def test_jsonl_one_document_per_record(tmp_path):
    texts = ["  leading space kept", "multi\nline", "é ✓ 日本"]
    path = tmp_path / "a.jsonl.gz"
    with gzip.open(path, "wt") as f:
        f.write(json.dumps({"body": texts[0]}) + "\n\n" + "".join(json.dumps({"body": t}) + "\n" for t in texts[1:]))
    docs = list(iter_documents(path, text_field="body"))
    assert [d.text for d in docs] == texts
    assert [d.line for d in docs] == [1, 3, 4]


def test_expand_inputs_globs_directories_and_duplicates(tmp_path):
    for name in ("b.jsonl", "a.txt", "c.md"):
        (tmp_path / name).write_text("x\n")
    assert expand_inputs([tmp_path]) == [tmp_path / "a.txt", tmp_path / "b.jsonl"]
    assert expand_inputs([str(tmp_path / "*.txt"), tmp_path / "a.txt"]) == [tmp_path / "a.txt"]


def _error(call) -> str:
    with pytest.raises(DataError) as info:
        call()
    return str(info.value)


def test_missing_file_and_empty_glob_are_named(tmp_path):
    assert _error(lambda: expand_inputs([tmp_path / "nope.txt"])).startswith(f"{tmp_path / 'nope.txt'}: ")
    pattern = str(tmp_path / "*.jsonl")
    assert pattern in _error(lambda: expand_inputs([pattern]))
    assert "unsupported" in _error(lambda: expand_inputs([_touch(tmp_path / "notes.md")]))


def _touch(path):
    path.write_text("x")
    return path


@pytest.mark.parametrize(
    "lines, field, line_no, words",
    [
        ([{"text": "ok"}, {"text": "   "}], "text", 2, "empty text"),
        ([{"text": "ok"}, {"body": "no text field"}], "text", 2, "missing field 'text'"),
        ([{"text": "ok"}, {"text": 3}], "text", 2, "not a string"),
        (['{"text": "ok"}', '{"text": "cut'], "text", 2, "invalid JSON"),
        (['{"text": "ok"}', '["a list"]'], "text", 2, "expected a JSON object"),
    ],
)
def test_bad_jsonl_names_file_and_line(tmp_path, lines, field, line_no, words):
    path = tmp_path / "bad.jsonl"
    path.write_text("\n".join(x if isinstance(x, str) else json.dumps(x) for x in lines) + "\n")
    message = _error(lambda: list(iter_documents(path, text_field=field)))
    assert message.startswith(f"{path}:{line_no}: ") and words in message


@pytest.mark.parametrize("name", ["bad.txt", "bad.jsonl.gz"])
def test_invalid_utf8_names_file_and_line(tmp_path, name):
    path = tmp_path / name
    data = b'{"text": "fine"}\n{"text": "caf\xe9"}\n'
    path.write_bytes(gzip.compress(data) if name.endswith(".gz") else data)
    message = _error(lambda: list(iter_documents(path)))
    assert message.startswith(f"{path}:2: invalid UTF-8")


@pytest.mark.parametrize("name, content", [("empty.txt", "\n  \n\n"), ("empty.jsonl", "\n")])
def test_empty_files_are_named(tmp_path, name, content):
    path = tmp_path / name
    path.write_text(content)
    message = _error(lambda: list(iter_documents(path)))
    assert message.startswith(f"{path}: ")


def test_corrupt_gzip_is_named(tmp_path):
    path = tmp_path / "broken.jsonl.gz"
    path.write_bytes(gzip.compress(b'{"text": "x"}\n' * 50)[:-20])
    assert _error(lambda: list(iter_documents(path))).startswith(f"{path}: cannot read")


def test_jsonl_round_trips_the_fixture_writer(tmp_path):
    texts = make_texts(5, seed=0)
    assert [d.text for d in iter_documents(write_jsonl(tmp_path / "x.jsonl", texts))] == texts
