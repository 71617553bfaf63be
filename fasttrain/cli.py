"""fasttrain: train PyTorch image models as fast as the GPU allows.

Give it a folder of images and a config (or nothing: the quickstart trains on demo data it writes itself). It
decodes JPEGs on the GPU (DALI) or keeps a small dataset decoded there, runs AMP, channels_last and
torch.compile, finds the batch size that is fastest inside your GPU's memory, and writes each run to its own
folder (config, metrics, checkpoints, log), from which it resumes.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import errno
import json
import logging
import os
import re
import sys
import warnings
from collections.abc import Callable
from pathlib import Path

from fasttrain import __version__
from fasttrain.config import Config, ConfigError, load_config, local_data_root

log = logging.getLogger("fasttrain")

EPILOG = """examples:
  fasttrain train                                   the quickstart (demo data, a minute on a CPU)
  fasttrain train catfish --set data.root=photos     a packaged config on your folder of images
  fasttrain config show catfish                      every setting with its value, default and meaning
  fasttrain autotune my.toml                         the fastest batch size inside 16 GiB of GPU memory
  fasttrain lr-find my.toml                          a learning-rate range test: loss against lr, a suggestion
  fasttrain train --resume runs/catfish-20261125-101500
  fasttrain plot runs/catfish-*                      loss, accuracy, lr and speed curves
  fasttrain predict runs/catfish-20261125-101500 cat.jpg

'fasttrain COMMAND --help' describes each command."""


def resolve_config(arg: str | None, overrides: list[str]) -> Config:
    """A config file or packaged name (None: the quickstart), with ``--set`` overrides."""
    return load_config(arg or "quickstart", overrides)


def _setup_logging(verbosity: int) -> None:
    """The console shows WARNING (-q), INFO or DEBUG (-v); the package logger passes INFO on whatever the
    console shows, so a run's train.log holds its INFO lines under -q too."""
    from fasttrain.metrics import console_handler

    level = {-1: logging.WARNING, 0: logging.INFO}.get(verbosity, logging.DEBUG)
    log.handlers[:] = [console_handler(level, bar_on_terminal=verbosity >= 0)]
    log.setLevel(min(level, logging.INFO))


def _add_verbosity(p: argparse.ArgumentParser) -> None:
    g = p.add_mutually_exclusive_group()
    g.add_argument("-q", "--quiet", action="store_true", help="warnings and results only, no progress bars")
    g.add_argument("-v", "--verbose", action="store_true", help="debug logging")


def _add_common(p: argparse.ArgumentParser, example: str) -> None:
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="SECTION.KEY=VALUE",
        help=f"override a config value (repeatable), e.g. --set {example}; 'fasttrain config show' lists every key",
    )
    _add_verbosity(p)


def cmd_train(args: argparse.Namespace) -> int:
    if args.nproc > 1:
        if not args.resume:  # a config error said once, here, not by every worker after torchrun's start
            resolve_config(args.config, args.overrides)
        return _torchrun(args.nproc, sys.argv[1:] if args.argv is None else args.argv)
    if args.time_budget:  # seconds (_duration)
        args.overrides = [*(args.overrides or []), f"train.time_budget_s={args.time_budget}"]
    # A time budget counts the command's wall time, Python's start included (main(argv) from Python: from now).
    started = _process_start() if getattr(args, "command_line", False) else None
    if args.resume:
        if args.config:
            raise ConfigError("train: give either CONFIG or --resume RUN_DIR, not both")
        if getattr(args, "command_line", False):
            _index_meanwhile_resumed(Path(args.resume), args.overrides)
        from fasttrain.engine import train

        result = train(resume=args.resume, overrides=args.overrides, progress=not args.quiet, started=started)
    else:
        cfg = resolve_config(args.config, args.overrides)
        if getattr(args, "command_line", False):
            _index_meanwhile(cfg)
        from fasttrain.engine import train  # torch: about 1.6 s, while the index is read or built

        result = train(cfg, progress=not args.quiet, started=started)
    if not _is_main_process():
        return 0
    final = result.final
    print(f"run folder: {result.run_dir}")
    if final:
        shown = {k: v for k, v in final.items() if k.startswith(("train_", "val_")) or k == "samples_per_s"}
        print("final epoch: " + ", ".join(f"{k}={v:.4g}" for k, v in shown.items()))
    if result.stopped_early:
        print(result.stopped_early)
    if result.best_value is not None:
        print(f"best {result.best_metric}: {result.best_value:.4f} -> {result.run_dir / 'checkpoints' / 'best.pt'}")
    if result.test_metrics:
        print(f"test ({result.test_weights}): " + ", ".join(f"{k}={v:.4g}" for k, v in result.test_metrics.items()))
    if result.skipped:
        listed = result.run_dir / "skipped.txt"  # every one of them where the log names only the first 20
        listed = listed if listed.is_file() else result.run_dir / "train.log"
        print(f"skipped files: {len(result.skipped)} (listed in {listed})")
    return 0


