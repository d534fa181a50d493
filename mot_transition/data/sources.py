"""Where documents come from, read as a stream of (key, text): files, folders, globs, JSONL and
Parquet records, datasets saved with `save_to_disk`, Hub datasets, and the built-in corpus.

The key decides a document's split (corpus.py): a file's path (relative to the folder or glob
root it was found under), or the text itself for a record. Nothing here holds more than one
document, one JSONL line or one Parquet record batch at a time; a text file longer than
STREAM_BYTES is not held at all: its document is a FileText, read from the file when needed.
"""

import glob
import os
import sys
import sysconfig
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from mot_transition.checks import one_line
from mot_transition.data.jsonl import iter_jsonl
from mot_transition.data.streamed import STREAM_BYTES, FileText, StreamedText

STDLIB = "stdlib"
HUB_PREFIX = "hf:"
RECORD_SUFFIXES = (".jsonl", ".jsonl.gz", ".parquet")
PARQUET_BATCH_ROWS = 1024

# Folders of the standard library that are not its own hand-written source: installed packages,
# the test suites, IDLE, generated tables (codec maps, pydoc's topic dump) and build configuration.
_STDLIB_SKIP_DIRS = {
    "site-packages", "dist-packages", "test", "tests", "idlelib",
    "encodings", "pydoc_data", "__pycache__", "lib-dynload",
}


# ---------------------------------------------------------------------------------------------
# readers of one file


def decode_file(file: Path) -> str | None:
    """The file's text, or None if it is not UTF-8 text (undecodable or holding NUL bytes)."""
    try:
        text = file.read_bytes().decode("utf-8")
    except (UnicodeDecodeError, OSError):
        return None
    return None if "\x00" in text else text


def read_text_file(path: Path) -> str:
    text = decode_file(path)
    if text is None:
        raise _not_text(path)
    return text


def _not_text(path: Path) -> ValueError:
    return ValueError(f"{path} is not UTF-8 text; convert it to UTF-8 or give a .jsonl or .parquet file")


def stream_text_file(path: Path, strict: bool) -> "str | FileText | None":
    """A text file's document for `prepare`: the text of a file of at most STREAM_BYTES, a
    FileText (read from the file when needed) of a longer one; None, or with `strict` an error,
    for a file that is not UTF-8 text."""
    try:
        long = path.stat().st_size > STREAM_BYTES
    except OSError:
        long = False
    text = FileText.scan(path) if long else decode_file(path)
    if text is None and strict:
        raise _not_text(path)
    return text


def check_parquet(path: Path, text_field: str) -> None:
    """A one-line error unless pyarrow is installed and `path` has the column `text_field`."""
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise ValueError(f"reading {path.name} needs pyarrow: pip install pyarrow (or convert it to .jsonl)") from None
    try:
        schema = pq.read_schema(path)
    except Exception as e:  # pyarrow's ArrowInvalid and friends: a damaged or non-Parquet file
        raise ValueError(f"{path} is not a readable Parquet file ({str(e).splitlines()[0]})") from None
    if text_field not in schema.names:
        raise ValueError(
            f"{path} has no column {text_field!r} (columns: {', '.join(schema.names)}); "
            f"pass --text-field (data.text_field in a recipe) to name the column that holds the text"
        )


def iter_parquet(path: Path, text_field: str) -> Iterator[str]:
    """The string values of column `text_field`, one record batch at a time (never the whole file)."""
    check_parquet(path, text_field)
    import pyarrow.parquet as pq

    for batch in pq.ParquetFile(path).iter_batches(batch_size=PARQUET_BATCH_ROWS, columns=[text_field]):
        for text in batch.column(0).to_pylist():
            if isinstance(text, str):
                yield text


# ---------------------------------------------------------------------------------------------
# the built-in corpus and folders


def stdlib_name() -> str:
    return f"python{sys.version_info.major}.{sys.version_info.minor}-stdlib"


