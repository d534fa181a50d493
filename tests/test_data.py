"""The data stage: corpus split, tokenizer, packing, batches and the unigram baseline."""

import importlib.util
import json
import math
import sysconfig
from pathlib import Path

import pytest
import torch
import transformers

import mot_transition.data.tokenizer as tokenizer_module
from mot_transition.data import (
    EOS_TOKEN,
    ShuffledOrder,
    TrainBatches,
    heldout_batches,
    load_corpus,
    pack,
    tokenize_documents,
    train_tokenizer,
    unigram_entropy,
)

HAS_PYARROW = importlib.util.find_spec("pyarrow") is not None
SMALL_STDLIB = 300_000  # bytes: a dozen files, enough for a quick tokenizer
SPLIT_STDLIB = 2_000_000  # bytes: about a hundred files, enough for the hash to hold out a few


@pytest.fixture(autouse=True)
def cache_in_tmp(tmp_path, monkeypatch):
    """No test writes to the user's real cache."""
    monkeypatch.setenv("MOT_TRANSITION_CACHE", str(tmp_path / "cache"))


@pytest.fixture(scope="module")
def small_corpus():
    return load_corpus(max_bytes=SMALL_STDLIB)


@pytest.fixture(scope="module")
def small_tokenizer(small_corpus, tmp_path_factory):
    return train_tokenizer(small_corpus, vocab_size=512, cache_dir=tmp_path_factory.mktemp("tokenizers"))


# ---------------------------------------------------------------------------------------------
# corpus


def test_stdlib_split_is_identical_on_every_load():
    first, again = load_corpus(max_bytes=SPLIT_STDLIB), load_corpus(max_bytes=SPLIT_STDLIB)
    assert again.train == first.train
    assert again.heldout == first.heldout
    assert again.fingerprint == first.fingerprint
    assert first.train and first.heldout
    assert not set(first.train) & set(first.heldout)


def test_stdlib_split_is_by_file_and_does_not_move_when_the_cap_grows():
    # every document of the capped corpus is (a prefix of) a file that stays in the same split
    # in the whole corpus: the split is decided per file, not by position or size
    capped, whole = load_corpus(max_bytes=SPLIT_STDLIB), load_corpus()
    for doc in capped.heldout:
        assert any(other.startswith(doc) for other in whole.heldout)
    for doc in capped.train:
        assert any(other.startswith(doc) for other in whole.train)
    assert whole.fingerprint != capped.fingerprint


def test_stdlib_holds_out_about_five_percent_of_files():
    corpus = load_corpus()
    n_files = len(corpus.train) + len(corpus.heldout)
    assert n_files > 300
    assert 0.02 < len(corpus.heldout) / n_files < 0.09


def test_stdlib_corpus_leaves_out_tests_idle_and_generated_tables():
    root = Path(sysconfig.get_paths()["stdlib"])
    excluded = [root / p for p in ("test/test_grammar.py", "idlelib/editor.py", "encodings/cp1252.py")]
    excluded = [p for p in excluded if p.is_file()]
    if not excluded:
        pytest.skip("this Python ships none of the files that the corpus leaves out")
    documents = set(load_corpus().train) | set(load_corpus().heldout)
    assert (root / "argparse.py").read_text(encoding="utf-8") in documents
    for path in excluded:
        assert path.read_text(encoding="utf-8") not in documents


def test_max_bytes_caps_the_corpus_size():
    corpus = load_corpus(max_bytes=50_000)
    assert sum(len(d.encode("utf-8")) for d in corpus.train + corpus.heldout) == 50_000


def test_single_text_file_holds_out_its_tail(tmp_path):
    text = "".join(f"line {i}: the quick brown fox\n" for i in range(200))
    (tmp_path / "book.txt").write_text(text, encoding="utf-8")
    corpus = load_corpus(tmp_path / "book.txt", heldout_fraction=0.1)
    assert corpus.name == "book.txt"
    assert corpus.train[0] + corpus.heldout[0] == text
    assert len(corpus.heldout[0]) == len(text) - int(len(text) * 0.9)


