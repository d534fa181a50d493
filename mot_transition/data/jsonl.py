"""JSONL records, line by line, a line of any length in bounded memory.

A line of at most `LONG_LINE_BYTES` is read and parsed whole. A longer one is scanned in chunks:
every JSON string in it of more than `SPILL_BYTES` is left in the file (its place is recorded)
and a marker stands for it in a skeleton of the line, which `json.loads` then parses: so the
line is checked as JSON and the record's fields found as for a short line. When the text field
is one of those strings, the document is a `JSONStringText` (streamed.py), read from the file,
unescaped, when its text is needed. What is held of a long line is its skeleton: everything but
its long strings (its structure, numbers and short strings), at most `SKELETON_BYTES` (a line with
more is refused in one line), so a line's memory is bounded whatever its length.
"""

import gzip
import json
import re
import secrets
import tempfile
import zlib
from collections import deque
from pathlib import Path
from typing import Iterator

from mot_transition.data.streamed import CHUNK_BYTES, JSONStringText, StreamedText, file_stamp
from mot_transition.jsonfiles import json_kind

LONG_LINE_BYTES = 8 * 2**20  # a longer JSONL line is scanned in chunks
SPILL_BYTES = 2**16  # a string longer than this in a long line stays in the file
SKELETON_BYTES = 8 * 2**20  # what is held of a long line (all but its long strings) may be this long
_NEWLINE = re.compile(r"\r\n|\r|\n")
_BODY = re.compile(rb'[^"\\]*(?:\\.[^"\\]*)*+', re.DOTALL)  # a JSON string's content, up to its quote or a cut escape (possessive: no backtracking stack, which would take 12 bytes a byte)


_BOM = b"\xef\xbb\xbf"


def iter_jsonl(path: Path, text_field: str) -> "Iterator[str | StreamedText]":
    """The `text_field` string of every line of a .jsonl (or .jsonl.gz) file, line by line. Lines
    end as in Python's text mode ("\\n", "\\r\\n" or a lone "\\r"); a line of whitespace only is skipped."""
    gz = path.name.endswith(".gz")
    try:
        with open(path, "rb") as raw:
            stat = file_stamp(raw.fileno())
            f = gzip.GzipFile(fileobj=raw, mode="rb") if gz else raw
            line_number = 0
            while True:
                start = f.tell()
                line = f.readline(LONG_LINE_BYTES)
                if not line:
                    return
                if len(line) == LONG_LINE_BYTES and not line.endswith(b"\n"):
                    line_number += 1
                    where = f"{path}, line {line_number}"
                    record, long_strings = _long_line(f, line, start, where, path, stat, gz, text_field)
                    if record is not None:
                        yield _text_of(record, text_field, where, long_strings)
                    continue
                if start == 0 and line.startswith(_BOM):  # a byte-order mark opening the file (some Windows editors): not text
                    line = line[len(_BOM):]
                try:
                    text = line.decode("utf-8")
                except UnicodeDecodeError as error:
                    raise ValueError(f"{path}, line {line_number + 1} is not UTF-8 text (byte {error.start + 1} of the line)") from None
                for part in _lines(text):
                    line_number += 1
                    if part.strip():
                        where = f"{path}, line {line_number}"
                        yield _text_of(_loads(part, where), text_field, where)
    except UnicodeDecodeError:
        raise ValueError(f"{path} is not UTF-8 text") from None
    except (EOFError, gzip.BadGzipFile, zlib.error) as e:
        raise ValueError(f"{path} is not a complete gzip file ({e})") from None


def _lines(text: str) -> list[str]:
    """The lines of `text` (one read up to "\\n"), split at a lone "\\r" too, as text mode does."""
    if "\r" not in text:
        return [text]
    parts = _NEWLINE.split(text)
    return parts[:-1] if parts[-1] == "" else parts


def _loads(line: str, where: str, column: bool = True):
    try:
        return json.loads(line)
    except json.JSONDecodeError as e:
        raise ValueError(f"{where}: not valid JSON ({e.msg}{f' at column {e.colno}' if column else ''})") from None
    except RecursionError:  # e.g. [[[[...]]]] 100,000 deep: Python's parser recurses per level
        raise ValueError(f"{where}: JSON nested too deeply to read; a record is one object with a string field") from None


