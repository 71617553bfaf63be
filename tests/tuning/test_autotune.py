"""Autotune with torch on CPU: real ``fasttrain autotune`` runs on the quickstart (the tuned config trains, the
second call is cached, noisy answers are not, a verification that disagrees is measured longer, then written
as less sure; on CPU a batch not faster end to end gives way to the config's own), the probe's OOM
recovery, loader trials (torch, and DALI's CPU mode: one file pre-check for the whole ladder), the compiled
check with a fake task, the budget's cap restored, the cache key, the typed JSON and the plot. The pure rules
are in test_search.py. CUDA-only tests carry ``gpu``."""

from __future__ import annotations

import dataclasses
import json
import time
import types
from types import SimpleNamespace

import pytest
import torch

from fasttrain import tuning as A
from fasttrain.cli import main
from fasttrain.config import Config, apply_overrides, load_config
from fasttrain.data.base import Batch
from fasttrain.tuning import cache as C
from fasttrain.tuning import loader as L
from fasttrain.tuning import probe as P
from fasttrain.tuning import report as R
from fasttrain.tuning import run as RUN
from fasttrain.tuning.search import Agreement, BatchPlan, Candidate, Skipped

GIB = 2**30

# Windows in virtual seconds (see VirtualClock): a few steps each. The real time budget is generous, so a busy
# test machine cannot cut the search short (and the job long, so the CPU cap does not either).
QUICK = [
    "--set",
    "tune.max_batch=64",
    "--set",
    "tune.warmup_steps=1",
    "--set",
    "tune.repeats=2",
    "--set",
    "tune.repeat_s=0.01",
    "--set",
    "tune.verify_s=0.1",
    "--set",
    "tune.time_budget_s=600",
    "--set",
    "train.epochs=1000",  # a long job: the CPU cap (half the training tuned) stays above the 600 s budget
]


class VirtualClock:
    """``time.perf_counter`` for a test: it moves only when a train step (``step_cost``) or a stand-in loader
    runs, so every rate autotune measures is a fixed function of the batch size, whatever the machine's load.
    The real step still runs; the time budget keeps the real clock."""

    def __init__(self) -> None:
        self.now = 0.0
        self.steps = 0

    def __call__(self) -> float:
        return self.now

    @staticmethod
    def rate(b: int) -> float:
        return 1000.0 * b / (b + 16)  # samples/s: rises and saturates, as on a real device

    def step_cost(self, b: int) -> float:
        self.steps += 1
        jitter = (self.steps * 0.6180339887) % 1.0 - 0.5  # deterministic, never periodic: a small measured spread
        return b / self.rate(b) * (1.0 + 0.02 * jitter)


@pytest.fixture
def virtual_time(monkeypatch) -> VirtualClock:
    from fasttrain.tasks.classify import ClassifyTask

    clock = VirtualClock()
    real_step = ClassifyTask.train_step

    def step(self, state, batch, **kw):
        out = real_step(self, state, batch, **kw)
        clock.now += clock.step_cost(len(batch))
        return out

    monkeypatch.setattr(ClassifyTask, "train_step", step)
    monkeypatch.setattr(time, "perf_counter", clock)
    return clock


def cli_args(tmp_path, *extra: str) -> list[str]:
    return [
        "autotune",
        "quickstart",
        *QUICK,
        *extra,
        "--set",
        f"train.runs_dir={tmp_path / 'runs'}",
        "--set",
        f"tune.cache_dir={tmp_path / 'cache'}",
        "--out",
        str(tmp_path / "out"),
        "-q",
    ]


def test_cli_cpu_run_writes_a_config_that_trains_and_a_second_call_is_cached(
    tmp_path, monkeypatch, capsys, virtual_time
):
    out = tmp_path / "out"
    args = cli_args(tmp_path)
    assert main(args) == 0
    text = capsys.readouterr().out
    assert "VRAM budget does not apply" in text and "samples/s" in text and "verify:" in text
    assert "does not fit" not in text  # nothing ran out of memory, so nothing is said not to fit
    report = json.loads((out / "autotune.json").read_text())
    assert report["ok"] and report["reliable"] and report["budget"]["mode"] == "cpu"
    assert "reached tune.max_batch (64)" in report["stop_reason"]  # the curve still rose: 128 not probed (cap)
    assert [(s["batch_size"], s["reason"]) for s in report["not_probed"]] == [(128, "cap")]
    cands = report["candidates"]
    assert cands[0]["batch_size"] == 64 and cands[0]["phase"] == "given"  # the config's own batch: the baseline
    assert report["chosen_batch"] in {c["batch_size"] for c in cands}
    assert all(c["peak_rss_bytes"] and len(c["rates"]) >= 2 and not c["failure"] for c in cands)
    assert report["plan"]["accumulation"] == 1  # a CPU is never told to accumulate
    assert report["verify"]["ok"] and report["verify"]["samples_per_s"] > 0
    assert report["verify"]["agreement"]["status"] in ("agrees", "input-bound")
    assert report["loader"]["trials"][0]["given"] and report["elapsed_s"] > 0
    assert (out / "autotune.png").stat().st_size > 1000
    assert A.plot_report(report, out / "replot.png").stat().st_size > 1000  # from the JSON alone (tools/)
    tuned = out / "quickstart.tuned.toml"
    cfg = load_config(tuned)
    assert cfg.train.batch_size == report["plan"]["global_batch"] and cfg.train.accumulation == 1
    assert cfg.model.name == "smallcnn" and cfg.data.image_size == 32  # everything else as the input config
    assert cfg.data.loader == report["loader"]["backend"]  # the measured backend, not `auto`, is pinned

    from fasttrain.engine import train

    first_text = tuned.read_text()
    result = train(
        load_config(tuned, [f"train.runs_dir={tmp_path / 'runs'}", "train.epochs=1", "train.max_steps=2"]),
        progress=False,
    )
    assert result.history and result.history[-1]["step"] == 2

    # Second call: from the cache, no probe runs; new files beside the first ones, never over them.
    def no_probe(*a, **k):
        raise AssertionError("the cache should have answered")

    monkeypatch.setattr(RUN, "_tune", no_probe)
    t0 = time.monotonic()
    assert main(args) == 0
    assert time.monotonic() - t0 < 5.0  # target < 2 s; generous for a loaded 2-core CI box
    assert "[cached]" in capsys.readouterr().out
    assert (out / "quickstart.tuned-2.toml").is_file() and (out / "autotune-2.json").is_file()
    assert tuned.read_text() == first_text  # the first config is intact
    # An ignored field (epochs) is the same answer; a field that matters (the image size) is a new one.
    assert main([*args, "--set", "train.epochs=3"]) == 0
    assert "[cached]" in capsys.readouterr().out
    with pytest.raises(AssertionError, match="cache should have answered"):  # a new question: probes would run
        main([*args, "--set", "data.image_size=24", "--set", "data.resize_size=24"])


