"""`prepare`: sources into sharded token files; the reader; refusals; kills; bounded memory."""

import gzip
import importlib.util
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from conftest import DATASETS, PYARROW, run_cli
from mot_transition.data.corpus import _hash_fraction
from mot_transition.data.prepare import INCOMPLETE, prepare
from mot_transition.data.shards import PreparedData

ROOT = Path(__file__).resolve().parents[1]
HAS_PYARROW, HAS_DATASETS = (importlib.util.find_spec(name) is not None for name in ("pyarrow", "datasets"))
DOCS = [f"document {i}: the {'quick ' * (i % 7)}brown fox {i * 37} jumps\nover line {i}." for i in range(60)]


def documents_of(split, tokenizer, eos) -> list[str]:
    """The split's stream cut after every eos, each piece decoded."""
    ids = split.read(0, split.tokens)
    assert ids[-1] == eos, "the stream ends with an eos"
    ends = np.flatnonzero(ids == eos)
    starts = np.concatenate([[0], ends[:-1] + 1])
    return [tokenizer.decode(ids[s:e].tolist()) for s, e in zip(starts, ends)]


def write_jsonl(path, texts, opener=open):
    with opener(path, "wt", encoding="utf-8") as f:
        for text in texts:
            f.write(json.dumps({"text": text}) + "\n")
    return path


def both_splits(out, tokenizer_dir) -> tuple[list[str], list[str]]:
    from transformers import AutoTokenizer

    data = PreparedData(out)
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    return documents_of(data.train, tokenizer, data.eos_id), documents_of(data.heldout, tokenizer, data.eos_id)


# ---------------------------------------------------------------------------------------------
# what is written


def test_tokens_decode_to_the_documents_each_ended_by_eos_split_by_hash_without_duplicates(tmp_path, tokenizer_dir):
    source = write_jsonl(tmp_path / "docs.jsonl", DOCS[:40] + ["", DOCS[3], DOCS[10]] + DOCS[40:])
    prepare([source], tmp_path / "out", tokenizer=tokenizer_dir, heldout_fraction=0.2, shard_tokens=200)
    train, heldout = both_splits(tmp_path / "out", tokenizer_dir)
    assert train == [d for d in DOCS if _hash_fraction(d) >= 0.2]
    assert heldout == [d for d in DOCS if _hash_fraction(d) < 0.2]
    assert train and heldout
    data = PreparedData(tmp_path / "out")
    assert data.manifest["dropped"] == {"empty": 1, "duplicates": 2}
    assert len(data.train.shards) > 1 and data.dtype == "uint16" and data.train.shards[0].dtype == np.dtype("<u2")
    assert data.train.documents == len(train) and data.heldout.documents == len(heldout)
    # a token range across a shard boundary reads as the stream does
    first = data.train.shards[0].shape[0]
    whole = np.concatenate([np.asarray(s) for s in data.train.shards])
    assert (data.train.read(first - 5, first + 5) == whole[first - 5 : first + 5]).all()


def test_vocabulary_over_65536_ids_is_written_as_uint32_and_reads_back_exactly(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<eos>": 0, "[UNK]": 1, **{f"w{i}": i + 2 for i in range(70_000)}}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<eos>").save_pretrained(tmp_path / "big")
    texts = ["w69999 w5 w65535", "w66000 w1 w2", "w3 w65534 w4"] * 1 + [f"w{i} w{i + 1}" for i in range(20)]
    source = write_jsonl(tmp_path / "docs.jsonl", texts)
    prepare([source], tmp_path / "out", tokenizer=tmp_path / "big", heldout_fraction=0.3)
    data = PreparedData(tmp_path / "out")
    assert data.dtype == "uint32" and data.vocab_size == 70_002 and data.train.shards[0].dtype == np.dtype("<u4")
    ids = np.concatenate([data.train.read(0, data.train.tokens), data.heldout.read(0, data.heldout.tokens)])
    assert ids.max() == 70_001  # w69999: above 65,535, which uint16 would have wrapped
    assert sorted(ids[ids != 0].tolist()) == sorted(vocab[w] for t in texts for w in t.split())


