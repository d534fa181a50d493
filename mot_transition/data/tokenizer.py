"""Byte-level BPE tokenizers trained on a corpus's train split, cached by corpus fingerprint.

Byte-level means every string has an encoding (no unknown token) and decode(encode(text)) == text.
The single special token `<|endoftext|>` ends documents and also serves as bos and pad.
"""

import json
import os
import tempfile
from pathlib import Path
from typing import Iterable

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

from mot_transition.data.corpus import Corpus
from mot_transition.destinations import new_file_mode
from mot_transition.jsonfiles import write_json

EOS_TOKEN = "<|endoftext|>"
CACHE_ENV = "MOT_TRANSITION_CACHE"


def cache_root() -> Path:
    """The data stage's cache folder: $MOT_TRANSITION_CACHE, else ~/.cache/mot-transition."""
    env = os.environ.get(CACHE_ENV)
    return Path(env).expanduser() if env else Path.home() / ".cache" / "mot-transition"


def train_tokenizer(
    corpus: Corpus, vocab_size: int, cache_dir: Path | None = None
) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer of `vocab_size` tokens trained on `corpus.train`.

    The result is cached as `cache_dir / f"{corpus.fingerprint}-{vocab_size}" / "tokenizer.json"`
    (default `cache_dir`: the cache root's `tokenizers` folder), so a second call only reads it.
    """
    check_vocab_size(vocab_size)
    cache_dir = Path(cache_dir) if cache_dir is not None else cache_root() / "tokenizers"
    path = cache_dir / f"{corpus.fingerprint}-{vocab_size}" / "tokenizer.json"
    if not path.exists():
        tokenizer = _train_bpe(corpus.train, vocab_size)
        _save_atomically(tokenizer, path)
    return load_tokenizer(path)


def train_bpe_tokenizer(documents: Iterable[str], vocab_size: int) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer of `vocab_size` tokens trained on `documents`, not cached (the
    `prepare` command trains on a bounded sample of a corpus this way)."""
    check_vocab_size(vocab_size)
    return _wrap(_train_bpe(documents, vocab_size))


def check_vocab_size(vocab_size: int) -> None:
    """256 bytes and the eos token at least; at most 2^20 (options.VOCAB_SIZE says why)."""
    from mot_transition.options import VOCAB_SIZE

    VOCAB_SIZE.check("vocab_size", vocab_size)


def load_tokenizer(path: Path) -> PreTrainedTokenizerFast:
    """Wrap a `tokenizer.json` written by `train_tokenizer` as a transformers tokenizer."""
    if not Path(path).is_file():
        raise FileNotFoundError(f"no tokenizer file at {path}; train one with train_tokenizer()")
    return _wrap(Tokenizer.from_file(str(path)))


def _wrap(tokenizer: Tokenizer) -> PreTrainedTokenizerFast:
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token=EOS_TOKEN,
        eos_token=EOS_TOKEN,
        pad_token=EOS_TOKEN,
        clean_up_tokenization_spaces=False,  # decode gives back the exact text, spaces before punctuation too
    )


def ready_for_generation(directory: Path, context: int) -> None:
    """Make the tokenizer saved in `directory` ready for generation as saved, so that `pipeline` and
    batched `generate` need no adjustment: left padding (a decoder continues from the last real
    token), `model_max_length` equal to the model's context (so that truncation works and long
    prompts are caught by the tokenizer, not by the model), and a pad token (the eos token when
    there is none). Edits `tokenizer_config.json` in place; a directory without one is left alone."""
    path = Path(directory) / "tokenizer_config.json"
    if not path.is_file():
        return
    config = json.loads(path.read_text())
    config.update(padding_side="left", model_max_length=int(context))
    if config.get("pad_token") is None and config.get("eos_token") is not None:
        config["pad_token"] = config["eos_token"]
    write_json(path, config, indent=2, ensure_ascii=False)


def _train_bpe(documents: Iterable[str], vocab_size: int) -> Tokenizer:
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.post_processor = processors.ByteLevel(add_prefix_space=False, trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    length = len(documents) if isinstance(documents, list) else None
    tokenizer.train_from_iterator(documents, trainer=trainer, length=length)
    return tokenizer


def _save_atomically(tokenizer: Tokenizer, path: Path) -> None:
    """Write, then rename: a process reading the cache never sees half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tokenizer-", suffix=".json")
    os.close(fd)
    try:
        tokenizer.save(tmp)
        os.chmod(tmp, new_file_mode())  # mkstemp makes files private; a cache is for every process of the user
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