def test_on_cpu_a_job_too_short_to_repay_tuning_is_written_as_it_is_without_a_probe(tmp_path, monkeypatch, capsys):
    # One epoch of the quickstart: ~0.4 s of steps by the model's FLOPs; half of it cannot pay two probes and two
    # end-to-end windows (the defaults: ~5 s). Nothing is prepared or probed, and the answer is not cached (the
    # cache key leaves the job's length out).
    def no_probe(*a, **k):
        raise AssertionError("a job this short must not be tuned")

    monkeypatch.setattr(RUN, "_tune", no_probe)
    out = tmp_path / "out"
    args = ["autotune", "quickstart", "--set", "train.epochs=1", "--set", f"train.runs_dir={tmp_path / 'runs'}"]
    assert main([*args, "--set", f"tune.cache_dir={tmp_path / 'cache'}", "--out", str(out), "-q"]) == 0
    text = capsys.readouterr().out
    assert "not tuned: the job is about" in text and "written as it is" in text and "phase" not in text
    report = json.loads((out / "autotune.json").read_text())
    assert report["ok"] and report["shortcut"] == "too-short" and not report["candidates"]
    assert report["chosen_batch"] == report["given_batch"] == 64 and report["loader"] is None
    assert not list((tmp_path / "cache").glob("*.json")) and not (out / "autotune.png").exists()
    tuned, original = load_config(out / "quickstart.tuned.toml"), load_config("quickstart")
    assert tuned.train == dataclasses.replace(original.train, epochs=1, runs_dir=str(tmp_path / "runs"))
    assert tuned.data.loader == original.data.loader == "auto"  # not pinned: no loader was measured


def test_on_cpu_a_spent_time_cap_with_the_configs_own_batch_standing_skips_loader_trials_and_verification(
    tmp_path, monkeypatch, virtual_time
):
    # The cap from the job's length leaves no time after the config's own batch: it stands, unverified changes
    # are not made, and neither the loader trials nor the verification run.
    monkeypatch.setattr(RUN, "cpu_time_cap", lambda *a, **k: 1e-3)
    monkeypatch.setattr(L, "tune_loader", lambda *a, **k: pytest.fail("no loader trials once the cap is spent"))
    monkeypatch.setattr(P, "verify", lambda *a, **k: pytest.fail("no verification once the cap is spent"))
    assert main(cli_args(tmp_path)) == 0
    report = json.loads((tmp_path / "out" / "autotune.json").read_text())
    assert report["ok"] and report["shortcut"] == "cap-spent" and report["cpu_cap_s"] == pytest.approx(1e-3)
    assert [c["batch_size"] for c in report["candidates"]] == [64]  # the baseline only: no time for another
    assert report["chosen_batch"] == 64 and report["loader"] is None and report["verify"] is None
    assert any("spent" in n and "written as it is" in n for n in report["notes"])
    assert any("depends on the job's length" in n for n in report["notes"])
    assert not list((tmp_path / "cache").glob("*.json"))
    tuned = load_config(tmp_path / "out" / "quickstart.tuned.toml")
    assert tuned.train.batch_size == 64 and tuned.train.accumulation == 1 and tuned.data.loader == "auto"


def test_probe_oom_is_recovered_and_reported_other_errors_propagate(tmp_path, monkeypatch, capsys, virtual_time):
    def oom(self, b, eb):
        _big = torch.empty(1024)  # a tensor the failing step held: freed outside the except block
        raise torch.OutOfMemoryError(f"CUDA out of memory. Tried to allocate {b} GiB")

    monkeypatch.setattr(P.StepProbe, "_run", oom)
    assert main(cli_args(tmp_path)) == 1
    text = capsys.readouterr().out
    assert "no batch size is usable" in text and "out of memory" in text and "OOM" in text
    assert not list((tmp_path / "out").glob("*.toml"))  # nothing to train with: no config
    assert not list((tmp_path / "cache").glob("*.json"))  # failures are not cached

    def bug(self, b, eb):
        raise RuntimeError("mat1 and mat2 shapes cannot be multiplied")

    monkeypatch.setattr(P.StepProbe, "_run", bug)
    with pytest.raises(RuntimeError, match="shapes cannot be multiplied"):
        main(cli_args(tmp_path))


def test_an_unreliable_answer_is_reported_and_not_cached(tmp_path, capsys, virtual_time):
    # Any spread is "too large": every probe is repeated once, then marked unreliable.
    assert main(cli_args(tmp_path, "--set", "tune.max_spread=1e-9")) == 0
    text = capsys.readouterr().out
    assert "unreliable (not cached)" in text and "not cached" in text
    report = json.loads((tmp_path / "out" / "autotune.json").read_text())
    assert not report["reliable"] and all(not c["reliable"] for c in report["candidates"])
    assert all(len(c["rates"]) == 4 for c in report["candidates"] if c["phase"] != "plan")  # measured twice
    assert not list((tmp_path / "cache").glob("*.json"))


def slowed(clock: VirtualClock, factor: float):
    """A stand-in for ``cycle_batches`` whose loader takes ``factor`` times the step's time per batch: end to end
    runs at 1 / (1 + factor) of the model-only step."""
    from fasttrain.timing import cycle_batches

    def cycle(loader, epoch=0):
        for batch in cycle_batches(loader, epoch):
            b = len(batch)
            clock.now += factor * b / clock.rate(b)
            yield batch

    return cycle


def test_a_verification_far_below_the_probe_is_measured_longer_then_written_as_less_sure(
    tmp_path, monkeypatch, capsys, virtual_time
):
    # Only the verification's batches are slow: the loader trial kept up and the model-only step re-measured
    # fine, so nothing explains it. Noise until shown otherwise: measured twice as long, then the answer stands,
    # marked unreliable with the reason, and is not cached (it used to fail with no config).
    monkeypatch.setattr(P, "cycle_batches", slowed(virtual_time, 5.0))
    windows = []
    real = P.verify
    monkeypatch.setattr(P, "verify", lambda *a, **k: windows.append(k["seconds"]) or real(*a, **k))
    assert main(cli_args(tmp_path)) == 0
    text = capsys.readouterr().out
    assert "disagrees" in text and "unexplained" in text and "twice as long" in text
    assert windows[:2] == [pytest.approx(0.1), pytest.approx(0.2)]
    assert list((tmp_path / "out").glob("*.toml")) and not list((tmp_path / "cache").glob("*.json"))
    report = json.loads((tmp_path / "out" / "autotune.json").read_text())
    assert report["ok"] and not report["reliable"]
    assert any("unexplained" in u for u in report["unreliable"])
    assert report["verify"]["recheck_samples_per_s"] > report["verify"]["samples_per_s"]
    assert report["chosen_batch"] == report["given_batch"] == 64


def test_on_cpu_a_batch_not_faster_end_to_end_gives_way_to_the_configs_own(tmp_path, monkeypatch, virtual_time):
    # The model-only step is faster at 64 than at the config's 32 (by 20%), but a loader costing the same per
    # sample whatever the batch makes both run at the loader's pace end to end: the tuned config keeps 32.
    def per_sample(loader, epoch=0):
        from fasttrain.timing import cycle_batches

        for batch in cycle_batches(loader, epoch):
            virtual_time.now += 0.05 * len(batch)
            yield batch

    monkeypatch.setattr(P, "cycle_batches", per_sample)
    monkeypatch.setattr(L, "cycle_batches", per_sample)
    assert main(cli_args(tmp_path, "--set", "train.batch_size=32")) == 0
    report = json.loads((tmp_path / "out" / "autotune.json").read_text())
    assert report["ok"] and report["given_batch"] == 32 and report["best_batch"] == 64
    assert report["chosen_batch"] == 32 and report["plan"]["micro_batch"] == 32
    assert any("not faster beyond the noise" in n for n in report["notes"])
    assert load_config(tmp_path / "out" / "quickstart.tuned.toml").train.batch_size == 32