def _make_sources(tmp: Path) -> dict[str, tuple[list[str], list[str]]]:
    """kind -> (the sources as typed, the documents they hold)."""
    a, b = DOCS[:25], DOCS[25:50]
    (tmp / "texts" / "sub").mkdir(parents=True)
    for i, text in enumerate(a):
        (tmp / "texts" / ("sub" if i % 2 else "") / f"{i:02d}.txt").write_text(text)
    (tmp / "texts" / "binary.dat").write_bytes(b"\xff\xfe\x00\x01")  # skipped in a folder, as load_corpus does
    (tmp / "shards").mkdir()
    write_jsonl(tmp / "shards" / "part-0.jsonl", a[:10])
    write_jsonl(tmp / "shards" / "part-1.jsonl.gz", a[10:], opener=gzip.open)
    (tmp / "shards" / "README.md").write_text("a folder of shards: its records are read, not this file")
    write_jsonl(tmp / "one.jsonl.gz", b, opener=gzip.open)
    if HAS_PYARROW:  # the kinds that need it are skipped without it
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.table({"id": list(range(len(b))), "text": b}), tmp / "one.parquet", row_group_size=7)
    if HAS_DATASETS:
        import datasets

        saved = datasets.DatasetDict({"train": datasets.Dataset.from_dict({"text": a}),
                                      "test": datasets.Dataset.from_dict({"text": b})})
        saved.save_to_disk(str(tmp / "saved"))
    return {
        "folder of text files": ([tmp / "texts"], a),
        "folder of jsonl shards": ([tmp / "shards"], a),
        "jsonl.gz": ([tmp / "one.jsonl.gz"], b),
        "parquet": ([tmp / "one.parquet"], b),
        "glob": ([str(tmp / "texts" / "**" / "*.txt")], a),
        "saved dataset": ([tmp / "saved"], a + b),
        "several sources": ([tmp / "one.parquet", tmp / "shards"], b + a),
    }


@pytest.mark.parametrize("kind", ["folder of text files", "folder of jsonl shards", "jsonl.gz", pytest.param("parquet", marks=PYARROW),
                                  "glob", pytest.param("saved dataset", marks=DATASETS), pytest.param("several sources", marks=PYARROW)])
def test_every_source_kind_gives_its_documents(tmp_path, tokenizer_dir, kind):
    sources, expected = _make_sources(tmp_path)[kind]
    prepare(sources, tmp_path / "out", tokenizer=tokenizer_dir, heldout_fraction=0.2)
    train, heldout = both_splits(tmp_path / "out", tokenizer_dir)
    assert sorted(train + heldout) == sorted(expected)
    assert train and heldout


def test_one_text_file_is_one_document_split_by_characters_with_a_trained_tokenizer(tmp_path):
    text = "\n".join(DOCS)
    (tmp_path / "book.txt").write_text(text)
    prepare([tmp_path / "book.txt"], tmp_path / "out", vocab_size=280, sample_bytes=500)
    data = PreparedData(tmp_path / "out")
    train, heldout = both_splits(tmp_path / "out", tmp_path / "out" / "tokenizer")
    assert train[0] + heldout[0] == text and len(heldout[0]) == len(text) - int(len(text) * 0.95)
    assert data.vocab_size == 280 and data.manifest["tokenizer_hash"]


def test_one_and_two_workers_write_identical_files(tmp_path, tokenizer_dir):
    source = write_jsonl(tmp_path / "docs.jsonl", DOCS * 1 + [d.upper() for d in DOCS])
    outputs = []
    for workers in (1, 2):
        out = prepare([source], tmp_path / f"out{workers}", tokenizer=tokenizer_dir, workers=workers,
                      batch_bytes=300, shard_tokens=500)
        outputs.append({p.relative_to(out).as_posix(): p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()})
    assert outputs[0] == outputs[1]
    assert sum(name.startswith("train/") for name in outputs[0]) > 2


@pytest.mark.parametrize("message, said", [("No space left on device (os error 28)", True), ("a bug of ours", False)])
def test_an_io_error_from_the_tokenizers_library_is_one_line_and_anything_else_a_traceback(tmp_path, capsys, monkeypatch, message, said):
    from transformers import PreTrainedTokenizerBase

    def full_disk(*args, **kwargs):
        raise Exception(message)  # what tokenizers' Rust side raises for an I/O error: a bare Exception

    monkeypatch.setattr(PreTrainedTokenizerBase, "save_pretrained", full_disk)
    args = ["prepare", write_jsonl(tmp_path / "docs.jsonl", DOCS), "--out", tmp_path / "data", "--vocab-size", "290"]
    if said:
        code, _, err = run_cli(args, capsys)
        assert code == 1 and err.strip() == f"error: {message}", err
    else:
        with pytest.raises(Exception, match=message):
            run_cli(args, capsys)
    assert not (tmp_path / "data").exists() and not list(tmp_path.glob(".data.*"))


