"""A time budget: the planning rules (pure), the CLI's duration, and runs whose epochs the plan chooses, with the
schedule stretched to them and ending complete."""

from __future__ import annotations

import json

import pytest
import torch

from fasttrain import budget
from fasttrain.budget import epoch_seconds, parse_duration, plan_epochs
from fasttrain.checkpoint import load_checkpoint
from fasttrain.config import Config, ConfigError, apply_overrides, load_config
from tests.tinyrun import tiny_cfg


@pytest.mark.parametrize(
    "text, seconds", [("90", 90), ("90s", 90), ("10m", 600), ("1.5h", 5400), ("1h30m", 5400), ("2min", 120)]
)
def test_durations(text, seconds):
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["", "ten minutes", "10x", "0", "-5m", "m"])
def test_bad_durations_name_the_option(text):
    with pytest.raises(ValueError, match=r"--time-budget"):
        parse_duration(text)


def test_epoch_seconds_adds_evaluation_at_three_times_the_training_rate():
    assert epoch_seconds(1000, 100.0) == pytest.approx(10.0)
    assert epoch_seconds(1000, 100.0, 300) == pytest.approx(11.0)
    assert epoch_seconds(1000, 100.0, 300, eval_rate=60.0, eval_every=5) == pytest.approx(11.0)


def test_plan_fills_what_is_left_and_never_goes_below_what_is_done():
    assert plan_epochs(100.0, 0.0, 10.0, margin=0.0) == 10
    assert plan_epochs(100.0, 5.0, 10.0, margin=0.0) == 9  # set-up time counts
    assert plan_epochs(100.0, 0.0, 10.0) == 9  # the default keeps 3 % for the end-of-run reports
    assert plan_epochs(100.0, 40.0, 20.0, done=1, margin=0.0) == 4  # 1 done, 60 s left: 3 more
    assert plan_epochs(10.0, 0.0, 60.0) == 1  # one epoch at least
    assert plan_epochs(10.0, 30.0, 5.0, done=1) == 1  # already over: end with what is done


def test_the_setting_is_checked_and_progressive_needs_its_epochs_with_a_budget():
    with pytest.raises(ConfigError, match=r"train\.time_budget_s: must be >= 0"):
        apply_overrides(Config(), ["train.time_budget_s=-1"])
    with pytest.raises(ConfigError, match=r"data\.progressive_epochs: give \[start, end\] epochs"):
        apply_overrides(Config(), ["train.time_budget_s=60", "data.progressive=[64, 128]"])


def _weights(run):
    return load_checkpoint(run / "checkpoints" / "last.pt")["state"]["modules"]["model"]


def test_a_budget_run_trains_the_planned_epochs_with_the_measurement_undone(shapes_root, tmp_path, monkeypatch):
    """Plan 3 epochs, re-plan keeps 3: the same weights as a plain 3-epoch run (the measuring steps are put back,
    random state included); the schedule ends at its last value; config.toml records the plan."""
    plans = []

    def fake_plan(budget_s, elapsed_s, epoch_s, *, done=0, margin=0.03):
        plans.append(done)
        assert budget_s == 30.0 and epoch_s > 0
        return 3

    monkeypatch.setattr(budget, "plan_epochs", fake_plan)
    from fasttrain.engine import train

    extra = ("model.dropout=0.2", "schedule.name=cosine")
    plain = train(tiny_cfg(shapes_root, tmp_path / "a", *extra, epochs=3), progress=False)
    timed = train(tiny_cfg(shapes_root, tmp_path / "b", *extra, "train.time_budget_s=30", epochs=7), progress=False)
    assert plans == [0, 1]
    assert len(timed.history) == 3
    wa, wb = _weights(plain.run_dir), _weights(timed.run_dir)
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    assert timed.history[-1]["lr"] == pytest.approx(0.0, abs=1e-12)  # cosine to 0: the schedule completed
    assert load_config(timed.run_dir / "config.toml").train.epochs == 3


def test_the_replan_after_the_first_epoch_stretches_the_schedule(shapes_root, tmp_path, monkeypatch):
    from fasttrain.engine import train

    monkeypatch.setattr(budget, "plan_epochs", lambda b, e, s, *, done=0, margin=0.03: 2 if done == 0 else 4)
    result = train(
        tiny_cfg(shapes_root, tmp_path, "train.time_budget_s=30", "schedule.name=linear", epochs=9), progress=False
    )
    lrs = [r["lr"] for r in result.history]
    assert len(lrs) == 4
    assert lrs[-1] == pytest.approx(0.0, abs=1e-12)  # ends complete at the new length
    # after the re-plan the line falls by the same amount per epoch, towards epoch 4
    assert lrs[1] - lrs[2] == pytest.approx(lrs[2] - lrs[3])
    assert load_config(result.run_dir / "config.toml").train.epochs == 4
    log = (result.run_dir / "train.log").read_text()
    assert "time budget 30 s" in log and "4 epochs instead of 2" in log


def test_a_real_budget_run_ends_with_its_schedule_complete(shapes_root, tmp_path):
    """No stand-ins: a short measurement, a plan, a re-plan; whatever the machine's speed, the run trains the
    epochs its config.toml records and its last learning rate is the schedule's end."""
    from fasttrain.engine import train

    result = train(tiny_cfg(shapes_root, tmp_path, "train.time_budget_s=3", epochs=500), progress=False)
    planned = load_config(result.run_dir / "config.toml").train.epochs
    assert planned >= 1 and len(result.history) == planned  # the plan, not the config's 500 (3 s cannot hold them)
    assert planned != 500
    assert result.history[-1]["lr"] == pytest.approx(0.0, abs=1e-12)
    records = [json.loads(x) for x in (result.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert records[0]["step"] == 1  # the measuring steps were not counted as training
