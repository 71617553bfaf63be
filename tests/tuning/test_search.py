"""Autotune's pure core against fake measurements: the search, noise and ties, evidence-only advice, the time
budget, batch plans, the loader choice and the verification verdict. No torch anywhere in these rules."""

from __future__ import annotations

import json
import random
import subprocess
import sys

import pytest

from fasttrain.tuning.search import (
    Candidate,
    beats,
    choose_batch,
    choose_loader,
    judge_verification,
    loader_share,
    plan_batches,
    search_batch_size,
)

GIB = 2**30


def cand(b, sps, spread=0.0, **kw) -> Candidate:
    """A timed candidate whose three repeats have the given median and spread."""
    c = Candidate(b, True, **kw)
    c.set_rates([sps * (1 - spread / 2), sps, sps * (1 + spread / 2)])
    return c


def fake_measure(*, fit_max: int, sps, mem=None, spread=0.0, seconds=lambda b: 1.0):
    """A fake probe: sizes above ``fit_max`` run out of memory; ``sps(b)`` and ``mem(b)`` (bytes) otherwise."""
    calls: list[int] = []

    def measure(b: int, phase: str) -> Candidate:
        calls.append(b)
        if b > fit_max:
            return Candidate(b, False, error="out of memory (fake)", seconds=seconds(b))
        c = cand(b, float(sps(b)), spread, usage_bytes=None if mem is None else int(mem(b)), seconds=seconds(b))
        c.timed_s = 0.5 * c.seconds
        c.untimed_s = c.seconds - c.timed_s
        return c

    return measure, calls


def search(measure, **kw):
    args = dict(min_batch=8, max_batch=4096, multiple=8, noise=0.03, budget_bytes=None, headroom=0.1)
    args.update(kw)
    return search_batch_size(measure, **args)


def test_the_pure_core_imports_no_torch():
    code = "import sys; import fasttrain.tuning.search; sys.exit(1 if 'torch' in sys.modules else 0)"
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0


def test_the_tuning_package_imports_no_torch_until_autotune_is_asked_for():
    code = (
        "import sys, fasttrain.tuning as t; assert 'torch' not in sys.modules, 'package'; "
        "f = t.autotune; assert 'torch' in sys.modules and f.__module__ == 'fasttrain.tuning.run'"
    )
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0


# -- the search ------------------------------------------------------------------------------------------------
def test_monotone_rising_grows_to_the_cap_and_reports_what_was_not_probed():
    measure, calls = fake_measure(fit_max=10**6, sps=lambda b: 10 * b)
    r = search(measure, max_batch=512)
    assert calls == [8, 16, 32, 64, 128, 256, 512]
    assert r.chosen == 512 and r.best == 512 and r.limit == "cap"
    assert "tune.max_batch" in r.stop_reason
    assert [(s.batch_size, s.reason) for s in r.not_probed] == [(1024, "cap")]
    assert r.fails_at is None  # nothing was seen failing: no "does not fit" anywhere


def test_oom_boundary_found_exactly_on_multiples_of_8_by_bisection():
    measure, calls = fake_measure(fit_max=300, sps=lambda b: 10 * b)
    r = search(measure, noise=0.0)
    assert calls[:7] == [8, 16, 32, 64, 128, 256, 512]
    assert all(b % 8 == 0 for b in calls)
    assert len(calls) == len(set(calls))  # no size probed twice
    assert len(calls) - 7 <= 5  # bisection: log2(256 / 8) probes
    assert r.chosen == 296 == r.max_usable  # the largest multiple of 8 that fits
    by = r.by_size()
    assert not by[304].fits and by[304].phase == "bisect" and by[304].failure == "oom"
    assert r.fails_at == 304 and r.limit == "memory"


def test_plateau_stops_early_and_chooses_the_smaller_within_noise():
    # Flat from 64 on, with a rise inside the noise: growth stops after two flat steps, 64 wins over 256.
    measure, calls = fake_measure(fit_max=10**6, sps=lambda b: 1000 * min(b, 64) / 64 * (1 + 0.0001 * b))
    r = search(measure)
    assert calls == [8, 16, 32, 64, 128, 256]
    assert "stopped rising" in r.stop_reason and r.limit == "plateau"
    assert r.best == 256 and r.chosen == 64