def test_cli_prepare_as_typed_writes_a_dataset_that_autotokenizer_and_memmap_read(tmp_path, capsys):
    from transformers import AutoTokenizer

    source = write_jsonl(tmp_path / "docs.jsonl", DOCS)
    code, out, err = run_cli(["prepare", source, "--out", tmp_path / "data", "--vocab-size", "290",
                              "--sample-bytes", "2000", "--shard-tokens", "300", "--workers", "2"], capsys)
    assert code == 0, err
    assert "wrote" in out and "train:" in out
    manifest = json.loads((tmp_path / "data" / "manifest.json").read_text())
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "data" / "tokenizer")
    assert len(tokenizer) == manifest["vocab_size"] == 290 and tokenizer.eos_token_id == manifest["eos_id"]
    shard = manifest["splits"]["train"]["shards"][0]
    ids = np.memmap(tmp_path / "data" / shard["file"], dtype=manifest["dtype"], mode="r")
    assert ids.shape[0] == shard["tokens"] and (ids == manifest["eos_id"]).sum() == shard["documents"]
    assert not (tmp_path / "data" / INCOMPLETE).exists()


# ---------------------------------------------------------------------------------------------
# refusals


def _refusals(tmp: Path):
    if HAS_PYARROW:  # the case that needs it is skipped without it
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.table({"content": DOCS}), tmp / "other.parquet")
    (tmp / "latin1.txt").write_bytes("caf\xe9 ol\xe9".encode("latin-1"))
    write_jsonl(tmp / "empty.jsonl", ["", ""])
    (tmp / "foreign").mkdir()
    (tmp / "foreign" / "notes.txt").write_text("mine")
    good = write_jsonl(tmp / "good.jsonl", DOCS)
    with gzip.open(tmp / "damaged.jsonl.gz", "wt") as handle:
        handle.write("".join(json.dumps({"text": d}) + "\n" for d in DOCS * 20))
    data = bytearray((tmp / "damaged.jsonl.gz").read_bytes())
    for i in range(40, len(data) - 20, 7):  # garble the deflate stream, not the header
        data[i] ^= 0x5A
    (tmp / "damaged.jsonl.gz").write_bytes(bytes(data))
    (tmp / "surrogate.jsonl").write_text('{"text": "fine"}\n{"text": "bad \\ud800 half"}\n')
    (tmp / "src").mkdir()
    write_jsonl(tmp / "src" / "part.jsonl", DOCS)
    return {
        "missing source": ([tmp / "nope.txt"], "does not exist"),
        "parquet without the column": ([tmp / "other.parquet"], "no column 'text'"),
        "non-UTF-8 text file": ([tmp / "latin1.txt"], "not UTF-8"),
        "empty source": ([tmp / "empty.jsonl"], "no text"),
        "glob matching nothing": ([str(tmp / "*.nothing")], "matches no file"),
        "foreign non-empty --out": ([good, "--out", tmp / "foreign"], "not a prepared dataset"),
        "Hub offline": (["hf:someone/corpus"], "offline"),
        "damaged gzip": ([tmp / "damaged.jsonl.gz"], "not a complete gzip file"),
        "lone surrogate in a record": ([tmp / "surrogate.jsonl"], "line 2: field 'text' holds an unpaired surrogate"),
        "--out inside a source folder": ([tmp / "src", "--out", tmp / "src" / "prepared"], "lies inside the source folder"),
    }


@pytest.mark.parametrize("case", ["missing source", pytest.param("parquet without the column", marks=PYARROW), "non-UTF-8 text file",
                                  "empty source", "glob matching nothing", "foreign non-empty --out", pytest.param("Hub offline", marks=DATASETS),
                                  "damaged gzip", "lone surrogate in a record", "--out inside a source folder"])
def test_bad_input_is_one_line_exit_1_and_nothing_a_reader_takes_for_a_dataset(tmp_path, capsys, monkeypatch, case):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    if HAS_DATASETS:  # it read the variable when it was imported
        monkeypatch.setattr("datasets.config.HF_HUB_OFFLINE", True)
    args, message = _refusals(tmp_path)[case]
    if "--out" not in args:
        args = [*args, "--out", tmp_path / "out"]
    code, _, err = run_cli(["prepare", *args, "--vocab-size", "280"], capsys)
    assert code == 1
    assert len(err.strip().splitlines()) == 1 and err.startswith("error:") and message in err, err
    out = Path(args[args.index("--out") + 1])
    assert not (out / "manifest.json").exists()
    assert not out.exists() or sorted(p.name for p in out.iterdir()) in ([], ["notes.txt"])


