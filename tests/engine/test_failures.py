"""Never fatal, never silent: full disks, read-only folders, a second process, bad values, named errors.

Disk failures are simulated below one folder by :mod:`faultfs` (tests run as root, which ignores permission
bits). Runs are tiny: 32 px shapes, a few steps.
"""

import json
import logging
import math
import os
import subprocess
import sys

import pytest
import torch
from faultfs import FaultFS
from tinyrun import cli_args, tiny_cfg

from fasttrain.checkpoint import load_checkpoint
from fasttrain.cli import main
from fasttrain.config import ConfigError
from fasttrain.engine import train
from fasttrain.io import WriteError


def cli_set(root, runs, *extra):
    """The same tiny run as ``--set`` arguments for the command line."""
    return cli_args(tiny_cfg(root, runs, *extra))


class Stop(Exception):
    pass


def stop_after(epoch):
    def hook(state, record):
        if record["epoch"] == epoch:
            raise Stop

    return hook


def one_run(runs):
    (run,) = [p for p in runs.iterdir() if p.is_dir()]
    return run


def one_line_error(err: str) -> str:
    """The one error line, last on stderr (warnings logged before it may precede it), and no traceback."""
    lines = err.strip().splitlines()
    assert "Traceback" not in err and lines, err
    assert lines[-1].startswith("fasttrain: error: ") and sum("error" in x for x in lines) == 1, err
    return lines[-1]


# -- disks and permissions ------------------------------------------------------------------------------------
def test_disk_full_during_a_checkpoint_keeps_the_previous_one(shapes_root, tmp_path, monkeypatch):
    runs = tmp_path / "runs"

    def fill_disk_after_epoch_1(state, record):
        if record["epoch"] == 1:
            FaultFS(monkeypatch).disk_full(one_run(runs) / "checkpoints", room=4096)

    with pytest.raises(WriteError) as e:
        train(tiny_cfg(shapes_root, runs), progress=False, on_epoch_end=fill_disk_after_epoch_1)
    monkeypatch.undo()
    msg = str(e.value)
    assert "No space left on device" in msg and "checkpoints" in msg and "is intact" in msg
    assert "\n" not in msg
    ckpt_dir = one_run(runs) / "checkpoints"
    assert load_checkpoint(ckpt_dir / "last.pt")["state"]["epoch"] == 1  # the previous checkpoint
    assert not [p for p in ckpt_dir.iterdir() if p.name.endswith(".tmp")]
    assert [r["epoch"] for r in train(resume=one_run(runs), progress=False).history] == [1, 2]


def test_torn_metrics_line_from_a_full_disk_is_dropped_on_resume(shapes_root, tmp_path, monkeypatch, caplog):
    runs = tmp_path / "runs"

    def fill_disk_after_epoch_1(state, record):
        if record["epoch"] == 1:
            FaultFS(monkeypatch).disk_full(one_run(runs) / "metrics.jsonl", room=12)

    with pytest.raises(WriteError, match=r"metrics\.jsonl: No space left on device"):
        train(tiny_cfg(shapes_root, runs, "train.epochs=3"), progress=False, on_epoch_end=fill_disk_after_epoch_1)
    monkeypatch.undo()
    run = one_run(runs)
    lines = (run / "metrics.jsonl").read_text().splitlines()
    assert json.loads(lines[0])["event"] == "startup"
    assert [json.loads(x)["epoch"] for x in lines[1:-1]] == [1] * (len(lines) - 2)  # epoch 1's step + epoch records
    assert lines[-1] == '{"event": "s'  # epoch 2's first record, torn: 12 bytes made it to disk
    with caplog.at_level(logging.WARNING, logger="fasttrain"):
        result = train(resume=run, progress=False)
    assert [r["epoch"] for r in result.history] == [1, 2, 3]
    records = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]  # every line whole again
    assert [r["epoch"] for r in records if "event" not in r] == [1, 2, 3]
    assert any(str(run / "metrics.jsonl") in r.getMessage() and "dropped" in r.getMessage() for r in caplog.records)


