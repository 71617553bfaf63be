"""Check autotune's CPU targets on the quickstart, in one run, as a user would call the commands:

1. ``fasttrain train -q`` (the quickstart's own training time) and ``fasttrain autotune quickstart --no-cache``,
   alternated ``--pairs`` times (a shared machine's load changes within minutes): autotune takes at most 0.5x
   the training's wall time (medians; the per-pair ratios and the load average are printed too);
2. the tuned config proposes no gradient accumulation;
3. ``fasttrain bench`` on the original and on the tuned config, alternated (original, tuned, original, tuned,
   ...) so a change of the machine's load hits both alike: the tuned config's end-to-end samples/s is at least
   0.95x the original's (the median of the per-round ratios). When the tuned config trains exactly as the
   original (same batch, accumulation and loader settings; only ``data.loader`` pinned to what ``auto`` picked;
   or a short job not tuned, or the CPU time cap spent with the config's own batch standing: the config as it
   is) the target holds by construction, and the rounds show the machine's own noise: the script says so.

``python3 tools/autotune_cpu_target.py [--pairs 3] [--rounds 3] [--out DIR]``; prints the figures, writes
``targets.json`` into the output folder and exits 1 when a target is missed. Run it from the repository root
(``python3 -m fasttrain`` then imports this checkout). Timings depend on the machine and its load: say which
machine gave the figures.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def run(cmd: list[str], log: Path) -> float:
    """Run ``python3 -m fasttrain ...``; returns its wall time; raises with the log's tail when it fails."""
    t0 = time.perf_counter()
    with open(log, "w", encoding="utf-8") as f:
        proc = subprocess.run([sys.executable, "-m", "fasttrain", *cmd], stdout=f, stderr=subprocess.STDOUT)
    wall = time.perf_counter() - t0
    if proc.returncode not in (0, 1):  # autotune exits 1 when its answer is not ok: reported, not fatal here
        tail = log.read_text(encoding="utf-8")[-2000:]
        raise RuntimeError(f"fasttrain {' '.join(cmd)} failed ({proc.returncode}):\n{tail}")
    return wall


def e2e(report: Path) -> float:
    return float(json.loads(report.read_text(encoding="utf-8"))["end_to_end"]["samples_per_s"])


