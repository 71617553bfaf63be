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


@pytest.mark.parametrize("name", ["constant", "step", "cosine", "linear"])
def test_a_warmup_may_start_above_zero(name):
    """schedule.warmup_start (airbench's triangle starts at 0.2 of the peak): the warm-up rises in a straight line
    from that share to the peak at its last step, and the schedule after it is unchanged."""
    cfg = ScheduleConfig(name=name, warmup_epochs=2, warmup_start=0.2, min_lr_ratio=0.1)
    f, zero = factors(cfg), factors(ScheduleConfig(name=name, warmup_epochs=2, min_lr_ratio=0.1))
    assert f[0] == pytest.approx(0.2 + 0.8 / 20) and f[19] == pytest.approx(1.0)
    assert [b - a for a, b in zip(f[:19], f[1:20])] == pytest.approx([0.8 / 20] * 19)
    assert f[20:] == zero[20:] and f[0] > zero[0]


@pytest.mark.parametrize(
    "settings, pattern",
    [
        ({"warmup_start": 0.2}, r"schedule\.warmup_start: starts a warm-up: give schedule\.warmup_epochs > 0"),
        ({"warmup_start": 0.2, "warmup_epochs": 1, "name": "onecycle"}, r"onecycle rises from lr / 25"),
        ({"warmup_start": 1.0, "warmup_epochs": 1}, r"schedule\.warmup_start: must be in \[0, 1\), got 1\.0"),
    ],
)
def test_a_warmup_start_that_does_nothing_is_refused(settings, pattern):
    from fasttrain.config import ConfigError

    with pytest.raises(ConfigError, match=pattern):
        ScheduleConfig(**settings)


def test_norm_biases_get_a_scaled_rate_and_the_weights_decay_per_step():
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3, bias=True), torch.nn.BatchNorm2d(4), torch.nn.LayerNorm(4))
    opt = make_optimizer(net, OptimConfig(name="sgd", lr=0.1, weight_decay=0.01, norm_bias_lr_scale=64))
    decay, no_decay, norm_biases = opt.param_groups
    assert decay["params"] == [net[0].weight] and (decay["lr"], decay["weight_decay"]) == (0.1, 0.01)
    # the conv's bias and the norms' weights: 1-d, no decay, the plain rate
    assert {id(p) for p in no_decay["params"]} == {id(net[0].bias), id(net[1].weight), id(net[2].weight)}
    assert (no_decay["lr"], no_decay["weight_decay"]) == (0.1, 0.0)
    assert {id(p) for p in norm_biases["params"]} == {id(net[1].bias), id(net[2].bias)}
    assert norm_biases["lr"] == pytest.approx(6.4)
    assert norm_biases["lr"] * norm_biases["weight_decay"] == pytest.approx(0.1 * 0.01)  # airbench's decay per step
    linear = ScheduleConfig(name="linear", min_lr_ratio=0.5)
    sched = make_scheduler(opt, linear, 1, 2)
    opt.step()
    sched.step()  # the schedule scales every group alike: the ratio stays
    assert decay["lr"] == pytest.approx(0.1 * lr_factor(linear, 1, 1, 2)) and decay["lr"] < 0.1
    assert norm_biases["lr"] / decay["lr"] == pytest.approx(64)
    plain = make_optimizer(net, OptimConfig(name="adamw", lr=0.1, weight_decay=0.01))
    assert len(plain.param_groups) == 2 and plain.param_groups[1]["lr"] == 0.1  # off at its default, 1


def test_norm_bias_scale_is_refused_for_timm_built_optimizers():
    with pytest.raises(ValueError, match=r"optim\.norm_bias_lr_scale: 64 is not applied .* timm"):
        make_optimizer(torch.nn.Linear(2, 2), OptimConfig(name="sgd", layer_decay=0.7, norm_bias_lr_scale=64))
    with pytest.raises(ValueError, match=r"optim\.lookahead_every: must be >= 0"):
        OptimConfig(lookahead_every=-1)


def _constant_grad_run(opt, p, steps):
    for _ in range(steps):
        p.grad = torch.ones_like(p)
        opt.step()