@pytest.mark.parametrize("option, value", [("--workers", "0"), ("--shard-tokens", "-1"), ("--vocab-size", "100"),
                                           ("--heldout-fraction", "1.0"), ("--sample-bytes", "0")])
def test_impossible_options_are_one_line_before_anything_is_written(tmp_path, capsys, option, value):
    source = write_jsonl(tmp_path / "docs.jsonl", DOCS)
    code, _, err = run_cli(["prepare", source, "--out", tmp_path / "out", option, value], capsys)
    assert code == 1 and len(err.strip().splitlines()) == 1 and option in err, err
    assert not (tmp_path / "out").exists()


def test_missing_datasets_library_is_one_line_naming_pip_install(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)  # import datasets -> ImportError
    code, _, err = run_cli(["prepare", "hf:someone/corpus", "--out", tmp_path / "out"], capsys)
    assert code == 1 and len(err.strip().splitlines()) == 1 and "pip install datasets" in err


def test_a_finished_dataset_is_replaced_only_with_force(tmp_path, capsys, tokenizer_dir):
    source = write_jsonl(tmp_path / "docs.jsonl", DOCS)
    args = ["prepare", source, "--out", tmp_path / "out", "--tokenizer", tokenizer_dir]
    assert run_cli(args, capsys)[0] == 0
    code, _, err = run_cli(args, capsys)
    assert code == 1 and "--force" in err
    assert run_cli([*args, "--force"], capsys)[0] == 0
    PreparedData(tmp_path / "out")


def test_reader_refuses_no_manifest_a_short_shard_and_a_missing_shard(tmp_path, tokenizer_dir):
    source = write_jsonl(tmp_path / "docs.jsonl", DOCS)
    out = prepare([source], tmp_path / "out", tokenizer=tokenizer_dir, shard_tokens=300)
    shard = out / "train" / "000001.bin"
    data = shard.read_bytes()
    shard.write_bytes(data[:-2])
    with pytest.raises(ValueError, match="damaged"):
        PreparedData(out)
    shard.unlink()
    with pytest.raises(ValueError, match="missing"):
        PreparedData(out)
    (out / "manifest.json").unlink()
    with pytest.raises(ValueError, match="no manifest.json"):
        PreparedData(out)


# ---------------------------------------------------------------------------------------------
# kills and memory


def _big_corpus(path: Path, megabytes: float) -> Path:
    rng = np.random.default_rng(0)
    words = [f"w{i}x" for i in range(3000)]
    with path.open("w") as f:
        size, i = 0, 0
        while size < megabytes * 1e6:
            text = " ".join(words[j] for j in rng.integers(0, len(words), 300)) + f" #{i}"
            f.write(json.dumps({"text": text}) + "\n")
            size, i = size + len(text), i + 1
    return path


