"""A time budget: the planning rules (pure), the CLI's duration, and runs whose optimizer steps the plan chooses
(the last epoch partial), with the schedule stretched to them and ending complete; such a run resumes exactly."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from fasttrain import budget
from fasttrain.budget import StepCosts, epoch_seconds, epochs_of, parse_duration, plan_steps
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


def _cost(total: int, costs: StepCosts, done: int = 0) -> float:
    """What ``total`` steps from ``done`` cost, counted step by step (the plan's rule, written out plainly)."""
    spe, seconds = costs.steps_per_epoch, costs.final_s
    for step in range(done, total):
        seconds += costs.per_step(step // spe)
        if (step + 1) % spe == 0 or step + 1 == total:
            seconds += costs.epoch_end(step // spe, last=step + 1 == total)
    return seconds


def test_the_plan_is_in_steps_and_the_last_epoch_may_be_partial():
    costs = StepCosts(1.0, 10)
    assert plan_steps(100.0, 0.0, costs, margin=0.0) == 100
    assert plan_steps(25.0, 0.0, costs, margin=0.0) == 25  # 2.5 epochs: no epoch's worth lost
    assert plan_steps(25.0, 5.0, costs, margin=0.0) == 20  # time spent before counts
    assert plan_steps(100.0, 0.0, costs) == 98  # the default keeps 2 % back
    assert epochs_of(25, 10) == 3 and epochs_of(20, 10) == 2 and epochs_of(3, 10) == 1


@pytest.mark.parametrize("budget_s", [7.0, 12.0, 21.0, 33.5, 50.0, 97.0])
@pytest.mark.parametrize("eval_every", [1, 3])
def test_the_plan_counts_evaluations_epoch_ends_and_the_reports(budget_s, eval_every):
    """The planned steps fit (with the last epoch's evaluation, whatever eval_every), and one more would not."""
    costs = StepCosts(0.5, 8, eval_s=2.0, end_s=0.25, final_s=1.5, eval_every=eval_every)
    total = plan_steps(budget_s, 1.0, costs, margin=0.0)
    assert _cost(total, costs) <= budget_s - 1.0 + 1e-9
    assert _cost(total + 1, costs) > budget_s - 1.0


def test_the_plan_grows_the_step_with_the_image_under_progressive_resizing():
    flat = StepCosts(1.0, 10)
    growing = StepCosts(1.0, 10, scale=lambda e: 1.0 if e == 0 else 4.0)  # twice the side from epoch 2 on
    assert plan_steps(30.0, 0.0, flat, margin=0.0) == 30
    assert plan_steps(30.0, 0.0, growing, margin=0.0) == 15  # 10 steps of 1 s, then 5 of 4 s


def test_the_plan_charges_each_new_size_its_compile_once():
    """A compiled step compiles again at each new size of progressive resizing (and records its CUDA graph): 5 s
    here, charged once at the first epoch of a size, never again at that size, nor to an epoch already begun."""
    sizes = {0: 1.0, 1: 4.0, 2: 4.0, 3: 9.0}
    costs = StepCosts(1.0, 10, scale=lambda e: sizes[min(e, 3)], size_change_s=5.0)
    assert plan_steps(30.0, 0.0, costs, margin=0.0) == 13  # 10 s, 5 s to compile, 3 steps of 4 s
    assert plan_steps(110.0, 0.0, costs, margin=0.0) == 31  # 10 + 5 + 40 + 40 (no compile) + 5 + 9 = 109 s
    assert plan_steps(110.0, 0.0, StepCosts(1.0, 10, scale=costs.scale), margin=0.0) == 32  # 10 + 80 + 2 x 9
    assert plan_steps(30.0, 18.0, costs, done=12, margin=0.0) == 15  # epoch 1 begun: 12 s left, 3 steps
    assert plan_steps(30.0, 10.0, costs, done=10, margin=0.0) == 13  # a re-plan before epoch 1: its compile ahead


def test_a_replan_counts_from_the_steps_done_and_always_ends_with_one_more():
    costs = StepCosts(1.0, 10, eval_s=1.0)
    assert plan_steps(40.0, 12.0, costs, done=10, margin=0.0) == 35  # 28 s left: 25 steps, 2 evaluations
    assert plan_steps(10.0, 30.0, costs, done=10, margin=0.0) == 11  # already over: the schedule's last step
    assert plan_steps(1.0, 5.0, costs, margin=0.0) == 1  # a run trains one step at least
    assert plan_steps(11.5, 0.0, costs, done=10, margin=0.0) == 20  # ends where epoch 2 ends: 0.5 s holds no step


def test_step_costs_are_checked():
    with pytest.raises(ValueError, match="step_s"):
        StepCosts(0.0, 10)
    with pytest.raises(ValueError, match="steps_per_epoch"):
        StepCosts(1.0, 0)


def test_the_process_age_is_known_here_and_small_after_start():
    import subprocess
    import sys

    out = subprocess.run(
        [sys.executable, "-c", "from fasttrain.budget import process_age_s; print(process_age_s())"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    if out == "None":
        pytest.skip("no /proc here")
    assert 0.0 <= float(out) < 30.0


def test_the_setting_is_checked_and_progressive_needs_its_epochs_with_a_budget():
    with pytest.raises(ConfigError, match=r"train\.time_budget_s: must be >= 0"):
        apply_overrides(Config(), ["train.time_budget_s=-1"])
    with pytest.raises(ConfigError, match=r"data\.progressive_epochs: give \[start, end\] epochs"):
        apply_overrides(Config(), ["train.time_budget_s=60", "data.progressive=[64, 128]"])
    with pytest.raises(ConfigError, match=r"data\.progressive_epochs: give \[start, end\] epochs"):
        apply_overrides(Config(), ["train.total_steps=60", "data.progressive=[64, 128]"])


def _weights(run):
    return load_checkpoint(run / "checkpoints" / "last.pt")["state"]["modules"]["model"]


def _fake_plan(monkeypatch, *totals, per_epoch=3):
    """plan_steps answers ``totals`` in turn (the plan, then the re-plan); returns the ``done`` it was asked with."""
    asked = []

    def plan(budget_s, elapsed_s, costs, *, done=0, margin=0.02):
        assert budget_s == 30.0 and costs.step_s > 0 and costs.steps_per_epoch == per_epoch
        asked.append(done)
        return totals[min(len(asked), len(totals)) - 1]

    monkeypatch.setattr(budget, "plan_steps", plan)
    return asked


EXTRA = ("model.dropout=0.2", "schedule.name=cosine", "train.time_budget_s=30")


def _killed_at(monkeypatch, step, cfg, *plans, per_epoch=3):
    """``cfg`` trained under the fake ``plans`` (:func:`_fake_plan`) until the end of optimizer step ``step``, where
    it stops as a killed run would (what it wrote stays): its run folder."""
    from fasttrain.engine import train
    from fasttrain.tasks.classify import ClassifyTask

    def die(self, state, batch, run_dir):
        if state.step == step:
            raise _Stop

    _fake_plan(monkeypatch, *plans, per_epoch=per_epoch)
    with monkeypatch.context() as m:
        m.setattr(ClassifyTask, "on_step_end", die)
        with pytest.raises(_Stop):
            train(cfg, progress=False)
    (run,) = Path(cfg.train.runs_dir).iterdir()
    return run


def _resumed(monkeypatch, run):
    """``run`` resumed to its end: the result (a resume does not plan again)."""
    from fasttrain.engine import train

    monkeypatch.setattr(budget, "plan_steps", None)
    return train(resume=run, progress=False)


def _same_weights(a, b):
    wa, wb = _weights(a), _weights(b)
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def _same_records(a, b):
    for x, y in zip(a, b, strict=True):
        assert (x["train_loss"], x["val_loss"], x["lr"]) == (y["train_loss"], y["val_loss"], y["lr"])


def test_total_steps_end_the_run_in_a_partial_epoch_that_evaluates(shapes_root, tmp_path):
    from fasttrain.engine import train

    result = train(tiny_cfg(shapes_root, tmp_path, "train.total_steps=7", "schedule.name=linear"), progress=False)
    assert [r["step"] for r in result.history] == [3, 6, 7]  # 3 steps per epoch (max_steps), the last 1
    assert all("val_acc" in r for r in result.history)
    assert result.history[-1]["lr"] == pytest.approx(0.0, abs=1e-12)  # the schedule ends at step 7
    assert load_config(result.run_dir / "config.toml").train.epochs == 3


def test_a_budget_the_start_up_already_spent_trains_one_step_and_warns(shapes_root, tmp_path, caplog):
    """--time-budget 3s after a 3.4 s start: one step, said at INFO only; now a warning with the overrun."""
    from fasttrain.engine import train

    with caplog.at_level("INFO", logger="fasttrain"):
        result = train(tiny_cfg(shapes_root, tmp_path, "train.time_budget_s=0.05"), progress=False)
    assert [r["step"] for r in result.history] == [1]
    (warned,) = [r for r in caplog.records if "went before training" in r.getMessage()]
    assert warned.levelname == "WARNING" and "the shortest run (1 step, evaluated) ends about" in warned.getMessage()


def test_a_resume_that_sets_train_epochs_replaces_the_step_plan_and_a_restart_keeps_it(shapes_root, tmp_path):
    """--resume RUN --set train.epochs=N lengthens a run; on a run whose length is a step plan (a budget's
    train.total_steps) the plan used to win and the new epochs were silently ignored. A torchrun restart, which
    passes the job's first train.epochs, keeps the plan."""
    from fasttrain.engine import _overrides_of, _resumed_config, train

    result = train(tiny_cfg(shapes_root, tmp_path, "train.total_steps=4"), progress=False)
    cfg, _ = _resumed_config(result.run_dir, ["train.epochs=5"])
    assert (cfg.train.epochs, cfg.train.total_steps) == (5, 0)
    kept, _ = _resumed_config(result.run_dir, ["train.total_steps=9", "train.epochs=5"])
    assert kept.train.total_steps == 9
    saved, _ = _resumed_config(result.run_dir, None)
    assert saved.train.total_steps == 4 and _overrides_of(tiny_cfg(shapes_root, tmp_path, epochs=9), saved) == []


def test_a_budget_run_trains_the_planned_steps_with_the_measurement_undone(shapes_root, tmp_path, monkeypatch):
    """Plan 7 steps (3 + 3 + 1), re-plan keeps 7: the same weights as a plain 7-step run (the measuring steps and
    evaluation are put back, random state included); config.toml records the plan."""
    asked = _fake_plan(monkeypatch, 7)
    from fasttrain.engine import train

    plain = train(tiny_cfg(shapes_root, tmp_path / "a", *EXTRA[:2], "train.total_steps=7"), progress=False)
    timed = train(tiny_cfg(shapes_root, tmp_path / "b", *EXTRA, epochs=9), progress=False)
    assert asked == [0, 3]
    assert [r["step"] for r in timed.history] == [3, 6, 7]
    wa, wb = _weights(plain.run_dir), _weights(timed.run_dir)
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    assert timed.history[-1]["lr"] == pytest.approx(0.0, abs=1e-12)  # cosine to 0: the schedule completed
    saved = load_config(timed.run_dir / "config.toml").train
    assert (saved.epochs, saved.total_steps) == (3, 7)
    log = (timed.run_dir / "train.log").read_text()
    assert "time budget 30 s" in log and "7 steps = 3 epochs (2 of 3, the last of 1)" in log


def test_the_replan_after_the_first_epoch_stretches_the_schedule(shapes_root, tmp_path, monkeypatch):
    _fake_plan(monkeypatch, 4, 11)
    from fasttrain.engine import train

    result = train(
        tiny_cfg(shapes_root, tmp_path, "train.time_budget_s=30", "schedule.name=linear", epochs=9), progress=False
    )
    lrs = [r["lr"] for r in result.history]
    assert [r["step"] for r in result.history] == [3, 6, 9, 11]
    assert lrs[-1] == pytest.approx(0.0, abs=1e-12)  # ends complete at the new length
    # after the re-plan the line falls by the same amount per step, towards step 11
    assert (lrs[1] - lrs[2]) / 3 == pytest.approx((lrs[2] - lrs[3]) / 2)
    saved = load_config(result.run_dir / "config.toml").train
    assert (saved.epochs, saved.total_steps) == (4, 11)
    log = (result.run_dir / "train.log").read_text()
    assert "11 steps = 4 epochs (3 of 3, the last of 2) instead of 4 steps = 2 epochs (1 of 3, the last of 1)" in log
    ckpt = load_checkpoint(result.run_dir / "checkpoints" / "last.pt")
    assert ckpt["config"]["train"]["total_steps"] == 11


class _Stop(Exception):
    pass


@pytest.mark.parametrize("kill_at", [4, 8])
def test_a_budget_run_killed_after_the_replan_resumes_exactly(shapes_root, tmp_path, monkeypatch, kill_at):
    """Killed after epoch 1's re-plan (step 4: its last.pt was written before the re-plan and again after) or
    inside the partial last epoch (step 8, from the step checkpoint at 7): resumed, it follows the plan and ends
    with the uninterrupted run's weights and records."""
    from fasttrain.engine import train

    extra = (*EXTRA, "train.checkpoint_every_steps=7", "runtime.precision=fp32")
    _fake_plan(monkeypatch, 4, 8)
    straight = train(tiny_cfg(shapes_root, tmp_path / "a", *extra, epochs=9), progress=False)
    assert [r["step"] for r in straight.history] == [3, 6, 8]

    run = _killed_at(monkeypatch, kill_at, tiny_cfg(shapes_root, tmp_path / "b", *extra, epochs=9), 4, 8)
    resumed = _resumed(monkeypatch, run)
    _same_weights(straight.run_dir, run)
    assert [r["step"] for r in resumed.history] == [3, 6, 8]
    _same_records(straight.history, resumed.history)


def test_a_replan_on_an_epoch_without_its_checkpoint_writes_one_so_a_resume_follows_it(
    shapes_root, tmp_path, monkeypatch
):
    """train.checkpoint_every = 2 and a step checkpoint at step 2: after the first epoch's re-plan (4 -> 8 steps)
    the newest last.pt was that step checkpoint, which holds the first plan, and a run killed at step 4 resumed
    along it (4 steps instead of 8). The re-plan now writes the epoch's last.pt whatever the interval."""
    from fasttrain.engine import train

    extra = (*EXTRA, "train.checkpoint_every=2", "train.checkpoint_every_steps=2", "runtime.precision=fp32")
    _fake_plan(monkeypatch, 4, 8)
    straight = train(tiny_cfg(shapes_root, tmp_path / "a", *extra, epochs=9), progress=False)
    assert [r["step"] for r in straight.history] == [3, 6, 8]

    run = _killed_at(monkeypatch, 4, tiny_cfg(shapes_root, tmp_path / "b", *extra, epochs=9), 4, 8)
    ckpt = load_checkpoint(run / "checkpoints" / "last.pt")
    assert (ckpt["state"]["step"], ckpt["config"]["train"]["total_steps"]) == (3, 8)  # the re-plan's, not step 2's
    resumed = _resumed(monkeypatch, run)
    _same_weights(straight.run_dir, run)
    assert [r["step"] for r in resumed.history] == [3, 6, 8]


def test_a_replan_keeps_the_warm_up_the_run_started_with_and_a_resume_keeps_it_too(shapes_root, tmp_path, monkeypatch):
    """schedule.warmup_epochs = 2 (6 steps) is capped at half the first plan's 4 steps: 2. The re-plan to 11
    steps after the first epoch used to move the cap to 5, sending the rate at step 3 (past its warm-up, decaying)
    back into a warm-up; the run now keeps 2, and a run killed after the re-plan resumes with it."""
    from fasttrain.engine import train

    extra = ("train.time_budget_s=30", "schedule.name=linear", "schedule.warmup_epochs=2", "runtime.precision=fp32")
    _fake_plan(monkeypatch, 4, 11)
    straight = train(tiny_cfg(shapes_root, tmp_path / "a", *extra, epochs=9), progress=False)
    lrs = [r["lr"] for r in straight.history]
    assert [r["step"] for r in straight.history] == [3, 6, 9, 11]
    peak = 0.005
    assert lrs[0] == pytest.approx(peak * (1 - 1 / 2))  # the first plan: warm-up 2, falling over 2 more steps
    # the re-plan: still warm-up 2, then a straight line down to step 11 (a warm-up of 5 gave 5/6 and 2/6)
    assert lrs[1:] == pytest.approx([peak * (1 - 4 / 9), peak * (1 - 7 / 9), 0.0], abs=1e-12)

    run = _killed_at(monkeypatch, 7, tiny_cfg(shapes_root, tmp_path / "b", *extra, epochs=9), 4, 11)
    resumed = _resumed(monkeypatch, run)
    assert [r["lr"] for r in resumed.history] == lrs
    _same_weights(straight.run_dir, run)


def test_a_plan_of_many_epochs_replans_once_more_halfway_and_resumes_along_it(shapes_root, tmp_path, monkeypatch):
    """Plan 4 steps, re-plan 30 after the first epoch (10 epochs of 3), then once more after the epoch that passes
    half of them (step 15), from the epochs trained since: 24 steps. Every rank derives that epoch from the plan;
    a run killed after the second re-plan resumes along it."""
    from fasttrain.engine import _late_replan_epoch, train

    assert [_late_replan_epoch(t, 3) for t in (4, 18, 21, 30, 300)] == [0, 0, 0, 5, 50]
    extra = (*EXTRA, "runtime.precision=fp32", "schedule.name=linear")
    asked = _fake_plan(monkeypatch, 4, 30, 24)
    straight = train(tiny_cfg(shapes_root, tmp_path / "a", *extra, epochs=99), progress=False)
    assert asked == [0, 3, 15]
    assert [r["step"] for r in straight.history] == list(range(3, 25, 3))
    assert straight.history[-1]["lr"] == pytest.approx(0.0, abs=1e-12)  # the schedule ends complete at 24
    assert load_config(straight.run_dir / "config.toml").train.total_steps == 24
    log = (straight.run_dir / "train.log").read_text()
    assert "time budget: the last 4 epochs took" in log and "24 steps = 8 epochs" in log

    run = _killed_at(monkeypatch, 17, tiny_cfg(shapes_root, tmp_path / "b", *extra, epochs=99), 4, 30, 24)
    resumed = _resumed(monkeypatch, run)
    _same_weights(straight.run_dir, run)
    _same_records(straight.history, resumed.history)


def test_a_plan_inside_the_first_epoch_is_replanned_halfway_and_resumes_exactly(shapes_root, tmp_path, monkeypatch):
    """The first plan (4 steps) ends inside the 6-step first epoch: the one re-plan comes at step 2, from the steps'
    own time (8 steps: the first epoch whole, 2 more), not after the epoch; a run killed after it resumes along
    the new plan from the step checkpoint written at the re-plan."""
    from fasttrain.engine import train

    extra = (*EXTRA, "train.checkpoint_every_steps=7", "runtime.precision=fp32", "schedule.name=linear")
    asked = _fake_plan(monkeypatch, 4, 8, 99, per_epoch=6)
    straight = train(tiny_cfg(shapes_root, tmp_path / "a", *extra, epochs=9, max_steps=6), progress=False)
    assert asked == [0, 2]  # the plan, the re-plan at step 2, and none after the first epoch
    assert [r["step"] for r in straight.history] == [6, 8]
    assert straight.history[-1]["lr"] == pytest.approx(0.0, abs=1e-12)
    log = (straight.run_dir / "train.log").read_text()
    assert "2 steps trained at" in log and "8 steps = 2 epochs (1 of 6, the last of 2) instead of 4 steps" in log

    cfg = tiny_cfg(shapes_root, tmp_path / "b", *extra, epochs=9, max_steps=6)
    run = _killed_at(monkeypatch, 5, cfg, 4, 8, 99, per_epoch=6)
    assert load_checkpoint(run / "checkpoints" / "last.pt")["state"]["step"] == 2  # written at the re-plan
    resumed = _resumed(monkeypatch, run)
    _same_weights(straight.run_dir, run)
    _same_records(straight.history, resumed.history)


def test_a_real_budget_run_ends_with_its_schedule_complete(shapes_root, tmp_path):
    """No stand-ins: a short measurement, a plan, a re-plan; whatever the machine's speed, the run trains the
    steps its config.toml records and its last learning rate is the schedule's end."""
    from fasttrain.engine import train

    result = train(tiny_cfg(shapes_root, tmp_path, "train.time_budget_s=3", epochs=500), progress=False)
    saved = load_config(result.run_dir / "config.toml").train
    assert saved.total_steps >= 1 and result.history[-1]["step"] == saved.total_steps
    assert len(result.history) == saved.epochs != 500  # the plan, not the config's 500 (3 s cannot hold them)
    assert result.history[-1]["lr"] == pytest.approx(0.0, abs=1e-12)
    records = [json.loads(x) for x in (result.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert records[0]["event"] == "startup" and records[0]["step"] == 0
    assert records[1]["step"] == 1  # the measuring steps were not counted as training


def test_with_cuda_graphs_the_recording_call_is_warm_up_too(shapes_root, tmp_path, monkeypatch):
    """torch.compile's reduce-overhead mode (the CIFAR speed run's) runs a new function once to warm it up and
    records its CUDA graph at the second call: both are warm-up, for the step's rate and the evaluation's cost.
    A fake clock charges 100 s for a function's first call, 50 s for its second, then 1 ms per sample."""
    from types import SimpleNamespace

    from fasttrain import engine
    from fasttrain.prepare import prepare
    from fasttrain.runtime import Runtime

    monkeypatch.setattr(Runtime, "warmup_calls", property(lambda self: 2))
    prep = prepare(tiny_cfg(shapes_root, tmp_path, "train.eval_batch_size=40", max_steps=0))
    trainer = engine.Trainer(prep, None, progress=False)
    try:
        prep.runtime.compile, prep.runtime.eager_eval = True, False
        now, calls = [0.0], {"train": 0, "eval": 0}

        def charge(kind, n):
            calls[kind] += 1
            now[0] += {1: 100.0, 2: 50.0}.get(calls[kind], 0.0) + 0.001 * n

        monkeypatch.setattr(trainer.task, "eval_step", lambda state, batch: charge("eval", len(batch)) or {})
        monkeypatch.setattr(trainer.task, "train_step", lambda state, batch, **kw: charge("train", len(batch)) or {})
        monkeypatch.setattr(engine, "time", SimpleNamespace(perf_counter=lambda: now[0]))
        per_batch, per_sample = trainer._measure_eval()
        rate = trainer._measure_rate(steps=3)
    finally:
        trainer.close()
    assert calls["eval"] == 5 and per_batch + 40 * per_sample == pytest.approx(0.04)  # and 2 at the last batch's 20
    assert calls["train"] == 5 and rate == pytest.approx(1000.0)  # 3 timed steps at 1 ms a sample
    assert trainer._size_change_s == pytest.approx(150.0)  # what a new size would compile and record again


@pytest.mark.parametrize("max_s", [math.inf, 1.0])
def test_a_compiled_evaluation_is_measured_without_its_compile(shapes_root, tmp_path, monkeypatch, max_s):
    """On CUDA the evaluation is compiled, and each new batch shape's first call compiles a graph: the warm-up
    (longer than the measurement's share of the budget) was taken as the cost of every evaluation batch, and a
    second shape compiled inside the timed calls. A 90 s budget planned 1 step. The split's last, smaller batch
    is compiled too, after the timed calls: in the first epoch, its compile was charged to every evaluation
    after. Here a fake clock charges 100 s for a shape's first call and 1 ms per sample; the validation split's
    60 images evaluate in batches of 40 and 20."""
    from types import SimpleNamespace

    from fasttrain import engine
    from fasttrain.prepare import prepare

    prep = prepare(tiny_cfg(shapes_root, tmp_path, "train.eval_batch_size=40"))
    trainer = engine.Trainer(prep, None, progress=False)
    try:
        prep.runtime.compile, prep.runtime.eager_eval = True, False
        now, seen = [0.0], []

        def eval_step(state, batch):
            now[0] += (100.0 if len(batch) not in seen else 0.0) + 0.001 * len(batch)
            seen.append(len(batch))
            return {}

        monkeypatch.setattr(trainer.task, "eval_step", eval_step)
        monkeypatch.setattr(engine, "time", SimpleNamespace(perf_counter=lambda: now[0]))
        per_batch, per_sample = trainer._measure_eval(max_s=max_s)
    finally:
        trainer.close()
    assert trainer.val_loader.num_samples == 60
    assert seen[0] == 40 and seen[-1] == 20 and seen.count(20) == 1  # each shape the run evaluates at, once
    assert per_batch + 40 * per_sample == pytest.approx(0.04)


def test_under_torchrun_the_last_batch_compiled_is_this_processs(shapes_root, tmp_path, monkeypatch):
    """Each process evaluates its shard (every backend's epoch_order: samples rank, rank + world, ...): 60 images
    on 2 processes are 30 each, whose last batch of 40 holds 30, not the whole split's 60 % 40 = 20."""
    from fasttrain import engine
    from fasttrain.distributed import DistInfo
    from fasttrain.prepare import prepare

    prep = prepare(tiny_cfg(shapes_root, tmp_path, "train.eval_batch_size=40"))
    trainer = engine.Trainer(prep, None, progress=False)
    try:
        prep.runtime.compile, prep.runtime.eager_eval = True, False
        prep.dist = DistInfo(rank=1, world_size=2)
        seen: list[int] = []
        monkeypatch.setattr(trainer.task, "eval_step", lambda state, batch: seen.append(len(batch)) or {})
        trainer._measure_eval()
    finally:
        trainer.close()
    assert seen[-1] == 30 and 20 not in seen


def test_a_process_without_validation_batches_measures_no_evaluation(shapes_root, tmp_path):
    """Under torchrun a validation split smaller than the processes leaves some shards empty: the measurement
    raised StopIteration there, and the other ranks waited for the plan's broadcast."""
    from fasttrain import engine
    from fasttrain.prepare import prepare

    prep = prepare(tiny_cfg(shapes_root, tmp_path, "train.eval_batch_size=40"))
    trainer = engine.Trainer(prep, None, progress=False)
    real = trainer.val_loader
    try:
        trainer.val_loader = []  # type: ignore[assignment]  # this process's shard: no batch
        assert trainer._measure_eval() == (0.0, 0.0)
    finally:
        trainer.val_loader = real
        trainer.close()


def test_a_compiled_evaluation_measures_the_eager_ema_on_its_own(shapes_root, tmp_path, monkeypatch):
    """The EMA's weights evaluate eagerly (evaluate swaps in the average's own module) while the model's
    evaluation is compiled on CUDA: its cost is measured, not taken as the compiled one's again. A fake clock
    charges 1 ms per sample to the model, 5 ms to the EMA."""
    from types import SimpleNamespace

    from fasttrain import engine
    from fasttrain.prepare import prepare

    prep = prepare(tiny_cfg(shapes_root, tmp_path, "train.eval_batch_size=40", "train.ema_decay=0.9"))
    trainer = engine.Trainer(prep, None, progress=False)
    try:
        prep.runtime.compile, prep.runtime.eager_eval = True, False
        now, name = [0.0], trainer.task.predict_module

        def eval_step(state, batch):
            ema = state.local[name] is state.ema[name].module
            now[0] += (0.005 if ema else 0.001) * len(batch)
            return {}

        monkeypatch.setattr(trainer.task, "eval_step", eval_step)
        monkeypatch.setattr(engine, "time", SimpleNamespace(perf_counter=lambda: now[0]))
        per_batch, per_sample = trainer._measure_eval()
        assert trainer.state.local[name] is not trainer.state.ema[name].module  # put back
        prep.runtime.compile = False  # eager: the EMA costs as much as the model
        eager = trainer._measure_eval()
    finally:
        trainer.close()
    assert per_batch + 40 * per_sample == pytest.approx(0.04 + 0.2)
    assert eager[0] + 40 * eager[1] == pytest.approx(2 * 0.04)


def test_the_rate_measurement_leaves_no_gradient_behind(tmp_path):
    """The measurement's steps are undone, their gradients too: 45 images in micro-batches of 4 (batch 8,
    accumulation 2) are 11 micro-batches, fewer than the measurement's 6 steps of 2; it stopped after the 11th,
    inside an accumulation, and the run's first step added that micro-batch's gradients to its own."""
    from fasttrain import engine
    from fasttrain.data.synthetic import make_shapes_dataset
    from fasttrain.prepare import prepare

    root = make_shapes_dataset(
        tmp_path / "shapes", train_per_class=15, val_per_class=4, size=32, shapes=("circle", "square", "triangle")
    )
    cfg = tiny_cfg(root, tmp_path / "runs", "train.batch_size=8", "train.accumulation=2", max_steps=0, epochs=2)
    trainer = engine.Trainer(prepare(cfg), None, progress=False)
    try:
        assert len(trainer.train_loader) == 11
        params = list(trainer.state.modules["model"].parameters())
        assert trainer._measure_rate() > 0
        assert [p for p in params if p.grad is not None] == []
    finally:
        trainer.close()


def test_a_rate_measurement_cut_short_by_an_error_leaves_no_gradient_either(tmp_path, monkeypatch):
    """An error inside an accumulation (at the fourth micro-batch of two-batch steps) leaves the third's gradients
    on the parameters unless the measurement clears them as it puts the state back."""
    from fasttrain import engine
    from fasttrain.data.synthetic import make_shapes_dataset
    from fasttrain.prepare import prepare

    root = make_shapes_dataset(
        tmp_path / "shapes", train_per_class=15, val_per_class=4, size=32, shapes=("circle", "square", "triangle")
    )
    cfg = tiny_cfg(root, tmp_path / "runs", "train.batch_size=8", "train.accumulation=2", max_steps=0, epochs=2)
    trainer = engine.Trainer(prepare(cfg), None, progress=False)
    try:
        real, calls = trainer.task.train_step, [0]

        def failing_step(state, batch, **kw):
            calls[0] += 1
            if calls[0] == 4:
                raise RuntimeError("a step failed")
            return real(state, batch, **kw)

        monkeypatch.setattr(trainer.task, "train_step", failing_step)
        with pytest.raises(RuntimeError, match="a step failed"):
            trainer._measure_rate()
        assert [p for p in trainer.state.modules["model"].parameters() if p.grad is not None] == []
    finally:
        trainer.close()


def test_an_eager_evaluation_warms_each_size_it_times(shapes_root, tmp_path, monkeypatch):
    """An eager evaluation is timed at two sizes (a call's own cost apart from the samples'); on CUDA
    cudnn.benchmark searches its algorithms at each new shape, so each size is warmed once before it is timed.
    A fake clock charges 100 s for a shape's first call, 10 ms a call and 1 ms a sample."""
    from types import SimpleNamespace

    from fasttrain import engine
    from fasttrain.prepare import prepare

    prep = prepare(tiny_cfg(shapes_root, tmp_path, "train.eval_batch_size=40"))
    trainer = engine.Trainer(prep, None, progress=False)
    try:
        prep.runtime.compile = False
        now, seen = [0.0], set()

        def eval_step(state, batch):
            now[0] += (100.0 if len(batch) not in seen else 0.0) + 0.01 + 0.001 * len(batch)
            seen.add(len(batch))
            return {}

        monkeypatch.setattr(trainer.task, "eval_step", eval_step)
        monkeypatch.setattr(engine, "time", SimpleNamespace(perf_counter=lambda: now[0]))
        per_batch, per_sample = trainer._measure_eval()
    finally:
        trainer.close()
    assert (per_batch, per_sample) == (pytest.approx(0.01), pytest.approx(0.001))
