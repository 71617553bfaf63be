#!/usr/bin/env python3
"""The GPU targets, each met or not with its figure, from what ``tools/gpu_suite.sh`` wrote into a folder.

    python tools/gpu_targets.py SUITE_OUT_DIR [-o targets.md]

Reads whatever is there (a stage cut off by a time limit leaves some files out; its targets say "not measured"):
- ``quick-bench-{dali,cache}.json``: ``fasttrain bench`` reports (model-only ceiling, loader alone, end to end);
- ``bench-*.jsonl`` / ``bench-*.json``: benchmark cases (the naive script's end to end, ResNet-18 end to end);
- ``quick-autotune-{1,2}/*.json`` or ``autotune-{1,2}/*.json``: autotune reports (first answer, cached answer);
- ``tuned-epoch/<run>/metrics.jsonl``: one epoch of autotune's tuned config (its peak reserved memory).

- ``speedrun-{1,2,3}.txt`` and ``speedrun-{1,2,3}/<run>/metrics.jsonl``: ``cifar10-speedrun`` runs (their wall time,
  their epochs; run 3 without the compile-worker pool started ahead, shown beside them, not judged);
- ``recipe-bench.json``: ``fasttrain bench resnet50-imagenet-fast`` (the compiled step's samples/s at each training
  size; an older suite's ``recipe-autotune/*.json``: autotune's eager figures);
- ``bench-budget.json`` (the quickstart's time-budget benchmark), ``speedrun-budget.txt`` and
  ``speedrun-budget/<run>/``: ``cifar10-speedrun --time-budget``.

Targets: end to end >= 0.95 of the model-only ceiling for ResNet-50 (bf16, channels_last, compiled) from JPEG
files; >= 2.8x (ResNet-50) and >= 7x (ResNet-18) the naive script's end-to-end samples/s; autotune's choice
within 3% of the best measured batch, under 60 s plus one compile, a cached answer under 2 s, and its tuned
config's epoch inside the budget it was tuned for (peak reserved plus what was in use before, as autotune counts
it; the epoch itself runs uncapped, so an answer too large shows here rather than as an OOM). Issue 22:
``cifar10-speedrun`` >= 90.7% test accuracy in <= 2.5 s of training (compiling and data loading left out, as
airbench counts), the whole run (start-up and decode included) <= 15 s, judged on the last run (the compile
caches warm); the ResNet-50 fast recipe's samples/s at each training size; a time budget's run within +-10% of
it, its schedule complete (its last step the plan's last).
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

CEILING_SHARE = 0.95
SPEEDUP = {"resnet50": 2.8, "resnet18": 7.0}
AUTOTUNE_WITHIN = 0.03
AUTOTUNE_SECONDS = 60.0
CACHED_SECONDS = 2.0
SPEEDRUN_ACC = 0.907
SPEEDRUN_TRAIN_S = 2.5
SPEEDRUN_WALL_S = 15.0
BUDGET_WITHIN = 0.10


@dataclass
class Target:
    name: str
    goal: str
    figure: str = "not measured"
    met: bool | None = None
    """None: not measured."""

    def row(self) -> str:
        verdict = {True: "met", False: "**not met**", None: "not measured"}[self.met]
        return f"| {self.name} | {self.goal} | {self.figure} | {verdict} |"


def _load(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def _records(path: Path) -> list[Any]:
    """The JSON lines of ``path``, a line cut off mid-write (a stage stopped by its time limit) left out."""
    out = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            out.append(json.loads(line))
        except ValueError:
            continue
    return out


def bench_cases(folder: Path) -> list[dict[str, Any]]:
    """Every benchmark case's extra_info: from the JSON lines written as cases finish, else the final JSON."""
    cases: list[dict[str, Any]] = []
    for jsonl in sorted(folder.glob("bench-*.jsonl")):
        cases += _records(jsonl)
    for js in sorted(folder.glob("bench-*.json")):
        if js.with_suffix(".jsonl").exists():
            continue
        data = _load(js) or {}
        cases += [{"name": b.get("fullname"), **b.get("extra_info", {})} for b in data.get("benchmarks", [])]
    return cases


def _e2e(cases: list[dict[str, Any]], model: str, backend: str) -> float | None:
    rates = [
        c["samples_per_s"]
        for c in cases
        if c.get("kind") == "end_to_end"
        and c.get("model") == model
        and c.get("backend") == backend
        and c.get("samples_per_s")
    ]
    return max(rates) if rates else None


def _autotune_report(folder: Path) -> dict[str, Any] | None:
    for js in sorted(folder.glob("*.json")):
        data = _load(js)
        if isinstance(data, dict) and "candidates" in data:
            return data
    return None


