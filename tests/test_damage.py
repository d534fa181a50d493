"""Damaged files give one line, never a traceback, and resume falls back to the newest intact
checkpoint (issue 13, items 8 and 10); odd but valid input works (an empty prompt, the path `.`)."""

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import run_cli
from mot_transition.train import latest_checkpoint, recipe_from_dict, recipe_to_toml, train
from mot_transition.train.checkpoint import check_training_checkpoint, list_checkpoints, resumable_checkpoint


def raw_recipe(data_dir: Path) -> dict:
    return {
        "name": "damage", "seed": 2,
        "model": {"ffn_type": "dense", "n_embd": 32, "n_layer": 2, "n_head": 2},
        "data": {"source": str(data_dir / "corpus.txt"), "heldout_fraction": 0.1, "vocab_size": 300, "seq_len": 32,
                 "eval_batches": 2, "eval_batch_size": 4, "cache_dir": str(data_dir / "cache")},
        "optim": {"lr": 3e-3, "warmup_steps": 2},
        "train": {"steps": 6, "batch_size": 8, "eval_every": 3, "checkpoint_every": 2, "keep_checkpoints": 3},
    }


@pytest.fixture(scope="module")
def finished(data_dir, tmp_path_factory):
    """An uninterrupted run: checkpoints at steps 2, 4, 6."""
    run = tmp_path_factory.mktemp("finished") / "run"
    train(recipe_from_dict(raw_recipe(data_dir)), run, progress=False)
    return run


def interrupted_copy(finished: Path, tmp_path: Path, keep_steps=(2, 4)) -> Path:
    """The finished run as a run killed after step 4: checkpoints 2 and 4, metrics up to step 4."""
    import shutil

    run = tmp_path / "run"
    shutil.copytree(finished, run)
    for checkpoint in (run / "checkpoints").iterdir():
        if int(checkpoint.name.removeprefix("step-")) not in keep_steps:
            shutil.rmtree(checkpoint)
    lines = (run / "metrics.jsonl").read_text().splitlines()
    (run / "metrics.jsonl").write_text("".join(line + "\n" for line in lines if json.loads(line)["step"] <= max(keep_steps)))
    return run


def truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def same_weights(a: Path, b: Path) -> bool:
    x, y = load_file(a / "model.safetensors"), load_file(b / "model.safetensors")
    return x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)


@pytest.mark.parametrize("damage", ["state_tensors", "state_json", "weights"])
def test_resume_skips_a_damaged_newest_checkpoint_and_ends_bit_identical(data_dir, finished, tmp_path, damage):
    run = interrupted_copy(finished, tmp_path)
    newest = run / "checkpoints" / "step-000004"
    target = {"state_tensors": "training_state.safetensors", "state_json": "training_state.json", "weights": "model.safetensors"}[damage]
    truncate(newest / target)
    checkpoint, skipped = resumable_checkpoint(run)
    assert checkpoint.name == "step-000002" and skipped[0][0] == newest and target in skipped[0][1]
    with pytest.warns(UserWarning, match=rf"skipping the damaged checkpoint step-000004 .*{target}.*set aside as \.damaged-step-000004; resuming from step-000002"):
        result = train(recipe_from_dict(raw_recipe(data_dir)), run, resume=True, progress=False)
    assert result.step == 6
    assert (run / "checkpoints" / ".damaged-step-000004" / target).exists()  # kept for a look, out of the way
    assert [p.name for p in list_checkpoints(run)] == ["step-000002", "step-000004", "step-000006"]
    assert same_weights(result.checkpoint, latest_checkpoint(finished))
    steps = [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4, 5, 6]


@pytest.mark.parametrize("content, words", [
    ("[1, 2]", "not a JSON object"),
    ('{"step": 2, "data": {}, "optimizer": {}}', "no 'recipe'"),
    ('{"step": 2, "data"', "not valid JSON"),
])
def test_a_run_whose_only_checkpoint_is_damaged_is_one_line_naming_the_file(data_dir, finished, tmp_path, capsys, content, words):
    run = interrupted_copy(finished, tmp_path, keep_steps=(2,))
    (run / "checkpoints" / "step-000002" / "training_state.json").write_text(content)
    with pytest.raises(ValueError, match="training_state.json"):
        check_training_checkpoint(run / "checkpoints" / "step-000002")
    recipe_file = tmp_path / "r.toml"
    recipe_file.write_text(recipe_to_toml(recipe_from_dict(raw_recipe(data_dir))))
    code, out, err = run_cli(["train", recipe_file, "--out", run, "--resume", "--quiet"], capsys)
    assert code == 1 and err.startswith("error: no intact checkpoint") and words in err and len(err.strip().splitlines()) == 1, err


