"""tools/bench_summary.py: pytest-benchmark JSON -> Markdown, plots and the baseline check."""

from __future__ import annotations

import copy
import importlib.util
import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = next(p for p in Path(__file__).resolve().parents if (p / "pyproject.toml").is_file())


def _load_tool():
    spec = importlib.util.spec_from_file_location("bench_summary", ROOT / "tools" / "bench_summary.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules["bench_summary"] = mod  # dataclasses look their module up by name
    spec.loader.exec_module(mod)
    return mod


S = _load_tool()


def _entry(
    name: str,
    group: str,
    *,
    median: float,
    samples_per_round: int,
    backend: str,
    workload: str,
    model: str | None = "resnet50",
    batch_size: int = 256,
    precision: str = "bf16",
    alloc: int | None = 10 * 2**30,
    with_sps: bool = True,
) -> dict:
    """One benchmark as pytest-benchmark 5 writes it (keys taken from a real --benchmark-json file)."""
    info = {
        "samples_per_round": samples_per_round,
        "steps_per_round": 20,
        "bench_size": "gpu",
        "device": "cuda",
        "peak_allocated_bytes": alloc,
        "peak_reserved_bytes": None if alloc is None else alloc + 2**30,
        "peak_rss_bytes": 3 * 2**30,
        "kind": group,
        "model": model,
        "batch_size": batch_size,
        "precision": precision,
        "backend": backend,
        "workload": workload,
        "env": {"torch": "2.14.1"},
    }
    if with_sps:
        info["samples_per_s"] = samples_per_round / median
    return {
        "group": group,
        "name": name.split("::")[-1],
        "fullname": name,
        "params": None,
        "param": None,
        "extra_info": info,
        "options": {
            "disable_gc": False,
            "timer": "perf_counter",
            "min_rounds": 5,
            "max_time": 1.0,
            "min_time": 5e-06,
            "warmup": False,
        },
        "stats": {
            "min": median * 0.9,
            "max": median * 1.25,
            "mean": median,
            "stddev": 0.01,
            "rounds": 5,
            "median": median,
            "iqr": 0.02,
            "q1": median * 0.95,
            "q3": median * 1.05,
            "iqr_outliers": 0,
            "stddev_outliers": 1,
            "outliers": "1;0",
            "ld15iqr": median * 0.9,
            "hd15iqr": median * 1.25,
            "ops": 1 / median,
            "total": 5 * median,
            "data": [median] * 5,
            "iterations": 1,
        },
    }


def _results() -> dict:
    e2e = "benchmarks/test_end_to_end.py::"
    step = "benchmarks/test_model_step.py::"
    return {
        "machine_info": {
            "node": "gpu-runner",
            "cpu": {"brand_raw": "EPYC"},
            "fasttrain": {
                "gpu": "NVIDIA H100 80GB HBM3",
                "driver": "580.1",
                "torch": "2.14.1",
                "cuda": "13.0",
                "dali": "2.4.0",
                "cpu_count": 16,
                "bench_size": "gpu",
            },
        },
        "commit_info": {"id": "0123456789abcdef", "dirty": False},
        "benchmarks": [
            _entry(
                e2e + "test_end_to_end[resnet50-dali]",
                "end_to_end",
                median=1.0,
                samples_per_round=5120,
                backend="dali",
                workload="resnet50-b256",
            ),
            _entry(
                e2e + "test_end_to_end_naive[resnet50]",
                "end_to_end",
                median=2.5,
                samples_per_round=5120,
                backend="naive",
                workload="resnet50-b256",
                precision="fp32",
            ),
            _entry(
                step + "test_model_step[resnet50-b64-bf16]",
                "model_step",
                median=0.4,
                samples_per_round=1280,
                backend="synthetic",
                workload="resnet50-b64",
                batch_size=64,
                alloc=3 * 2**30,
            ),
            _entry(
                step + "test_model_step[resnet50-b256-bf16]",
                "model_step",
                median=1.0,
                samples_per_round=5120,
                backend="synthetic",
                workload="resnet50-b256",
                with_sps=False,
            ),
            _entry(
                "benchmarks/test_loaders.py::test_loader[torch]",
                "loader",
                median=2.0,
                samples_per_round=5120,
                backend="torch",
                workload="loader-b256",
                model=None,
            ),
        ],
        "datetime": "2026-11-25T09:00:00+00:00",
        "version": "5.2.3",
    }


@pytest.fixture
def results_file(tmp_path) -> Path:
    path = tmp_path / "results.json"
    path.write_text(json.dumps(_results()))
    return path


def test_rows_take_samples_per_second_from_extra_info_or_the_median(results_file):
    rows, header = S.load_rows(results_file)
    by = {r.name.split("::")[-1]: r for r in rows}
    dali = by["test_end_to_end[resnet50-dali]"]
    assert dali.samples_per_s == pytest.approx(5120.0)
    assert dali.samples_per_s_low == pytest.approx(5120 / 1.25)  # the slowest round
    assert dali.samples_per_s_high == pytest.approx(5120 / 0.9)
    assert by["test_model_step[resnet50-b256-bf16]"].samples_per_s == pytest.approx(5120.0)  # from stats.median
    assert header["commit_info"]["id"].startswith("0123")


def test_markdown_has_a_section_per_kind_and_the_speedup_over_naive(results_file):
    rows, header = S.load_rows(results_file)
    md = S.to_markdown(rows, header)
    assert md.index("Train step") < md.index("Loaders alone") < md.index("End to end")
    assert "NVIDIA H100 80GB HBM3" in md and "driver 580.1" in md and "commit 0123456789" in md
    dali_line = next(line for line in md.splitlines() if "resnet50-dali" in line)
    assert "5,120.0" in dali_line and "2.50x" in dali_line and "10.00" in dali_line  # 10 GiB peak allocated
    naive_line = next(line for line in md.splitlines() if "naive[resnet50]" in line)
    assert naive_line.rstrip(" |").endswith("-")  # no ratio to itself


def test_baseline_ratios_and_regressions(results_file, tmp_path):
    base = _results()
    worse = copy.deepcopy(base)
    dali = worse["benchmarks"][0]
    dali["extra_info"]["samples_per_s"] *= 0.85  # 15 % slower than the baseline
    step64 = worse["benchmarks"][2]
    step64["extra_info"]["peak_allocated_bytes"] = int(3 * 2**30 * 1.2)  # 20 % more memory
    rows, _ = S.load_rows(_write(tmp_path / "now.json", worse))
    base_rows, _ = S.load_rows(_write(tmp_path / "base.json", base))
    ratios, problems = S.compare(rows, base_rows, max_drop=0.10, max_memory_growth=0.10)
    assert ratios[dali["fullname"]] == pytest.approx(0.85)
    assert len(problems) == 2
    assert "15.0% below" in problems[0] and "20.0% above" in problems[1]
    _, none = S.compare(rows, base_rows, max_drop=0.20, max_memory_growth=0.25)
    assert none == []


def test_missing_baseline_benchmarks_fail_only_when_asked(tmp_path):
    base = _results()
    now = copy.deepcopy(base)
    gone = now["benchmarks"].pop(0)  # e.g. DALI skipped on the runner
    rows, _ = S.load_rows(_write(tmp_path / "now.json", now))
    base_rows, _ = S.load_rows(_write(tmp_path / "base.json", base))
    assert S.compare(rows, base_rows, max_drop=0.1, max_memory_growth=0.1)[1] == []
    _, problems = S.compare(rows, base_rows, max_drop=0.1, max_memory_growth=0.1, fail_missing=True)
    assert problems == [f"{gone['fullname']}: in the baseline but not in this run (skipped, failed or renamed)"]


def test_main_writes_markdown_and_plot_and_fails_on_regression(results_file, tmp_path, capsys):
    out, png = tmp_path / "summary.md", tmp_path / "plots" / "summary.png"
    assert S.main([str(results_file), "-o", str(out), "--plot", str(png)]) == 0
    assert "### End to end" in out.read_text()
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    slower = _results()
    for b in slower["benchmarks"]:
        b["extra_info"].pop("samples_per_s", None)
        b["stats"]["median"] *= 1.5
    now = _write(tmp_path / "slower.json", slower)
    assert S.main([str(now), "--baseline", str(results_file)]) == 1
    captured = capsys.readouterr()
    assert "Regressions against the baseline" in captured.out and "regression:" in captured.err
    assert "0.67x" in captured.out


def test_empty_results_say_so(tmp_path):
    path = _write(tmp_path / "empty.json", {"machine_info": {}, "commit_info": {}, "benchmarks": []})
    rows, header = S.load_rows(path)
    assert "No benchmarks" in S.to_markdown(rows, header)


def test_a_real_pytest_benchmark_json_is_understood(tmp_path):
    """Run pytest-benchmark on a trivial pedantic benchmark that fills extra_info like benchmarks/ does."""
    (tmp_path / "test_tiny.py").write_text(
        textwrap.dedent("""
        def test_tiny(benchmark):
            benchmark.pedantic(lambda: sum(range(1000)), rounds=3, iterations=1, warmup_rounds=1)
            benchmark.extra_info.update(samples_per_round=8, kind="model_step", model="smallcnn",
                                        batch_size=8, precision="fp32", backend="synthetic", workload="w")
    """)
    )
    out = tmp_path / "real.json"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "-q",
            "-p",
            "no:cacheprovider",
            "--rootdir",
            str(tmp_path),
            str(tmp_path / "test_tiny.py"),
            f"--benchmark-json={out}",
        ],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    rows, _ = S.load_rows(out)
    (row,) = rows
    assert row.kind == "model_step" and row.batch_size == 8 and row.samples_per_s > 0
    assert row.rounds == 3
    assert "test_tiny" in S.to_markdown(rows)


