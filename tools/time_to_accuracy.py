"""Time to accuracy on the CPU (issue 22's targets), measured in one sitting; prints the figures and a JSON line.

cifar: the seed-style script (PIL ImageFolder + DataLoader with 2 workers, fp32 eager, fasttrain's smallcnn
width 32, batch 64, AdamW lr 3e-3 with one-cycle, flips only, N epochs) against a speed-run config
(``--config``, default ``cifar10-speedrun-cpu``; ``--epochs``/``--width``/``--batch``/``--set`` override it) on the
same JPEG subset: the speed run's time until its test accuracy reaches the script's final one. ``--pairs N``
interleaves N (script, speed run) pairs, each speed run measured against the script run just before it, and
reports every ratio with the machine's load average and their median.

imagenette: fixed 128 px training against progressive 64 -> 128 px with evaluation at 160 (same model, epochs and
schedule): the progressive run's time until its validation accuracy reaches the fixed run's final one.

Times are wall-clock: the script's whole run (its one test evaluation included); a fasttrain run's from the
``train`` call to the end of the epoch that reached the target: set-up (file discovery, the cache's decode, the
whitening fit), training, every evaluation and checkpoint up to then, but not what a run does after its last epoch
(the confusion matrix, a test split's evaluation), which measures nothing the target needs.
The data sets are subsets linked (not copied) from an extracted tar under /tmp; nothing is written into the repo.

    python tools/time_to_accuracy.py cifar --data /tmp/cifar10 --train-per-class 500 --test-per-class 100 --pairs 2
    python tools/time_to_accuracy.py imagenette --data /tmp/imagenette224 --train-per-class 100 --epochs 6
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def subset(src: Path, dest: Path, split: str, per_class: int) -> Path:
    """``dest/split/<class>/`` with the first ``per_class`` files of each class of ``src/split``, as symlinks."""
    out = dest / split
    for cls in sorted(p for p in (src / split).iterdir() if p.is_dir()):
        (out / cls.name).mkdir(parents=True, exist_ok=True)
        for f in sorted(cls.iterdir())[:per_class]:
            link = out / cls.name / f.name
            if not link.exists():
                link.symlink_to(f.resolve())
    return out


def seed_script(train_dir: Path, test_dir: Path, epochs: int, threads: int) -> tuple[float, float]:
    """The hand-written baseline: (test accuracy after ``epochs``, wall seconds of the whole script)."""
    import torch
    import torch.nn.functional as F
    from torch.utils.data import DataLoader
    from torchvision import datasets, transforms

    from fasttrain.models.small import smallcnn

    t0 = time.perf_counter()
    torch.manual_seed(0)
    norm = transforms.Normalize([0.4914, 0.4822, 0.4465], [0.2470, 0.2435, 0.2616])
    train_tf = transforms.Compose([transforms.RandomHorizontalFlip(), transforms.ToTensor(), norm])
    test_tf = transforms.Compose([transforms.ToTensor(), norm])
    train = DataLoader(datasets.ImageFolder(train_dir, train_tf), batch_size=64, shuffle=True, num_workers=2)
    test = DataLoader(datasets.ImageFolder(test_dir, test_tf), batch_size=256, num_workers=2)
    model = smallcnn(in_channels=3, num_outputs=10, image_size=32, width=32)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=3e-3, total_steps=epochs * len(train))
    for _ in range(epochs):
        model.train()
        for x, y in train:
            opt.zero_grad(set_to_none=True)
            F.cross_entropy(model(x), y).backward()
            opt.step()
            sched.step()
    model.eval()
    right = n = 0
    with torch.no_grad():
        for x, y in test:
            right += int((model(x).argmax(1) == y).sum())
            n += len(y)
    return right / n, time.perf_counter() - t0


def fasttrain_run(config: str, root: Path, runs: Path, overrides: list[str]) -> tuple[Path, float, list[float]]:
    """A fasttrain run in a new folder under ``runs``: (its folder, wall seconds of the whole ``train`` call, the
    wall seconds from the call's start to the end of each epoch: its evaluation and checkpoint included)."""
    from fasttrain import load_config, train

    cfg = load_config(config, [f"data.root={root}", f"train.runs_dir={runs}", "runtime.device=cpu", *overrides])
    ends: list[float] = []
    t0 = time.perf_counter()
    result = train(cfg, progress=False, on_epoch_end=lambda state, record: ends.append(time.perf_counter() - t0))
    return result.run_dir, time.perf_counter() - t0, ends


def wall_to_target(run: Path, wall: float, ends: list[float], metric: str, target: float) -> dict:
    """When the run reached ``target``: its training + evaluation seconds up to that epoch and the wall-clock
    seconds from the ``train`` call's start to that epoch's end (set-up, the cache's decode, training, evaluation
    and checkpoints; not the reports after the last epoch: the confusion matrix, the test split's evaluation)."""
    from fasttrain.benchmark import time_to_target

    got = time_to_target(run, metric, target)
    records = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    epochs = [r for r in records if "event" not in r]
    final = next((r[metric] for r in reversed(epochs) if r.get(metric) is not None), None)
    out = {"run": str(run), "wall_s": round(wall, 1), "final": final, "reached_epoch": got.epoch}
    if got.seconds is None or got.epoch is None:
        return {**out, "train_eval_s_to_target": None, "wall_s_to_target": None}
    return {**out, "train_eval_s_to_target": got.seconds, "wall_s_to_target": round(ends[got.epoch - 1], 1)}


def speedrun_pair(args, dest: Path, train_dir: Path, test_dir: Path) -> dict:
    """One seed-script run, then one speed run: the speed run's wall seconds to the script's accuracy over the
    script's wall seconds."""
    if args.seed_result:  # a baseline measured earlier in the same sitting: ACC,SECONDS
        acc, seed_wall = (float(v) for v in args.seed_result.split(","))
    else:
        acc, seed_wall = seed_script(train_dir, test_dir, args.seed_epochs, args.threads)
    print(f"seed-style script: test accuracy {acc:.4f} after {args.seed_epochs} epochs in {seed_wall:.1f} s")
    overrides = [f"data.workers={args.threads}", "train.log_every=1000"]
    for key, value in (("train.epochs", args.epochs), ("model.width", args.width), ("train.batch_size", args.batch)):
        if value is not None:
            overrides.append(f"{key}={value}")
    overrides += args.set
    run, wall, ends = fasttrain_run(args.config, dest, Path(args.work) / "runs", overrides)
    # With an EMA the speed run reaches the target when the weights or their average do.
    fast = wall_to_target(run, wall, ends, "val_acc", acc)
    has_ema = "val_ema_acc" in (run / "metrics.jsonl").read_text()
    ema = wall_to_target(run, wall, ends, "val_ema_acc", acc) if has_ema else None
    reached = [r for r in (fast, ema) if r is not None and r["wall_s_to_target"] is not None]
    best = min(reached, key=lambda r: r["wall_s_to_target"], default=fast)
    ratio = best["wall_s_to_target"] / seed_wall if best["wall_s_to_target"] is not None else None
    print(f"{args.config}: {fast} | ema {ema}")
    print(
        f"speed run to the script's accuracy: {best['wall_s_to_target']} s = "
        f"{'not reached' if ratio is None else f'{ratio:.2f}x'} the script's time (target <= 0.4x)"
        f" | load average {os.getloadavg()[0]:.1f}"
    )
    return {
        "seed": {"acc": acc, "wall_s": round(seed_wall, 1)},
        "speedrun": fast,
        "speedrun_ema": ema,
        "ratio": ratio,
        "overrides": overrides,
        "load_avg_1m": round(os.getloadavg()[0], 2),
    }


def cifar(args) -> dict:
    dest = Path(args.work) / f"cifar-{args.train_per_class}-{args.test_per_class}"
    train_dir = subset(Path(args.data), dest, "train", args.train_per_class)
    test_dir = subset(Path(args.data), dest, "test", args.test_per_class)
    pairs = [speedrun_pair(args, dest, train_dir, test_dir) for _ in range(args.pairs)]
    ratios = sorted(p["ratio"] for p in pairs if p["ratio"] is not None)
    median = ratios[len(ratios) // 2] if len(ratios) == len(pairs) else None  # a pair not reached: no median
    print(f"ratios, interleaved pairs: {[p['ratio'] for p in pairs]}; median {median}")
    return {"bench": "cifar", "config": args.config, "pairs": pairs, "median_ratio": median}


def imagenette(args) -> dict:
    dest = Path(args.work) / f"imagenette-{args.train_per_class}-{args.val_per_class}"
    subset(Path(args.data), dest, "train", args.train_per_class)
    subset(Path(args.data), dest, "val", args.val_per_class)
    common = [
        f"model.name={args.model}",
        f"model.width={args.width}",
        f"train.epochs={args.epochs}",
        f"train.batch_size={args.batch}",
        "optim.name=sgd",
        f"optim.lr={args.lr}",
        "schedule.name=linear",
        "schedule.warmup_epochs=1",
        "train.label_smoothing=0.1",
        "optim.weight_decay=5e-4",
        "data.resize_size=0",
        "data.random_resized_crop=true",
        "data.crop_scale_min=0.35",
        f"data.loader={args.loader}",
        f"data.workers={args.threads}",
        f"data.dali_threads={args.threads}",
        "train.log_every=1000",
        *args.set,
    ]
    fixed_over = [*common, "data.image_size=128"]
    prog_over = [*common, "data.image_size=128", "data.progressive=[64, 128]", "data.eval_size=160"]
    fixed_run, _, fixed_ends = fasttrain_run("quickstart", dest, Path(args.work) / "runs", fixed_over)
    fixed_wall = fixed_ends[-1]  # to its last epoch's end, as the progressive run's time is taken
    target = [json.loads(x) for x in (fixed_run / "metrics.jsonl").read_text().splitlines() if '"event"' not in x]
    target_acc = target[-1]["val_acc"]
    print(f"fixed 128 px: final val_acc {target_acc:.4f} in {fixed_wall:.1f} s ({fixed_run})")
    prog_run, prog_wall, prog_ends = fasttrain_run("quickstart", dest, Path(args.work) / "runs", prog_over)
    prog = wall_to_target(prog_run, prog_wall, prog_ends, "val_acc", target_acc)
    ratio = prog["wall_s_to_target"] / fixed_wall if prog["wall_s_to_target"] is not None else None
    print(f"progressive 64 -> 128, eval 160: {prog}")
    print(
        f"progressive to the fixed run's accuracy: {'not reached' if ratio is None else f'{ratio:.2f}x'} its "
        f"time (target <= 0.75x)"
    )
    return {
        "bench": "imagenette",
        "fixed": {"acc": target_acc, "wall_s": round(fixed_wall, 1), "run": str(fixed_run)},
        "progressive": prog,
        "ratio": ratio,
        "common": common,
    }


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="what", required=True)
    c = sub.add_parser("cifar")
    c.add_argument("--data", required=True, help="extracted cifar10.tar (train/, test/)")
    c.add_argument("--train-per-class", type=int, default=500)
    c.add_argument("--test-per-class", type=int, default=100)
    c.add_argument("--seed-epochs", type=int, default=4)
    c.add_argument("--config", default="cifar10-speedrun-cpu", help="the speed run's config (name or path)")
    c.add_argument("--epochs", type=int, help="speed run epochs (default: the config's)")
    c.add_argument("--width", type=int, help="speednet width (default: the config's)")
    c.add_argument("--batch", type=int, help="speed run batch size (default: the config's)")
    c.add_argument("--pairs", type=int, default=1, help="interleaved (script, speed run) pairs in one sitting")
    c.add_argument("--seed-result", metavar="ACC,SECONDS", help="reuse the script's figures from an earlier run")
    i = sub.add_parser("imagenette")
    i.add_argument("--data", required=True, help="extracted imagenette224.tar (train/, val/)")
    i.add_argument("--train-per-class", type=int, default=100)
    i.add_argument("--val-per-class", type=int, default=50)
    i.add_argument("--epochs", type=int, default=6)
    i.add_argument("--model", default="smallcnn")
    i.add_argument("--width", type=int, default=16)
    i.add_argument("--batch", type=int, default=64)
    i.add_argument("--lr", type=float, default=0.2)
    i.add_argument("--loader", default="dali")
    for q in (c, i):
        q.add_argument("--work", default="/tmp/fasttrain-tta", help="subsets and runs go here")
        q.add_argument("--threads", type=int, default=2)
        q.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="more fasttrain overrides")
    args = p.parse_args()
    os.makedirs(args.work, exist_ok=True)
    out = cifar(args) if args.what == "cifar" else imagenette(args)
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