def test_a_half_written_last_metrics_line_does_not_block_resume(data_dir, finished, tmp_path):
    run = interrupted_copy(finished, tmp_path)
    with open(run / "metrics.jsonl", "a") as handle:
        handle.write('{"step": 5, "lr": 0.00')  # killed while writing step 5's record
    result = train(recipe_from_dict(raw_recipe(data_dir)), run, resume=True, progress=False)
    assert same_weights(result.checkpoint, latest_checkpoint(finished))
    steps = [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4, 5, 6]


def test_a_damaged_metrics_line_in_the_middle_is_one_line_naming_it(data_dir, finished, tmp_path, capsys):
    run = interrupted_copy(finished, tmp_path)
    lines = (run / "metrics.jsonl").read_text().splitlines()
    lines[1] = "garbage"
    (run / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    with pytest.raises(ValueError, match=r"metrics.jsonl line 2 is not a metrics record"):
        train(recipe_from_dict(raw_recipe(data_dir)), run, resume=True, progress=False)


def test_an_empty_prompt_starts_a_new_document(finished, capsys):
    from mot_transition.generate import generate, load_for_inference

    checkpoint = latest_checkpoint(finished)
    model, tokenizer, _ = load_for_inference(checkpoint)
    start = torch.tensor([[tokenizer.eos_token_id]])
    expected = model.generate(start, attention_mask=torch.ones_like(start), max_new_tokens=4, do_sample=False,
                              pad_token_id=tokenizer.pad_token_id)[0, 1:]
    assert generate(model, tokenizer, [""], max_new_tokens=4) == [tokenizer.decode(expected, skip_special_tokens=True)]
    batch = generate(model, tokenizer, ["", "def main("], max_new_tokens=4)
    assert batch[0] == generate(model, tokenizer, [""], max_new_tokens=4)[0]
    code, out, err = run_cli(["generate", checkpoint, "--prompt", "", "--max-new-tokens", "3"], capsys)
    assert code == 0, err


def test_generate_says_when_the_context_caps_it_and_refuses_a_prompt_past_it_before_echoing(finished, capsys):
    from mot_transition.checkpoint_io import load_config

    checkpoint = latest_checkpoint(finished)
    context = load_config(checkpoint).n_positions
    code, out, err = run_cli(["generate", checkpoint, "--prompt", "a", "--max-new-tokens", str(10 * context)], capsys)
    assert code == 0 and "warning:" in err and f"not {10 * context}" in err, err
    code, out, err = run_cli(["generate", checkpoint, "--prompt", " a" * (4 * context)], capsys)
    assert code == 1 and out == "" and err.startswith("error: the prompt is") and len(err.strip().splitlines()) == 1, err


def test_the_current_directory_works_as_a_source_and_is_refused_as_a_destination(finished, tmp_path, capsys, monkeypatch):
    checkpoint = latest_checkpoint(finished)
    monkeypatch.chdir(checkpoint)
    code, out, err = run_cli(["generate", ".", "--prompt", "a", "--max-new-tokens", "2"], capsys)
    assert code == 0, err
    code, out, err = run_cli(["info", "."], capsys)
    assert code == 0, err
    from conftest import tiny_config
    from mot_transition.modeling import MoTLMHeadModel

    MoTLMHeadModel(tiny_config("mot")).save_pretrained(tmp_path / "mot")
    here = tmp_path / "here"
    (here / "sub").mkdir(parents=True)
    monkeypatch.chdir(here / "sub")
    for destination in (".", ".."):
        code, out, err = run_cli(["convert", tmp_path / "mot", destination, "--force"], capsys)
        assert code == 1 and "is the current directory or holds it" in err and len(err.strip().splitlines()) == 1, err
    assert [p.name for p in here.iterdir()] == ["sub"] and not any((here / "sub").iterdir())


GOOD_TRANSITION = {"source": None, "checkpoint": "x", "steps": 2, "lr": 1e-4, "pre_switch_loss": None, "mot_unbatched_loss": None,
                   "curve": [{"step": 0, "loss": 5.0, "loss_batched": 5.0}, {"step": 2, "loss": 4.0, "loss_batched": 4.0}]}


@pytest.mark.parametrize("change, words", [
    ({"curve": []}, "its curve is empty"),
    ({"extra": 1}, "unknown key 'extra'"),
    ({"curve": [{"step": 0, "loss": "5"}]}, "without step, loss and loss_batched"),
    ({"curve": None}, "its curve is empty"),
])
def test_compare_of_a_damaged_transition_record_is_one_line(tmp_path, capsys, change, words):
    from mot_transition.transition import load_transition

    run = tmp_path / "transition"
    run.mkdir()
    (run / "transition.json").write_text(json.dumps(GOOD_TRANSITION))
    assert load_transition(run).final_loss == 4.0
    (run / "transition.json").write_text(json.dumps({**GOOD_TRANSITION, **change}))
    code, out, err = run_cli(["compare", run], capsys)
    assert code == 1 and words in err and "transition.json" in err and len(err.strip().splitlines()) == 1, err
    (run / "transition.json").write_text("[1, 2")
    code, out, err = run_cli(["compare", run], capsys)
    assert code == 1 and "not valid JSON" in err and len(err.strip().splitlines()) == 1, err


def test_compare_takes_one_run_of_each_kind_and_the_same_run_twice_as_one(tmp_path, capsys):
    from mot_transition.compare import find_runs

    for name in ("a", "b"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "transition.json").write_text(json.dumps(GOOD_TRANSITION))
    assert find_runs([tmp_path / "a", tmp_path / "a"])["transition"] == tmp_path / "a"
    code, out, err = run_cli(["compare", tmp_path / "a", tmp_path / "b"], capsys)
    assert code == 1 and "are each a transition run" in err and len(err.strip().splitlines()) == 1, err
    for name in ("c", "d"):  # two baselines: which one compare drew was the last given
        (tmp_path / name).mkdir()
        (tmp_path / name / "metrics.jsonl").write_text("")
        (tmp_path / name / "recipe.toml").write_text('[model]\nffn_type = "token_choice"\n')
    with pytest.raises(ValueError, match="each a baseline"):
        find_runs([tmp_path / "a", tmp_path / "c", tmp_path / "d"])


@pytest.mark.parametrize("field, value", [("mot_temperature", {"__float__": "Infinity"}), ("n_expert", 32.0), ("layer_norm_epsilon", -5)])
def test_a_config_json_with_a_bad_value_is_one_line_naming_file_and_field(tmp_path, capsys, field, value):
    from conftest import tiny_config
    from mot_transition.modeling import MoTLMHeadModel

    MoTLMHeadModel(tiny_config("mot")).save_pretrained(tmp_path / "ckpt")
    config = json.loads((tmp_path / "ckpt" / "config.json").read_text())
    (tmp_path / "ckpt" / "config.json").write_text(json.dumps({**config, field: value}))
    for command in (["info", tmp_path / "ckpt"], ["convert", tmp_path / "ckpt", tmp_path / "out"]):
        code, out, err = run_cli(command, capsys)
        assert code == 1 and "config.json" in err and field in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "out").exists()


def test_run_resume_with_a_damaged_pipeline_json_is_one_line(tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    (out / "pipeline.json").write_text('{"recipe": ')
    code, _, err = run_cli(["run", "tiny", "--out", out, "--resume"], capsys)
    assert code == 1 and "pipeline.json is truncated or corrupted" in err and len(err.strip().splitlines()) == 1, err


@pytest.mark.parametrize("content", ["[1, 2]", '{"step": 1, "recipe": '])
def test_convert_of_a_checkpoint_with_a_damaged_training_state_is_one_line(tmp_path, capsys, content):
    from conftest import tiny_config
    from mot_transition.modeling import MoTLMHeadModel

    MoTLMHeadModel(tiny_config("mot")).save_pretrained(tmp_path / "ckpt")
    (tmp_path / "ckpt" / "training_state.json").write_text(content)
    code, _, err = run_cli(["convert", tmp_path / "ckpt", tmp_path / "out"], capsys)
    assert code == 1 and "training_state.json" in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "out").exists()
