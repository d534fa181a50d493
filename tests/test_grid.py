"""`mot-transition study GRID.toml` (issue 27): the learning-rate sweep (its pick is the lowest
held-out loss, extended past an edge), the runs of every size and seed, one results file a run,
going on from the results alone (another machine: no checkpoints), and the grid's checks."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from mot_transition.study.grid import GRID_FILE, LR_FILE, load_grid, non_embedding_parameters, plan_size
from mot_transition.study.grid_run import GridRun
from mot_transition.study.grid_report import KINDS as KIND_NAMES
from mot_transition.study.runs import machine
from test_study import MICRO, study_cli

SHAPE = [o for o in MICRO if not o.startswith(("train.steps", "train.eval_every", "train.checkpoint_every", "optim.warmup", "model.n_embd"))]
SHAPE[SHAPE.index("model.moe_layers=none")] = "model.moe_layers=[1]"


def grid_text(source: str, results: str, sweep="[3e-3, 1e-2]", extend=1, sizes=((16, 1),), more="") -> str:
    """A grid file; `sizes`: (n_embd, seeds) a size, each at 1.5 tokens per parameter."""
    overrides = json.dumps([*SHAPE, f"data.source={json.dumps(source)}"])
    return (f"recipe = 'tiny'\noverrides = {overrides}\nresults = {json.dumps(results)}\ntransitions = [10, 20]\n"
            f"evaluations = 4\nsweep = {sweep}\nsweep_extend = {extend}\n{more}"
            + "".join(f"[[size]]\nn_embd = {d}\ntokens_per_parameter = 1.5\nseeds = {seeds}\n" for d, seeds in sizes))


@pytest.fixture(scope="module")
def grid(data_dir, tmp_path_factory):
    mp = pytest.MonkeyPatch()
    mp.setenv("MOT_TRANSITION_CACHE", str(tmp_path_factory.mktemp("cache")))
    where = tmp_path_factory.mktemp("grid")
    path = where / "grid.toml"
    path.write_text(grid_text(str(data_dir / "corpus.txt"), str(where / "results"), sizes=((16, 2), (24, 1))))
    code, stdout, stderr = study_cli([path, "--out", where / "runs", "--quiet"])
    assert code == 0, stderr
    yield path, where, stdout
    mp.undo()


def test_the_sweep_picks_each_kinds_lowest_loss_and_extends_past_an_edge(grid):
    path, where, stdout = grid
    table = json.loads((where / "results" / LR_FILE).read_text())
    assert list(table) == ["d16", "d24"]  # a sweep at every size
    for kind, row in table["d16"].items():
        losses = {float(lr): loss for lr, loss in row["losses"].items()}
        assert row["lr"] == min(losses, key=losses.get)
        values = sorted(losses)
        # the two given values, and a third past the edge where the best of them lay
        assert len(values) == 3 and {3e-3, 1e-2} <= set(values), values
        best_of_two = min((3e-3, 1e-2), key=losses.get)
        assert values[0 if best_of_two == 3e-3 else -1] not in (3e-3, 1e-2)
        for lr in values:  # every sweep value is a finished run of its own, with its results file
            record = json.loads((where / "results" / "d16" / "seed-0" / f"{kind}-lr{lr:g}.json").read_text())
            assert record["lr"] == lr and record["final_loss"] == losses[lr] == record["curve"][-1]["loss"]
    assert "learning rate per size and kind" in stdout


def test_each_size_runs_every_kind_at_its_own_pick_and_the_transitions(grid):
    path, where, _ = grid
    every = json.loads((where / "results" / LR_FILE).read_text())
    for index, size in enumerate(load_grid(path).sizes):
        plan, table = plan_size(load_grid(path), size, []), every[size.label]
        for kind, row in table.items():  # each size's pick is its own sweep's lowest loss
            finite = {float(lr): loss for lr, loss in row["losses"].items() if loss is not None}
            assert row["lr"] == min(finite, key=finite.get)
        seed = where / "results" / size.label / "seed-0"
        tc = json.loads((seed / f"token_choice-lr{table['token_choice']['lr']:g}.json").read_text())
        mot = json.loads((seed / f"mot-lr{table['mot']['lr']:g}.json").read_text())
        assert mot["n_embd"] == size.n_embd and mot["steps"] == plan.recipe.train.steps
        assert mot["machine"] == tc["machine"] == machine()  # where it ran: another CPU rounds otherwise
        assert tc["steps"] == plan.recipe.train.steps + plan.transitions["20pct"]
        assert mot["tokens"] >= size.tokens_per_parameter * plan.parameters and mot["curve"][-1]["step"] == mot["steps"]
        for label, steps in plan.transitions.items():
            record = json.loads((seed / f"transition-{label}.json").read_text())
            assert record["steps"] == steps and record["lr"] == pytest.approx(table["mot"]["lr"] * plan.recipe.optim.final_lr_fraction)
            assert record["machine"] == machine()
            assert record["curve"][0]["step"] == mot["steps"] and record["curve"][-1]["step"] == mot["steps"] + steps
            assert record["pre_switch_loss"] == pytest.approx(mot["final_loss"], abs=1e-5)
    # seed 1 of the first size ran at that size's picks, and its transitions
    seed = where / "results" / "d16" / "seed-1"
    assert sorted(p.name for p in seed.iterdir()) == sorted(
        [f"{kind}-lr{row['lr']:g}.json" for kind, row in every["d16"].items()] + ["transition-10pct.json", "transition-20pct.json"])


def test_the_grid_goes_on_from_its_results_alone(grid, tmp_path):
    """On another machine the results are there (committed) and no run directory: nothing trains again."""
    path, where, _ = grid
    results = tmp_path / "results"
    shutil.copytree(where / "results", results)
    before = {p: p.read_bytes() for p in results.rglob("*.json")}
    trained = []
    run = GridRun(load_grid(path), tmp_path / "runs", log=trained.append, progress=False)
    run.grid.results = results
    run.run()
    assert trained == [] and not (tmp_path / "runs").exists()
    assert {p: p.read_bytes() for p in results.rglob("*.json")} == before


def test_a_lost_mot_checkpoint_is_trained_again_for_a_pending_transition(grid, tmp_path):
    path, where, _ = grid
    results = tmp_path / "results"
    shutil.copytree(where / "results", results)
    (results / "d16" / "seed-0" / "transition-10pct.json").unlink()
    said = []
    run = GridRun(load_grid(path), tmp_path / "runs", log=said.append, progress=False)
    run.grid.results = results
    run.run()
    assert any("training" in line and "mot at lr" in line for line in said), said
    again = json.loads((results / "d16" / "seed-0" / "transition-10pct.json").read_text())
    first = json.loads((where / "results" / "d16" / "seed-0" / "transition-10pct.json").read_text())
    assert again["final_loss"] == pytest.approx(first["final_loss"], abs=1e-6)


def test_another_grid_in_the_same_results_is_refused(grid, tmp_path):
    path, where, _ = grid
    other = tmp_path / "other.toml"
    other.write_text(path.read_text().replace("transitions = [10, 20]", "transitions = [10, 30]"))
    code, _, stderr = study_cli([other, "--out", tmp_path / "runs", "--quiet"])
    assert code == 1 and "grid key 'transitions' is [10.0, 30.0]" in stderr and "was started with [10.0, 20.0]" in stderr
    assert json.loads((where / "results" / GRID_FILE).read_text())["transitions"] == [10.0, 20.0]


def test_a_larger_sweep_extend_goes_on_with_the_edge_picks_and_a_smaller_one_is_refused(grid, tmp_path):
    """sweep_extend may grow on a started grid (nothing done is invalidated): a kind whose pick lay at
    an edge of the rates tried gets one more rate past it, the others train nothing new."""
    path, where, _ = grid
    results = tmp_path / "results"
    shutil.copytree(where / "results", results)
    before = json.loads((results / LR_FILE).read_text())["d16"]
    smaller = tmp_path / "smaller.toml"
    smaller.write_text(path.read_text().replace("sweep_extend = 1", "sweep_extend = 0").replace(str(where / "results"), str(results)))
    code, _, stderr = study_cli([smaller, "--out", tmp_path / "runs", "--quiet"])
    assert code == 1 and "grid key 'sweep_extend' is 0" in stderr and "was started with 1" in stderr
    grid = load_grid(path)
    grid.sweep_extend, grid.sizes, grid.results = 2, grid.sizes[:1], results
    said = []
    with pytest.raises(ValueError, match="'sizes'"):  # any change but sweep_extend's growth is still refused
        GridRun(grid, tmp_path / "runs", log=said.append, progress=False).check()
    grid = load_grid(path)
    grid.sweep_extend, grid.results = 2, results
    table = json.loads((results / LR_FILE).read_text())
    moved = json.loads(json.dumps(table))  # MoT's pick at an edge: growing could move it, and its transitions have run
    moved["d16"]["mot"]["lr"] = max(float(lr) for lr in moved["d16"]["mot"]["losses"])
    (results / LR_FILE).write_text(json.dumps(moved))
    with pytest.raises(ValueError, match="would try MoT past its pick .* at d16, whose transitions have run"):
        GridRun(grid, tmp_path / "runs", log=said.append, progress=False).check()
    (results / LR_FILE).write_text(json.dumps(table))
    tried = [float(lr) for lr in table["d16"]["mot"]["losses"]]
    assert min(tried) < table["d16"]["mot"]["lr"] < max(tried), "the fixture's own MoT pick must lie inside for what follows"
    GridRun(grid, tmp_path / "runs", log=said.append, progress=False).run()
    assert "sweep_extend grows from 1 to 2" in said[0]
    assert json.loads((results / GRID_FILE).read_text())["sweep_extend"] == 2
    after, edges = json.loads((results / LR_FILE).read_text())["d16"], []
    for kind, row in before.items():
        tried = sorted(float(lr) for lr in row["losses"])
        at_edge = row["lr"] in (tried[0], tried[-1])
        grew = sorted(float(lr) for lr in after[kind]["losses"])
        assert len(grew) == len(tried) + at_edge and set(tried) <= set(grew), (kind, tried, grew)
        finite = {float(lr): loss for lr, loss in after[kind]["losses"].items() if loss is not None}
        assert after[kind]["lr"] == min(finite, key=finite.get)
        trained = [line for line in said if f"sweep] {kind} at lr" in line]
        assert len(trained) == at_edge, trained
        edges.append(at_edge)
    assert any(edges), "the fixture grid has no pick at an edge: this test would show nothing"


def test_a_diverged_sweep_run_is_recorded_and_passed_over(data_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("MOT_TRANSITION_CACHE", str(tmp_path / "cache"))
    path = tmp_path / "grid.toml"
    path.write_text(grid_text(str(data_dir / "corpus.txt"), str(tmp_path / "results"), sweep="[3e-3, 1e6]", extend=0)
                    .replace("transitions = [10, 20]", "transitions = [20]"))
    grid = load_grid(path)
    grid.sizes[0].tokens_per_parameter = 0.5
    run = GridRun(grid, tmp_path / "runs", progress=False, log=lambda line: None)
    picked = run.sweep(run.plans[0])
    assert picked == {"dense": 3e-3, "mot": 3e-3, "token_choice": 3e-3}
    record = json.loads((tmp_path / "results" / "d16" / "seed-0" / "dense-lr1e+06.json").read_text())
    assert record["final_loss"] is None and record["diverged"]


def test_commit_commits_each_results_file(data_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("MOT_TRANSITION_CACHE", str(tmp_path / "cache"))
    subprocess.run(["git", "init", "-q", str(tmp_path)], check=True)
    for key, value in (("user.email", "t@example.invalid"), ("user.name", "t")):
        subprocess.run(["git", "-C", str(tmp_path), "config", key, value], check=True)
    path = tmp_path / "grid.toml"
    path.write_text(grid_text(str(data_dir / "corpus.txt"), str(tmp_path / "results"), extend=0).replace("[10, 20]", "[20]"))
    grid = load_grid(path)
    grid.sizes[0].tokens_per_parameter = 0.5
    from mot_transition.study.grid_run import git_committer

    GridRun(grid, tmp_path / "runs", progress=False, log=lambda line: None, on_result=git_committer(grid.results)).run()
    log = subprocess.run(["git", "-C", str(tmp_path), "log", "--format=%s"], capture_output=True, text=True, check=True).stdout
    files = subprocess.run(["git", "-C", str(tmp_path), "ls-files"], capture_output=True, text=True, check=True).stdout.split()
    assert sorted(files) == sorted(str(p.relative_to(tmp_path)) for p in grid.results.rglob("*") if p.is_file())
    runs = [p for p in grid.results.rglob("*.json") if p.parent != grid.results]  # one commit a run
    assert len(log.splitlines()) == len(runs) + 3  # and grid.json, lr.json, the report
    assert "study grid: learning-rate sweep" in log and log.splitlines()[0] == "study grid: the report of the whole grid"


@pytest.mark.parametrize("text, message", [
    ("recipe = 'tiny'\nresults = 'r'\nsweep = [1e-3, 3e-3]\n", "has no 'size'"),
    ("recipe = 'tiny'\nresults = 'r'\nsweep = [1e-3]\n[[size]]\nn_embd = 16\ntokens_per_parameter = 1\nseeds = 1\n", "two or more"),
    ("recipe = 'tiny'\nresults = 'r'\nsweep = [1e-3, 2e-3]\nlr = 1\n[[size]]\nn_embd = 16\ntokens_per_parameter = 1\nseeds = 1\n", "unknown key 'lr'"),
    ("recipe = 'tiny'\nresults = 'r'\nsweep = [1e-3, 2e-3]\n[[size]]\nn_embd = 16\ntokens_per_parameter = -1\nseeds = 1\n", "'tokens_per_parameter' must be"),
    ("recipe = 'tiny'\nresults = 'r'\nsweep = [1e-3, 2e-3]\n[[size]]\nn_embd = 16\nseeds = 1\n", "has no 'tokens_per_parameter'"),
])
def test_a_bad_grid_file_is_one_line(tmp_path, text, message):
    path = tmp_path / "grid.toml"
    path.write_text(text)
    code, _, stderr = study_cli([path, "--quiet"])
    assert code != 0 and message in stderr and len(stderr.strip().splitlines()) == 1, stderr


def test_a_grid_sets_what_it_trains_itself(grid, tmp_path):
    path, _, _ = grid
    code, _, stderr = study_cli([path, "--seeds", "2", "--quiet"])
    assert code == 2 and "--seeds is the grid file's to set" in stderr
    code, _, stderr = study_cli([path, "optim.lr=1", "--quiet"])
    assert code == 1 and "only overrides of how runs go" in stderr


def test_non_embedding_parameters_leave_out_the_embeddings_and_the_tied_head():
    from conftest import tiny_config

    config = tiny_config("dense")
    from mot_transition.modeling import MoTLMHeadModel

    model = MoTLMHeadModel(config)
    embedding = config.vocab_size * config.n_embd + (config.n_positions * config.n_embd if hasattr(model.transformer, "wpe") else 0)
    assert non_embedding_parameters(config) == sum(p.numel() for p in model.parameters()) - embedding


def test_the_power_law_fit_and_its_inverse():
    from mot_transition.study.grid_report import flops_for, power_law

    a, b = 12.5, 0.07
    law = power_law([(c, a * c ** -b) for c in (1e12, 3e12, 1e13)])
    assert law == pytest.approx((a, b), rel=1e-9)
    assert flops_for(law, a * 5e12 ** -b) == pytest.approx(5e12, rel=1e-9)
    assert power_law([(1e12, 3.0), (1e12, 2.9)]) is None  # one size: no fit


def test_the_multiplier_two_power_laws_imply_is_the_dense_flops_to_the_same_loss_over_the_flops():
    from mot_transition.study.grid_report import flops_for, multiplier_law

    dense, kind = (12.5, 0.07), (11.0, 0.075)
    m, e = multiplier_law(kind, dense)
    for c in (1e12, 1e14, 1e17):
        loss = kind[0] * c ** -kind[1]
        assert m * c ** e == pytest.approx(flops_for(dense, loss) / c, rel=1e-9)
    assert e > 0  # the kind's law is steeper: its lead grows with compute


def test_the_grid_writes_its_report_and_report_only_rewrites_it(grid, tmp_path):
    path, where, stdout = grid
    report = where / "results" / "report.md"
    text = report.read_text()
    for heading in ("## Learning rates", "## Final held-out loss", "## The paper's measure", "## The transition", "## Verdict"):
        assert heading in text
    assert "- MoT: " in text and "fitted M(C) = " in text  # two sizes: the multiplier's trend and its fit
    glance = text.split("## At a glance")[1].split("## Sizes")[0]  # one row a size, one column a model, 5% before 10%
    assert "| size | dense | MoT | Token Choice from scratch | MoT → Token Choice, 10% | MoT → Token Choice, 20% |" in glance
    summary = json.loads((where / "results" / "summary.json").read_text())
    for label, row in summary["table"].items():
        cells = [c.strip() for c in next(line for line in glance.splitlines() if line.startswith(f"| {label} |")).split("|")[2:-1]]
        assert [float(c.split()[0]) for c in cells] == [pytest.approx(sum(row[n]["loss"]) / len(row[n]["loss"]), abs=5e-5)
                                                        for n in summary["names"]]
    verdict = text.split("## Verdict")[1]  # the plain answer first, then each size and length
    assert verdict.lstrip().startswith("- **MoT → Token Choice") and "nats per 10x training FLOPs" in verdict
    assert "- MoT against dense: reaches dense's final loss in" in verdict and "The paper reports" in verdict
    for label, picks in json.loads((where / "results" / "lr.json").read_text()).items():
        for kind, row in picks.items():  # a pick at the end of the rates tried is marked as such
            tried = sorted(float(v) for v in row["losses"])
            line = next(line for line in text.splitlines() if line.startswith(f"| {label} | {KIND_NAMES[kind]} |"))
            assert line.endswith("(edge) |") == (row["lr"] in (tried[0], tried[-1])), line
    summary = json.loads((where / "results" / "summary.json").read_text())
    mot, lr = summary["table"]["d16"]["mot"], summary["lr"]["d16"]["mot"]["lr"]
    assert mot["seeds"] == 2 and mot["loss"] == [
        json.loads((where / "results" / "d16" / f"seed-{i}" / f"mot-lr{lr:g}.json").read_text())["final_loss"] for i in (0, 1)]
    assert summary["table"]["d24"]["mot"]["seeds"] == 1 and summary["laws"]["mot"] is not None  # two sizes: a fit
    report.unlink()
    for extra in (["--out", tmp_path / "ignored"], ["--commit"], ["train.steps=3"]):  # nothing to them here: said, not ignored
        code, stdout, stderr = study_cli([path, "--report-only", *extra])
        assert code == 2 and "drop --out, --commit and KEY=VALUE" in stderr and not report.exists(), (extra, stderr)
    code, stdout, stderr = study_cli([path, "--report-only"])
    assert code == 0 and report.read_text() == text, stderr
    fresh = tmp_path / "fresh.toml"
    fresh.write_text(path.read_text().replace(str(where / "results"), str(tmp_path / "none")))
    code, _, stderr = study_cli([fresh, "--report-only"])
    assert code == 1 and "holds no grid.json" in stderr


def test_a_transition_is_compared_with_token_choice_at_its_own_training_flops(grid):
    from mot_transition.study.accounting import loss_at

    path, where, _ = grid
    summary = json.loads((where / "results" / "summary.json").read_text())
    lr = summary["lr"]["d16"]["token_choice"]["lr"]
    report = (where / "results" / "report.md").read_text()
    for label in ("10pct", "20pct"):
        expected, ended = [], []
        for seed in (where / "results" / "d16" / f"seed-{i}" for i in (0, 1)):
            tc = json.loads((seed / f"token_choice-lr{lr:g}.json").read_text())
            end = json.loads((seed / f"transition-{label}.json").read_text())["curve"][-1]["flops"]
            at = loss_at(tc["curve"], "flops", end)
            expected.append(pytest.approx(tc["curve"][-1]["loss"] if at is None else at))
            if at is None:  # the baseline ended short of the transition's FLOPs: said, with how far it got
                ended.append(pytest.approx(tc["curve"][-1]["flops"] / end))
        cell = summary["table"]["d16"][f"transition-{label}"]
        assert cell["baseline_at_equal_flops"] == expected and cell["baseline_ended_at"] == ended
        row = next(line for line in report.splitlines() if line.startswith(f"| d16 | {label.replace('pct', '%')} |"))
        assert row.split("|")[6].strip().endswith("†") == bool(ended), row
    assert ("† Token Choice from scratch ended before the transition's FLOPs" in report) == any(
        cell.get("baseline_ended_at") for row in summary["table"].values() for cell in row.values())


def test_a_second_grid_on_the_same_results_is_refused_naming_the_first(grid, tmp_path):
    from mot_transition.locks import OutputInUse

    path, where, _ = grid
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; from mot_transition.locks import acquire; "
                               f"acquire({str(where / 'results')!r}); print('held', flush=True); time.sleep(60)"],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(OutputInUse, match=f"pid {holder.pid}"):
            GridRun(load_grid(path), tmp_path / "runs", progress=False, log=lambda line: None).run()
    finally:
        holder.kill()
        holder.wait()


def test_the_verdict_says_where_the_gap_goes_with_size():
    from mot_transition.study.grid_verdict import gap_trend

    table = {"d8": {"transition-10pct": {"flops": [1e10]}}, "d16": {"transition-10pct": {"flops": [1e11]}}}
    narrowing = gap_trend("transition-10pct", [("d8", 0.2), ("d16", 0.1)], table)[0]
    assert "-0.1000 nats per 10x" in narrowing and "would close at about 10x the largest size's" in narrowing
    slow = gap_trend("transition-10pct", [("d8", 0.2), ("d16", 0.19)], table)[0]
    assert "would not close within 1000x" in slow  # 19 decades away: not a number worth printing
    assert "does not narrow" in gap_trend("transition-10pct", [("d8", 0.1), ("d16", 0.2)], table)[0]
    assert "the lead does not narrow" in gap_trend("transition-10pct", [("d8", -0.1), ("d16", -0.2)], table)[0]
    assert gap_trend("transition-10pct", [("d8", 0.2)], table) == []  # one size: no trend
    # sizes in any order (a grid file lists them as it likes): the line runs to the largest training FLOPs
    assert "would close at about 10x the largest size's" in gap_trend("transition-10pct", [("d16", 0.1), ("d8", 0.2)], table)[0]
    table["d32"] = {"transition-10pct": {"flops": [1e12]}}
    scatter = gap_trend("transition-10pct", [("d8", 0.3), ("d16", -0.1), ("d32", 0.05)], table)[0]
    assert "the sign changes between sizes" in scatter and "would close" not in scatter


@pytest.mark.parametrize("fractions, reproduced", [([0.25, 0.3], True), ([0.25, 0.5], False)])
def test_the_verdict_holds_mot_to_the_papers_measure(fractions, reproduced):
    from mot_transition.study.grid_verdict import paper_measure

    table = {f"d{8 * (i + 1)}": {"mot": {"reaching": {"reached": 1, "of": 1, "fraction": [f]}, "multiplier": [2.0 + i]}}
             for i, f in enumerate(fractions)}
    (line,) = paper_measure(table)
    assert f"at {100 * min(fractions):.0f}-{100 * max(fractions):.0f}% of dense's steps; compute multiplier 2.00-3.00" in line
    assert line.endswith("reproduced here." if reproduced else "not reproduced at these sizes.")
    table["d8"]["mot"]["reaching"] = {"reached": 0, "of": 1, "fraction": []}  # a seed that never got there: not reproduced
    assert paper_measure(table)[0].endswith("not reproduced at these sizes.") and "in 1 of 2 runs" in paper_measure(table)[0]


def test_the_report_orders_transitions_by_length():
    from mot_transition.study.grid_report import summarise

    record = {"curve": [{"step": 10, "flops": 1e9, "seconds": 1.0, "loss": 3.0}], "steps": 10, "recovery_step": 4, "pre_switch_loss": 3.1, "post_switch_loss": 3.2}
    runs = {name: record for name in ("transition-10pct", "transition-5pct", "transition-20pct", "mot", "dense")}
    names = summarise({"grid": {}, "lr": {}, "sizes": {"d8": {0: runs}}})["names"]
    assert names == ["dense", "mot", "transition-5pct", "transition-10pct", "transition-20pct"]


def test_the_report_says_what_its_numbers_rest_on():
    """A seed that never recovered is counted, a multiplier past dense's losses is marked, a lead within the
    seed spread is said so in the headline, and an unfinished grid says its verdict is interim."""
    from mot_transition.study.grid_notes import OTHER_SOURCE, interim, recovery, transition_notes
    from mot_transition.study.grid_report import summarise
    from mot_transition.study.grid_verdict import verdict

    assert recovery([60, None]) == "60 (1 of 2 seeds)" and recovery([None]) == "not recovered" and recovery([48, 72]) == "60 ± 17"

    def run(loss, flops, steps=10):
        return {"curve": [{"step": steps, "flops": flops, "seconds": 1.0, "loss": loss}], "steps": steps}

    sizes = {"d8": {0: {"dense": run(3.0, 1e10), "token_choice": run(2.9, 1e10)}},
             "d16": {0: {"dense": run(2.5, 1e11), "token_choice": run(2.3, 1e11), "mot": run(2.6, 1e11)}}}
    table = summarise({"grid": {}, "lr": {}, "sizes": sizes})["table"]
    assert table["d16"]["token_choice"]["extrapolated"] and not table["d16"]["mot"]["extrapolated"]
    assert not table["d8"]["token_choice"]["extrapolated"] and not table["d16"]["dense"]["extrapolated"]

    # a transition whose MoT run was trained again elsewhere (its pre-switch loss is not the recorded MoT's) is marked
    def transition(pre):
        return {**run(2.55, 1.1e11, 11), "pre_switch_loss": pre, "post_switch_loss": pre + 0.1, "recovery_step": 1}

    sizes["d16"][0] |= {"transition-10pct": transition(2.64), "transition-5pct": transition(2.64)}
    sizes["d16"][1] = {"mot": run(2.6, 1e11), "transition-10pct": transition(2.6)}
    table = summarise({"grid": {}, "lr": {}, "sizes": sizes})["table"]
    assert table["d16"]["transition-10pct"]["source_apart"] == [[2.6, 2.64]]
    (line,) = [n for n in transition_notes(table) if n.strip().startswith(OTHER_SOURCE)]  # one line for the size's two lengths
    assert "d16:" in line and "ended at 2.6400, where the recorded MoT run ended at 2.6000" in line and "+0.0400" in line

    summary = {"names": ["transition-10pct"], "table": {"d8": {"transition-10pct": {"flops": [1e10]}}}}
    headline = verdict([("d8", "transition-10pct", -0.01, "within the seed spread (2 of 3 seeds agree)")], summary)[0]
    assert "ahead of Token Choice from scratch at equal training FLOPs at d8 (10%: within the seed spread (2 of 3 seeds agree))" in headline

    grid = {"sizes": [{"n_embd": 8, "seeds": 2}], "transitions": [10]}
    every = {name: {} for name in ("dense", "mot", "token_choice", "transition-10pct")}
    assert "d8 1 of 2" in interim({"grid": grid, "sizes": {"d8": {0: every, 1: {"dense": {}}}}})[0]
    assert interim({"grid": grid, "sizes": {"d8": {0: every, 1: every}}}) == []


def test_the_transition_learning_rate_check_reruns_the_grids_transition_and_the_report_shows_it(grid, tmp_path):
    """scripts/transition_lr_check.py: at 1x it is the grid's own transition again (the same settings: the
    same curve, bit for bit), at 2x a run of its own; each against Token Choice at its own FLOPs; the report
    shows them. Without the grid's converted checkpoint it says so in one line."""
    from mot_transition.study.grid_notes import LR_CHECKS
    from mot_transition.study.grid_report import baseline_at

    path, where, _ = grid
    results = tmp_path / "results"  # a copy: the other tests read the fixture's report as the grid wrote it
    shutil.copytree(where / "results", results)
    copy = tmp_path / "grid.toml"
    copy.write_text(path.read_text().replace(str(where / "results"), str(results)))
    script = [sys.executable, str(Path(__file__).parents[1] / "scripts" / "transition_lr_check.py"), str(copy), "--size", "16"]
    done = subprocess.run([*script, "--factors", "1", "2", "--out", str(where / "runs")], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    check = json.loads((results / LR_CHECKS / "d16-seed-0-20pct.json").read_text())
    own = json.loads((results / "d16" / "seed-0" / "transition-20pct.json").read_text())
    grid_row, again, double = check["rows"]
    assert grid_row["grid"] and not again["grid"] and not double["grid"]
    assert again["final_loss"] == grid_row["final_loss"] == own["final_loss"] and again["flops"] == grid_row["flops"]
    assert double["lr"] == pytest.approx(2 * own["lr"]) and double["final_loss"] != own["final_loss"]
    lr = json.loads((results / LR_FILE).read_text())["d16"]["token_choice"]["lr"]
    tc = json.loads((results / "d16" / "seed-0" / f"token_choice-lr{lr:g}.json").read_text())
    for row in check["rows"]:
        assert (row["baseline"], row["baseline_ended_at"]) == pytest.approx(baseline_at(tc["curve"], row["flops"]))
    code, _, stderr = study_cli([copy, "--report-only"])
    assert code == 0, stderr
    section = (results / "report.md").read_text().split("## The transition's learning rate")[1].split("## Verdict")[0]
    assert f"| d16 | 0 | 20% | {2 * own['lr']:.3g} | 2 | " in section and "1 (the grid's run)" in section
    done = subprocess.run([*script, "--seed", "1", "--factors", "2", "--out", str(tmp_path / "elsewhere")], capture_output=True, text=True)
    assert done.returncode == 1 and done.stderr.strip().startswith("error: ") and "is not on this machine" in done.stderr


def test_a_further_seed_runs_its_transitions_right_after_its_mot_run(grid):
    """So that a machine replaced between them does not make the transitions start from MoT trained again."""
    _, _, stdout = grid
    lines = [line for line in stdout.splitlines() if "[d16 seed 1]" in line]
    order = [next(i for i, line in enumerate(lines) if what in line) for what in ("] mot at", "transition tuning", "] dense at", "] token_choice at")]
    assert order == sorted(order), lines


def test_the_learning_rate_check_marks_a_mot_run_trained_again_elsewhere(tmp_path):
    from mot_transition.jsonfiles import write_json
    from mot_transition.study.grid_notes import LR_CHECKS, OTHER_SOURCE, lr_checks

    (tmp_path / LR_CHECKS).mkdir()
    sizes = {"d8": {0: {"mot": {"final_loss": 3.0}}}}  # the grid's runs, as load_results gives them
    row = {"factor": 1.0, "lr": 1e-3, "pre_switch_loss": 3.0, "post_switch_loss": 3.1, "recovery_step": None, "final_loss": 2.95,
           "flops": 1e12, "baseline": 2.9, "baseline_ended_at": None, "grid": True}
    write_json(tmp_path / LR_CHECKS / "d8-seed-0-10pct.json", {"size": "d8", "seed": 0, "length": "10pct", "steps": 10, "rows": [row]})
    assert OTHER_SOURCE not in "\n".join(lr_checks(tmp_path, sizes)) and "| d8 | 0 | 10% | 0.001 | 1 (the grid's run) | not recovered | 2.9500 |" in "\n".join(lr_checks(tmp_path, sizes))
    write_json(tmp_path / LR_CHECKS / "d8-seed-0-10pct.json", {"size": "d8", "seed": 0, "length": "10pct", "steps": 10,
                                                                 "rows": [{**row, "pre_switch_loss": 3.04}]})
    text = "\n".join(lr_checks(tmp_path, sizes))
    assert f"2.9500 {OTHER_SOURCE} |" in text and "(3.0400; the recorded one: 3.0000)" in text and "+0.0400" in text


def test_the_report_says_where_the_gap_comes_from():
    """The gap at the end = MoT's deficit at the switch (Token Choice from scratch read at the switch's FLOPs)
    less what the transition closes (its own gain minus the baseline's over the same FLOPs)."""
    from mot_transition.study.grid_notes import gap_sources
    from mot_transition.study.grid_report import summarise
    from mot_transition.study.grid_verdict import gap_at_switch

    def point(step, flops, loss):
        return {"step": step, "flops": flops, "seconds": 1.0, "loss": loss}

    # Token Choice from scratch: 3.0 at 1e11 FLOPs, 2.8 at 2e11, 2.7 at 3e11 (read linearly in between)
    tc = {"steps": 30, "curve": [point(10, 1e11, 3.0), point(20, 2e11, 2.8), point(30, 3e11, 2.7)]}
    mot = {"steps": 15, "curve": [point(15, 1.5e11, 3.1)]}
    transition = {"steps": 10, "pre_switch_loss": 3.1, "post_switch_loss": 3.2, "recovery_step": 5,
                  "curve": [point(15, 1.5e11, 3.2), point(25, 2.5e11, 2.95)]}
    summary = summarise({"grid": {}, "lr": {}, "sizes": {"d8": {0: {"mot": mot, "token_choice": tc, "transition-10pct": transition}}}})
    cell = summary["table"]["d8"]["transition-10pct"]
    # at the switch (1.5e11) the baseline is at 2.9: MoT is 0.2 behind; the transition gains 0.15, the baseline 0.15 (2.9 -> 2.75)
    assert cell["behind_at_switch"] == [pytest.approx(0.2)] and cell["own_gain"] == [pytest.approx(0.15)]
    assert cell["baseline_gain"] == [pytest.approx(0.15)]
    assert cell["own_loss_paired"][0] - cell["baseline_at_equal_flops"][0] == pytest.approx(0.2 - (0.15 - 0.15))
    (row,) = [line for line in gap_sources(summary["table"]) if line.startswith("| d8 |")]
    assert row == "| d8 | 10% | 0.2000 | 0.1500 | 0.1500 | 0.0000 | 0.2000 |"
    transition["curve"][-1]["loss"] = 2.85  # a transition that gains more than the baseline closes part of the gap
    summary = summarise({"grid": {}, "lr": {}, "sizes": {"d8": {0: {"mot": mot, "token_choice": tc, "transition-10pct": transition}}}})
    (line,) = gap_at_switch(summary["names"], summary["table"])
    assert "MoT's loss is +0.200 nats from" in line and "the 10% transition closes +0.100 nats of it" in line
    assert gap_at_switch(["dense"], {"d8": {}}) == [] and gap_sources({"d8": {}}) == []
