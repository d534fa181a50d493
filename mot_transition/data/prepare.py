"""`prepare`: a corpus of any size into the prepared token format (shards.py), as a stream.

Documents are read one at a time (sources.py), exact duplicates dropped (a set of 8-byte hashes),
split by the stable hash of their key (corpus.py's rule), tokenised in batches of about
`batch_bytes` of text, inline or in `workers` processes, and appended to the current shard of their
split. Memory holds the duplicate set, one document and a few batches in flight; never the corpus
or its token stream.
"""

import multiprocessing
import os
from collections import deque
from itertools import chain
from pathlib import Path
from typing import Callable, Iterable, Iterator

import numpy as np

from mot_transition.data.batches import tokenizer_hash
from mot_transition.data.corpus import SplitStream
from mot_transition.checks import check_writable_folder, load_tokenizer_folder
from mot_transition.data.pieces import pieces_of_long
from mot_transition.data.shards import FORMAT, FORMAT_VERSION, MANIFEST, SPLITS, PreparedData, ShardWriter, dtype_for
from mot_transition.data.sources import iter_documents, resolve_sources
from mot_transition.data.tokenizer import train_bpe_tokenizer
from mot_transition.destinations import clean_after_killed_runs, staged
from mot_transition.jsonfiles import write_json
from mot_transition.locks import writes
from mot_transition.options import check_options

INCOMPLETE = ".prepare-incomplete"  # what a killed prepare of versions before the staging left in --out
_OURS = ("train", "heldout", "tokenizer", MANIFEST)


@writes("out", option="--out")  # one writer per --out, for the whole preparation
def prepare(
    sources: list[str],
    out: str | Path,
    *,
    tokenizer=None,
    vocab_size: int = 4096,
    sample_bytes: int = 100_000_000,
    text_field: str = "text",
    heldout_fraction: float = 0.05,
    max_bytes: int | None = None,
    shard_tokens: int = 100_000_000,
    workers: int = 1,
    batch_bytes: int = 1_000_000,
    force: bool = False,
    progress: Callable[[int, int, int], None] | None = None,
) -> Path:
    """Tokenise `sources` into the prepared corpus `out` (docs/design.md §11) and return `out`.

    `tokenizer` is an AutoTokenizer directory or a loaded fast tokenizer; without one, a byte-level
    BPE of `vocab_size` tokens is trained on the first `sample_bytes` of the train split.
    `max_bytes` reads only the leading documents up to that many UTF-8 bytes (after dropping empty
    ones and copies; the one that crosses it is cut). `progress(documents, tokens, bytes)` is called
    after every batch written.

    The corpus is written in a staging folder beside `out` (`.NAME.converting-PID`) and swapped in
    when complete: an existing dataset (replaced only with `force`, and only when its manifest
    validates) stays whole until then, whatever stops the preparation.
    """
    check_options(heldout_fraction=float(heldout_fraction), shard_tokens=shard_tokens, workers=workers,
                  sample_bytes=sample_bytes, vocab_size=None if tokenizer is not None else vocab_size,
                  max_bytes=max_bytes)
    if batch_bytes <= 0:
        raise ValueError(f"batch_bytes must be positive, got {batch_bytes}")
    out = Path(out).expanduser()
    for spec in sources:  # a dataset written inside a folder it reads would read itself on the next run
        folder = Path(spec).expanduser()
        if folder.is_dir() and (out.resolve() == folder.resolve() or folder.resolve() in out.resolve().parents):
            raise ValueError(f"--out {out} lies inside the source folder {spec}; write the prepared corpus elsewhere")
    resolved = resolve_sources(sources, text_field)
    clean_after_killed_runs(out)  # a killed prepare's staging; a dataset it had moved aside is put back
    _check_output(out, force)
    check_writable_folder(out.parent, "--out", shown=out)  # where the staging goes; before a tokenizer is trained or loaded
    if isinstance(tokenizer, (str, Path)):
        tok = _load_tokenizer(tokenizer)
    elif tokenizer is not None:
        tok = _checked_tokenizer(tokenizer, "the tokenizer given")
    else:
        tok = train_bpe_tokenizer(_sample(sources, resolved, text_field, heldout_fraction, max_bytes, sample_bytes, batch_bytes),
                                  vocab_size)

    with staged(out) as staging:  # removed if anything stops it (bad input found mid-way, Ctrl-C)
        _write(staging, sources, resolved, tok, text_field, heldout_fraction, max_bytes, shard_tokens, workers,
               batch_bytes, progress)
    return out


