"""The end-to-end main job on a micro recipe, and what it leaves behind: converted and
transition-tuned checkpoints that serve one sequence at a time."""

import json

import pytest
import torch

from conftest import LM_EVAL, run_cli
from mot_transition.generate import generate, load_for_inference

MICRO = [
    "train.steps=8", "train.eval_every=4", "train.checkpoint_every=4", "train.batch_size=8", "train.log_every=1",
    "model.n_embd=32", "model.n_head=2", "model.n_expert=8", "model.group_size=4",
    "data.max_bytes=200000", "data.vocab_size=384", "data.seq_len=32", "data.eval_batch_size=8", "data.eval_batches=2",
    "optim.warmup_steps=2",
]


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory):
    out = tmp_path_factory.mktemp("pipeline")
    cache = tmp_path_factory.mktemp("cache")
    mp = pytest.MonkeyPatch()
    mp.setenv("MOT_TRANSITION_CACHE", str(cache))
    from mot_transition.pipeline import run_pipeline

    comparison = run_pipeline("tiny", out / "run", MICRO + [f"data.cache_dir={json.dumps(str(cache))}"], transition_steps=2, progress=False, log=lambda *a: None)
    yield out / "run", comparison
    mp.undo()


def test_run_writes_every_stage_and_the_comparison_of_design_10_2(pipeline):
    out, comparison = pipeline
    measures = [row["measure"] for row in comparison["rows"]]
    assert measures[:3] == ["pre-switch loss (MoT, grouped)", "MoT unbatched loss (group_size=1)", "post-switch loss at step 0"]
    assert measures[3] == "post-switch loss at step 2" and measures[4].startswith("Token Choice from scratch, step 10")
    assert all(row["loss"] > 0 and abs(row["perplexity"] - torch.tensor(row["loss"]).exp().item()) < 1e-3 for row in comparison["rows"])
    for path in ("mot/metrics.jsonl", "token_choice/conversion_report.json", "transition/transition.json",
                 "transition/comparison.json", "baseline/metrics.jsonl"):
        assert (out / path).is_file(), path
    assert (out / "transition" / "loss_curves.png").stat().st_size > 1000


def test_pre_switch_loss_is_the_mot_runs_own_held_out_loss_and_recovery_follows_design_10_2(pipeline):
    out, comparison = pipeline
    result = json.loads((out / "transition" / "transition.json").read_text())
    mot_final = [json.loads(line) for line in (out / "mot" / "metrics.jsonl").read_text().splitlines()][-1]["eval_loss"]
    assert abs(result["pre_switch_loss"] - mot_final) < 1e-6  # the same held-out batches, grouped the same way
    assert result["mot_unbatched_loss"] != result["pre_switch_loss"]
    pre, curve = result["pre_switch_loss"], result["curve"]
    assert result["recovery_step"] == next((p["step"] for p in curve if p["loss"] <= pre * 1.02), None)
    assert result["full_recovery_step"] == next((p["step"] for p in curve if p["loss"] <= pre), None)
    assert comparison["recovery_step"] == result["recovery_step"]


def test_post_switch_loss_one_sequence_at_a_time_equals_batched(pipeline):
    out, _ = pipeline
    curve = json.loads((out / "transition" / "transition.json").read_text())["curve"]
    assert [p["step"] for p in curve] == [0, 1, 2]
    for point in curve:
        assert abs(point["loss"] - point["loss_batched"]) < 1e-4


def test_generate_one_prompt_gives_the_same_tokens_as_inside_a_batch(pipeline):
    out, _ = pipeline
    model, tokenizer, warning = load_for_inference(out / "transition")  # a run dir: its latest checkpoint
    assert warning is None and model.config.ffn_type == "token_choice"
    prompts = ["def main(", "import os\nclass Parser:", "x = 1"]  # short: the micro model's context is 32
    batched = generate(model, tokenizer, prompts, max_new_tokens=8)
    for prompt, text in zip(prompts, batched):
        assert generate(model, tokenizer, [prompt], max_new_tokens=8) == [text]


def test_generate_cli_streams_and_warns_what_a_mot_checkpoint_costs_alone(pipeline, capsys):
    out, _ = pipeline
    code, stdout, stderr = run_cli(["generate", out / "mot", "--prompt", "def f(", "--max-new-tokens", "5"], capsys)
    assert code == 0 and stdout.startswith("def f(") and len(stdout) > len("def f(")
    assert "group_size=1" in stderr and "8 experts" in stderr
    code, stdout, stderr = run_cli(["generate", out / "transition", "--prompt", "def f(", "--temperature", "0.8", "--top-p", "0.9"], capsys)
    assert code == 0 and "warning" not in stderr


