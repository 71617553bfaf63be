"""``fasttrain bench``: the report (verdict, ceiling share, table, JSON) on fixed figures, a real tiny CPU run, and
time to a target."""

from __future__ import annotations

import json

import pytest
import torch

from fasttrain import benchmark as B
from fasttrain.timing import Timing


def _timing(sps: float) -> Timing:
    return Timing(
        samples_per_s=sps,
        samples_per_s_min=sps * 0.9,
        samples_per_s_max=sps * 1.1,
        samples_per_s_iqr=0.0,
        seconds_per_step=32 / sps,
        steps=10,
        warmup=2,
        repeats=3,
        samples=320,
    )


@pytest.mark.parametrize("loader_sps, verdict", [(100.0, "input-bound"), (500.0, "compute-bound")])
def test_report_verdict_share_table_and_json(tmp_path, loader_sps, verdict):
    report = B.BenchReport(
        config_name="demo",
        backend="TorchLoader",
        model="smallcnn",
        batch_size=32,
        runtime="device=cpu",
        loader=_timing(loader_sps),
        model_step=_timing(400.0),
        end_to_end=_timing(80.0 if verdict == "input-bound" else 360.0),
        environment={"torch": "x"},
    )
    assert report.verdict == verdict
    assert report.ceiling_share == pytest.approx(0.2 if verdict == "input-bound" else 0.9)
    table = report.to_table()
    assert verdict in table and "model only (ceiling)" in table and "400.0" in table
    path = report.write_json(tmp_path / "out" / "bench.json")
    data = json.loads(path.read_text())
    assert data["verdict"] == verdict and data["model_step"]["samples_per_s"] == 400.0
    assert data["environment"] == {"torch": "x"}
    assert list((tmp_path / "out").iterdir()) == [path]  # no temp file left behind
    assert "note:" not in table  # repeats within 20 %: not called rough


def _report(loader: Timing, model_step: Timing, end_to_end: Timing) -> B.BenchReport:
    return B.BenchReport(
        config_name="demo",
        backend="torch",
        model="smallcnn",
        batch_size=32,
        runtime="device=cpu",
        loader=loader,
        model_step=model_step,
        end_to_end=end_to_end,
    )


def test_a_compute_bound_run_whose_parts_slow_each_other_says_so():
    """bench said 'compute-bound' at 81% of the ceiling where autotune, timing the parts together, said
    'input-bound': the verdict stays the parts', and a note says why the two differ."""
    report = _report(_timing(900.0), _timing(400.0), _timing(324.0))
    assert report.verdict == "compute-bound" and report.ceiling_share == pytest.approx(0.81)
    assert "note: each part alone keeps up, yet together they reach 81% of the ceiling" in report.to_table()


def test_under_torchrun_end_to_end_is_measured_against_the_data_parallel_step():
    """bench under two processes said 'input-bound; 23% of the ceiling ... try data.loader = dali' against one
    process's step: the all-reduce is part of every training step, and against the 2-process step the run
    reached 83%, limited by the all-reduce, not the loader (the scale walkthrough's figures)."""
    import dataclasses

    report = dataclasses.replace(
        _report(_timing(3234.0), _timing(3845.0), _timing(891.0)), world_size=2, model_step_parallel=_timing(1072.0)
    )
    assert report.ceiling is report.model_step_parallel
    assert report.verdict == "compute-bound" and report.ceiling_share == pytest.approx(891 / 1072)
    assert "verdict: compute-bound; end to end reaches 83% of the model-only ceiling" in report.to_table()
    assert str(report) == report.to_table()  # print(bench(cfg)) shows the table, not every dataclass field


def test_report_calls_noisy_figures_rough():
    noisy = _timing(400.0)
    noisy.samples_per_s_min, noisy.samples_per_s_max = 200.0, 500.0
    report = _report(_timing(900.0), noisy, _timing(480.0))
    assert report.ceiling_share == pytest.approx(1.2)
    assert "note: repeats differ by up to 75%" in report.to_table()


def test_bench_on_a_tiny_cpu_config(tmp_path):
    from fasttrain.config import load_config
    from fasttrain.data.synthetic import make_shapes_dataset

    root = make_shapes_dataset(tmp_path / "shapes", train_per_class=12, val_per_class=2, size=24)
    cfg = load_config(
        None,
        [
            f"data.root={root}",
            "data.loader=torch",
            "data.workers=0",
            "data.image_size=16",
            "model.name=smallcnn",
            "model.width=4",
            "runtime.device=cpu",
            "train.batch_size=8",
            "bench.warmup_steps=1",
            "bench.steps=3",
            "bench.repeats=2",
        ],
    )
    mine = tmp_path / "bench.json"
    mine.write_text("the user's own file")
    report = B.bench(cfg, json_path=mine)
    assert report.backend == "torch" and report.batch_size == 8 and report.model == "smallcnn"
    for t in (report.loader, report.model_step, report.end_to_end):
        assert t.samples_per_s > 0 and t.repeats == 2 and t.steps == 3 and t.samples == 24
    # (the verdict and ceiling arithmetic are tested on fixed figures above: these CPU timings are too noisy)
    assert report.environment["torch"] == torch.__version__
    assert mine.read_text() == "the user's own file"  # never overwritten: the report took a new name
    assert report.json_path == str(tmp_path / "bench-2.json")
    assert json.loads((tmp_path / "bench-2.json").read_text()) == json.loads(json.dumps(report.to_dict()))
    assert "end to end" in report.to_table()


