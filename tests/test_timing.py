"""The timing core on CPU: warm-up excluded, medians over repeats, samples/s arithmetic, the loader clock,
time-bounded windows and the time budget."""

from __future__ import annotations

import time

import pytest
import torch

from fasttrain import timing as B
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


def test_the_loader_clocks_go_on_from_the_epoch_the_loader_was_set_to(clock):
    """bench and autotune set the loader to the first epoch at the largest progressive size: a second pass that
    fell back to epoch 1 timed a smaller size (and, compiled, a recompile) in the same measurement."""
    loader = FakeLoader(n=5, clock=clock)
    B.loader_throughput(loader, warmup_batches=2, max_batches=4, repeats=3, epoch=7)
    assert loader.epochs == [8, 9]
    loader = FakeLoader(n=5, clock=clock)
    B.end_to_end_throughput(FakeTask(clock), FakeState(), loader, warmup=1, steps=5, repeats=2, epoch=7)
    assert loader.epochs == [8, 9]
    loader = FakeLoader(n=2, clock=clock)
    it = B.cycle_batches(loader, 3)
    for _ in range(5):
        next(it)
    assert loader.epochs == [4, 5]


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


def test_time_window_sizes_repeats_from_a_calibration_step(clock):
    calls = []

    def step() -> int:
        calls.append(1)
        clock.now += 5.0 if len(calls) == 1 else 0.1  # a slow first step (compile), then 0.1 s each
        return 4

    t = B.time_window(step, warmup=1, repeats=3, seconds=0.45, device="cpu")
    assert t.steps == 5  # ceil(0.45 / 0.1): the calibration step, not the slow warm-up, sized the window
    assert len(calls) == 1 + 1 + 3 * 5 and t.warmup == 2
    assert t.samples_per_s == pytest.approx(40.0) and t.timed_seconds == pytest.approx(1.5)


def test_time_window_keeps_min_steps_and_whole_accumulation_groups(clock):
    def slow() -> int:
        clock.now += 2.0
        return 1

    t = B.time_window(slow, warmup=0, repeats=2, seconds=0.5, min_steps=1, device="cpu")
    assert t.steps == 1  # one step already outlasts the window
    t = B.time_window(slow, warmup=0, repeats=1, seconds=0.5, min_steps=1, step_multiple=4, device="cpu")
    assert t.steps == 4  # whole optimizer steps of 4 micro-batches
    with pytest.raises(ValueError, match="seconds > 0"):
        B.time_window(slow, warmup=0, repeats=1, seconds=0.0)


def test_time_budget_counts_from_creation_and_leaves_out_excluded_time(clock):
    budget = B.TimeBudget(10.0, clock=clock)
    clock.now += 3.0
    assert budget.elapsed() == pytest.approx(3.0) and budget.left() == pytest.approx(7.0)
    assert budget.left(0.5) == pytest.approx(2.0)
    with budget.excluded():  # a compile: not charged to the budget
        clock.now += 100.0
    assert budget.elapsed() == pytest.approx(3.0) and budget.stamp() == "3.0/10 s"
    assert B.TimeBudget(0.901804, clock=clock).stamp() == "0.0/0.9 s"  # a computed cap: not 0.901804 s
    clock.now += 8.0
    assert budget.left() < 0
    with pytest.raises(ValueError):
        B.TimeBudget(0)


def test_relative_spread():
    assert B.relative_spread([10.0]) == 0.0
    assert B.relative_spread([9.0, 10.0, 12.0]) == pytest.approx(0.3)


def test_one_spread_serves_timings_and_autotunes_rules():
    """fasttrain.numbers holds the one formula: a Timing's spread and autotune's spread_of agree on the same rates."""
    from fasttrain.numbers import spread_of
    from fasttrain.tuning import search

    assert search.spread_of is spread_of
    assert spread_of([100.0, 200.0, 400.0]) == pytest.approx(1.5)
    assert spread_of([5.0]) == 0.0 and spread_of([0.0, 0.0]) == 0.0
    t = B.time_steps(lambda: 1, warmup=0, steps=2, repeats=3)
    assert t.spread == pytest.approx(spread_of(t.per_repeat_samples_per_s))