def _write(out, sources, resolved, tok, text_field, heldout_fraction, max_bytes, shard_tokens, workers, batch_bytes, progress):
    tok.save_pretrained(out / "tokenizer")
    vocab = len(tok)
    dtype, eos = dtype_for(vocab), tok.eos_token_id
    writers = {split: ShardWriter(out, split, dtype, shard_tokens) for split in SPLITS}
    stream = SplitStream(iter_documents(sources, resolved, text_field), heldout_fraction, max_bytes, _named(sources))
    total_bytes = 0
    with _Encoder(tok.backend_tokenizer.to_str(), eos, dtype, workers) as encoder:
        for split, ids, ends, n_bytes in encoder.run(_batches(stream, batch_bytes)):
            writers[split].write(ids, ends)
            total_bytes += n_bytes
            if progress is not None:
                progress(sum(w.documents for w in writers.values()), sum(w.tokens for w in writers.values()), total_bytes)
    if not stream.documents["train"]:
        raise ValueError(f"no text in {', '.join(map(str, sources))}: no non-empty UTF-8 document")
    splits = {}
    for split, writer in writers.items():
        writer.close()
        splits[split] = {"tokens": writer.tokens, "documents": writer.documents, "shards": writer.shards}
    manifest = {
        "format": FORMAT, "format_version": FORMAT_VERSION, "dtype": dtype, "byte_order": "little",
        "eos_id": eos, "vocab_size": vocab, "tokenizer_hash": tokenizer_hash(tok),
        "source_fingerprint": stream.fingerprint(), "sources": [str(s) for s in sources],
        "text_field": text_field, "heldout_fraction": heldout_fraction, "max_bytes": max_bytes, "shard_tokens": shard_tokens,
        "bytes": total_bytes, "dropped": {"empty": stream.empty, "duplicates": stream.duplicates},
        "splits": splits,
    }
    write_json(out / MANIFEST, manifest, indent=1)  # last, atomically: from now on it is a dataset
    return out


def _batches(stream: SplitStream, batch_bytes: int) -> Iterator[tuple[str, list[str], list[bool], int]]:
    """(split, texts, whether each text ends its document, UTF-8 bytes) batches of about
    `batch_bytes`, per split, in stream order. A document longer than `batch_bytes` characters comes
    in pieces (pieces.py), so that no batch holds more than about that much text."""
    pending = {split: ([], [], 0) for split in SPLITS}
    for split, text in stream:
        for part, last in _with_last(pieces_of_long(text, batch_bytes)):
            texts, lasts, size = pending[split]
            texts.append(part)
            lasts.append(last)
            size += len(part.encode("utf-8"))
            pending[split] = (texts, lasts, size)
            if size >= batch_bytes:
                yield split, texts, lasts, size
                pending[split] = ([], [], 0)
    for split, (texts, lasts, size) in pending.items():
        if texts:
            yield split, texts, lasts, size


def _named(sources) -> str:
    return ", ".join(map(str, sources))


def _with_last(items: Iterable) -> Iterator[tuple[object, bool]]:
    """(item, whether it is the last one) for every item."""
    items = iter(items)
    previous = next(items, _with_last)  # the function itself stands for "none"
    if previous is _with_last:
        return
    for item in items:
        yield previous, False
        previous = item
    yield previous, True


def _sample(sources, resolved, text_field, heldout_fraction, max_bytes, sample_bytes, piece_chars) -> Iterator[str]:
    """The train split's first `sample_bytes` UTF-8 bytes, a long document in pieces (pieces.py: the
    BPE trainer counts the same pre-tokenized words either way); the document that crosses it is cut."""
    total = 0
    for split, text in SplitStream(iter_documents(sources, resolved, text_field), heldout_fraction, max_bytes, _named(sources)):
        if split != "train":
            continue
        for part in pieces_of_long(text, piece_chars):
            data = part.encode("utf-8")
            if total + len(data) >= sample_bytes:
                yield data[: sample_bytes - total].decode("utf-8", errors="ignore")
                return
            yield part
            total += len(data)
    if not total:
        raise ValueError(f"no text in {', '.join(map(str, sources))}: no non-empty UTF-8 document to train a tokenizer on")


# ---------------------------------------------------------------------------------------------
# tokenising, inline or in worker processes

_worker = None  # (tokenizer, eos, dtype) of a worker process


def _init_worker(tokenizer_json: str, eos: int, dtype: str) -> None:
    from tokenizers import Tokenizer

    global _worker
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # one worker per core: no threads inside
    _worker = (Tokenizer.from_str(tokenizer_json), eos, dtype)


