"""The data stage: corpora, tokenizers, packed sequences and batches.

Training reads prepared corpora only (`prepare.prepare`, `shards.PreparedData`; a recipe's other
sources are prepared into the cache by `cached.cached_corpus`). `load_corpus`, `train_tokenizer`,
`tokenize_documents` and `pack` do the same steps in memory, for small corpora in a notebook.
"""

from mot_transition.data.batches import (
    ShuffledOrder,
    TrainBatches,
    heldout_batches,
    pack,
    tokenize_documents,
    unigram_entropy,
)
from mot_transition.data.corpus import TINY_MAX_BYTES, Corpus, load_corpus
from mot_transition.data.tokenizer import EOS_TOKEN, cache_root, load_tokenizer, train_tokenizer

__all__ = [
    "EOS_TOKEN",
    "TINY_MAX_BYTES",
    "Corpus",
    "ShuffledOrder",
    "TrainBatches",
    "cache_root",
    "heldout_batches",
    "load_corpus",
    "load_tokenizer",
    "pack",
    "tokenize_documents",
    "train_tokenizer",
    "unigram_entropy",
]
