"""The timing core on CPU: warm-up excluded, medians over repeats, samples/s arithmetic, the loader clock."""

from __future__ import annotations

import json
import time

import pytest
import torch

from fasttrain import bench as B
from fasttrain.data.base import Batch


class Clock:
    """A fake perf_counter: each step advances it by a chosen amount, so timings are exact."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock(monkeypatch):
    c = Clock()
    monkeypatch.setattr(B.time, "perf_counter", c)
    return c


def test_warmup_steps_are_not_timed(clock):
    calls = []

    def step() -> int:
        calls.append(1)
        clock.now += 10.0 if len(calls) <= 3 else 0.5  # the first three steps are slow (compile)
        return 8

    t = B.time_steps(step, warmup=3, steps=4, repeats=2, device="cpu")
    assert len(calls) == 3 + 4 * 2
    assert t.per_repeat_seconds == [2.0, 2.0]
    assert t.seconds_per_step == pytest.approx(0.5)
    assert t.samples_per_s == pytest.approx(16.0)  # 8 samples / 0.5 s
    assert t.samples == 32 and t.steps == 4 and t.warmup == 3 and t.repeats == 2
    assert t.clock == "wall" and t.device == "cpu"


def test_median_and_spread_over_repeats(clock):
    durations = iter([1.0, 2.0, 4.0, 1.0, 8.0])  # one step per repeat

    def step() -> int:
        clock.now += next(durations)
        return 4

    t = B.time_steps(step, warmup=0, steps=1, repeats=5, device="cpu")
    assert t.per_repeat_samples_per_s == [4.0, 2.0, 1.0, 4.0, 0.5]
    assert t.samples_per_s == 2.0  # median, not mean
    assert t.samples_per_s_min == 0.5 and t.samples_per_s_max == 4.0
    assert t.samples_per_s_iqr == pytest.approx(4.0 - 1.0)
    assert t.seconds_per_step == 2.0
    assert t.spread == pytest.approx((4.0 - 0.5) / 2.0)


def test_samples_per_second_sums_uneven_batches(clock):
    sizes = iter([10, 10, 6])  # a short last batch counts what it holds

    def step() -> int:
        clock.now += 0.25
        return next(sizes)

    t = B.time_steps(step, warmup=0, steps=3, repeats=1, device="cpu")
    assert t.samples == 26
    assert t.samples_per_s == pytest.approx(26 / 0.75)


def test_step_fn_must_return_an_int_not_a_tensor():
    with pytest.raises(TypeError, match="Python int"):
        B.time_steps(lambda: torch.tensor(3), warmup=0, steps=1, repeats=1, device="cpu")


def test_bad_counts_are_refused():
    with pytest.raises(ValueError):
        B.time_steps(lambda: 1, warmup=0, steps=0, repeats=1)
    with pytest.raises(ValueError):
        B.time_steps(lambda: 1, warmup=-1, steps=1, repeats=1)


def test_real_clock_excludes_a_slow_first_step():
    calls = []

    def step() -> int:
        calls.append(1)
        time.sleep(0.2 if len(calls) == 1 else 0.01)
        return 2

    t = B.time_steps(step, warmup=1, steps=3, repeats=3, device="cpu")
    assert t.seconds_per_step < 0.1  # the 0.2 s first step is not in any repeat
    assert 2 / 0.1 < t.samples_per_s < 2 / 0.009
    assert t.samples_per_s_min <= t.samples_per_s <= t.samples_per_s_max


def test_step_timer_measures_an_interval(clock):
    timer = B.StepTimer("cpu")
    assert timer.mode == "wall"
    with timer:
        clock.now += 1.5
    assert timer.elapsed() == 1.5
    with pytest.raises(ValueError, match="CUDA"):
        B.StepTimer("cpu", mode="events")


def test_peak_memory_on_cpu_reports_rss_only():
    mem = B.peak_memory("cpu")
    assert mem["peak_allocated_bytes"] is None and mem["peak_reserved_bytes"] is None
    assert mem["peak_rss_bytes"] > 10 * 2**20  # a Python process with torch holds far more than 10 MiB


class FakeLoader:
    """Yields ``n`` batches per epoch; records set_epoch calls; the first batch of every epoch is slow."""

    batch_size = 4

    def __init__(self, n: int, clock: Clock, first: float = 5.0, rest: float = 0.1):
        self.n, self.clock, self.first, self.rest = n, clock, first, rest
        self.epochs: list[int] = []
        self.num_samples = n * self.batch_size

    def __iter__(self):
        for i in range(self.n):
            self.clock.now += self.first if i == 0 and not self.epochs else self.rest
            yield Batch(torch.zeros(self.batch_size, 3, 8, 8), torch.zeros(self.batch_size, dtype=torch.long))

    def __len__(self) -> int:
        return self.n

    def set_epoch(self, epoch: int) -> None:
        self.epochs.append(epoch)

    def close(self) -> None:
        pass


def test_loader_throughput_excludes_worker_start_and_wraps_epochs(clock):
    loader = FakeLoader(n=5, clock=clock)
    t = B.loader_throughput(loader, warmup_batches=2, max_batches=4, repeats=3)
    assert t.samples_per_s == pytest.approx(4 / 0.1)  # the 5 s first batch is warm-up
    assert t.samples == 16 and t.device == "cpu"
    assert loader.epochs == [1, 2]  # 2 + 12 batches over epochs of 5: restarted twice, with the epoch number


def test_cycle_batches_refuses_an_empty_loader(clock):
    with pytest.raises(ValueError, match="no batches"):
        next(B.cycle_batches(FakeLoader(n=0, clock=clock)))


class FakeTask:
    """Just enough of the Task contract: a runtime with a device and a train_step that counts updates."""

    class runtime:
        device = torch.device("cpu")

    def __init__(self, clock: Clock):
        self.clock = clock
        self.updates: list[bool] = []
        self.scales: set[float] = set()

    def train_step(self, state, batch, *, update=True, loss_scale=1.0):
        self.clock.now += 0.5
        self.updates.append(update)
        self.scales.add(loss_scale)
        return {"loss": torch.zeros(())}


class FakeState:
    def train(self, mode=True):
        self.mode = mode


def test_model_step_throughput_uses_the_batch_size_and_accumulation(clock):
    task, state = FakeTask(clock), FakeState()
    batch = Batch(torch.zeros(6, 3, 8, 8), torch.zeros(6, dtype=torch.long))
    t = B.model_step_throughput(task, state, batch, warmup=1, steps=4, repeats=2, accumulation=2)
    assert t.samples_per_s == pytest.approx(6 / 0.5)
    assert task.updates == [False, True] * 4 + [False]
    assert task.scales == {0.5}
    assert state.mode is True


def test_end_to_end_throughput_pays_for_the_loader(clock):
    task, state = FakeTask(clock), FakeState()
    loader = FakeLoader(n=100, clock=clock, first=5.0, rest=0.5)
    t = B.end_to_end_throughput(task, state, loader, warmup=1, steps=5, repeats=2)
    assert t.samples_per_s == pytest.approx(4 / (0.5 + 0.5))


def _timing(sps: float) -> B.Timing:
    return B.Timing(samples_per_s=sps, samples_per_s_min=sps * 0.9, samples_per_s_max=sps * 1.1,
                    samples_per_s_iqr=0.0, seconds_per_step=32 / sps, steps=10, warmup=2, repeats=3, samples=320)


@pytest.mark.parametrize("loader_sps, verdict", [(100.0, "input-bound"), (500.0, "compute-bound")])
def test_report_verdict_share_table_and_json(tmp_path, loader_sps, verdict):
    report = B.BenchReport(config_name="demo", backend="TorchLoader", model="smallcnn", batch_size=32,
                           runtime="device=cpu", loader=_timing(loader_sps), model_step=_timing(400.0),
                           end_to_end=_timing(80.0 if verdict == "input-bound" else 360.0), environment={"torch": "x"})
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
    report = B.BenchReport(config_name="demo", backend="torch", model="smallcnn", batch_size=32,
                           runtime="device=cpu", loader=_timing(900.0), model_step=noisy, end_to_end=_timing(480.0))
    assert report.ceiling_share == pytest.approx(1.2)
    assert "note: repeats differ by up to 75%" in report.to_table()


def test_bench_on_a_tiny_cpu_config(tmp_path):
    from fasttrain.config import load_config
    from fasttrain.data.synthetic import make_shapes_dataset

    root = make_shapes_dataset(tmp_path / "shapes", train_per_class=12, val_per_class=2, size=24)
    cfg = load_config(None, [f"data.root={root}", "data.loader=torch", "data.workers=0", "data.image_size=16",
                             "model.name=smallcnn", "model.width=4", "runtime.device=cpu", "train.batch_size=8",
                             "bench.warmup_steps=1", "bench.steps=3", "bench.repeats=2"])
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
