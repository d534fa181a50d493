"""Documents too long to hold as one string, read from their file in chunks when needed.

`prepare` holds a document as a `str` when it is short. A text file longer than `STREAM_BYTES`
becomes a `FileText`, and the text field of a JSONL line longer than `LONG_LINE_BYTES` a
`JSONStringText` (jsonl.py finds it): one pass over the file checks the text and measures its
UTF-8 bytes, characters and SHA-256; after that the file is read again, in chunks of about
`CHUNK_BYTES`, only when the text is needed (the split's fingerprint, the pieces that are
tokenised). So the memory of a document does not grow with its length (docs/data.md, "Memory").

A `StreamedText` is a window [lo, hi) of characters over its whole text: `head` (the leading
bytes) and `split_at` (at a character) give windows, read by skipping to them. What the split
(corpus.py) and `prepare` ask of a document, the functions at the end answer for a `str` and a
`StreamedText` alike, with the same result: `utf8_size`, `sha256_digest`, `utf8_head`,
`split_chars`, `feed` (into a fingerprint).
"""

import codecs
import hashlib
import json
import os
from pathlib import Path
from typing import Iterator

STREAM_BYTES = 8 * 2**20  # a text file longer than this is a FileText
CHUNK_BYTES = 2**20  # what one read of a streamed text takes from its file


class Changed(ValueError):
    """The file of a streamed text is not the one that was measured: one line, never other tokens."""


class StreamedText:
    """Characters [lo, hi) (hi None: to the end) of the text that `_whole()` yields in chunks."""

    def __init__(self, lo: int = 0, hi: int | None = None):
        self.lo, self.hi = lo, hi
        self._chars = self._size = self._digest = None

    # what a subclass gives: the whole text, in chunks, and a copy of itself with another window
    def _whole(self) -> Iterator[str]:
        raise NotImplementedError

    def _window(self, lo: int, hi: int | None) -> "StreamedText":
        raise NotImplementedError

    def chunks(self) -> Iterator[str]:
        """The window's text, in consecutive pieces (each about CHUNK_BYTES, the first and last shorter)."""
        position = 0
        for text in self._whole():
            start, end = max(self.lo - position, 0), len(text) if self.hi is None else min(self.hi - position, len(text))
            position += len(text)
            if start < end:
                yield text if (start, end) == (0, len(text)) else text[start:end]
            if self.hi is not None and position >= self.hi:
                return

    def _measure(self, refuse_nul: bool = False) -> None:
        chars, size, digest = 0, 0, hashlib.sha256()
        for text in self.chunks():
            if refuse_nul and "\x00" in text:
                raise ValueError("a NUL character")
            data = text.encode("utf-8")
            chars, size = chars + len(text), size + len(data)
            digest.update(data)
        self._chars, self._size, self._digest = chars, size, digest.digest()

    def __len__(self) -> int:
        """Its number of characters."""
        if self._chars is None:
            self._measure()
        return self._chars

    def __bool__(self) -> bool:
        return len(self) > 0

    def utf8_size(self) -> int:
        if self._size is None:
            self._measure()
        return self._size

    def digest(self) -> bytes:
        """SHA-256 of its UTF-8 bytes."""
        if self._digest is None:
            self._measure()
        return self._digest

    def read(self) -> str:
        """The whole text, as one string (for a text known to be short)."""
        return "".join(self.chunks())

    def byte_chunks(self) -> Iterator[bytes]:
        for text in self.chunks():
            yield text.encode("utf-8")

    def head(self, n_bytes: int) -> "StreamedText":
        """Its first `n_bytes` UTF-8 bytes, less a character they would cut in two."""
        chars, left = 0, n_bytes
        for text in self.chunks():
            data = text.encode("utf-8")
            if len(data) > left:
                chars += len(data[:left].decode("utf-8", errors="ignore"))
                break
            chars, left = chars + len(text), left - len(data)
        return self._window(self.lo, self.lo + chars)

    def split_at(self, index: int) -> "tuple[StreamedText, StreamedText]":
        """The text before character `index` and the text from it on."""
        return self._window(self.lo, self.lo + index), self._window(self.lo + index, self.hi)


class FileText(StreamedText):
    """The text of a UTF-8 text file."""

    def __init__(self, path: str | Path, stat: tuple[int, ...], lo: int = 0, hi: int | None = None):
        super().__init__(lo, hi)
        self.path, self._stat = Path(path), stat

    @classmethod
    def scan(cls, path: str | Path) -> "FileText | None":
        """The file's text, measured, or None if it is not UTF-8 text (undecodable, or holding a NUL
        byte), as `sources.decode_file` decides for a file read whole."""
        try:
            with open(path, "rb") as f:
                text = cls(path, file_stamp(f.fileno()))
            text._measure(refuse_nul=True)
        except (ValueError, OSError):  # UnicodeDecodeError, a NUL, a file that changed meanwhile
            return None
        return text

    def __repr__(self) -> str:
        return f"FileText({str(self.path)!r}, characters {self.lo}-{'end' if self.hi is None else self.hi})"

    def _window(self, lo: int, hi: int | None) -> "FileText":
        return FileText(self.path, self._stat, lo, hi)

    def _whole(self) -> Iterator[str]:
        decoder = codecs.getincrementaldecoder("utf-8")()
        with _opened(self.path, self._stat) as f:
            while data := f.read(CHUNK_BYTES):
                yield decoder.decode(data)
        decoder.decode(b"", final=True)


