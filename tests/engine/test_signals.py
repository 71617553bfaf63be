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


@pytest.mark.parametrize(
    ("sig", "group"), [(signal.SIGTERM, False), (signal.SIGUSR1, False), (signal.SIGINT, False), (signal.SIGTERM, True)]
)
def test_a_signal_saves_the_run_mid_epoch_and_prints_the_resume_command(shapes_root, tmp_path, sig, group):
    """``group``: to the process group, data loader workers included (a terminal's Ctrl-C, ``kill -- -PGID``,
    torchrun's agent): SIGTERM ended the workers, and the run failed on "DataLoader worker ... is killed by signal"
    before its stop could save."""
    import os

    runs = tmp_path / "runs"
    # About 110 steps per epoch, 20 epochs: still in the first epoch when the signal comes.
    workers = ("data.workers=1",) if group else ()
    cfg = tiny_cfg(shapes_root, runs, "train.max_steps=0", "train.epochs=20", "train.batch_size=4", *workers)
    proc = subprocess.Popen(
        [sys.executable, "-m", "fasttrain", "train", *cli_args(cfg), "-q"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=group,
    )
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and proc.poll() is None:
            found = list(runs.glob("*/metrics.jsonl")) if runs.is_dir() else []
            if found and len(_step_records(found[0])) >= 3:
                break
            time.sleep(0.05)
        assert proc.poll() is None, proc.communicate()
        if group:
            os.killpg(proc.pid, sig)
        else:
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


def test_a_run_stopped_between_two_logged_steps_logs_what_the_straight_run_logs(shapes_root, tmp_path, monkeypatch):
    """The stop's checkpoint moved the steps since the last logged one into the epoch's sums: the resumed run's
    next step record averaged fewer steps, and the epoch's train_loss was summed in another order. It now keeps
    that window as it is (one process: nothing to sum over processes)."""
    import os

    from fasttrain.engine import train
    from fasttrain.tasks.classify import ClassifyTask

    def records(run):
        lines = [json.loads(ln) for ln in (run / "metrics.jsonl").read_text().splitlines()]
        drop = ("samples_per_s", "epoch_time_s", "eval_time_s", "max_memory_gib")
        return [{k: v for k, v in r.items() if k not in drop} for r in lines if r.get("event") in (None, "step")]

    extra = ("train.log_every=4", "train.max_steps=9")
    straight = train(tiny_cfg(shapes_root, tmp_path / "a", *extra, epochs=1, max_steps=9), progress=False)
    plain_end = ClassifyTask.on_step_end

    def stop_at_5(self, state, batch, run_dir):
        plain_end(self, state, batch, run_dir)
        if state.step == 5:
            os.kill(os.getpid(), signal.SIGUSR1)  # between the logged steps 4 and 8

    monkeypatch.setattr(ClassifyTask, "on_step_end", stop_at_5)
    with pytest.raises(KeyboardInterrupt):
        train(tiny_cfg(shapes_root, tmp_path / "b", *extra, epochs=1, max_steps=9), progress=False)
    monkeypatch.setattr(ClassifyTask, "on_step_end", plain_end)
    (run,) = (tmp_path / "b").iterdir()
    assert load_checkpoint(run / "checkpoints" / "last.pt")["state"]["step"] == 5
    train(resume=run, progress=False)
    assert records(run) == records(straight.run_dir)


def test_the_same_signal_delivered_twice_at_once_is_one_signal(monkeypatch):
    """A scheduler that signals every process of a job reaches a torchrun worker directly and through its agent:
    the second delivery, milliseconds later, stopped the worker at once with nothing saved."""
    import fasttrain.stop as S

    now = [100.0]
    monkeypatch.setattr(S.time, "monotonic", lambda: now[0])
    request = S.StopRequest()
    request.handle(signal.SIGTERM, None)
    now[0] += 0.05
    request.handle(signal.SIGTERM, None)  # the same one again: still a save at the next step
    assert request.signum == signal.SIGTERM
    with pytest.raises(S.Stopped) as e:
        request.handle(signal.SIGINT, None)  # another signal: stop now
    assert not e.value.saved
    now[0] += S.REPEAT_S
    with pytest.raises(S.Stopped):
        request.handle(signal.SIGTERM, None)  # the same signal, later: a second one


def test_workers_that_stopped_on_a_signal_are_not_reported_as_failed():
    """Ranks that leave before rank 0 has written its checkpoint made the agent end rank 0 (-15); the exit codes
    {143, -15} read as a failed worker, exit status 1."""
    from types import SimpleNamespace

    from fasttrain.cli import _stopped_workers

    def failed(*codes):
        return SimpleNamespace(failures={r: SimpleNamespace(exitcode=c) for r, c in enumerate(codes)})

    assert _stopped_workers(failed(143, 143)) == 143 and _stopped_workers(failed(143, -15)) == 143
    assert _stopped_workers(failed(130, -9)) == 130
    assert _stopped_workers(failed(1, 143)) == 0 and _stopped_workers(failed(-15)) == 0
    assert _stopped_workers(failed(143, 130)) == 0  # two signals: not one stop
