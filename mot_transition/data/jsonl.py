"""JSONL records, line by line, a line of any length in bounded memory.

A line of at most `LONG_LINE_BYTES` is read and parsed whole. A longer one is scanned in chunks:
every JSON string in it of more than `SPILL_BYTES` is left in the file (its place is recorded)
and a marker stands for it in a skeleton of the line, which `json.loads` then parses: so the
line is checked as JSON and the record's fields found as for a short line. When the text field
is one of those strings, the document is a `JSONStringText` (streamed.py), read from the file,
unescaped, when its text is needed. What is held of a long line is its skeleton: everything but
its long strings (its structure, numbers and short strings).
"""

import gzip
import json
import re
import secrets
import zlib
from pathlib import Path
from typing import Iterator

from mot_transition.data.streamed import CHUNK_BYTES, JSONStringText, StreamedText, file_stamp

LONG_LINE_BYTES = 8 * 2**20  # a longer JSONL line is scanned in chunks
SPILL_BYTES = 2**16  # a string longer than this in a long line stays in the file
_BODY = re.compile(rb'[^"\\]*(?:\\.[^"\\]*)*+', re.DOTALL)  # a JSON string's content, up to its quote or a cut escape (possessive: no backtracking stack, which would take 12 bytes a byte)


def json_kind(value) -> str:
    """What a JSON value is, in JSON's words: "null", "a number", "an array", ..."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return f"the boolean {str(value).lower()}"
    kinds = {dict: "an object", list: "an array", str: "a string", int: "a number", float: "a number"}
    return next((name for kind, name in kinds.items() if isinstance(value, kind)), type(value).__name__)


def iter_jsonl(path: Path, text_field: str) -> "Iterator[str | StreamedText]":
    """The `text_field` string of every line of a .jsonl (or .jsonl.gz) file, line by line."""
    try:
        with open(path, "rb") as raw:
            stat = file_stamp(raw.fileno())
            f = gzip.GzipFile(fileobj=raw, mode="rb") if path.name.endswith(".gz") else raw
            line_number = 0
            while True:
                start = f.tell()
                line = f.readline(LONG_LINE_BYTES)
                if not line:
                    return
                line_number += 1
                where = f"{path}, line {line_number}"
                if len(line) == LONG_LINE_BYTES and not line.endswith(b"\n"):
                    record, long_strings = _long_line(f, line, start, where, path, stat)
                    if record is None:
                        continue
                elif line.strip():
                    record, long_strings = _loads(line.decode("utf-8"), where), {}
                else:
                    continue
                text = _text_of(record, text_field, where)
                if text in long_strings:
                    text = long_strings[text]
                else:
                    _check_text(text, text_field, where)
                yield text
    except UnicodeDecodeError:
        raise ValueError(f"{path} is not UTF-8 text") from None
    except (EOFError, gzip.BadGzipFile, zlib.error) as e:
        raise ValueError(f"{path} is not a complete gzip file ({e})") from None


def _loads(line: str, where: str, column: bool = True):
    try:
        return json.loads(line)
    except json.JSONDecodeError as e:
        raise ValueError(f"{where}: not valid JSON ({e.msg}{f' at column {e.colno}' if column else ''})") from None
    except RecursionError:  # e.g. [[[[...]]]] 100,000 deep: Python's parser recurses per level
        raise ValueError(f"{where}: JSON nested too deeply to read; a record is one object with a string field") from None


def _text_of(record, text_field: str, where: str):
    if not isinstance(record, dict):
        raise ValueError(f"{where}: {json_kind(record)}, not a JSON object with a {text_field!r} field")
    if text_field not in record:
        raise ValueError(f"{where}: no {text_field!r} field; "
                         f"pass --text-field (data.text_field in a recipe) to name the field that holds the text")
    text = record[text_field]
    if not isinstance(text, str):
        raise ValueError(f"{where}: field {text_field!r} is {json_kind(text)}, not a string")
    return text


def _check_text(text: str, text_field: str, where: str) -> None:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:  # JSON can spell a lone surrogate ("\ud800"), which no UTF-8 holds
        raise ValueError(f"{where}: field {text_field!r} holds an unpaired surrogate, not text") from None


def _check_string(text: JSONStringText, where: str) -> None:
    """Read a long string once: checked as JSON (escapes, control characters) and as text, and
    measured (its characters, bytes and SHA-256: what the split asks first)."""
    try:
        text.digest()
    except json.JSONDecodeError as e:
        raise ValueError(f"{where}: not valid JSON ({e.msg} in a string)") from None
    except UnicodeEncodeError:
        raise ValueError(f"{where}: a string holds an unpaired surrogate, not text") from None


def _long_line(f, first: bytes, start: int, where: str, path: Path, stat) -> tuple[object, dict[str, JSONStringText]]:
    """(record, {marker: the long string it stands for}) of the line whose first LONG_LINE_BYTES
    bytes are `first`, which began at `start` in `f` (the file `path`); the rest of it is read here."""
    nonce = secrets.token_hex(8)
    skeleton, long_strings = bytearray(), {}
    in_string, spilled, content, opened_at = False, False, bytearray(), 0
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
                    in_string, spilled, content, opened_at = True, False, bytearray(), base + j + 1
                i = end
                continue
            e = _BODY.match(data, i).end()
            if not spilled:
                content += data[i:e]
                if len(content) > SPILL_BYTES:
                    spilled, content = True, bytearray()
            if e < len(data) and data[e] == ord('"'):  # the string ends
                if spilled:
                    marker = f"\\u0000mot-transition-{nonce}-{len(long_strings)}"
                    long_strings[json.loads(f'"{marker}"')] = (opened_at, base + e)
                    skeleton += marker.encode() + b'"'
                else:
                    skeleton += content + b'"'
                in_string, i = False, e + 1
            else:  # the chunk ends inside the string, maybe inside an escape
                carry, i = data[e:], len(data)
        position += len(chunk)
        if chunk.endswith(b"\n"):
            break
        chunk = f.readline(CHUNK_BYTES)
    if in_string:
        raise ValueError(f"{where}: not valid JSON (a string that does not end)")
    if not skeleton.strip():
        return None, {}  # a line of whitespace only: skipped, as a short one
    record = _loads(skeleton.decode("utf-8"), where, column=False)
    texts = {marker: JSONStringText(path, stat, *span) for marker, span in long_strings.items()}
    for text in texts.values():  # every long string read once: checked, as json.loads checks every string, and measured
        _check_string(text, where)
    return record, texts
