"""The name tables of fasttrain.registry beyond tasks, backends and formats: optimizers, schedules and metric
sinks (what config validates against, what optim and metrics resolve), which direction a task's metrics are
better in, and the settings a task is constructed with."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from fasttrain import registry
from fasttrain.config import ConfigError, ScheduleConfig, TrainConfig, load_config
from fasttrain.metrics import MetricsLog
from fasttrain.optim import lr_factor, make_optimizer, make_scheduler
from fasttrain.runtime import runtime_for
from fasttrain.tasks import make_task, task_class

MY_TABLES = ("optimizers", "schedules", "loggers")


@pytest.mark.parametrize("table", MY_TABLES)
def test_every_entry_resolves_and_config_names_the_setting(table):
    for name in registry.names(table):
        assert callable(registry.resolve(table, name))
    with pytest.raises(ValueError, match=rf"^{registry.SETTINGS[table]}: unknown value 'nope'"):
        registry.resolve(table, "nope")


def test_config_lists_the_tables_names_in_its_errors():
    with pytest.raises(ConfigError, match="optim.name: must be one of sgd, adamw, adam, lamb, lion, timm/<name>"):
        load_config(None, ["optim.name=rmsprop"])
    with pytest.raises(ConfigError, match="schedule.name: must be one of constant, step, cosine, linear, onecycle"):
        ScheduleConfig(name="poly")
    with pytest.raises(ConfigError, match="train.loggers: must be one of jsonl, csv, tensorboard, got 'wandb'"):
        TrainConfig(loggers=["wandb"])


def half(cfg, step, steps_per_epoch, total_steps):
    """A schedule registered from this module: half the peak rate, then a quarter after the first epoch."""
    return 0.5 if step < steps_per_epoch else 0.25


def test_a_schedule_registered_from_outside_is_accepted_and_used(monkeypatch):
    monkeypatch.setitem(registry.TABLES["schedules"], "half", f"{__name__}:half")
    cfg = ScheduleConfig(name="half")
    assert [lr_factor(cfg, s, 2, 4) for s in range(4)] == [0.5, 0.5, 0.25, 0.25]
    opt = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=0.2)
    sched = make_scheduler(opt, cfg, 2, 4)
    rates = []
    for _ in range(4):
        rates.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert rates == pytest.approx([0.1, 0.1, 0.05, 0.05])


def test_adam_is_adamw_without_weight_decay():
    cfg = load_config(None, ["optim.name=adam", "optim.weight_decay=0.1"]).optim
    opt = make_optimizer(nn.Linear(3, 2), cfg)
    assert isinstance(opt, torch.optim.AdamW) and {g["weight_decay"] for g in opt.param_groups} == {0.0}


class RecordingSink:
    """A metric sink registered from this module: remembers what it was given."""

    made: list[RecordingSink] = []

    def __init__(self, run_dir):
        self.calls: list[tuple[str, dict]] = []
        self.jsonl_when_epoch: list[str] = []
        self.run_dir = run_dir
        RecordingSink.made.append(self)

    def step(self, record):
        self.calls.append(("step", record))

    def epoch(self, record):
        self.calls.append(("epoch", record))
        self.jsonl_when_epoch = (self.run_dir / "metrics.jsonl").read_text().splitlines()

    def event(self, record):
        self.calls.append(("event", record))

    def close(self):
        self.calls.append(("close", {}))


def test_metrics_log_hands_every_record_to_each_sink_after_jsonl(monkeypatch, tmp_path):
    monkeypatch.setitem(registry.TABLES["loggers"], "recording", f"{__name__}:RecordingSink")
    monkeypatch.setattr(RecordingSink, "made", [])
    assert TrainConfig(loggers=["recording"]).loggers == ["recording"]
    log = MetricsLog(tmp_path, ["recording"])
    log.step({"epoch": 0, "step": 1, "loss": 2.0})
    log.epoch({"epoch": 1, "step": 2, "train_loss": 1.5})
    log.event({"epoch": 1, "step": 2, "event": "test", "test_loss": 1.0})
    log.close()
    log.close()  # twice: nothing more
    (sink,) = RecordingSink.made
    assert [c for c, _ in sink.calls] == ["step", "epoch", "event", "close"]
    assert len(sink.jsonl_when_epoch) == 2  # metrics.jsonl had the epoch's line before this sink saw it
    lines = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r.get("event") for r in lines] == ["step", None, "test"]


def test_a_metrics_log_that_is_not_enabled_builds_no_sink(monkeypatch, tmp_path):
    monkeypatch.setitem(registry.TABLES["loggers"], "recording", f"{__name__}:RecordingSink")
    monkeypatch.setattr(RecordingSink, "made", [])
    log = MetricsLog(tmp_path, ["csv", "recording"], enabled=False)
    log.epoch({"epoch": 1, "step": 2, "train_loss": 1.5})
    assert RecordingSink.made == [] and not list(tmp_path.iterdir())


# -- which way is better ------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "task, metric, mode",
    [
        ("classify", "val_acc", "max"),
        ("classify", "val_ema_acc5", "max"),
        ("classify", "train_acc", "max"),
        ("classify", "val_loss", "min"),
        ("pix2pix", "test_psnr", "max"),
        ("pix2pix", "val_l1", "min"),
        ("regress", "val_point_px", "min"),
        ("regress", "val_mse", "min"),
    ],
)
def test_the_task_says_which_metrics_are_better_higher(task, metric, mode):
    assert task_class(task).metric_mode(metric) == mode


def test_a_task_declaring_its_own_metric_is_asked_not_the_name(tmp_path):
    """A metric named like no accuracy is better higher when its task says so; one named "acc..." is not, when
    the task does not say so."""
    from fasttrain.monitor import monitors

    class IouTask(task_class("classify")):
        higher_is_better = frozenset({"iou"})

    tc = TrainConfig(early_stop_metric="val_accuracy_gap", early_stop_patience=2, save_top_k=1)
    stop, top = monitors(tc, tmp_path, "val_iou", IouTask.metric_mode, True)
    assert (top.metric, top.mode) == ("val_iou", "max")
    assert (stop.metric, stop.mode) == ("val_accuracy_gap", "min")


def test_a_task_still_saying_best_mode_is_refused_by_name():
    """best_mode was how a task named its direction before higher_is_better; read by nothing now, it would make
    best.pt keep the worst checkpoint of a task whose metric is better higher."""
    with pytest.raises(TypeError, match=r"OldTask\.best_mode is no longer read: .*higher_is_better"):

        class OldTask(task_class("classify")):
            best_mode = "max"


def test_time_to_target_asks_the_runs_task(tmp_path):
    from fasttrain.benchmark import time_to_target

    records = [{"epoch": 1, "epoch_time_s": 1.0, "val_psnr": 20.0}, {"epoch": 2, "epoch_time_s": 1.0, "val_psnr": 25.0}]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    (tmp_path / "config.toml").write_text('[task]\nname = "pix2pix"\n')
    assert time_to_target(tmp_path, "val_psnr", 24.0).epoch == 2  # reached from below: higher is better


# -- settings given to the constructor ----------------------------------------------------------------------------
def _cfg(tmp_path, *extra):
    return load_config(
        None,
        ["model.name=smallcnn", "model.width=4", "model.num_outputs=3", "data.image_size=16", *extra],
    )


def test_a_task_is_built_with_its_model_and_whether_it_restores(tmp_path):
    cfg = _cfg(tmp_path, f"model.init_from={tmp_path / 'missing.pt'}")
    runtime = runtime_for(cfg, device="cpu")
    given = nn.Sequential(nn.Flatten(), nn.Linear(3 * 16 * 16, 3))
    task = make_task(cfg, runtime, None, model=lambda: given, restoring=True)
    assert task.build_state().modules["model"] is given  # the factory's model; init_from not read (restoring)
    with pytest.raises(Exception, match="missing.pt"):
        make_task(cfg, runtime, None).build_state()  # not restoring: the starting weights are read


def test_prepared_new_task_keeps_the_model_and_may_change_restoring(shapes_root, tmp_path):
    from fasttrain.prepare import prepare
    from tests.tinyrun import tiny_cfg

    model = nn.Sequential(nn.Flatten(), nn.LazyLinear(3))
    prep = prepare(tiny_cfg(shapes_root, tmp_path / "runs"), model=model, restoring=True)
    assert prep.task.custom_model is model and prep.task.restoring
    again = prep.new_task()
    assert again is not prep.task and again.custom_model is model and again.restoring
    assert not prep.new_task(restoring=False).restoring