def test_transition_refuses_an_unconverted_mot_checkpoint_with_one_line(pipeline, capsys, tmp_path):
    out, _ = pipeline
    code, _, stderr = run_cli(["transition", out / "mot", "--steps", "2", "--out", tmp_path / "t"], capsys)
    assert code == 1 and "convert" in stderr and len(stderr.strip().splitlines()) == 1
    assert not (tmp_path / "t").exists()


def test_transition_refuses_a_non_finite_learning_rate_with_one_line(pipeline, capsys, tmp_path):
    out, _ = pipeline
    code, _, stderr = run_cli(["transition", out / "token_choice", "--steps", "2", "--lr", "inf", "--out", tmp_path / "t"], capsys)
    assert code == 1 and "--lr must be a finite number > 0, got inf" in stderr and len(stderr.strip().splitlines()) == 1
    assert not (tmp_path / "t").exists()


def test_compare_cli_prints_the_table_and_recovery(pipeline, capsys):
    out, _ = pipeline
    code, stdout, _ = run_cli(["compare", out], capsys)
    assert code == 0 and "pre-switch loss" in stdout and "recovery" in stdout and "Token Choice from scratch" in stdout


def test_calibrated_conversion_of_a_trained_checkpoint_reports_its_scales(pipeline, tmp_path, capsys):
    out, _ = pipeline
    code, stdout, stderr = run_cli(["convert", out / "mot", tmp_path / "tc", "--calibrate", "2"], capsys)
    assert code == 0, stderr
    report = json.loads((tmp_path / "tc" / "conversion_report.json").read_text())
    calibration = report["calibration"]
    assert calibration["batches"] == 2 and set(calibration["scales"]) == {"2", "3"}
    assert all(calibration["mse_after"][k] <= calibration["mse_before"][k] for k in calibration["scales"])


def test_every_saved_tokenizer_is_ready_for_batched_generation_with_pipeline(pipeline):
    """Left padding, the model's context as model_max_length, a pad token: `pipeline` and batched
    `generate` need no adjustment, and a batch gives each prompt's own continuation."""
    import warnings

    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers import pipeline as hf_pipeline

    from mot_transition.train.checkpoint import latest_checkpoint

    out, _ = pipeline
    for stage in ("mot", "token_choice", "transition", "baseline"):
        directory = out / stage if (out / stage / "config.json").is_file() else latest_checkpoint(out / stage)
        tokenizer = AutoTokenizer.from_pretrained(directory)
        model = AutoModelForCausalLM.from_pretrained(directory)
        assert tokenizer.padding_side == "left" and tokenizer.pad_token_id is not None, stage
        assert tokenizer.model_max_length == model.config.n_positions, stage
    model.eval()  # the Token Choice baseline: per-sequence, so a batch must not change a continuation
    generator = hf_pipeline("text-generation", model=model, tokenizer=tokenizer)
    prompts = ["The", "A much longer prompt than the first one"]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        batched = generator(prompts, batch_size=2, max_new_tokens=5, do_sample=False)
    alone = [generator(p, max_new_tokens=5, do_sample=False) for p in prompts]
    assert [b[0]["generated_text"] for b in batched] == [a[0]["generated_text"] for a in alone]
    assert not [w for w in caught if "padding" in str(w.message).lower()]


