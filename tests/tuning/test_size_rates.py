"""Autotune under progressive resizing: memory is planned at the largest training size (every candidate is probed
there) and the report gives the training step's samples/s at each size, at the chosen batch. Timed on a virtual
clock whose step cost grows with the pixels of the batch, so the figures are exact whatever the machine's load."""

from __future__ import annotations

import json
import time

import pytest

from fasttrain.cli import main


@pytest.fixture
def pixel_time(monkeypatch):
    """``time.perf_counter`` that moves only in a train step: 1 virtual second per million pixels trained."""
    from fasttrain.tasks.classify import ClassifyTask

    now = [0.0]
    real_step = ClassifyTask.train_step
    sides: list[int] = []

    def step(self, state, batch, **kw):
        out = real_step(self, state, batch, **kw)
        side = batch.inputs.shape[-1]
        sides.append(side)
        now[0] += len(batch) * side * side * 1e-6
        return out

    monkeypatch.setattr(ClassifyTask, "train_step", step)
    monkeypatch.setattr(time, "perf_counter", lambda: now[0])
    return sides


def _progressive_autotune(tmp_path, *extra: str) -> list[str]:
    """``fasttrain autotune quickstart`` at progressive sizes 16 -> 32 px, batch 16, with quick probes into
    ``tmp_path / "out"``; ``extra``: flags (``--no-verify``) and more settings."""
    args = ["autotune", "quickstart", "--out", str(tmp_path / "out"), "-q"]
    args += [e for e in extra if e.startswith("--")]
    for s in (
        "tune.min_batch=16",
        "tune.warmup_steps=1",
        "tune.repeats=2",
        "tune.repeat_s=0.01",
        "tune.time_budget_s=600",
        "train.epochs=1000",  # a long job: the CPU cap stays above the budget
        "train.batch_size=16",
        "data.progressive=[16, 32]",
        "data.progressive_step=8",
        f"train.runs_dir={tmp_path / 'runs'}",
        f"tune.cache_dir={tmp_path / 'cache'}",
        *(e for e in extra if not e.startswith("--")),
    ):
        args += ["--set", s]
    return args


def test_autotune_probes_at_the_largest_size_and_reports_samples_per_s_per_size(tmp_path, capsys, pixel_time):
    out = tmp_path / "out"
    assert main(_progressive_autotune(tmp_path, "--no-verify", "tune.max_batch=32")) == 0
    table = capsys.readouterr().out
    report = json.loads((out / "autotune.json").read_text())
    assert report["input_shape"] == [3, 32, 32]  # memory planned at the largest
    chosen = report["chosen_batch"]
    rates = report["size_rates"]
    assert [r["size"] for r in rates] == [16, 24, 32]
    assert all(r["batch_size"] == chosen for r in rates)
    for r in rates:  # the virtual clock: 1e6 / side^2 samples/s, so each size was timed at its own side
        assert r["samples_per_s"] == pytest.approx(1e6 / r["size"] ** 2, rel=1e-6)
    assert f"samples/s per training size at batch {chosen}" in table and "16 px 3,906" in table, table
    # every probe and loader trial trained at 32 px; the smaller sizes only in the per-size figures, cheaply (on
    # CPU one warm-up step and one timed step per round, two rounds)
    assert sorted(s for s in pixel_time if s != 32) == [16, 16, 16, 24, 24, 24]


def test_loader_trials_and_the_verification_stay_at_the_largest_size_when_the_loader_wraps(tmp_path, pixel_time):
    """Autotune sets each loader to the first epoch at the largest size; on a set of a few batches the loader trials
    and the verification run over several epochs. A restart used to set epoch 1: smaller images, end to end
    against a model-only step at the largest (and on CUDA a recompile inside the clock)."""
    from fasttrain.data.synthetic import make_shapes_dataset

    root = make_shapes_dataset(tmp_path / "shapes", train_per_class=8, val_per_class=2, size=32)  # 2 batches of 16
    out = tmp_path / "out"
    args = _progressive_autotune(
        tmp_path, f"data.root={root}", "data.loader=torch", "data.workers=0", "tune.max_batch=16", "tune.verify_s=0.1"
    )
    assert main(args) in (0, 1)  # the figures, not the verdict, are what this is about
    report = json.loads((out / "autotune.json").read_text())
    assert report["loader"]["trials"] and report["verify"]["steps"] > 2  # both ran, over more than one epoch
    # 32 px everywhere but the per-size figures (one warm-up and one timed step per round, two rounds, on CPU)
    assert sorted(s for s in pixel_time if s != 32) == [16, 16, 16, 24, 24, 24]
