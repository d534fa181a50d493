"""Checks before work, one line always (issue 24), in the commands other than prepare: eval's --out,
task files and checkpoint tokenizer before the evaluation (and Hypothesis on eval's options);
compare's before any model is evaluated; every command's destination before the data or the model;
a config.json nested too deep; --resume with nothing to resume."""

import json
from pathlib import Path

import pytest
from hypothesis import event, given
from hypothesis import strategies as st

from conftest import LM_EVAL, run_cli, saved_model
from test_checks import FUZZ, one_error_line, unwritable_places

NO_LM_EVAL = "lm_eval not installed (pip install 'mot-transition[eval]')"


# ---------------------------------------------------------------------------------------------
# eval: --out, task files and the checkpoint's tokenizer, checked before the evaluation


class Evaluated(Exception):
    """lm-eval's evaluation started."""


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, tokenizer_dir):
    return saved_model(tmp_path_factory.mktemp("eval") / "tc", "token_choice", tokenizer_dir)


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
    pytest.importorskip("lm_eval", reason=NO_LM_EVAL)

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


def test_eval_out_replaces_an_existing_file_only_with_force(tmp_path, capsys, monkeypatch, checkpoint, tasks):
    pytest.importorskip("lm_eval", reason=NO_LM_EVAL)
    scores = {"results": {"tiny_choice": {"alias": "tiny_choice", "acc,none": 0.5}}}
    monkeypatch.setattr("lm_eval.simple_evaluate", lambda *args, **kwargs: scores)
    out = tmp_path / "notes.txt"
    out.write_text("keep me")
    args = ["eval", checkpoint, "--tasks", "tiny_choice", "--include-path", tasks, "--out", out]
    code, _, err = run_cli(args, capsys)
    assert one_error_line(code, err, f"--out {out} already exists; pass --force"), err
    assert out.read_text() == "keep me"
    code, _, err = run_cli([*args, "--force"], capsys)
    assert code == 0 and json.loads(out.read_text()) == {"tiny_choice": {"acc": 0.5}}, err


@pytest.mark.parametrize("device, words", [
    ("banana", "is not a device; give cpu, cuda, cuda:N or mps"),
    ("cuda:99", "CUDA device"),
    ("mps:0", "MPS device"),
    ("meta", "runs on cpu, cuda, cuda:N or mps only"),
])
def test_eval_device_this_machine_lacks_is_one_line_before_the_evaluation(capsys, checkpoint, tasks, no_evaluation, device, words):
    import torch

    if device.startswith("mps") and torch.backends.mps.is_available():
        pytest.skip("this machine has an MPS device")
    code, _, err = run_cli(["eval", checkpoint, "--tasks", "tiny_choice", "--include-path", tasks, "--device", device], capsys)
    assert one_error_line(code, err, f"--device {device!r}", words), err


def test_eval_shows_none_of_lm_evals_notices_about_a_model_object(checkpoint, tasks, monkeypatch, caplog):
    pytest.importorskip("lm_eval", reason=NO_LM_EVAL)
    import logging

    from mot_transition.harness import evaluate_tasks

    monkeypatch.setattr("lm_eval.simple_evaluate", lambda *args, **kwargs: {"results": {"tiny_choice": {"acc,none": 0.5}}})
    with caplog.at_level(logging.INFO):
        assert evaluate_tasks(checkpoint, ["tiny_choice"], tasks) == {"tiny_choice": {"acc": 0.5}}
    noticed = [r.getMessage() for r in caplog.records if r.name.startswith("lm_eval.models") and r.levelno >= logging.WARNING]
    assert not noticed, noticed


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
    pytest.importorskip("lm_eval", reason=NO_LM_EVAL)
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


@pytest.fixture
def not_evaluated(monkeypatch):
    import mot_transition.cli.compare as compare_cli

    def evaluated(*args, **kwargs):
        raise AssertionError("the runs were evaluated before the checks")

    monkeypatch.setattr(compare_cli, "compare_runs", evaluated)


def test_compare_checks_its_plot_destination_before_evaluating_any_model(tmp_path, capsys, not_evaluated):
    (tmp_path / "plots").mkdir()
    code, _, err = run_cli(["compare", tmp_path / "run", "--plot", tmp_path / "plots"], capsys)
    assert one_error_line(code, err, f"--plot {tmp_path / 'plots'} is a folder"), err


@pytest.mark.parametrize("name, words", [
    ("plot.txt", "ends in .txt; give an image file name"), ("plot", "has no file extension"), ("old.png", "already exists; pass --force"),
])
def test_compare_plot_must_be_a_new_image_file_unless_forced(tmp_path, capsys, not_evaluated, name, words):
    (tmp_path / "old.png").write_text("keep me")
    code, _, err = run_cli(["compare", tmp_path / "run", "--plot", tmp_path / name], capsys)
    assert one_error_line(code, err, f"--plot {tmp_path / name}", words), err
    assert (tmp_path / "old.png").read_text() == "keep me"


@LM_EVAL  # lm-eval's own YAML loader reads them
def test_compare_checks_its_task_files_before_evaluating_any_model(tmp_path, capsys, tasks, not_evaluated):
    (tasks / "broken.yaml").write_text("task: [broken\n")
    code, _, err = run_cli(["compare", tmp_path / "run", "--tasks", "tiny_choice", "--include-path", tasks], capsys)
    assert one_error_line(code, err, f"{tasks / 'broken.yaml'} is not a task file lm-eval reads"), err


@pytest.fixture(scope="module")
def mot_checkpoint(tmp_path_factory, checkpoint):
    return saved_model(tmp_path_factory.mktemp("mot") / "mot", "mot", checkpoint)


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


def test_a_recipe_or_override_nested_100000_deep_is_one_line(tmp_path, capsys):
    deep = "[" * 100_000 + "]" * 100_000
    (tmp_path / "deep.toml").write_text(f'name = "deep"\n[model]\nn_embd = {deep}\n')
    code, _, err = run_cli(["train", tmp_path / "deep.toml", "--out", tmp_path / "run"], capsys)
    assert one_error_line(code, err, f"recipe {tmp_path / 'deep.toml'}", "recursion limit"), err
    code, _, err = run_cli(["train", "tiny", f"model.n_embd={deep}", "--out", tmp_path / "run"], capsys)
    assert one_error_line(code, err, "recipe key 'model.n_embd' must be an integer"), err
    assert not (tmp_path / "run").exists()


def test_a_training_device_this_machine_lacks_is_one_line_before_the_data(tmp_path, capsys, monkeypatch):
    import torch

    import mot_transition.train.trainer as trainer_module
    from mot_transition.train.devices import pick_device

    def never(*args, **kwargs):
        raise AssertionError("the data was prepared before the device was checked")

    monkeypatch.setattr(trainer_module, "prepare_run_data", never)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    for device, words in (("cuda", "no CUDA device is available"), ("mps", "no MPS device is available"), ("tpu", "must be auto, cpu, cuda")):
        code, _, err = run_cli(["train", "tiny", f"train.device={device}", "--out", tmp_path / "run"], capsys)
        assert one_error_line(code, err, "train.device", words), err
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert pick_device("cuda", local_rank=1) == torch.device("cuda:1") and pick_device("cuda:0") == torch.device("cuda:0")
    for name, rank, words in (("cuda:2", 0, "'cuda:2': this machine has 2 CUDA devices"), ("cuda", 2, "so local rank 2 takes 'cuda:2'")):
        with pytest.raises(ValueError, match=words):
            pick_device(name, local_rank=rank)
