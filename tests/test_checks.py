"""Checks before work, one line always (issue 24): destinations and inputs are checked before the
expensive part, and every failure is one line naming the file or the option as typed; numeric
options past what the machine or a library can take are refused by their rule; Hypothesis throws
random inputs at `prepare` (the other commands: test_command_checks.py)."""

import json
import os
import time
from pathlib import Path

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from conftest import run_cli
from mot_transition.data.shards import PreparedData

DOCS = [f"line {i}: the {'quick ' * (i % 5)}brown fox {i * 31} jumps over it." for i in range(40)]
FUZZ = settings(max_examples=40, deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])


def one_error_line(code: int, err: str, *named: str) -> bool:
    lines = [line for line in err.strip().splitlines() if not line.startswith("warning:")]
    return code == 1 and len(lines) == 1 and lines[0].startswith("error: ") and all(n in lines[0] for n in named)


def unwritable_places(tmp_path: Path) -> list[Path]:
    """Places under folders this process cannot create a file in, tried: a folder without write
    permission (which does not stop root) and /sys (which refuses new files to root too, on Linux)."""
    import tempfile

    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o555)

    def unwritable(folder: Path) -> bool:
        try:
            fd, probe = tempfile.mkstemp(dir=folder)
        except OSError:
            return True
        os.close(fd)
        os.unlink(probe)
        return False

    places = [p for p in (locked / "out", Path("/sys/mot-transition-test-out")) if p.parent.is_dir() and unwritable(p.parent)]
    assert places, "no unwritable place to test with on this machine"
    return places


@pytest.fixture
def source(tmp_path) -> Path:
    path = tmp_path / "docs.jsonl"
    path.write_text("".join(json.dumps({"text": d}) + "\n" for d in DOCS))
    return path


# ---------------------------------------------------------------------------------------------
# prepare: the cases of issue 24, each one line and exit 1, nothing written


@pytest.mark.parametrize("option, value", [("--vocab-size", "1000000000"), ("--workers", "1000"), ("--vocab-size", "1048577")])
def test_values_that_would_crash_the_tokenizer_or_fork_a_thousand_processes_are_refused_by_their_rule(tmp_path, capsys, source, option, value):
    code, _, err = run_cli(["prepare", source, "--out", tmp_path / "out", option, value], capsys)
    assert one_error_line(code, err, option, value), err
    assert not (tmp_path / "out").exists()


def test_a_jsonl_line_nested_100000_deep_is_one_line_naming_the_file_and_line(tmp_path, capsys):
    deep = tmp_path / "deep.jsonl"
    deep.write_text(json.dumps({"text": "fine"}) + "\n" + '{"text": ' + "[" * 100_000 + "]" * 100_000 + "}\n")
    code, _, err = run_cli(["prepare", deep, "--out", tmp_path / "out", "--vocab-size", "280"], capsys)
    assert one_error_line(code, err, f"{deep}, line 2", "nested too deeply"), err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("record, named", [
    ({"text": None}, "field 'text' is null, not a string"),
    ({"text": 3}, "field 'text' is a number, not a string"),
    ([1, 2], "line 1: an array, not a JSON object"),
    ({"body": "x"}, "no 'text' field; pass --text-field"),
])
def test_record_errors_speak_of_options_and_json_kinds_not_python_names(tmp_path, capsys, record, named):
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps(record) + "\n")
    code, _, err = run_cli(["prepare", path, "--out", tmp_path / "out", "--vocab-size", "280"], capsys)
    assert one_error_line(code, err, named), err
    assert "NoneType" not in err and "text_field=" not in err


def test_a_prepared_corpus_without_its_tokenizer_folder_is_refused_as_damaged(tmp_path, capsys, source, tokenizer_dir):
    import shutil

    from mot_transition.data.prepare import prepare

    prepare([source], tmp_path / "data", tokenizer=tokenizer_dir)
    shutil.rmtree(tmp_path / "data" / "tokenizer")
    with pytest.raises(ValueError, match=r"is damaged: it has a manifest but no tokenizer/ folder; prepare it again$"):
        PreparedData(tmp_path / "data")
    code, _, err = run_cli(["train", "tiny", f"data.source={json.dumps(str(tmp_path / 'data'))}", "--out", tmp_path / "run"], capsys)
    assert one_error_line(code, err, "no tokenizer/ folder"), err
    assert "repo" not in err.lower() and not (tmp_path / "run").exists()


def broken_tokenizers(tmp: Path, good: Path) -> dict[str, tuple[Path, str]]:
    import shutil

    cases = {}
    for name in ("empty", "garbage", "truncated", "not a tokenizer", "bad config", "a file"):
        cases[name] = tmp / name.replace(" ", "-")
    cases["empty"].mkdir()
    shutil.copytree(good, cases["garbage"])
    (cases["garbage"] / "tokenizer.json").write_text("garbage")
    shutil.copytree(good, cases["truncated"])
    (cases["truncated"] / "tokenizer.json").write_text((good / "tokenizer.json").read_text()[:500])
    cases["not a tokenizer"].mkdir()
    (cases["not a tokenizer"] / "tokenizer.json").write_text('{"version": "1.0"}')
    shutil.copytree(good, cases["bad config"])
    (cases["bad config"] / "tokenizer_config.json").write_text("")
    cases["a file"].write_text("x")
    return {
        "empty": (cases["empty"], "holds no tokenizer (none of tokenizer.json, tokenizer_config.json"),
        "garbage": (cases["garbage"], "tokenizer.json is not valid JSON: Expecting value at line 1 column 1"),
        "truncated": (cases["truncated"], "tokenizer.json is not valid JSON"),
        "not a tokenizer": (cases["not a tokenizer"], "does not load"),
        "bad config": (cases["bad config"], "tokenizer_config.json is not valid JSON: Expecting value at line 1 column 1 (the file is empty)"),
        "a file": (cases["a file"], "is a file, not a folder"),
    }