def stdlib_files() -> list[tuple[str, Path]]:
    """(path relative to the stdlib root, path) of every hand-written .py file, sorted by key."""
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
                file = Path(folder, filename)
                files.append((file.relative_to(root).as_posix(), file))
    return sorted(files)


def folder_files(root: Path) -> list[tuple[str, Path]]:
    """(relative path, path) of every file under `root`, hidden files and folders skipped, sorted."""
    files = []
    for file in root.rglob("*"):
        relative = file.relative_to(root)
        if file.is_file() and not any(part.startswith(".") for part in relative.parts):
            files.append((relative.as_posix(), file))
    return sorted(files)


# ---------------------------------------------------------------------------------------------
# sources of a prepared corpus


@dataclass(frozen=True)
class Source:
    """One place documents come from. `kind`: stdlib, text, text-folder, jsonl, parquet, saved, hub."""

    kind: str
    location: str
    key: str = ""  # a text file's key; records are keyed by their text


def _is_record_file(path: Path) -> bool:
    return path.name.endswith(RECORD_SUFFIXES)


def _file_source(path: Path, key: str, text_field: str) -> Source:
    if path.name.endswith((".jsonl", ".jsonl.gz")):
        return Source("jsonl", str(path))
    if path.name.endswith(".parquet"):
        check_parquet(path, text_field)
        return Source("parquet", str(path))
    return Source("text", str(path), key)


def _is_saved_dataset(path: Path) -> bool:
    return (path / "dataset_dict.json").is_file() or (path / "state.json").is_file()


def _glob_root(pattern: str) -> Path:
    """The folder part of a glob before its first wildcard: glob matches are keyed relative to it."""
    parts = Path(pattern).expanduser().parts
    plain = [p for p in parts[: next(i for i, p in enumerate(parts) if glob.has_magic(p))]]
    return Path(*plain) if plain else Path(".")


def resolve_sources(specs: list[str], text_field: str = "text") -> list[Source]:
    """Every source checked before anything is written: it exists, a glob matches, a Parquet file
    has the column, `datasets` is installed where one is needed."""
    if not specs:
        raise ValueError("give at least one source: a file, a folder, a glob, a saved dataset, hf:NAME or 'stdlib'")
    sources = []
    for spec in map(str, specs):
        if spec == STDLIB:
            sources.append(Source("stdlib", STDLIB))
        elif spec.startswith(HUB_PREFIX):
            check_hub_dataset(spec, _import_datasets(spec))
            sources.append(Source("hub", spec[len(HUB_PREFIX) :]))
        elif Path(spec).expanduser().exists():
            path = Path(spec).expanduser()
            if path.is_dir() and _is_saved_dataset(path):
                _import_datasets(spec)
                sources.append(Source("saved", str(path)))
            elif path.is_dir():
                files = folder_files(path)
                records = [(k, f) for k, f in files if _is_record_file(f)]
                if records:  # a folder of JSONL or Parquet shards: its records, not its files' text
                    sources.extend(_file_source(f, k, text_field) for k, f in records)
                else:
                    sources.extend(Source("text", str(f), k) for k, f in files)
            else:
                sources.append(_file_source(path, path.name, text_field))
        elif glob.has_magic(spec):
            root = _glob_root(spec)
            matches = sorted(Path(m) for m in glob.glob(os.path.expanduser(spec), recursive=True))
            matches = [m for m in matches if m.is_file()]
            if not matches:
                raise FileNotFoundError(f"the glob {spec!r} matches no file")
            sources.extend(_file_source(m, m.relative_to(root).as_posix(), text_field) for m in matches)
        else:
            raise FileNotFoundError(
                f"source {spec!r} does not exist; give a text file, a folder, a .jsonl(.gz) or .parquet "
                f"file, a glob, a dataset saved with save_to_disk, hf:NAME for a Hub dataset, or 'stdlib'"
            )
    return sources


