"""A run stopped by a signal (Ctrl-C, SLURM's and Kubernetes' SIGTERM, SLURM's SIGUSR1) saves where it is and
says how to resume, sent for real to a training process."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time

import pytest
from tinyrun import cli_args, tiny_cfg

from fasttrain.checkpoint import load_checkpoint


def _step_records(metrics) -> list[dict]:
    if not metrics.is_file():
        return []
    lines = [json.loads(ln) for ln in metrics.read_text().splitlines() if ln.endswith("}")]
    return [r for r in lines if "train_loss" not in r and "loss" in r]


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGUSR1, signal.SIGINT])
def test_a_signal_saves_the_run_mid_epoch_and_prints_the_resume_command(shapes_root, tmp_path, sig):
    runs = tmp_path / "runs"
    # About 110 steps per epoch, 20 epochs: still in the first epoch when the signal comes.
    cfg = tiny_cfg(shapes_root, runs, "train.max_steps=0", "train.epochs=20", "train.batch_size=4")
    proc = subprocess.Popen(
        [sys.executable, "-m", "fasttrain", "train", *cli_args(cfg), "-q"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and proc.poll() is None:
            found = list(runs.glob("*/metrics.jsonl")) if runs.is_dir() else []
            if found and len(_step_records(found[0])) >= 3:
                break
            time.sleep(0.05)
        assert proc.poll() is None, proc.communicate()
        proc.send_signal(sig)
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    (run,) = runs.iterdir()
    assert proc.returncode == 128 + sig, err  # as a shell reports a process the signal ended: 143 for SIGTERM
    assert f"stopped by {signal.Signals(sig).name}" in err and f"fasttrain train --resume {run}" in err
    ckpt = load_checkpoint(run / "checkpoints" / "last.pt")
    logged = _step_records(run / "metrics.jsonl")[-1]["step"]
    # Saved where it stopped, inside the first epoch: no logged step is lost.
    assert ckpt["state"]["epoch"] == 0 and ckpt["position"]["epoch"] == 0
    assert ckpt["state"]["step"] >= logged >= 3 and ckpt["position"]["micro"] == ckpt["state"]["step"]