def _write(path: Path, data: dict) -> Path:
    path.write_text(json.dumps(data))
    return path


@pytest.mark.parametrize(
    "name, file",
    [
        ("NVIDIA H100 80GB HBM3", "gpu-nvidia-h100-80gb-hbm3.json"),
        ("NVIDIA H200", "gpu-nvidia-h200.json"),
        ("Tesla T4\n", "gpu-tesla-t4.json"),
        ("NVIDIA A100-SXM4-40GB", "gpu-nvidia-a100-sxm4-40gb.json"),
    ],
)
def test_one_baseline_per_gpu_model_named_by_nvidia_smi(name, file, capsys):
    assert S.baseline_path(name) == Path("benchmarks/baselines") / file
    assert S.main(["--baseline-for", name]) == 0
    assert capsys.readouterr().out.strip() == f"benchmarks/baselines/{file}"
    with pytest.raises(ValueError, match="no GPU model name"):
        S.baseline_path("  ")


def test_the_gpu_workflow_pins_the_torch_the_tree_is_tested_with():
    """The GPU workflow's constraints pinned torch 2.11 / torchvision 0.26 while the tree was tested on 2.14 / 0.29,
    and its baseline was named for one GPU model."""
    from importlib import metadata

    pins = dict(
        line.split("==")
        for line in (ROOT / "benchmarks" / "constraints-gpu.txt").read_text().splitlines()
        if "==" in line and not line.startswith("#")
    )
    for dist in ("torch", "torchvision"):
        assert pins[dist] == metadata.version(dist).split("+")[0], dist
    workflow = (ROOT / ".github" / "workflows" / "gpu-benchmarks.yml").read_text()
    assert "--baseline-for" in workflow and "gpu-h100.json" not in workflow