def _index_meanwhile(cfg: Config) -> None:
    """Start reading or building the dataset index in a forked process before this one imports torch
    (:mod:`fasttrain.data.prebuild`); the run takes it where it needs it. Only for a local data.root (an empty
    one is the demo data, written on first use), made absolute as the run makes it. Best effort: a root this
    cannot read is left to the run to refuse."""
    from fasttrain.data import prebuild

    try:
        root = local_data_root(cfg.data.root)  # as the run resolves it (prepare.resolve_data_root)
    except (OSError, ValueError, RuntimeError):  # a NUL in the path, a link loop
        return
    if root is not None:
        prebuild.start(dataclasses.replace(cfg.data, root=root))


def _index_meanwhile_resumed(resume: Path, overrides: list[str] | None) -> None:
    """:func:`_index_meanwhile` for ``--resume RUN`` (the run folder found as the run finds it), from the run's
    ``config.toml`` and the overrides: a guess, which the run takes only if its checkpoint's data settings are
    the same; a folder that is no run (or a config it cannot read) is left to the run to refuse."""
    from fasttrain.rundir import resume_target

    try:
        run, _ = resume_target(resume)
        cfg = load_config(run / "config.toml", overrides)
    except Exception:  # noqa: BLE001 - a guess: whatever is wrong, the run itself says it
        return
    _index_meanwhile(cfg)


def _process_start() -> float:
    """The ``time.perf_counter()`` reading at this process's start (now, where the system does not say)."""
    import time

    from fasttrain.budget import process_age_s

    return time.perf_counter() - (process_age_s() or 0.0)


def _duration(text: str) -> float:
    from fasttrain.budget import parse_duration

    try:
        return parse_duration(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e).partition(": ")[2]) from None


def _at_least_one(text: str) -> int:
    try:
        n = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if n < 1:
        raise argparse.ArgumentTypeError(f"{n}: at least 1 process")
    return n


NPROC_ENV = "FASTTRAIN_NPROC"
"""Set by ``--nproc N`` for its workers: the command that resumes them names it."""


def _torchrun(nproc: int, argv: list[str]) -> int:
    """``fasttrain train --nproc N ...``: torchrun's own elastic agent on this machine, starting N workers that
    run ``python -m fasttrain train ...`` (the same arguments without --nproc), as
    ``torchrun --standalone --nproc-per-node=N -m fasttrain train ...`` would."""
    from torch.distributed.run import main as torchrun

    rest, skip = [], False
    for a in argv:
        if skip:
            skip = False
        elif a == "--nproc":
            skip = True
        elif not a.startswith("--nproc="):
            rest.append(a)
    from torch.distributed.elastic.multiprocessing.api import SignalException

    before = os.environ.get(NPROC_ENV)
    os.environ[NPROC_ENV] = str(nproc)  # the workers' resume command names --nproc
    try:
        torchrun(["--standalone", f"--nproc-per-node={nproc}", "-m", "fasttrain", *rest])
    except SystemExit as e:  # torchrun exits with the workers' status
        return int(e.code or 0)
    except SignalException as e:  # Ctrl-C or SIGTERM to the agent: it stopped the workers with the same signal
        import signal

        print(f"fasttrain: stopped by {signal.Signals(e.sigval).name} (all {nproc} workers)", file=sys.stderr)
        return 128 + int(e.sigval)
    except Exception as e:  # noqa: BLE001 - torchrun's ChildFailedError: a worker failed
        stopped = _stopped_workers(e)
        if stopped:  # a signal to the workers, not to the agent: they saved, and rank 0 said how to resume
            import signal

            print(f"fasttrain: stopped by {signal.Signals(stopped - 128).name} (all {nproc} workers)", file=sys.stderr)
            return stopped
        print(_worker_failure(e, nproc), file=sys.stderr)
        return 1
    finally:
        if before is None:
            os.environ.pop(NPROC_ENV, None)
        else:
            os.environ[NPROC_ENV] = before
    return 0


def _stopped_workers(e: BaseException) -> int:
    """128 + the signal's number when the workers that "failed" exited as a stop signal makes a run exit (it
    saved, and rank 0 printed the command that resumes it), some perhaps ended by the agent after the others
    (SIGTERM, SIGKILL); else 0."""
    import signal

    from fasttrain.stop import STOP_SIGNALS

    codes = {int(getattr(f, "exitcode", 1)) for f in (getattr(e, "failures", None) or {}).values()}
    stopped = {c for c in codes if c - 128 in STOP_SIGNALS}
    ended = {-signal.SIGTERM, -signal.SIGKILL}
    return stopped.pop() if len(stopped) == 1 and codes - stopped <= ended else 0


