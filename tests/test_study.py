"""`mot-transition study` (issue 14): the runs it leaves, its accounting on steps, FLOPs and time,
its report, and that a stopped study goes on where it stopped."""

import contextlib
import io
import json
import sys

import pytest

from conftest import interrupted_after, tree_digest
from mot_transition.study import accounting
from mot_transition.study.accounting import first_reaching, loss_at, points
from mot_transition.study.report import LARGER, ONE_SEED, WITHIN, agreeing, judge, verdict

MICRO = [
    "model.n_embd=32", "model.n_layer=2", "model.n_head=2", "model.n_expert=4", "model.group_size=4", "model.moe_layers=none",
    "train.steps=20", "train.eval_every=5", "train.checkpoint_every=10", "train.batch_size=8", "optim.warmup_steps=2",
    "data.seq_len=32", "data.eval_batches=1", "data.eval_batch_size=8", "data.vocab_size=300", "data.max_bytes=none",
]
OPTIONS = ["--temperatures", "0.5", "--calibrate", "2", "--quiet"]
RUNS = ["dense", "mot", "token_choice", "converted", "transition-5pct", "transition-10pct", "transition-20pct", "mot-T0.5"]


def study_cli(args) -> tuple[int, str, str]:
    """`mot-transition study ARGS` in this process, as a user types it: (exit code, stdout, stderr).
    (conftest's run_cli needs capsys, which a module-scoped fixture cannot have.)"""
    from mot_transition.cli import main

    out, err, argv = io.StringIO(), io.StringIO(), sys.argv
    sys.argv = ["mot-transition", "study", *map(str, args)]
    code = 0
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            main()
    except SystemExit as exit:
        code = exit.code if isinstance(exit.code, int) else 1
    finally:
        sys.argv = argv
    return code, out.getvalue(), err.getvalue()


@pytest.fixture(scope="module")
def corpus(data_dir, tmp_path_factory):
    mp = pytest.MonkeyPatch()
    mp.setenv("MOT_TRANSITION_CACHE", str(tmp_path_factory.mktemp("cache")))
    yield [*MICRO, f"data.source={json.dumps(str(data_dir / 'corpus.txt'))}"]
    mp.undo()


@pytest.fixture(scope="module")
def study(corpus, tmp_path_factory):
    out = tmp_path_factory.mktemp("study") / "two-seeds"
    code, stdout, stderr = study_cli(["tiny", *corpus, "--seeds", "2", "--out", out, *OPTIONS])
    assert code == 0, stderr
    return out, stdout, json.loads((out / "results.json").read_text())


def test_a_study_leaves_every_run_of_every_seed_and_its_report(study):
    out, stdout, results = study
    for seed in ("seed-0", "seed-1"):
        for run in RUNS:
            assert (out / seed / run).is_dir(), (seed, run)
        for measured in ("spike.json", "mot-T0.5.json"):
            assert (out / seed / measured).is_file()
        for run in ("transition-5pct", "transition-10pct", "transition-20pct"):
            assert json.loads((out / seed / run / "transition.json").read_text())["steps"] == {"5": 1, "10": 2, "20": 4}[run.split("-")[1][:-3]]
    assert [seed["seed"] for seed in results["seeds"]] == [0, 1]
    assert json.loads((out / "study.json").read_text())["options"] == {"seeds": 2, "transitions": [5.0, 10.0, 20.0], "temperatures": [0.5], "calibrate": 2}
    assert "report: " in stdout and "reached dense's final loss" in stdout


def test_the_report_names_its_axis_in_every_table_with_means_spreads_and_verdicts(study):
    out, _, results = study
    report = (out / "report.md").read_text()
    for heading in ("## At equal steps", "## At equal training FLOPs", "## At equal wall-clock time on this machine",
                    "## The paper's measure: when a model first reaches dense's final loss", "## The switch",
                    "## Transition tuning: recovery", "## The MoT controller temperature", "## What the seeds can tell apart"):
        assert heading in report, heading
    mot = [seed["curves"]["mot"][-1]["loss"] for seed in results["seeds"]]
    mean, low, high = sum(mot) / 2, min(mot), max(mot)
    std = abs(mot[0] - mot[1]) / 2 ** 0.5
    assert "| MoT | 20 | " in report and f"{mean:.4f} ± {std:.4f} ({low:.4f}–{high:.4f})" in report
    assert f"{LARGER}" in report or f"{WITHIN}" in report
    assert "Differences larger than the seed spread:" in report and "Differences within the seed spread" in report
    assert "| 1 (default) |" in report and "| 2 |" in report and "| 4 |" in report  # top-k 1, 2, 4 <= E = 4
    assert "| 0.5 |" in report and "| 0.1 (recipe) |" in report
    assert "no spread can be estimated" not in report
    pytest.importorskip("matplotlib")
    for png in ("curves.png", "spike.png", "temperature.png"):
        assert (out / png).stat().st_size > 5000 and f"]({png})" in report


