"""Tracking: metrics.jsonl always, TensorBoard / trackio / W&B (offline) on request with the same
metrics, per-layer expert load, the transition's per-step log, and the training loss plot."""

import json
import math
from pathlib import Path

import pytest

from conftest import needs
from mot_transition.train import recipe_from_dict, train
from mot_transition.train.tracking import load_record, scalars


def _recipe(data_dir: Path, ffn_type: str, report_to: list[str]):
    return recipe_from_dict({
        "name": "tracking", "seed": 1,
        "model": {"ffn_type": ffn_type, "n_embd": 32, "n_layer": 2, "n_head": 2, "n_expert": 4, "group_size": 4},
        "data": {"source": str(data_dir / "corpus.txt"), "heldout_fraction": 0.1, "vocab_size": 300, "seq_len": 32,
                 "eval_batches": 2, "eval_batch_size": 4, "cache_dir": str(data_dir / "cache")},
        "optim": {"lr": 3e-3, "warmup_steps": 2},
        "train": {"steps": 4, "batch_size": 8, "eval_every": 2, "checkpoint_every": 4, "log_every": 2,
                  "report_to": report_to},
    })


def test_expert_load_record_fractions_sum_to_one_and_entropy_is_log_e_when_uniform():
    import torch

    record = load_record(torch.tensor([[5.0, 5.0, 5.0, 5.0], [20.0, 0.0, 0.0, 0.0]]), [1, 3])
    assert record["expert_load"] == {"1": [0.25] * 4, "3": [1.0, 0.0, 0.0, 0.0]}
    assert math.isclose(record["expert_load_entropy"]["1"], math.log(4), rel_tol=1e-6)
    assert record["expert_load_entropy"]["3"] == 0
    flat = scalars({"step": 2, "loss": 1.5, "aux_loss": None, **record})
    assert flat["expert_load/layer_3/expert_0"] == 1.0 and "aux_loss" not in flat and "step" not in flat


@needs("tensorboard", "trackio", "wandb", install="pip install 'mot-transition[tensorboard,trackio,wandb]'")
def test_every_tracker_gets_the_jsonl_metrics_offline(data_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("TRACKIO_DIR", str(tmp_path / "trackio"))
    run = tmp_path / "run"
    result = train(_recipe(data_dir, "token_choice", ["jsonl", "tensorboard", "trackio", "wandb"]), run, progress=False)
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3, 4]
    loaded = [r for r in records if "expert_load" in r]
    assert [r["step"] for r in loaded] == [2, 4]  # every log_every steps
    for r in loaded:
        assert list(r["expert_load"]) == ["1"]  # the Token Choice layer (second half of 2 blocks)
        assert math.isclose(sum(r["expert_load"]["1"]), 1.0, rel_tol=1e-5)
        assert 0 <= r["expert_load_entropy"]["1"] <= math.log(4) + 1e-9

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run / "tensorboard"))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    assert {"lm_loss", "aux_loss", "z_loss", "lr", "tokens_per_s", "eval_loss", "expert_load_entropy/layer_1"} <= tags
    assert [e.value for e in events.Scalars("lm_loss")] == pytest.approx([r["lm_loss"] for r in records], rel=1e-6)
    assert list((run / "wandb").glob("offline-run-*/run-*.wandb")), "W&B keeps an offline run to sync later"
    import sqlite3  # trackio keeps a project's runs in TRACKIO_DIR/PROJECT.db

    rows = sqlite3.connect(tmp_path / "trackio" / "mot-transition.db").execute("select * from metrics").fetchall()
    assert sum(any(b"lm_loss" in c for c in row if isinstance(c, bytes)) or any("lm_loss" in c for c in row if isinstance(c, str))
               for row in rows) == len(records)
    assert result.plot == run / "loss_curves.png" and result.plot.stat().st_size > 1000


def test_a_mot_run_records_the_load_a_conversion_would_route(data_dir, tmp_path):
    run = tmp_path / "run"
    train(_recipe(data_dir, "mot", ["jsonl"]), run, progress=False)
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert all(math.isclose(sum(r["expert_load"]["1"]), 1.0, rel_tol=1e-5) for r in records if "expert_load" in r)