def test_read_only_runs_folder_is_one_line(shapes_root, tmp_path, monkeypatch, capsys):
    FaultFS(monkeypatch).read_only(tmp_path / "ro")
    code = main(["train", *cli_set(shapes_root, tmp_path / "ro" / "runs"), "-q"])
    line = one_line_error(capsys.readouterr().err)
    assert code == 1
    assert "train.runs_dir" in line and str(tmp_path / "ro" / "runs") in line and "Read-only file system" in line


def test_read_only_home_for_the_demo_dataset_is_one_line(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("FASTTRAIN_CACHE", str(tmp_path / "home" / ".cache" / "fasttrain"))
    FaultFS(monkeypatch).read_only(tmp_path / "home")
    code = main(["train", "--set", f"train.runs_dir={tmp_path / 'runs'}", "-q"])
    line = one_line_error(capsys.readouterr().err)
    assert code == 1
    assert "demo dataset" in line and "Read-only file system" in line and "FASTTRAIN_CACHE" in line


@pytest.mark.parametrize("command", ["bench", "check-data", "predict"])
def test_outputs_written_at_the_end_are_checked_at_the_start(command, shapes_root, tmp_path, monkeypatch, capsys):
    """An unwritable --json / --skip-list / --out-dir fails at once, before the work, in one line."""
    import fasttrain.benchmark
    import fasttrain.data.checks
    import fasttrain.prediction

    def never(*a, **k):
        raise AssertionError("the work started although its output cannot be written")

    for mod, name in (
        (fasttrain.benchmark, "bench"),
        (fasttrain.data.checks, "check_data"),
        (fasttrain.prediction, "predict"),
    ):
        monkeypatch.setattr(mod, name, never)
    ro = tmp_path / "ro"
    ro.mkdir()
    FaultFS(monkeypatch).read_only(ro)
    argv = {
        "bench": ["bench", "--json", str(ro / "b.json"), "--set", f"data.root={shapes_root}"],
        "check-data": ["check-data", str(shapes_root), "--skip-list", str(ro / "skip.txt")],
        "predict": ["predict", str(tmp_path / "x.pt"), "img.png", "--out-dir", str(ro / "out")],
    }[command]
    code = main(argv)
    line = one_line_error(capsys.readouterr().err)
    assert code == 1 and "Read-only file system" in line and str(ro) in line
    flag = {"bench": "--json", "check-data": "--skip-list", "predict": "--out-dir"}[command]
    assert flag in line


def test_make_data_on_a_full_disk_leaves_nothing(tmp_path, monkeypatch, capsys):
    FaultFS(monkeypatch).disk_full(tmp_path, room=30_000)
    code = main(["make-data", "shapes", str(tmp_path / "d"), "--train-per-class", "40", "--size", "32"])
    monkeypatch.undo()
    err = capsys.readouterr().err.strip()
    assert code == 1 and len(err.splitlines()) == 1 and "Traceback" not in err
    assert "No space left on device" in err and str(tmp_path / "d") in err
    assert os.listdir(tmp_path) == []  # no partial dataset, no temp folder


def test_make_data_read_only_is_one_line(tmp_path, monkeypatch, capsys):
    FaultFS(monkeypatch).read_only(tmp_path)
    code = main(["make-data", "shapes", str(tmp_path / "d"), "--train-per-class", "2"])
    err = capsys.readouterr().err.strip()
    assert code == 1 and len(err.splitlines()) == 1 and "Read-only file system" in err


# -- temp files and the run lock ------------------------------------------------------------------------------
def test_temp_files_of_interrupted_writes_are_removed(shapes_root, tmp_path):
    runs = tmp_path / "runs"
    with pytest.raises(Stop):
        train(tiny_cfg(shapes_root, runs), progress=False, on_epoch_end=stop_after(1))
    run = one_run(runs)
    # what a kill -9 during checkpoint / metrics writes leaves behind, and a file of the user's
    stale = [
        run / "checkpoints" / ".last.pt.k3j_9x2a.tmp",
        run / "checkpoints" / ".best.pt.abcdefgh.tmp",
        run / ".metrics.jsonl.12345678.tmp",
    ]
    for p in stale:
        p.write_bytes(b"partial")
    mine = run / "checkpoints" / "notes.tmp"
    mine.write_text("keep me")
    draft = run / ".draft.abcdefgh.tmp"  # named as a temp file is, but of no file fasttrain writes
    draft.write_text("mine too")

    def leave_a_temp_file(state, record):  # killed mid-write, then the run ends normally
        (run / "checkpoints" / ".last.pt.zzzzzzzz.tmp").write_bytes(b"partial")

    train(resume=run, progress=False, on_epoch_end=leave_a_temp_file)
    assert not any(p.exists() for p in stale)
    assert not (run / "checkpoints" / ".last.pt.zzzzzzzz.tmp").exists()  # removed when the run ended
    assert mine.read_text() == "keep me" and draft.read_text() == "mine too"


def test_a_second_process_on_the_same_run_folder_is_refused(shapes_root, tmp_path, capsys):
    runs = tmp_path / "runs"
    with pytest.raises(Stop):
        train(tiny_cfg(shapes_root, runs), progress=False, on_epoch_end=stop_after(1))
    run = one_run(runs)
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import fcntl, os, sys, time\n"
            f"fd = os.open({str(run / '.lock')!r}, os.O_RDWR | os.O_CREAT)\n"
            "fcntl.flock(fd, fcntl.LOCK_EX)\nos.ftruncate(fd, 0)\nos.write(fd, str(os.getpid()).encode())\n"
            "print('locked', flush=True)\ntime.sleep(120)\n",
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "locked"
        code = main(["train", "--resume", str(run), "-q"])
        line = one_line_error(capsys.readouterr().err)
        assert code == 1 and "in use by another fasttrain process" in line and f"pid {holder.pid}" in line
        assert load_checkpoint(run / "checkpoints" / "last.pt")["state"]["epoch"] == 1  # nothing ran
    finally:
        holder.kill()  # a killed holder leaves its lock file behind: it must not block
        holder.wait()
    assert main(["train", "--resume", str(run), "-q"]) == 0
    assert load_checkpoint(run / "checkpoints" / "last.pt")["state"]["epoch"] == 2


# -- the end-of-run report of skipped files -------------------------------------------------------------------
def test_run_summary_counts_skipped_files(shapes_root, tmp_path, monkeypatch, caplog):
    from fasttrain.tasks.classify import ClassifyTask

    real = ClassifyTask.make_loader
    bad = str(shapes_root / "train" / "circle" / "broken.png")

    def with_skips(self, split, **kw):  # a loader that met one unreadable file (every loader lists them)
        loader = real(self, split, **kw)
        loader.skipped = [(bad, "cannot be decoded")] if kw["train"] else []
        return loader

    monkeypatch.setattr(ClassifyTask, "make_loader", with_skips)
    with caplog.at_level(logging.INFO, logger="fasttrain"):
        result = train(tiny_cfg(shapes_root, tmp_path / "runs", "train.epochs=1"), progress=False)
    assert result.skipped == [(bad, "cannot be decoded")]
    summary = [r.getMessage() for r in caplog.records if r.getMessage().startswith("epoch 1/1 |")]
    assert len(summary) == 1 and "1 file skipped" in summary[0]
    log_text = (result.run_dir / "train.log").read_text()
    assert "run finished: 1 epochs" in log_text and "1 file skipped" in log_text and bad in log_text


def test_unreadable_images_are_counted_at_the_end_of_the_run(tmp_path, caplog):
    """End to end with the real loader: once the loaders list what they skipped, the run reports it."""
    from fasttrain.data.synthetic import make_shapes_dataset
    from fasttrain.prepare import prepare

    root = make_shapes_dataset(
        tmp_path / "d", train_per_class=20, val_per_class=4, size=32, shapes=("circle", "square")
    )
    broken = root / "train" / "circle" / "zz_broken.png"
    broken.write_bytes(b"\x89PNG\r\n\x1a\n not really")
    cfg = tiny_cfg(root, tmp_path / "runs", "train.epochs=1", "train.batch_size=8", "train.max_steps=0")
    prep = prepare(cfg)
    probe = prep.task.make_loader(prep.source.train, train=True, batch_size=8, backend="torch")
    listed = hasattr(probe, "skipped")
    probe.close()
    if not listed:
        pytest.skip("this checkout's torch loader does not list the files it skipped (loader.skipped) yet")
    with caplog.at_level(logging.INFO, logger="fasttrain"):
        result = train(cfg, progress=False)
    assert str(broken) in [f for f, _ in result.skipped]
    assert str(broken) in (result.run_dir / "train.log").read_text()


# -- values that pass validation but are wrong ----------------------------------------------------------------
def _poison_after(monkeypatch, step):
    """From optimizer step ``step`` on, the model's weights turn NaN (as a diverging run's do)."""
    from fasttrain.tasks.classify import ClassifyTask

    real = ClassifyTask.train_step

    def step_fn(self, state, batch, **kw):
        if state.step + 1 >= step:
            with torch.no_grad():
                next(state.modules["model"].parameters()).fill_(float("nan"))
        return real(self, state, batch, **kw)

    monkeypatch.setattr(ClassifyTask, "train_step", step_fn)


def test_non_finite_loss_stops_the_run_and_keeps_the_last_finite_checkpoint(shapes_root, tmp_path, monkeypatch, capsys):
    _poison_after(monkeypatch, step=4)  # epoch 2 of 3-step epochs
    runs = tmp_path / "runs"
    code = main(["train", *cli_set(shapes_root, runs, "train.epochs=3", "train.checkpoint_every_steps=1"), "-q"])
    line = one_line_error(capsys.readouterr().err)
    assert code == 1 and "not finite" in line and "3 logged steps in a row" in line and "last.pt" in line
    run = one_run(runs)
    ckpt = load_checkpoint(run / "checkpoints" / "last.pt")
    assert ckpt["state"]["step"] == 3  # the mid-epoch checkpoints of steps 4 and 5 were not written
    assert all(torch.isfinite(t).all() for t in ckpt["state"]["modules"]["model"].values())
    records = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in records if "event" not in r] == [1]  # no record of the diverged epoch