def test_transition_logs_every_step_like_train_and_train_draws_its_loss_curves(pipeline):
    out, _ = pipeline
    records = [json.loads(line) for line in (out / "transition" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2]
    assert all(r["lm_loss"] > 0 and r["aux_loss"] is not None and r["lr"] > 0 for r in records)
    curve = json.loads((out / "transition" / "transition.json").read_text())["curve"]
    assert records[-1]["eval_loss"] == curve[-1]["loss"]  # the post-switch loss, one sequence at a time
    for stage in ("mot", "baseline"):
        assert (out / stage / "loss_curves.png").stat().st_size > 1000


def _local_task(folder):
    """A two-choice task from a local JSONL file: lm-eval reads it with no download."""
    rows = [{"context": "The cat sat on the", "choices": [" mat", " moon"], "label": 0},
            {"context": "One, two,", "choices": [" three", " banana"], "label": 0},
            {"context": "Water is", "choices": [" wet", " loud"], "label": 1}]
    (folder / "tiny.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (folder / "tiny.yaml").write_text(
        "task: tiny_choice\ndataset_path: json\ndataset_kwargs:\n  data_files:\n"
        f"    test: {folder / 'tiny.jsonl'}\ntest_split: test\noutput_type: multiple_choice\n"
        'doc_to_text: "{{context}}"\ndoc_to_choice: "{{choices}}"\ndoc_to_target: label\nmetric_list:\n  - metric: acc\n'
    )
    return folder


@LM_EVAL
def test_eval_scores_a_converted_checkpoint_on_a_local_task_and_refuses_mot_in_one_line(pipeline, tmp_path, capsys, monkeypatch):
    from conftest import run_cli
    from mot_transition.harness import evaluate_tasks

    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "datasets"))
    out, _ = pipeline
    tasks = _local_task(tmp_path)
    scores = evaluate_tasks(out / "token_choice", ["tiny_choice"], include_path=tasks)
    assert set(scores) == {"tiny_choice"} and scores["tiny_choice"]["acc"] in (0.0, 1 / 3, 2 / 3, 1.0)
    code, stdout, _ = run_cli(["eval", out / "token_choice", "--tasks", "tiny_choice", "--include-path", tasks,
                               "--out", tmp_path / "scores.json"], capsys)
    assert code == 0 and "tiny_choice" in stdout
    assert json.loads((tmp_path / "scores.json").read_text()) == scores  # the same requests, the same scores
    code, _, stderr = run_cli(["eval", out / "mot", "--tasks", "tiny_choice", "--include-path", tasks], capsys)
    assert code == 1 and "convert it first" in stderr and "--group-size 1" in stderr and len(stderr.strip().splitlines()) == 1
    per_sequence = evaluate_tasks(out / "mot", ["tiny_choice"], include_path=tasks, group_size=1)
    assert set(per_sequence["tiny_choice"]) >= {"acc"}
    code, _, stderr = run_cli(["eval", out / "token_choice", "--tasks", "no_such_task", "--include-path", tasks], capsys)
    assert code == 1 and "unknown task" in stderr


@LM_EVAL
def test_compare_adds_the_task_scores_of_every_model_it_compares(pipeline, tmp_path, capsys, monkeypatch):
    from conftest import run_cli

    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "datasets"))
    out, _ = pipeline
    tasks = _local_task(tmp_path)
    code, stdout, _ = run_cli(["compare", out, "--tasks", "tiny_choice", "--include-path", tasks], capsys)
    assert code == 0 and "lm-eval task scores" in stdout
    scores = json.loads((out / "transition" / "comparison.json").read_text())["task_scores"]
    assert len(scores) == 3 and all(set(by_task) == {"tiny_choice"} for by_task in scores.values())


def test_the_llama_path_as_a_user_types_it_ends_in_a_model_plain_transformers_serves(tmp_path, capsys, monkeypatch):
    """docs/transition.md: train tiny-llama, convert, transition-tune (`run`), export to Qwen3-MoE,
    then load model and tokenizer with transformers alone and generate."""
    import subprocess
    import sys

    monkeypatch.setenv("MOT_TRANSITION_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "llama"
    code, _, err = run_cli(["run", "tiny-llama", "--out", out, "--transition-steps", "2", "--no-baseline", *MICRO], capsys)
    assert code == 0, err
    code, stdout, err = run_cli(["export", out / "transition", out / "native"], capsys)
    assert code == 0 and "same greedy tokens" in stdout and "yes" in stdout, err
    # the tokenizer class by the name transformers 4.x knows too (llama.cpp's converter pins 4.x)
    assert json.loads((out / "native" / "tokenizer_config.json").read_text())["tokenizer_class"] == "PreTrainedTokenizerFast"
    script = (
        "import sys; sys.modules['mot_transition'] = None\n"
        "from transformers import AutoModelForCausalLM, AutoTokenizer\n"
        f"path = {str(out / 'native')!r}\n"
        "tok = AutoTokenizer.from_pretrained(path); model = AutoModelForCausalLM.from_pretrained(path)\n"
        "ids = tok(['def main(', 'import os'], return_tensors='pt', padding=True)\n"
        "new = model.generate(**ids, max_new_tokens=5, do_sample=False)\n"
        "print(type(model).__name__, new.shape[1] - ids['input_ids'].shape[1])\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split() == ["Qwen3MoeForCausalLM", "5"]
