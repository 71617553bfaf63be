"""Re-plot an autotune report: ``python tools/plot_autotune.py runs/autotune-x/autotune.json [out.png]``.

Draws samples/s (with the spread of the repeats) and steady-state peak memory against batch size, the
verification point, the budget lines and where the search stopped (as ``fasttrain autotune`` does) from the JSON
alone, e.g. to compare a report from a GPU machine on a laptop. The PNG goes beside the JSON unless a path is given; an
existing file is never overwritten (a ``-2`` suffix is added).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from fasttrain.tuning import plot_report


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("report", type=Path, help="autotune.json written by fasttrain autotune")
    p.add_argument("out", type=Path, nargs="?", help="PNG path (default: beside the report)")
    args = p.parse_args(argv)
    data = json.loads(args.report.read_text(encoding="utf-8"))
    out = args.out or args.report.with_suffix(".png")
    print(plot_report(data, out))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
