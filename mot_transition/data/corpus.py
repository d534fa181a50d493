"""Text corpora: the built-in Python standard library corpus and the user's own data.

A corpus is a list of training documents and a list of held-out documents. The split is decided
by a stable hash of each document's key (its path for files, its text for records), so it is the
same on every run and every machine, and it does not move when other documents are added.
"""

import hashlib
import json
import os
import sys
import sysconfig
from dataclasses import dataclass
from pathlib import Path

STDLIB = "stdlib"
# The cap for the "tiny" recipe (recipes/tiny.toml uses the same): about 4 MB of code, enough for
# a 4096-token vocabulary and 8,000 sequences of 128 tokens, quick to tokenise on 2 cores.
TINY_MAX_BYTES = 4_000_000

# Folders of the standard library that are not its own hand-written source: installed packages,
# the test suites, IDLE, generated tables (codec maps, pydoc's topic dump) and build configuration.
_STDLIB_SKIP_DIRS = {
    "site-packages", "dist-packages", "test", "tests", "idlelib",
    "encodings", "pydoc_data", "__pycache__", "lib-dynload",
}


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
        name, keyed = _stdlib_name(), _read_stdlib()
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
        elif path.suffix == ".jsonl":
            keyed = _read_jsonl(path, text_field)
        elif path.suffix == ".parquet":
            keyed = _read_parquet(path, text_field)
        else:
            keyed = [(path.name, _read_text_file(path))]

    keyed = _drop_empty_and_duplicates(keyed)
    if max_bytes is not None:
        keyed = _cap(keyed, max_bytes)
    if not keyed:
        raise ValueError(f"corpus {name!r} has no text: no non-empty UTF-8 documents in {str(source or STDLIB)!r}")

    train, heldout = _split(keyed, heldout_fraction)
    return Corpus(name=name, train=train, heldout=heldout, fingerprint=_fingerprint(train, heldout))


# ---------------------------------------------------------------------------------------------
# the built-in corpus


def _stdlib_name() -> str:
    return f"python{sys.version_info.major}.{sys.version_info.minor}-stdlib"


def _read_stdlib() -> list[tuple[str, str]]:
    """(path relative to the stdlib root, text) for every hand-written .py file, sorted by path."""
    root = Path(sysconfig.get_paths()["stdlib"])
    if not root.is_dir():
        raise FileNotFoundError(f"no Python standard library at {root}; pass your own corpus as source")
    files = []
    for folder, dirnames, filenames in os.walk(root):
        # prune in place so that os.walk never descends into site-packages or the test suites
        dirnames[:] = [d for d in dirnames if d not in _STDLIB_SKIP_DIRS and not d.startswith(("config-", "."))]
        for filename in filenames:
            # _sysconfigdata* records this machine's build paths: not the same on every machine
            if filename.endswith(".py") and not filename.startswith("_sysconfigdata"):
                files.append(Path(folder, filename))
    keyed = []
    for file in files:
        text = _decode(file)
        if text is not None:
            keyed.append((file.relative_to(root).as_posix(), text))
    return sorted(keyed)


# ---------------------------------------------------------------------------------------------
# user data


def _decode(file: Path) -> str | None:
    """The file's text, or None if it is not UTF-8 text (undecodable or holding NUL bytes)."""
    try:
        text = file.read_bytes().decode("utf-8")
    except (UnicodeDecodeError, OSError):
        return None
    return None if "\x00" in text else text


def _read_text_file(path: Path) -> str:
    text = _decode(path)
    if text is None:
        raise ValueError(f"{path} is not UTF-8 text; convert it to UTF-8 or give a .jsonl or .parquet file")
    return text


def _read_folder(root: Path) -> list[tuple[str, str]]:
    """Every UTF-8 text file under `root` (hidden files and folders skipped), sorted by path."""
    keyed = []
    for file in root.rglob("*"):
        relative = file.relative_to(root)
        if not file.is_file() or any(part.startswith(".") for part in relative.parts):
            continue
        text = _decode(file)
        if text is not None:
            keyed.append((relative.as_posix(), text))
    return sorted(keyed)


def _read_jsonl(path: Path, text_field: str) -> list[tuple[str, str]]:
    keyed = []
    with path.open(encoding="utf-8") as f:
        for line_number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}, line {line_number}: not valid JSON ({e.msg})") from None
            if not isinstance(record, dict) or text_field not in record:
                raise ValueError(
                    f"{path}, line {line_number}: no {text_field!r} field; "
                    f"pass text_field= to name the field that holds the text"
                )
            text = record[text_field]
            if not isinstance(text, str):
                kind = type(text).__name__
                raise ValueError(f"{path}, line {line_number}: field {text_field!r} is a {kind}, not a string")
            keyed.append((text, text))
    return keyed


def _read_parquet(path: Path, text_field: str) -> list[tuple[str, str]]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise ValueError(f"reading {path.name} needs pyarrow: pip install pyarrow (or convert it to .jsonl)") from None
    schema = pq.read_schema(path)
    if text_field not in schema.names:
        raise ValueError(
            f"{path} has no column {text_field!r} (columns: {', '.join(schema.names)}); "
            f"pass text_field= to name the column that holds the text"
        )
    texts = pq.read_table(path, columns=[text_field]).column(text_field).to_pylist()
    return [(text, text) for text in texts if isinstance(text, str)]


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
