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


def _size(text: str) -> int | tuple[int, int]:
    """``128`` or ``500x375`` (width x height)."""
    if "x" in text:
        w, h = text.lower().split("x")
        return int(w), int(h)
    return int(text)


def get_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="fasttrain make-data", description="Write a generated dataset as image files.")
    sub = p.add_subparsers(dest="kind", required=True)

    d = sub.add_parser("drawing", help="canvas steps + stroke JSON (data.format = drawing)")
    d.add_argument("out", type=Path)
    d.add_argument("--sessions", type=int, default=200, help="training sessions")
    d.add_argument("--val-sessions", type=int, default=0, help="validation sessions (0: all under the root)")
    d.add_argument("--steps", type=int, default=8, help="strokes per session")
    d.add_argument("--size", type=_size, default=128, help="canvas size: 128 or WxH")

    q = sub.add_parser("paired", help="outline -> filled shape pairs (data.format = paired)")
    q.add_argument("out", type=Path)
    q.add_argument("--n", type=int, default=400, help="pairs (a fifth go to val/)")
    q.add_argument("--size", type=int, default=64)
    q.add_argument("--layout", choices=("folders", "side_by_side"), default="folders")

    i = sub.add_parser("imagenet", help="ImageNet-sized JPEGs in class folders (benchmarks)")
    i.add_argument("out", type=Path)
    i.add_argument("--n", type=int, default=8000, help="training images")
    i.add_argument("--val", type=int, default=0, help="validation images")
    i.add_argument("--classes", type=int, default=10)
    i.add_argument("--size", type=_size, default=(500, 375), help="WxH")
    i.add_argument("--quality", type=int, default=90)

    s = sub.add_parser("shapes", help="coloured shapes in class folders (the quickstart's data)")
    s.add_argument("out", type=Path)
    s.add_argument("--train-per-class", type=int, default=300)
    s.add_argument("--val-per-class", type=int, default=60)
    s.add_argument("--size", type=int, default=48)

    for sp in (d, q, i, s):
        sp.add_argument("--seed", type=int, default=0)
    return p


def main(argv: list[str] | None = None) -> int:
    args = get_parser().parse_args(argv)
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
    print(f"wrote {out} in {time.perf_counter() - t0:.1f}s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
