"""Training on a corpus `mot-transition prepare` wrote (issue 10, item 2, first part): the rows are
read from the memory-mapped shards as they are needed, exactly the rows `pack` would cut, and a
run killed half-way resumes bit for bit."""

import argparse
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import interrupted_after
from mot_transition.data import pack, unigram_entropy
from mot_transition.data.prepare import prepare
from mot_transition.data.shards import PackedSequences, PreparedData
from mot_transition.train import latest_checkpoint, recipe_from_dict, train


@pytest.fixture(scope="module")
def prepared(tmp_path_factory) -> Path:
    """A corpus of 40 documents in shards of at most 3,000 tokens (rows cross shard boundaries)."""
    root = tmp_path_factory.mktemp("prepared")
    text = Path(argparse.__file__).read_text()
    (root / "docs").mkdir()
    for i in range(40):
        (root / "docs" / f"doc{i:02d}.txt").write_text(text[i * 2000 : (i + 1) * 2000])
    return prepare([str(root / "docs")], root / "corpus", vocab_size=300, shard_tokens=3000, heldout_fraction=0.1)


def test_rows_are_the_rows_pack_cuts_from_the_split_stream(prepared):
    data = PreparedData(prepared)
    assert len(data.train.shards) > 2
    rows = PackedSequences(data.train, 32)
    expected = pack(torch.from_numpy(data.train.read(0, data.train.tokens)), 32)
    assert rows.shape == expected.shape and rows.dim() == 2
    assert torch.equal(rows[0:len(rows)], expected)
    picks = torch.tensor([5, 0, len(rows) - 1, 93])
    assert torch.equal(rows[picks], expected[picks]) and rows[picks].dtype == torch.int64
    assert torch.equal(rows[3:7], expected[3:7])
    heldout = PackedSequences(data.heldout, 32)
    assert unigram_entropy(rows, heldout[0:4], data.vocab_size) == unigram_entropy(expected, heldout[0:4], data.vocab_size)
    with pytest.raises(IndexError):
        rows[torch.tensor([len(rows)])]


def recipe(prepared: Path, **data):
    return recipe_from_dict({
        "name": "prepared", "seed": 3,
        "model": {"ffn_type": "mot", "n_embd": 32, "n_layer": 2, "n_head": 2, "n_expert": 4, "group_size": 4, "resid_pdrop": 0.1},
        "data": {"source": str(prepared), "seq_len": 32, "eval_batches": 2, "eval_batch_size": 4, **data},
        "optim": {"lr": 3e-3, "warmup_steps": 2},
        "train": {"steps": 6, "batch_size": 8, "micro_batch_size": 4, "eval_every": 3, "checkpoint_every": 3},
    })


