"""The prepared token format (docs/design.md §11): its shard writer and its reader.

    DIR/manifest.json        written last, atomically: no manifest, no dataset
    DIR/tokenizer/           loadable with AutoTokenizer.from_pretrained
    DIR/train/000000.bin     raw little-endian token ids, uint16 (vocabulary <= 65,536) or uint32;
    DIR/heldout/000000.bin   every document's ids followed by the eos id; documents never span shards

`PreparedData(DIR)` checks the manifest and the size of every shard against it before it maps
anything, so a killed or damaged preparation is refused, not read.
"""

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from mot_transition.data.corpus import SPLITS
from mot_transition.jsonfiles import read_json_object

FORMAT = "mot-transition prepared tokens"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
DTYPES = {"uint16": np.dtype("<u2"), "uint32": np.dtype("<u4")}


def dtype_for(vocab_size: int) -> str:
    """uint16 when every id fits in 16 bits (at most 65,536 ids), else uint32."""
    return "uint16" if vocab_size <= 2**16 else "uint32"


class ShardWriter:
    """Appends documents' token ids to DIR/SPLIT/NNNNNN.bin; a shard is closed after the document
    that brings it to at least `shard_tokens` tokens. `shards` lists the closed shards."""

    def __init__(self, root: Path, split: str, dtype: str, shard_tokens: int):
        self.root, self.split, self.dtype, self.shard_tokens = Path(root), split, DTYPES[dtype], shard_tokens
        (self.root / split).mkdir(parents=True, exist_ok=True)
        self.shards: list[dict] = []
        self._file, self._tokens, self._documents = None, 0, 0

    def write(self, ids: np.ndarray, ends: np.ndarray) -> None:
        """Append documents: `ids` holds them one after another, each followed by its eos id, and
        document i ends (exclusive) at `ends[i]`. Ids after the last end begin a document that the
        next call goes on with (a long document comes in pieces): the shard stays open until it ends."""
        position, first = 0, 0
        while first < len(ends):
            # the first document whose end brings the open shard to shard_tokens
            last = int(np.searchsorted(ends, position + self.shard_tokens - self._tokens, side="left"))
            last = min(last, len(ends) - 1)
            self._append(ids[position : ends[last]], last - first + 1)
            position, first = int(ends[last]), last + 1
        if position < len(ids):
            self._append(ids[position:], 0, ends_a_document=False)

    def _append(self, ids: np.ndarray, documents: int, ends_a_document: bool = True) -> None:
        if self._file is None:
            self._name = f"{self.split}/{len(self.shards):06d}.bin"
            self._file = open(self.root / self._name, "wb")
        self._file.write(np.ascontiguousarray(ids, dtype=self.dtype).tobytes())
        self._tokens += int(ids.size)
        self._documents += documents
        if self._tokens >= self.shard_tokens and ends_a_document:
            self.close()

    def close(self) -> None:
        if self._file is None:
            return
        self._file.flush()
        os.fsync(self._file.fileno())  # on disk before the manifest that names it (written, fsynced, last)
        self._file.close()
        self.shards.append({"file": self._name, "tokens": self._tokens, "documents": self._documents})
        self._file, self._tokens, self._documents = None, 0, 0

    @property
    def tokens(self) -> int:
        return sum(s["tokens"] for s in self.shards) + self._tokens

    @property
    def documents(self) -> int:
        return sum(s["documents"] for s in self.shards) + self._documents


@dataclass
class Split:
    """One split of a prepared corpus: its shards mapped read-only, read as one token stream."""

    name: str
    shards: list[np.memmap]
    documents: int

    @property
    def tokens(self) -> int:
        return sum(s.shape[0] for s in self.shards)

    def read(self, start: int, stop: int) -> np.ndarray:
        """Tokens [start, stop) of the split's stream (the shards one after another), as int64."""
        if not 0 <= start <= stop <= self.tokens:
            raise ValueError(f"token range [{start}, {stop}) is outside the {self.name} split's {self.tokens} tokens")
        pieces, offset = [], 0
        for shard in self.shards:
            lo, hi = max(start - offset, 0), min(stop - offset, shard.shape[0])
            if lo < hi:
                pieces.append(np.asarray(shard[lo:hi], dtype=np.int64))
            offset += shard.shape[0]
        return np.concatenate(pieces) if pieces else np.empty(0, dtype=np.int64)


