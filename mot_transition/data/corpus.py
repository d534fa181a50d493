"""Text corpora: the built-in Python standard library corpus and the user's own data.

A corpus is a list of training documents and a list of held-out documents. The split is decided
by a stable hash of each document's key (its path for files, its text for records), so it is the
same on every run and every machine, and it does not move when other documents are added.
"""

import hashlib
from dataclasses import dataclass
from pathlib import Path

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

    keyed = _drop_empty_and_duplicates(keyed)
    if max_bytes is not None:
        keyed = _cap(keyed, max_bytes)
    if not keyed:
        raise ValueError(f"corpus {name!r} has no text: no non-empty UTF-8 documents in {str(source or STDLIB)!r}")

    train, heldout = _split(keyed, heldout_fraction)
    return Corpus(name=name, train=train, heldout=heldout, fingerprint=_fingerprint(train, heldout))


# ---------------------------------------------------------------------------------------------
# whole-corpus readers (the streaming readers are in sources.py)


def _read_stdlib() -> list[tuple[str, str]]:
    """(path relative to the stdlib root, text) for every hand-written .py file, sorted by path."""
    return [(key, text) for key, file in stdlib_files() if (text := decode_file(file)) is not None]


def _read_folder(root: Path) -> list[tuple[str, str]]:
    """Every UTF-8 text file under `root` (hidden files and folders skipped), sorted by path."""
    return [(key, text) for key, file in folder_files(root) if (text := decode_file(file)) is not None]


def _read_records(path: Path, text_field: str) -> list[tuple[str, str]]:
    reader = iter_parquet if path.suffix == ".parquet" else iter_jsonl
    return [(text, text) for text in reader(path, text_field)]


# ---------------------------------------------------------------------------------------------
# cap, split, fingerprint


def _drop_empty_and_duplicates(keyed: list[tuple[str, str]]) -> list[tuple[str, str]]:
    """Keep the first of every identical document: a copy in the other split would leak held-out text."""
    seen, kept = set(), []
    for key, text in keyed:
        if text and text not in seen:
            seen.add(text)
            kept.append((key, text))
    return kept


def _cap(keyed: list[tuple[str, str]], max_bytes: int) -> list[tuple[str, str]]:
    """The leading documents up to `max_bytes` UTF-8 bytes; the one that crosses it is cut."""
    kept, total = [], 0
    for key, text in keyed:
        size = len(text.encode("utf-8"))
        if total + size > max_bytes:
            cut = text.encode("utf-8")[: max_bytes - total].decode("utf-8", errors="ignore")
            if cut:
                kept.append((key, cut))
            break
        kept.append((key, text))
        total += size
    return kept


def _hash_fraction(key: str) -> float:
    """A number in [0, 1) fixed by `key` alone: the same on every run, machine and Python."""
    digest = hashlib.sha256(key.encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def _split(keyed: list[tuple[str, str]], heldout_fraction: float) -> tuple[list[str], list[str]]:
    """Held-out documents are those whose key hashes below `heldout_fraction`.

    A single document is split by characters instead: its last `heldout_fraction` is held out.
    If the hash holds out no document (few documents), the one with the smallest hash is held out.
    """
    if len(keyed) == 1:
        text = keyed[0][1]
        cut = int(len(text) * (1.0 - heldout_fraction))
        if cut == 0 or cut == len(text):
            raise ValueError(
                f"the corpus is one document of {len(text)} characters, "
                f"too short to hold out {heldout_fraction:.0%} of it"
            )
        return [text[:cut]], [text[cut:]]

    fractions = [_hash_fraction(key) for key, _ in keyed]
    heldout_mask = [f < heldout_fraction for f in fractions]
    if not any(heldout_mask):
        heldout_mask[fractions.index(min(fractions))] = True
    if all(heldout_mask):
        raise ValueError(
            f"all {len(keyed)} documents fell in the held-out split; lower heldout_fraction ({heldout_fraction})"
        )
    train = [text for (_, text), held in zip(keyed, heldout_mask) if not held]
    heldout = [text for (_, text), held in zip(keyed, heldout_mask) if held]
    return train, heldout


def _fingerprint(train: list[str], heldout: list[str]) -> str:
    """16 hex digits naming the documents and which split each one is in."""
    h = hashlib.sha256(b"mot-transition corpus v1")
    for split_name, documents in (("train", train), ("heldout", heldout)):
        h.update(f"\n[{split_name} {len(documents)}]".encode())
        for doc in documents:
            data = doc.encode("utf-8")
            h.update(len(data).to_bytes(8, "big"))
            h.update(data)
    return h.hexdigest()[:16]
