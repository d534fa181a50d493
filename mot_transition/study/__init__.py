"""`mot-transition study`: is it worth pretraining with MoT and switching to Token Choice at the
end, rather than training Token Choice (or dense) from the start? Over several seeds, it trains
dense, MoT and Token Choice from scratch of one shape, converts the MoT model and transition-tunes
it for several lengths, measures the loss spike at the switch (top-k 1, 2, 4, with and without
calibration) and MoT at other controller temperatures, and writes a report that puts every curve
on three axes (steps, training FLOPs, wall-clock time) and says which differences are larger than
the seed spread.

    runs         the runs, seed by seed, each done once (a stopped study goes on where it stopped)
    accounting   curves on the three axes; the loss at a budget; where a loss is first reached
    report       report.md and results.json: means, spreads, verdicts
    plots        curves.png, spike.png, temperature.png (the `plot` extra)
    grid         a study grid file (several sizes, each kind at its own swept learning rate) and its plans
    grid_run     runs a grid, every finished run's results written (and committed) as it ends
    grid_report  the grid's report (grid_notes, grid_verdict: its footnotes and verdict)

    from mot_transition.study import run_study
    summary = run_study("tiny", "runs/study", ["train.steps=120"], seeds=3)
"""

from .accounting import first_reaching, loss_at, training_curve, transition_curve
from .report import spread, verdict, write_report
from .runs import STUDY_FILE, Plan, dense_recipe, plan_study, run_study

__all__ = [
    "run_study", "plan_study", "Plan", "dense_recipe", "STUDY_FILE", "training_curve", "transition_curve", "loss_at",
    "first_reaching", "write_report", "spread", "verdict",
]