def test_without_matplotlib_the_report_has_every_table_and_says_the_plots_were_skipped(study, tmp_path, monkeypatch):
    from mot_transition.study.plots import write_plots
    from mot_transition.study.report import write_report

    out, _, results = study
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib raises ImportError
    assert write_plots(tmp_path, results["seeds"]) is None and not list(tmp_path.glob("*.png"))
    report = write_report(tmp_path, results["study"], results["seeds"], None).read_text()
    assert report.count("skipped: matplotlib is not installed") == 3 and "](curves.png)" not in report
    assert report.count("## ") == (out / "report.md").read_text().count("## ")


def test_flops_on_the_curves_are_the_hand_counted_matmuls_of_the_micro_models(study):
    """d 32, 2 blocks (the second MoT: E 4, g 4, experts of 4d g / E = 128), S 32, a batch of 8:
    multiply-adds of one token written out, times 2, times 3 for training."""
    out, _, results = study
    vocab = json.loads((out / "seed-0" / "converted" / "config.json").read_text())["vocab_size"]
    d, S, E, g, f, tokens = 32, 32, 4, 4, 128, 8 * 32
    attention = 4 * d * d + 2 * d * S  # q, k, v, o; scores and weighted sum over S positions
    dense_ffn = 2 * d * 4 * d
    mot_ffn = d * E + E * d + E * d + E * 2 * d * f / g  # controller, mixing, emitting, E experts on one mixture per g tokens
    top1_ffn = d * E + 1 * 2 * d * f  # router, one expert
    per_step = {name: 3 * 2 * (2 * attention + dense_ffn + ffn + d * vocab) * tokens
                for name, ffn in (("dense", dense_ffn), ("mot", mot_ffn), ("token_choice", top1_ffn))}
    curves = results["seeds"][0]["curves"]
    assert curves["dense"][-1]["flops"] == pytest.approx(20 * per_step["dense"], rel=1e-12)
    assert curves["mot"][-1]["flops"] == pytest.approx(20 * per_step["mot"], rel=1e-12)
    assert curves["token_choice"][-1]["flops"] == pytest.approx(24 * per_step["token_choice"], rel=1e-12)
    transition = curves["transition-20pct"]  # the MoT run's FLOPs, steps and time first
    assert transition[-1]["flops"] == pytest.approx(20 * per_step["mot"] + 4 * per_step["token_choice"], rel=1e-12)
    assert transition[0]["step"] == 20 and transition[-1]["step"] == 24
    assert transition[0]["seconds"] == curves["mot"][-1]["seconds"] < transition[-1]["seconds"]
    metrics = [json.loads(line) for line in (out / "seed-0" / "mot" / "metrics.jsonl").read_text().splitlines()]
    assert curves["mot"][-1]["seconds"] == pytest.approx(sum(r["step_seconds"] for r in metrics))


def test_the_dense_baseline_costs_what_mot_costs_but_the_routing():
    from mot_transition.study import dense_recipe
    from mot_transition.train import load_recipe
    from mot_transition.train.flops import forward_flops_per_token

    mot = load_recipe("tiny")
    dense = dense_recipe(mot)
    mot_config, dense_config = mot.model_config(), dense.model_config()
    assert dense_config.ffn_type == "dense" and dense_config.n_inner == 4 * 128 == mot_config.expert_size * 32 // 16
    routing = len(mot_config.moe_layers) * 6 * 128 * 32  # controller, mixing, emitting: 2 d E each
    assert forward_flops_per_token(mot_config, 128) - forward_flops_per_token(dense_config, 128) == routing
    explicit = dense_recipe(load_recipe("tiny", ["model.expert_size=128"]))
    assert explicit.model.n_inner == 32 * 128 // 16


def test_the_measured_switch_losses_are_the_runs_own(study):
    out, _, results = study
    for index, seed in enumerate(results["seeds"]):
        assert seed["pre_switch_loss"] == pytest.approx(seed["curves"]["mot"][-1]["loss"], abs=1e-6)
        step0 = json.loads((out / f"seed-{index}" / "transition-10pct" / "transition.json").read_text())["curve"][0]["loss"]
        assert seed["spike"]["1"]["plain"] == pytest.approx(step0, abs=1e-4)  # batched = one sequence at a time
        assert seed["mot_unbatched_loss"] != seed["pre_switch_loss"]
        assert set(seed["spike"]["1"]["scales"]) == {"1"}