def _worker_failure(e: BaseException, nproc: int) -> str:
    """Which rank failed, why (its last error line, from the error file each worker writes) and how to go on."""
    from fasttrain.distributed import WorkerFailure, failure_report

    failures = []
    for rank, f in (getattr(e, "failures", None) or {}).items():
        data = getattr(f, "error_file_data", None) or {}
        data = data if isinstance(data, dict) else {}
        when = data.get("fasttrain_time")  # torchrun's timestamp is whole seconds: ranks would tie
        failures.append(
            WorkerFailure(
                int(rank),
                int(getattr(f, "exitcode", 1)),
                str(getattr(f, "message", "") or ""),
                float(when if isinstance(when, int | float) else getattr(f, "timestamp", 0) or 0),
                str(data.get("fasttrain_run_dir", "")),
                bool(data.get("fasttrain_secondary", False)),
            )
        )
    if not failures:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        return f"fasttrain: error: a worker failed: {first}"

    def has_checkpoint(run: str) -> bool:
        return (Path(run) / "checkpoints" / "last.pt").is_file()

    return failure_report(failures, nproc, has_checkpoint)


def cmd_predict(args: argparse.Namespace) -> int:
    """Exit status 0 when every image got a prediction, 1 when any failed (listed on stderr)."""
    from fasttrain.io import check_writable
    from fasttrain.prediction import predict

    if args.out_dir:
        check_writable(args.out_dir, "predict --out-dir")
    records = predict(args.checkpoint, args.images, device=args.device, out_dir=args.out_dir, weights=args.weights)
    failed = []
    for r in records:
        if "error" in r:
            failed.append(r)
        if args.json:
            print(json.dumps(r))
            continue
        if "error" in r:
            print(f"{r['image']}: error: {r['error']}")
            continue
        fields = {k: v for k, v in r.items() if k not in ("image", "top")}
        print(f"{r['image']}: " + "  ".join(f"{k}={v}" for k, v in fields.items()))
    if failed:
        print(
            f"fasttrain: error: {len(failed)} of {len(records)} images could not be predicted: "
            + ", ".join(r["image"] for r in failed),
            file=sys.stderr,
        )
        return 1
    return 0


def cmd_autotune(args: argparse.Namespace) -> int:
    """Run, print the table; 0 when a verified choice was written, 1 otherwise."""
    from fasttrain.tuning import autotune

    report = autotune(
        resolve_config(args.config, args.overrides),
        memory_budget_gib=args.memory_budget,
        out_dir=args.out,
        verify=not args.no_verify,
        use_cache=not args.no_cache,
        time_budget_s=args.time_budget,
    )
    if _is_main_process():
        print(report.to_table())
    return 0 if report.ok else 1


def cmd_lr_find(args: argparse.Namespace) -> int:
    from fasttrain.lr_find import lr_find

    r = lr_find(
        resolve_config(args.config, args.overrides),
        start_lr=args.start_lr,
        end_lr=args.end_lr,
        steps=args.steps,
        out_dir=args.out,
    )
    print(f"lr range test: {len(r.lrs)} steps from {r.lrs[0]:.3g} to {r.lrs[-1]:.3g}; {r.reason}")
    if r.suggestion is not None:
        print(
            f"suggested optim.lr: {r.suggestion:.3g} (steepest fall of the smoothed loss); "
            f"try --set optim.lr={r.suggestion:.3g}"
        )
    else:
        print("no suggestion: the sweep ended too early (the loss diverged within the first steps); lower --start-lr")
    print("wrote " + ", ".join(str(f) for f in r.files))
    return 0 if r.suggestion is not None else 1


def _is_main_process() -> bool:
    """Rank 0 of a torchrun job (or the only process): the one that prints results."""
    from fasttrain.distributed import dist_info

    return dist_info().is_main


def cmd_bench(args: argparse.Namespace) -> int:
    from fasttrain.benchmark import bench
    from fasttrain.io import check_writable

    cfg = resolve_config(args.config, args.overrides)
    if args.json:  # written at the end: ask now, not after the measurements
        check_writable(Path(args.json).expanduser().parent, "bench --json")
    run = target = None
    if args.run or args.target:
        from fasttrain.benchmark import parse_target

        if not (args.run and args.target):
            raise ConfigError("bench: --run RUN_DIR and --target METRIC=VALUE go together")
        try:
            run, target = args.run, parse_target(args.target)
        except ValueError as e:
            raise ConfigError(str(e)) from None
    try:
        report = bench(cfg, json_path=args.json, run=run, target=target)
    except (FileNotFoundError, ValueError) as e:
        if run is None or not str(e).startswith("--"):
            raise
        raise ConfigError(str(e)) from None
    if _is_main_process():
        print(report.to_table())
        if report.json_path:
            print(f"JSON report: {report.json_path}")
    return 0