def test_lookahead_pulls_the_weights_back_to_a_slow_copy_as_airbench_does():
    p = torch.nn.Parameter(torch.zeros(3))
    cfg = OptimConfig(name="sgd", lr=1.0, momentum=0.0, weight_decay=0.0, lookahead_every=2, lookahead_decay=0.5)
    opt = make_optimizer(torch.nn.ParameterList([p]), cfg)
    make_scheduler(opt, ScheduleConfig(name="constant"), 5, 5)  # the run's length: 5 steps
    # airbench's LookaheadState by hand: slow starts as the initial weights; every 2 steps
    # slow = lerp(slow, w, 1 - 0.5**2 * (step / 5)**3), w = slow; after the last step w = slow
    w, slow = 0.0, 0.0
    for step in range(1, 6):
        w -= 1.0
        if step % 2 == 0:
            d = 0.25 * (step / 5) ** 3
            slow += (1 - d) * (w - slow)
            w = slow
        if step == 5:
            w = slow
        _constant_grad_run(opt, p, 1)
        assert p.tolist() == pytest.approx([w] * 3), step
    assert w != pytest.approx(-5.0)  # it did move the weights: plain SGD ends at -5


@pytest.mark.parametrize("done", [1, 2, 4])  # before the first pull (at 3) too: the slow copy's start is kept
def test_lookahead_resumes_from_a_checkpointed_optimizer_exactly(done):
    cfg = OptimConfig(name="adamw", lr=0.1, weight_decay=0.0, lookahead_every=3, lookahead_decay=0.9)

    def fresh():
        p = torch.nn.Parameter(torch.arange(4.0))
        opt = make_optimizer(torch.nn.ParameterList([p]), cfg)
        make_scheduler(opt, ScheduleConfig(name="constant"), 10, 10)
        return p, opt

    p, opt = fresh()
    _constant_grad_run(opt, p, 10)
    q, half = fresh()
    _constant_grad_run(half, q, done)  # the slow copy and the count are in the state
    saved = half.state_dict()
    assert saved["param_groups"][0]["lookahead_step"] == done
    r, resumed = fresh()
    with torch.no_grad():
        r.copy_(q)
    resumed.load_state_dict(saved)
    _constant_grad_run(resumed, r, 10 - done)
    assert torch.equal(r, p)
    s = torch.nn.Parameter(torch.arange(4.0))
    _constant_grad_run(torch.optim.AdamW([s], lr=0.1, weight_decay=0.0), s, 10)
    assert not torch.allclose(s, p)  # without lookahead the run ends elsewhere


def test_lookahead_leaves_parameters_without_gradients_to_the_optimizer():
    used, unused = torch.nn.Parameter(torch.ones(2)), torch.nn.Parameter(torch.ones(2))
    cfg = OptimConfig(name="adamw", lr=0.1, weight_decay=0.0, lookahead_every=1)
    opt = make_optimizer(torch.nn.ParameterList([used, unused]), cfg)
    make_scheduler(opt, ScheduleConfig(name="constant"), 4, 4)
    _constant_grad_run(opt, used, 2)  # pulls with ``unused`` never stepped
    assert "lookahead_slow" not in opt.state[unused]
    unused.grad = torch.ones(2)
    opt.step()  # Adam's first step for it (an empty state), not a KeyError
    assert opt.state[unused]["step"] == 1 and not torch.equal(unused, torch.ones(2))