def test_where_a_curve_first_reaches_a_loss_is_interpolated_between_evaluations():
    seconds = {step: 0.5 if step <= 20 else 1.0 for step in range(1, 31)}
    curve = points([(10, 5.0), (20, 4.0), (30, 3.0)], seconds, per_step=100.0)
    assert [p["seconds"] for p in curve] == [5.0, 10.0, 20.0]
    assert first_reaching(curve, 3.5) == {"step": 25.0, "flops": 2500.0, "seconds": 15.0, "first_evaluation": False}
    assert first_reaching(curve, 4.0)["step"] == 20
    assert first_reaching(curve, 5.5) == {"step": 10, "flops": 1000.0, "seconds": 5.0, "first_evaluation": True}
    assert first_reaching(curve, 2.9) is None  # not reached
    assert loss_at(curve, "step", 15) == pytest.approx(4.5)
    assert loss_at(curve, "seconds", 15.0) == pytest.approx(3.5)
    assert loss_at(curve, "flops", 3000.0) == pytest.approx(3.0)
    assert loss_at(curve, "step", 31) is None and loss_at(curve, "step", 9) is None
    later = points([(0, 6.0), (2, 5.0)], {1: 2.0, 2: 3.0}, per_step=10.0, start=curve[-1])  # a transition after the run
    assert later == [{"step": 30, "flops": 3000.0, "seconds": 20.0, "loss": 6.0}, {"step": 32, "flops": 3020.0, "seconds": 25.0, "loss": 5.0}]
    with pytest.raises(ValueError, match="no record of step 2"):
        accounting.points([(2, 1.0)], {1: 1.0}, per_step=1.0)


def test_a_difference_is_larger_than_the_seed_spread_only_beyond_both_half_ranges():
    assert verdict([1.0, 1.2], [1.5, 1.6]) == LARGER  # 0.45 apart, half-ranges 0.1 and 0.05
    assert verdict([1.0, 1.4], [1.3, 1.5]) == WITHIN  # 0.2 apart, half-range 0.2
    assert verdict([1.0, 1.4, 1.2], [1.0, 1.4, 1.2]) == WITHIN
    assert verdict([1.0], [2.0]) == ONE_SEED
    assert agreeing([1.0, 1.2], [1.5, 1.1]) == "1 of 2 seeds agree"  # the means differ by -0.2: seed 0 -0.5, seed 1 +0.1
    assert judge([1.0, 1.2], [1.5, 1.6]) == f"{LARGER} (2 of 2 seeds agree)" and judge([1.0], [2.0]) == ONE_SEED


def test_a_stopped_study_goes_on_where_it_stopped_and_ends_with_the_numbers_of_one_never_stopped(study, corpus, tmp_path, monkeypatch):
    """Killed in the MoT run (after the dense run finished and MoT's step-10 checkpoint), then the
    same command again: the dense run is not touched, MoT resumes, and every number but the
    wall-clock ones equals the uninterrupted study's seed 0."""
    from mot_transition.study import runs

    out = tmp_path / "stopped"
    original, calls = runs.train, []

    def killed_in_the_second_run(*args, **kwargs):
        calls.append(args[1])
        if len(calls) < 2:
            return original(*args, **kwargs)
        with interrupted_after(10):
            return original(*args, **kwargs)

    monkeypatch.setattr(runs, "train", killed_in_the_second_run)
    args = ["tiny", *corpus, "--seeds", "1", "--out", out, *OPTIONS]
    code, _, stderr = study_cli(args)
    assert code == 130  # as a Ctrl-C leaves it
    assert [p.name for p in calls] == ["dense", "mot"] and (out / "seed-0" / "mot" / "checkpoints" / "step-000010").is_dir()
    monkeypatch.setattr(runs, "train", original)
    first_ten = (out / "seed-0" / "mot" / "metrics.jsonl").read_text().splitlines()[:10]
    dense = out / "seed-0" / "dense"
    digest, mtimes = tree_digest(dense), {p: p.stat().st_mtime_ns for p in dense.rglob("*")}
    code, stdout, stderr = study_cli(args)
    assert code == 0, stderr
    assert "dense: 20 steps finished already" in stdout and "training MoT (20 steps)" in stdout
    assert tree_digest(dense) == digest and {p: p.stat().st_mtime_ns for p in dense.rglob("*")} == mtimes
    assert (out / "seed-0" / "mot" / "metrics.jsonl").read_text().splitlines()[:10] == first_ten  # resumed at step 10, not redone
    resumed = json.loads((out / "results.json").read_text())["seeds"][0]
    assert without_seconds(resumed) == without_seconds(study[2]["seeds"][0])
    assert "One seed: no spread can be estimated" in (out / "report.md").read_text()


