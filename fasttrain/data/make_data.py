"""Write a generated dataset as real files (never over an existing folder): ``fasttrain make-data``.

fasttrain make-data drawing OUT [--sessions 200] [--steps 8] [--size 128] [--val-sessions 0]
fasttrain make-data paired OUT [--n 400] [--size 64] [--layout folders|side_by_side]
fasttrain make-data imagenet OUT [--n 8000] [--classes 10] [--size 500x375] [--quality 90] [--val 0]
fasttrain make-data shapes OUT [--train-per-class 300] [--val-per-class 60] [--size 48]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from fasttrain.data import synthetic
from fasttrain.io import os_reason

MIN_SIZE = 8
"""Smallest image side the generators draw (the shapes need a few pixels; data.image_size starts at 8)."""


def _count(minimum: int) -> type:
    def parse(text: str) -> int:
        try:
            n = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
        if n < minimum:
            raise argparse.ArgumentTypeError(f"must be >= {minimum}, got {n}")
        return n

    parse.__name__ = "count"
    return parse  # type: ignore[return-value]


def _size(text: str) -> int | tuple[int, int]:
    """``128`` or ``500x375`` (width x height), each side at least :data:`MIN_SIZE` pixels."""
    try:
        sides = [int(t) for t in text.lower().split("x")] if "x" in text.lower() else [int(text)]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected 128 or WxH such as 500x375, got {text!r}") from None
    if len(sides) not in (1, 2) or min(sides) < MIN_SIZE:
        raise argparse.ArgumentTypeError(f"expected 128 or WxH with sides >= {MIN_SIZE}, got {text!r}")
    return sides[0] if len(sides) == 1 else (sides[0], sides[1])


def _side(text: str) -> int:
    size = _size(text)
    if isinstance(size, tuple):
        raise argparse.ArgumentTypeError(f"expected one number of pixels, got {text!r}")
    return size


def get_parser() -> argparse.ArgumentParser:
    fmt = argparse.ArgumentDefaultsHelpFormatter
    p = argparse.ArgumentParser(
        prog="fasttrain make-data",
        formatter_class=fmt,
        description="Write a generated dataset as image files into a new folder OUT "
        "(an existing OUT is never written into).",
    )
    sub = p.add_subparsers(dest="kind", required=True, metavar="KIND")
    out_help = "folder to create (must not exist)"

    d = sub.add_parser(
        "drawing",
        formatter_class=fmt,
        help="canvas steps + stroke JSON (data.format = drawing)",
        description="Drawing-app sessions: one PNG canvas per step and the next stroke's point "
        "and colour in JSON (configs/drawing.toml).",
    )
    d.add_argument("out", type=Path, metavar="OUT", help=out_help)
    d.add_argument("--sessions", type=_count(1), default=200, metavar="N", help="training sessions")
    d.add_argument(
        "--val-sessions",
        type=_count(0),
        default=0,
        metavar="N",
        help="validation sessions, written to val/ (0: none; data.val_fraction then holds sessions out)",
    )
    d.add_argument("--steps", type=_count(1), default=8, metavar="N", help="strokes (canvases) per session")
    d.add_argument(
        "--size",
        type=_size,
        default=128,
        metavar="PX",
        help=f"canvas size in pixels: one side (square) or WxH, each >= {MIN_SIZE}",
    )

    q = sub.add_parser(
        "paired",
        formatter_class=fmt,
        help="outline -> filled shape pairs (data.format = paired)",
        description="Image pairs for pix2pix: a shape's outline (input) and the filled shape "
        "(target) (configs/pix2pix.toml).",
    )
    q.add_argument("out", type=Path, metavar="OUT", help=out_help)
    q.add_argument("--n", type=_count(1), default=400, metavar="N", help="pairs in all (a fifth go to val/)")
    q.add_argument(
        "--size", type=_side, default=64, metavar="PX", help=f"side of each square image in pixels (>= {MIN_SIZE})"
    )
    q.add_argument(
        "--layout",
        choices=("folders", "side_by_side"),
        default="folders",
        help="folders: A/ and B/ with matching names; side_by_side: one image, input left, target right",
    )

    i = sub.add_parser(
        "imagenet",
        formatter_class=fmt,
        help="ImageNet-sized JPEGs in class folders (benchmarks)",
        description="ImageNet-sized JPEGs in class folders, the decode load of the GPU benchmarks "
        "(configs/resnet50-imagenet.toml).",
    )
    i.add_argument("out", type=Path, metavar="OUT", help=out_help)
    i.add_argument("--n", type=_count(1), default=8000, metavar="N", help="training images (>= --classes)")
    i.add_argument("--val", type=_count(0), default=0, metavar="N", help="validation images, written to val/")
    i.add_argument("--classes", type=_count(1), default=10, metavar="N", help="class folders")
    i.add_argument(
        "--size",
        type=_size,
        default=(500, 375),
        metavar="WxH",
        help="image size in pixels (ImageNet's typical 500x375), or one side for squares",
    )
    i.add_argument("--quality", type=_count(1), default=90, metavar="Q", help="JPEG quality, 1..100")

    s = sub.add_parser(
        "shapes",
        formatter_class=fmt,
        help="coloured shapes in class folders (the quickstart's data)",
        description="Coloured shapes (circle, square, triangle, cross) in class folders, with a "
        "val/ split: the quickstart's and catfish's kind of data.",
    )
    s.add_argument("out", type=Path, metavar="OUT", help=out_help)
    s.add_argument("--train-per-class", type=_count(1), default=300, metavar="N", help="training images per class")
    s.add_argument("--val-per-class", type=_count(0), default=60, metavar="N", help="validation images per class")
    s.add_argument(
        "--size", type=_side, default=48, metavar="PX", help=f"side of each square image in pixels (>= {MIN_SIZE})"
    )

    for sp in (d, q, i, s):
        sp.add_argument("--seed", type=int, default=0, help="random seed: the same seed writes the same files")
    return p


def main(argv: list[str] | None = None) -> int:
    parser = get_parser()
    args = parser.parse_args(argv)
    if args.kind == "imagenet" and args.quality > 100:
        parser.error(f"argument --quality: must be in 1..100, got {args.quality}")
    if args.kind == "imagenet" and args.n < args.classes:
        parser.error(
            f"argument --n: {args.n} images cannot fill --classes {args.classes} (one image per class at least)"
        )
    t0 = time.perf_counter()
    try:
        if args.kind == "drawing":
            out = synthetic.make_drawing_dataset(
                args.out, args.sessions, args.steps, args.size, val_sessions=args.val_sessions, seed=args.seed
            )
        elif args.kind == "paired":
            out = synthetic.make_paired_dataset(args.out, args.n, args.size, args.layout, seed=args.seed)
        elif args.kind == "imagenet":
            size = args.size if isinstance(args.size, tuple) else (args.size, args.size)
            out = synthetic.make_imagenet_like(
                args.out, args.n, args.classes, size, args.quality, val=args.val, seed=args.seed
            )
        else:
            out = synthetic.make_shapes_dataset(
                args.out,
                train_per_class=args.train_per_class,
                val_per_class=args.val_per_class,
                size=args.size,
                seed=args.seed,
            )
    # The prefix and exit status of every other command (fasttrain.cli.main): 2 a usage or setting error (an
    # existing OUT included), 1 a write that failed.
    except (FileExistsError, ValueError) as e:
        print(f"fasttrain: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # disk full, read-only, no permission: the partial dataset was removed
        print(
            f"fasttrain: error: cannot write {args.out}: {os_reason(e)} (no partial dataset is left)", file=sys.stderr
        )
        return 1
    print(f"wrote {out} in {time.perf_counter() - t0:.1f}s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
