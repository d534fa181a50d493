"""Long documents are tokenised in pieces (data/pieces.py): the same tokens as the whole document,
for the BPE that `prepare` trains and for a Llama-3-style split regex, on text Hypothesis varies;
the BPE trained on pieces is the BPE trained on the whole; and `prepare` writes the same files
whether a document comes in pieces or whole."""

import json

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from mot_transition.data.pieces import MAX_PIECES, pieces
from mot_transition.data.tokenizer import train_bpe_tokenizer

PROPERTY = settings(max_examples=300, deadline=None, derandomize=True, database=None,
                    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow, HealthCheck.filter_too_much])

# what a pre-tokenizer regex tells apart: letters (several scripts, both cases), digits, punctuation,
# contractions, and every kind of whitespace run, Unicode ones and control characters among them
ATOMS = st.sampled_from([
    "a", "Z", "é", "ß", "Ω", "и", "中", "文", "ا", "7", "42", "١", "'", "'s", "'ll", "'T", ".", ",", "#", "()", "->", "😀",
    " ", "  ", "\n", "\n\n", "\t", "\r\n", " \n", "\n ", "\u00a0", "\u3000", "\u2028", "\x0b", "\x1c", "\x85", "_", "-",
])
TEXT = st.lists(st.one_of(ATOMS, ATOMS.map(" {}".format), st.text(max_size=3)), min_size=1, max_size=80).map("".join)
LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                r"|\s*[\r\n]+|\s+(?!\S)|\s+")
CORPUS = [open(__import__("argparse").__file__).read()[:30_000], "naïve café 中文 ١٢٣ it's  \t\n\n  x\u00a0y"]


def rule_cuts_only(text: str, parts: list[str], size: int) -> bool:
    """Every cut is a rule cut (a space after a non-whitespace character), none a forced one."""
    position = 0
    for part in parts[:-1]:
        position += len(part)
        if not (text[position] == " " and not text[position - 1].isspace()):
            return False
    return True


@pytest.fixture(scope="module")
def gpt2_bpe():
    return train_bpe_tokenizer(CORPUS, 400).backend_tokenizer


@pytest.fixture(scope="module")
def llama3_style_bpe():
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(LLAMA3_SPLIT), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tokenizer.train_from_iterator(CORPUS, trainer=trainer)
    return tokenizer


def ids(tokenizer, text: str) -> list[int]:
    return tokenizer.encode(text, add_special_tokens=False).ids


@PROPERTY
@given(text=TEXT, size=st.integers(2, 24))
def test_pieces_put_the_text_back_within_the_size_cut_only_before_a_space(text, size):
    parts = list(pieces(text, size))
    assert "".join(parts) == text and (all(parts) or parts == [""])
    assert all(len(p) <= MAX_PIECES * size for p in parts)
    assert len(parts) == 1 or all(len(p) > size // 2 - 1 for p in parts[:-1])
    if len(text) <= size:
        assert parts == [text]


@PROPERTY
@given(text=TEXT, size=st.integers(2, 10))
def test_tokens_of_the_pieces_are_the_tokens_of_the_whole_text(gpt2_bpe, llama3_style_bpe, text, size):
    parts = list(pieces(text, size))
    assume(len(parts) > 1 and rule_cuts_only(text, parts, size))
    for tokenizer in (gpt2_bpe, llama3_style_bpe):
        assert sum((ids(tokenizer, p) for p in parts), []) == ids(tokenizer, text)


def test_a_cut_anywhere_else_would_change_the_tokens(gpt2_bpe):
    """The property above is not vacuous: a cut that breaks the rule (inside a word, or after a
    space that follows whitespace) changes the tokens of this text."""
    text = "the parser parses:\n        return args"
    for cut in (text.index("rser"), text.index("\n") + 1):
        assert ids(gpt2_bpe, text[:cut]) + ids(gpt2_bpe, text[cut:]) != ids(gpt2_bpe, text)


def test_the_bpe_trained_on_pieces_is_the_bpe_trained_on_the_whole_documents():
    whole = train_bpe_tokenizer(CORPUS, 500).backend_tokenizer.to_str()
    cut = train_bpe_tokenizer([p for document in CORPUS for p in pieces(document, 300)], 500).backend_tokenizer.to_str()
    assert json.loads(cut)["model"] == json.loads(whole)["model"]


def test_prepare_writes_the_same_files_for_long_documents_in_pieces_or_whole(tmp_path):
    """Four documents of 7-30 KB, which prepare cuts into pieces of about 200 characters with
    batch_bytes=3200 (pieces of 1/16 of it; for the trained BPE's sample and for tokenising), against
    batch_bytes larger than any document (never cut): the same bytes. Shards of 500 tokens: a document's pieces never
    close a shard before the document ends, so each shard holds whole documents either way."""
    from mot_transition.data.prepare import prepare
    from mot_transition.data.shards import PreparedData

    (tmp_path / "src").mkdir()
    for i, text in enumerate([CORPUS[0], CORPUS[0][7_000:14_000] + CORPUS[1], CORPUS[0][::-1], CORPUS[1] * 300]):
        (tmp_path / "src" / f"doc{i}.txt").write_text(text)
    for name, batch in (("pieces", 3200), ("whole", 1_000_000)):
        prepare([tmp_path / "src"], tmp_path / name, vocab_size=300, batch_bytes=batch, shard_tokens=500, heldout_fraction=0.3)
    files = lambda d: {p.relative_to(d): p.read_bytes() for p in sorted(d.rglob("*")) if p.is_file()}  # noqa: E731
    assert files(tmp_path / "pieces") == files(tmp_path / "whole")
    data = PreparedData(tmp_path / "pieces")
    assert data.train.documents + data.heldout.documents == 4
    assert all(shard["documents"] == 1 for split in ("train", "heldout") for shard in data.manifest["splits"][split]["shards"])
