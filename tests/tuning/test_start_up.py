"""What ``fasttrain autotune`` costs before it measures anything: on CPU, a job too short to tune is answered
without importing torchvision or ``torch._dynamo`` (1.5 s more start-up than torch itself), so the answer
costs little beside the training it spares."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
HEAVY = ("torchvision", "torch._dynamo", "torch._inductor", "sympy")


def test_the_cpu_answer_for_a_job_too_short_to_tune_imports_neither_torchvision_nor_dynamo(shapes_root, tmp_path):
    out = tmp_path / "out"
    args = [
        "autotune",
        "quickstart",
        "--set",
        f"data.root={shapes_root}",
        "--set",
        "train.epochs=1",
        "--set",
        f"train.runs_dir={tmp_path / 'runs'}",
        "--set",
        "runtime.device=cpu",
        "--no-cache",
        "--out",
        str(out),
        "-q",
    ]
    code = (
        "import json, sys\n"
        "from fasttrain.cli import main\n"
        f"rc = main({args!r})\n"
        f"print(json.dumps({{'rc': rc, 'loaded': [m for m in {HEAVY!r} if m in sys.modules]}}))\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    report = json.loads((out / "autotune.json").read_text(encoding="utf-8"))
    assert result["rc"] == 0 and report["ok"] and report["shortcut"] == "too-short"  # the path this is about
    assert report["chosen_batch"] == report["given_batch"]
    assert result["loaded"] == [], f"the short-job answer imported {result['loaded']}"
