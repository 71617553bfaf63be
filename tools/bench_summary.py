#!/usr/bin/env python3
"""pytest-benchmark JSON (``pytest benchmarks/ --benchmark-json=FILE``) -> Markdown table and PNG plots.

    python tools/bench_summary.py results.json                          # Markdown on stdout
    python tools/bench_summary.py results.json -o summary.md --plot summary.png
    python tools/bench_summary.py results.json --baseline benchmarks/baselines/gpu-nvidia-h100-80gb-hbm3.json
    python tools/bench_summary.py --baseline-for "$(nvidia-smi --query-gpu=name --format=csv,noheader | head -1)"

The figures come from each benchmark's ``extra_info`` (written by benchmarks/conftest.py): samples/s from the
median round, peak allocated / reserved CUDA memory (process peak RSS on CPU). Rows that have a ``naive``
twin (same kind and workload) get a "vs naive" speedup; with ``--baseline``, rows matched by test name get a
"vs baseline" ratio, and the exit status is 1 when samples/s fell by more than ``--max-drop`` or peak memory
grew by more than ``--max-memory-growth``.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

KIND_TITLES = {
    "model_step": "Train step on synthetic data (the ceiling)",
    "loader": "Loaders alone",
    "end_to_end": "End to end (loader + train step)",
}


@dataclass
class Row:
    name: str
    """pytest-benchmark ``fullname``: how baselines are matched."""
    kind: str
    model: str | None
    backend: str
    precision: str
    batch_size: int | None
    workload: str
    samples_per_s: float | None
    samples_per_s_low: float | None
    """From the slowest round."""
    samples_per_s_high: float | None
    """From the fastest round."""
    peak_allocated: int | None
    peak_reserved: int | None
    peak_rss: int | None
    rounds: int

    @property
    def memory(self) -> int | None:
        """Peak allocated CUDA bytes, or the process peak RSS where there is no CUDA figure."""
        return self.peak_allocated if self.peak_allocated is not None else self.peak_rss

    @property
    def config(self) -> str:
        """Everything but the batch size: one line in the plots."""
        parts = [self.kind, self.model or "", self.backend, self.precision]
        return " ".join(p for p in parts if p)


def _rate(samples: Any, seconds: Any) -> float | None:
    return samples / seconds if samples and seconds else None


def load_rows(path: str | Path) -> tuple[list[Row], dict[str, Any]]:
    """Rows of a pytest-benchmark JSON file and its header (machine_info, commit_info, datetime)."""
    data = json.loads(Path(path).read_text(encoding="utf-8"))
    rows = []
    for b in data.get("benchmarks", []):
        info = b.get("extra_info") or {}
        stats = b.get("stats") or {}
        per_round = info.get("samples_per_round")
        sps = info.get("samples_per_s")
        if sps is None:
            sps = _rate(per_round, stats.get("median"))
        rows.append(
            Row(
                name=b.get("fullname") or b.get("name", "?"),
                kind=info.get("kind") or b.get("group") or "other",
                model=info.get("model"),
                backend=str(info.get("backend", "")),
                precision=str(info.get("precision", "")),
                batch_size=info.get("batch_size"),
                workload=str(info.get("workload", "")),
                samples_per_s=sps,
                samples_per_s_low=_rate(per_round, stats.get("max")),
                samples_per_s_high=_rate(per_round, stats.get("min")),
                peak_allocated=info.get("peak_allocated_bytes"),
                peak_reserved=info.get("peak_reserved_bytes"),
                peak_rss=info.get("peak_rss_bytes"),
                rounds=int(stats.get("rounds", 0)),
            )
        )
    header = {k: data.get(k) for k in ("machine_info", "commit_info", "datetime", "version")}
    return rows, header


def naive_speedups(rows: list[Row]) -> dict[str, float]:
    """fullname -> samples/s over the naive row of the same kind and workload (fasttrain rows only)."""
    naive = {(r.kind, r.workload): r.samples_per_s for r in rows if r.backend == "naive" and r.samples_per_s}
    out = {}
    for r in rows:
        ref = naive.get((r.kind, r.workload))
        if r.backend != "naive" and ref and r.samples_per_s:
            out[r.name] = r.samples_per_s / ref
    return out


def compare(
    rows: list[Row], baseline: list[Row], *, max_drop: float, max_memory_growth: float, fail_missing: bool = False
) -> tuple[dict[str, float], list[str]]:
    """(fullname -> samples/s ratio to the baseline, regressions). New rows are not compared; baseline rows
    missing from this run (skipped, failed or renamed) are regressions only with ``fail_missing``."""
    base = {r.name: r for r in baseline}
    ratios, problems = {}, []
    if fail_missing:
        present = {r.name for r in rows}
        problems += [
            f"{name}: in the baseline but not in this run (skipped, failed or renamed)"
            for name in sorted(set(base) - present)
        ]
    for r in rows:
        b = base.get(r.name)
        if b is None:
            continue
        if r.samples_per_s and b.samples_per_s:
            ratio = r.samples_per_s / b.samples_per_s
            ratios[r.name] = ratio
            if ratio < 1.0 - max_drop:
                problems.append(
                    f"{r.name}: {r.samples_per_s:,.1f} samples/s is {1 - ratio:.1%} below the baseline "
                    f"{b.samples_per_s:,.1f} (allowed {max_drop:.0%})"
                )
        if r.peak_allocated and b.peak_allocated:
            growth = r.peak_allocated / b.peak_allocated - 1.0
            if growth > max_memory_growth:
                problems.append(
                    f"{r.name}: peak allocated {_gib(r.peak_allocated)} GiB is {growth:.1%} above the "
                    f"baseline {_gib(b.peak_allocated)} GiB (allowed {max_memory_growth:.0%})"
                )
    return ratios, problems


def _gib(n: int | None) -> str:
    return "-" if n is None else f"{n / 2**30:.2f}"


def _num(x: float | None) -> str:
    return "-" if x is None else f"{x:,.1f}"


def _env_line(header: dict[str, Any]) -> str:
    mi = header.get("machine_info") or {}
    env = mi.get("fasttrain") or {}
    commit = (header.get("commit_info") or {}).get("id")
    parts = [
        f"GPU {env['gpu']}" if env.get("gpu") else f"CPU {mi.get('cpu', {}).get('brand_raw', '?')}",
        f"driver {env['driver']}" if env.get("driver") else None,
        f"torch {env.get('torch', '?')}",
        f"CUDA {env['cuda']}" if env.get("cuda") else None,
        f"DALI {env['dali']}" if env.get("dali") else None,
        f"{env.get('cpu_count', '?')} CPUs",
        f"bench size {env['bench_size']}" if env.get("bench_size") else None,
        f"commit {commit[:10]}" if commit else None,
        header.get("datetime"),
    ]
    return ", ".join(p for p in parts if p)


def to_markdown(
    rows: list[Row], header: dict[str, Any] | None = None, baseline_ratios: dict[str, float] | None = None
) -> str:
    speedups = naive_speedups(rows)
    cuda = any(r.peak_allocated is not None for r in rows)
    mem_cols = ["peak alloc GiB", "peak reserved GiB"] if cuda else ["peak RSS GiB"]
    lines = []
    if header:
        lines += [f"_{_env_line(header)}_", ""]
    kinds = [k for k in KIND_TITLES if any(r.kind == k for r in rows)]
    kinds += sorted({r.kind for r in rows} - set(kinds))
    for kind in kinds:
        group = sorted(
            (r for r in rows if r.kind == kind),
            key=lambda r: (r.model or "", r.batch_size or 0, r.backend == "naive", r.backend, r.precision),
        )
        cols = [
            "benchmark",
            "model",
            "backend",
            "precision",
            "batch",
            "samples/s",
            "range (slowest..fastest round)",
            *mem_cols,
            "vs naive",
        ]
        if baseline_ratios is not None:
            cols.append("vs baseline")
        lines += [
            f"### {KIND_TITLES.get(kind, kind)}",
            "",
            "| " + " | ".join(cols) + " |",
            "|" + "|".join("---" if i < 4 else "---:" for i in range(len(cols))) + "|",
        ]
        for r in group:
            mem = [_gib(r.peak_allocated), _gib(r.peak_reserved)] if cuda else [_gib(r.peak_rss)]
            short = r.name.split("::")[-1]
            cells = [
                f"`{short}`",
                r.model or "-",
                r.backend or "-",
                r.precision or "-",
                str(r.batch_size) if r.batch_size else "-",
                _num(r.samples_per_s),
                f"{_num(r.samples_per_s_low)}..{_num(r.samples_per_s_high)}",
                *mem,
                f"{speedups[r.name]:.2f}x" if r.name in speedups else "-",
            ]
            if baseline_ratios is not None:
                cells.append(f"{baseline_ratios[r.name]:.2f}x" if r.name in baseline_ratios else "new")
            lines.append("| " + " | ".join(cells) + " |")
        lines.append("")
    if not rows:
        lines.append("No benchmarks in this file (all skipped, or run with --benchmark-disable).")
    return "\n".join(lines).rstrip() + "\n"


def plot(rows: list[Row], path: str | Path) -> Path:
    """samples/s and peak memory against batch size: one row of panels per kind (model step, loader, end to
    end), one line per configuration (model, backend, precision); naive baselines dashed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import ScalarFormatter

    kinds = [k for k in KIND_TITLES if any(r.kind == k for r in rows)]
    kinds += sorted({r.kind for r in rows} - set(kinds))
    cuda = any(r.peak_allocated is not None for r in rows)
    fig, axes = plt.subplots(max(len(kinds), 1), 2, figsize=(13, 3.8 * max(len(kinds), 1)), squeeze=False)
    for (ax_s, ax_m), kind in zip(axes, kinds):
        configs: dict[str, list[Row]] = {}
        for r in rows:
            if r.kind == kind and r.batch_size and r.samples_per_s:
                configs.setdefault(r.config.removeprefix(kind).strip(), []).append(r)
        for name, group in sorted(configs.items()):
            group.sort(key=lambda r: r.batch_size)
            xs = [r.batch_size for r in group]
            style = "--" if group[0].backend == "naive" else "-"
            (line,) = ax_s.plot(xs, [r.samples_per_s for r in group], style, marker="o", label=name)
            mem = [r.memory / 2**30 if r.memory is not None else float("nan") for r in group]
            ax_m.plot(xs, mem, style, marker="o", color=line.get_color(), label=name)
        ax_s.set_title(f"{KIND_TITLES.get(kind, kind)}: throughput", fontsize=10)
        ax_m.set_title(f"{KIND_TITLES.get(kind, kind)}: peak memory", fontsize=10)
        ax_s.set_ylabel("samples/s (median round)")
        ax_m.set_ylabel("peak allocated GiB" if cuda else "process peak RSS GiB")
        ax_s.set_yscale("log")
        for ax in (ax_s, ax_m):
            ax.set_xscale("log", base=2)
            ax.xaxis.set_major_formatter(ScalarFormatter())
            ax.set_xlabel("batch size")
            ax.grid(True, which="both", alpha=0.3)
        if configs:
            ax_m.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.02, 0.5))
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