def without_seconds(tree):
    if isinstance(tree, dict):
        return {k: without_seconds(v) for k, v in tree.items() if k != "seconds"}
    if isinstance(tree, list):
        return [without_seconds(v) for v in tree]
    return tree


def test_a_finished_study_run_again_redoes_nothing_and_other_options_are_refused_in_one_line(study, corpus):
    out = study[0]
    seeds = {seed: tree_digest(out / seed) for seed in ("seed-0", "seed-1")}
    code, stdout, stderr = study_cli(["tiny", *corpus, "--seeds", "2", "--out", out, *OPTIONS])
    assert code == 0, stderr
    assert stdout.count("already") == 2 * 9 and "->" not in stdout  # every stage of both seeds kept, none done
    assert {seed: tree_digest(out / seed) for seed in seeds} == seeds
    for change, named in ((["--seeds", "3"], "was started with --seeds 2, not with --seeds 3; run it again with"),
                          (["--temperatures", "2"], "was started with --temperatures 0.5, not with --temperatures 2;"),  # as typed
                          (["train.steps=30"], "recipe key 'train.steps' is 30 but the study in")):
        args = ["tiny", *corpus, "--seeds", "2", "--out", out, *OPTIONS, *change]
        code, _, stderr = study_cli(args)
        assert code == 1 and named in stderr and len(stderr.strip().splitlines()) == 1, stderr
    assert {seed: tree_digest(out / seed) for seed in seeds} == seeds


@pytest.mark.parametrize("args, code, named", [
    (["tiny-token-choice"], 1, "a study starts from a MoT recipe"),
    (["tiny", "--transitions", "5,x"], 2, "--transitions takes numbers separated by commas"),
    (["tiny", "--seeds", "0"], 1, "--seeds must be an integer >= 1"),
    (["tiny", "train.steps=10", "--transitions", "5,10"], 1, "--transitions 5 and 10 are both 1 step"),
    (["tiny", "data.eval_batch_size=6"], 1, "cannot form groups of 16"),
])
def test_bad_input_is_one_line_and_writes_nothing(tmp_path, args, code, named):
    got, _, stderr = study_cli([*args, "--out", tmp_path / "study"])
    assert got == code and named in stderr and len(stderr.strip().splitlines()) == 1, stderr
    assert not (tmp_path / "study").exists()


def test_a_non_empty_folder_that_is_not_a_study_is_refused(tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    code, _, stderr = study_cli(["tiny", "--out", tmp_path])
    assert code == 1 and "holds no study.json" in stderr and [p.name for p in tmp_path.iterdir()] == ["notes.txt"]


def test_a_comparison_only_one_seed_reached_is_listed_apart_and_does_not_hide_the_others(monkeypatch):
    """With 2 seeds, a budget that one seed's runs did not reach (a wall-clock time, on a loaded
    machine) gives that comparison one value: it is listed as such, and the verdicts of the rest stand."""
    from mot_transition.study import report as study_report

    rows = [
        {"model": "MoT", "baseline": "dense", "loss": [1.0, 1.1], "baseline_loss": [2.0, 2.1], "verdict": LARGER},
        {"model": "Token Choice", "baseline": "dense", "loss": [1.0], "baseline_loss": [1.5], "verdict": ONE_SEED},
    ]
    monkeypatch.setattr(study_report, "equal_budget_rows", lambda results, axis: rows if axis == "seconds" else [])
    seeds = [{"pre_switch_loss": 1.0, "spike": {}, "transitions": {}, "temperatures": {}, "mot_temperature": 0.1}] * 2
    text = "\n".join(study_report._summary(seeds))
    assert "Differences larger than the seed spread:\n\n- " in text and "MoT has a lower loss than dense (2 of 2 seeds agree)" in text
    assert "Measured in one seed only" in text and "Token Choice has a lower loss than dense (1 of 1 seeds agree)" in text
    assert "With one seed" not in text
    assert "With one seed" in "\n".join(study_report._summary(seeds[:1]))
