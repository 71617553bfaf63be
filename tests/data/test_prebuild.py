"""The dataset index read or built in a forked process while the command imports torch
(:mod:`fasttrain.data.prebuild`). The fork is only safe in a process with one thread, which a pytest process is
not (numpy's BLAS pool): each case runs in a fresh interpreter that imports neither numpy nor torch before it
forks, as the command line does."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the early build forks (Linux only)")

SCRIPT = r"""
import json, os, sys
from dataclasses import replace
from fasttrain.config import DataConfig, ConfigError
from fasttrain.data import prebuild

root, case = sys.argv[1], sys.argv[2]
data = DataConfig(root=root)
out = {}
if case == "thread-first":
    import threading
    threading.Thread(target=threading.Event().wait, daemon=True).start()
if case == "sigchld-ignored":
    import signal
    signal.signal(signal.SIGCHLD, signal.SIG_IGN)
if case == "exit":  # registered before start(): runs after its exit handler (last in, first out)
    import atexit

    def reaped():
        try:
            os.waitpid(prebuild_pid[0], os.WNOHANG)  # (0, 0) while it runs, (pid, status) for an unreaped one
            print(json.dumps({"reaped_at_exit": False}))
        except ChildProcessError:
            print(json.dumps({"reaped_at_exit": True}))

    prebuild_pid = []
    atexit.register(reaped)
out["started"] = prebuild.start(data)
out["pid"] = prebuild._child.pid if prebuild._child else None
if case == "exit":
    prebuild_pid.append(out["pid"])
if case == "same":
    got = prebuild.take(data, root)
    from fasttrain.data.index import load_or_build
    here = load_or_build(data, root)  # the cache the child wrote: read, not built
    out.update(
        reused=got.reused, here_reused=here.reused, same_fingerprint=got.index.fingerprint == here.index.fingerprint,
        samples=got.index.samples, splits=sorted(got.index.splits),
        same_splits=all((got.index.splits[k][0] == here.index.splits[k][0]).all() for k in here.index.splits),
        again=prebuild.take(data, root),
    )
elif case == "other":
    out["taken"] = prebuild.take(replace(data, val_fraction=0.25), root)
elif case == "error":
    try:
        prebuild.take(data, root)
        out["error"] = None
    except ConfigError as e:
        out["error"] = str(e)
    from fasttrain.data.index import load_or_build
    try:
        load_or_build(data, root)
    except ConfigError as e:
        out["here"] = str(e)
if out["pid"] and case != "exit":
    try:
        os.waitpid(out["pid"], os.WNOHANG)
        out["child_left"] = True
    except ChildProcessError:  # not a child of this process any more: reaped
        out["child_left"] = False
