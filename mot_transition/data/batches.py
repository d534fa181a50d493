"""Token streams, packed sequences and the batches a trainer and an evaluator read.

Documents are tokenised, each followed by `<|endoftext|>`, concatenated into one stream and cut
into rows of `seq_len` tokens. A row is both input and label: the model shifts labels itself.
"""

import hashlib
import math

import numpy as np
import torch


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

    Each epoch visits the sequences in a fresh permutation keyed by (seed, epoch). A call takes
    the next `batch_size * world_size` rows of it (one micro-batch of every process), of which rank
    r gets rows [r * batch_size, (r + 1) * batch_size); an optimizer step is `accumulation` calls,
    so a step's global batch is the same consecutive rows of the permutation whatever the layout
    (processes x micro-batches). An epoch is a whole number of steps: the rows left over after the
    last whole global batch are skipped, so every rank steps through the same number of batches and
    the epoch ends where it would with any other layout of the same global batch.

    The permutation is computed, not stored (`ShuffledOrder`): a rank holds its own batch of row
    numbers at a time, whatever the number of sequences, and its state is (epoch, position, rows a
    call takes). A state saved at a step boundary loads into another layout of the same global
    batch: the position is converted by the rows it counts (resuming on another number of
    processes continues with the same global batches).
    """

    def __init__(
        self, sequences: torch.Tensor, batch_size: int, seed: int, rank: int = 0, world_size: int = 1, accumulation: int = 1
    ):
        if sequences.dim() != 2:
            raise ValueError(f"sequences must have shape (N, seq_len), got {tuple(sequences.shape)}")
        if batch_size <= 0 or world_size <= 0 or accumulation <= 0:
            raise ValueError(f"batch_size, world_size and accumulation must be positive, got {batch_size}, {world_size} and {accumulation}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank must be in [0, world_size={world_size}), got {rank}")
        global_batch = batch_size * world_size * accumulation
        if sequences.shape[0] < global_batch:
            layout = f"batch_size {batch_size} x world_size {world_size}" + (f" x accumulation {accumulation}" if accumulation > 1 else "")
            raise ValueError(
                f"only {sequences.shape[0]} training sequences, fewer than one global batch of "
                f"{global_batch} ({layout}); use more data, a shorter seq_len or a smaller batch"
            )
        self.sequences = sequences
        self.batch_size = batch_size
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.accumulation = accumulation
        self.rows = batch_size * world_size  # rows of the permutation one call takes
        self.batches_per_epoch = sequences.shape[0] // global_batch * accumulation
        self.legacy_epochs = False
        self.epoch = 0
        self.position = 0  # index of the next global batch within the epoch

    def next_batch(self) -> torch.Tensor:
        """The next (batch_size, seq_len) int64 batch of this rank."""
        start = (self.position * self.world_size + self.rank) * self.batch_size
        rows = ShuffledOrder(self.sequences.shape[0], self.seed, self.epoch)[start : start + self.batch_size]
        self.position += 1
        if self.position == self.batches_per_epoch:
            self.epoch, self.position = self.epoch + 1, 0
        return self.sequences[rows].to(torch.int64)

    def __iter__(self):
        return self

    def __next__(self) -> torch.Tensor:
        return self.next_batch()

    def state_dict(self) -> dict:
        state = {"epoch": self.epoch, "position": self.position, "order": ShuffledOrder.NAME}
        return state if self.legacy_epochs else {**state, "rows": self.rows}

    def load_state_dict(self, state: dict) -> None:
        if state.get("order") != ShuffledOrder.NAME:
            raise ValueError(
                f"the checkpoint's data position counts in another order of the training rows ({state.get('order', 'an in-memory random permutation')}) "
                f"than this version's ({ShuffledOrder.NAME}): it was written by an older mot-transition; finish it with that version"
            )
        epoch, position, rows = state.get("epoch"), state.get("position"), state.get("rows", self.rows)
        if not all(isinstance(v, int) for v in (epoch, position, rows)) or epoch < 0 or rows <= 0:
            raise ValueError(f"a TrainBatches state needs integers 'epoch' >= 0, 'position' and 'rows' > 0, got {state}")
        if "rows" not in state:
            # saved before epochs were whole steps, by this layout (the caller checks): keep that
            # run's epoch length, so that it goes on exactly as it would have
            self.legacy_epochs = True
            self.batches_per_epoch = self.sequences.shape[0] // self.rows
        if rows != self.rows:  # another layout of the global batch: the same rows consumed
            if position * rows % self.rows:
                raise ValueError(
                    f"batch position {position} x {rows} rows is not a whole number of this layout's {self.rows}-row "
                    f"batches; the state was saved in the middle of an optimizer step or with another global batch size"
                )
            position = position * rows // self.rows
        if not 0 <= position < self.batches_per_epoch:
            raise ValueError(
                f"batch position {position} is outside this epoch of {self.batches_per_epoch} batches; "
                f"the state was saved with other data or another global batch size"
            )
        self.epoch, self.position = epoch, position


class ShuffledOrder:
    """A pseudo-random permutation of range(n), keyed by (seed, epoch), computed for the positions
    asked for: `ShuffledOrder(n, seed, epoch)[a:b]` is an int64 tensor of b - a distinct row numbers,
    and the whole of it, [0:n], is every row exactly once. Memory is that of the slice, whatever n.

    A balanced Feistel network of 6 rounds over the 2h-bit numbers (4^h >= n, the smallest such h)
    is a bijection of [0, 4^h); the numbers it maps to n or beyond are mapped again until they fall
    below n (cycle walking: fewer than 4 turns on average, as 4^h < 4n), which keeps it a bijection
    of [0, n). The round function mixes the right half with a round key (SplitMix64's finaliser),
    the keys come from SHA-256 of (seed, epoch): the same on every machine.
    """

    NAME = "feistel-6-splitmix64"  # what a checkpoint's data position counts in
    ROUNDS = 6

    def __init__(self, n: int, seed: int, epoch: int):
        if n < 1:
            raise ValueError(f"a permutation needs at least one element, got n={n}")
        self.n = n
        self.half_bits = max(1, (max(n - 1, 1).bit_length() + 1) // 2)
        digest = hashlib.sha256(f"mot-transition order:{seed}:{epoch}".encode()).digest()
        self.keys = np.frombuffer(digest[: 8 * 4], dtype=">u8").astype(np.uint64).tolist()
        self.keys += [k ^ 0x9E3779B97F4A7C15 for k in self.keys[: self.ROUNDS - len(self.keys)]]

    def __getitem__(self, index: slice) -> torch.Tensor:
        start, stop, step = index.indices(self.n)
        if step != 1:
            raise ValueError("ShuffledOrder takes slices of step 1")
        x = np.arange(start, max(start, stop), dtype=np.uint64)
        todo = np.ones(x.shape, dtype=bool)
        while todo.any():
            x[todo] = self._feistel(x[todo])
            todo = x >= self.n
        return torch.from_numpy(x.astype(np.int64))

    def _feistel(self, x: np.ndarray) -> np.ndarray:
        h = np.uint64(self.half_bits)
        mask = np.uint64((1 << self.half_bits) - 1)
        left, right = x >> h, x & mask
        for key in self.keys[: self.ROUNDS]:
            left, right = right, left ^ (_mix(right ^ np.uint64(key)) & mask)
        return (left << h) | right


def _mix(z: np.ndarray) -> np.ndarray:
    """SplitMix64's finaliser: every output bit depends on every input bit (uint64, wrapping)."""
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))


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


def tokenizer_hash(tokenizer) -> str:
    """16 hex digits naming the tokenizer's whole pipeline (vocabulary, merges, pre-tokenizer)."""
    return hashlib.sha256(tokenizer.backend_tokenizer.to_str().encode("utf-8")).hexdigest()[:16]