def test_an_input_bound_verification_is_explained(tmp_path, monkeypatch, capsys, virtual_time):
    monkeypatch.setattr(P, "cycle_batches", slowed(virtual_time, 5.0))
    monkeypatch.setattr(L, "cycle_batches", slowed(virtual_time, 5.0))  # the loader trial sees the slow loader too
    assert main(cli_args(tmp_path)) == 0
    text = capsys.readouterr().out
    assert "input-bound" in text
    report = json.loads((tmp_path / "out" / "autotune.json").read_text())
    assert report["ok"] and report["verify"]["agreement"]["status"] == "input-bound"
    assert not report["loader"]["keeps_up"]


def test_a_verification_out_of_memory_falls_back_to_a_smaller_measured_batch(tmp_path, monkeypatch, virtual_time):
    real = P.verify
    calls = []

    def verify(task, source, **kw):
        calls.append(kw["plan"].micro_batch)
        if len(calls) == 1:  # the first verification runs out of memory: evidence against that micro-batch
            kw["loader"] and kw["loader"].close()
            return P.Verification(
                False, kw["plan"].micro_batch, 1, kw["backend"], error="out of memory (fake)", failure="oom"
            ), None
        return real(task, source, **kw)

    monkeypatch.setattr(P, "verify", verify)
    r = A.autotune(load_config(None, _quick_sets(tmp_path)), out_dir=tmp_path / "out")
    assert calls[0] == 64 and calls[1] < 64
    assert r.ok and r.plan.micro_batch == calls[1] and r.plan.accumulation == 1  # a CPU: no accumulation
    assert any("verification at micro-batch 64 failed" in n for n in r.notes)
    assert r.files["config"] and load_config(r.files["config"]).train.batch_size == calls[1]


def test_loader_trials_out_of_memory_fall_back_to_a_smaller_measured_batch(tmp_path, monkeypatch, virtual_time):
    """The loader trials run the real loader beside the step (on a GPU the cache's whole set, DALI's buffers),
    which no probe measured: their out-of-memory error ended autotune with a traceback."""
    real = L.tune_loader
    calls = []

    def tune_loader(cfg, runtime, source, backend, **kw):
        calls.append(kw["micro"])
        if len(calls) == 1:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB (fake)")
        return real(cfg, runtime, source, backend, **kw)

    monkeypatch.setattr(L, "tune_loader", tune_loader)
    r = A.autotune(load_config(None, _quick_sets(tmp_path)), out_dir=tmp_path / "out")
    assert calls[0] == 64 and calls[1] < 64
    assert r.ok and r.plan.micro_batch == calls[1]
    assert any("the loader trials at micro-batch 64 ran out of memory" in n for n in r.notes)
    assert load_config(r.files["config"]).train.batch_size == calls[1]


def test_loader_trials_failing_otherwise_still_raise(tmp_path, monkeypatch, virtual_time):
    def tune_loader(*a, **kw):
        raise RuntimeError("a bug in a loader")

    monkeypatch.setattr(L, "tune_loader", tune_loader)
    with pytest.raises(RuntimeError, match="a bug in a loader"):
        A.autotune(load_config(None, _quick_sets(tmp_path)), out_dir=tmp_path / "out")


def _quick_sets(tmp_path) -> list[str]:
    return [
        "data.root=",
        "model.name=smallcnn",
        "model.width=8",
        "data.image_size=32",
        "data.resize_size=32",
        "train.batch_size=64",
        f"train.runs_dir={tmp_path}",
        f"tune.cache_dir={tmp_path / 'cache'}",
        "tune.max_batch=64",
        "tune.warmup_steps=1",
        "tune.repeats=2",
        "tune.repeat_s=0.01",
        "tune.verify_s=0.1",
        "tune.time_budget_s=600",
        "train.epochs=1000",  # a long job: the CPU cap (half the training tuned) stays above the budget
    ]


# -- loader trials -----------------------------------------------------------------------------------------------
def small_prep(shapes_root, *extra: str):
    from fasttrain.prepare import prepare

    cfg = apply_overrides(
        Config(),
        [
            f"data.root={shapes_root}",
            "data.image_size=32",
            "data.resize_size=32",
            "model.name=smallcnn",
            "model.width=8",
            "runtime.device=cpu",
            *extra,
        ],
    )
    return prepare(cfg)


def count_prechecks(monkeypatch) -> list[int]:
    """Count the header checks the file pre-check really runs (answers from memory are not counted); returns the
    list of file counts checked."""
    from fasttrain.data import checks

    calls: list[int] = []
    real = checks._precheck

    def counting(paths, *a, **k):
        calls.append(len(paths))
        return real(paths, *a, **k)

    monkeypatch.setattr(checks, "_precheck", counting)
    return calls


def test_loader_trials_end_to_end_on_the_torch_backend(shapes_root, monkeypatch, virtual_time):
    prep = small_prep(shapes_root, "data.loader=torch", "data.workers=0")
    ladder = L.loader_ladder("torch", prep.cfg.data)
    assert ladder[0] == {"workers": 0} and len(ladder) >= 2  # the config's own setting first
    state = prep.task.build_state()
    kw = dict(micro=32, accumulation=1, state=state, noise=0.03, warmup=1, repeats=2, repeat_s=0.05)
    # Every setting's loader far slower than the step: input-bound, every setting tried, the shortfall reported.
    calls = count_prechecks(monkeypatch)
    monkeypatch.setattr(L, "cycle_batches", slowed(virtual_time, 5.0))
    with L.reuse_file_checks():
        r = L.tune_loader(prep.cfg, prep.runtime, prep.source, "torch", **kw)
    assert calls == []  # the dataset index answers every setting's pre-check: no file is read again
    assert r.input_bound and len(r.trials) == len(ladder) and "input-bound" in r.note
    assert all(len(t.rates) == 2 and len(t.model_rates) == 2 for t in r.trials)
    assert all(t.share == pytest.approx(1 / 6, rel=0.05) for t in r.trials)  # measured against the step alongside
    assert r.trials[0].model_samples_per_s == pytest.approx(virtual_time.rate(32), rel=0.05)
    if r.loader is not None:  # open only when the kept setting was the last measured
        r.loader.close()
    # A loader that costs the step nothing: the config's own setting keeps up, and nothing more is tried.
    from fasttrain.timing import cycle_batches

    monkeypatch.setattr(L, "cycle_batches", cycle_batches)
    r = L.tune_loader(prep.cfg, prep.runtime, prep.source, "torch", **kw)
    assert r.keeps_up and len(r.trials) == 1 and r.trials[0].given and r.setting == {"loader": "torch", **ladder[0]}
    assert r.loader is not None  # the last measured, kept: handed to the verification
    r.loader.close()


