"""Time to accuracy on the CPU (issue 22's targets), measured in one sitting; prints the figures and a JSON line.

cifar: the seed-style script (PIL ImageFolder + DataLoader with 2 workers, fp32 eager, fasttrain's smallcnn
width 32, batch 64, AdamW lr 3e-3 with one-cycle, flips only, N epochs) against ``cifar10-speedrun`` on the same
JPEG subset: the speed run's time until its test accuracy reaches the script's final one.

imagenette: fixed 128 px training against progressive 64 -> 128 px with evaluation at 160 (same model, epochs and
schedule): the progressive run's time until its validation accuracy reaches the fixed run's final one.

Times are wall-clock: the script's whole run; a fasttrain run's set-up (file discovery, the cache's decode) plus
its training and evaluation up to the epoch that reached the target (``fasttrain bench --run --target``'s sum).
The data sets are subsets linked (not copied) from an extracted tar under /tmp; nothing is written into the repo.

    python tools/time_to_accuracy.py cifar --data /tmp/cifar10 --train-per-class 500 --test-per-class 100
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


def fasttrain_run(config: str, root: Path, runs: Path, overrides: list[str]) -> tuple[Path, float]:
    """A fasttrain run in a new folder under ``runs``: (its folder, wall seconds of the whole ``train`` call)."""
    from fasttrain import load_config, train

    cfg = load_config(config, [f"data.root={root}", f"train.runs_dir={runs}", "runtime.device=cpu", *overrides])
    t0 = time.perf_counter()
    result = train(cfg, progress=False)
    return result.run_dir, time.perf_counter() - t0


def wall_to_target(run: Path, wall: float, metric: str, target: float) -> dict:
    """When the run reached ``target``: its training + evaluation seconds up to that epoch and the wall-clock
    seconds (set-up included: the whole call less what ran after that epoch)."""
    from fasttrain.benchmark import time_to_target

    got = time_to_target(run, metric, target)
    records = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    epochs = [r for r in records if "event" not in r]
    final = epochs[-1].get(metric)
    out = {"run": str(run), "wall_s": round(wall, 1), "final": final, "reached_epoch": got.epoch}
    if got.seconds is None:
        return {**out, "train_eval_s_to_target": None, "wall_s_to_target": None}
    after = sum(float(r.get("epoch_time_s", 0)) + float(r.get("eval_time_s") or 0) for r in epochs[got.epoch :])
    return {**out, "train_eval_s_to_target": got.seconds, "wall_s_to_target": round(wall - after, 1)}


def cifar(args) -> dict:
    dest = Path(args.work) / f"cifar-{args.train_per_class}-{args.test_per_class}"
    train_dir = subset(Path(args.data), dest, "train", args.train_per_class)
    test_dir = subset(Path(args.data), dest, "test", args.test_per_class)
    if args.seed_result:  # a baseline measured earlier in the same sitting: ACC,SECONDS
        acc, seed_wall = (float(v) for v in args.seed_result.split(","))
    else:
        acc, seed_wall = seed_script(train_dir, test_dir, args.seed_epochs, args.threads)
    print(f"seed-style script: test accuracy {acc:.4f} after {args.seed_epochs} epochs in {seed_wall:.1f} s")
    overrides = [f"train.epochs={args.epochs}", f"model.width={args.width}", f"train.batch_size={args.batch}"]
    overrides += [f"data.workers={args.threads}", "train.log_every=1000", *args.set]
    run, wall = fasttrain_run("cifar10-speedrun", dest, Path(args.work) / "runs", overrides)
    # The speed run keeps an EMA: it reaches the target when the weights or their average do.
    fast = wall_to_target(run, wall, "val_acc", acc)
    has_ema = "val_ema_acc" in (run / "metrics.jsonl").read_text()
    ema = wall_to_target(run, wall, "val_ema_acc", acc) if has_ema else None
    reached = [r for r in (fast, ema) if r is not None and r["wall_s_to_target"] is not None]
    best = min(reached, key=lambda r: r["wall_s_to_target"], default=fast)
    ratio = best["wall_s_to_target"] / seed_wall if best["wall_s_to_target"] is not None else None
    print(f"cifar10-speedrun: {fast} | ema {ema}")
    print(
        f"speed run to the script's accuracy: {best['wall_s_to_target']} s = "
        f"{'not reached' if ratio is None else f'{ratio:.2f}x'} the script's time (target <= 0.4x)"
    )
    return {
        "bench": "cifar",
        "seed": {"acc": acc, "wall_s": round(seed_wall, 1)},
        "speedrun": fast,
        "speedrun_ema": ema,
        "ratio": ratio,
        "overrides": overrides,
    }


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
    fixed_run, fixed_wall = fasttrain_run("quickstart", dest, Path(args.work) / "runs", fixed_over)
    target = [json.loads(x) for x in (fixed_run / "metrics.jsonl").read_text().splitlines() if '"event"' not in x]
    target_acc = target[-1]["val_acc"]
    print(f"fixed 128 px: final val_acc {target_acc:.4f} in {fixed_wall:.1f} s ({fixed_run})")
    prog_run, prog_wall = fasttrain_run("quickstart", dest, Path(args.work) / "runs", prog_over)
    prog = wall_to_target(prog_run, prog_wall, "val_acc", target_acc)
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
    c.add_argument("--epochs", type=int, default=10, help="speed run epochs")
    c.add_argument("--width", type=int, default=32, help="speednet width (airbench: 64)")
    c.add_argument("--batch", type=int, default=256)
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
