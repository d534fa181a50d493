"""The prepared corpus behind a recipe whose `data.source` is not one already.

Training reads one kind of data: a prepared corpus (shards.py), memory-mapped. The built-in corpus
and a user's own files get there through `prepare`, run once behind the scenes into the cache
(`$MOT_TRANSITION_CACHE/prepared/NAME-KEY`, or `data.cache_dir`), and read from there as if the user
had prepared them. KEY names what the result depends on: the sources (every file's path, size and
modification time; a Hub dataset's name), `text_field`, `heldout_fraction`, `max_bytes`, and the
tokenizer (the vocabulary size of the BPE trained on the train split, or the hash of the one given).
"""

import hashlib
from pathlib import Path

from mot_transition.data.batches import tokenizer_hash
from mot_transition.data.prepare import prepare
from mot_transition.data.shards import MANIFEST
from mot_transition.data.sources import STDLIB, folder_files, resolve_sources, stdlib_files, stdlib_name
from mot_transition.data.tokenizer import cache_root
from mot_transition.jsonfiles import read_json_object
from mot_transition.locks import hold

CACHE_FORMAT = 1  # bump when what `prepare` writes for the same inputs changes
TOKENIZER_SAMPLE_BYTES = 100_000_000  # the BPE of a cached corpus trains on this much of its train split


def source_signature(source: str, text_field: str = "text") -> str:
    """16 hex digits that change when the documents `source` names may have: a file added, removed,
    resized or touched. Costs one stat per file, not a read."""
    h = hashlib.sha256(f"mot-transition source v{CACHE_FORMAT}\0{text_field}\0".encode())
    for resolved in resolve_sources([source], text_field):
        h.update(f"{resolved.kind}\0{resolved.location}\0{resolved.key}\n".encode())
        if resolved.kind == "stdlib":
            files = [path for _, path in stdlib_files()]
            h.update(stdlib_name().encode())
        elif resolved.kind == "saved":
            files = [path for _, path in folder_files(Path(resolved.location))]
        elif resolved.kind == "hub":
            files = []  # a name only: its contents are the Hub's
        else:
            files = [Path(resolved.location)]
        for path in files:
            stat = path.stat()
            h.update(f"{path}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
    return h.hexdigest()[:16]


def cached_corpus(
    source: str,
    *,
    text_field: str = "text",
    heldout_fraction: float = 0.05,
    max_bytes: int | None = None,
    vocab_size: int = 4096,
    tokenizer=None,
    cache_dir: str | Path | None = None,
) -> Path:
    """The prepared corpus of `source` in the cache, prepared first if it is not there yet.

    Without `tokenizer`, a byte-level BPE of `vocab_size` is trained on the first 100 MB of the train
    split (all of it for the built-in corpus). With one (a resumed run's, a checkpoint's), the corpus
    prepared with the trained BPE is used when that BPE is this tokenizer, else the source is
    tokenised with it into an entry of its own.
    """
    root = Path(cache_dir).expanduser() if cache_dir is not None else cache_root()
    root = root / "prepared"
    name = stdlib_name() if source == STDLIB else Path(source).expanduser().name or "corpus"
    settings = f"{source_signature(source, text_field)}\0{heldout_fraction!r}\0{max_bytes!r}"
    trained = root / f"{name}-{_key(settings, f'bpe-{vocab_size}')}"
    if tokenizer is None:
        target = trained
    elif _tokenizer_hash_of(trained) == tokenizer_hash(tokenizer):
        return trained
    else:
        target = root / f"{name}-{_key(settings, 'tokenizer-' + tokenizer_hash(tokenizer))}"
    if (target / MANIFEST).is_file():
        return target
    root.mkdir(parents=True, exist_ok=True)
    # a second process preparing the same entry waits until it is there, then reads it (it waits for
    # the entry, not for the lock: once prepared, the first process reads it under a reader's lock)
    with hold(target, wait=True, until=(target / MANIFEST).is_file) as taken:
        if taken and not (target / MANIFEST).is_file():  # prepared in a staging folder beside it, renamed in when done
            prepare([source], target, tokenizer=tokenizer, vocab_size=vocab_size, sample_bytes=TOKENIZER_SAMPLE_BYTES,
                    text_field=text_field, heldout_fraction=heldout_fraction, max_bytes=max_bytes)
    return target


def _key(settings: str, tokenizer: str) -> str:
    return hashlib.sha256(f"{settings}\0{tokenizer}".encode()).hexdigest()[:16]


def _tokenizer_hash_of(prepared: Path) -> str | None:
    if not (prepared / MANIFEST).is_file():
        return None
    try:
        return read_json_object(prepared / MANIFEST).get("tokenizer_hash")
    except ValueError:  # damaged: PreparedData says so when it is read
        return None


__all__ = ["cached_corpus", "source_signature"]
