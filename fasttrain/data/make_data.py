"""Write a generated dataset as real files (never over an existing folder): ``fasttrain make-data``.

    fasttrain make-data drawing OUT [--sessions 200] [--steps 8] [--size 128] [--val-sessions 40]
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
    p = argparse.ArgumentParser(prog="fasttrain make-data", description="Write a generated dataset as image files.")
    sub = p.add_subparsers(dest="kind", required=True)

    d = sub.add_parser("drawing", help="canvas steps + stroke JSON (data.format = drawing)")
    d.add_argument("out", type=Path)
    d.add_argument("--sessions", type=_count(1), default=200, help="training sessions")
    d.add_argument("--val-sessions", type=_count(0), default=0, help="validation sessions (0: all under the root)")
    d.add_argument("--steps", type=_count(1), default=8, help="strokes per session")
    d.add_argument("--size", type=_size, default=128, help="canvas size: 128 or WxH")

    q = sub.add_parser("paired", help="outline -> filled shape pairs (data.format = paired)")
    q.add_argument("out", type=Path)
    q.add_argument("--n", type=_count(1), default=400, help="pairs (a fifth go to val/)")
    q.add_argument("--size", type=_side, default=64)
    q.add_argument("--layout", choices=("folders", "side_by_side"), default="folders")

    i = sub.add_parser("imagenet", help="ImageNet-sized JPEGs in class folders (benchmarks)")
    i.add_argument("out", type=Path)
    i.add_argument("--n", type=_count(1), default=8000, help="training images")
    i.add_argument("--val", type=_count(0), default=0, help="validation images")
    i.add_argument("--classes", type=_count(1), default=10)
    i.add_argument("--size", type=_size, default=(500, 375), help="WxH")
    i.add_argument("--quality", type=_count(1), default=90, help="JPEG quality, 1..100")

    s = sub.add_parser("shapes", help="coloured shapes in class folders (the quickstart's data)")
    s.add_argument("out", type=Path)
    s.add_argument("--train-per-class", type=_count(1), default=300)
    s.add_argument("--val-per-class", type=_count(0), default=60)
    s.add_argument("--size", type=_side, default=48)

    for sp in (d, q, i, s):
        sp.add_argument("--seed", type=int, default=0)
    return p


def main(argv: list[str] | None = None) -> int:
    parser = get_parser()
    args = parser.parse_args(argv)
    if args.kind == "imagenet" and args.quality > 100:
        parser.error(f"argument --quality: must be in 1..100, got {args.quality}")
    if args.kind == "imagenet" and args.n < args.classes:
        parser.error(f"argument --n: {args.n} images cannot fill --classes {args.classes} (one image per class "
                     f"at least)")
    t0 = time.perf_counter()
    try:
        if args.kind == "drawing":
            out = synthetic.make_drawing_dataset(args.out, args.sessions, args.steps, args.size,
                                                 val_sessions=args.val_sessions, seed=args.seed)
        elif args.kind == "paired":
            out = synthetic.make_paired_dataset(args.out, args.n, args.size, args.layout, seed=args.seed)
        elif args.kind == "imagenet":
            size = args.size if isinstance(args.size, tuple) else (args.size, args.size)
            out = synthetic.make_imagenet_like(args.out, args.n, args.classes, size, args.quality, val=args.val,
                                               seed=args.seed)
        else:
            out = synthetic.make_shapes_dataset(args.out, train_per_class=args.train_per_class,
                                                val_per_class=args.val_per_class, size=args.size, seed=args.seed)
    except FileExistsError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except OSError as e:  # disk full, read-only, no permission: the partial dataset was removed
        print(f"error: cannot write {args.out}: {os_reason(e)} (no partial dataset is left)", file=sys.stderr)
        return 1
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {out} in {time.perf_counter() - t0:.1f}s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