@pytest.mark.parametrize("case", ["empty", "garbage", "truncated", "not a tokenizer", "bad config", "a file"])
def test_a_broken_tokenizer_folder_is_one_whole_line_naming_the_option_and_the_file(tmp_path, capsys, source, tokenizer_dir, case):
    folder, named = broken_tokenizers(tmp_path, tokenizer_dir)[case]
    code, _, err = run_cli(["prepare", source, "--out", tmp_path / "out", "--tokenizer", folder], capsys)
    assert one_error_line(code, err, f"--tokenizer {folder}", named), err
    if case == "empty":  # it once ended mid-sentence, cut at the library's first line
        assert err.rstrip().endswith("spiece.model, vocab.txt)"), err
    assert not (tmp_path / "out").exists()


def test_an_unwritable_out_is_found_before_the_tokenizer_is_trained(tmp_path, capsys, source, monkeypatch):
    import mot_transition.data.prepare as prepare_module

    def never(*args, **kwargs):
        raise AssertionError("the tokenizer was trained before --out was checked")

    monkeypatch.setattr(prepare_module, "train_bpe_tokenizer", never)
    (tmp_path / "a-file").write_text("x")
    for out in [*unwritable_places(tmp_path), tmp_path / "a-file" / "out"]:
        code, _, err = run_cli(["prepare", source, "--out", out], capsys)
        assert one_error_line(code, err, f"--out {out}"), err
        assert "cannot write in" in err or "is a file, not a folder" in err


def test_an_unreachable_hub_is_one_line_at_once_not_half_a_minute_of_retries(tmp_path, capsys, monkeypatch):
    pytest.importorskip("datasets", reason="datasets is not installed (pip install datasets)")
    import huggingface_hub.constants

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr("datasets.config.HF_HUB_OFFLINE", False)
    monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", "http://127.0.0.1:9")  # nothing listens there
    start = time.monotonic()
    code, _, err = run_cli(["prepare", "hf:someone/corpus", "--out", tmp_path / "out"], capsys)
    assert one_error_line(code, err, "hf:someone/corpus: the Hugging Face Hub cannot be reached"), err
    assert "warning" not in err.lower() and time.monotonic() - start < 10
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------------------------------------
# prepare under Hypothesis: random records and options


RECORD = st.recursive(st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
                      lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.sampled_from(["text", "body", ""]), inner, max_size=3),
                      max_leaves=6)
GOOD_LINE = st.fixed_dictionaries({"text": st.text(max_size=60)}).map(json.dumps)
ODD_LINE = st.one_of(RECORD.map(json.dumps), st.text(max_size=12),
                     st.sampled_from(["", "{", '{"text": "a"', "[" * 3000 + "]" * 3000, '{"text": "\\ud800"}']))
OPTION = st.one_of(st.sampled_from(["1", "2", "300", "0.3", "text"]), st.sampled_from(["0", "1", "2", "-1", "257", "300", "1048577", "1e9", "nan", "inf", "0.5", "", "text", "2" * 30]),
                   st.integers(-5, 70_000).map(str))


@FUZZ
@given(lines=st.lists(GOOD_LINE, max_size=6), odd=st.one_of(st.none(), ODD_LINE), at=st.integers(0, 6), options=st.dictionaries(
    st.sampled_from(["--vocab-size", "--workers", "--shard-tokens", "--sample-bytes", "--heldout-fraction", "--max-bytes", "--text-field"]),
    OPTION, max_size=2))
def test_prepare_writes_a_dataset_or_says_one_line_and_leaves_nothing(tmp_path_factory, capsys, lines, odd, at, options):
    folder = tmp_path_factory.mktemp("fuzz")
    lines = lines[:at] + ([odd] if odd is not None else []) + lines[at:]
    (folder / "in.jsonl").write_text("\n".join(lines + [json.dumps({"text": d}) for d in DOCS[:3]]) + "\n")
    args = ["prepare", folder / "in.jsonl", "--out", folder / "out"]
    for option, value in options.items():
        args += [option, value]
    code, out, err = run_cli(args, capsys)
    event(f"exit {code}")
    assert "Traceback" not in err
    if code == 0:
        data = PreparedData(folder / "out")
        assert data.train.documents >= 1 and data.tokenizer().eos_token_id == data.eos_id
    else:
        assert code in (1, 2) and len(err.strip().splitlines()) == 1 and err.startswith("error: "), err
        assert not (folder / "out").exists()


@FUZZ
@given(data=st.one_of(st.binary(max_size=300), st.text(max_size=300).map(lambda t: t.encode("utf-8", "surrogatepass")),
                      st.text(min_size=40, max_size=300).map(str.encode)),
       name=st.sampled_from(["doc.txt", "doc.jsonl", "doc.jsonl.gz", "doc.parquet", "doc"]))
def test_prepare_takes_any_bytes_in_a_file_of_any_suffix_as_a_dataset_or_one_line(tmp_path_factory, capsys, data, name):
    folder = tmp_path_factory.mktemp("bytes")
    (folder / name).write_bytes(data)
    code, _, err = run_cli(["prepare", folder / name, "--out", folder / "out", "--vocab-size", "280"], capsys)
    event(f"exit {code}")
    assert "Traceback" not in err
    if code == 0:
        assert PreparedData(folder / "out").train.tokens > 0
    else:
        assert code == 1 and len(err.strip().splitlines()) == 1 and err.startswith("error: ") and str(folder / name) in err, err
        assert not (folder / "out").exists()