WITHOUT_POOL = 3
"""The suite's third speed run: warm, with inductor's compile-worker pool not started ahead (TORCH_WARM_POOL=0)."""


@dataclass
class SpeedRun:
    """One ``cifar10-speedrun`` run, from its metrics.jsonl and the suite's wall time."""

    n: int
    final_acc: float
    epoch_at_target: int | None
    train_s: float | None
    """Training seconds up to the first epoch at the target, the first epoch counted at the median of the later
    ones (its compile left out, as airbench leaves it out); evaluation and start-up are not in it."""
    train_s_raw: float | None
    wall_s: float | None
    startup: dict[str, float] | None = None
    """The run's ``startup`` event: its phases' seconds (imports, index, device, prepare, loaders, model, open)."""

    def line(self) -> str:
        where = (
            f"{SPEEDRUN_ACC:.1%} at epoch {self.epoch_at_target} after {self.train_s:.2f} s of training "
            f"({self.train_s_raw:.2f} s with the first epoch's compile)"
            if self.train_s is not None and self.train_s_raw is not None
            else f"{SPEEDRUN_ACC:.1%} not reached"
        )
        wall = f"{self.wall_s:.1f} s" if self.wall_s is not None else "?"
        start = ""
        if self.startup:
            parts = ", ".join(f"{k.removesuffix('_s')} {v:.1f}" for k, v in self.startup.items())
            start = f" (start-up {sum(self.startup.values()):.1f} s: {parts})"
        pool = " (TORCH_WARM_POOL=0)" if self.n == WITHOUT_POOL else ""
        return f"run {self.n}{pool}: final {self.final_acc:.4f}, {where}, whole run {wall}{start}"