def test_resnet50_anchor_chooses_within_noise_of_the_best_and_leaves_headroom():
    # resnet50 bf16 CL eager on a 16 GiB cap: 64: 2947, 128: 3722, 192: 3875, 256: 3975, 320: 4039, 384 out of
    # memory; ~2.7 GiB per 64 images. Peers pick 256..354 "largest that survives".
    pts = [
        (8, 600),
        (16, 1100),
        (32, 1900),
        (64, 2947),
        (128, 3722),
        (192, 3875),
        (256, 3975),
        (320, 4039),
        (384, 4060),
    ]

    def sps(b):
        for (b0, s0), (b1, s1) in zip(pts, pts[1:]):
            if b0 <= b <= b1:
                return s0 + (s1 - s0) * (b - b0) / (b1 - b0)
        return pts[-1][1]

    measure, calls = fake_measure(fit_max=376, sps=sps, mem=lambda b: (0.3 + 0.0428 * b) * GIB)
    r = search(measure, budget_bytes=16 * GIB, headroom=0.10)
    by = r.by_size()
    assert r.best is not None and r.chosen is not None
    assert by[r.chosen].samples_per_s >= 0.97 * by[r.best].samples_per_s
    assert r.chosen == 256  # 3975 is within 3% of 4039 at 320: the smaller batch wins
    assert all(by[b].usage_bytes <= 0.9 * 16 * GIB for b in calls if by[b].usable)
    assert len(calls) <= 9


def test_noisy_throughput_still_chooses_within_noise_of_the_true_best():
    rng = random.Random(0)

    def true(b):
        return 5000 * b / (b + 48)

    for _ in range(20):
        measure, calls = fake_measure(fit_max=1000, sps=lambda b: true(b) * (1 + rng.uniform(-0.01, 0.01)))
        r = search(measure)
        assert r.chosen is not None
        best_true = max(true(b) for b in calls if b <= 1000)
        assert true(r.chosen) >= 0.95 * best_true  # 3% noise rule + 1% measurement noise each side
        assert len(calls) <= 12


def test_headroom_excludes_sizes_that_fit_close_to_the_budget():
    # Everything up to 1024 runs, but 16 MiB per sample against a 10 GiB budget with 10% headroom: <= 576.
    measure, calls = fake_measure(fit_max=1024, sps=lambda b: 10 * b, mem=lambda b: b * 16 * 2**20)
    r = search(measure, budget_bytes=10 * GIB, headroom=0.10, noise=0.0)
    by = r.by_size()
    assert r.chosen == 576
    tight = [c for c in r.candidates if c.fits and not c.usable]
    assert tight and all("headroom" in c.error and c.failure == "headroom" for c in tight)
    assert all(c.usage_bytes <= 9 * GIB for c in r.candidates if c.usable)
    assert by[1024].fits and not by[1024].usable


def test_oom_at_the_first_size_is_a_clear_result():
    measure, calls = fake_measure(fit_max=4, sps=lambda b: b)
    r = search(measure)
    assert calls == [8]
    assert r.chosen is None and r.best is None and r.max_usable is None and r.limit == "none"
    assert "no batch size is usable" in r.stop_reason and "out of memory" in r.stop_reason


def test_bad_bounds_name_the_setting():
    measure, _ = fake_measure(fit_max=100, sps=lambda b: b)
    with pytest.raises(ValueError, match="tune.max_batch"):
        search(measure, min_batch=1, max_batch=4, multiple=8)


# -- the config's own batch: the baseline --------------------------------------------------------------------
def test_the_given_batch_is_probed_first_and_kept_on_a_tie():
    # Flat curve: 256 is 2% faster than the given 64, inside the 3% noise: nothing changes.
    measure, calls = fake_measure(fit_max=10**6, sps=lambda b: 1000 * min(b, 64) / 64 * (1 + 0.0001 * b))
    r = search(measure, given=64)
    assert calls[0] == 64 and calls.count(64) == 1  # reused when growth reaches it
    assert r.best == 256 and r.chosen == 64 and r.given == 64


