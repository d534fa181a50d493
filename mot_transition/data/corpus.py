"""Text corpora: the built-in Python standard library corpus and the user's own data.

A corpus is a list of training documents and a list of held-out documents. The split is decided
by a stable hash of each document's key (its path for files, its text for records), so it is the
same on every run and every machine, and it does not move when other documents are added.
"""

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator

from mot_transition.data.streamed import StreamedText, feed, sha256_digest, split_chars, utf8_head, utf8_size
from mot_transition.data.sources import (
    STDLIB,
    decode_file,
    folder_files,
    iter_jsonl,
    iter_parquet,
    read_text_file,
    stdlib_files,
    stdlib_name,
)

SPLITS = ("train", "heldout")

# The cap for the "tiny" recipe (recipes/tiny.toml uses the same): about 4 MB of code, enough for
# a 4096-token vocabulary and 8,000 sequences of 128 tokens, quick to tokenise on 2 cores.
TINY_MAX_BYTES = 4_000_000


@dataclass(repr=False)
class Corpus:
    """Documents split into train and held-out; `fingerprint` names the contents and the split."""

    name: str
    train: list[str]
    heldout: list[str]
    fingerprint: str

    def __repr__(self) -> str:
        n_train = sum(len(d) for d in self.train)
        n_heldout = sum(len(d) for d in self.heldout)
        return (
            f"Corpus(name={self.name!r}, train={len(self.train)} docs / {n_train:,} chars, "
            f"heldout={len(self.heldout)} docs / {n_heldout:,} chars, fingerprint={self.fingerprint!r})"
        )


def load_corpus(
    source: str | Path | None = None,
    *,
    text_field: str = "text",
    heldout_fraction: float = 0.05,
    max_bytes: int | None = None,
) -> Corpus:
    """Load a corpus and split it into train and held-out documents.

    `source` is None or "stdlib" for the built-in corpus, else a text file, a folder of text
    files, a `.jsonl` file (one JSON object per line, text under `text_field`) or a `.parquet`
    file (column `text_field`). `max_bytes` keeps the first documents, in order, up to that many
    UTF-8 bytes; the document that crosses the cap is cut there. Empty documents and exact
    copies of an earlier document are dropped.
    """
    if not 0.0 < heldout_fraction < 1.0:
        raise ValueError(f"heldout_fraction must be between 0 and 1 (exclusive), got {heldout_fraction}")
    if max_bytes is not None and max_bytes <= 0:
        raise ValueError(f"max_bytes must be a positive number of bytes or None, got {max_bytes}")

    if source is None or str(source) == STDLIB:
        name, keyed = stdlib_name(), _read_stdlib()
    else:
        path = Path(source).expanduser()
        if not path.exists():
            raise FileNotFoundError(
                f"corpus source {str(source)!r} does not exist; "
                f"give a text file, a folder, a .jsonl or a .parquet file, or 'stdlib'"
            )
        name = path.resolve().name
        if path.is_dir():
            keyed = _read_folder(path)
        elif path.suffix in (".jsonl", ".parquet"):
            keyed = _read_records(path, text_field)
        else:
            keyed = [(path.name, read_text_file(path))]

    stream = SplitStream(keyed, heldout_fraction, max_bytes)
    splits = {"train": [], "heldout": []}
    for split, text in stream:
        splits[split].append(text)
    if not any(splits.values()):
        raise ValueError(f"corpus {name!r} has no text: no non-empty UTF-8 documents in {str(source or STDLIB)!r}")
    return Corpus(name=name, train=splits["train"], heldout=splits["heldout"], fingerprint=stream.fingerprint())


# ---------------------------------------------------------------------------------------------
# whole-corpus readers (the streaming readers are in sources.py)


def _read_stdlib() -> list[tuple[str, str]]:
    """(path relative to the stdlib root, text) for every hand-written .py file, sorted by path."""
    return [(key, text) for key, file in stdlib_files() if (text := decode_file(file)) is not None]


def _read_folder(root: Path) -> list[tuple[str, str]]:
    """Every UTF-8 text file under `root` (hidden files and folders skipped), sorted by path."""
    return [(key, text) for key, file in folder_files(root) if (text := decode_file(file)) is not None]


def _read_records(path: Path, text_field: str) -> list[tuple[str, str]]:
    """(text, text) of every record; a long JSONL line's text (a StreamedText) read whole: this
    corpus is held in memory anyway."""
    reader = iter_parquet if path.suffix == ".parquet" else iter_jsonl
    texts = [text if isinstance(text, str) else text.read() for text in reader(path, text_field)]
    return [(text, text) for text in texts]


