"""tools/gpu_targets.py: each GPU target met or not, from the files tools/gpu_suite.sh writes."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

ROOT = next(p for p in Path(__file__).resolve().parents if (p / "pyproject.toml").is_file())


def _load_tool():
    spec = importlib.util.spec_from_file_location("gpu_targets", ROOT / "tools" / "gpu_targets.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules["gpu_targets"] = mod  # dataclasses look their module up by name
    spec.loader.exec_module(mod)
    return mod


T = _load_tool()


def _bench(folder: Path, backend: str, e2e: float, ceiling: float) -> None:
    report = {
        "model": "resnet50",
        "runtime": "bf16",
        "end_to_end": {"samples_per_s": e2e},
        "model_step": {"samples_per_s": ceiling},
        "loader": {"samples_per_s": 2 * e2e},
    }
    (folder / f"quick-bench-{backend}.json").write_text(json.dumps(report))


def _case(model: str, backend: str, rate: float) -> str:
    return json.dumps(
        {
            "name": f"e2e[{model}-{backend}]",
            "kind": "end_to_end",
            "model": model,
            "backend": backend,
            "samples_per_s": rate,
        }
    )


def _autotune(
    folder: Path, *, chosen: int, rates: dict[int, float], elapsed: float, compile_s: float, cached: bool
) -> None:
    folder.mkdir()
    cands = [{"batch_size": b, "samples_per_s": r, "usable": True} for b, r in rates.items()]
    report = {
        "candidates": cands,
        "chosen_batch": chosen,
        "elapsed_s": elapsed,
        "compile_s": compile_s,
        "cached": cached,
    }
    (folder / "resnet50.json").write_text(json.dumps(report))


def _verdicts(folder: Path) -> dict[str, bool | None]:
    return {t.name: t.met for t in T.evaluate(folder)}


def test_targets_from_a_full_quick_stage(tmp_path):
    _bench(tmp_path, "dali", e2e=5400, ceiling=5600)  # 0.964: met
    _bench(tmp_path, "cache", e2e=5000, ceiling=5600)  # 0.893: not met
    (tmp_path / "bench-quick-naive.jsonl").write_text(_case("resnet50", "naive", 1900) + "\n" + '{"cut off')
    (tmp_path / "bench-e2e.jsonl").write_text(
        "\n".join([_case("resnet18", "naive", 2000), _case("resnet18", "dali", 13000)])
    )
    _autotune(
        tmp_path / "quick-autotune-1",
        chosen=192,
        rates={128: 3700, 192: 3900, 256: 3990},
        elapsed=95.0,
        compile_s=50.0,
        cached=False,
    )
    _autotune(tmp_path / "quick-autotune-2", chosen=192, rates={192: 3900}, elapsed=0.8, compile_s=0.0, cached=True)
    v = _verdicts(tmp_path)
    assert v["ResNet-50 end to end / model-only (dali)"] is True
    assert v["ResNet-50 end to end / model-only (cache)"] is False
    assert v["resnet50 end to end vs the naive script"] is True  # 5400 / 1900 = 2.84
    assert v["resnet18 end to end vs the naive script"] is False  # 13000 / 2000 = 6.5
    assert v["autotune's choice vs the best measured batch"] is True  # 3900 vs 3990: 2.3% below
    assert v["autotune wall time, one compile excluded"] is True  # 95 - 50 = 45 s
    assert v["autotune answered from its cache"] is True
    md = T.to_markdown(tmp_path, T.evaluate(tmp_path))
    assert (
        "| resnet18 end to end vs the naive script | >= 7x | 13,000 (dali) / 2,000 naive img/s = 6.50x | "
        "**not met** |" in md
    )


def test_what_a_cut_off_stage_did_not_measure_says_so(tmp_path):
    _bench(tmp_path, "dali", e2e=5000, ceiling=5600)
    _autotune(
        tmp_path / "quick-autotune-1",
        chosen=128,
        rates={128: 3700, 256: 3990},
        elapsed=70.0,
        compile_s=5.0,
        cached=False,
    )
    v = _verdicts(tmp_path)
    assert v["ResNet-50 end to end / model-only (cache)"] is None
    assert v["resnet50 end to end vs the naive script"] is None  # no naive figure
    assert v["autotune's choice vs the best measured batch"] is False  # 7.3% below the best
    assert v["autotune wall time, one compile excluded"] is False
    assert v["autotune answered from its cache"] is None
    assert T.main([str(tmp_path / "missing")]) == 2


def test_the_tuned_configs_epoch_is_judged_against_the_budget_autotune_tuned_it_for(tmp_path):
    # The tuned epoch runs uncapped on a larger card: an answer too large for the budget shows here, not as an OOM.
    gib = 2**30
    _autotune(tmp_path / "autotune-1", chosen=192, rates={192: 3900}, elapsed=60.0, compile_s=30.0, cached=False)
    report = json.loads((tmp_path / "autotune-1" / "resnet50.json").read_text())
    report["budget"] = {"budget_bytes": 16 * gib, "in_use_before_bytes": gib // 2, "counted_in_use": True}
    (tmp_path / "autotune-1" / "resnet50.json").write_text(json.dumps(report))
    name = "the tuned config's epoch inside autotune's memory budget"
    assert _verdicts(tmp_path)[name] is None  # no tuned epoch: not measured
    run = tmp_path / "tuned-epoch" / "resnet50-imagenet-20261203-080000"
    run.mkdir(parents=True)
    metrics = run / "metrics.jsonl"
    metrics.write_text(json.dumps({"epoch": 1, "max_memory_gib": 14.0, "max_reserved_gib": 15.4}) + "\n")
    assert _verdicts(tmp_path)[name] is True  # 15.4 + 0.5 <= 16
    metrics.write_text(json.dumps({"epoch": 1, "max_memory_gib": 14.0, "max_reserved_gib": 15.7}) + "\n")
    target = next(t for t in T.evaluate(tmp_path) if t.name == name)
    assert target.met is False and target.figure.startswith("16.20 GiB (15.70 reserved by torch + 0.50 in use")
    report["budget"]["counted_in_use"] = False  # a smaller card: what was in use is already off its budget
    (tmp_path / "autotune-1" / "resnet50.json").write_text(json.dumps(report))
    assert _verdicts(tmp_path)[name] is True
    # The loader's device memory outside torch (DALI's), which autotune charged to the budget, counts too.
    report["budget"]["outside_torch_bytes"] = gib // 2
    (tmp_path / "autotune-1" / "resnet50.json").write_text(json.dumps(report))
    target = next(t for t in T.evaluate(tmp_path) if t.name == name)
    assert target.met is False and "+ 0.50 outside torch" in target.figure
    # The quick stage's report (another budget) in the same folder: the tuned epoch is autotune-1's.
    _autotune(tmp_path / "quick-autotune-1", chosen=192, rates={192: 3900}, elapsed=60.0, compile_s=30.0, cached=False)
    quick = json.loads((tmp_path / "quick-autotune-1" / "resnet50.json").read_text())
    quick["budget"] = {"budget_bytes": 80 * gib, "in_use_before_bytes": 0, "counted_in_use": True}
    (tmp_path / "quick-autotune-1" / "resnet50.json").write_text(json.dumps(quick))
    assert _verdicts(tmp_path)[name] is False


def _speedrun(
    folder: Path, n: int, accs: list[float], times: list[float], wall: float | None, ema: list[float] | None = None
) -> None:
    run = folder / f"speedrun-{n}" / "cifar10-speedrun-20261203-080000"
    run.mkdir(parents=True)
    lines = [json.dumps({"event": "startup", "epoch": 0, "step": 0, "startup_s": 15.0, "prepare_s": 10.0})]
    lines += [json.dumps({"event": "step", "epoch": 1, "step": 10, "loss": 2.0})]
    lines += [
        json.dumps({"epoch": e, "epoch_time_s": t, "val_acc": a, "eval_time_s": 0.2, "val_ema_acc": m})
        for e, (a, t, m) in enumerate(zip(accs, times, ema or [None] * len(accs)), start=1)
    ]
    lines.append(json.dumps({"epoch": len(accs), "event": "test", "test_acc": 0.1}))
    (run / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    if wall is not None:
        (folder / f"speedrun-{n}.txt").write_text(f"progress...\nwall_s={wall} rc=0\n")


def test_the_speed_run_is_judged_on_its_last_run_with_the_first_epochs_compile_left_out(tmp_path):
    # run 1: a cold compile (30 s in epoch 1), never at 90.7%; run 2: warm, at 90.7% in its fourth epoch
    _speedrun(tmp_path, 1, [0.5, 0.8, 0.9, 0.905], [30.4, 0.5, 0.5, 0.5], 48.0)
    ema = [0.4, 0.7, 0.9, 0.908, 0.915]  # the EMA's accuracy, when higher, is the epoch's (the run's best rates it so)
    _speedrun(tmp_path, 2, [0.5, 0.8, 0.9, 0.906, 0.912], [3.0, 0.5, 0.6, 0.4, 0.5], 12.5, ema)
    runs = T.speed_runs(tmp_path)
    assert [(r.n, r.epoch_at_target) for r in runs] == [(1, None), (2, 4)]
    assert runs[1].train_s == pytest.approx(0.5 + 0.5 + 0.6 + 0.4)  # epoch 1 counted at the later epochs' median, 0.5
    assert runs[1].train_s_raw == pytest.approx(3.0 + 0.5 + 0.6 + 0.4)
    v = _verdicts(tmp_path)
    assert v["cifar10-speedrun test accuracy (last run)"] is True  # 0.915 (EMA)
    assert v["cifar10-speedrun training time to it, compile left out"] is True  # 2.0 s
    assert v["cifar10-speedrun whole run, decode included"] is True  # 12.5 s
    assert v["ResNet-50 fast recipe: the step's samples/s per training size"] is None
    md = T.to_markdown(tmp_path, T.evaluate(tmp_path))
    assert "run 1: final 0.9050, 90.7% not reached, whole run 48.0 s (start-up 10.0 s: prepare 10.0)" in md
    assert "run 2: final 0.9150, 90.7% at epoch 4 after 2.00 s of training (4.50 s with the first epoch's" in md


def test_the_third_speed_run_without_the_compile_pool_is_shown_but_not_judged(tmp_path):
    _speedrun(tmp_path, 1, [0.5, 0.905], [30.4, 0.5], 48.0)
    _speedrun(tmp_path, 2, [0.5, 0.91], [3.0, 0.5], 29.0)
    _speedrun(tmp_path, 3, [0.5, 0.80], [3.0, 0.5], 14.0)  # faster, and short of the accuracy: not the verdict
    v = _verdicts(tmp_path)
    assert v["cifar10-speedrun test accuracy (last run)"] is True  # run 2's 0.91
    assert v["cifar10-speedrun whole run, decode included"] is False  # run 2's 29 s
    md = T.to_markdown(tmp_path, T.evaluate(tmp_path))
    assert "run 3 (TORCH_WARM_POOL=0): final 0.8000, 90.7% not reached, whole run 14.0 s" in md


def test_the_recipe_sizes_from_fasttrain_bench(tmp_path):
    bench = {
        "runtime": "cuda:0 bf16 channels_last compile",
        "batch_size": 1024,
        "backend": "cache",
        "image_size": 192,
        "model_step": {"samples_per_s": 3000.0},
        "model_step_per_size": {"160": {"samples_per_s": 4200.0}},
        "end_to_end": {"samples_per_s": 2900.0},
    }
    (tmp_path / "recipe-bench.json").write_text(json.dumps(bench))
    (t,) = [x for x in T.evaluate(tmp_path) if x.name.startswith("ResNet-50 fast recipe")]
    assert t.met is True and t.figure.startswith("160 px 4,200 img/s, 192 px 3,000 img/s (model-only step")
    assert "end to end at the largest size 2,900 img/s" in t.figure
    del bench["model_step_per_size"]["160"]
    (tmp_path / "recipe-bench.json").write_text(json.dumps(bench))
    assert _verdicts(tmp_path)["ResNet-50 fast recipe: the step's samples/s per training size"] is False


def test_a_slow_or_short_speed_run_and_the_recipe_sizes(tmp_path):
    _speedrun(tmp_path, 1, [0.6, 0.91], [2.0, 2.6], None)  # at 90.7% after 2.0 + 2.6 s; no wall time written
    recipe = tmp_path / "recipe-autotune"
    recipe.mkdir()
    rates = [
        {"size": 160, "samples_per_s": 3100.0, "batch_size": 256},
        {"size": 192, "samples_per_s": 2200.0, "batch_size": 256},
    ]
    (recipe / "resnet50-imagenet-fast.json").write_text(json.dumps({"candidates": [], "size_rates": rates}))
    v = _verdicts(tmp_path)
    assert v["cifar10-speedrun test accuracy (last run)"] is True
    assert v["cifar10-speedrun training time to it, compile left out"] is False  # 2.0 (2.0 < 2.6) + 2.6 = 4.6 s
    assert v["cifar10-speedrun whole run, decode included"] is None
    assert v["ResNet-50 fast recipe: the step's samples/s per training size"] is True
    md = T.to_markdown(tmp_path, T.evaluate(tmp_path))
    assert "160 px 3,100 img/s (eager, batch 256), 192 px 2,200 img/s (eager, batch 256)" in md


def _budget_run(folder: Path, wall: float, steps: list[int], total: int) -> None:
    run = folder / "speedrun-budget" / "cifar10-speedrun-20261205-080000"
    run.mkdir(parents=True)
    (run / "config.toml").write_text(f"[train]\ntime_budget_s = 40.0\ntotal_steps = {total}\nepochs = 11\n")
    records = [{"event": "startup", "epoch": 0, "step": 0}] + [{"epoch": i + 1, "step": s} for i, s in enumerate(steps)]
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    (folder / "speedrun-budget.txt").write_text(f"...\nwall_s={wall} rc=0\n")


@pytest.mark.parametrize(
    ("quick_wall", "quick_complete", "speed_wall", "steps", "met"),
    [
        (62.4, True, 43.5, [48, 96, 100], (True, True)),
        (70.0, True, 43.5, [48, 96], (False, False)),  # 17% over; the speed run ended at step 96 of 100
        (58.0, False, 35.0, [100], (False, False)),  # the quickstart's schedule cut off; the speed run 12.5% under
    ],
)
def test_a_time_budget_is_met_within_ten_percent_with_its_schedule_complete(
    tmp_path, quick_wall, quick_complete, speed_wall, steps, met
):
    """The budget stage: the quickstart's benchmark case (its wall time against its budget, whether its run
    ended at its plan's last step) and the speed run's budgeted run (its wall time from the suite, its plan
    from config.toml, its last step from metrics.jsonl)."""
    case = {"kind": "budget", "budget_s": 60.0, "wall_s": quick_wall, "total_steps": 900, "epochs": 15}
    case |= {"last_step": 900 if quick_complete else 850, "complete": quick_complete}
    (tmp_path / "bench-budget.json").write_text(json.dumps({"benchmarks": [{"fullname": "b", "extra_info": case}]}))
    _budget_run(tmp_path, speed_wall, steps, total=100)
    v = _verdicts(tmp_path)
    assert (v["time budget: quickstart"], v["time budget: cifar10-speedrun"]) == met
    md = T.to_markdown(tmp_path, T.evaluate(tmp_path))
    assert f"{quick_wall:.1f} s of 60 s" in md and f"{speed_wall:.1f} s of 40 s" in md
    assert ("ended at step 850" in md) == (not quick_complete)


def test_an_unmeasured_time_budget_says_so(tmp_path):
    v = _verdicts(tmp_path)
    assert v["time budget: quickstart"] is None and v["time budget: cifar10-speedrun"] is None