def test_a_non_finite_state_is_never_the_best(shapes_root, tmp_path, monkeypatch):
    """A NaN model's accuracy can look fine (argmax of NaN logits is a class): it must not win best.pt."""
    from fasttrain.tasks.classify import ClassifyTask

    _poison_after(monkeypatch, step=4)
    calls = iter(range(1, 100))
    monkeypatch.setattr(ClassifyTask, "eval_metrics", lambda self, sums: {"loss": 1.0, "acc": next(calls) / 10})
    result = train(tiny_cfg(shapes_root, tmp_path / "runs", "train.max_nonfinite_logs=0"), progress=False)
    assert [r["best"] for r in result.history] == [True, False]
    best = load_checkpoint(result.run_dir / "checkpoints" / "best.pt")
    assert best["state"]["epoch"] == 1 and best["best_value"] == pytest.approx(0.1)
    assert all(torch.isfinite(t).all() for t in best["state"]["modules"]["model"].values())
    last = load_checkpoint(result.run_dir / "checkpoints" / "last.pt")
    assert last["state"]["epoch"] == 1  # epoch 2's NaN weights did not replace it


@pytest.mark.parametrize("metric, hint", [("val_accuracy", "val_acc"), ("val_acc5", "val_acc"), ("acc", "val_loss")])
def test_best_metric_typo_is_refused_before_training(shapes_root, tmp_path, metric, hint):
    runs = tmp_path / "runs"
    with pytest.raises(
        ConfigError,
        match=rf"train\.best_metric: '{metric}' is not a metric of task classify.*"
        rf"{hint}",
    ):
        train(tiny_cfg(shapes_root, runs, f"train.best_metric={metric}"), progress=False)
    assert not runs.exists()  # refused before a run folder was made