# ---------------------------------------------------------------------------------------------
# the split: one rule for the in-memory corpus and the prepared one


def _hash_fraction(key: str) -> float:
    """A number in [0, 1) fixed by `key` alone: the same on every run, machine and Python."""
    digest = hashlib.sha256(key.encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


class SplitStream:
    """(split, text) for every document of `keyed`, empty documents and exact copies dropped.

    A document is held out when the hash of its key falls below `heldout_fraction`. As in
    `load_corpus`, when the hash holds out nothing, the document with the smallest hash is held
    out, and a source of one document is split by characters: to do that while streaming, the
    smallest-hash document is held back (one document in memory) until a document is held out by
    the hash, and released then, later in the train stream than its place in the source.

    `max_bytes` keeps the leading documents (after dropping) up to that many UTF-8 bytes; the one
    that crosses it is cut there and the stream ends.

    A text is a `str` or, for a long text file or JSONL line, a `StreamedText` (streamed.py),
    read from its file when needed: the same split, fingerprint and cuts either way.
    """

    def __init__(self, keyed: Iterable[tuple[str, "str | StreamedText"]], heldout_fraction: float, max_bytes: int | None = None, name: str = ""):
        self.keyed, self.heldout_fraction, self.max_bytes = keyed, heldout_fraction, max_bytes
        self.name = name  # the sources as the user gave them, for the errors: "SOURCE: ..."
        self.empty = self.duplicates = 0
        self.documents = {split: 0 for split in SPLITS}
        self._digests = {split: hashlib.sha256() for split in SPLITS}

    def __iter__(self) -> Iterator[tuple[str, str]]:
        seen: set[int] = set()  # 8 bytes of SHA-256 per kept document: the only state that grows
        pending = None  # (fraction, text) of the smallest-hash document while none is held out
        first = None  # the first document when its hash holds it out: alone, it is split by characters
        kept = total = 0
        for key, text in self.keyed:
            if self.max_bytes is not None and total >= self.max_bytes:
                break
            if not text:
                self.empty += 1
                continue
            text_hash = int.from_bytes(sha256_digest(text)[:8], "big")
            if text_hash in seen:
                self.duplicates += 1
                continue
            seen.add(text_hash)
            fraction = text_hash / 2**64 if key is text else _hash_fraction(key)
            if self.max_bytes is not None:
                size = utf8_size(text)
                if total + size > self.max_bytes:
                    text = utf8_head(text, self.max_bytes - total)
                    if not text:
                        break
                total += size  # past max_bytes after a cut: the next turn stops
            kept += 1
            if first is not None:  # a second document: the first one is held out after all
                yield self._emit("heldout", first)
                first = None
            if fraction < self.heldout_fraction:
                if kept == 1:
                    first = text
                    continue
                if pending is not None:
                    yield self._emit("train", pending[1])
                    pending = None
                yield self._emit("heldout", text)
            elif self.documents["heldout"] or (pending is not None and fraction >= pending[0]):
                yield self._emit("train", text)
            else:
                if pending is not None:
                    yield self._emit("train", pending[1])
                pending = (fraction, text)
        if pending is not None:
            yield from self._fallback(pending[1])
        if first is not None:  # the corpus was this one document
            yield from self._fallback(first)
        if not self.documents["train"] and self.documents["heldout"]:
            raise ValueError(
                f"{self.name + ': ' if self.name else ''}all {self.documents['heldout']} documents fell in the held-out split; "
                f"lower --heldout-fraction ({self.heldout_fraction})"
            )

    def _fallback(self, text: str) -> Iterator[tuple[str, str]]:
        if self.documents["train"]:
            yield self._emit("heldout", text)
            return
        cut = int(len(text) * (1.0 - self.heldout_fraction))
        if cut == 0 or cut == len(text):
            raise ValueError(
                f"{self.name + ': ' if self.name else ''}the corpus is one document of {len(text)} characters, "
                f"too short to hold out {self.heldout_fraction:.0%} of it (--heldout-fraction)"
            )
        train, heldout = split_chars(text, cut)
        yield self._emit("train", train)
        yield self._emit("heldout", heldout)

    def _emit(self, split: str, text: "str | StreamedText") -> "tuple[str, str | StreamedText]":
        feed(self._digests[split], text)
        self.documents[split] += 1
        return split, text

    def fingerprint(self) -> str:
        """16 hex digits naming the documents and which split each one is in, in stream order."""
        h = hashlib.sha256(b"mot-transition prepared v1")
        for split in SPLITS:
            h.update(f"\n[{split} {self.documents[split]}]".encode() + self._digests[split].digest())
        return h.hexdigest()[:16]
