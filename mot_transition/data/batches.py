"""Token streams, packed sequences and the batches a trainer and an evaluator read.

Documents are tokenised, each followed by `<|endoftext|>`, concatenated into one stream and cut
into rows of `seq_len` tokens. A row is both input and label: the model shifts labels itself.
"""

import hashlib
import math
import os
import tempfile
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from mot_transition.data.corpus import Corpus
from mot_transition.data.tokenizer import cache_root


def tokenize_documents(tokenizer, documents: list[str]) -> torch.Tensor:
    """One int64 stream: every document's token ids followed by the eos id."""
    if getattr(tokenizer, "backend_tokenizer", None) is None or tokenizer.eos_token_id is None:
        raise ValueError("tokenize_documents needs a fast tokenizer with an eos token, as train_tokenizer() gives")
    if not documents:
        return torch.empty(0, dtype=torch.int64)
    # the Rust tokenizer's batch encode, in parallel, without the offsets we do not need
    encodings = tokenizer.backend_tokenizer.encode_batch_fast(documents, add_special_tokens=False)
    eos = tokenizer.eos_token_id
    return torch.from_numpy(np.concatenate([np.array(e.ids + [eos], dtype=np.int64) for e in encodings]))


def pack(stream: torch.Tensor, seq_len: int) -> torch.Tensor:
    """Cut a 1-D stream into (N, seq_len) rows; the tokens left over after the last row are dropped."""
    if stream.dim() != 1:
        raise ValueError(f"pack() takes a 1-D token stream, got shape {tuple(stream.shape)}")
    if seq_len <= 0:
        raise ValueError(f"seq_len must be positive, got {seq_len}")
    n = stream.numel() // seq_len
    if n == 0:
        raise ValueError(f"the stream has {stream.numel()} tokens, fewer than one sequence of {seq_len}")
    return stream[: n * seq_len].reshape(n, seq_len).contiguous()


class TrainBatches:
    """A deterministic, resumable, endless stream of training batches over packed sequences.

    Each epoch visits the sequences in a fresh permutation drawn from (seed, epoch). A step takes
    the next `batch_size * world_size` rows of it (the global batch), of which rank r gets rows
    [r * batch_size, (r + 1) * batch_size). The rows left over at the end of an epoch are skipped,
    so every rank steps through the same number of batches.
    """

    def __init__(
        self, sequences: torch.Tensor, batch_size: int, seed: int, rank: int = 0, world_size: int = 1
    ):
        if sequences.dim() != 2:
            raise ValueError(f"sequences must have shape (N, seq_len), got {tuple(sequences.shape)}")
        if batch_size <= 0 or world_size <= 0:
            raise ValueError(f"batch_size and world_size must be positive, got {batch_size} and {world_size}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank must be in [0, world_size={world_size}), got {rank}")
        global_batch = batch_size * world_size
        if sequences.shape[0] < global_batch:
            raise ValueError(
                f"only {sequences.shape[0]} training sequences, fewer than one global batch of "
                f"{global_batch} (batch_size {batch_size} x world_size {world_size}); "
                f"use more data, a shorter seq_len or a smaller batch"
            )
        self.sequences = sequences
        self.batch_size = batch_size
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.batches_per_epoch = sequences.shape[0] // global_batch
        self.epoch = 0
        self.position = 0  # index of the next global batch within the epoch
        self._order_epoch, self._order = None, None

    def next_batch(self) -> torch.Tensor:
        """The next (batch_size, seq_len) int64 batch of this rank."""
        start = (self.position * self.world_size + self.rank) * self.batch_size
        rows = self._permutation()[start : start + self.batch_size]
        self.position += 1
        if self.position == self.batches_per_epoch:
            self.epoch, self.position = self.epoch + 1, 0
        return self.sequences[rows].to(torch.int64)

    def __iter__(self):
        return self

    def __next__(self) -> torch.Tensor:
        return self.next_batch()

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "position": self.position}

    def load_state_dict(self, state: dict[str, int]) -> None:
        epoch, position = state.get("epoch"), state.get("position")
        if not isinstance(epoch, int) or not isinstance(position, int) or epoch < 0:
            raise ValueError(f"a TrainBatches state needs integers 'epoch' >= 0 and 'position', got {state}")
        if not 0 <= position < self.batches_per_epoch:
            raise ValueError(
                f"batch position {position} is outside this epoch of {self.batches_per_epoch} batches; "
                f"the state was saved with other data or another global batch size"
            )
        self.epoch, self.position = epoch, position

    def _permutation(self) -> torch.Tensor:
        if self._order_epoch != self.epoch:
            # one generator per (seed, epoch): epoch e's order does not depend on how we got there
            key = hashlib.sha256(f"{self.seed}:{self.epoch}".encode()).digest()
            generator = torch.Generator().manual_seed(int.from_bytes(key[:8], "big") >> 1)
            self._order = torch.randperm(self.sequences.shape[0], generator=generator)
            self._order_epoch = self.epoch
        return self._order