def cmd_check_data(args: argparse.Namespace) -> int:
    from fasttrain.data.checks import check_data
    from fasttrain.io import check_writable

    if args.skip_list:  # written at the end: ask now, not after decoding every image
        check_writable(Path(args.skip_list).expanduser().parent, "check-data --skip-list")
    report = check_data(args.data, channels=args.channels, workers=args.workers, skip_list=args.skip_list)
    print(report.to_text())
    return 0 if not report.bad else 1


def cmd_pack(args: argparse.Namespace) -> int:
    from fasttrain.data.pack import DEFAULT_SHARD_BYTES, pack, parse_size

    cfg = resolve_config(args.config, [*args.overrides, f"data.root={args.data}"])
    size = parse_size(args.shard_size) if args.shard_size else DEFAULT_SHARD_BYTES
    report = pack(cfg.data, args.out, shard_bytes=size, order=args.order)
    print(report.to_text())
    return 0


def cmd_index(args: argparse.Namespace) -> int:
    import dataclasses

    from fasttrain.data.index import describe, load_or_build

    cfg = resolve_config(args.config, args.overrides)
    root = Path(args.data).expanduser().resolve()
    # The explicit "check once, ahead" command: every header is checked whatever the dataset's size (auto), unless
    # the config says data.header_checks = read.
    checks = "read" if cfg.data.header_checks == "read" else "start"
    data = dataclasses.replace(cfg.data, root=str(root))
    result = load_or_build(data, root, beside=True, rebuild=not args.reuse, header_checks=checks)
    print(describe(result))
    bad = result.index.bad
    for path, why in bad:
        print(f"  BAD  {path}: {why}")
    for path, why in result.index.source(root).skipped:
        print(f"  SKIPPED  {path}: {why}")
    if not result.reused and result.path is not None and not result.path.is_relative_to(root):
        print(f"{root} is not writable: the index went to the cache; other nodes build their own")
    return 0  # bad files are listed and skipped by training, as check-data reports them


def cmd_config(args: argparse.Namespace) -> int:
    from fasttrain.config import describe_config, packaged_configs

    if args.action == "list":
        for name, text in packaged_configs().items():
            print(f"{name:<20} {text}")
        return 0
    cfg = load_config(args.config, args.overrides) if args.config else load_config(None, args.overrides)
    rows = describe_config(cfg)
    if args.changed:
        rows = [r for r in rows if r.value != r.default]
        if not rows:
            print(
                "no setting differs from the defaults"
                + (
                    ""
                    if args.config
                    else " ('fasttrain train' without a config trains quickstart: config show quickstart)"
                )
            )
    section = None
    for r in rows:
        head = r.key.partition(".")[0] if "." in r.key else ""
        if head != section:
            section = head
            print(f"\n[{head}]" if head else f"# {cfg.name}")
        default = "" if r.value == r.default else f"  (default {r.default!r})"
        print(f"{r.key} = {r.value!r}{default}")
        print(f"    {r.type}: {r.description}")
    return 0


def cmd_plot(args: argparse.Namespace) -> int:
    from fasttrain.plot import plot_runs

    runs = [_run_folder(d) for d in args.runs]
    print(f"wrote {plot_runs(runs, args.out)}")
    return 0


def _run_folder(path: str) -> Path:
    p = Path(path)
    if not p.is_dir():
        raise FileNotFoundError(f"{path}: not a run folder")
    return p


class _HelpFormatter(argparse.HelpFormatter):
    """Help with each option's default where it has a meaningful one (not None, False or empty)."""

    def __init__(self, prog: str):
        super().__init__(prog, max_help_position=32, width=110)

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if action.default not in (None, False, [], argparse.SUPPRESS) and "default" not in text:
            text += " (default: %(default)s)"
        return text


def _formatter(prog: str) -> argparse.HelpFormatter:
    return _HelpFormatter(prog)


def _add_train(command: Callable[[str, str, str], argparse.ArgumentParser]) -> None:
    p = command(
        "train",
        "train a config (no config: the quickstart on demo data)",
        "Train in a new run folder train.runs_dir/<name>-<date>-<time>/ (config.toml, environment.json, "
        "metrics.jsonl, train.log, checkpoints/last.pt and best.pt), or continue one with --resume.",
    )
    p.add_argument(
        "config", nargs="?", help="TOML file or packaged config name ('fasttrain config list'); default: quickstart"
    )
    p.add_argument(
        "--resume",
        metavar="RUN_DIR",
        help="continue the run in RUN_DIR from its last checkpoint, or from RUN_DIR/checkpoints/X.pt "
        "(--set train.epochs=N extends it)",
    )
    p.add_argument(
        "--nproc",
        type=_at_least_one,
        default=1,
        metavar="N",
        help="train on N GPUs of this machine (starts torchrun's agent: one process per GPU)",
    )
    p.add_argument(
        "--time-budget",
        type=_duration,
        metavar="DURATION",
        help="train for at most this long (90s, 10m, 1.5h): the epochs that fit, the schedule stretched to them "
        "(train.time_budget_s)",
    )
    _add_common(p, "optim.lr=0.05")
    p.set_defaults(fn=cmd_train, argv=None)