def _text_of(record, text_field: str, where: str, long_strings: dict | None = None) -> "str | StreamedText":
    """The record's text: a string, or the long string its marker stands for (read once here:
    checked as JSON and as text, and measured, which is what the split asks first)."""
    if not isinstance(record, dict):
        raise ValueError(f"{where}: {json_kind(record)}, not a JSON object with a {text_field!r} field")
    if text_field not in record:
        raise ValueError(f"{where}: no {text_field!r} field; "
                         f"pass --text-field (data.text_field in a recipe) to name the field that holds the text")
    text = record[text_field]
    if not isinstance(text, str):
        raise ValueError(f"{where}: field {text_field!r} is {json_kind(text)}, not a string")
    if long_strings and text in long_strings:
        text = long_strings[text]
    try:
        text.encode("utf-8") if isinstance(text, str) else _read(text.digest, where)
    except UnicodeEncodeError:  # JSON can spell a lone surrogate ("\ud800"), which no UTF-8 holds
        raise ValueError(f"{where}: field {text_field!r} holds an unpaired surrogate, not text") from None
    return text


def _read(read, where: str):
    """`read()`, a JSON error in a long string reported as json.loads reports one in a short line."""
    try:
        return read()
    except json.JSONDecodeError as e:
        raise ValueError(f"{where}: not valid JSON ({e.msg} in a string)") from None


def _long_line(f, first: bytes, start: int, where: str, path: Path, stat, gz: bool,
               text_field: str) -> tuple[object, dict[str, JSONStringText]]:
    """(record, {marker: the long string it stands for}) of the line whose first LONG_LINE_BYTES
    bytes are `first`, which began at `start` in `f` (the file `path`); the rest of it is read here.
    A long string of a gzipped file is copied as it is into a temporary file (removed with the last
    reference to it): read again from the gzip, it would be decompressed from the file's start."""
    nonce = secrets.token_hex(8)
    skeleton, long_strings = bytearray(), {}
    in_string, content, opened_at, copy = False, bytearray(), 0, None  # content: None once spilled
    carry, position, chunk = b"", start, first  # position: where `chunk` begins in the file
    while chunk:
        data, base, carry = carry + chunk, position - len(carry), b""
        i = 0
        while i < len(data):
            if not in_string:
                j = data.find(b'"', i)
                end = len(data) if j < 0 else j + 1
                skeleton += data[i:end]
                if j >= 0:
                    in_string, content, opened_at = True, bytearray(), base + j + 1
                i = end
                continue
            e = _BODY.match(data, i).end()
            if content is not None:
                content += data[i:e]
                if len(content) > SPILL_BYTES:  # a long string: left in the file (or copied)
                    if gz:
                        copy = tempfile.NamedTemporaryFile(prefix="mot-transition-", suffix=".json-string")
                        copy.write(content)
                    content = None
            elif copy is not None:
                copy.write(data[i:e])
            if e < len(data) and data[e] == ord('"'):  # the string ends
                if content is None:
                    marker = f"\\u0000mot-transition-{nonce}-{len(long_strings)}"
                    long_strings[json.loads(f'"{marker}"')] = _long_string(path, stat, opened_at, base + e, copy)
                    skeleton += marker.encode() + b'"'
                    copy = None
                else:
                    skeleton += content + b'"'
                in_string, i = False, e + 1
            else:  # the chunk ends inside the string, maybe inside an escape
                carry, i = data[e:], len(data)
        position += len(chunk)
        if len(skeleton) > SKELETON_BYTES:  # a line of many values, held to be parsed: bounded, said in one line
            raise ValueError(f"{where}: more than {_size(SKELETON_BYTES)} of JSON besides its strings over "
                             f"{_size(SPILL_BYTES)}, which prepare holds to parse a line; give one record per line")
        if chunk.endswith(b"\n"):
            break
        chunk = f.readline(CHUNK_BYTES)
    if in_string:
        raise ValueError(f"{where}: not valid JSON (a string that does not end)")
    line = skeleton.decode("utf-8")
    if not line.strip():
        return None, {}  # a line of whitespace only: skipped, as a short one
    record = _loads(line, where, column=False)
    text = record.get(text_field) if isinstance(record, dict) else None
    for marker, string in long_strings.items():  # checked as JSON, as json.loads checks every string
        if marker != text:  # (the text's own string is checked, as text too, and measured by _text_of)
            _read(lambda: deque(string.chunks(), maxlen=0), where)  # read through, nothing kept
    return record, long_strings


def _size(n: int) -> str:
    return f"{n >> 20} MB" if n % 2**20 == 0 else f"{n >> 10} KB" if n % 1024 == 0 else f"{n:,} bytes"


def _long_string(path: Path, stat, start: int, end: int, copy) -> JSONStringText:
    if copy is None:
        return JSONStringText(path, stat, start, end)
    copy.flush()
    return JSONStringText(copy.name, file_stamp(copy.fileno()), 0, end - start, keep=copy)
