"""A text file too long to hold as one string: its document, read from the file in chunks.

`prepare` reads a text file of at most `STREAM_BYTES` whole, as a `str`. A longer one becomes a
`FileText`: one pass over the file checks that it is UTF-8 text (no NUL byte) and measures its
bytes, characters and SHA-256; after that, the file is read again, in chunks of `CHUNK_BYTES`,
only when its text is needed (the split's fingerprint, the pieces that are tokenised). So the
memory of a document does not grow with its length (docs/data.md, "Memory").

What the split (corpus.py) and `prepare` do with a document's text, the functions at the end do
for a `str` and a `FileText` alike, with the same result: `utf8_size`, `sha256_digest`,
`utf8_head` (the leading bytes, a character cut in two dropped), `split_chars` (at a character
index), `feed` (into a fingerprint) and `text_chunks`.
"""

import codecs
import hashlib
import os
from pathlib import Path
from typing import Iterator

STREAM_BYTES = 8 * 2**20  # a text file longer than this is a FileText
CHUNK_BYTES = 2**20  # what one read of a FileText takes from the file


class FileText:
    """The UTF-8 text of bytes [start, end) of `path`, whose ends are character boundaries."""

    def __init__(self, path: Path, start: int, end: int, stat: tuple[int, int], chars: int | None = None,
                 digest: bytes | None = None):
        self.path, self.start, self.end, self._stat = Path(path), start, end, stat
        self._chars, self._digest = chars, digest

    @classmethod
    def scan(cls, path: str | Path) -> "FileText | None":
        """The whole file's text, or None if it is not UTF-8 text (undecodable, or holding a NUL
        byte), as `sources.decode_file` decides for a file read whole."""
        path = Path(path)
        decoder, digest, chars, size = codecs.getincrementaldecoder("utf-8")(), hashlib.sha256(), 0, 0
        try:
            with open(path, "rb") as f:
                stat = _stat_of(f.fileno())
                while data := f.read(CHUNK_BYTES):
                    text = decoder.decode(data)
                    if "\x00" in text:
                        return None
                    chars, size = chars + len(text), size + len(data)
                    digest.update(data)
                decoder.decode(b"", final=True)
        except (UnicodeDecodeError, OSError):
            return None
        return cls(path, 0, size, stat, chars, digest.digest())

    def __len__(self) -> int:
        """Its number of characters."""
        if self._chars is None:
            self._chars = sum(len(text) for _, text in self._decoded())
        return self._chars

    def __bool__(self) -> bool:
        return self.end > self.start

    def __repr__(self) -> str:
        return f"FileText({str(self.path)!r}, bytes {self.start}-{self.end})"

    def read(self) -> str:
        """The whole text, as one string (for a text known to be short)."""
        return "".join(self.chunks())

    def chunks(self) -> Iterator[str]:
        """The text, in consecutive pieces of about CHUNK_BYTES bytes."""
        for _, text in self._decoded():
            yield text

    def byte_chunks(self) -> Iterator[bytes]:
        with open(self.path, "rb") as f:
            if _stat_of(f.fileno()) != self._stat:
                raise ValueError(f"{self.path} changed while it was being read; prepare it again once it is written")
            f.seek(self.start)
            position = self.start
            while position < self.end:
                data = f.read(min(CHUNK_BYTES, self.end - position))
                if not data:
                    raise ValueError(f"{self.path} changed while it was being read; prepare it again once it is written")
                position += len(data)
                yield data

    def _decoded(self) -> Iterator[tuple[int, str]]:
        """(file offset of the text's first byte, text) for every chunk."""
        decoder, fed = codecs.getincrementaldecoder("utf-8")(), self.start
        for data in self.byte_chunks():
            held = len(decoder.getstate()[0])  # bytes of a character cut by the previous chunk
            text = decoder.decode(data)
            if text:
                yield fed - held, text
            fed += len(data)
        decoder.decode(b"", final=True)

    def digest(self) -> bytes:
        """SHA-256 of its UTF-8 bytes."""
        if self._digest is None:
            h = hashlib.sha256()
            for data in self.byte_chunks():
                h.update(data)
            self._digest = h.digest()
        return self._digest

    def head(self, n_bytes: int) -> "FileText":
        """Its first `n_bytes` bytes, less the start of a character they would cut in two."""
        end = self.start + max(0, min(n_bytes, self.end - self.start))
        if end < self.end:
            with open(self.path, "rb") as f:
                f.seek(max(self.start, end - 3))
                tail = f.read(end - max(self.start, end - 3) + 1)  # up to the byte at `end`
            back = 0
            while back < len(tail) - 1 and tail[len(tail) - 1 - back] & 0xC0 == 0x80:  # a continuation byte
                back += 1
            end -= back
        return FileText(self.path, self.start, end, self._stat)

    def split_at(self, index: int) -> "tuple[FileText, FileText]":
        """The text before character `index` and the text from it on."""
        seen = 0
        for offset, text in self._decoded():
            if seen + len(text) > index:
                cut = offset + len(text[: index - seen].encode("utf-8"))
                return FileText(self.path, self.start, cut, self._stat, index), FileText(self.path, cut, self.end, self._stat)
            seen += len(text)
        return self, FileText(self.path, self.end, self.end, self._stat, 0)


def _stat_of(fd: int) -> tuple[int, int]:
    st = os.fstat(fd)
    return st.st_size, st.st_mtime_ns


# ---------------------------------------------------------------------------------------------
# a document's text, a str or a FileText


def utf8_size(text: "str | FileText") -> int:
    return text.end - text.start if isinstance(text, FileText) else len(text.encode("utf-8"))


def sha256_digest(text: "str | FileText") -> bytes:
    return text.digest() if isinstance(text, FileText) else hashlib.sha256(text.encode("utf-8")).digest()


def utf8_head(text: "str | FileText", n_bytes: int) -> "str | FileText":
    """The first `n_bytes` UTF-8 bytes of `text`, without a character they would cut in two."""
    if isinstance(text, FileText):
        return text.head(n_bytes)
    return text.encode("utf-8")[:n_bytes].decode("utf-8", errors="ignore")


def split_chars(text: "str | FileText", index: int) -> "tuple[str | FileText, str | FileText]":
    return text.split_at(index) if isinstance(text, FileText) else (text[:index], text[index:])


def feed(digest, text: "str | FileText") -> None:
    """Its length in bytes (8 bytes, big-endian), then its bytes, into the hash `digest`."""
    if isinstance(text, FileText):
        digest.update(utf8_size(text).to_bytes(8, "big"))
        for data in text.byte_chunks():
            digest.update(data)
    else:
        data = text.encode("utf-8")
        digest.update(len(data).to_bytes(8, "big") + data)


__all__ = ["FileText", "STREAM_BYTES", "utf8_size", "sha256_digest", "utf8_head", "split_chars", "feed"]
