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