print(json.dumps(out), flush=True)
"""


def image_tree(root: Path, classes: int = 3, per_class: int = 6) -> Path:
    rng = np.random.default_rng(0)
    for c in range(classes):
        d = root / "train" / f"class{c}"
        d.mkdir(parents=True)
        for i in range(per_class):
            Image.fromarray(rng.integers(0, 255, (8, 8, 3), dtype=np.uint8)).save(d / f"{i}.png")
    return root


def run_case(root: Path, case: str, cache: Path, **env: str) -> dict:
    done = subprocess.run(
        [sys.executable, "-c", SCRIPT, str(root), case],
        env={**os.environ, "FASTTRAIN_CACHE": str(cache), **env}, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    out: dict = {}
    for line in done.stdout.splitlines():
        out.update(json.loads(line))
    return out


def test_the_child_builds_the_index_the_process_then_takes(tmp_path):
    got = run_case(image_tree(tmp_path / "data"), "same", tmp_path / "cache")
    assert got["started"] and got["pid"] != os.getpid()
    assert got["reused"] is False  # the child built it (no index existed) ...
    assert got["here_reused"] is True  # ... and wrote it where this process then finds it current
    assert got["same_fingerprint"] and got["same_splits"]
    assert got["samples"] == 18 and got["splits"] == ["train", "val"]
    assert got["again"] is None  # taken once
    assert got["child_left"] is False  # reaped


def test_other_settings_stop_the_child_and_leave_the_build_to_the_process(tmp_path):
    cache = tmp_path / "cache"
    got = run_case(image_tree(tmp_path / "data"), "other", cache)
    assert got["started"] and got["taken"] is None
    assert got["child_left"] is False
    leftovers = [p.name for p in (cache / "index").glob("*")] if (cache / "index").is_dir() else []
    assert all(name.endswith(".npz") for name in leftovers), leftovers  # stopped: no temp file behind


def test_a_refused_root_is_the_error_the_process_would_raise_itself(tmp_path):
    root = tmp_path / "data"
    (root / "train" / "a").mkdir(parents=True)
    (root / "train" / "a" / "notes.txt").write_text("no image here")
    got = run_case(root, "error", tmp_path / "cache")
    assert got["started"]
    assert got["error"] and got["error"] == got["here"]
    assert got["child_left"] is False


def test_a_command_that_ends_without_taking_it_stops_the_child(tmp_path):
    got = run_case(image_tree(tmp_path / "data"), "exit", tmp_path / "cache")
    assert got["started"] and got["reaped_at_exit"] is True


@pytest.mark.parametrize("case", ["thread-first", "sigchld-ignored", "torchrun", "relative"])
def test_no_fork_where_it_would_not_be_safe_or_would_not_be_taken(tmp_path, case):
    root = image_tree(tmp_path / "data")
    env = {"TORCHELASTIC_RUN_ID": "job", "WORLD_SIZE": "2"} if case == "torchrun" else {}
    if case == "relative":
        root = Path(os.path.relpath(root))
    got = run_case(root, case, tmp_path / "cache", **env)
    assert got["started"] is False and got["pid"] is None


def _cli(tmp_path: Path, *args: str) -> str:
    done = subprocess.run(
        [sys.executable, "-m", "fasttrain", "train", "-v", *args],
        env={**os.environ, "FASTTRAIN_CACHE": str(tmp_path / "cache")}, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    started = [line for line in done.stderr.splitlines() if "built or read in process" in line]
    taken = [line for line in done.stderr.splitlines() if "dataset index: taken from process" in line]
    assert len(started) == 1 and len(taken) == 1, done.stderr[-3000:]
    assert started[0].split("process ")[1].split()[0] == taken[0].rsplit(" ", 1)[1]  # the same child
    return done.stderr


def test_fasttrain_train_and_its_resume_take_the_index_their_child_read_or_built(tmp_path):
    root = image_tree(tmp_path / "data", per_class=10)
    sets = [
        f"data.root={root}", f"train.runs_dir={tmp_path / 'runs'}", "data.loader=torch", "data.workers=0",
        "runtime.compile=off", "train.epochs=1", "train.max_steps=1", "train.batch_size=8",
    ]  # fmt: skip
    first = _cli(tmp_path, "quickstart", *[a for s in sets for a in ("--set", s)])
    assert "dataset index built" in first
    assert list((tmp_path / "cache" / "index").glob("index-*.npz"))  # it wrote the index as the run would
    (run,) = (tmp_path / "runs").iterdir()
    again = _cli(tmp_path, "--resume", str(run), "--set", "train.epochs=2")  # the run's config.toml, its data
    assert "dataset index reused" in again and "epoch 2/2" in again
    last = _cli(tmp_path, "--resume", str(run / "checkpoints" / "last.pt"), "--set", "train.epochs=3")  # a file
    assert "dataset index reused" in last and "epoch 3/3" in last


ORPHAN = r"""
import json, os, signal, time
from fasttrain.data import prebuild

parent = os.getpid()
r, w = os.pipe()
pid = os.fork()
if pid == 0:  # as the early build's child starts: bound to its parent, then long work
    prebuild._end_with(parent)
    os.write(w, b"bound")
    for fd in (1, 2):  # not holding the test's pipes open: a failure is seen at the test's deadline
        os.dup2(os.open(os.devnull, os.O_WRONLY), fd)
    time.sleep(120)
    os._exit(0)
assert os.read(r, 5) == b"bound"  # the parent dies after the binding (before it, the child's own check ends it)
print(json.dumps({"pid": pid}), flush=True)
os.kill(parent, signal.SIGKILL)  # no exit handler runs
"""


def _running(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, IndexError):
        return False
    return state not in ("Z", "X")


def test_the_child_ends_when_its_parent_is_killed(tmp_path):
    done = subprocess.run([sys.executable, "-c", ORPHAN], capture_output=True, text=True, timeout=120)
    assert done.returncode == -9, done.stderr[-3000:]
    pid = json.loads(done.stdout.splitlines()[-1])["pid"]
    deadline = time.monotonic() + 20
    while _running(pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    if _running(pid):  # do not leave it behind
        os.kill(pid, 9)
        pytest.fail("the child kept running after its parent was killed")