def test_a_batch_faster_beyond_the_noise_replaces_the_given_one_after_a_joint_remeasure():
    measure, calls = fake_measure(fit_max=10**6, sps=lambda b: 10 * b)
    joint: list[list[int]] = []

    def remeasure(cands):
        joint.append([c.batch_size for c in cands])
        for c in cands:
            c.add_rates([c.samples_per_s] * 3)

    r = search(measure, given=24, max_batch=256, remeasure=remeasure)
    assert calls[0] == 24 and r.chosen == 256
    assert joint[-1] == [24, 256]  # the final comparison was made in one time window


def test_a_given_batch_that_does_not_fit_bounds_the_growth():
    measure, calls = fake_measure(fit_max=100, sps=lambda b: 10 * b)
    r = search(measure, given=128, noise=0.0)
    assert calls[0] == 128 and 128 not in calls[1:]  # never probed again: known not to fit
    assert r.fails_at == 104  # the first multiple of 8 above what fits, found by bisection
    assert r.chosen == 96 and all(b < 128 for b in calls[1:])


# -- noise -----------------------------------------------------------------------------------------------------
def test_a_dip_from_a_busy_moment_is_remeasured_and_the_search_goes_on():
    # The run: 235 -> 224 -> 54 samples/s because another job took the cores during one probe.
    true = {8: 100.0, 16: 180.0, 32: 235.0, 64: 300.0, 128: 330.0, 256: 335.0, 512: 336.0}
    hit = {64}

    def measure(b, phase):
        sps = true[b] * (0.2 if b in hit else 1.0)
        hit.discard(b)  # only the first measurement of 64 is disturbed
        c = cand(b, sps, 0.02, seconds=1.0)
        c.timed_s = 0.5
        return c

    def remeasure(cands):
        for c in cands:
            c.set_rates([true[c.batch_size]] * 3)  # measured together later: the truth

    r = search(measure, max_batch=512, remeasure=remeasure)
    assert r.limit in ("plateau", "cap") and r.chosen in (128, 256)
    assert 128 in r.by_size() and r.by_size()[64].samples_per_s == 300.0


def test_a_real_drop_is_confirmed_and_stops_the_search():
    # CPU: past the cache-friendly size throughput really falls; confirmed, the growth stops there.
    true = {8: 700.0, 16: 1000.0, 32: 1200.0, 64: 1400.0, 128: 1000.0, 256: 900.0}
    measure, calls = fake_measure(fit_max=10**6, sps=true.__getitem__)
    confirmed = []
    r = search(measure, max_batch=256, remeasure=lambda cs: confirmed.append([c.batch_size for c in cs]))
    assert calls == [8, 16, 32, 64, 128] and confirmed == [[64, 128]]
    assert r.limit == "drop" and r.chosen == 64 and "fell" in r.stop_reason


def test_wide_measured_spread_makes_a_tie_and_keeps_the_given_batch():
    a, b = cand(64, 1000.0, spread=0.30), cand(128, 1200.0, spread=0.30)
    for c in (a, b):
        c.usable = True
    assert not beats(b, a, noise=0.03)  # 20% faster, but inside a 30% measured spread
    assert choose_batch([a, b], 0.03, prefer=64) == (64, 128)
    a.set_rates([1000.0] * 3)
    b.set_rates([1200.0] * 3)
    assert beats(b, a, noise=0.03) and choose_batch([a, b], 0.03, prefer=64) == (128, 128)