def test_best_metric_of_the_task_is_accepted(shapes_root, tmp_path):
    result = train(tiny_cfg(shapes_root, tmp_path, "train.best_metric=val_loss", "train.epochs=1"), progress=False)
    assert result.best_metric == "val_loss" and math.isfinite(result.best_value)
    assert (result.run_dir / "checkpoints" / "best.pt").is_file()


@pytest.mark.parametrize(
    "argv, flag",
    [
        (["shapes", "{out}", "--train-per-class", "-5"], "--train-per-class"),
        (["shapes", "{out}", "--val-per-class", "-1"], "--val-per-class"),
        (["shapes", "{out}", "--size", "0"], "--size"),
        (["drawing", "{out}", "--steps", "0"], "--steps"),
        (["drawing", "{out}", "--sessions", "-2"], "--sessions"),
        (["drawing", "{out}", "--size", "10x-3"], "--size"),
        (["paired", "{out}", "--n", "0"], "--n"),
        (["imagenet", "{out}", "--quality", "0"], "--quality"),
        (["imagenet", "{out}", "--quality", "101"], "--quality"),
        (["imagenet", "{out}", "--n", "2", "--classes", "5"], "--n"),
        (["imagenet", "{out}", "--classes", "0"], "--classes"),
        (["imagenet", "{out}", "--val", "-1"], "--val"),
    ],
)
def test_make_data_refuses_bad_options(tmp_path, capsys, argv, flag):
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as e:
        main(["make-data", *[a.format(out=out) for a in argv]])
    assert e.value.code == 2
    assert f"argument {flag}" in capsys.readouterr().err
    assert not out.exists()