def test_lookahead_starts_a_parameter_first_moved_later_from_before_that_step_and_resumes_exactly():
    """The slow copy starts as the weights before training, also for a parameter whose first gradient comes at a
    later step (it is the same until then), and a checkpoint taken before that step resumes to the same end."""
    cfg = OptimConfig(name="adamw", lr=0.1, weight_decay=0.0, lookahead_every=3, lookahead_decay=0.9)

    def fresh():
        a, b = torch.nn.Parameter(torch.arange(3.0)), torch.nn.Parameter(torch.full((2,), 5.0))
        opt = make_optimizer(torch.nn.ParameterList([a, b]), cfg)
        make_scheduler(opt, ScheduleConfig(name="constant"), 7, 7)
        return a, b, opt

    def steps(a, b, opt, first, last):
        for i in range(first, last + 1):
            opt.zero_grad(set_to_none=True)
            a.grad = torch.ones_like(a)
            if i >= 2:  # b joins at step 2
                b.grad = torch.full_like(b, -1.0)
            opt.step()

    a, b, opt = fresh()
    steps(a, b, opt, 1, 2)
    assert torch.equal(opt.state[b]["lookahead_slow"], torch.full((2,), 5.0))  # before its first step
    steps(a, b, opt, 3, 7)
    a2, b2, opt2 = fresh()
    steps(a2, b2, opt2, 1, 1)
    saved = opt2.state_dict()
    a3, b3, opt3 = fresh()
    with torch.no_grad():
        a3.copy_(a2)
    opt3.load_state_dict(saved)
    steps(a3, b3, opt3, 2, 7)
    assert torch.equal(a3, a) and torch.equal(b3, b)


class _AirbenchLookahead:
    """The reference, restated from airbench94's description of its lookahead: every float entry of the
    state_dict, buffers included, is pulled towards the live one, and the live one set to it."""

    def __init__(self, net):
        self.net_ema = {k: v.clone() for k, v in net.state_dict().items()}

    def update(self, net, decay):
        for ema, live in zip(self.net_ema.values(), net.state_dict().values(), strict=True):
            if live.dtype in (torch.half, torch.float):
                ema.lerp_(live, 1 - decay)
                live.copy_(ema)


def _bn_net(seed=0):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(4, 6), torch.nn.BatchNorm1d(6, momentum=0.4), torch.nn.Linear(6, 2))


def _bn_steps(net, opt, sched, batches, pull=None, every=2, total=7):
    for i, (x, y) in enumerate(batches, start=1):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(net(x), y).backward()
        opt.step()
        if sched is not None:
            sched.step()
        if pull is not None:
            if i % every == 0:
                pull.update(net, decay=0.9**every * (i / total) ** 3)
            if i == total:
                pull.update(net, decay=1.0)


def test_lookahead_pulls_batchnorm_statistics_as_airbench_pulls_its_state_dict():
    """The run's final weights meet statistics averaged as they were: airbench pulls its whole state_dict."""
    g = torch.Generator().manual_seed(1)
    batches = [(torch.randn(16, 4, generator=g) * 3 + 1, torch.randint(0, 2, (16,), generator=g)) for _ in range(7)]
    ours, ref = _bn_net(), _bn_net()
    cfg = OptimConfig(name="sgd", lr=0.3, momentum=0.5, weight_decay=0.0, lookahead_every=2, lookahead_decay=0.9)
    opt = make_optimizer(ours, cfg)
    make_scheduler(opt, ScheduleConfig(name="constant"), 7, 7)
    _bn_steps(ours, opt, None, batches)
    ref_opt = torch.optim.SGD(ref.parameters(), lr=0.3, momentum=0.5, nesterov=True)
    _bn_steps(ref, ref_opt, None, batches, pull=_AirbenchLookahead(ref), every=2, total=7)
    for (k, a), b in zip(ours.state_dict().items(), ref.state_dict().values(), strict=True):
        torch.testing.assert_close(a, b, msg=k)
    plain = _bn_net()
    _bn_steps(plain, torch.optim.SGD(plain.parameters(), lr=0.3, momentum=0.5, nesterov=True), None, batches)
    assert not torch.allclose(ours[1].running_mean, plain[1].running_mean)  # the pulls moved the statistics


