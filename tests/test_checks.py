"""Checks before work, one line always (issue 24): destinations and inputs are checked before the
expensive part, and every failure is one line naming the file or the option as typed; numeric
options past what the machine or a library can take are refused by their rule; Hypothesis throws
random inputs at `prepare` and `eval`."""

import json
import os
import time
from pathlib import Path

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from conftest import run_cli, tiny_config
from mot_transition.data.shards import PreparedData
from mot_transition.data.tokenizer import train_bpe_tokenizer

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


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tokenizer")
    train_bpe_tokenizer(DOCS, 300).save_pretrained(path)
    return path


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
    pytest.importorskip("datasets")
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


# ---------------------------------------------------------------------------------------------
# eval: --out, task files and the checkpoint's tokenizer, checked before the evaluation


class Evaluated(Exception):
    """lm-eval's evaluation started."""


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, tokenizer_dir):
    from transformers import AutoTokenizer

    from mot_transition.modeling import MoTLMHeadModel

    folder = tmp_path_factory.mktemp("eval") / "tc"
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    MoTLMHeadModel(tiny_config("token_choice", vocab_size=len(tokenizer))).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture
def tasks(tmp_path) -> Path:
    folder = tmp_path / "tasks"
    folder.mkdir()
    (folder / "tiny.jsonl").write_text(json.dumps({"context": "a", "choices": [" b", " c"], "label": 0}) + "\n")
    (folder / "tiny.yaml").write_text(
        "task: tiny_choice\ndataset_path: json\ndataset_kwargs:\n  data_files:\n"
        f"    test: {folder / 'tiny.jsonl'}\ntest_split: test\noutput_type: multiple_choice\n"
        'doc_to_text: "{{context}}"\ndoc_to_choice: "{{choices}}"\ndoc_to_target: label\nmetric_list:\n  - metric: acc\n'
    )
    return folder


@pytest.fixture
def no_evaluation(monkeypatch):
    pytest.importorskip("lm_eval")

    def evaluated(*args, **kwargs):
        raise Evaluated()

    monkeypatch.setattr("lm_eval.simple_evaluate", evaluated)


def test_eval_out_naming_a_folder_or_an_unwritable_place_is_refused_before_the_evaluation(tmp_path, capsys, checkpoint, tasks, no_evaluation):
    (tmp_path / "scores").mkdir()
    for out in [tmp_path / "scores", *unwritable_places(tmp_path)]:
        code, _, err = run_cli(["eval", checkpoint, "--tasks", "tiny_choice", "--include-path", tasks, "--out", out], capsys)
        assert one_error_line(code, err, f"--out {out}"), err
        assert "Errno" not in err and ".tmp-" not in err
    assert list((tmp_path / "scores").iterdir()) == []


def test_a_malformed_task_yaml_is_named_with_its_line_not_reported_as_an_unknown_task(tmp_path, capsys, checkpoint, tasks, no_evaluation):
    text = (tasks / "tiny.yaml").read_text()
    (tasks / "tiny.yaml").write_text(text.replace("output_type: multiple_choice", "output_type: [multiple_choice"))
    code, _, err = run_cli(["eval", checkpoint, "--tasks", "tiny_choice", "--include-path", tasks], capsys)
    assert one_error_line(code, err, f"--include-path {tasks}: {tasks / 'tiny.yaml'} is not a task file lm-eval reads", "at line"), err
    assert "unknown task" not in err


def test_a_checkpoint_without_a_tokenizer_is_one_line_naming_it_before_the_model_loads(tmp_path, capsys, checkpoint, tasks, no_evaluation):
    import shutil

    bare = tmp_path / "bare"
    shutil.copytree(checkpoint, bare)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (bare / name).unlink()
    code, _, err = run_cli(["eval", bare, "--tasks", "tiny_choice", "--include-path", tasks], capsys)
    assert one_error_line(code, err, f"the checkpoint {bare}", "holds no tokenizer"), err
    code, _, err = run_cli(["generate", bare, "--prompt", "x"], capsys)
    assert one_error_line(code, err, str(bare), "no tokenizer"), err


EVAL_OPTION = st.one_of(st.integers(1, 64).map(str), st.integers(1, 64).map(str), st.sampled_from(["1", "2", "300", "0.3", "text"]), st.sampled_from(["1", "2", "0", "-1", "4096", "4097", "1e9", "nan", "", "x", "9" * 25]), st.integers(-3, 5000).map(str))


@FUZZ
@given(task_list=st.sampled_from(["tiny_choice", "tiny_choice", " tiny_choice ,", ",", "", "tiny_choice,tiny_choice"]),
       options=st.dictionaries(st.sampled_from(["--limit", "--batch-size", "--group-size"]), EVAL_OPTION, max_size=2),
       out=st.sampled_from([None, "scores.json", "folder", "a-file/scores.json", "new/deeper/scores.json"]))