def heldout_batches(sequences: torch.Tensor, batch_size: int, num_batches: int) -> list[torch.Tensor]:
    """The first `num_batches` batches of the held-out sequences, in order: the same every run."""
    if batch_size <= 0 or num_batches <= 0:
        raise ValueError(f"batch_size and num_batches must be positive, got {batch_size} and {num_batches}")
    available = sequences.shape[0] // batch_size
    if available < num_batches:
        raise ValueError(
            f"the held-out split has {sequences.shape[0]} sequences of {sequences.shape[1]} tokens, "
            f"{available} batches of {batch_size}; {num_batches} were asked for: "
            f"ask for fewer batches, a smaller batch, or hold out more data"
        )
    return [sequences[i * batch_size : (i + 1) * batch_size].clone() for i in range(num_batches)]


def unigram_entropy(stream_train: torch.Tensor, stream_heldout: torch.Tensor, vocab_size: int) -> float:
    """Cross-entropy, nats/token, of held-out tokens under the train split's add-one unigram model.

    The loss of a model that ignores context: a trained language model must beat it. The train
    side may be the rows of a prepared corpus (`PackedSequences`): its first 134M tokens are counted.
    """
    heldout = stream_heldout.reshape(-1)
    if heldout.numel() == 0:
        raise ValueError("the held-out stream is empty")
    if heldout.min() < 0 or heldout.max() >= vocab_size:
        raise ValueError(f"the held-out stream holds token ids outside [0, vocab_size={vocab_size})")
    if hasattr(stream_train, "token_counts"):  # rows of a prepared corpus on disk: counted in chunks (and checked)
        counts = stream_train.token_counts(vocab_size)
    else:
        train = stream_train.reshape(-1)
        if train.numel() and (train.min() < 0 or train.max() >= vocab_size):
            raise ValueError(f"the train stream holds token ids outside [0, vocab_size={vocab_size})")
        counts = torch.bincount(train, minlength=vocab_size)
    counts = counts.double() + 1.0
    log_probs = counts.log() - math.log(counts.sum().item())
    return -log_probs[heldout].mean().item()


def prepare_data(
    corpus: Corpus, tokenizer, seq_len: int, *, cache_dir: Path | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """(train sequences, held-out sequences), each (N, seq_len) int64, cached as .safetensors.

    The cache key is the corpus fingerprint, a hash of the tokenizer and `seq_len`; the default
    `cache_dir` is the cache root's `packed` folder.
    """
    cache_dir = Path(cache_dir) if cache_dir is not None else cache_root() / "packed"
    path = cache_dir / f"{corpus.fingerprint}-{tokenizer_hash(tokenizer)}-{seq_len}.safetensors"
    if path.exists():
        tensors = load_file(path)
        return tensors["train"], tensors["heldout"]

    splits = {}
    for name, documents in (("train", corpus.train), ("heldout", corpus.heldout)):
        stream = tokenize_documents(tokenizer, documents)
        if stream.numel() < seq_len:
            raise ValueError(
                f"the {name} split of {corpus.name!r} has {stream.numel()} tokens, fewer than one "
                f"sequence of seq_len={seq_len}; use more data or a shorter seq_len"
            )
        splits[name] = pack(stream, seq_len)

    cache_dir.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=cache_dir, prefix=".packed-", suffix=".safetensors")
    os.close(fd)
    try:
        metadata = {"corpus": corpus.name, "fingerprint": corpus.fingerprint, "seq_len": str(seq_len)}
        save_file(splits, tmp, metadata=metadata)
        os.chmod(tmp, 0o644)  # mkstemp makes files private; a cache is for every process of the user
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return splits["train"], splits["heldout"]


def tokenizer_hash(tokenizer) -> str:
    """16 hex digits naming the tokenizer's whole pipeline (vocabulary, merges, pre-tokenizer)."""
    return hashlib.sha256(tokenizer.backend_tokenizer.to_str().encode("utf-8")).hexdigest()[:16]