BASELINES = Path("benchmarks/baselines")


def baseline_path(gpu_name: str) -> Path:
    """The committed baseline of one GPU model, named by what ``nvidia-smi --query-gpu=name`` reports:
    ``NVIDIA H100 80GB HBM3`` -> ``benchmarks/baselines/gpu-nvidia-h100-80gb-hbm3.json``. Figures are only
    comparable on the same model, so each model the runners have keeps its own file."""
    slug = re.sub(r"[^a-z0-9]+", "-", gpu_name.strip().lower()).strip("-")
    if not slug:
        raise ValueError(f"no GPU model name to name a baseline by (got {gpu_name!r})")
    return BASELINES / f"gpu-{slug}.json"


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--baseline-for"]:  # the workflow: which baseline this runner's GPU compares against
        if len(argv) != 2:
            print("usage: bench_summary.py --baseline-for GPU_NAME", file=sys.stderr)
            return 2
        print(baseline_path(argv[1]))
        return 0
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("results", help="pytest-benchmark JSON (--benchmark-json)")
    p.add_argument("-o", "--output", help="write the Markdown here (default: stdout)")
    p.add_argument("--plot", help="write a PNG of samples/s and memory against batch size here")
    p.add_argument("--baseline", help="pytest-benchmark JSON to compare with (matched by test name)")
    p.add_argument(
        "--max-drop",
        type=float,
        default=0.10,
        help="fail when samples/s falls more than this share below the baseline (default 0.10)",
    )
    p.add_argument(
        "--max-memory-growth",
        type=float,
        default=0.10,
        help="fail when peak allocated CUDA memory grows more than this share (default 0.10)",
    )
    p.add_argument(
        "--fail-missing",
        action="store_true",
        help="fail when a baseline benchmark is missing from the results (e.g. DALI silently skipped)",
    )
    args = p.parse_args(argv)

    rows, header = load_rows(args.results)
    ratios, problems = None, []
    if args.baseline:
        base_rows, _ = load_rows(args.baseline)
        ratios, problems = compare(
            rows,
            base_rows,
            max_drop=args.max_drop,
            max_memory_growth=args.max_memory_growth,
            fail_missing=args.fail_missing,
        )
    text = to_markdown(rows, header, ratios)
    if problems:
        text += "\n### Regressions against the baseline\n\n" + "\n".join(f"- {m}" for m in problems) + "\n"
    if args.output:
        Path(args.output).write_text(text, encoding="utf-8")
    else:
        sys.stdout.write(text)
    if args.plot:
        plot(rows, args.plot)
    for m in problems:
        print(f"regression: {m}", file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