def _encode(split: str, texts: list[str], lasts: list[bool], n_bytes: int) -> tuple[str, np.ndarray, np.ndarray, int]:
    """(split, ids of every text, each followed by eos when it ends its document, where each
    document ends, bytes)."""
    tokenizer, eos, dtype = _worker
    encodings = tokenizer.encode_batch_fast(texts, add_special_tokens=False)
    lengths = np.array([len(e.ids) + last for e, last in zip(encodings, lasts)], dtype=np.int64)
    ids = np.fromiter(chain.from_iterable(chain(e.ids, (eos,) if last else ()) for e, last in zip(encodings, lasts)),
                      dtype=dtype, count=int(lengths.sum()))
    return split, ids, np.cumsum(lengths)[np.array(lasts, dtype=bool)], n_bytes


class _Encoder:
    """`run(batches)` yields (split, ids, ends, bytes) in the order the batches came. With one
    worker the tokenizer runs here (its encode_batch uses every core by itself); with more, each
    worker process runs one single-threaded tokenizer, and at most 2 batches per worker are in flight."""

    def __init__(self, tokenizer_json: str, eos: int, dtype: str, workers: int):
        self.args, self.workers, self.pool = (tokenizer_json, eos, dtype), workers, None

    def __enter__(self):
        if self.workers == 1:
            global _worker
            from tokenizers import Tokenizer

            _worker = (Tokenizer.from_str(self.args[0]), self.args[1], self.args[2])
            return self
        # fork: a worker needs no import of torch (a spawned one would import the package again).
        # The variable is set while forking so that the tokenizers library does not warn that its
        # threads were used before the fork (training the tokenizer); the children keep it.
        saved = os.environ.get("TOKENIZERS_PARALLELISM")
        os.environ["TOKENIZERS_PARALLELISM"] = "false"
        try:
            self.pool = multiprocessing.get_context("fork").Pool(self.workers, _init_worker, self.args)
        finally:
            if saved is None:
                os.environ.pop("TOKENIZERS_PARALLELISM")
            else:
                os.environ["TOKENIZERS_PARALLELISM"] = saved
        return self

    def run(self, batches: Iterable[tuple[str, list[str], list[bool], int]]):
        if self.pool is None:
            for batch in batches:
                yield _encode(*batch)
            return
        in_flight = deque()
        for batch in batches:
            in_flight.append(self.pool.apply_async(_encode, batch))
            if len(in_flight) >= 2 * self.workers:
                yield in_flight.popleft().get()
        while in_flight:
            yield in_flight.popleft().get()

    def __exit__(self, *exc):
        global _worker
        _worker = None
        if self.pool is not None:
            self.pool.terminate()
            self.pool.join()


# ---------------------------------------------------------------------------------------------
# the output folder and the tokenizer


def _check_output(out: Path, force: bool) -> None:
    """Refuse, before any work, an --out that is a file, a non-empty folder this toolkit did not
    write, or a finished dataset without `force`. What `force` replaces is a dataset whose manifest
    validates (format, version, every shard it lists whole) and that holds nothing else; or what a
    killed prepare of an earlier version left (INCOMPLETE and our folders only)."""
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} is a file; give a folder")
    names = {path.name for path in out.iterdir()} if out.is_dir() else set()
    if not names or (INCOMPLETE in names and names <= {*_OURS, INCOMPLETE}):
        return
    if MANIFEST not in names:
        raise ValueError(f"--out {out} is a non-empty folder that is not a prepared dataset; give a new or empty folder")
    try:
        data = PreparedData(out)
        if not (out / "tokenizer").is_dir():
            raise ValueError("it has no tokenizer/ folder")
    except ValueError as error:
        raise ValueError(f"--out {out} holds a {MANIFEST} but is not a prepared dataset this toolkit wrote "
                         f"({str(error).splitlines()[0]}); --force replaces only those: give a new or empty folder") from None
    if not force:
        raise ValueError(f"{out} is already a prepared dataset; pass --force to prepare it again")
    listed = {shard["file"] for split in data.manifest["splits"].values() for shard in split["shards"]}
    others = sorted(names - set(_OURS)) + sorted(
        str(path.relative_to(out)) for split in SPLITS if (out / split).is_dir()
        for path in (out / split).rglob("*") if str(path.relative_to(out)) not in listed
    )
    if others:
        raise ValueError(f"--out {out} is a prepared dataset but also holds {others[0]}, which this toolkit did not "
                         "write and --force would delete: move it out first, or give a new or empty folder")


def _load_tokenizer(path: str | Path):
    return _checked_tokenizer(load_tokenizer_folder(path, f"--tokenizer {path}"), f"--tokenizer {path}")


def _checked_tokenizer(tok, what: str):
    if getattr(tok, "backend_tokenizer", None) is None or tok.eos_token_id is None:
        raise ValueError(f"{what}: a fast tokenizer with an eos token is needed; this one has {'no eos token' if getattr(tok, 'backend_tokenizer', None) is not None else 'no fast (Rust) backend'}")
    return tok