# -- time --------------------------------------------------------------------------------------------------------
def test_the_time_budget_stops_growth_and_the_size_is_reported_not_probed():
    left = [20.0]

    def measure(b, phase):
        # A time-bounded probe: a fixed timed window (3 x 0.25 s) plus a warm-up that grows with the batch.
        c = cand(b, 10.0 * b, seconds=0.75 + b / 16)
        c.timed_s, c.untimed_s = 0.75, b / 16
        left[0] -= c.seconds
        return c

    r = search(measure, given=64, time_left=lambda: left[0])
    assert r.limit == "time" and r.not_probed and r.not_probed[0].reason == "time"
    skipped = r.not_probed[0].batch_size
    assert skipped not in r.by_size() and "not probed" in r.not_probed[0].describe()
    assert left[0] >= 0  # it stopped before overrunning


# -- plans: accumulation only on evidence -------------------------------------------------------------------------
def test_no_accumulation_without_memory_evidence():
    # The quickstart: chosen 8 (noise), batch 64 never probed, CPU: no "does not fit", no accumulation.
    p = plan_batches(64, 8, multiple=8, allow_accumulation=False)
    assert p.accumulation == 1 and "does not fit" not in p.note and p.global_batch == 8 and "optim.lr" in p.note
    p = plan_batches(64, 8, multiple=8, fails_at=16, fail_reason="out of memory", allow_accumulation=False)
    assert p.accumulation == 1  # a CPU never gets accumulation, whatever the evidence
    p = plan_batches(64, 8, multiple=8)  # GPU, but nothing failed: the global batch changes, no accumulation
    assert p.accumulation == 1 and p.global_batch == 8


def test_accumulation_keeps_a_global_batch_shown_not_to_fit():
    p = plan_batches(1024, 256, multiple=8, fails_at=384, fail_reason="out of memory")
    assert (p.micro_batch, p.accumulation, p.global_batch) == (256, 4, 1024)
    assert "does not fit as one batch (out of memory at batch 384)" in p.note
    p = plan_batches(1000, 256, multiple=8, fails_at=512)  # 4 x 250 is not on multiples of 8: 5 x 200 is
    assert (p.micro_batch, p.accumulation, p.global_batch) == (200, 5, 1000)
    p = plan_batches(1030, 256, multiple=8, fails_at=512)  # no split on multiples of 8: an equal split, explained
    assert p.micro_batch * p.accumulation == 1030 and p.micro_batch <= 256 and "not a multiple" in p.note
    p = plan_batches(1031, 256, multiple=8, fails_at=512)  # a prime: the global batch changes by < one micro-batch
    assert p.changed_global and p.micro_batch <= 256 and p.micro_batch * p.accumulation == p.global_batch
    assert 0 < p.global_batch - 1031 < p.accumulation and "changed to" in p.note
    p = plan_batches(1024, 256, multiple=8, fails_at=2048)  # evidence only above the global batch: none for it
    assert p.accumulation == 1 and p.global_batch == 256


def test_the_configs_own_batch_and_accumulation():
    p = plan_batches(64, 64, multiple=8)
    assert (p.micro_batch, p.accumulation, p.global_batch) == (64, 1, 64) and not p.changed and "kept" in p.note
    p = plan_batches(64, 256, multiple=8)
    assert (p.micro_batch, p.accumulation, p.global_batch) == (256, 1, 256) and "raised" in p.note
    p = plan_batches(1024, 256, multiple=8, accumulation=4)  # its own 4 x 256: unchanged
    assert (p.micro_batch, p.accumulation) == (256, 4) and not p.changed
    p = plan_batches(1024, 512, multiple=8, accumulation=4, allow_accumulation=False)  # its own choice, faster micro
    assert (p.micro_batch, p.accumulation, p.global_batch) == (512, 2, 1024) and "own accumulation" in p.note
    p = plan_batches(1024, 2048, multiple=8, accumulation=4)  # a larger batch fits, so the global one does
    assert (p.micro_batch, p.accumulation, p.global_batch) == (1024, 1, 1024)


# -- loader ------------------------------------------------------------------------------------------------------
def trial(e2e, model, spread=0.02):
    from types import SimpleNamespace

    return SimpleNamespace(samples_per_s=e2e, spread=spread, model_samples_per_s=model, model_spread=spread)