def _run_with(tmp_path, records):
    run = tmp_path / "run"
    run.mkdir()
    lines = [json.dumps(r) for r in records] + ['{"torn']
    (run / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    return run


def test_time_to_target_sums_training_and_evaluation_up_to_the_first_epoch_there(tmp_path):
    run = _run_with(
        tmp_path,
        [
            {"epoch": 1, "step": 2, "event": "step", "train_loss": 2.0},
            {
                "epoch": 1,
                "epoch_time_s": 10.0,
                "eval_time_s": 1.0,
                "samples_per_s": 100.0,
                "val_acc": 0.5,
                "val_loss": 1.5,
            },
            {
                "epoch": 2,
                "epoch_time_s": 30.0,
                "eval_time_s": 1.0,
                "samples_per_s": 200.0,
                "val_acc": 0.91,
                "val_loss": 0.4,
            },
            {
                "epoch": 3,
                "epoch_time_s": 10.0,
                "eval_time_s": 1.0,
                "samples_per_s": 300.0,
                "val_acc": 0.95,
                "val_loss": 0.3,
            },
        ],
    )
    got = B.time_to_target(run, "val_acc", 0.9)
    assert (got.seconds, got.epoch, got.best) == (42.0, 2, 0.91)
    assert got.samples_per_s == pytest.approx((100 * 10 + 200 * 30) / 40)  # time-weighted over those epochs
    assert "time to val_acc 0.9: 42.0 s" in got.line()
    assert B.time_to_target(run, "val_loss", 0.35).epoch == 3  # a loss reaches its target from above
    missed = B.time_to_target(run, "val_acc", 0.99)
    assert missed.seconds is None and missed.best == 0.95 and "not reached (best 0.9500)" in missed.line()
    with pytest.raises(ValueError, match=r"--target: the run in .* records no val_psnr"):
        B.time_to_target(run, "val_psnr", 30)
    assert B.parse_target("val_acc=0.9") == ("val_acc", 0.9)
    with pytest.raises(ValueError, match=r"--target: expected METRIC=VALUE"):
        B.parse_target("val_acc")


def test_the_report_shows_time_to_target_beside_samples_per_s(tmp_path):
    report = B.BenchReport(
        "c",
        "torch",
        "m",
        32,
        "cpu",
        _timing(100.0),
        _timing(200.0),
        _timing(90.0),
        time_to_target=B.TimeToTarget("runs/x", "val_acc", 0.9, 42.0, 2, 0.91, 185.0),
    )
    assert "time to val_acc 0.9: 42.0 s of training + evaluation (epoch 2 of runs/x, 185.0 samples/s" in (
        report.to_table()
    )
    assert report.to_dict()["time_to_target"]["seconds"] == 42.0


def test_bench_times_the_model_step_at_each_progressive_size(tmp_path, monkeypatch):
    from fasttrain import timing
    from fasttrain.config import load_config
    from fasttrain.data.synthetic import make_shapes_dataset

    root = make_shapes_dataset(tmp_path / "shapes", train_per_class=8, val_per_class=2, size=32)
    cfg = load_config(
        None,
        [
            f"data.root={root}",
            "data.loader=cache",
            "data.workers=0",
            "data.image_size=32",
            "data.progressive=[16, 32]",
            "data.progressive_step=8",
            "train.epochs=3",
            "model.name=smallcnn",
            "model.width=4",
            "runtime.device=cpu",
            "train.batch_size=8",
            "bench.warmup_steps=1",
            "bench.steps=5",
            "bench.repeats=1",
        ],
    )
    passes: list[list[int]] = []  # the sizes each of the loader and end-to-end measurements drew
    real = timing.cycle_batches

    def watched(loader, epoch=0):
        passes.append([])
        for batch in real(loader, epoch):
            passes[-1].append(batch.inputs.shape[-1])
            yield batch

    monkeypatch.setattr(timing, "cycle_batches", watched)
    report = B.bench(cfg)
    # Both run past the epoch's end (32 images, 4 batches of 8) and stay at the largest size, 32 px.
    assert len(passes) == 2 and all(len(p) > 4 and set(p) == {32} for p in passes), passes
    assert sorted(report.per_size) == [16, 24]  # 32, the largest, is what the main rows measure
    assert all(t.samples_per_s > 0 for t in report.per_size.values())
    table = report.to_table()
    assert "model only, 16 px" in table and "model only, 24 px" in table
    assert set(report.to_dict()["model_step_per_size"]) == {"16", "24"}
    assert report.to_dict()["image_size"] == 32  # the size of the main rows
