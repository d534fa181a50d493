"""The data stage: corpora, tokenizers, packed sequences and batches."""

from mot_transition.data.batches import (
    TrainBatches,
    heldout_batches,
    pack,
    prepare_data,
    tokenize_documents,
    unigram_entropy,
)
from mot_transition.data.corpus import TINY_MAX_BYTES, Corpus, load_corpus
from mot_transition.data.tokenizer import EOS_TOKEN, cache_root, load_tokenizer, train_tokenizer

__all__ = [
    "EOS_TOKEN",
    "TINY_MAX_BYTES",
    "Corpus",
    "TrainBatches",
    "cache_root",
    "heldout_batches",
    "load_corpus",
    "load_tokenizer",
    "pack",
    "prepare_data",
    "tokenize_documents",
    "train_tokenizer",
    "unigram_entropy",
]