def test_loader_choice_prefers_the_given_setting_on_a_tie():
    given, more = trial(980.0, 1000.0), trial(1000.0, 1000.0)
    assert choose_loader([given, more], 0.03) == (0, True)  # tie, and it keeps up
    slow = trial(600.0, 1000.0)
    assert choose_loader([slow, more], 0.03) == (1, True)
    assert choose_loader([slow], 0.03) == (0, False)  # input-bound
    with pytest.raises(ValueError):
        choose_loader([], 0.03)


def test_loader_choice_is_by_share_of_the_step_measured_alongside():
    # The machine slowed down between the two trials: raw end-to-end figures would pick the wrong setting.
    given = trial(900.0, 1000.0)  # 90 % of the step, measured while the machine was fast
    more = trial(450.0, 450.0)  # 100 % of the step, measured while the machine ran at half speed
    assert choose_loader([given, more], 0.03) == (1, True)
    assert loader_share(given) == (pytest.approx(0.9), pytest.approx(0.04))


# -- verification ------------------------------------------------------------------------------------------------
def test_verification_agreeing_within_the_noise():
    a = judge_verification(probe_sps=1000, probe_spread=0.02, verify_sps=985, verify_spread=0.02, noise=0.03)
    assert a.status == "agrees" and a.explained and a.reliable


def test_verification_far_below_the_probe_unexplained_is_not_ok():
    # The issue: the probe said 235, the verification measured 43 and still reported ok.
    a = judge_verification(
        probe_sps=235,
        probe_spread=0.05,
        verify_sps=43,
        verify_spread=0.05,
        noise=0.03,
        loader_share=0.99,
        loader_spread=0.05,
        recheck_sps=230,
        recheck_spread=0.05,
    )
    assert a.status == "disagrees" and not a.explained and "unexplained" in a.text


def test_verification_below_the_probe_because_input_bound():
    a = judge_verification(
        probe_sps=1000,
        probe_spread=0.02,
        verify_sps=600,
        verify_spread=0.03,
        noise=0.03,
        loader_share=0.61,
        loader_spread=0.03,
    )
    assert a.status == "input-bound" and a.explained and a.reliable and "verification" in a.believe
    # The loader kept up in its trial: a slow verification is not explained by it.
    a = judge_verification(
        probe_sps=1000,
        probe_spread=0.02,
        verify_sps=600,
        verify_spread=0.03,
        noise=0.03,
        loader_share=1.0,
        loader_spread=0.03,
    )
    assert a.status == "disagrees"


def test_verification_below_the_probe_because_the_machine_slowed_down():
    # The run that reached this test: probe 319 samples/s in a quiet moment, everything after at ~90.
    a = judge_verification(
        probe_sps=319,
        probe_spread=0.05,
        verify_sps=88,
        verify_spread=0.02,
        noise=0.03,
        loader_share=0.98,
        loader_spread=0.04,
        recheck_sps=90,
        recheck_spread=0.03,
    )
    assert a.status == "machine-changed" and a.explained and not a.reliable and "slowed down" in a.text
    both = judge_verification(
        probe_sps=1000,
        probe_spread=0.02,
        verify_sps=300,
        verify_spread=0.03,
        noise=0.03,
        loader_share=0.6,
        loader_spread=0.03,
        recheck_sps=500,
        recheck_spread=0.03,
    )
    assert both.status == "machine-changed" and "input-bound as well" in both.text  # 500 x 60 %
    up = judge_verification(
        probe_sps=500,
        probe_spread=0.02,
        verify_sps=1000,
        verify_spread=0.03,
        noise=0.03,
        recheck_sps=990,
        recheck_spread=0.03,
    )
    assert up.status == "machine-changed" and "sped up" in up.text


# -- typed results -------------------------------------------------------------------------------------------------
def test_candidates_round_trip_through_json():
    c = cand(64, 1234.5, 0.1, usage_bytes=3 * GIB, phase="given")
    c.add_rates([1200.0])
    back = Candidate.from_dict(json.loads(json.dumps(c.to_dict())))
    assert back == c and back.remeasured == 1
    assert Candidate.from_dict({**c.to_dict(), "an_old_field": 1}) == c  # old cache entries still load