def test_folder_reads_every_utf8_file_recursively_and_splits_by_file(tmp_path):
    texts = {f"sub{i % 3}/doc{i:02d}.md": f"document {i}\n" * (i + 1) for i in range(40)}
    for relative, text in texts.items():
        (tmp_path / relative).parent.mkdir(exist_ok=True)
        (tmp_path / relative).write_text(text, encoding="utf-8")
    (tmp_path / "image.bin").write_bytes(bytes(range(256)))  # not UTF-8: skipped
    (tmp_path / ".hidden").mkdir()
    (tmp_path / ".hidden" / "notes.txt").write_text("secret\n")  # hidden: skipped
    corpus = load_corpus(tmp_path, heldout_fraction=0.2)
    assert sorted(corpus.train + corpus.heldout) == sorted(texts.values())
    assert corpus.train and corpus.heldout
    assert load_corpus(tmp_path, heldout_fraction=0.2).heldout == corpus.heldout


def test_a_few_documents_still_give_both_splits(tmp_path):
    for name in ("a.txt", "b.txt", "c.txt"):
        (tmp_path / name).write_text(f"the text of {name}\n", encoding="utf-8")
    corpus = load_corpus(tmp_path)
    assert len(corpus.train) == 2 and len(corpus.heldout) == 1


def test_identical_documents_are_kept_once(tmp_path):
    for name in ("a.txt", "copy/a.txt", "b.txt", "c.txt", "d.txt"):
        (tmp_path / name).parent.mkdir(exist_ok=True)
        (tmp_path / name).write_text("same text\n" if "a.txt" in name else f"{name}\n", encoding="utf-8")
    corpus = load_corpus(tmp_path)
    assert (corpus.train + corpus.heldout).count("same text\n") == 1
    assert len(corpus.train + corpus.heldout) == 4


def test_jsonl_documents_come_from_the_text_field(tmp_path):
    records = [{"id": i, "body": f"record number {i} " * 5} for i in range(30)]
    path = tmp_path / "data.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in records) + "\n\n", encoding="utf-8")
    corpus = load_corpus(path, text_field="body")
    assert sorted(corpus.train + corpus.heldout) == sorted(r["body"] for r in records)
    assert len(corpus.heldout) >= 1


def test_jsonl_line_without_the_field_is_a_clear_error(tmp_path):
    path = tmp_path / "data.jsonl"
    path.write_text('{"text": "fine"}\n{"content": "wrong field"}\n', encoding="utf-8")
    with pytest.raises(ValueError, match=r"line 2: no 'text' field"):
        load_corpus(path)


def test_missing_source_and_empty_folder_are_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_corpus(tmp_path / "nowhere.txt")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="has no text"):
        load_corpus(tmp_path / "empty")


@pytest.mark.skipif(HAS_PYARROW, reason="pyarrow is installed")
def test_parquet_without_pyarrow_says_how_to_install_it(tmp_path):
    (tmp_path / "data.parquet").write_bytes(b"PAR1")
    with pytest.raises(ValueError, match="pip install pyarrow"):
        load_corpus(tmp_path / "data.parquet")