class PackedSequences:
    """A prepared split cut into rows of `seq_len` tokens, as `pack` cuts an in-memory stream (the
    tokens after the last whole row dropped), read from the memory-mapped shards only when rows
    are asked for: `rows[indices]` and `rows[a:b]` give int64 tensors of shape (n, seq_len). What
    `TrainBatches`, `heldout_batches` and `evaluate` take in place of an (N, seq_len) tensor."""

    def __init__(self, split: Split, seq_len: int):
        if seq_len < 1:
            raise ValueError(f"seq_len must be positive, got {seq_len}")
        rows = split.tokens // seq_len
        if rows == 0:
            raise ValueError(f"the {split.name} split has {split.tokens} tokens, fewer than one sequence of seq_len={seq_len}")
        self.split, self.seq_len = split, seq_len
        self.shape = torch.Size((rows, seq_len))

    def dim(self) -> int:
        return 2

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, index) -> torch.Tensor:
        S = self.seq_len
        if isinstance(index, slice):
            start, stop, step = index.indices(self.shape[0])
            if step == 1:
                stop = max(start, stop)
                return torch.from_numpy(self.split.read(start * S, stop * S)).reshape(stop - start, S)
            index = list(range(start, stop, step))
        rows = torch.as_tensor(index, dtype=torch.int64).reshape(-1).tolist()
        if any(not 0 <= r < self.shape[0] for r in rows):
            raise IndexError(f"row index out of range for {self.shape[0]} sequences")
        if not rows:
            return torch.empty(0, S, dtype=torch.int64)
        return torch.from_numpy(np.stack([self.split.read(r * S, (r + 1) * S) for r in rows]))

    def token_counts(self, vocab_size: int, max_tokens: int = 1 << 27) -> torch.Tensor:
        """How often each id occurs in the first `max_tokens` tokens of the rows (all of a corpus of
        up to 134M tokens), read in chunks: memory stays that of one chunk."""
        total = min(self.shape[0] * self.seq_len, max_tokens)
        counts = np.zeros(vocab_size, dtype=np.int64)
        for start in range(0, total, 1 << 24):
            chunk = self.split.read(start, min(total, start + (1 << 24)))
            if chunk.size and (chunk.min() < 0 or chunk.max() >= vocab_size):
                raise ValueError(f"the {self.split.name} split holds token ids outside [0, vocab_size={vocab_size})")
            counts += np.bincount(chunk, minlength=vocab_size)
        return torch.from_numpy(counts)


class PreparedData:
    """A prepared corpus directory, checked: `PreparedData(DIR).train.read(0, 1024)`."""

    def __init__(self, directory: str | Path):
        self.directory = Path(directory)
        manifest_path = self.directory / MANIFEST
        if not manifest_path.is_file():
            raise ValueError(
                f"{self.directory} is not a prepared dataset: it has no {MANIFEST} "
                f"(a prepare that did not finish leaves none; run it again)"
            )
        self.manifest = read_json_object(manifest_path)
        self._check_header(manifest_path)
        if not (self.directory / "tokenizer").is_dir():
            raise ValueError(f"{self.directory} is damaged: it has a manifest but no tokenizer/ folder; prepare it again")
        self.dtype, self.eos_id = self.manifest["dtype"], self.manifest["eos_id"]
        self.vocab_size = self.manifest["vocab_size"]
        self.splits = {name: self._open_split(name, manifest_path) for name in SPLITS}

    @property
    def name(self) -> str:
        return f"prepared corpus {self.directory}"

    @property
    def train(self) -> Split:
        return self.splits["train"]

    @property
    def heldout(self) -> Split:
        return self.splits["heldout"]

    def tokenizer(self):
        from mot_transition.checks import load_tokenizer_folder

        return load_tokenizer_folder(self.directory / "tokenizer", f"the prepared corpus {self.directory}")

    def _check_header(self, path: Path) -> None:
        m = self.manifest
        if m.get("format") != FORMAT or m.get("format_version") != FORMAT_VERSION:
            raise ValueError(
                f"{path} is not a {FORMAT!r} manifest of version {FORMAT_VERSION} "
                f"(format {m.get('format')!r}, version {m.get('format_version')!r})"
            )
        if m.get("dtype") not in DTYPES:
            raise ValueError(f"{path}: dtype {m.get('dtype')!r} is not one of {', '.join(DTYPES)}")
        for field in ("eos_id", "vocab_size"):
            if not _count(m.get(field)):
                raise ValueError(f"{path}: {field} must be a non-negative integer, got {m.get(field)!r}")
        if m["dtype"] != dtype_for(m["vocab_size"]) or m["eos_id"] >= m["vocab_size"]:
            raise ValueError(f"{path}: dtype {m['dtype']} and eos id {m['eos_id']} do not fit vocab_size {m['vocab_size']}")
        if not isinstance(m.get("splits"), dict) or set(m["splits"]) != set(SPLITS):
            raise ValueError(f"{path}: 'splits' must hold exactly {' and '.join(SPLITS)}")

    def _open_split(self, name: str, path: Path) -> Split:
        entry = self.manifest["splits"][name]
        shards = entry.get("shards") if isinstance(entry, dict) else None
        if not isinstance(shards, list) or not shards:
            raise ValueError(f"{path}: split {name!r} lists no shards")
        itemsize, maps, documents = DTYPES[self.dtype].itemsize, [], 0
        for shard in shards:
            if not isinstance(shard, dict) or not isinstance(shard.get("file"), str) or not all(
                _count(shard.get(k)) and shard[k] > 0 for k in ("tokens", "documents")
            ):
                raise ValueError(f"{path}: split {name!r} has a malformed shard entry {shard!r}")
            file = self.directory / shard["file"]
            if Path(shard["file"]).is_absolute() or ".." in Path(shard["file"]).parts or not file.is_file():
                raise ValueError(f"{self.directory}: shard {shard['file']} listed in the manifest is missing")
            size = file.stat().st_size
            if size != shard["tokens"] * itemsize:
                raise ValueError(
                    f"{file} has {size} bytes, the manifest says {shard['tokens']} {self.dtype} tokens "
                    f"({shard['tokens'] * itemsize} bytes): the dataset is damaged; prepare it again"
                )
            maps.append(np.memmap(file, dtype=DTYPES[self.dtype], mode="r"))
            documents += shard["documents"]
        if entry.get("documents") != documents or entry.get("tokens") != sum(s["tokens"] for s in shards):
            raise ValueError(f"{path}: split {name!r}'s totals do not match its shards")
        return Split(name, maps, documents)


def _count(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0