def test_a_wild_remeasurement_is_never_left_marked_reliable():
    from fasttrain.tuning.search import Candidate

    c = Candidate(32, True)
    c.set_rates([32.2, 31.0, 29.4])  # tight: reliable as first measured
    assert c.reliable
    c.add_rates([1737.0, 1020.4, 506.0], max_spread=0.25)  # issue 23's batch 32: ±317%
    assert not c.reliable and c.spread > 3
    steady = Candidate(64, True)
    steady.set_rates([60.0, 58.0])
    steady.reliable = False  # the first round was disturbed; the re-measure agrees with it
    steady.add_rates([59.0, 60.5], max_spread=0.25)
    assert steady.reliable


def test_a_single_step_window_does_not_count():
    from fasttrain.tuning.search import counted_windows, measurement_reliable

    # batch 32: windows of 10 steps at ~31 samples/s, and one of a single step at 1,737 samples/s
    rates = [31.0, 30.5, 1737.0]
    seconds = [10 * 32 / 31.0, 10 * 32 / 30.5, 32 / 1737.0]
    counted, dropped = counted_windows(rates, seconds, 32)
    assert counted == [31.0, 30.5] and dropped == [1737.0]
    assert measurement_reliable(counted, 0.25)
    assert not measurement_reliable([], 0.25)  # no window counted
    assert not measurement_reliable(rates, 0.25)


def test_cpu_autotune_takes_at_most_half_the_training_it_tunes():
    from fasttrain.tuning.search import cpu_time_cap

    # the quickstart: 8 epochs x 1,152 samples at 400 samples/s after 5 s of set-up: ~28 s of training
    cap = cpu_time_cap(45.0, job_samples=9216, samples_per_s=400.0, setup_s=5.0)
    assert cap == pytest.approx(0.5 * (5.0 + 9216 / 400.0))
    assert cpu_time_cap(45.0, job_samples=10**7, samples_per_s=400.0, setup_s=5.0) == 45.0  # never above the budget
    assert cpu_time_cap(45.0, job_samples=9216, samples_per_s=None, setup_s=5.0) == 45.0  # nothing measured


def test_a_cpu_job_too_short_to_repay_the_least_tuning_is_not_tuned():
    from fasttrain.tuning.search import cpu_tuning_pays, least_cpu_tuning_s

    # two probes of 3 x 0.2 s and two end-to-end windows of 2 s: the least a tuning that could change a CPU config
    least = least_cpu_tuning_s(repeats=3, repeat_s=0.2, verify_s=2.0)
    assert least == pytest.approx(5.2)
    assert least_cpu_tuning_s(repeats=3, repeat_s=0.2, verify_s=0.0) == pytest.approx(1.2)  # --no-verify
    assert not cpu_tuning_pays(2.85, least)  # the quickstart: ~2.9 s of steps, half of it is 1.4 s < 5.2 s
    assert cpu_tuning_pays(10.4, least) and not cpu_tuning_pays(10.3, least)  # half the job against the least
    assert cpu_tuning_pays(None, least)  # an unknown length is tuned (the time cap bounds it)


def test_under_the_cpu_cap_a_spent_budget_keeps_the_configs_own_and_never_an_unconfirmed_change():
    from fasttrain.tuning.search import cpu_shortcut

    def at(**kw):
        args = dict(capped=True, own_stands=True, own_known=True, loader_left_s=-0.5, left_s=0.2, confirm_s=2.0)
        return cpu_shortcut(**{**args, **kw})

    assert at() == "cap-spent"  # the config's own stands, no time for loader trials: written as it is
    assert at(loader_left_s=0.5) == ""  # time left for the loader trials: they run, and the verification
    assert at(capped=False) == ""  # a budget the user gave, not the job's length: as before
    assert at(own_stands=False) == "unconfirmed"  # a change that two end-to-end windows cannot confirm now
    assert at(own_stands=False, left_s=2.5) == ""  # ... or that they can: verified against the config's own
    assert at(own_stands=False, own_known=False) == ""  # nothing of the config's own to fall back to
