"""Autotune: the pure search core against fake fits/throughput, the OOM classifier, the cache, and a real CPU run
of ``fasttrain autotune`` on the quickstart whose tuned config then trains. CUDA-only probe tests carry ``gpu``."""

from __future__ import annotations

import json
import random
import time

import pytest
import torch

from fasttrain import autotune as A
from fasttrain.autotune import Candidate, is_oom_error, plan_batches, search_batch_size
from fasttrain.cli import main
from fasttrain.config import load_config

GIB = 2**30


def fake_measure(*, fit_max: int, sps, mem=None):
    """A fake probe: sizes above ``fit_max`` run out of memory; ``sps(b)`` and ``mem(b)`` (bytes) otherwise."""
    calls: list[int] = []

    def measure(b: int, phase: str) -> Candidate:
        calls.append(b)
        if b > fit_max:
            return Candidate(b, False, error="out of memory (fake)")
        return Candidate(b, True, samples_per_s=float(sps(b)), usage_bytes=None if mem is None else int(mem(b)))

    return measure, calls


def search(measure, **kw):
    args = dict(min_batch=8, max_batch=4096, multiple=8, noise=0.03, budget_bytes=None, headroom=0.1)
    args.update(kw)
    return search_batch_size(measure, **args)


# -- the search core -------------------------------------------------------------------------------------------
def test_monotone_rising_grows_to_the_largest_batch():
    measure, calls = fake_measure(fit_max=10**6, sps=lambda b: 10 * b)
    r = search(measure, max_batch=512)
    assert calls == [8, 16, 32, 64, 128, 256, 512]
    assert r.chosen == 512 and r.best == 512
    assert "largest batch tried" in r.stop_reason


def test_oom_boundary_found_exactly_on_multiples_of_8_by_bisection():
    measure, calls = fake_measure(fit_max=300, sps=lambda b: 10 * b)
    r = search(measure, noise=0.0)
    assert calls[:7] == [8, 16, 32, 64, 128, 256, 512]
    assert all(b % 8 == 0 for b in calls)
    assert len(calls) == len(set(calls))  # no size probed twice
    assert len(calls) - 7 <= 5  # bisection: log2(256 / 8) probes
    assert r.chosen == 296 == r.max_usable  # the largest multiple of 8 that fits
    assert 304 in calls  # ... and the one just above was seen failing
    by = r.by_size()
    assert not by[304].fits and by[304].phase == "bisect"


def test_plateau_stops_early_and_chooses_the_smaller_within_noise():
    # Flat from 64 on, with a rise inside the noise: growth stops after two flat steps, 64 wins over 256.
    measure, calls = fake_measure(fit_max=10**6, sps=lambda b: 1000 * min(b, 64) / 64 * (1 + 0.0001 * b))
    r = search(measure)
    assert calls == [8, 16, 32, 64, 128, 256]
    assert "stopped rising" in r.stop_reason
    assert r.best == 256 and r.chosen == 64


def test_resnet50_anchor_chooses_within_noise_of_the_best_and_leaves_headroom():
    # PERF.md: resnet50 bf16 CL eager on a 16 GiB cap: 64: 2947, 128: 3722, 192: 3875, 256: 3975, 320: 4039,
    # 384 out of memory; ~2.7 GiB per 64 images. Peers pick 256..354 "largest that survives".
    pts = [(8, 600), (16, 1100), (32, 1900), (64, 2947), (128, 3722), (192, 3875), (256, 3975), (320, 4039),
           (384, 4060)]

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
    assert tight and all("headroom" in c.error for c in tight)
    assert all(c.usage_bytes <= 9 * GIB for c in r.candidates if c.usable)
    assert by[1024].fits and not by[1024].usable


def test_oom_at_the_first_size_is_a_clear_result():
    measure, calls = fake_measure(fit_max=4, sps=lambda b: b)
    r = search(measure)
    assert calls == [8]
    assert r.chosen is None and r.best is None and r.max_usable is None
    assert "no batch size is usable" in r.stop_reason and "out of memory" in r.stop_reason