def test_a_noisy_loader_trial_is_measured_again_then_marked_unreliable(shapes_root, monkeypatch, virtual_time):
    from fasttrain.timing import cycle_batches

    def bursts(loader, epoch=0):  # every third batch waits 20 steps' time: another job took the cores for a moment
        for n, batch in enumerate(cycle_batches(loader, epoch)):
            virtual_time.now += (20.0 if n % 3 == 2 else 0.0) * len(batch) / virtual_time.rate(len(batch))
            yield batch

    prep = small_prep(shapes_root, "data.loader=torch", "data.workers=0")
    monkeypatch.setattr(L, "cycle_batches", bursts)
    r = L.tune_loader(
        prep.cfg,
        prep.runtime,
        prep.source,
        "torch",
        micro=32,
        accumulation=1,
        state=prep.task.build_state(),
        noise=0.03,
        warmup=1,
        repeats=3,
        repeat_s=0.01,
        max_spread=0.15,
    )
    if r.loader is not None:
        r.loader.close()
    first = r.trials[0]
    assert not first.reliable and not r.reliable and len(first.rates) == 6  # two rounds of three windows
    assert r.to_dict()["reliable"] is False


def test_dali_file_precheck_runs_once_for_the_whole_ladder(shapes_root, monkeypatch, virtual_time):
    from fasttrain.data import dali

    if not dali.dali_status()[0]:
        pytest.skip(dali.dali_status()[1])
    calls = count_prechecks(monkeypatch)
    prep = small_prep(shapes_root, "data.loader=dali", "data.dali_threads=2")
    ladder = L.loader_ladder("dali", prep.cfg.data)
    assert len(ladder) >= 2 and ladder[0]["dali_threads"] == 2
    state = prep.task.build_state()
    with L.reuse_file_checks():
        monkeypatch.setattr(L, "cycle_batches", slowed(virtual_time, 5.0))  # none keeps up: every one is tried
        r = L.tune_loader(
            prep.cfg,
            prep.runtime,
            prep.source,
            "dali",
            micro=16,
            accumulation=1,
            state=state,
            noise=0.03,
            warmup=1,
            repeats=2,
            repeat_s=0.02,
        )
        if r.loader is not None:
            r.loader.close()
    assert len(r.trials) == len(ladder)  # every setting built its own pipeline ...
    assert calls == []  # ... and the dataset index answered every pre-check (no file read again)


def test_reuse_file_checks_answers_each_file_list_once_whoever_asks(shapes_root, monkeypatch):
    from fasttrain.data import checks
    from fasttrain.data.samples import Samples, precheck_samples
    from fasttrain.data.sources import discover

    calls = count_prechecks(monkeypatch)
    data = Config().data
    split = discover(apply_overrides(Config(), [f"data.root={shapes_root}"]).data).train
    with L.reuse_file_checks() as memo:
        first = precheck_samples(Samples(split), data, threads=1)
        again = precheck_samples(Samples(split), data, threads=4)  # another loader setting: answered from memory
        checks.precheck(split.paths[:5], max_pixels=data.max_image_pixels, threads=1)
    assert calls == [len(split), 5] and len(memo) == 2
    assert first.samples.split.paths == again.samples.split.paths
    checks.precheck(split.paths[:5], max_pixels=data.max_image_pixels, threads=1)
    assert calls == [len(split), 5, 5]  # outside the block every call checks the files


# -- compiled check, budget ------------------------------------------------------------------------------------
class FakeTask:
    """Just enough of a Task for StepProbe: steps above ``oom_above`` samples raise an out-of-memory error."""

    def __init__(self, oom_above: int):
        self.runtime = SimpleNamespace(device=torch.device("cpu"))
        self.oom_above = oom_above
        self.built = 0

    def build_state(self):
        self.built += 1
        return SimpleNamespace(train=lambda mode=True: None)

    def input_spec(self):
        return None

    def synthetic_batch(self, n, spec, train=True):
        return Batch(torch.zeros(n, 1), torch.zeros(n))

    def train_step(self, state, batch, *, update=True, loss_scale=1.0):
        if len(batch) > self.oom_above:
            raise torch.OutOfMemoryError("CUDA out of memory (fake)")
        time.sleep(0.001)
        return {}

    def eval_step(self, state, batch):
        return {}


SETTINGS = P.ProbeSettings(warmup=1, repeats=2, repeat_s=0.01, min_steps=1, max_spread=100.0, with_eval=False)


def test_compiled_check_resets_the_compiler_between_sizes_and_a_failed_size_is_not_yes():
    task = FakeTask(oom_above=32)
    resets = []
    state, got, tried = P.compiled_check(
        task,
        budget=P.Budget("cpu", 16.0),
        settings=SETTINGS,
        eval_batch=lambda b: 2 * b,
        sizes=[64, 32, 16],
        headroom=0.1,
        reset=lambda dev: resets.append(dev),
    )
    assert [c.batch_size for c in tried] == [64, 32] and got is tried[1] and state is not None
    assert len(resets) == 1  # between 64 and 32: the failed size's graphs never reach the next one
    resets.clear()
    none = P.compiled_check(
        FakeTask(oom_above=8),
        budget=P.Budget("cpu", 16.0),
        settings=SETTINGS,
        eval_batch=lambda b: 2 * b,
        sizes=[64, 32],
        headroom=0.1,
        reset=lambda dev: resets.append(dev),
    )
    assert none[:2] == (None, None) and len(resets) == 2  # and after the last failed size: nothing held
    assert R.fits_label(tried[0]) == "OOM" and R.fits_label(tried[1]) == "yes"
    tight = Candidate(64, True, samples_per_s=100.0, phase="compiled", failure="headroom", error="leaves less")
    assert R.fits_label(tight) != "yes"  # a compiled step over the headroom did not pass
    report = R.AutotuneReport(
        "x",
        "m",
        "classify",
        "cpu",
        "rt",
        [3, 8, 8],
        P.Budget("cpu", 16.0),
        0.1,
        0.03,
        8,
        candidates=[Candidate(32, True, samples_per_s=1.0, usable=True, phase="grow")],
        compiled_tried=tried,
        compiled=got,
    )
    rows = [ln for ln in report.to_table().splitlines() if ln.strip().startswith("64")]
    assert rows and "OOM" in rows[0] and "yes" not in rows[0]


