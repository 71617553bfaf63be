"""Command line: parse arguments, set up logging, call the package's functions, print their results."""

from __future__ import annotations

import argparse
import errno
import json
import logging
import sys
from importlib import resources
from pathlib import Path

from fasttrain import __version__
from fasttrain.config import Config, ConfigError, load_config

log = logging.getLogger("fasttrain")


def packaged_config(name: str) -> Path | None:
    """A config shipped with fasttrain (``quickstart``, ``catfish``, ...) by name."""
    stem = name[:-5] if name.endswith(".toml") else name
    p = resources.files("fasttrain") / "configs" / f"{stem}.toml"
    return Path(str(p)) if p.is_file() else None


def resolve_config(arg: str | None, overrides: list[str]) -> Config:
    if arg is None:
        path = packaged_config("quickstart")
    elif Path(arg).is_file():
        path = Path(arg)
    else:
        path = packaged_config(arg)
        if path is None:
            raise ConfigError(f"config {arg}: no such file, and no packaged config of that name")
    return load_config(path, overrides)


class _ConsoleFilter(logging.Filter):
    """What the console shows besides its level: under torchrun only rank 0's lines, except warnings and errors,
    which every rank reports with its rank; on a terminal the progress bar instead of the plain progress lines
    (which train.log always gets)."""

    def __init__(self, bar_on_terminal: bool):
        super().__init__()
        from fasttrain.distributed import dist_info

        self.bar = bar_on_terminal and sys.stderr.isatty()
        info = dist_info()
        self.rank = info.rank if info.enabled else None

    def filter(self, record: logging.LogRecord) -> bool:
        from fasttrain.metrics import PROGRESS

        if self.bar and getattr(record, PROGRESS, False):
            return False
        if self.rank is not None:
            if record.levelno < logging.WARNING and self.rank != 0:
                return False
            if record.levelno >= logging.WARNING and not record.getMessage().startswith("[rank"):
                record.msg, record.args = f"[rank {self.rank}] {record.getMessage()}", None
        return True


def _setup_logging(verbosity: int) -> None:
    """The console shows WARNING (-q), INFO or DEBUG (-v); the package logger passes INFO on whatever the
    console shows, so a run's train.log holds its INFO lines under -q too."""
    level = {-1: logging.WARNING, 0: logging.INFO}.get(verbosity, logging.DEBUG)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname).1s %(message)s", "%H:%M:%S"))
    handler.setLevel(level)
    handler.addFilter(_ConsoleFilter(bar_on_terminal=verbosity >= 0))
    log.handlers[:] = [handler]
    log.setLevel(min(level, logging.INFO))


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="override a config value (repeatable), e.g. --set train.epochs=5")
    g = p.add_mutually_exclusive_group()
    g.add_argument("-q", "--quiet", action="store_true", help="warnings and results only, no progress bars")
    g.add_argument("-v", "--verbose", action="store_true", help="debug logging")


def cmd_train(args: argparse.Namespace) -> int:
    from fasttrain.engine import train

    if args.resume:
        if args.config:
            raise ConfigError("train: give either CONFIG or --resume RUN_DIR, not both")
        result = train(resume=args.resume, overrides=args.overrides, progress=not args.quiet)
    else:
        result = train(resolve_config(args.config, args.overrides), progress=not args.quiet)
    final = result.final
    print(f"run folder: {result.run_dir}")
    if final:
        shown = {k: v for k, v in final.items() if k.startswith(("train_", "val_")) or k == "samples_per_s"}
        print("final epoch: " + ", ".join(f"{k}={v:.4g}" for k, v in shown.items()))
    if result.best_value is not None:
        print(f"best {result.best_metric}: {result.best_value:.4f} -> {result.run_dir / 'checkpoints' / 'best.pt'}")
    if result.test_metrics:
        print("test: " + ", ".join(f"{k}={v:.4g}" for k, v in result.test_metrics.items()))
    if result.skipped:
        print(f"skipped files: {len(result.skipped)} (listed in {result.run_dir / 'train.log'})")
    return 0


def cmd_predict(args: argparse.Namespace) -> int:
    """Exit status 0 when every image got a prediction, 1 when any failed (listed on stderr)."""
    from fasttrain.io import check_writable
    from fasttrain.predict import predict

    if args.out_dir:
        check_writable(args.out_dir, "predict --out-dir")
    records = predict(args.checkpoint, args.images, device=args.device, out_dir=args.out_dir)
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
        print(f"fasttrain: error: {len(failed)} of {len(records)} images could not be predicted: "
              + ", ".join(r["image"] for r in failed), file=sys.stderr)
        return 1
    return 0


def cmd_autotune(args: argparse.Namespace) -> int:
    from fasttrain.autotune import run_cli

    return run_cli(resolve_config(args.config, args.overrides), args)


def cmd_bench(args: argparse.Namespace) -> int:
    from fasttrain.bench import bench
    from fasttrain.io import check_writable

    cfg = resolve_config(args.config, args.overrides)
    if args.json:  # written at the end: ask now, not after the measurements
        check_writable(Path(args.json).expanduser().parent, "bench --json")
    report = bench(cfg, json_path=args.json)
    print(report.to_table())
    if report.json_path:
        print(f"JSON report: {report.json_path}")
    return 0