def test_eval_scores_or_says_one_line_before_evaluating(tmp_path_factory, capsys, monkeypatch, checkpoint, task_list, options, out):
    pytest.importorskip("lm_eval")
    calls = []

    def evaluated(*args, **kwargs):
        calls.append(kwargs)
        return {"results": {"tiny_choice": {"alias": "tiny_choice", "acc,none": 0.5, "acc_stderr,none": 0.1}}}

    monkeypatch.setattr("lm_eval.simple_evaluate", evaluated)
    folder = tmp_path_factory.mktemp("evalfuzz")
    tasks = folder / "tasks"
    tasks.mkdir()
    (tasks / "tiny.yaml").write_text("task: tiny_choice\ndataset_path: json\noutput_type: multiple_choice\ntest_split: test\n")
    (folder / "folder").mkdir()
    (folder / "a-file").write_text("x")
    args = ["eval", checkpoint, "--tasks", task_list, "--include-path", tasks]
    for option, value in options.items():
        args += [option, value]
    if out is not None:
        args += ["--out", folder / out]
    code, stdout, err = run_cli(args, capsys)
    event(f"exit {code}")
    assert "Traceback" not in err
    if code == 0:
        assert calls and "tiny_choice" in stdout
        if out is not None:
            assert json.loads((folder / out).read_text()) == {"tiny_choice": {"acc": 0.5, "acc_stderr": 0.1}}
    else:
        assert not calls and code in (1, 2) and len(err.strip().splitlines()) == 1 and err.startswith("error: "), err
        assert sorted(p.name for p in folder.iterdir()) == ["a-file", "folder", "tasks"] and not list((folder / "folder").iterdir())


# ---------------------------------------------------------------------------------------------
# --resume with nothing to resume says so


class Started(Exception):
    """The command got past its checks and would start the run."""


@pytest.mark.parametrize("command", ["train", "transition"])
def test_resume_with_nothing_to_resume_says_so_in_one_warning_line(tmp_path, capsys, monkeypatch, checkpoint, command):
    def started(*args, **kwargs):
        raise Started()

    if command == "train":
        import mot_transition.train as train_package

        monkeypatch.setattr(train_package, "train", started)
        args = ["train", "tiny", "--out", tmp_path / "run", "--resume"]
    else:
        monkeypatch.setattr("mot_transition.cli.transition.run_transition", started)
        args = ["transition", checkpoint, "--steps", "2", "--out", tmp_path / "run", "--resume"]
    expected = f"--resume: {tmp_path / 'run'} holds no checkpoint to resume; starting a new run there"
    with pytest.raises(Started), pytest.warns(UserWarning) as warned:
        run_cli(args, capsys)
    assert [str(w.message) for w in warned] == [expected]


@pytest.mark.parametrize("command", ["info", "generate"])
def test_a_checkpoint_config_nested_100000_deep_is_one_line_naming_it(tmp_path, capsys, checkpoint, command):
    import shutil

    deep = tmp_path / "deep"
    shutil.copytree(checkpoint, deep)
    (deep / "config.json").write_text("[" * 100_000 + "]" * 100_000)
    args = ["info", deep] if command == "info" else ["generate", deep, "--prompt", "x"]
    code, _, err = run_cli(args, capsys)
    assert one_error_line(code, err, f"{deep / 'config.json'} is not valid JSON", "recursion limit"), err


def test_compare_checks_its_plot_destination_and_task_files_before_evaluating_any_model(tmp_path, capsys, tasks, monkeypatch):
    import mot_transition.cli.compare as compare_cli

    def evaluated(*args, **kwargs):
        raise AssertionError("the runs were evaluated before the checks")

    monkeypatch.setattr(compare_cli, "compare_runs", evaluated)
    (tmp_path / "plots").mkdir()
    code, _, err = run_cli(["compare", tmp_path / "run", "--plot", tmp_path / "plots"], capsys)
    assert one_error_line(code, err, f"--plot {tmp_path / 'plots'} is a folder"), err
    (tasks / "broken.yaml").write_text("task: [broken\n")
    code, _, err = run_cli(["compare", tmp_path / "run", "--tasks", "tiny_choice", "--include-path", tasks], capsys)
    assert one_error_line(code, err, f"{tasks / 'broken.yaml'} is not a task file lm-eval reads"), err


@pytest.fixture(scope="module")
def mot_checkpoint(tmp_path_factory, checkpoint):
    from transformers import AutoTokenizer

    from mot_transition.modeling import MoTLMHeadModel

    folder = tmp_path_factory.mktemp("mot") / "mot"
    tokenizer = AutoTokenizer.from_pretrained(checkpoint)
    MoTLMHeadModel(tiny_config("mot", vocab_size=len(tokenizer))).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.mark.parametrize("command", ["train", "run", "transition", "convert"])
def test_every_command_tries_its_destination_before_the_data_or_the_model(tmp_path, capsys, monkeypatch, checkpoint, mot_checkpoint, command):
    import mot_transition.train.trainer as trainer_module

    def never(*args, **kwargs):
        raise AssertionError("the data was prepared before the destination was checked")

    monkeypatch.setattr(trainer_module, "prepare_run_data", never)
    for out in unwritable_places(tmp_path):
        args = {
            "train": ["train", "tiny", "--out", out],
            "run": ["run", "tiny", "--out", out],
            "transition": ["transition", checkpoint, "--steps", "2", "--out", out],
            "convert": ["convert", mot_checkpoint, out],
        }[command]
        code, _, err = run_cli(args, capsys)
        named = f"the destination {out}" if command == "convert" else f"--out {out}"
        assert one_error_line(code, err, named, "cannot write in"), err