@pytest.mark.parametrize(
    "best_sps, said",
    [
        (103.0, "within the noise, so the config's own batch is kept"),
        (450.0, "the search's best, 450.0 at 8, was not kept: see below"),
    ],
)
def test_the_choice_line_says_within_the_noise_only_when_it_is(best_sps, said):
    """A verification that sent the plan back to the config's own batch was reported as a tie with the best
    (451.6 against 34.1 samples/s: 'within the noise')."""
    cands = [
        Candidate(8, True, samples_per_s=best_sps, usable=True, phase="grow", spread=0.01),
        Candidate(64, True, samples_per_s=100.0, usable=True, phase="given", spread=0.01),
    ]
    report = R.AutotuneReport(
        "x", "m", "classify", "cpu", "rt", [3, 8, 8], P.Budget("cpu", 16.0), 0.1, 0.03, 8,
        candidates=cands, chosen_batch=64, best_batch=8, given_batch=64,
    )  # fmt: skip
    (line,) = [ln for ln in report.to_table().splitlines() if ln.startswith("chosen batch 64")]
    assert said in line
    report.time_budget_s = report.cpu_cap_s = 4.54476  # a CPU cap from the job's length: "= 4.54476 s" before
    assert report.to_table().splitlines()[-1].endswith("of the 4.5 s CPU cap")
    assert str(report) == report.to_table()  # print(autotune(cfg)): the table, not every dataclass field


def test_each_later_plans_compiled_check_starts_from_a_reset_compiler(monkeypatch):
    """A verification that fails (or the loader's memory) sends the plan loop to a smaller micro-batch and a new
    compiled check. The earlier plans' graphs stay in dynamo's cache after their models are dropped (an entry per
    shape on the model's forward): without a reset between plans, a fourth plan's shapes passed dynamo's
    recompile_limit (8) and ran eager while reported as compiled."""
    events: list[str] = []

    def check(task, *, sizes, **kw):
        events.append(f"check {sizes[0]}")
        got = Candidate(sizes[0], True, samples_per_s=1.0, usable=True, phase="compiled")
        return SimpleNamespace(), got, [got]

    monkeypatch.setattr(P, "compiled_check", check)
    monkeypatch.setattr(P, "reset_compiler", lambda dev: events.append("reset"))
    run = SimpleNamespace(
        prep=SimpleNamespace(task=None),
        budget=P.Budget("cpu", 16.0),
        settings=SETTINGS,
        eval_batch=lambda b: 2 * b,
        cfg=SimpleNamespace(tune=SimpleNamespace(headroom=0.1)),
        clock=SimpleNamespace(stamp=lambda: "", exclude=lambda s: None),
        device=torch.device("cpu"),
    )
    search = A.SearchResult([Candidate(b, True, samples_per_s=1.0, usable=True) for b in (16, 32, 64)], 64, 64, "")
    out = RUN._Outcome()
    for micro in (64, 32, 16):
        RUN._compile(run, out, search, BatchPlan(micro, 1, micro, 64, ""))
    assert events == ["check 64", "reset", "check 32", "reset", "check 16"]


def test_a_probe_counts_building_the_state_apart_from_the_warm_up_the_next_size_is_priced_by(monkeypatch):
    """On an H200 the first probe after an out-of-memory error took 20 s and the search priced the next size at
    twice that: building the model again had counted as warm-up, which grows with the batch. Building is now
    ``setup_s``, paid by the probe that builds the state (the first, and the first after an OOM dropped it)."""
    task = FakeTask(oom_above=32)
    real = task.build_state

    def slow_build():
        time.sleep(0.3)
        return real()

    monkeypatch.setattr(task, "build_state", slow_build)
    probe = P.StepProbe(task, budget=P.Budget("cpu", 16.0), settings=SETTINGS, eval_batch=lambda b: b)
    first = probe(8, "grow")
    assert first.setup_s >= 0.3 and first.untimed_s < 0.3
    assert first.seconds == pytest.approx(first.setup_s + first.untimed_s + first.timed_s, abs=1e-6)
    again = probe(16, "grow")
    assert again.setup_s == 0.0 and task.built == 1  # the state is shared
    assert not probe(64, "grow").fits  # an OOM drops the state ...
    rebuilt = probe(16, "bisect")
    assert rebuilt.setup_s >= 0.3 and task.built == 2 and rebuilt.untimed_s < 0.3  # ... and the next builds it


def test_remeasure_appends_interleaved_repeats():
    probe = P.StepProbe(
        FakeTask(oom_above=10**6), budget=P.Budget("cpu", 16.0), settings=SETTINGS, eval_batch=lambda b: b
    )
    a, b = probe(8, "grow"), probe(16, "grow")
    assert len(a.rates) == 2 and a.fits and a.untimed_s >= 0 and a.timed_s > 0
    probe.remeasure([a, b])
    assert len(a.rates) == 4 and len(b.rates) == 4 and a.remeasured == b.remeasured == 1


def fake_fraction(monkeypatch, start: float) -> list[float]:
    calls: list[float] = []
    monkeypatch.setattr(P.memory, "set_memory_fraction", lambda dev, f: calls.append(f))
    monkeypatch.setattr(P.memory, "get_memory_fraction", lambda dev: start)
    return calls


def test_the_budget_restores_the_users_own_cap_and_charges_memory_outside_torch(monkeypatch):
    calls = fake_fraction(monkeypatch, 0.7)
    dev = torch.device("cuda", 0)
    b = P.Budget(
        "emulated",
        16.0,
        budget_bytes=16 * GIB,
        card_total_bytes=80 * GIB,
        in_use_before_bytes=1 * GIB,
        counted_in_use=True,
        fraction=15 / 80,
        previous_fraction=0.7,
    )
    P.charge_outside(b, dev, 3 * GIB)  # DALI's buffers: torch's cap shrinks by as much
    assert calls[-1] == pytest.approx(12 / 80) and b.outside_torch_bytes == 3 * GIB
    assert "outside torch" in b.describe()
    P.release_budget(b, dev)
    assert calls[-1] == 0.7  # the user's own fraction, not 1.0
    P.release_budget(P.Budget("cpu", 16.0), torch.device("cpu"))
    assert len(calls) == 2


def _fake_h200(monkeypatch, own: int | None) -> list[float]:
    """An H200 (140 GiB) where other jobs hold 40 GiB and this process 2 GiB (1 GiB of it torch's cache);
    ``own`` None: NVML cannot see processes (a container), only the device's 42 GiB."""
    calls = fake_fraction(monkeypatch, 1.0)
    monkeypatch.setattr(P.memory, "load_cuda_libraries", lambda d: None)
    monkeypatch.setattr(P.memory, "process_device_bytes", lambda d: own)
    monkeypatch.setattr(P.memory, "device_memory", lambda d: P.memory.DeviceMemory(141 * GIB, 42 * GIB, "nvml"))
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda d: types.SimpleNamespace(total_memory=140 * GIB))
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda d: 1 * GIB)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda d: "H200")
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda d: (98 * GIB, 140 * GIB))
    return calls


def test_an_emulated_budget_counts_this_processs_memory_not_its_neighbours(monkeypatch):
    """A smaller card emulated on a GPU that other jobs share: their 40 GiB would not be on that card (counted,
    every budget under 40 GiB was refused). The cap is a fraction of the device's totalGlobalMem, as torch's
    allocator applies it. A card not larger than the budget counts everyone: that is its real limit."""
    calls = _fake_h200(monkeypatch, 2 * GIB)
    dev = torch.device("cuda", 0)
    b = P.setup_budget(dev, 16.0)
    assert b.mode == "emulated" and b.in_use_before_bytes == 1 * GIB and b.card_total_bytes == 140 * GIB
    assert calls == [pytest.approx(15 / 140)] and "this process" in b.describe() and not b.short
    card = P.setup_budget(dev, 200.0)
    assert card.mode == "card" and card.budget_bytes == 140 * GIB - 41 * GIB