def _add_predict(command: Callable[[str, str, str], argparse.ArgumentParser]) -> None:
    p = command(
        "predict",
        "predict with a checkpoint or a run folder",
        "The class and probability per image (regressed point and colour for the drawing task; a "
        "generated image for pix2pix).",
    )
    p.add_argument("checkpoint", help="a checkpoint (.pt) or a run folder (its best.pt, else last.pt)")
    p.add_argument("images", nargs="+", help="image files, or folders (every image file under them, recursively)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    p.add_argument("--out-dir", help="where generated images go (pix2pix; default ./predictions)")
    p.add_argument(
        "--weights",
        choices=("ema", "raw"),
        help="a run with train.ema_decay: the moving average (ema) or the raw weights; default: those that "
        "validated better (the checkpoint says which)",
    )
    p.add_argument("--json", action="store_true", help="one JSON record per line")
    _add_verbosity(p)
    p.set_defaults(fn=cmd_predict)


def _add_autotune(command: Callable[[str, str, str], argparse.ArgumentParser]) -> None:
    p = command(
        "autotune",
        "find the batch size and loader settings with the best samples/s",
        "Measure samples/s and peak memory per batch size inside a VRAM budget (emulated on larger "
        "cards), choose the fastest batch that leaves headroom and the loader setting that keeps up, "
        "verify it, and write a table, JSON, a PNG and a tuned config.",
    )
    p.add_argument("config", nargs="?", help="TOML file or packaged config name (default: quickstart)")
    p.add_argument(
        "--memory-budget",
        type=float,
        default=None,
        metavar="GIB",
        help="VRAM budget in GiB (default: tune.memory_budget_gib, 16)",
    )
    p.add_argument(
        "--time-budget",
        type=_duration,
        default=None,
        metavar="DURATION",
        help="how long the whole search may take (45, 45s, 2m), compilation excluded (default: "
        "tune.time_budget_s, 45 s)",
    )
    p.add_argument(
        "--out",
        default=None,
        help="folder for the report, plot and tuned config (default: train.runs_dir/autotune-<name>-<time>)",
    )
    p.add_argument("--no-verify", action="store_true", help="skip the verification run")
    p.add_argument("--no-cache", action="store_true", help="ignore (and refresh) cached results")
    _add_common(p, "tune.max_batch=512")
    p.set_defaults(fn=cmd_autotune)


def _add_lr_find(command: Callable[[str, str, str], argparse.ArgumentParser]) -> None:
    p = command(
        "lr-find",
        "learning-rate range test: loss against an exponentially growing lr, with a suggestion",
        "Train the config's model for up to --steps steps while the learning rate grows exponentially from "
        "--start-lr to --end-lr (stopping when the smoothed loss diverges), suggest the rate where it falls "
        "fastest, and write lr_find.json and lr_find.png. Nothing of a run or config is written or changed.",
    )
    p.add_argument("config", nargs="?", help="TOML file or packaged config name (default: quickstart)")
    p.add_argument("--start-lr", type=float, default=1e-7, metavar="LR", help="first learning rate")
    p.add_argument("--end-lr", type=float, default=10.0, metavar="LR", help="last learning rate")
    p.add_argument("--steps", type=int, default=100, metavar="N", help="optimizer steps of the sweep")
    p.add_argument(
        "--out", default=None, help="folder for lr_find.json and .png (default: train.runs_dir/lr-find-<name>-<time>)"
    )
    _add_common(p, "optim.name=adamw")
    p.set_defaults(fn=cmd_lr_find)


def _add_bench(command: Callable[[str, str, str], argparse.ArgumentParser]) -> None:
    p = command(
        "bench",
        "loader-only, model-only and end-to-end samples/s for a config",
        "Which part limits a run: the loader alone, the train step alone on a batch already on the "
        "device (the ceiling), and both together as training runs them.",
    )
    p.add_argument("config", nargs="?", help="TOML file or packaged config name (default: quickstart)")
    p.add_argument(
        "--json",
        default=None,
        metavar="PATH",
        help="also write the report as JSON here (a new file; an existing one is kept)",
    )
    p.add_argument("--run", metavar="RUN_DIR", help="a finished run: report its time to --target beside samples/s")
    p.add_argument("--target", metavar="METRIC=VALUE", help="e.g. val_acc=0.9: when --run first reached it")
    _add_common(p, "bench.steps=50")
    p.set_defaults(fn=cmd_bench)


def _add_check_data(command: Callable[[str, str, str], argparse.ArgumentParser]) -> None:
    p = command(
        "check-data",
        "report unreadable or odd images; never touches the files",
        "Decode every image once and report unreadable files, files that are not images, empty class "
        "folders and odd ones (converted modes, misnamed formats); in tar shards every image member, a bad one "
        "named <shard>.tar:<member>. Nothing is modified.",
    )
    p.add_argument("data", help="a dataset folder, or tar shards (a packed folder, one .tar, a brace pattern)")
    p.add_argument("--channels", type=int, choices=(1, 3), default=3, help="channels the model reads")
    p.add_argument("--workers", type=int, default=0, help="decoding threads (0: from the machine)")
    p.add_argument("--skip-list", default=None, metavar="PATH", help="write the bad files' paths to this new file")
    _add_verbosity(p)
    p.set_defaults(fn=cmd_check_data)


def _add_pack(command: Callable[[str, str, str], argparse.ArgumentParser]) -> None:
    p = command(
        "pack",
        "write a dataset as WebDataset-style tar shards (an index per shard) into a new folder",
        "Copy every sample's files, undecoded, into tar shards whose members share a key (000123.jpg + "
        "000123.cls / .json / .target.png), with an index beside each shard and shards.json (classes, splits, "
        "counts). The splits are those training would use (the config's format and hold-out). OUT must not exist; "
        "point data.root at it to train from the shards.",
    )
    p.add_argument("data", help="a dataset folder (any data.format)")
    p.add_argument("out", help="the new folder for the shards")
    p.add_argument("--config", default=None, help="TOML file or packaged config (data.format, hold-out settings)")
    p.add_argument("--shard-size", default=None, metavar="SIZE", help="bytes per shard, e.g. 256MB (the default)")
    p.add_argument(
        "--order",
        choices=("shuffled", "source"),
        default="shuffled",
        help="the training samples' order in the shards: shuffled (seeded by data.split_seed; a stream reads "
        "shards whole, and class-sorted ones give one-class batches) or source (discovery order: the same batches "
        "as from the files)",
    )
    _add_common(p, "data.format=manifest")
    p.set_defaults(fn=cmd_pack)


def _add_index(command: Callable[[str, str, str], argparse.ArgumentParser]) -> None:
    p = command(
        "index",
        "list and header-check a dataset once; every start and rank reuses the index",
        "Discover the dataset (data.format's layout under DATA), check every image's header, and write the "
        "dataset index to DATA/.fasttrain-index/ (the cache when DATA is read-only). Training reuses it while "
        "no file under DATA was added, removed, resized or touched. Lists the bad files; nothing is modified. "
        "Every header is checked whatever the dataset's size, unless data.header_checks=read is given.",
    )
    p.add_argument("data", help="the dataset folder (data.root)")
    p.add_argument("--config", default=None, help="TOML file or packaged name whose data settings to use")
    p.add_argument("--reuse", action="store_true", help="keep an index that is still current (default: rebuild)")
    _add_common(p, "data.format=manifest")
    p.set_defaults(fn=cmd_index)


def _add_config(command: Callable[[str, str, str], argparse.ArgumentParser]) -> None:
    p = command(
        "config",
        "show every setting of a config, or list the packaged configs",
        "'config show [NAME|PATH]' prints every key with its value, default, type and description "
        "(units included); 'config list' names the packaged configs.",
    )
    p.add_argument("action", choices=("show", "list"))
    p.add_argument("config", nargs="?", help="TOML file or packaged config name (default: the defaults)")
    p.add_argument("--changed", action="store_true", help="only the settings that differ from the defaults")
    _add_common(p, "optim.lr=0.05")
    p.set_defaults(fn=cmd_config)


def _add_plot(command: Callable[[str, str, str], argparse.ArgumentParser]) -> None:
    p = command(
        "plot",
        "draw a run's curves (several runs overlaid) into a PNG",
        "Loss, the task's validation metric, learning rate and samples/s against optimizer steps, from metrics.jsonl.",
    )
    p.add_argument("runs", nargs="+", metavar="RUN_DIR", help="run folders")
    p.add_argument(
        "--out",
        default=None,
        metavar="PNG",
        help="default: RUN_DIR/curves.png for one run, ./runs-compare.png (a new file) for several",
    )
    _add_verbosity(p)
    p.set_defaults(fn=cmd_plot)


_COMMANDS = (
    _add_train,
    _add_predict,
    _add_autotune,
    _add_lr_find,
    _add_bench,
    _add_check_data,
    _add_pack,
    _add_index,
    _add_config,
    _add_plot,
)
"""The subcommands, in the order ``fasttrain --help`` lists them (make-data is added last, by name only)."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fasttrain",
        description=__doc__.split("\n\n", 1)[1].strip(),
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"fasttrain {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(name: str, help: str, description: str) -> argparse.ArgumentParser:
        return sub.add_parser(name, help=help, description=description, formatter_class=_formatter)

    for add in _COMMANDS:
        add(command)

    sub.add_parser(
        "make-data",
        add_help=False,
        help="write a generated dataset: shapes, drawing, paired, imagenet "
        "('fasttrain make-data KIND --help' lists each one's options)",
    )
    return parser


def _subparser(parser: argparse.ArgumentParser, name: str) -> argparse.ArgumentParser:
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return sub.choices[name]


def _set_hint(extra: list[str]) -> str:
    """For ``--epochs 1`` among unknown arguments: the setting it means, as the --set that gives it."""
    from fasttrain.config import Config, config_to_dict

    flag = next((i for i, a in enumerate(extra) if a.startswith("--")), None)
    if flag is None:
        return ""
    name, _, value = extra[flag][2:].partition("=")
    key = name.replace("-", "_")
    tables = config_to_dict(Config())
    keys = [f"{t}.{k}" for t, values in tables.items() if isinstance(values, dict) for k in values if k == key]
    if key in ("data", "root", "data_root", "data_dir", "dataset"):
        keys = ["data.root"]
    if not keys:
        return "; settings are given as --set section.key=value (fasttrain config show lists them)"
    if not value:
        later = extra[flag + 1] if flag + 1 < len(extra) else ""
        value = later if later and not later.startswith("-") else "..."
    return f"; settings are given as --set section.key=value: --set {keys[0]}={value}"


def _one_line(e: BaseException) -> str:
    """An OS error as ``what: why``: ``cannot write /x/y: No space left on device``."""
    from fasttrain.io import WriteError, os_reason

    if isinstance(e, WriteError) or not isinstance(e, OSError) or not e.filename:
        return str(e)
    action = "cannot write" if e.errno in _WRITE_ERRNOS else "cannot use"
    return f"{action} {e.filename}: {os_reason(e)}"


def _out_of_memory(e: BaseException) -> bool:
    if "torch" not in sys.modules:
        return isinstance(e, MemoryError)
    from fasttrain.memory import is_oom_error

    return is_oom_error(e)


def _oom_line(e: BaseException) -> str:
    """Out of memory, host or GPU, as one line: what ran out and what to lower (torch's text is a traceback)."""
    text = " ".join(str(e).split())
    gpu = any(m in text.lower() for m in ("cuda", "cublas", "cudnn", "bytes on device"))  # the last: DALI's pool
    wanted = re.search(r"(?:tried to allocate|allocate) ([\d.]+ ?[KMGT]?i?B|\d+ bytes)", text)
    size = f" (an allocation of {wanted.group(1)} failed)" if wanted else ""
    if gpu:
        return (
            f"out of GPU memory{size}: lower train.batch_size (with train.accumulation to keep the effective "
            f"batch, which runtime.compile_mode reduce-overhead and max-autotune refuse), or let `fasttrain "
            f"autotune` find what fits"
        )
    return (
        f"out of host memory{size}: lower train.batch_size, data.workers or data.cache_budget "
        f"(data.loader=torch keeps no dataset in memory), or free memory on this machine"
    )


_WRITE_ERRNOS = {errno.ENOSPC, errno.EROFS, errno.EACCES, errno.EPERM, errno.EDQUOT, errno.EFBIG}


def main(argv: list[str] | None = None) -> int:
    """Exit status: 0 done, 1 the work failed (unreadable inputs, a write failed, a run stopped), 2 a usage or
    setting error, 128 + the signal's number when a signal stopped it (130 Ctrl-C, 143 SIGTERM, 138 SIGUSR1).
    Errors are one line on stderr, naming the file, setting or flag."""
    from fasttrain.rundir import RunError

    command_line = argv is None
    argv = sys.argv[1:] if argv is None else list(argv)
    # Pillow's warning for an image above its pixel limit (a 108 MP panorama) printed its own lines amid the
    # command's: data.max_image_pixels is the limit here, and a file over it is named and skipped.
    warnings.filterwarnings("ignore", message=r"Image size \(\d+ pixels\) exceeds limit of \d+ pixels")
    if argv[:1] == ["make-data"]:  # its own parser, help included: fasttrain make-data --help
        from fasttrain.data.make_data import main as make_data

        return make_data(argv[1:] or ["--help"])
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra:  # said by the command's own parser (its usage, not the top level's), with --set where it takes one
        command = _subparser(parser, args.command)
        hint = _set_hint(extra) if "--set" in command._option_string_actions else ""
        command.error(f"unrecognized arguments: {' '.join(extra)}{hint}")
    if getattr(args, "argv", "") is None:
        args.argv = argv
    args.command_line = command_line  # this process is the command (not main(argv) called from Python)
    saved = log.handlers[:], log.level
    _setup_logging(-1 if args.quiet else (1 if args.verbose else 0))
    try:
        return args.fn(args)
    except ConfigError as e:
        _error(e, str(e))
        return 2
    except (FileNotFoundError, FileExistsError, ValueError) as e:
        _error(e, _one_line(e))
        return 2
    except BrokenPipeError as e:  # `fasttrain config show | head`: the reader has what it wanted
        if not _stdout_gone():  # another pipe (a worker's, a store's): an error as any other
            _error(e, _one_line(e))
            return 1
        with contextlib.suppress(OSError):
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error at exit's flush
        return 0
    except (OSError, RunError) as e:  # a write failed (disk full, read-only, permissions), a run had to stop
        _error(e, _one_line(e))
        return 1
    except (RuntimeError, MemoryError) as e:
        waited = _timed_out(e)
        if waited:
            _error(e, waited)
            return 1
        if not _out_of_memory(e):
            _record_for_torchrun(e, f"{type(e).__name__}: {_one_line(e)}")
            raise
        _error(e, _oom_line(e))
        return 1
    except Exception as e:  # a bug: its traceback follows; under torchrun its last line is recorded too
        _record_for_torchrun(e, f"{type(e).__name__}: {_one_line(e)}")
        raise
    except KeyboardInterrupt as e:  # Ctrl-C, or a run stopped by SIGINT / SIGTERM / SIGUSR1 (fasttrain.stop)
        from fasttrain.stop import Stopped

        if sys.stderr.isatty():
            print(file=sys.stderr)  # off the progress bar's line
        what = f"stopped by {e}" if isinstance(e, Stopped) else "interrupted"
        run_dir = getattr(e, "run_dir", None)
        nproc = f" --nproc {os.environ[NPROC_ENV]}" if os.environ.get(NPROC_ENV) else ""
        if os.environ.get("RANK", "0") != "0":
            pass  # under torchrun rank 0 says it once
        elif run_dir is not None:
            where = "where it stopped" if getattr(e, "saved", False) else "from its last checkpoint"
            print(
                f"fasttrain: {what}; continue the run {where} with\n  fasttrain train --resume {run_dir}{nproc}",
                file=sys.stderr,
            )
        else:
            print(f"fasttrain: {what}", file=sys.stderr)
        return 128 + e.signum if isinstance(e, Stopped) else 130
    finally:  # called as a function (tests, notebooks): leave no handler on a stream that may close
        log.handlers[:], level = saved
        log.setLevel(level)
        _leave_process_group()
        if command_line:
            # The process ends next: its last garbage collection walks every object torch's import made, which
            # took 2-4 s of a loaded 2-core machine (0.2-1 s frozen), time a --time-budget run pays. Frozen
            # objects are still freed by reference counting, but garbage in reference cycles is never finalised
            # (no __del__, no flush): every file the command wrote is closed by now (run logs, metric sinks,
            # checkpoints are written whole and renamed), so nothing buffered is left to lose.
            import gc

            gc.freeze()


def _stdout_gone() -> bool:
    """Whether stdout is a pipe whose reader has closed it (poll reports an error on its end)."""
    import select

    try:
        poller = select.poll()
        poller.register(sys.stdout.fileno(), select.POLLOUT)
        return any(event & select.POLLERR for _, event in poller.poll(0))
    except (OSError, ValueError, AttributeError):  # no fileno (captured), no poll
        return False


def _leave_process_group() -> None:
    """Under torchrun: leave the process group cleanly. Nothing is imported here: a Ctrl-C inside torch's own
    import leaves half-made modules in sys.modules, and importing through them raised a traceback ("duplicate
    registrations", "partially initialized module 'torch'") after "fasttrain: interrupted"."""
    dist = sys.modules.get("torch.distributed")
    if dist is None or getattr(sys.modules.get("torch"), "distributed", None) is not dist:
        return  # torch's import failed half-way (it left sys.modules; its submodules stayed)
    initialized = getattr(dist, "is_initialized", None)
    shutdown = getattr(sys.modules.get("fasttrain.distributed"), "shutdown", None)
    if callable(initialized) and callable(shutdown):
        shutdown()


def _timed_out(e: BaseException) -> str | None:
    if "torch.distributed" not in sys.modules:
        return None
    from fasttrain.distributed import timed_out

    return timed_out(e)


def _error(e: BaseException, text: str) -> None:
    # one write, not print()'s two (text, then newline): the ranks of a torchrun job share a stderr, and two
    # ranks failing at once would otherwise run their lines together
    sys.stderr.write(f"fasttrain: error: {text}\n")
    sys.stderr.flush()
    _record_for_torchrun(e, text)


def _record_for_torchrun(e: BaseException, text: str) -> None:
    """Under torchrun: the worker's error line (and run folder) where ``fasttrain train --nproc`` reads it, and
    told to the other ranks, which stop at once instead of waiting for this one."""
    if "torch.distributed" not in sys.modules:
        return
    from fasttrain.agree import NodesDisagree
    from fasttrain.distributed import PeerFailed, record_failure, tell_peers

    known = isinstance(e, (PeerFailed, NodesDisagree))  # every rank knows those already: not this rank's cause
    record_failure(text, getattr(e, "run_dir", None), secondary=known)
    if not known:
        tell_peers(text)


if __name__ == "__main__":
    raise SystemExit(main())