@pytest.mark.parametrize("done", [1, 2, 4])  # 1, 2: before the first pull, whose start the resume used to lose
def test_lookahead_buffers_travel_in_the_optimizer_state_and_resume_exactly(done):
    g = torch.Generator().manual_seed(2)
    batches = [(torch.randn(16, 4, generator=g), torch.randint(0, 2, (16,), generator=g)) for _ in range(9)]
    cfg = OptimConfig(name="sgd", lr=0.2, momentum=0.9, weight_decay=0.0, lookahead_every=3, lookahead_decay=0.9)

    def fresh():
        net = _bn_net()
        opt = make_optimizer(net, cfg)
        return net, opt, make_scheduler(opt, ScheduleConfig(name="constant"), 9, 9)

    whole, opt, sched = fresh()
    _bn_steps(whole, opt, sched, batches)
    half, h_opt, h_sched = fresh()
    _bn_steps(half, h_opt, h_sched, batches[:done])  # pulls at 3 and 6
    saved = {"model": half.state_dict(), "opt": h_opt.state_dict(), "sched": h_sched.state_dict()}
    assert len(saved["opt"]["lookahead_buffers"]) == 2  # running_mean and running_var
    resumed, r_opt, r_sched = fresh()
    resumed.load_state_dict(saved["model"])
    r_opt.load_state_dict(saved["opt"])
    r_sched.load_state_dict(saved["sched"])
    assert "lookahead_buffers" in saved["opt"]  # loading did not take it out of the caller's dict
    _bn_steps(resumed, r_opt, r_sched, batches[done:])
    for (k, a), b in zip(whole.state_dict().items(), resumed.state_dict().values(), strict=True):
        assert torch.equal(a, b), k
    with pytest.raises(ValueError, match=r"lookahead holds 2 buffers .* the model's 0"):
        other = torch.nn.Sequential(torch.nn.Linear(4, 6), torch.nn.Linear(6, 2))
        make_optimizer(other, cfg).load_state_dict(saved["opt"])


def test_a_parameter_marked_for_its_first_epochs_is_held_after_them_with_its_decay_until_then():
    from fasttrain.optim import TRAIN_EPOCHS, WEIGHT_DECAY

    net = torch.nn.Linear(3, 2)
    setattr(net.bias, TRAIN_EPOCHS, 2)
    setattr(net.bias, WEIGHT_DECAY, True)
    opt = make_optimizer(net, OptimConfig(name="sgd", lr=0.1, momentum=0.9, weight_decay=0.5))
    limited = opt.param_groups[-1]
    assert limited["params"] == [net.bias] and limited["train_epochs"] == 2 and limited["weight_decay"] == 0.5
    sched = make_scheduler(opt, ScheduleConfig(name="linear", min_lr_ratio=0.5), 3, 12)
    seen = []
    for step in range(12):
        net.weight.grad, net.bias.grad = torch.ones_like(net.weight), torch.ones_like(net.bias)
        before = net.bias.detach().clone()
        opt.step()
        sched.step()
        seen.append(not torch.equal(net.bias, before))
        if step + 1 < 6:  # the same rate as the others while it trains
            assert limited["lr"] == opt.param_groups[0]["lr"]
    assert seen == [True] * 6 + [False] * 6  # 2 epochs of 3 steps, then held (no step, no decay)
    assert opt.param_groups[0]["lr"] > 0  # the others train on
    plain = make_optimizer(torch.nn.Linear(3, 2), OptimConfig(name="sgd", weight_decay=0.5))
    assert [g["weight_decay"] for g in plain.param_groups] == [0.5, 0.0]  # unmarked: a 1-d bias, no decay


def test_lr_factor_with_a_held_warmup_is_the_schedulers_rate_after_a_checkpoint_round_trip():
    """A warm-up held in steps travels in the scheduler's state_dict; lr_factor(..., warmup=) gives the rate the
    restored scheduler follows (the resume's re-planned-length message quotes it), not the config's warm-up."""
    cfg = ScheduleConfig(name="cosine", warmup_epochs=3)
    spe, total, held = 10, 40, 7  # the config's warm-up: min(30, 40 // 2) = 20 steps; held: 7
    model = torch.nn.Linear(2, 2)
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    saved = make_scheduler(opt, cfg, spe, total, warmup=held).state_dict()
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    restored = make_scheduler(opt, cfg, spe, total)  # built from the config, then loaded: the held length wins
    restored.load_state_dict(saved)
    rates = [restored.lr_lambdas[0](s) for s in range(total)]
    assert rates == pytest.approx([lr_factor(cfg, s, spe, total, warmup=held) for s in range(total)])
    assert rates[7] == pytest.approx(1.0) and lr_factor(cfg, 7, spe, total) < 0.5  # held 7 steps, not 20