@pytest.mark.skipif(not HAS_PYARROW, reason="pyarrow is not installed (pip install pyarrow)")
def test_parquet_documents_come_from_the_text_column(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    texts = [f"row {i} of the table" for i in range(20)]
    pq.write_table(pa.table({"text": texts, "n": list(range(20))}), tmp_path / "data.parquet")
    corpus = load_corpus(tmp_path / "data.parquet")
    assert sorted(corpus.train + corpus.heldout) == sorted(texts)


# ---------------------------------------------------------------------------------------------
# tokenizer

ROUND_TRIP_TEXTS = [
    "def f(x):\n    return x  + 1  # two spaces , before . punctuation\n",
    "\tTabs,\r\nCRLF lines and trailing spaces   ",
    "Unicode: héllo wörld, 日本語, emoji 🙂, math ∑x²",
    "",
]


def test_tokenizer_decode_inverts_encode(small_tokenizer):
    for text in ROUND_TRIP_TEXTS:
        assert small_tokenizer.decode(small_tokenizer.encode(text)) == text


def test_tokenizer_reloads_from_save_pretrained_with_the_same_ids(small_tokenizer, tmp_path):
    small_tokenizer.save_pretrained(tmp_path / "tok")
    reloaded = transformers.AutoTokenizer.from_pretrained(tmp_path / "tok")
    for text in ROUND_TRIP_TEXTS:
        assert reloaded.encode(text) == small_tokenizer.encode(text)
    assert reloaded.eos_token == reloaded.bos_token == reloaded.pad_token == EOS_TOKEN
    assert reloaded.eos_token_id == small_tokenizer.eos_token_id


def test_tokenizer_has_the_asked_vocab_and_adds_no_special_tokens(small_tokenizer):
    assert len(small_tokenizer) == 512
    assert small_tokenizer.eos_token_id == small_tokenizer.convert_tokens_to_ids(EOS_TOKEN)
    assert small_tokenizer("abc")["input_ids"] == small_tokenizer.encode("abc", add_special_tokens=False)


def test_tokenizer_cache_hit_does_not_retrain_and_gives_the_same_vocab(small_corpus, tmp_path, monkeypatch):
    first = train_tokenizer(small_corpus, vocab_size=300)
    cached = tmp_path / "cache" / "tokenizers" / f"{small_corpus.fingerprint}-300" / "tokenizer.json"
    assert cached.is_file()

    def no_training(*args, **kwargs):
        raise AssertionError("the cached tokenizer should have been used")

    monkeypatch.setattr(tokenizer_module, "_train_bpe", no_training)
    second = train_tokenizer(small_corpus, vocab_size=300)
    assert second.get_vocab() == first.get_vocab()


def test_tokenizer_training_is_deterministic(small_corpus, tmp_path):
    a = train_tokenizer(small_corpus, vocab_size=300, cache_dir=tmp_path / "a")
    b = train_tokenizer(small_corpus, vocab_size=300, cache_dir=tmp_path / "b")
    assert a.backend_tokenizer.to_str() == b.backend_tokenizer.to_str()


# ---------------------------------------------------------------------------------------------
# streams and packing


def test_tokenize_documents_ends_every_document_with_eos(small_tokenizer):
    docs = ["first document", "second\n  one"]
    stream = tokenize_documents(small_tokenizer, docs)
    eos = small_tokenizer.eos_token_id
    expected = small_tokenizer.encode(docs[0]) + [eos] + small_tokenizer.encode(docs[1]) + [eos]
    assert stream.dtype == torch.int64
    assert stream.tolist() == expected


def test_pack_cuts_rows_in_order_and_drops_the_remainder():
    packed = pack(torch.arange(11), seq_len=3)
    assert packed.tolist() == [[0, 1, 2], [3, 4, 5], [6, 7, 8]]
    with pytest.raises(ValueError, match="fewer than one sequence"):
        pack(torch.arange(2), seq_len=3)


# ---------------------------------------------------------------------------------------------
# batches


def numbered_sequences(n: int, seq_len: int = 4) -> torch.Tensor:
    """Row i holds i * seq_len ... : a row's first token names it."""
    return torch.arange(n * seq_len).reshape(n, seq_len)


def test_train_batches_resume_yields_the_same_batches_as_an_uninterrupted_stream():
    sequences = numbered_sequences(10)
    uninterrupted = TrainBatches(sequences, batch_size=3, seed=7)
    expected = [uninterrupted.next_batch() for _ in range(10)]  # crosses three epoch boundaries

    first = TrainBatches(sequences, batch_size=3, seed=7)
    got = [first.next_batch() for _ in range(4)]
    state = json.loads(json.dumps(first.state_dict()))
    resumed = TrainBatches(sequences, batch_size=3, seed=7)
    resumed.load_state_dict(state)
    got += [resumed.next_batch() for _ in range(6)]
    assert all(torch.equal(a, b) for a, b in zip(expected, got))


def test_train_batches_visit_distinct_rows_within_an_epoch_and_reshuffle_between_epochs():
    sequences = numbered_sequences(12)
    stream = TrainBatches(sequences, batch_size=4, seed=0)
    epochs = [torch.cat([stream.next_batch() for _ in range(3)])[:, 0].tolist() for _ in range(3)]
    for rows in epochs:
        assert sorted(rows) == sorted(sequences[:, 0].tolist())
    assert epochs[0] != epochs[1] != epochs[2]
    assert TrainBatches(sequences, batch_size=4, seed=1).next_batch()[:, 0].tolist() != epochs[0][:4]


def test_two_ranks_together_see_the_rows_of_one_process_with_the_doubled_batch():
    sequences = numbered_sequences(21)
    single = TrainBatches(sequences, batch_size=4, seed=3)
    ranks = [TrainBatches(sequences, batch_size=2, seed=3, rank=r, world_size=2) for r in range(2)]
    for _ in range(12):
        assert torch.equal(torch.cat([rank.next_batch() for rank in ranks]), single.next_batch())


@pytest.mark.parametrize("saved, loaded", [((4, 2, 1), (8, 1, 1)), ((4, 1, 2), (1, 2, 4)), ((1, 1, 8), (2, 2, 2))])
def test_a_position_saved_by_one_layout_of_the_global_batch_resumes_in_another(saved, loaded):
    # (micro-batch rows, processes, micro-batches per step): 8 rows a step in each; 45 rows make
    # 5 whole steps an epoch, so the 5 rows left over are skipped by every layout alike
    sequences = numbered_sequences(45)

    def steps(layout, count, state=None):
        rows, world, accumulation = layout
        ranks = [TrainBatches(sequences, rows, seed=3, rank=r, world_size=world, accumulation=accumulation) for r in range(world)]
        for rank in ranks:
            if state is not None:
                rank.load_state_dict(json.loads(json.dumps(state)))
        batches = [sorted(torch.cat([rank.next_batch() for _ in range(accumulation) for rank in ranks])[:, 0].tolist()) for _ in range(count)]
        return batches, ranks[0].state_dict()

    whole, _ = steps(saved, 13)  # crosses two epoch boundaries
    first, state = steps(saved, 4)
    rest, _ = steps(loaded, 9, state)
    assert first + rest == whole
    assert all(len(set(b)) == 8 for b in whole) and sorted(sum(whole[:5], [])) != list(range(45))


def test_a_position_inside_an_optimizer_step_does_not_load_into_another_layout():
    sequences = numbered_sequences(40)
    half_step = TrainBatches(sequences, 2, seed=0, accumulation=4)
    half_step.next_batch()
    with pytest.raises(ValueError, match="middle of an optimizer step"):
        TrainBatches(sequences, 8, seed=0).load_state_dict(half_step.state_dict())


def test_a_position_saved_before_epochs_were_whole_steps_keeps_its_epoch_length():
    # 10 rows, micro-batches of 3, 2 a step: the old epoch was 3 micro-batches, one step and a half
    sequences = numbered_sequences(10)
    old = TrainBatches(sequences, 3, seed=7, accumulation=2)
    old.load_state_dict({"epoch": 0, "position": 2, "order": ShuffledOrder.NAME})
    old.next_batch()
    assert old.state_dict() == {"epoch": 1, "position": 0, "order": ShuffledOrder.NAME}
    new = TrainBatches(sequences, 3, seed=7, accumulation=2)
    new.load_state_dict({"epoch": 0, "position": 0, "order": ShuffledOrder.NAME, "rows": 3})
    new.next_batch(), new.next_batch()
    assert new.state_dict()["epoch"] == 1


@pytest.mark.parametrize("n", [1, 2, 3, 5, 16, 17, 1000, 4099])
def test_shuffled_order_is_a_permutation_and_any_slice_of_it_is_the_same_numbers(n):
    whole = ShuffledOrder(n, seed=5, epoch=2)[0:n]
    assert sorted(whole.tolist()) == list(range(n))
    for a, b in [(0, 1), (n // 3, n // 2 + 1), (n - 1, n)]:
        assert torch.equal(ShuffledOrder(n, seed=5, epoch=2)[a:b], whole[a:b])


def test_shuffled_order_differs_by_seed_and_epoch_and_looks_uniform():
    n, epochs = 1000, 200
    orders = torch.stack([ShuffledOrder(n, seed=0, epoch=e)[0:n] for e in range(epochs)]).double()
    assert ShuffledOrder(n, seed=1, epoch=0)[0:n].tolist() != orders[0].long().tolist()
    assert len({tuple(o.long().tolist()[:8]) for o in orders}) == epochs
    # where each row lands, over 200 epochs: uniform over [0, n) has mean 499.5, sd 288.7 / sqrt(200) = 20.4
    position_means = orders.argsort(dim=1).double().mean(dim=0)
    assert (position_means - (n - 1) / 2).abs().max() < 5 * 20.4
    # consecutive positions are unrelated: the correlation of order[i] with order[i + 1]
    pairs = torch.stack([orders[:, :-1].reshape(-1), orders[:, 1:].reshape(-1)])
    assert torch.corrcoef(pairs)[0, 1].abs() < 0.02


class _HugeRows:
    """A billion rows of 16 tokens that exist only when read: a sampler that stored a permutation
    of them (8 GB) could not start."""

    shape = torch.Size((10**9, 16))

    def dim(self):
        return 2

    def __getitem__(self, rows):
        return torch.as_tensor(rows).reshape(-1, 1).repeat(1, 16)


def test_train_batches_hold_no_state_that_grows_with_the_number_of_rows():
    batches = TrainBatches(_HugeRows(), batch_size=4, seed=0, rank=1, world_size=2)
    first = batches.next_batch()
    assert first.shape == (4, 16) and len(set(first[:, 0].tolist())) == 4
    assert batches.state_dict() == {"epoch": 0, "position": 1, "order": ShuffledOrder.NAME, "rows": 8}


def test_a_data_position_in_another_order_is_refused():
    with pytest.raises(ValueError, match="older mot-transition"):
        TrainBatches(numbered_sequences(10), batch_size=3, seed=7).load_state_dict({"epoch": 0, "position": 1})


def test_train_batches_need_one_global_batch_of_sequences():
    with pytest.raises(ValueError, match="fewer than one global batch of 8"):
        TrainBatches(numbered_sequences(7), batch_size=4, seed=0, world_size=2)


def test_heldout_batches_are_the_first_rows_in_order_on_every_call():
    sequences = numbered_sequences(10)
    first, second = heldout_batches(sequences, 3, 3), heldout_batches(sequences, 3, 3)
    assert all(torch.equal(a, b) for a, b in zip(first, second))
    assert torch.equal(torch.cat(first), sequences[:9])
    with pytest.raises(ValueError, match="has 10 sequences"):
        heldout_batches(sequences, 3, 4)


# ---------------------------------------------------------------------------------------------
# unigram baseline


def test_unigram_entropy_of_a_uniform_stream_is_log_vocab():
    generator = torch.Generator().manual_seed(0)
    train = torch.randint(0, 64, (200_000,), generator=generator)
    heldout = torch.randint(0, 64, (50_000,), generator=generator)
    assert unigram_entropy(train, heldout, vocab_size=64) == pytest.approx(math.log(64), abs=0.01)


def test_unigram_entropy_uses_add_one_smoothed_train_counts():
    # counts + 1 = [3, 2, 1]: p = [1/2, 1/3, 1/6]
    value = unigram_entropy(torch.tensor([0, 0, 1]), torch.tensor([0, 2]), vocab_size=3)
    assert value == pytest.approx(-(math.log(1 / 2) + math.log(1 / 6)) / 2)