def cmd_check_data(args: argparse.Namespace) -> int:
    from fasttrain.data.checks import check_data
    from fasttrain.io import check_writable

    if args.skip_list:  # written at the end: ask now, not after decoding every image
        check_writable(Path(args.skip_list).expanduser().parent, "check-data --skip-list")
    report = check_data(args.data, channels=args.channels, workers=args.workers,
                        skip_list=args.skip_list)
    print(report.to_text())
    return 0 if not report.bad else 1


def cmd_make_data(args: argparse.Namespace) -> int:
    from fasttrain.data.make_data import main as make_data

    return make_data(args.rest)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fasttrain", description=__doc__)
    parser.add_argument("--version", action="version", version=f"fasttrain {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="train a config (no config: the quickstart on demo data)")
    p.add_argument("config", nargs="?", help="TOML config file or packaged config name (default: quickstart)")
    p.add_argument("--resume", metavar="RUN_DIR", help="continue a run from its last checkpoint")
    _add_common(p)
    p.set_defaults(fn=cmd_train)

    p = sub.add_parser("predict", help="predict with a checkpoint")
    p.add_argument("checkpoint")
    p.add_argument("images", nargs="+")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    p.add_argument("--out-dir", help="where generated images go (pix2pix)")
    p.add_argument("--json", action="store_true", help="one JSON record per line")
    g = p.add_mutually_exclusive_group()
    g.add_argument("-q", "--quiet", action="store_true")
    g.add_argument("-v", "--verbose", action="store_true")
    p.set_defaults(fn=cmd_predict)

    p = sub.add_parser("autotune", help="find the batch size and loader settings with the best samples/s")
    p.add_argument("config", nargs="?")
    p.add_argument("--memory-budget", type=float, default=None, metavar="GIB",
                   help="VRAM budget in GiB (default: tune.memory_budget_gib, 16)")
    p.add_argument("--out", default=None, help="folder for the report, plot and tuned config")
    p.add_argument("--no-verify", action="store_true", help="skip the verification run")
    p.add_argument("--no-cache", action="store_true", help="ignore cached results")
    _add_common(p)
    p.set_defaults(fn=cmd_autotune)

    p = sub.add_parser("bench", help="loader-only, model-only and end-to-end samples/s for a config")
    p.add_argument("config", nargs="?")
    p.add_argument("--json", default=None, help="also write the report as JSON here")
    _add_common(p)
    p.set_defaults(fn=cmd_bench)

    p = sub.add_parser("check-data", help="report unreadable or odd images; never touches the files")
    p.add_argument("data")
    p.add_argument("--channels", type=int, choices=(1, 3), default=3)
    p.add_argument("--workers", type=int, default=0, help="threads (0: from the machine)")
    p.add_argument("--skip-list", default=None, help="write the bad files' paths to this new file")
    g = p.add_mutually_exclusive_group()
    g.add_argument("-q", "--quiet", action="store_true")
    g.add_argument("-v", "--verbose", action="store_true")
    p.set_defaults(fn=cmd_check_data)

    p = sub.add_parser("make-data", add_help=False,
                       help="write a generated dataset: shapes, drawing, paired, imagenet (--help for options)")
    p.add_argument("rest", nargs=argparse.REMAINDER)
    p.set_defaults(fn=cmd_make_data, quiet=False, verbose=False)
    return parser


def _one_line(e: BaseException) -> str:
    """An OS error as ``what: why``: ``cannot write /x/y: No space left on device``."""
    from fasttrain.io import WriteError, os_reason

    if isinstance(e, WriteError) or not isinstance(e, OSError) or not e.filename:
        return str(e)
    action = "cannot write" if e.errno in _WRITE_ERRNOS else "cannot use"
    return f"{action} {e.filename}: {os_reason(e)}"


_WRITE_ERRNOS = {errno.ENOSPC, errno.EROFS, errno.EACCES, errno.EPERM, errno.EDQUOT, errno.EFBIG}


def main(argv: list[str] | None = None) -> int:
    """Exit status: 0 done, 1 the work failed (unreadable inputs, a write failed, a run stopped), 2 a usage or
    setting error, 130 interrupted. Errors are one line on stderr, naming the file, setting or flag."""
    from fasttrain.rundir import RunError

    args = build_parser().parse_args(argv)
    saved = log.handlers[:], log.level
    _setup_logging(-1 if args.quiet else (1 if args.verbose else 0))
    try:
        return args.fn(args)
    except ConfigError as e:
        print(f"fasttrain: error: {e}", file=sys.stderr)
        return 2
    except (FileNotFoundError, FileExistsError, ValueError) as e:
        print(f"fasttrain: error: {_one_line(e)}", file=sys.stderr)
        return 2
    except (OSError, RunError) as e:  # a write failed (disk full, read-only, permissions), a run had to stop
        print(f"fasttrain: error: {_one_line(e)}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("fasttrain: interrupted; a run continues with `fasttrain train --resume RUN_DIR` "
              "from its last checkpoint", file=sys.stderr)
        return 130
    finally:  # called as a function (tests, notebooks): leave no handler on a stream that may close
        log.handlers[:], level = saved
        log.setLevel(level)


if __name__ == "__main__":
    raise SystemExit(main())