def _same_training(report: dict) -> bool:
    """The tuned config changes nothing training does: same global batch and accumulation, and either no loader
    measured (not tuned, or the CPU time cap spent: the config's own loader setting as it is) or the backend
    ``auto`` chose with the config's own loader setting."""
    plan, loader = report.get("plan") or {}, report.get("loader") or {}
    if plan and not loader and report.get("shortcut") in ("too-short", "cap-spent", "unconfirmed"):
        return plan.get("global_batch") == plan.get("requested_global") and plan.get("accumulation") == plan.get(
            "requested_accumulation"
        )
    trials = loader.get("trials") or []
    kept_given = any(
        t.get("given") and {**t.get("setting", {}), "loader": loader.get("backend")} == loader.get("setting")
        for t in trials
    )
    return (
        bool(plan)
        and plan.get("global_batch") == plan.get("requested_global")
        and plan.get("accumulation") == plan.get("requested_accumulation")
        and kept_given
    )


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--pairs", type=int, default=3, help="(train, autotune) pairs, alternated (default 3)")
    p.add_argument("--rounds", type=int, default=3, help="bench rounds per config, alternated (default 3)")
    p.add_argument("--out", type=Path, default=None, help="folder for logs and results (default: a temp folder)")
    args = p.parse_args(argv)
    out = args.out or Path(tempfile.mkdtemp(prefix="autotune-cpu-target-"))
    out.mkdir(parents=True, exist_ok=True)
    runs = out / "runs"
    common = ["--set", f"train.runs_dir={runs}"]

    trains, tunes, loads = [], [], []
    for i in range(args.pairs):
        loads.append(os.getloadavg()[0] if hasattr(os, "getloadavg") else None)
        trains.append(run(["train", "-q", *common], out / f"train-{i}.log"))
        tune_out = out / f"autotune-{i}"
        tunes.append(
            run(["autotune", "quickstart", *common, "--no-cache", "--out", str(tune_out)], out / f"autotune-{i}.log")
        )
        print(
            f"pair {i}: training {trains[-1]:.1f} s, autotune {tunes[-1]:.1f} s ({tunes[-1] / trains[-1]:.2f}x), "
            f"load average {loads[-1]}",
            flush=True,
        )
    train_s, tune_s = statistics.median(trains), statistics.median(tunes)
    report = json.loads((tune_out / "autotune.json").read_text(encoding="utf-8"))
    tuned = tune_out / "quickstart.tuned.toml"  # the last pair's
    accumulation = report["plan"]["accumulation"] if report.get("plan") else None

    original, tuned_sps = [], []
    if tuned.is_file():
        for i in range(args.rounds):
            for name, cfg, into in (("original", "quickstart", original), ("tuned", str(tuned), tuned_sps)):
                js = out / f"bench-{name}-{i}.json"
                run(["bench", cfg, *common, "--json", str(js), "-q"], out / f"bench-{name}-{i}.log")
                into.append(e2e(js))

    pairs = [t / o for o, t in zip(original, tuned_sps) if o]
    ratio = statistics.median(pairs) if pairs else None
    same = _same_training(report)
    targets = {
        "autotune_wall_s": [round(x, 1) for x in tunes],
        "train_wall_s": [round(x, 1) for x in trains],
        "load_avg_before_pair": loads,
        "autotune_over_train": round(tune_s / train_s, 2),
        "within_half_training": tune_s <= 0.5 * train_s,
        "accumulation": accumulation,
        "no_accumulation": accumulation == 1,
        "autotune_ok": report.get("ok"),
        "shortcut": report.get("shortcut"),
        "chosen_batch": report.get("chosen_batch"),
        "given_batch": report.get("given_batch"),
        "reliable": report.get("reliable"),
        "original_e2e": original,
        "tuned_e2e": tuned_sps,
        "tuned_over_original_per_round": [round(x, 3) for x in pairs],
        "tuned_over_original": round(ratio, 3) if ratio is not None else None,
        "original_spread": (
            round((max(original) - min(original)) / statistics.median(original), 3) if original else None
        ),
        "tuned_trains_as_the_original": same,
        "tuned_at_least_0.95x": same or (ratio is not None and ratio >= 0.95),
        "cpu_count": os.cpu_count(),
        "load_avg": os.getloadavg() if hasattr(os, "getloadavg") else None,
    }
    (out / "targets.json").write_text(json.dumps(targets, indent=2) + "\n", encoding="utf-8")
    print(
        f"medians: training {train_s:.1f} s, autotune {tune_s:.1f} s ({tune_s / train_s:.2f}x; target <= 0.5x): "
        f"{'met' if targets['within_half_training'] else 'MISSED'}"
    )
    print(
        f"accumulation {accumulation} (target 1): {'met' if targets['no_accumulation'] else 'MISSED'}; "
        f"chosen batch {report.get('chosen_batch')} (the config's own {report.get('given_batch')}), "
        f"ok {report.get('ok')}, reliable {report.get('reliable')}, shortcut {report.get('shortcut') or 'none'}"
    )
    if ratio is not None:
        print(
            f"end to end: tuned {statistics.median(tuned_sps):,.1f} vs original {statistics.median(original):,.1f} "
            f"samples/s (medians), per-round ratio median {ratio:.3f}x (target >= 0.95): "
            f"{'met' if targets['tuned_at_least_0.95x'] else 'MISSED'}"
        )
        print(
            f"  original per round {[round(x) for x in original]}, tuned {[round(x) for x in tuned_sps]}: the "
            f"original alone spreads {targets['original_spread']:.0%} (the machine's noise)"
        )
        if same:
            print(
                "  the tuned config trains exactly as the original (same batch, accumulation and loader settings): "
                "any difference above is noise"
            )
    else:
        print("end to end: no tuned config was written (see autotune.log)")
    print(f"details: {out}")
    met = targets["within_half_training"] and targets["no_accumulation"] and targets["tuned_at_least_0.95x"]
    return 0 if met else 1


if __name__ == "__main__":
    raise SystemExit(main())