def test_a_run_on_a_prepared_corpus_uses_its_tokenizer_and_resumes_bit_exactly(prepared, tmp_path):
    with pytest.warns(UserWarning, match=r"prepared corpus .*data\.vocab_size is ignored"):
        full = train(recipe(prepared, vocab_size=2048), tmp_path / "full", progress=False)
    tokenizer_vocab = PreparedData(prepared).vocab_size
    config = json.loads((full.checkpoint / "config.json").read_text())
    assert config["vocab_size"] == tokenizer_vocab and torch.isfinite(torch.tensor(full.eval_loss))

    with interrupted_after(4), pytest.raises(KeyboardInterrupt):
        train(recipe(prepared), tmp_path / "resumed", progress=False)
    assert latest_checkpoint(tmp_path / "resumed").name == "step-000003"
    resumed = train(recipe(prepared), tmp_path / "resumed", resume=True, progress=False)
    a, b = load_file(full.checkpoint / "model.safetensors"), load_file(resumed.checkpoint / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_a_damaged_prepared_corpus_is_one_line(prepared, tmp_path):
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(prepared, broken)
    shard = sorted((broken / "train").iterdir())[0]
    shard.write_bytes(shard.read_bytes()[:-2])
    with pytest.raises(ValueError) as error:
        train(recipe(broken), tmp_path / "run", progress=False)
    assert "\n" not in str(error.value) and shard.name in str(error.value)


def test_resume_refuses_a_prepared_corpus_whose_contents_changed_under_the_same_path(prepared, tmp_path):
    import shutil

    corpus = tmp_path / "corpus"
    shutil.copytree(prepared, corpus)
    raw = recipe(corpus)
    raw.train.steps, raw.train.checkpoint_every = 3, 3
    train(raw, tmp_path / "run", progress=False)
    state = json.loads((latest_checkpoint(tmp_path / "run") / "training_state.json").read_text())
    assert state["corpus"]["source_fingerprint"] == json.loads((corpus / "manifest.json").read_text())["source_fingerprint"]
    manifest = json.loads((corpus / "manifest.json").read_text())
    (corpus / "manifest.json").write_text(json.dumps({**manifest, "source_fingerprint": "0" * 16}))  # prepared again, other data
    raw.train.steps = 6
    with pytest.raises(ValueError, match=r"holds other data than the run"):
        train(raw, tmp_path / "run", resume=True, progress=False)


def test_a_folder_a_killed_prepare_left_is_refused_not_read_as_text(prepared, tmp_path):
    import shutil

    from mot_transition.data.prepare import INCOMPLETE

    unfinished = tmp_path / "unfinished"
    shutil.copytree(prepared, unfinished)
    (unfinished / "manifest.json").unlink()
    (unfinished / INCOMPLETE).write_text("")
    for folder in (unfinished,):
        with pytest.raises(ValueError, match=r"is not a prepared dataset: it has no manifest.json"):
            train(recipe(folder), tmp_path / "run", progress=False)
    (unfinished / INCOMPLETE).unlink()  # tokenizer/ and train/ without a manifest: still not a folder of text
    with pytest.raises(ValueError, match=r"is not a prepared dataset"):
        train(recipe(unfinished), tmp_path / "run", progress=False)


def test_any_other_source_is_prepared_into_the_cache_once_and_read_like_a_prepared_corpus(prepared, tmp_path, monkeypatch):
    """One data path: a folder of JSONL shards as `data.source` is prepared behind the scenes (its
    records are documents, not two JSON texts), read from the cache after that, and its rows are
    those `prepare` writes for the same source and keys."""
    import mot_transition.data.cached as cached_module
    from mot_transition.train import prepare_run_data

    folder = tmp_path / "shards"
    folder.mkdir()
    text = Path(argparse.__file__).read_text()
    for part in range(2):
        lines = [json.dumps({"text": text[i * 700 : (i + 1) * 700]}) for i in range(part * 30, part * 30 + 30)]
        (folder / f"part{part}.jsonl").write_text("\n".join(lines) + "\n")
    keys = {"source": str(folder), "vocab_size": 300, "heldout_fraction": 0.1, "cache_dir": str(tmp_path / "cache")}
    tokenizer, train_rows, heldout_rows, corpus = prepare_run_data(recipe(prepared, **keys))
    assert corpus.directory.parent == tmp_path / "cache" / "prepared" and corpus.directory.name.startswith("shards-")
    assert corpus.manifest["splits"]["train"]["documents"] + corpus.manifest["splits"]["heldout"]["documents"] == 60

    reference = prepare([str(folder)], tmp_path / "by-hand", vocab_size=300, heldout_fraction=0.1)
    by_hand = PackedSequences(PreparedData(reference).train, 32)
    assert torch.equal(train_rows[0 : len(train_rows)], by_hand[0 : len(by_hand)])
    assert len(tokenizer) == PreparedData(reference).vocab_size

    def no_preparing(*args, **kwargs):
        raise AssertionError("the cached corpus should have been read")

    monkeypatch.setattr(cached_module, "prepare", no_preparing)
    again = prepare_run_data(recipe(prepared, **keys))[3]
    assert again.directory == corpus.directory
    same_tokenizer = prepare_run_data(recipe(prepared, **keys), tokenizer)[3]  # a resumed run brings its own
    assert same_tokenizer.directory == corpus.directory
    (folder / "part1.jsonl").write_text((folder / "part1.jsonl").read_text() + json.dumps({"text": "one more"}) + "\n")
    with pytest.raises(AssertionError, match="cached corpus should have been read"):  # a changed source is prepared again
        prepare_run_data(recipe(prepared, **keys))
