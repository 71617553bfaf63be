"""The Python API the README shows: from fasttrain import train, autotune, bench, predict, load_config."""

from __future__ import annotations

import subprocess
import sys

import fasttrain


def test_importing_the_package_imports_no_torch_and_initialises_nothing():
    code = ("import sys, fasttrain; from fasttrain import __version__; "
            "assert 'torch' not in sys.modules and 'nvidia.dali' not in sys.modules, sorted(sys.modules)")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=fasttrain.__path__[0] + "/..")


def test_entry_points_train_and_predict_from_python(shapes_root, tmp_path):
    from fasttrain import autotune, bench, load_config, predict, train

    cfg = load_config("quickstart", [f"data.root={shapes_root}", f"train.runs_dir={tmp_path}", "train.epochs=1",
                                     "train.max_steps=2", "data.workers=0", "data.loader=torch"])
    assert cfg.name == "quickstart"  # a packaged name, resolved as the command line does
    result = train(cfg, progress=False)
    assert result.history[-1]["epoch"] == 1 and (result.run_dir / "train.log").stat().st_size > 0
    (record,) = predict(result.run_dir, [str(next(shapes_root.rglob("*.png")))], device="cpu")
    assert record["class"] in ("circle", "square", "triangle")
    # bench, predict and autotune are callable modules: the entry point and its helpers in one name
    assert callable(bench) and callable(autotune) and bench.bench.__name__ == "bench"
    import fasttrain.bench as bench_module

    assert bench_module is bench