def test_generators_refuse_bad_arguments(tmp_path):
    from fasttrain.data import synthetic

    with pytest.raises(ValueError, match="train_per_class must be >= 1"):
        synthetic.make_shapes_dataset(tmp_path / "a", train_per_class=-5)
    with pytest.raises(ValueError, match="size must be at least 8"):
        synthetic.make_paired_dataset(tmp_path / "b", n=4, size=2)
    with pytest.raises(ValueError, match="quality must be in 1..100"):
        synthetic.make_imagenet_like(tmp_path / "c", n=4, classes=2, quality=0)
    with pytest.raises(ValueError, match="steps must be >= 1"):
        synthetic.make_drawing_dataset(tmp_path / "d", sessions=2, steps=0)
    assert os.listdir(tmp_path) == []


def test_predict_fails_when_an_image_fails(shapes_root, tmp_path, capsys):
    result = train(tiny_cfg(shapes_root, tmp_path / "runs", "train.epochs=1", "train.max_steps=1"), progress=False)
    good = sorted((shapes_root / "val" / "circle").iterdir())[0]
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"nope")
    ckpt = str(result.run_dir / "checkpoints" / "last.pt")
    assert main(["predict", ckpt, str(good), "--device", "cpu"]) == 0
    capsys.readouterr()
    for extra in ([], ["--json"]):
        assert main(["predict", ckpt, str(good), str(bad), "--device", "cpu", *extra]) == 1
        captured = capsys.readouterr()
        assert len(captured.out.strip().splitlines()) == 2  # the good image is still predicted
        assert "1 of 2 images could not be predicted" in captured.err and str(bad) in captured.err


def test_a_read_only_run_folder_is_refused_when_the_resume_starts(shapes_root, tmp_path, monkeypatch, capsys):
    runs = tmp_path / "runs"
    with pytest.raises(Stop):
        train(tiny_cfg(shapes_root, runs), progress=False, on_epoch_end=stop_after(1))
    run = one_run(runs)
    FaultFS(monkeypatch).read_only(run / "checkpoints")
    assert main(["train", "--resume", str(run), "-q"]) == 1
    line = one_line_error(capsys.readouterr().err)
    assert "--resume" in line and "checkpoints" in line and "Read-only file system" in line
    records = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in records if "event" not in r] == [1]  # no record of the diverged epoch


