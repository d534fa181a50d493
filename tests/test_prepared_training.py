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
