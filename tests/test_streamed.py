"""A long document is read from its file, never held (data/streamed.py, data/jsonl.py): a long text
file's FileText answers everything the split and `prepare` ask of a document as its text would; a
long JSONL line gives the records `json.loads` gives, and the same one-line errors; pieces taken
from a stream are the pieces of the whole text; `prepare` writes the same bytes whether documents
are read whole or streamed; and the Python memory of preparing one document does not grow with its
length."""

import gzip
import hashlib
import json
import tracemalloc

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mot_transition.data import jsonl
from mot_transition.data import streamed as filetext
from mot_transition.data.streamed import FileText, feed, split_chars, utf8_head
from mot_transition.data.pieces import pieces, pieces_of_stream

PROPERTY = settings(max_examples=150, deadline=None, derandomize=True, database=None,
                    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
# one to four UTF-8 bytes a character, whitespace runs and spaces after words (where pieces cut)
TEXT = st.lists(st.sampled_from(["a", "Z", " ", "  ", "é", "中", "😀", "\n", "x y", "\t", "ab "]), max_size=60).map("".join)


@pytest.fixture
def small_chunks(monkeypatch):
    """Reads of 5 bytes: characters and pieces cut across every kind of chunk boundary."""
    monkeypatch.setattr(filetext, "CHUNK_BYTES", 5)


def _file_text(tmp_path, text: str) -> FileText:
    path = tmp_path / "doc.txt"
    path.write_bytes(text.encode("utf-8"))
    return FileText.scan(path)


@PROPERTY
@given(text=TEXT, data=st.data())
def test_a_file_text_answers_as_its_string_would(tmp_path, small_chunks, text, data):
    document = _file_text(tmp_path, text)
    assert document.read() == text and len(document) == len(text) and bool(document) == bool(text)
    assert document.digest() == hashlib.sha256(text.encode("utf-8")).digest()
    n_bytes = data.draw(st.integers(0, len(text.encode("utf-8")) + 2))
    assert utf8_head(document, n_bytes).read() == utf8_head(text, n_bytes)
    index = data.draw(st.integers(0, len(text)))
    assert [part.read() for part in split_chars(document, index)] == list(split_chars(text, index))
    streamed, whole = hashlib.sha256(), hashlib.sha256()
    feed(streamed, split_chars(document, index)[1])
    feed(whole, text[index:])
    assert streamed.digest() == whole.digest()


@PROPERTY
@given(text=TEXT, size=st.integers(2, 12), cuts=st.lists(st.integers(0, 80), max_size=12))
def test_pieces_of_a_stream_are_the_pieces_of_the_whole_text(text, size, cuts):
    bounds = [0, *sorted(c for c in cuts if c < len(text)), len(text)]
    chunks = [text[a:b] for a, b in zip(bounds, bounds[1:])]
    assert list(pieces_of_stream(chunks, size)) == list(pieces(text, size))


def test_a_file_that_is_not_utf8_text_is_refused_by_the_scan_as_by_a_whole_read(tmp_path, small_chunks):
    for name, data in (("latin1.txt", "café".encode("latin-1") + b" and more"), ("nul.txt", b"text\x00more"),
                       ("cut.txt", "ends in é".encode("utf-8")[:-1])):
        (tmp_path / name).write_bytes(data)
        assert FileText.scan(tmp_path / name) is None


def test_a_file_changed_after_the_scan_is_one_line_not_a_wrong_dataset(tmp_path):
    document = _file_text(tmp_path, "first version " * 100)
    (tmp_path / "doc.txt").write_text("the second, longer version " * 100)
    with pytest.raises(ValueError, match="changed while it was being read"):
        document.read()


@pytest.fixture
def long_lines(monkeypatch):
    """Every line over 50 bytes is scanned in chunks of 7 bytes, every string over 8 bytes in it
    left in the file and read back, unescaped, 5 bytes at a time."""
    monkeypatch.setattr(jsonl, "LONG_LINE_BYTES", 50)
    monkeypatch.setattr(jsonl, "SPILL_BYTES", 8)
    monkeypatch.setattr(jsonl, "CHUNK_BYTES", 7)
    monkeypatch.setattr(filetext, "CHUNK_BYTES", 5)


RECORD_TEXT = st.lists(st.sampled_from(["a", " ", "é", "中", "😀", "\n", "\\", '"', "\t", "x y", "\u2028", "\x01", "/"]),
                       max_size=40).map("".join)
RECORD = st.one_of(
    RECORD_TEXT.map(lambda text: {"text": text}),
    st.tuples(RECORD_TEXT, st.text(max_size=30), st.integers()).map(
        lambda t: {"id": t[2], "meta": t[1], "text": t[0], "tail": [1.5, None, {"k": t[1]}]}),
)


@PROPERTY
@given(records=st.lists(RECORD, min_size=1, max_size=4), ascii_only=st.booleans(), gz=st.booleans(), newline=st.booleans())
def test_long_jsonl_lines_give_the_records_json_loads_gives(tmp_path, long_lines, records, ascii_only, gz, newline):
    path = tmp_path / ("docs.jsonl.gz" if gz else "docs.jsonl")
    data = ("\n".join(json.dumps(r, ensure_ascii=ascii_only) for r in records) + "\n" * newline).encode("utf-8")
    path.write_bytes(gzip.compress(data) if gz else data)
    texts = list(jsonl.iter_jsonl(path, "text"))
    assert [t if isinstance(t, str) else t.read() for t in texts] == [r["text"] for r in records]
    for text, record in zip(texts, records):
        if not isinstance(text, str):
            assert len(text) == len(record["text"]) and text.digest() == hashlib.sha256(record["text"].encode("utf-8")).digest()


@pytest.mark.parametrize("line, error", [
    ('{"text": "' + "a" * 60 + '\\q"}', r"line 2: not valid JSON \(Invalid \\escape"),
    ('{"text": "' + "a" * 60 + '\x01"}', r"line 2: not valid JSON \(Invalid control character"),
    ('{"text": "' + "a" * 60 + '\\ud800 alone"}', r"line 2: field 'text' holds an unpaired surrogate, not text"),
    ('{"text": "' + "a" * 60 + '\x00"}', r"line 2: not valid JSON \(Invalid control character"),
    ('{"text": "' + "a" * 60, r"line 2: not valid JSON \(a string that does not end\)"),
    ('{"text": "' + "a" * 60 + '" "more": 1}', r"line 2: not valid JSON \(Expecting ',' delimiter\)"),
    ('["' + "a" * 60 + '"]', r"line 2: an array, not a JSON object with a 'text' field"),
    ('{"body": "' + "a" * 60 + '"}', r"line 2: no 'text' field; pass --text-field"),
    ('{"text": 1, "body": "' + "a" * 60 + '"}', r"line 2: field 'text' is a number, not a string"),
    (" " * 60 + "\n" + '{"text": "caf\xe9"}', r"docs.jsonl, line 3 is not UTF-8 text \(byte 14 of the line\)"),
], ids=["escape", "control", "surrogate", "nul", "unended", "structure", "array", "no-field", "number", "latin-1"])
def test_a_bad_long_line_is_the_one_line_error_of_a_short_one(tmp_path, long_lines, line, error):
    path = tmp_path / "docs.jsonl"
    path.write_bytes(b'{"text": "fine"}\n' + line.encode("latin-1" if "\xe9" in line else "utf-8") + b"\n")
    with pytest.raises(ValueError, match=error):
        list(jsonl.iter_jsonl(path, "text"))


def test_a_byte_order_mark_opening_a_jsonl_file_is_not_text(tmp_path):
    path = tmp_path / "docs.jsonl"
    path.write_bytes(b'\xef\xbb\xbf{"text": "first"}\n{"text": "\xef\xbb\xbfkept"}\n')  # a BOM inside a string is the text's
    assert list(jsonl.iter_jsonl(path, "text")) == ["first", "\ufeffkept"]


def test_long_lines_keep_what_short_lines_accept(tmp_path, long_lines):
    """What the whole read accepts, the scan accepts: an unpaired surrogate in another field than
    the text (only the text must be text), lines of Unicode whitespace only (skipped), CRLF line
    ends, and short records apart by a lone carriage return (a line end in text mode; inside a line
    over LONG_LINE_BYTES it is whitespace, as JSON has it)."""
    path = tmp_path / "docs.jsonl"
    other = '{"text": "' + "b" * 60 + '", "meta": "' + "m" * 60 + '\\ud800"}'
    path.write_bytes(("\u3000\u00a0 \n" + other + "\r\n" + '{"text": "' + "c" * 60 + '"}\r\n \x1c\n{"text": "d"}\r{"text": "e"}').encode("utf-8"))
    texts = [t if isinstance(t, str) else t.read() for t in jsonl.iter_jsonl(path, "text")]
    assert texts == ["b" * 60, "c" * 60, "d", "e"]


def test_a_long_string_of_a_gzipped_file_is_read_from_a_temporary_copy_removed_after_use(tmp_path, long_lines):
    import gc
    import glob
    import tempfile

    path = tmp_path / "docs.jsonl.gz"
    path.write_bytes(gzip.compress(('{"text": "' + "é" * 100 + '"}\n').encode("utf-8")))
    before = set(glob.glob(f"{tempfile.gettempdir()}/mot-transition-*.json-string"))
    (text,) = list(jsonl.iter_jsonl(path, "text"))
    assert text.read() == "é" * 100 and text.path.suffix == ".json-string" and text.path.exists()
    copy = text.path
    del text
    gc.collect()
    assert not copy.exists() and set(glob.glob(f"{tempfile.gettempdir()}/mot-transition-*.json-string")) == before


def _corpus(folder):
    """Long and short files, a copy, a file that is not UTF-8 and one with a NUL (both skipped),
    characters of 1 to 4 bytes."""
    import argparse

    code = open(argparse.__file__, encoding="utf-8").read()
    folder.mkdir()
    texts = [code[:40_000], "naïve café 中文 😀 it's  \t\n\n  x y " * 600, code[40_000:52_000], code[:40_000], "short one"]
    for i, text in enumerate(texts):
        (folder / f"doc{i}.txt").write_text(text, encoding="utf-8")
    (folder / "latin1.txt").write_bytes("café ".encode("latin-1") * 5000)
    (folder / "nul.txt").write_bytes(b"x\x00" * 5000)


def _files(folder):
    return {p.relative_to(folder): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("options", [{}, {"max_bytes": 50_001}, {"one_file": True}], ids=["folder", "max-bytes", "one-file"])
def test_prepare_writes_the_same_bytes_whether_text_files_are_streamed_or_read_whole(tmp_path, monkeypatch, options):
    """Every text file streamed (STREAM_BYTES 0, reads of 1,000 bytes) against every one read whole,
    pieces of 100 characters (batch_bytes 1,600): the same tokenizer, shards and manifest. The cases:
    a folder (a copy dropped, files that are not text skipped), a --max-bytes that cuts a file
    inside a character of 2 bytes (50,001), and one file alone (split by characters)."""
    from mot_transition.data.prepare import prepare

    _corpus(tmp_path / "src")
    source = tmp_path / "src" / "doc1.txt" if options.get("one_file") else tmp_path / "src"
    kwargs = {"vocab_size": 300, "batch_bytes": 1_600, "shard_tokens": 4_000, "heldout_fraction": 0.3,
              "max_bytes": options.get("max_bytes")}
    prepare([source], tmp_path / "whole", **kwargs)
    monkeypatch.setattr("mot_transition.data.sources.STREAM_BYTES", 0)
    monkeypatch.setattr(filetext, "CHUNK_BYTES", 1_000)
    prepare([source], tmp_path / "streamed", **kwargs)
    assert _files(tmp_path / "streamed") == _files(tmp_path / "whole")


def test_prepare_writes_the_same_bytes_whether_jsonl_lines_are_streamed_or_read_whole(tmp_path, monkeypatch):
    """Records of up to 40 KB, characters of 1 to 4 bytes, escapes: every line scanned in chunks
    (LONG_LINE_BYTES 0) and its strings left in the file against every line parsed whole."""
    import argparse

    from mot_transition.data.prepare import prepare

    code = open(argparse.__file__, encoding="utf-8").read()
    records = [{"text": code[:40_000], "id": 1}, {"meta": "x", "text": "naïve café 中文 😀 \"q\"\t" * 900}, {"text": code[:40_000]},
               {"text": "short"}, {"text": code[40_000:45_000]}]
    source = tmp_path / "docs.jsonl"
    source.write_text("".join(json.dumps(r, ensure_ascii=i % 2 == 0) + "\n" for i, r in enumerate(records)))
    kwargs = {"vocab_size": 300, "batch_bytes": 1_600, "shard_tokens": 4_000, "heldout_fraction": 0.3}
    prepare([source], tmp_path / "whole", **kwargs)
    monkeypatch.setattr(jsonl, "LONG_LINE_BYTES", 1)
    monkeypatch.setattr(jsonl, "SPILL_BYTES", 100)
    monkeypatch.setattr(filetext, "CHUNK_BYTES", 1_000)
    prepare([source], tmp_path / "streamed", **kwargs)
    assert _files(tmp_path / "streamed") == _files(tmp_path / "whole")


def test_a_named_long_file_that_is_not_utf8_is_the_same_one_line_error(tmp_path, monkeypatch):
    from mot_transition.data.prepare import prepare

    (tmp_path / "latin1.txt").write_bytes("café ".encode("latin-1") * 5000)
    monkeypatch.setattr("mot_transition.data.sources.STREAM_BYTES", 0)
    with pytest.raises(ValueError, match=r"latin1.txt is not UTF-8 text; convert it to UTF-8"):
        prepare([tmp_path / "latin1.txt"], tmp_path / "out", vocab_size=300)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("kind", ["text file", "jsonl line"])
def test_the_python_memory_of_one_document_does_not_grow_with_its_length(tmp_path, tokenizer_dir, monkeypatch, kind):
    """One document of 0.5 MB, then one of 4 MB (a text file or a JSONL line of its own, streamed:
    STREAM_BYTES, LONG_LINE_BYTES and CHUNK_BYTES 64 KB here, 8, 8 and 1 MB by default), prepared
    with a ready tokenizer and batches of 100 KB: the peak of Python's allocations (tracemalloc:
    strings, bytes, lists; the tokenizer's own memory is bounded by the pieces, tests/test_pieces.py)
    grows by less than 1 MB, where holding the longer text alone would add 3.5 MB and reading it
    whole as before (text, bytes and the copies the split made) about 10 times that."""
    from mot_transition.data.prepare import prepare
    from mot_transition.data.shards import PreparedData

    monkeypatch.setattr("mot_transition.data.sources.STREAM_BYTES", 2**16)
    monkeypatch.setattr(jsonl, "LONG_LINE_BYTES", 2**16)
    monkeypatch.setattr(filetext, "CHUNK_BYTES", 2**16)  # 1 MB by default: then both peaks hold 1 MB reads
    monkeypatch.setattr(jsonl, "CHUNK_BYTES", 2**16)
    line = "def handler(self, request):\n    return self.answer(request, 'naïve', 42)  # x\n"
    peaks = {}
    for mb in (0.5, 4):
        text = line * int(mb * 2**20 / len(line.encode()))
        path = tmp_path / (f"doc{mb}.txt" if kind == "text file" else f"doc{mb}.jsonl")
        path.write_text(text if kind == "text file" else json.dumps({"id": 7, "text": text}) + "\n", encoding="utf-8")
        del text
        tracemalloc.start()
        try:
            prepare([path], tmp_path / f"out{mb}", tokenizer=tokenizer_dir, batch_bytes=100_000)
            peaks[mb] = tracemalloc.get_traced_memory()[1] / 2**20
        finally:
            tracemalloc.stop()
    assert PreparedData(tmp_path / "out4").train.tokens > 7 * PreparedData(tmp_path / "out0.5").train.tokens
    assert peaks[4] - peaks[0.5] < 1.0, peaks


def test_the_in_memory_corpus_reads_a_long_jsonl_line_as_a_string(tmp_path, long_lines):
    from mot_transition.data.corpus import load_corpus

    path = tmp_path / "docs.jsonl"
    texts = [f"document {i}: " + "naïve 中文 " * 20 for i in range(30)]
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    corpus = load_corpus(path)
    assert all(isinstance(t, str) for t in corpus.train + corpus.heldout)
    assert sorted(corpus.train + corpus.heldout) == sorted(texts)


def test_what_is_held_of_a_long_line_is_bounded_and_a_line_past_the_bound_is_one_line(tmp_path, long_lines, monkeypatch):
    """A long line's text stays in the file; the rest (its structure, numbers, short strings), which
    is parsed in memory, may be SKELETON_BYTES long: a line of more is refused naming it."""
    monkeypatch.setattr(jsonl, "SKELETON_BYTES", 300)
    path = tmp_path / "docs.jsonl"
    fits = {"text": "x" * 1000, "ids": list(range(40))}  # 1,000 bytes of text (in the file), about 220 of the rest
    over = {"text": "x" * 1000, "ids": list(range(80))}  # about 380 of the rest
    path.write_text(json.dumps(fits) + "\n" + json.dumps(over) + "\n")
    documents = jsonl.iter_jsonl(path, "text")
    assert next(documents).read() == "x" * 1000
    with pytest.raises(ValueError, match=rf"^{path}, line 2: more than 300 bytes of JSON besides its strings over 8 bytes, .*one record per line$"):
        next(documents)
