"""train.loggers: metrics.jsonl always; metrics.csv (epoch rows) and TensorBoard event files on request."""

from __future__ import annotations

import csv

import pytest

from fasttrain.config import ConfigError, load_config
from fasttrain.engine import train


def _cfg(root, runs, *extra):
    return load_config(
        "quickstart",
        [
            f"data.root={root}",
            f"train.runs_dir={runs}",
            "train.epochs=2",
            "train.max_steps=2",
            "train.log_every=1",
            "data.workers=0",
            "data.loader=torch",
            "train.eval_every=2",
            *extra,
        ],
    )


def test_csv_and_tensorboard_loggers(shapes_root, tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run = train(_cfg(shapes_root, tmp_path, 'train.loggers=["jsonl", "csv", "tensorboard"]'), progress=False).run_dir
    with open(run / "metrics.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [r["epoch"] for r in rows] == ["1", "2"]
    assert rows[0]["val_acc"] == "" and rows[1]["val_acc"]  # a column that appears later gets its header
    acc = EventAccumulator(str(run / "tensorboard"))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    assert {"train/loss", "lr", "samples_per_s", "val/acc", "train/loss_epoch"} <= tags
    assert [e.step for e in acc.Scalars("train/loss")] == [1, 2, 3, 4]


def test_unknown_logger_is_named():
    with pytest.raises(ConfigError, match="train.loggers: must be one of jsonl, csv, tensorboard, got 'wandb'"):
        load_config(None, ['train.loggers=["wandb"]'])


# -- what the console shows ---------------------------------------------------------------------------------------
def test_a_terminal_too_narrow_for_a_bar_gets_the_plain_lines(monkeypatch):
    import io
    import os
    import sys

    from fasttrain import metrics

    class Tty(io.StringIO):
        def isatty(self):
            return True

        def fileno(self):
            return 2

    monkeypatch.setattr(sys, "stderr", Tty())
    for columns, bar in ((0, False), (20, False), (120, True)):  # some CI consoles and IDE panes report 0
        monkeypatch.setattr(os, "get_terminal_size", lambda fd=None, c=columns: os.terminal_size((c, 24)))
        assert metrics._is_terminal() is bar
        progress = metrics.Progress(10, 0, "epoch 1/1", enabled=True)
        assert (progress.bar is not None) is bar
        progress.close()
        assert metrics.ConsoleFilter(bar_on_terminal=True).bar is bar  # no bar: the step lines are shown


def test_the_bar_shows_the_runs_one_eta_the_step_lines_show(shapes_root, tmp_path, capsys, monkeypatch):
    import re

    from fasttrain import metrics

    monkeypatch.setattr(metrics, "_is_terminal", lambda: True)
    result = train(_cfg(shapes_root, tmp_path / "runs", "train.max_steps=3"))
    screen = [line.rpartition("\r")[2] for line in capsys.readouterr().err.split("\n")]
    bars = [line for line in screen if line.startswith("epoch 1/2: 100%")]
    assert len(bars) == 1 and "<" not in bars[0], screen  # not tqdm's own time left in the epoch besides
    shown = re.search(r"ETA=(\d+m\d\ds)", bars[0]).group(1)
    logged = [ln for ln in (result.run_dir / "train.log").read_text().splitlines() if "epoch 1/2 step 3/3" in ln]
    assert logged and logged[0].endswith(f"ETA {shown}")