def test_a_sigkilled_prepare_leaves_no_dataset_and_the_same_command_completes_it(tmp_path, tokenizer_dir):
    source = _big_corpus(tmp_path / "big.jsonl", 1.5)
    args = [str(source), "--out", str(tmp_path / "out"), "--tokenizer", str(tokenizer_dir), "--shard-tokens", "20000"]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    child = subprocess.Popen([sys.executable, "-m", "mot_transition.cli", "prepare", *args], env=env,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    staging = tmp_path / f".out.converting-{child.pid}"  # where it writes, beside --out
    while not (staging / "train" / "000002.bin").exists() and child.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    child.send_signal(signal.SIGKILL)
    assert child.wait() == -signal.SIGKILL, "the kill came after prepare had finished: make the corpus bigger"
    assert staging.is_dir() and not (tmp_path / "out").exists(), sorted(p.name for p in tmp_path.iterdir())
    prepare([source], tmp_path / "out", tokenizer=tokenizer_dir, shard_tokens=20_000)  # the same command, again
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == [], "the killed staging is removed"
    prepare([source], tmp_path / "fresh", tokenizer=tokenizer_dir, shard_tokens=20_000)
    files = lambda d: {p.relative_to(d): p.read_bytes() for p in d.rglob("*") if p.is_file()}  # noqa: E731
    assert files(tmp_path / "out") == files(tmp_path / "fresh")


MEMORY_PROBE = """
import json, resource, sys
from mot_transition.data.prepare import prepare
peak = lambda: resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
small, big, tokenizer, out = sys.argv[1:]
prepare([small], out + "-small", tokenizer=tokenizer, workers=1, batch_bytes=200_000)
after_small = peak()
prepare([big], out + "-big", tokenizer=tokenizer, workers=1, batch_bytes=200_000)
print(json.dumps({"after_small": after_small, "after_big": peak()}))
"""


def test_peak_memory_does_not_grow_with_the_corpus(tmp_path, tokenizer_dir):
    """Prepare 1 MB, then 4 MB, in one process: the peak RSS after the big corpus is within 12 MB of
    the peak after the small one (measured: 1 to 7 MB, allocator noise that did not grow from 2 to
    4 MB). Holding the big corpus's text (4 MB) and its token stream (about
    4 million ids, 8 bytes each as int64: 30 MB) would raise it by far more. What it shows: nothing
    kept grows with the tokens; the duplicate set does grow, by about 70 bytes per document (2,000
    documents here), which this bound would not catch."""
    small, big = _big_corpus(tmp_path / "small.jsonl", 1), _big_corpus(tmp_path / "big.jsonl", 4)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    result = subprocess.run([sys.executable, "-c", MEMORY_PROBE, small, big, tokenizer_dir, tmp_path / "out"],
                            env=env, capture_output=True, text=True, check=True)
    peaks = json.loads(result.stdout.strip().splitlines()[-1])
    tokens = PreparedData(tmp_path / "out-big").train.tokens
    assert tokens * 8 / 2**20 > 25, "the big corpus's int64 stream must be big enough for the bound to mean something"
    assert peaks["after_big"] - peaks["after_small"] < 12, peaks


def test_a_corpus_of_one_document_is_split_by_characters_whatever_its_key_hashes_to():
    from mot_transition.data.prepare import SplitStream

    held_by_hash = [f"doc{i}.txt" for i in range(400) if _hash_fraction(f"doc{i}.txt") < 0.05]
    assert held_by_hash  # the case the streaming rule once got wrong: the only document hashed into held-out
    for key in held_by_hash[:3] + ["doc-any.txt"]:
        text = "hello world " * 50
        assert list(SplitStream([(key, text)], 0.05)) == [("train", text[:570]), ("heldout", text[570:])]
    two = list(SplitStream([(held_by_hash[0], "first " * 20), ("other.txt", "second " * 20)], 0.05))
    assert sorted(split for split, _ in two) == ["heldout", "train"]


# ---------------------------------------------------------------------------------------------
# --force replaces only what prepare wrote, and only once the new dataset is complete (issue 24)


def _tree(folder: Path) -> dict:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_force_refuses_a_folder_whose_manifest_json_is_not_a_datasets_and_touches_nothing(tmp_path, capsys, tokenizer_dir):
    mine = tmp_path / "project"
    for name in ("train", "heldout", "tokenizer"):
        (mine / name).mkdir(parents=True)
        (mine / name / "notes.txt").write_text(f"my {name} notes")
    (mine / "manifest.json").write_text(json.dumps({"name": "my project", "files": ["train/notes.txt"]}))
    before = _tree(mine)
    source = write_jsonl(tmp_path / "docs.jsonl", DOCS)
    code, _, err = run_cli(["prepare", source, "--out", mine, "--tokenizer", tokenizer_dir, "--force"], capsys)
    assert code == 1 and len(err.strip().splitlines()) == 1 and "not a prepared dataset this toolkit wrote" in err, err
    assert _tree(mine) == before


@pytest.mark.parametrize("extra", ["notes.txt", "train/999999.bin"])
def test_force_refuses_a_dataset_that_also_holds_a_file_prepare_did_not_write(tmp_path, capsys, tokenizer_dir, extra):
    source = write_jsonl(tmp_path / "docs.jsonl", DOCS)
    out = prepare([source], tmp_path / "out", tokenizer=tokenizer_dir)
    (out / extra).write_text("mine")
    before = _tree(out)
    code, _, err = run_cli(["prepare", source, "--out", out, "--tokenizer", tokenizer_dir, "--force"], capsys)
    assert code == 1 and len(err.strip().splitlines()) == 1 and extra in err, err
    assert _tree(out) == before


def test_a_bad_line_found_late_under_force_leaves_the_old_dataset_whole(tmp_path, capsys, tokenizer_dir):
    out = prepare([write_jsonl(tmp_path / "old.jsonl", DOCS[:30])], tmp_path / "out", tokenizer=tokenizer_dir)
    before = _tree(out)
    bad = _big_corpus(tmp_path / "new.jsonl", 0.5)
    with bad.open("a") as f:
        f.write("{not json\n")
    code, _, err = run_cli(["prepare", bad, "--out", out, "--tokenizer", tokenizer_dir, "--force", "--shard-tokens", "5000"], capsys)
    assert code == 1 and len(err.strip().splitlines()) == 1, err
    assert _tree(out) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["new.jsonl", "old.jsonl", "out"], "no staging is left"
