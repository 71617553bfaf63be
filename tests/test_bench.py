"""``fasttrain bench``: the report (verdict, ceiling share, table, JSON) on fixed figures, a real tiny CPU run, and
the names the benchmarks import from ``fasttrain.bench``."""

from __future__ import annotations

import json

import pytest
import torch

from fasttrain import bench as B


def _timing(sps: float) -> B.Timing:
    return B.Timing(
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


def test_report_calls_noisy_figures_rough():
    noisy = _timing(400.0)
    noisy.samples_per_s_min, noisy.samples_per_s_max = 200.0, 500.0
    report = B.BenchReport(
        config_name="demo",
        backend="torch",
        model="smallcnn",
        batch_size=32,
        runtime="device=cpu",
        loader=_timing(900.0),
        model_step=noisy,
        end_to_end=_timing(480.0),
    )
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


def test_the_benchmarks_names_stay_importable_from_bench():
    # benchmarks/ import these from fasttrain.bench; they now live in fasttrain.timing and fasttrain.memory
    from fasttrain import memory, timing

    assert B.run_steps is timing.run_steps and B.cycle_batches is timing.cycle_batches
    assert B.time_steps is timing.time_steps and B.Timing is timing.Timing
    assert B.reset_peak_memory is memory.reset_peak_memory and B.peak_memory is memory.peak_memory