def test_bad_bounds_name_the_setting():
    measure, _ = fake_measure(fit_max=100, sps=lambda b: b)
    with pytest.raises(ValueError, match="tune.max_batch"):
        search(measure, min_batch=1, max_batch=4, multiple=8)


# -- accumulation ------------------------------------------------------------------------------------------------
def test_accumulation_keeps_a_global_batch_too_large_to_fit():
    p = plan_batches(1024, 256, multiple=8, max_usable=320)
    assert (p.micro_batch, p.accumulation, p.global_batch) == (256, 4, 1024)
    p = plan_batches(1000, 256, multiple=8)  # 4 x 250 is not on multiples of 8: 5 x 200 is
    assert (p.micro_batch, p.accumulation, p.global_batch) == (200, 5, 1000)
    p = plan_batches(1030, 256, multiple=8)  # no split on multiples of 8: an equal split, explained
    assert p.micro_batch * p.accumulation == 1030 and p.micro_batch <= 256 and "not a multiple" in p.note
    p = plan_batches(1031, 256, multiple=8)  # a prime: the global batch changes by less than one micro-batch
    assert p.changed_global and p.micro_batch <= 256 and p.micro_batch * p.accumulation == p.global_batch
    assert 0 < p.global_batch - 1031 < p.accumulation and "changed to" in p.note


def test_small_or_fitting_global_batches():
    p = plan_batches(64, 256, multiple=8)
    assert (p.micro_batch, p.accumulation, p.global_batch) == (256, 1, 256) and "optim.lr" in p.note
    p = plan_batches(300, 256, multiple=8, max_usable=320)  # fits as one batch: no accumulation needed
    assert (p.micro_batch, p.accumulation, p.global_batch) == (300, 1, 300)