def test_os_errors_from_any_command_are_one_line(monkeypatch, capsys):
    """The shared path (autotune --out uses it too): an OSError naming a file is what + why, exit 1."""
    import errno

    import fasttrain.benchmark

    def denied(cfg, **kw):
        raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), "/srv/shared/tuned")

    monkeypatch.setattr(fasttrain.benchmark, "bench", denied)
    assert main(["bench"]) == 1
    assert one_line_error(capsys.readouterr().err) == (
        "fasttrain: error: cannot write /srv/shared/tuned: Permission denied"
    )


def test_a_full_disk_under_train_log_is_said_once(tmp_path, monkeypatch, capsys):
    from fasttrain.engine import _run_log_handler

    FaultFS(monkeypatch).disk_full(tmp_path / "train.log", room=10)
    handler = _run_log_handler(tmp_path / "train.log")
    logger = logging.getLogger("fasttrain.test_full_log")
    logger.addHandler(handler)
    try:
        for i in range(3):
            logger.warning("record %d with some text", i)
    finally:
        logger.removeHandler(handler)
        handler.close()
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "Traceback" not in err and "Logging error" not in err
    assert "cannot write" in err and "train.log: No space left on device" in err


def test_two_processes_writing_the_demo_data_at_once_both_get_it(tmp_path):
    """Two torchrun ranks start the quickstart together: the one that finishes second uses the first's data."""
    import threading

    from fasttrain.data import synthetic

    real = synthetic.make_shapes_dataset
    both_inside = threading.Barrier(2)

    def slow_make(root, **kw):
        with synthetic.atomic_dir(root) as tmp:
            both_inside.wait(timeout=30)  # both write their temp folder before either renames it
            (tmp / "done").write_text("x")
        return root

    results, errors = [], []

    def rank():
        try:
            results.append(synthetic.demo_dataset(tmp_path))
        except Exception as e:  # noqa: BLE001 - the assertion below reports it
            errors.append(e)

    synthetic.make_shapes_dataset = slow_make
    try:
        threads = [threading.Thread(target=rank) for _ in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=60)
    finally:
        synthetic.make_shapes_dataset = real
    assert errors == [] and len(results) == 2 and results[0] == results[1]
    assert [p.name for p in results[0].parent.iterdir()] == ["shapes-v1"]  # no temp folder left behind


def test_a_run_that_diverges_from_the_start_in_short_epochs_fails_and_says_so(shapes_root, tmp_path, capsys):
    """optim.lr=1e30 with epochs shorter than train.max_nonfinite_logs logged steps: it used to exit 0 with NaN
    losses and no checkpoint at all."""
    runs = tmp_path / "runs"
    args = cli_set(shapes_root, runs, "optim.lr=1e30", "optim.name=sgd", "train.max_steps=3", "train.epochs=1")
    code = main(["train", *args, "-q"])
    line = one_line_error(capsys.readouterr().err)
    assert code == 1 and "weights are not finite" in line and "diverged" in line and "optim.lr" in line, line
    assert "no checkpoint was written" in line
    assert not (one_run(runs) / "checkpoints" / "last.pt").exists()


_HOLD_AND_LEAVE_A_CHILD = """
import os, subprocess, sys, time
from fasttrain.rundir import RunLock
lock = RunLock(sys.argv[1]).acquire()
if sys.argv[2] == "fork":  # as a DataLoader worker is made
    if os.fork() == 0:
        time.sleep(60)
        os._exit(0)
else:  # a child that keeps the descriptor some other way (exec with it passed on)
    subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"], pass_fds=[lock._fd])
print("locked", flush=True)
time.sleep(60)
"""