class JSONStringText(StreamedText):
    """The value of a JSON string whose escaped content lies at bytes [start, end) of a file (for a
    gzipped source, a temporary copy of the string, `keep`): unescaped as it is read, in segments cut where no escape, surrogate pair or UTF-8
    character is cut in two, each decoded by the json module."""

    def __init__(self, path: str | Path, stat: tuple[int, ...], start: int, end: int, lo: int = 0, hi: int | None = None,
                 keep=None):
        super().__init__(lo, hi)
        self.path, self._stat, self.start, self.end = Path(path), stat, start, end
        self._keep = keep  # a temporary file that holds the string, kept while a window of it lives

    def __repr__(self) -> str:
        return f"JSONStringText({str(self.path)!r}, bytes {self.start}-{self.end})"

    def _window(self, lo: int, hi: int | None) -> "JSONStringText":
        return JSONStringText(self.path, self._stat, self.start, self.end, lo, hi, self._keep)

    def _whole(self) -> Iterator[str]:
        with _opened(self.path, self._stat) as f:
            f.seek(self.start)
            position, held = self.start, b""
            while position < self.end:
                data = f.read(min(CHUNK_BYTES, self.end - position))
                if not data:
                    raise Changed(f"{self.path} changed while it was being read; prepare it again once it is written")
                position += len(data)
                raw = held + data
                cut = len(raw) if position == self.end else _safe_cut(raw)
                held = raw[cut:]
                yield _unescape(raw[:cut])


def _safe_cut(raw: bytes) -> int:
    """Where escaped JSON string content may be cut: not inside an escape, not between the two
    escapes of a surrogate pair, not inside a UTF-8 character."""
    cut = len(raw)
    tail_backslash = raw.rfind(b"\\", max(0, cut - 12))
    while tail_backslash >= 0:
        run = tail_backslash + 1 - len(raw[: tail_backslash + 1].rstrip(b"\\"))  # backslashes ending there
        if run % 2 == 0:  # escaped backslashes only: nothing open after them
            break
        escape = raw[tail_backslash : tail_backslash + 6]
        complete = len(escape) == 6 if escape[1:2] == b"u" else len(escape) >= 2
        high_surrogate = complete and escape[1:2] == b"u" and escape[2:3] in b"dD" and escape[3:4] in b"89abAB"
        if complete and not (high_surrogate and tail_backslash + 6 == cut):
            break
        cut = tail_backslash  # an escape cut in two, or a high surrogate whose pair comes next
        tail_backslash = raw.rfind(b"\\", max(0, cut - 12), cut)
    lead = cut - 1  # the first byte of the last character before the cut, if it is not ASCII
    while lead > 0 and raw[lead] & 0xC0 == 0x80:
        lead -= 1
    if lead >= 0 and raw[lead] >= 0xC0 and lead + (2 if raw[lead] < 0xE0 else 3 if raw[lead] < 0xF0 else 4) > cut:
        cut = lead  # a UTF-8 character cut in two
    return cut


def _unescape(raw: bytes) -> str:
    return json.loads('"' + raw.decode("utf-8") + '"')  # decoded first: json.loads would guess bytes' encoding


def file_stamp(fd: int) -> tuple[int, ...]:
    """(inode, size, modification and change times in ns) of an open file: another stamp, another file."""
    st = os.fstat(fd)
    return st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns


class _opened:
    """The file, opened for reading bytes, refused with a one-line error if it is not the one that
    was measured (another inode, size or time)."""

    def __init__(self, path: Path, stat: tuple[int, ...]):
        self.path, self.stat = path, stat

    def __enter__(self):
        self.f = open(self.path, "rb")
        if file_stamp(self.f.fileno()) != self.stat:
            self.f.close()
            raise Changed(f"{self.path} changed while it was being read; prepare it again once it is written")
        return self.f

    def __exit__(self, *exc):
        self.f.close()


# ---------------------------------------------------------------------------------------------
# a document's text, a str or a StreamedText


def utf8_size(text: "str | StreamedText") -> int:
    return text.utf8_size() if isinstance(text, StreamedText) else len(text.encode("utf-8"))


def sha256_digest(text: "str | StreamedText") -> bytes:
    return text.digest() if isinstance(text, StreamedText) else hashlib.sha256(text.encode("utf-8")).digest()


def utf8_head(text: "str | StreamedText", n_bytes: int) -> "str | StreamedText":
    """The first `n_bytes` UTF-8 bytes of `text`, without a character they would cut in two."""
    if isinstance(text, StreamedText):
        return text.head(n_bytes)
    return text.encode("utf-8")[:n_bytes].decode("utf-8", errors="ignore")


def split_chars(text: "str | StreamedText", index: int) -> "tuple[str | StreamedText, str | StreamedText]":
    return text.split_at(index) if isinstance(text, StreamedText) else (text[:index], text[index:])


def feed(digest, text: "str | StreamedText") -> None:
    """Its length in bytes (8 bytes, big-endian), then its bytes, into the hash `digest`."""
    if isinstance(text, StreamedText):
        digest.update(utf8_size(text).to_bytes(8, "big"))
        for data in text.byte_chunks():
            digest.update(data)
    else:
        data = text.encode("utf-8")
        digest.update(len(data).to_bytes(8, "big") + data)


__all__ = ["StreamedText", "FileText", "JSONStringText", "STREAM_BYTES", "CHUNK_BYTES",
           "utf8_size", "sha256_digest", "utf8_head", "split_chars", "feed"]