def test_an_emulated_budget_larger_than_what_is_free_is_said_and_not_cached(monkeypatch, caplog):
    """Other jobs hold 100 GiB of the card: a 48 GiB budget fits what is free (39 GiB), not the budget, which the
    answer's cache key would claim."""
    _fake_h200(monkeypatch, 2 * GIB)
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda d: (38 * GIB, 140 * GIB))
    with caplog.at_level("WARNING", logger="fasttrain"):
        b = P.setup_budget(torch.device("cuda", 0), 48.0)
    assert b.mode == "emulated" and b.short.startswith("only 39.00 GiB of the 48 GiB budget were free on H200")
    assert "other processes held the rest" in caplog.text


def test_without_processes_in_nvml_the_devices_use_is_counted_and_a_budget_below_it_refused(monkeypatch):
    _fake_h200(monkeypatch, None)
    dev = torch.device("cuda", 0)
    with pytest.raises(ValueError, match=r"16 GiB is less than what is already in use on H200 \(41\.00 GiB: CUDA"):
        P.setup_budget(dev, 16.0)
    b = P.setup_budget(dev, 48.0)
    assert b.in_use_before_bytes == 41 * GIB and "the device" in b.describe()


def test_charging_the_loaders_memory_moves_the_plan_off_a_tight_batch():
    budget = P.Budget("card", 10.0, budget_bytes=10 * GIB, card_total_bytes=10 * GIB, in_use_before_bytes=0)
    big = Candidate(64, True, samples_per_s=1000.0, usage_bytes=8 * GIB, usable=True)
    small = Candidate(32, True, samples_per_s=900.0, usage_bytes=4 * GIB, usable=True)
    loader = L.LoaderResult("dali", [], {}, 990.0, 0.0, 1000.0, 0.0, True, "", outside_torch_bytes=GIB)
    dev = torch.device("cuda", 0)
    assert not RUN._charge_loader_memory(loader, budget, dev, 0.1, [small, big], big)  # 8 + 1 GiB <= 9 GiB
    loader.outside_torch_bytes = int(1.5 * GIB)
    assert RUN._charge_loader_memory(loader, budget, dev, 0.1, [small, big], big)
    assert not big.usable and big.failure == "headroom" and "outside torch" in big.error and small.usable


def test_cpu_budget_does_not_apply():
    b = P.setup_budget(torch.device("cpu"), 16.0)
    assert b.mode == "cpu" and b.budget_bytes is None and "does not apply" in b.describe()


# -- cache key ---------------------------------------------------------------------------------------------------
def test_the_cache_key_is_the_whole_config_but_an_explicit_ignore_list():
    cfg = Config()
    flat = C.flatten(cfg)
    for name in C.IGNORED:  # every entry names a real field or section
        assert name in flat or any(k.startswith(name[:-1]) for k in flat), name
    fields = C.key_fields(cfg, budget_gib=16.0, machine_info={"device": "x"})
    kept = set(fields["config"])
    assert kept == {k for k in flat if not C._ignored(k)}
    assert "train.batch_size" in kept and "data.root" in kept and "optim.name" in kept and "tune.noise" in kept
    assert "train.epochs" not in kept and "schedule.name" not in kept and "name" not in kept
    key = C.cache_key(fields)
    assert C.cache_key(dict(reversed(list(fields.items())))) == key
    for over in (
        "train.batch_size=96",
        "optim.name=adamw",
        "data.image_size=64",
        "runtime.precision=bf16",
        "tune.headroom=0.2",
        "data.workers=3",
    ):
        other = C.key_fields(apply_overrides(cfg, [over]), budget_gib=16.0, machine_info={"device": "x"})
        assert C.cache_key(other) != key, over
    for over in ("train.epochs=99", "schedule.name=step", "optim.lr=0.5", "train.runs_dir=/elsewhere"):
        other = C.key_fields(apply_overrides(cfg, [over]), budget_gib=16.0, machine_info={"device": "x"})
        assert C.cache_key(other) == key, over
    assert C.cache_key(C.key_fields(cfg, budget_gib=8.0, machine_info={"device": "x"})) != key
    assert C.cache_key(C.key_fields(cfg, budget_gib=16.0, machine_info={"device": "y"})) != key


# -- the typed report and the plot ----------------------------------------------------------------------------------
def full_report() -> R.AutotuneReport:
    def c(b, sps, **kw):
        x = Candidate(
            b,
            True,
            usable=True,
            phase="grow",
            peak_allocated_bytes=b * 2**24,
            peak_reserved_bytes=b * 2**25,
            warmup_reserved_bytes=b * 2**26,
            usage_bytes=b * 2**25 + 2**30,  # + 1 GiB in use before tuning (emulated budget)
            **kw,
        )
        x.set_rates([sps * 0.9, sps, sps * 1.08])
        return x

    cands = [c(8, 300), c(16, 550), c(32, 900), c(64, 1200), c(128, 1300)]
    cands[0].reliable = False
    cands += [
        Candidate(256, False, phase="grow", failure="oom", error="out of memory (x)"),
        Candidate(192, False, phase="bisect", failure="oom", error="out of memory (x)"),
    ]
    budget = P.Budget("emulated", 16.0, 16 * GIB, 80 * GIB, GIB, True, 0.19, 1.0, 0, "nvml", "H100")
    v = P.Verification(
        True,
        128,
        1,
        "dali",
        samples_per_s=1250.0,
        rates=[1200.0, 1250.0, 1270.0],
        spread=0.056,
        agreement=Agreement("agrees", True, True, "either", "fine"),
    )
    lr = L.LoaderResult(
        "dali",
        [L.LoaderTrial({"dali_threads": -1}, 1260.0, 0.02, [1260.0], 1300.0, 0.02, [1300.0], 0.97, True, True)],
        {"loader": "dali", "dali_threads": -1},
        1260.0,
        0.02,
        1300.0,
        0.02,
        True,
        "keeps up",
    )
    return R.AutotuneReport(
        "quickstart",
        "resnet50",
        "classify",
        "cuda:0",
        "rt",
        [3, 224, 224],
        budget,
        0.1,
        0.03,
        8,
        max_batch=128,
        time_budget_s=45.0,
        candidates=cands,
        chosen_batch=128,
        best_batch=128,
        given_batch=64,
        stop_reason="...",
        limit="memory",
        not_probed=[Skipped(512, "time", "about 9 s")],
        plan=BatchPlan(128, 1, 128, 64, "raised"),
        loader=lr,
        verify=v,
        size_rates=[P.SizeRate(160, 2500.0, 128), P.SizeRate(192, 1800.0, 128)],
        notes=["n"],
        unreliable=["batch 8: noisy"],
    )