# -- OOM classifier ----------------------------------------------------------------------------------------------
def test_oom_classifier_accepts_only_out_of_memory():
    assert is_oom_error(torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"))
    assert is_oom_error(RuntimeError("CUDA error: out of memory"))
    assert is_oom_error(RuntimeError("CUDA error: CUBLAS_STATUS_ALLOC_FAILED when calling `cublasCreate(handle)`"))
    assert is_oom_error(RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate 10 GB"))
    wrapped = RuntimeError("backend compiler failed")
    wrapped.__cause__ = torch.OutOfMemoryError("CUDA out of memory")
    assert is_oom_error(wrapped)
    assert not is_oom_error(RuntimeError("mat1 and mat2 shapes cannot be multiplied (8x3 and 4x4)"))
    assert not is_oom_error(RuntimeError("CUDA error: an illegal memory access was encountered"))
    assert not is_oom_error(ValueError("out of memory"))  # not a runtime error from torch
    assert not is_oom_error(KeyError("x"))


# -- files and cache ---------------------------------------------------------------------------------------------
def test_cache_key_depends_on_what_decides_the_result():
    base = {"model": {"name": "resnet50"}, "budget_gib": 16.0, "headroom": 0.1, "gpu": "H100"}
    assert A.cache_key(base) == A.cache_key(dict(reversed(list(base.items()))))
    for k, v in (("budget_gib", 8.0), ("headroom", 0.2), ("gpu", "A100"), ("model", {"name": "resnet18"})):
        assert A.cache_key({**base, k: v}) != A.cache_key(base)


# -- real CPU runs -----------------------------------------------------------------------------------------------
QUICK = ["--set", "tune.max_batch=64", "--set", "tune.measure_steps=2", "--set", "tune.warmup_steps=1",
         "--set", "tune.verify_steps=5"]


def test_cli_cpu_run_writes_a_config_that_trains_and_a_second_call_is_cached(tmp_path, monkeypatch, capsys):
    runs, cache, out = tmp_path / "runs", tmp_path / "cache", tmp_path / "out"
    args = ["autotune", "quickstart", *QUICK, "--set", f"train.runs_dir={runs}", "--set", f"tune.cache_dir={cache}",
            "--out", str(out), "-q"]
    assert main(args) == 0
    text = capsys.readouterr().out
    assert "VRAM budget does not apply" in text and "samples/s" in text and "verify:" in text
    report = json.loads((out / "autotune.json").read_text())
    assert report["ok"] and report["budget"]["mode"] == "cpu"
    assert report["chosen_batch"] in {c["batch_size"] for c in report["candidates"]}
    assert all(c["peak_rss_bytes"] for c in report["candidates"])
    assert report["verify"]["ok"] and report["verify"]["samples_per_s"] > 0
    assert (out / "autotune.png").stat().st_size > 1000
    assert A.plot_report(report, out / "replot.png").stat().st_size > 1000  # from the JSON alone (tools/)
    tuned = out / "quickstart.tuned.toml"
    cfg = load_config(tuned)
    assert cfg.train.batch_size == report["plan"]["global_batch"]
    assert cfg.train.batch_size % cfg.train.accumulation == 0
    assert cfg.model.name == "smallcnn" and cfg.data.image_size == 32  # everything else as the input config
    assert cfg.data.loader == report["loader"]["backend"]  # the measured backend, not `auto`, is pinned

    from fasttrain.engine import train

    first_text = tuned.read_text()
    result = train(load_config(tuned, [f"train.runs_dir={runs}", "train.epochs=1", "train.max_steps=2"]),
                   progress=False)
    assert result.history and result.history[-1]["step"] == 2

    # Second call: from the cache, no probe runs; new files beside the first ones, never over them.
    def no_probe(*a, **k):
        raise AssertionError("the cache should have answered")

    monkeypatch.setattr(A, "_tune", no_probe)
    t0 = time.perf_counter()
    assert main(args) == 0
    assert time.perf_counter() - t0 < 5.0  # target < 2 s; generous for a loaded 2-core CI box
    assert "[cached]" in capsys.readouterr().out
    assert (out / "quickstart.tuned-2.toml").is_file() and (out / "autotune-2.json").is_file()
    assert tuned.read_text() == first_text  # the first config is intact


def test_probe_oom_is_recovered_and_reported_other_errors_propagate(tmp_path, monkeypatch, capsys):
    cfg_args = ["autotune", "quickstart", *QUICK, "--set", f"train.runs_dir={tmp_path}",
                "--set", f"tune.cache_dir={tmp_path / 'cache'}", "--out", str(tmp_path / "out"), "-q"]

    def oom(self, b, eb):
        _big = torch.empty(1024)  # a tensor the failing step held: freed outside the except block
        raise torch.OutOfMemoryError(f"CUDA out of memory. Tried to allocate {b} GiB")

    monkeypatch.setattr(A.StepProbe, "_run", oom)
    assert main(cfg_args) == 1
    text = capsys.readouterr().out
    assert "no batch size is usable" in text and "out of memory" in text
    assert not list((tmp_path / "out").glob("*.toml"))  # nothing to train with: no config
    assert not list((tmp_path / "cache").glob("*.json"))  # failures are not cached

    def bug(self, b, eb):
        raise RuntimeError("mat1 and mat2 shapes cannot be multiplied")

    monkeypatch.setattr(A.StepProbe, "_run", bug)
    with pytest.raises(RuntimeError, match="shapes cannot be multiplied"):
        main(cfg_args)


def test_loader_trials_on_the_torch_backend(shapes_root):
    from fasttrain.config import Config, apply_overrides
    from fasttrain.prepare import prepare

    cfg = apply_overrides(Config(), [f"data.root={shapes_root}", "data.image_size=32", "data.resize_size=32",
                                     "data.loader=torch", "model.name=smallcnn", "model.width=8"])
    prep = prepare(cfg)
    ladder = A.loader_ladder("torch", prep.cfg.data)
    assert 1 <= len(ladder) <= 3 and [s["workers"] for s in ladder] == sorted(s["workers"] for s in ladder)
    # A step far faster than any loader: input-bound, the fastest setting kept, the shortfall reported.
    r = A.tune_loader(prep.cfg, prep.runtime, prep.source, "torch", 32, 1e9, warmup_steps=1, measure_steps=2)
    assert r["input_bound"] and len(r["trials"]) == len(ladder) and "input-bound" in r["note"]
    # A slow step: the cheapest setting keeps up, and nothing more is tried.
    r = A.tune_loader(prep.cfg, prep.runtime, prep.source, "torch", 32, 1.0, warmup_steps=1, measure_steps=2)
    assert not r["input_bound"] and len(r["trials"]) == 1 and r["setting"] == {"loader": "torch", **ladder[0]}


def test_cpu_budget_does_not_apply():
    b = A.setup_budget(torch.device("cpu"), 16.0)
    assert b.mode == "cpu" and b.budget_bytes is None and "does not apply" in b.describe()


# -- CUDA only ---------------------------------------------------------------------------------------------------
@pytest.mark.gpu
def test_memory_fraction_emulates_a_smaller_card():
    dev = torch.device("cuda")
    total = torch.cuda.get_device_properties(dev).total_memory
    budget_gib = 2.0
    if total < 4 * GIB:
        pytest.skip("needs a card larger than 4 GiB")
    b = A.setup_budget(dev, budget_gib)
    try:
        assert b.mode == "emulated" and b.in_use_before_bytes > 0  # the CUDA context counts
        assert b.fraction == pytest.approx((budget_gib * GIB - b.in_use_before_bytes) / total)
        with pytest.raises(torch.OutOfMemoryError):
            torch.empty(int(2.5 * GIB), dtype=torch.uint8, device=dev)
    finally:
        A.release_budget(b, dev)
    x = torch.empty(int(2.5 * GIB), dtype=torch.uint8, device=dev)  # the cap is gone again
    del x
    torch.cuda.empty_cache()


@pytest.mark.gpu
def test_probe_recovers_from_oom_with_a_tiny_budget(shapes_root):
    from fasttrain.config import Config, apply_overrides
    from fasttrain.prepare import prepare

    cfg = apply_overrides(Config(), [f"data.root={shapes_root}", "data.image_size=224", "data.loader=torch",
                                     "model.name=resnet18", "runtime.compile=off"])
    prep = prepare(cfg)
    dev = prep.runtime.device
    b = A.setup_budget(dev, 2.0)
    try:
        probe = A.StepProbe(prep.task, budget=b, warmup=1, measure_steps=1, eval_batch=lambda n: 2 * n)
        small = probe(8, "grow")
        assert small.fits and small.samples_per_s > 0 and small.peak_reserved_bytes < 2 * GIB
        big = probe(1024, "grow")
        assert not big.fits and big.error.startswith("out of memory") and probe.state is None
        again = probe(8, "grow")  # nothing leaked from the failed size
        assert again.fits and again.peak_reserved_bytes <= small.peak_reserved_bytes * 1.2
        probe.close()
        assert torch.cuda.memory_allocated(dev) < 64 * 2**20
    finally:
        A.release_budget(b, dev)


@pytest.mark.gpu
def test_gpu_autotune_respects_the_budget(shapes_root, tmp_path):
    from fasttrain.config import Config, apply_overrides

    cfg = apply_overrides(Config(), [f"data.root={shapes_root}", "data.image_size=224", "model.name=resnet18",
                                     "tune.max_batch=1024", "tune.verify_steps=5", f"train.runs_dir={tmp_path}",
                                     f"tune.cache_dir={tmp_path / 'cache'}"])
    r = A.autotune(cfg, memory_budget_gib=4.0, out_dir=tmp_path / "out")
    assert r.ok, r.to_table()
    assert r.budget["mode"] == "emulated"
    assert all(c.usage_bytes <= 0.9 * 4 * GIB for c in r.candidates if c.usable)
    by = {c.batch_size: c for c in r.candidates}
    assert by[r.chosen_batch].samples_per_s >= (1 - cfg.tune.noise) * by[r.best_batch].samples_per_s