def iter_source(source: Source, text_field: str, strict: bool) -> "Iterator[tuple[str, str | StreamedText]]":
    """(key, text) of every document of one source. `strict`: a text file that is not UTF-8 is an
    error (a file named alone) rather than skipped (a file found in a folder)."""
    if source.kind == "stdlib":
        for key, file in stdlib_files():
            text = decode_file(file)
            if text is not None:
                yield key, text
    elif source.kind == "text":
        text = stream_text_file(Path(source.location), strict)
        if text is not None:
            yield source.key, text
    elif source.kind in ("jsonl", "parquet"):
        reader = iter_jsonl if source.kind == "jsonl" else iter_parquet
        for text in reader(Path(source.location), text_field):
            yield text, text
    else:
        for text in _iter_dataset(source, text_field):
            yield text, text


def iter_documents(specs: list[str], sources: list[Source], text_field: str) -> Iterator[tuple[str, str]]:
    """(key, text) of every document of every source, in the order given."""
    named_files = {str(Path(s).expanduser()) for s in map(str, specs)}
    for source in sources:
        yield from iter_source(source, text_field, strict=source.location in named_files)


# ---------------------------------------------------------------------------------------------
# Hugging Face datasets


def _import_datasets(spec: str):
    try:
        import datasets
    except ImportError:
        raise ValueError(f"reading {spec} needs the datasets library: pip install datasets") from None
    return datasets


def check_hub_dataset(spec: str, datasets) -> None:
    """One request, before any work, that the Hub answers and has the dataset: offline, unreachable
    (no retries: `datasets` would retry for half a minute, warning each time) or not found is one line."""
    name = spec[len(HUB_PREFIX) :]
    if datasets.config.HF_HUB_OFFLINE:
        raise ValueError(f"{spec}: the Hub dataset {name!r} cannot be streamed offline (HF_HUB_OFFLINE is set)")
    from huggingface_hub import HfApi
    from huggingface_hub.errors import GatedRepoError, HfHubHTTPError, RepositoryNotFoundError

    try:
        HfApi().dataset_info(name, timeout=15)
    except GatedRepoError:
        raise ValueError(f"{spec}: the Hub dataset {name!r} is gated; accept its terms on the Hub and log in (hf auth login)") from None
    except RepositoryNotFoundError:
        raise ValueError(f"{spec}: the Hub has no dataset {name!r} (or it is private and you are not logged in)") from None
    except HfHubHTTPError as error:
        raise ValueError(f"{spec}: the Hub refused the dataset {name!r} ({one_line(error)})") from None
    except Exception as error:  # the HTTP client's connection errors: no network, no DNS, a proxy
        raise ValueError(f"{spec}: the Hugging Face Hub cannot be reached ({one_line(error)}); check the network, "
                         f"or prepare from local files") from None


def _iter_dataset(source: Source, text_field: str) -> Iterator[str]:
    """The `text_field` strings of a saved dataset (every split, in name order) or a streamed Hub dataset."""
    datasets = _import_datasets(source.location)
    if source.kind == "saved":
        loaded = datasets.load_from_disk(source.location)
        parts = [loaded[name] for name in sorted(loaded)] if isinstance(loaded, datasets.DatasetDict) else [loaded]
        for part in parts:
            if text_field not in part.column_names:
                raise ValueError(
                    f"the dataset {source.location} has no column {text_field!r} "
                    f"(columns: {', '.join(part.column_names)}); pass --text-field"
                )
            for batch in part.select_columns([text_field]).iter(batch_size=PARQUET_BATCH_ROWS):
                yield from (t for t in batch[text_field] if isinstance(t, str))
        return
    if datasets.config.HF_HUB_OFFLINE:
        raise ValueError(f"the Hub dataset {source.location!r} cannot be streamed offline (HF_HUB_OFFLINE is set)")
    try:
        stream = datasets.load_dataset(source.location, split="train", streaming=True)
        for record in stream:
            text = record.get(text_field)
            if isinstance(text, str):
                yield text
    except (ConnectionError, OSError, ValueError) as e:
        message = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ValueError(f"could not stream the Hub dataset {source.location!r}: {message}") from None
