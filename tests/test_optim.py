import math

import pytest
import torch

from fasttrain.config import OptimConfig, ScheduleConfig
from fasttrain.optim import lr_factor, make_optimizer, make_scheduler


def factors(cfg, spe=10, epochs=10):
    total = spe * epochs
    return [lr_factor(cfg, s, spe, total) for s in range(total)]


def test_constant_with_warmup():
    f = factors(ScheduleConfig(name="constant", warmup_epochs=1))
    assert f[0] == pytest.approx(0.1) and f[9] == pytest.approx(1.0)
    assert all(v == 1.0 for v in f[10:])


@pytest.mark.parametrize("name", ["constant", "cosine", "linear"])
def test_a_warmup_longer_than_the_run_takes_half_of_it_and_the_rate_still_decays(name):
    """A time budget's plan (or a smoke run) may be shorter than schedule.warmup_epochs: the warm-up was the whole
    run and the rate never decayed; it now takes at most half of the steps."""
    f = factors(ScheduleConfig(name=name, warmup_epochs=5, min_lr_ratio=0.0), spe=10, epochs=3)  # 50 of 30 steps
    assert f[14] == pytest.approx(1.0) and f[13] == pytest.approx(14 / 15)  # 15 warm-up steps: half of 30
    if name != "constant":
        assert f[-1] < 0.1 and all(a >= b for a, b in zip(f[15:], f[16:]))  # decays to (about) its end


def test_step_halves_every_n_epochs():
    f = factors(ScheduleConfig(name="step", step_epochs=3, gamma=0.5))
    assert f[29] == 1.0 and f[30] == 0.5 and f[60] == 0.25 and f[99] == 0.125


def test_cosine_decays_to_min_ratio():
    f = factors(ScheduleConfig(name="cosine", warmup_epochs=2, min_lr_ratio=0.1))
    assert f[19] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(f[20:], f[21:]))  # monotone after warmup
    assert f[-1] == pytest.approx(0.1, abs=1e-3)


def test_onecycle_rises_then_falls():
    f = factors(ScheduleConfig(name="onecycle", pct_start=0.25))
    peak = max(range(len(f)), key=f.__getitem__)
    assert 20 <= peak <= 26
    assert f[0] == pytest.approx(1 / 25) and f[-1] < 1e-3
    assert math.isclose(max(f), 1.0, rel_tol=1e-6)


def test_scheduler_follows_factor_and_optimizers_split_decay():
    model = torch.nn.Sequential(torch.nn.Linear(3, 3), torch.nn.BatchNorm1d(3))
    opt = make_optimizer(model, OptimConfig(name="sgd", lr=0.2, weight_decay=1e-3))
    assert [g["weight_decay"] for g in opt.param_groups] == [1e-3, 0.0]
    assert len(opt.param_groups[0]["params"]) == 1  # only the weight matrix decays
    sched = make_scheduler(opt, ScheduleConfig(name="step", step_epochs=1, gamma=0.5), 2, 6)
    lrs = []
    for _ in range(5):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs == pytest.approx([0.2, 0.2, 0.1, 0.1, 0.05])
    adamw = make_optimizer(model, OptimConfig(name="adamw", lr=1e-3, betas=[0.5, 0.999]))
    assert isinstance(adamw, torch.optim.AdamW) and adamw.param_groups[0]["betas"] == (0.5, 0.999)


def test_linear_warms_up_then_falls_straight_to_min_ratio():
    cfg = ScheduleConfig(name="linear", warmup_epochs=2, min_lr_ratio=0.0)
    f = factors(cfg)
    assert f[0] == pytest.approx(0.05) and f[19] == pytest.approx(1.0) and f[20] == pytest.approx(1.0)
    steps = [a - b for a, b in zip(f[20:], f[21:])]
    assert all(d == pytest.approx(1 / 80) for d in steps)  # a straight line: no steps, no curve
    assert lr_factor(cfg, 100, 10, 100) == pytest.approx(0.0)  # after the last step: the end of the line