@pytest.mark.parametrize("how", ["fork", "exec"])
def test_a_lock_held_only_by_children_of_a_killed_process_is_not_held(tmp_path, how):
    """After ``kill -9`` the orphaned DataLoader workers kept the run's flock for 5-15 s, so a resume started at
    once was refused (naming the dead pid), and both torchrun restarts failed."""
    import signal

    from fasttrain.rundir import RunLock, RunLockedError

    run = tmp_path / "run"
    run.mkdir()
    owner = subprocess.Popen(
        [sys.executable, "-c", _HOLD_AND_LEAVE_A_CHILD, str(run), how],
        stdout=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        assert owner.stdout.readline().strip() == "locked"
        with pytest.raises(RunLockedError, match=f"pid {owner.pid}"):  # while the owner runs, it is held
            RunLock(run).acquire()
        owner.kill()
        owner.wait()
        lock = RunLock(run).acquire()  # at once: the child is still alive
        with pytest.raises(RunLockedError, match=f"pid {os.getpid()}"):
            RunLock(run).acquire()  # and now it is ours, held as any lock
        lock.release()
        RunLock(run).acquire().release()
    finally:
        os.killpg(owner.pid, signal.SIGKILL)  # the orphaned child too
    assert sorted(p.name for p in run.iterdir()) == [".lock"]


def test_out_of_host_memory_is_one_line_saying_what_to_lower(shapes_root, tmp_path, monkeypatch, capsys):
    """A real allocation the CPU allocator refuses, inside a training step: it used to be a raw
    DefaultCPUAllocator traceback."""
    from fasttrain.tasks.classify import ClassifyTask

    def step_fn(self, state, batch, **kw):
        torch.empty(2**60, dtype=torch.uint8)  # 1 EiB

    monkeypatch.setattr(ClassifyTask, "train_step", step_fn)
    code = main(["train", *cli_set(shapes_root, tmp_path / "runs"), "-q"])
    line = one_line_error(capsys.readouterr().err)
    assert code == 1 and "out of host memory (an allocation of 1152921504606846976 bytes failed)" in line, line
    assert "train.batch_size" in line and "DefaultCPUAllocator" not in line


def test_a_full_disk_under_train_log_names_the_file_and_never_masks_the_real_error(
    shapes_root, tmp_path, monkeypatch, capsys
):
    """train.log's buffered writes fail at flush and again at close with a bare "[Errno 28] No space left on
    device" (no file named), which used to replace the run's real error. Here the log writes to /dev/full (the
    kernel's ENOSPC) and the checkpoint folder is full too: the error names the checkpoint."""
    from fasttrain.engine import _RunLogHandler

    monkeypatch.setattr(_RunLogHandler, "_open", lambda self: open("/dev/full", "w", encoding="utf-8"))
    runs = tmp_path / "runs"
    code = main(["train", *cli_set(shapes_root, runs), "-q"])
    err = capsys.readouterr().err
    assert code == 0, err  # the run itself was fine
    assert "train.log: No space left on device; logging to the terminal only" in err and "Errno" not in err
    from fasttrain.checkpoint import CheckpointManager

    def full(self, *a, **k):  # the disk fills up before the first checkpoint: that is the error to show
        raise WriteError(f"cannot write checkpoint {self.last}: No space left on device", 28, path=self.last)

    monkeypatch.setattr(CheckpointManager, "save_last", full)
    code = main(["train", *cli_set(shapes_root, runs), "-q"])
    line = one_line_error(capsys.readouterr().err)
    assert code == 1 and "cannot write checkpoint" in line and "last.pt: No space left on device" in line, line


def test_the_commands_last_line_points_to_the_list_of_every_skipped_file(shapes_root, tmp_path, monkeypatch, capsys):
    """It said '(listed in train.log)', which names 20 of them; skipped.txt holds them all."""
    from fasttrain.cli import main
    from fasttrain.tasks.classify import ClassifyTask

    real = ClassifyTask.make_loader
    bad = [(str(shapes_root / "train" / "circle" / f"broken{i}.png"), "cannot be decoded") for i in range(25)]

    def with_skips(self, split, **kw):
        loader = real(self, split, **kw)
        loader.skipped = list(bad) if kw["train"] else []
        return loader

    monkeypatch.setattr(ClassifyTask, "make_loader", with_skips)
    assert main(["train", "-q", *cli_args(tiny_cfg(shapes_root, tmp_path / "runs", "train.epochs=1"))]) == 0
    (run,) = (tmp_path / "runs").iterdir()
    assert f"skipped files: 25 (listed in {run / 'skipped.txt'})" in capsys.readouterr().out
    assert len((run / "skipped.txt").read_text().splitlines()) == 25