def test_the_report_round_trips_through_json_as_dataclasses():
    r = full_report()
    back = R.AutotuneReport.from_dict(json.loads(json.dumps(r.to_dict(), default=str)))
    assert back == r  # every nested part typed again: Budget, Candidate, BatchPlan, LoaderResult, Verification
    assert isinstance(back.verify.agreement, Agreement) and isinstance(back.not_probed[0], Skipped)
    d = r.to_dict()
    assert d["ok"] and not d["reliable"] and d["loader"]["input_bound"] is False  # derived values in the JSON
    # what tools/gpu_targets.py reads
    assert {"candidates", "chosen_batch", "elapsed_s", "compile_s", "cached"} <= set(d)
    assert {"usable", "samples_per_s", "batch_size"} <= set(d["candidates"][0])
    table = r.to_table()
    assert "not probed (time)" in table and "unreliable" in table and "verify vs probe: agrees" in table
    assert isinstance(back.size_rates[0], P.SizeRate) and "160 px 2,500.0, 192 px 1,800.0" in table


def test_the_plot_shows_spread_verification_and_cap_and_its_legend_leaves_the_oom_markers_free():
    r = full_report()
    r.limit = "cap"
    fig = R._figure(r)
    fig.canvas.draw()
    ax, ax2 = fig.axes
    labels = [t.get_text() for t in fig.legends[0].get_texts()]
    assert any("min..max" in t for t in labels) and any("verification" in t for t in labels)
    assert any("search stopped at the cap (128)" in t for t in labels) and any("not probed" in t for t in labels)
    assert len(ax.containers) >= 2  # error bars: the probes' and the verification's
    legend_box = fig.legends[0].get_window_extent()
    oom = [ln for ln in ax.get_lines() if ln.get_label().startswith("does not fit")][0]
    for x, y in zip(*oom.get_data()):
        px, py = ax.transData.transform((x, y))
        assert not legend_box.contains(px, py)  # the legend does not cover an OOM marker
    lo, hi = ax2.get_ylim()
    assert lo == 0 and hi >= 16  # the 16 GiB budget line is on the memory axis's visible scale
    charged = next(ln for ln in ax2.get_lines() if ln.get_label().startswith("steady-state memory charged"))
    by_size = {c.batch_size: c for c in r.candidates if c.peak_reserved_bytes is not None}
    for b, gib in zip(*charged.get_data()):  # what the headroom test compares with the budget lines
        assert gib == pytest.approx(by_size[b].usage_bytes / GIB)


# -- CUDA only ---------------------------------------------------------------------------------------------------
@pytest.mark.gpu
def test_memory_fraction_emulates_a_smaller_card_and_the_users_cap_comes_back():
    dev = torch.device("cuda", torch.cuda.current_device())
    total = torch.cuda.get_device_properties(dev).total_memory
    budget_gib = 2.0
    if total < 4 * GIB:
        pytest.skip("needs a card larger than 4 GiB")
    torch.cuda.set_per_process_memory_fraction(0.9, dev)  # the user's own cap
    try:
        b = P.setup_budget(dev, budget_gib)
        try:
            assert b.mode == "emulated" and b.in_use_before_bytes > 0 and b.previous_fraction == pytest.approx(0.9)
            assert b.fraction == pytest.approx((budget_gib * GIB - b.in_use_before_bytes) / total)
            with pytest.raises(torch.OutOfMemoryError):
                torch.empty(int(2.5 * GIB), dtype=torch.uint8, device=dev)
        finally:
            P.release_budget(b, dev)
        assert torch.cuda.get_per_process_memory_fraction(dev) == pytest.approx(0.9)
        x = torch.empty(int(2.5 * GIB), dtype=torch.uint8, device=dev)  # the cap is gone again
        del x
    finally:
        torch.cuda.set_per_process_memory_fraction(1.0, dev)
        torch.cuda.empty_cache()


@pytest.mark.gpu
def test_probe_recovers_from_oom_with_a_tiny_budget(shapes_root):
    from fasttrain.memory import CUBLAS_WORKSPACE_BYTES
    from fasttrain.prepare import prepare

    cfg = apply_overrides(
        Config(),
        [
            f"data.root={shapes_root}",
            "data.image_size=224",
            "data.loader=torch",
            "model.name=resnet18",
            "runtime.compile=off",
        ],
    )
    prep = prepare(cfg)
    dev = prep.runtime.device
    b = P.setup_budget(dev, 2.0)  # runs a matmul first: this thread's cuBLAS workspace exists from here on
    before = torch.cuda.memory_allocated(dev)
    try:
        settings = P.ProbeSettings(warmup=1, repeats=2, repeat_s=0.05, min_steps=1, max_spread=100.0, with_eval=True)
        probe = P.StepProbe(prep.task, budget=b, settings=settings, eval_batch=lambda n: 2 * n)
        small = probe(8, "grow")
        assert small.fits and small.samples_per_s > 0 and small.peak_reserved_bytes < 2 * GIB
        big = probe(1024, "grow")
        assert not big.fits and big.error.startswith("out of memory") and probe.state is None
        again = probe(8, "grow")  # nothing leaked from the failed size
        assert again.fits and again.peak_reserved_bytes <= small.peak_reserved_bytes * 1.2
        probe.close()
        # What may stay allocated after the probe: cuBLAS and cuBLASLt workspaces (one each per handle and
        # stream) for autograd's backward thread, which gets its own handle: 2 x 32 MiB on Hopper.
        allowance = 2 * CUBLAS_WORKSPACE_BYTES
        assert torch.cuda.memory_allocated(dev) - before <= allowance
    finally:
        P.release_budget(b, dev)


@pytest.mark.gpu
def test_gpu_autotune_respects_the_budget(shapes_root, tmp_path):
    cfg = apply_overrides(
        Config(),
        [
            f"data.root={shapes_root}",
            "data.image_size=224",
            "model.name=resnet18",
            "tune.max_batch=1024",
            "tune.verify_s=2",
            f"train.runs_dir={tmp_path}",
            f"tune.cache_dir={tmp_path / 'cache'}",
        ],
    )
    r = A.autotune(cfg, memory_budget_gib=4.0, out_dir=tmp_path / "out")
    assert r.ok, r.to_table()
    assert r.budget.mode == "emulated"
    assert all(c.usage_bytes <= 0.9 * 4 * GIB for c in r.candidates if c.usable)
    by = {c.batch_size: c for c in r.candidates}
    assert by[r.chosen_batch].samples_per_s >= (1 - cfg.tune.noise) * by[r.best_batch].samples_per_s
    assert all(c.usable or R.fits_label(c) != "yes" for c in r.compiled_tried)


def test_resident_cache_is_sized_by_the_tasks_sample_kind(tmp_path):
    """The GPU cache placeholder autotune holds during probes is what the cache backend will really hold: a
    pix2pix sample is two images, its training pairs at the jitter canvas; a classification sample one image
    and a label. Sizing pairs as classification would under-charge the budget by more than half."""
    from fasttrain.data import synthetic
    from fasttrain.data.samples import pair_load_size
    from fasttrain.prepare import prepare

    root = synthetic.make_paired_dataset(tmp_path / "pairs", n=10, size=32)
    cfg = load_config("pix2pix", [f"data.root={root}", "data.image_size=32", "runtime.device=cpu"])
    prep = prepare(cfg)
    n_train, n_val = len(prep.source.train), len(prep.source.val or [])
    assert (n_train, n_val) == (8, 2)
    load = pair_load_size(32)
    assert load > 32
    assert L.resident_bytes("cache", cfg, prep) == n_train * 2 * 3 * load * load + n_val * 2 * 3 * 32 * 32

    shapes = synthetic.make_shapes_dataset(tmp_path / "shapes", train_per_class=3, val_per_class=1, size=16)
    ccfg = load_config("catfish", [f"data.root={shapes}", "data.image_size=16", "runtime.device=cpu"])
    cprep = prepare(ccfg)
    n = len(cprep.source.train) + len(cprep.source.val or [])
    assert L.resident_bytes("cache", ccfg, cprep) == n * (3 * 16 * 16 + 8)