def speed_runs(folder: Path) -> list[SpeedRun]:
    runs = []
    for n in (1, 2, 3):
        found = sorted((folder / f"speedrun-{n}").glob("*/metrics.jsonl"))
        if not found:
            continue
        records = _records(found[-1])
        epochs = [r for r in records if "event" not in r and r.get("epoch_time_s") is not None and "val_acc" in r]
        starts = [r for r in records if r.get("event") == "startup"]
        startup = (
            {k: float(v) for k, v in starts[0].items() if k.endswith("_s") and k != "startup_s"} if starts else None
        )
        if not epochs:
            continue
        times = [float(r["epoch_time_s"]) for r in epochs]
        later = sorted(times[1:])
        first = later[len(later) // 2] if later else times[0]
        accs = [_acc(r) for r in epochs]
        hit = next((i for i, a in enumerate(accs) if a >= SPEEDRUN_ACC), None)
        wall = None
        for line in reversed(_text(folder / f"speedrun-{n}.txt").splitlines()):
            if line.startswith("wall_s="):
                wall = float(line.split()[0].removeprefix("wall_s="))
                break
        train = raw = None
        if hit is not None:
            raw = sum(times[: hit + 1])
            train = raw - times[0] + min(first, times[0])
        runs.append(SpeedRun(n, accs[-1], hit + 1 if hit is not None else None, train, raw, wall, startup))
    return runs


def _acc(epoch: dict[str, Any]) -> float:
    """An epoch's test accuracy: its raw weights' or its EMA's, whichever is higher (as the run rates its best)."""
    return max(float(epoch["val_acc"]), float(epoch.get("val_ema_acc") or 0.0))


def _text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return ""


def speedrun_targets(folder: Path) -> list[Target]:
    t_acc = Target("cifar10-speedrun test accuracy (last run)", f">= {SPEEDRUN_ACC:.1%}")
    t_train = Target("cifar10-speedrun training time to it, compile left out", f"<= {SPEEDRUN_TRAIN_S:g} s")
    t_wall = Target("cifar10-speedrun whole run, decode included", f"<= {SPEEDRUN_WALL_S:g} s")
    runs = speed_runs(folder)
    judged = [r for r in runs if r.n != WITHOUT_POOL]  # run 3 is a comparison, not fasttrain's own setting
    if judged:
        last, figure = judged[-1], "; ".join(r.line() for r in runs)
        t_acc.figure = t_train.figure = t_wall.figure = figure
        t_acc.met = last.final_acc >= SPEEDRUN_ACC
        t_train.met = last.train_s is not None and last.train_s <= SPEEDRUN_TRAIN_S
        if last.wall_s is not None:
            t_wall.met = last.wall_s <= SPEEDRUN_WALL_S
    return [t_acc, t_train, t_wall, recipe_target(folder)]


def recipe_target(folder: Path) -> Target:
    """The fast recipe's training step at each progressive size: ``fasttrain bench``'s compiled model-only step
    (``recipe-bench.json``), else an older suite's autotune figures (eager, at the batch its search reached)."""
    t = Target("ResNet-50 fast recipe: the step's samples/s per training size", "each size measured")
    bench = _load(folder / "recipe-bench.json")
    if isinstance(bench, dict) and bench.get("model_step"):
        rates = {int(k): v["samples_per_s"] for k, v in (bench.get("model_step_per_size") or {}).items()}
        rates[int(bench.get("image_size") or 0)] = bench["model_step"]["samples_per_s"]
        end = (bench.get("end_to_end") or {}).get("samples_per_s")
        t.figure = (
            ", ".join(f"{size} px {rate:,.0f} img/s" for size, rate in sorted(rates.items()))
            + f" (model-only step, {bench.get('runtime', '')}, batch {bench.get('batch_size')}"
            + (f"; end to end at the largest size {end:,.0f} img/s, loader {bench.get('backend')})" if end else ")")
        )
        t.met = len([s for s in rates if s]) >= 2
        return t
    report = _autotune_report(folder / "recipe-autotune")
    rates_list = (report or {}).get("size_rates") or []
    if rates_list:
        t.figure = ", ".join(
            f"{r['size']} px {r['samples_per_s']:,.0f} img/s (eager, batch {r['batch_size']})" for r in rates_list
        )
        t.met = len({r["size"] for r in rates_list}) >= 2
    return t


def budget_targets(folder: Path, cases: list[dict[str, Any]]) -> list[Target]:
    """Issue 22's time budget on the GPU: the quickstart (benchmarks/test_time_budget.py's case: its wall time,
    and whether the run ended at its plan's last step) and ``cifar10-speedrun --time-budget``
    (``speedrun-budget``)."""
    goal = f"wall within +-{BUDGET_WITHIN:.0%}, schedule complete"
    t_quick = Target("time budget: quickstart", goal)
    case = next((c for c in cases if c.get("kind") == "budget" and c.get("wall_s") is not None), None)
    if case:
        ratio = case["wall_s"] / case["budget_s"]
        complete = case.get("complete", True)  # recorded since 2026-12-04; before, only a complete run wrote one
        t_quick.figure = (
            f"{case['wall_s']:.1f} s of {case['budget_s']:g} s ({ratio:.2f}), {case.get('total_steps')} steps "
            f"in {case.get('epochs')} epochs" + ("" if complete else f", ended at step {case.get('last_step')}")
        )
        t_quick.met = abs(ratio - 1.0) <= BUDGET_WITHIN and bool(complete)
    t_speed = Target("time budget: cifar10-speedrun", goal)
    text = _text(folder / "speedrun-budget.txt")
    wall = next(
        (float(x.split()[0].removeprefix("wall_s=")) for x in text.splitlines() if x.startswith("wall_s=")), None
    )
    runs = sorted((folder / "speedrun-budget").glob("*/config.toml"))
    if wall is not None and runs:
        import tomllib

        planned = tomllib.loads(runs[-1].read_text(encoding="utf-8"))["train"]
        budget, total = float(planned["time_budget_s"]), int(planned["total_steps"])
        steps = [r["step"] for r in _records(runs[-1].parent / "metrics.jsonl") if "event" not in r]
        complete = bool(steps) and steps[-1] == total
        t_speed.figure = (
            f"{wall:.1f} s of {budget:g} s ({wall / budget:.2f}), {total} steps planned, "
            f"{'ended at the last' if complete else f'ended at step {steps[-1] if steps else 0}'}"
        )
        t_speed.met = abs(wall / budget - 1.0) <= BUDGET_WITHIN and complete
    return [t_quick, t_speed]


def evaluate(folder: Path) -> list[Target]:
    targets = []
    cases = bench_cases(folder)
    bench = {b: _load(folder / f"quick-bench-{b}.json") for b in ("dali", "cache")}

    for backend, report in bench.items():
        t = Target(f"ResNet-50 end to end / model-only ({backend})", f">= {CEILING_SHARE:.2f}")
        if report:
            e2e, ceiling = report["end_to_end"]["samples_per_s"], report["model_step"]["samples_per_s"]
            share = e2e / ceiling if ceiling else 0.0
            t.figure = f"{e2e:,.0f} / {ceiling:,.0f} img/s = {share:.3f} ({report.get('runtime', '')})"
            t.met = share >= CEILING_SHARE
        targets.append(t)

    for model, goal in SPEEDUP.items():
        t = Target(f"{model} end to end vs the naive script", f">= {goal:g}x")
        naive = _e2e(cases, model, "naive")
        ours = {b: _e2e(cases, model, b) for b in ("dali", "cache", "torch")}
        report = bench.get("dali") if model == "resnet50" else None
        if report and report.get("model") == model:
            ours["dali"] = max(ours["dali"] or 0.0, report["end_to_end"]["samples_per_s"])
        best = max(((v, b) for b, v in ours.items() if v), default=None)
        if naive and best:
            ratio = best[0] / naive
            t.figure = f"{best[0]:,.0f} ({best[1]}) / {naive:,.0f} naive img/s = {ratio:.2f}x"
            t.met = ratio >= goal
        targets.append(t)

    first = _autotune_report(folder / "quick-autotune-1") or _autotune_report(folder / "autotune-1")
    again = _autotune_report(folder / "quick-autotune-2") or _autotune_report(folder / "autotune-2")
    t_best = Target("autotune's choice vs the best measured batch", f"within {AUTOTUNE_WITHIN:.0%}")
    t_time = Target("autotune wall time, one compile excluded", f"< {AUTOTUNE_SECONDS:g} s")
    t_cache = Target("autotune answered from its cache", f"< {CACHED_SECONDS:g} s")
    if first:
        fits = [c for c in first.get("candidates", []) if c.get("usable") and c.get("samples_per_s")]
        chosen = next((c for c in fits if c.get("batch_size") == first.get("chosen_batch")), None)
        if fits and chosen:
            best = max(fits, key=lambda c: c["samples_per_s"])
            gap = 1.0 - chosen["samples_per_s"] / best["samples_per_s"]
            t_best.figure = (
                f"batch {chosen['batch_size']}: {chosen['samples_per_s']:,.0f} img/s, best batch "
                f"{best['batch_size']}: {best['samples_per_s']:,.0f} ({gap:.1%} below)"
            )
            t_best.met = gap <= AUTOTUNE_WITHIN
        elapsed, compile_s = first.get("elapsed_s"), first.get("compile_s") or 0.0
        if elapsed is not None:
            t_time.figure = f"{elapsed:.1f} s in all, {compile_s:.1f} s of it compiling"
            t_time.met = elapsed - compile_s < AUTOTUNE_SECONDS
    if again and again.get("elapsed_s") is not None:
        t_cache.figure = f"{again['elapsed_s']:.2f} s (cached: {again.get('cached')})"
        t_cache.met = bool(again.get("cached")) and again["elapsed_s"] < CACHED_SECONDS
    # The tuned epoch trains autotune-1's tuned config (gpu_suite.sh): judged against that report's budget, not
    # quick-autotune-1's when both stages wrote into the folder.
    targets += [t_best, t_time, t_cache, _tuned_epoch_target(folder, _autotune_report(folder / "autotune-1"))]
    return targets + speedrun_targets(folder) + budget_targets(folder, cases)


def _tuned_epoch_target(folder: Path, report: dict[str, Any] | None) -> Target:
    """The tuned config's epoch (``tuned-epoch/``) against the memory budget autotune tuned it for."""
    t = Target("the tuned config's epoch inside autotune's memory budget", "peak <= budget")
    budget = (report or {}).get("budget") or {}
    limit = budget.get("budget_bytes")
    peaks = [
        e["max_reserved_gib"]
        for run in sorted((folder / "tuned-epoch").glob("*/metrics.jsonl"))
        for e in _records(run)
        if isinstance(e, dict) and isinstance(e.get("max_reserved_gib"), (int, float))
    ]
    if not limit or not peaks:
        return t
    gib = 2**30
    before = (budget.get("in_use_before_bytes") or 0) if budget.get("counted_in_use") else 0
    outside = budget.get("outside_torch_bytes") or 0  # the loader's (DALI's) device memory, charged by autotune too
    used = max(peaks) * gib + before + outside
    t.figure = (
        f"{used / gib:.2f} GiB ({max(peaks):.2f} reserved by torch + {before / gib:.2f} in use before"
        + (f" + {outside / gib:.2f} outside torch" if outside else "")
        + f") of {limit / gib:.2f} GiB"
    )
    t.met = used <= limit
    return t


def to_markdown(folder: Path, targets: list[Target]) -> str:
    env = _load(folder / "environment.json") or {}
    head = (
        f"GPU targets: {env.get('gpu', '?')}, driver {env.get('driver', '?')}, torch {env.get('torch', '?')}, "
        f"CUDA {env.get('cuda', '?')}, DALI {env.get('dali', '?')}"
    )
    lines = [f"# {head}", "", "| target | goal | figure | verdict |", "|---|---|---|---|"]
    lines += [t.row() for t in targets]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("folder", type=Path, help="the folder tools/gpu_suite.sh wrote")
    p.add_argument("-o", "--output", type=Path, help="also write the Markdown here")
    args = p.parse_args(argv)
    if not args.folder.is_dir():
        print(f"gpu_targets: {args.folder} is not a folder", file=sys.stderr)
        return 2
    text = to_markdown(args.folder, evaluate(args.folder))
    print(text, end="")
    if args.output:
        args.output.write_text(text, encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