def test_a_read_only_out_folder_is_refused_before_the_search(tmp_path, monkeypatch, capsys):
    """It used to be refused only after the whole search (minutes), when the report was written."""
    from faultfs import FaultFS

    def searched(*a, **k):
        raise AssertionError("the search ran before the output folder was checked")

    monkeypatch.setattr(RUN, "_tune", searched)
    (tmp_path / "out").mkdir()
    FaultFS(monkeypatch).read_only(tmp_path / "out")
    code = main(cli_args(tmp_path, "--no-cache"))
    err = capsys.readouterr().err.strip()
    assert code == 1 and len(err.splitlines()) == 1, err
    assert "autotune --out" in err and "Read-only file system" in err and str(tmp_path / "out") in err


def test_under_torchrun_every_rank_waits_for_rank_0s_files_and_ends_with_its_error(tmp_path, monkeypatch):
    """Rank 0 writes the answer's files; the other ranks wait for it and end with its error when the writing
    fails. They used to return at once, and their node's torchrun agent then sat in the exit barrier for 300 s
    while rank 0's node failed."""
    from fasttrain import distributed as D

    me = {"rank": 0}
    monkeypatch.setattr(D, "dist_info", lambda env=None: D.DistInfo(rank=me["rank"], world_size=2))
    monkeypatch.setattr(RUN, "dist_info", lambda env=None: D.DistInfo(rank=me["rank"], world_size=2))
    monkeypatch.setattr(D, "_JOINED", D._Joined(torch.distributed.HashStore(), 1, job="j"))
    monkeypatch.setattr(D, "_DECIDED", {})
    cfg = load_config("quickstart", ["dist.timeout_s=5"])
    written = []

    def writes(cfg, report, out):
        if len(written) == 1:
            raise OSError(28, "No space left on device", str(out / "autotune.json"))
        written.append(out)

    monkeypatch.setattr(RUN, "write_outputs", writes)

    def on_rank(rank):
        me["rank"] = rank
        D._DECIDED.clear()  # each rank counts its own calls
        return RUN._answer_from_cache(cfg, full_report(), tmp_path / "cache.json", tmp_path / "out", 0.0)

    t0 = time.monotonic()
    assert on_rank(0).config_name == "quickstart" and written == [tmp_path / "out"]
    assert on_rank(1).files == {} and len(written) == 1  # rank 0 wrote: rank 1 returns, writing nothing
    D._JOINED.generation = 2  # the next job's attempt: rank 0's disk is full now
    for rank in (0, 1):  # rank 0 first (one thread): rank 1's wait ends with rank 0's word
        with pytest.raises(OSError, match=r"No space left on device"):
            on_rank(rank)
    assert time.monotonic() - t0 < 4  # answered, not the 5 s dist.timeout_s


def test_under_torchrun_a_read_only_out_folder_stops_every_rank_at_once(tmp_path, monkeypatch):
    """Rank 0 checks the output folder before the search; the other ranks end with its error instead of
    waiting dist.timeout_s for a cached answer it never sends (they used to: the check was rank 0's alone)."""
    from faultfs import FaultFS

    from fasttrain import distributed as D

    me = {"rank": 0}
    monkeypatch.setattr(D, "dist_info", lambda env=None: D.DistInfo(rank=me["rank"], world_size=2))
    monkeypatch.setattr(RUN, "dist_info", lambda env=None: D.DistInfo(rank=me["rank"], world_size=2))
    monkeypatch.setattr(D, "_JOINED", D._Joined(torch.distributed.HashStore(), 1, job="j"))
    monkeypatch.setattr(D, "_DECIDED", {})

    def searched(*a, **k):
        raise AssertionError("the search ran before the output folder was checked")

    monkeypatch.setattr(RUN, "_tune", searched)
    (tmp_path / "out").mkdir()
    FaultFS(monkeypatch).read_only(tmp_path / "out")
    cfg = load_config("quickstart", ["dist.timeout_s=5", f"tune.cache_dir={tmp_path / 'cache'}"])
    t0 = time.monotonic()
    for rank in (0, 1):  # rank 0 first (one thread): rank 1's wait ends with rank 0's word
        me["rank"] = rank
        D._DECIDED.clear()  # each rank counts its own calls
        with pytest.raises(OSError, match=r"autotune --out.*Read-only file system"):
            RUN.autotune(cfg, out_dir=tmp_path / "out")
    assert time.monotonic() - t0 < 4  # answered, not the 5 s dist.timeout_s


def test_an_answer_whose_loader_auto_chose_by_the_jobs_length_is_written_but_not_cached(
    tmp_path, monkeypatch, capsys, virtual_time
):
    """The tuning run asks whether ``data.loader = auto`` chose by the job's length (tested in
    tests/data/test_backends.py) and the answer then stays out of the cache, whose key leaves the length out."""
    asked = []
    monkeypatch.setattr(RUN, "_loader_by_length", lambda prep, limit: asked.append(prep.backend) or True)
    assert main(cli_args(tmp_path)) == 0
    assert "the answer depends on the job's length" in capsys.readouterr().out
    report = json.loads((tmp_path / "out" / "autotune.json").read_text())
    assert report["ok"] and report["reliable"] and report["loader_by_length"] and len(asked) == 1
    assert (tmp_path / "out" / "quickstart.tuned.toml").is_file()
    assert not list((tmp_path / "cache").glob("*.json"))


def test_under_torchrun_the_plan_line_says_per_process_and_the_global_batch_follows():
    """Under two processes the report said 'train.batch_size raised from 16 to 32' while the tuned config set
    64: the plan is per process, and train.batch_size is the global batch."""
    from fasttrain.tuning.search import plan_batches

    plan = plan_batches(16, 32, multiple=8)
    report = R.AutotuneReport(
        "x", "m", "classify", "cpu", "rt", [3, 8, 8], P.Budget("cpu", 16.0), 0.1, 0.03, 8,
        candidates=[Candidate(32, True, samples_per_s=200.0, usable=True, phase="grow", spread=0.01)],
        chosen_batch=32, best_batch=32, given_batch=16, plan=plan, world_size=2,
    )  # fmt: skip
    lines = report.to_table().splitlines()
    (line,) = [ln for ln in lines if ln.startswith("per process: batch 32")]
    assert "the per-process batch raised from 16 to 32" in line and "train.batch_size raised" not in line
    assert any("the global batch is 2 x 32 = 64 (train.batch_size in the tuned config)" in ln for ln in lines)
