"""Several nodes: attempt numbers every rank derives alike, nodes that agree or refuse, restarts found by the
job and its config, a failed worker's report. The slow cases start two torchrun agents on 127.0.0.1 (c10d
rendezvous, one worker each, gloo on CPU), each in its own working folder standing in for another machine.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

from fasttrain import distributed as D
from fasttrain.agree import NodeFacts, dataset_fingerprint, differences, message
from fasttrain.data.sources import DataSource, Split
from fasttrain.rundir import elastic_run_dir, forget_elastic_run, holds_checkpoints, remember_elastic_run

REPO = next(p for p in Path(__file__).resolve().parents if (p / "pyproject.toml").is_file())
WORKER = REPO / "tests" / "ddp_worker.py"


# -- attempt numbers -------------------------------------------------------------------------------------------
def _attempt(store, ranks, order=None) -> dict[int, int]:
    """One attempt of a job: its ranks join (started in ``order``), each one's attempt number."""
    got: dict[int, int] = {}
    errors: list[BaseException] = []

    def rank(r):
        try:
            got[r] = D.agree_generation(store, r, len(ranks), timeout_s=20)
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=rank, args=(r,)) for r in (order or ranks)]
    for t in threads:
        t.start()
        time.sleep(0.05)  # the later ones find the earlier attempt's keys still there
    for t in threads:
        t.join(30)
    assert not errors, errors
    return got


def test_every_rank_derives_the_same_attempt_number_from_a_store_that_keeps_old_keys():
    """torchrun's store outlives a restart, and each node's agent counts its own restarts (a node restarted for
    another node's failure counts none): the number must come from the store, the same on every rank."""
    store = torch.distributed.HashStore()
    assert set(_attempt(store, [0, 1, 2]).values()) == {1}
    # a restart: ranks 1 and 2 start first and read the dead attempt's answers, which are not theirs
    assert set(_attempt(store, [0, 1, 2], order=[2, 1, 0]).values()) == {2}
    # an attempt that died after rank 0 took its number, before the others came: the next one is new to all
    store.add("fasttrain/generation", 1)
    store.set("fasttrain/hello/1", "a-nonce-of-a-dead-rank")
    assert set(_attempt(store, [0, 1, 2], order=[1, 0, 2]).values()) == {4}


def test_a_rank_whose_rank_0_never_comes_fails_naming_the_timeout():
    store = torch.distributed.HashStore()
    with pytest.raises(TimeoutError, match=r"rank 0 did not answer within 0.3 s \(dist.timeout_s\)"):
        D.agree_generation(store, 1, 2, timeout_s=0.3)


def _gathering(store, world: int, failing: int | None = None) -> dict[int, object]:
    """Each rank's result of one store gather (its list, or the exception it raised); ``failing`` stops first."""
    got: dict[int, object] = {}

    def rank(r):
        if r == failing:
            D.post_failure(store, "p", r, "data.root: no images under /data", where=f"rank {r} (node {r}, host h)")
            return
        try:
            got[r] = D.store_gather(store, "p", "facts/1", r, world, {"rank": r}, timeout_s=20)
        except BaseException as e:  # noqa: BLE001 - asserted below
            got[r] = e

    threads = [threading.Thread(target=rank, args=(r,)) for r in range(world)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    return got


def test_ranks_gather_through_the_store_and_a_rank_that_stopped_ends_the_wait_naming_it():
    got = _gathering(torch.distributed.HashStore(), 3)
    assert got == {r: [{"rank": 0}, {"rank": 1}, {"rank": 2}] for r in range(3)}
    t0 = time.monotonic()
    got = _gathering(torch.distributed.HashStore(), 3, failing=2)
    assert time.monotonic() - t0 < 10  # not the 20 s timeout
    for r in (0, 1):
        assert isinstance(got[r], D.PeerFailed)
        assert str(got[r]).startswith("rank 2 (node 2, host h) stopped: data.root: no images under /data; ")


def test_rank_0s_decision_or_its_error_reaches_every_rank(monkeypatch):
    """Decided before the process group exists (through the store): what rank 0 found, or the error it met,
    the same type with the same message on every rank (not ranks that wait for an answer that never comes)."""
    me = {"rank": 0}
    monkeypatch.setattr(D, "dist_info", lambda env=None: D.DistInfo(rank=me["rank"], world_size=2))
    monkeypatch.setattr(D, "_JOINED", D._Joined(torch.distributed.HashStore(), 1, job="j"))
    monkeypatch.setattr(D, "_DECIDED", {})

    def on_rank(rank, fn):
        me["rank"] = rank
        D._DECIDED.clear()  # each rank counts its own calls
        return D.decide("run", fn, timeout_s=5)

    assert on_rank(0, lambda: {"run_dir": "/runs/a"}) == {"run_dir": "/runs/a"}
    assert on_rank(1, lambda: pytest.fail("only rank 0 decides")) == {"run_dir": "/runs/a"}

    def missing():
        raise FileNotFoundError("--resume: /runs/b is not a run folder")

    D._JOINED.generation = 2  # the next attempt
    with pytest.raises(FileNotFoundError, match=r"^--resume: /runs/b is not a run folder$"):
        on_rank(0, missing)
    # the others say where it was found: their own node may hold what rank 0's lacks
    with pytest.raises(FileNotFoundError, match=r"^--resume: /runs/b is not a run folder \(found by rank 0 \(node "):
        on_rank(1, missing)


def test_rank_0s_error_that_cannot_be_pickled_and_a_failed_rank_end_the_wait_at_once(monkeypatch):
    """An exception type pickle cannot name (defined in a function) still reaches the others, as a RunError with
    its type's name and text; a rank that stopped with an error (told through the store) ends the wait for rank
    0's decision at once, naming it, instead of after dist.timeout_s."""
    from fasttrain.rundir import RunError

    me = {"rank": 0}
    monkeypatch.setattr(D, "dist_info", lambda env=None: D.DistInfo(rank=me["rank"], world_size=3))
    store = torch.distributed.HashStore()
    monkeypatch.setattr(D, "_JOINED", D._Joined(store, 1, job="j"))
    monkeypatch.setattr(D, "_DECIDED", {})

    def on_rank(rank, fn):
        me["rank"] = rank
        D._DECIDED.clear()
        return D.decide("run", fn, timeout_s=30)

    class LocalError(Exception):
        pass

    def fails():
        raise LocalError("the runs folder is read-only")

    with pytest.raises(LocalError):
        on_rank(0, fails)
    t0 = time.monotonic()
    with pytest.raises(RunError, match=r"^LocalError: the runs folder is read-only \(found by rank 0 \(node "):
        on_rank(1, fails)
    D._JOINED.generation = 2  # the next attempt: rank 2 stops before rank 0 decides
    D.post_failure(store, "fasttrain/attempt-2", 2, "data.root: gone", where="rank 2 (node 1, host h)")
    with pytest.raises(D.PeerFailed, match=r"^rank 2 \(node 1, host h\) stopped: data.root: gone"):
        on_rank(1, lambda: pytest.fail("only rank 0 decides"))
    assert time.monotonic() - t0 < 10  # not the 30 s timeout


def test_a_long_decision_is_waited_for_while_rank_0_beats_and_not_once_the_beats_stop(monkeypatch):
    """``decide(..., long=True)`` (the dataset index): rank 0's work may outlast dist.timeout_s while it beats;
    a rank 0 that stops beating (died without a word, its node's agent gone) ends the wait dist.timeout_s after
    the last beat, instead of never."""

    class PerRank(threading.local):  # each rank (thread) its own rank and its own count of decisions
        rank = 0

        def __init__(self):
            self.counts = {}

        def get(self, key, default=None):
            return self.counts.get(key, default)

        def __getitem__(self, key):
            return self.counts[key]

        def __setitem__(self, key, value):
            self.counts[key] = value

    me = PerRank()
    monkeypatch.setattr(D, "dist_info", lambda env=None: D.DistInfo(rank=me.rank, world_size=2))
    monkeypatch.setattr(D, "_DECIDED", me)
    store = torch.distributed.HashStore()
    monkeypatch.setattr(D, "_JOINED", D._Joined(store, 1, job="j"))
    got: dict[int, object] = {}

    def rank(r, fn):
        me.rank = r
        me.counts.clear()
        try:
            got[r] = D.decide("index", fn, timeout_s=1.2, long=True)
        except BaseException as e:  # noqa: BLE001 - asserted below
            got[r] = e

    def slow():
        time.sleep(3.0)  # past the 1.2 s timeout: only the beats (every 0.3 s) keep rank 1 waiting
        return "index"

    threads = [threading.Thread(target=rank, args=(r, slow)) for r in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert got == {0: "index", 1: "index"}
    D._JOINED.generation = 2  # the next attempt: rank 0 beat twice, then died
    store.add("fasttrain/attempt-2/decide/index/1/beats", 2)
    t0 = time.monotonic()
    rank(1, lambda: pytest.fail("only rank 0 decides"))
    assert isinstance(got[1], TimeoutError) and "rank 0 of the job gave no sign of life for 1.2 s" in str(got[1])
    assert time.monotonic() - t0 < 5


def test_beats_given_a_progress_count_go_on_only_while_it_moves():
    """A rank 0 alive but frozen (one blocking call on a hung mount) must not keep the others waiting for good:
    its beat thread beats only when the work's count moved since the last beat."""
    store, count = torch.distributed.HashStore(), [0]
    with D._beating(store, "beats", 0.05, lambda: count[0]):
        time.sleep(0.4)  # eight periods without progress: only the opening beat
        assert int(store.add("beats", 0)) == 1
        count[0] += 1
        deadline = time.monotonic() + 30
        while int(store.add("beats", 0)) < 2 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert int(store.add("beats", 0)) == 2
        time.sleep(0.4)
        assert int(store.add("beats", 0)) == 2  # moved once: one beat
    with D._beating(store, "plain", 0.05):  # no count: a beat every period (rank 0 alive)
        deadline = time.monotonic() + 30
        while int(store.add("plain", 0)) < 3 and time.monotonic() < deadline:
            time.sleep(0.01)
    assert int(store.add("plain", 0)) >= 3


def test_decide_outside_torchrun_just_runs_the_function():
    assert D.decide("x", lambda: 42) == 42


# -- the dataset fingerprint and the comparison ------------------------------------------------------------------
def _source(root: str, names: list[str], *, labels=None, val: int = 2) -> DataSource:
    paths = [f"{root}/train/{n}" for n in names]
    targets = labels or [0 if n.startswith("cat") else 1 for n in names]
    vals = Split("val", [f"{root}/val/cat/v{i}.jpg" for i in range(val)], [0] * val)
    return DataSource(Path(root), "folder", Split("train", paths, targets), vals, class_names=["cat", "dog"])


FILES = [f"cat/{i}.jpg" for i in range(5)] + [f"dog/{i}.jpg" for i in range(5)]


def test_the_fingerprint_is_the_data_under_the_root_wherever_it_is_mounted():
    a = dataset_fingerprint(_source("/mnt/a", FILES))
    assert a == dataset_fingerprint(_source("/data/b", FILES))  # another mount point, the same data
    assert a.counts == {"train": 10, "val": 2}
    assert a != dataset_fingerprint(_source("/mnt/a", FILES[1:]))  # a file missing
    assert a != dataset_fingerprint(_source("/mnt/a", FILES, labels=[1] * 10))  # other targets
    assert a != dataset_fingerprint(_source("/mnt/a", FILES, val=3))  # another validation split


def _facts(rank: int, source: DataSource, **config) -> NodeFacts:
    return NodeFacts(rank, rank, f"host{rank}", dataset_fingerprint(source), {"optim.lr": 0.1, **config}, "v1")


def test_a_node_missing_files_is_named_with_its_folder_and_counts():
    facts = [_facts(0, _source("/a", FILES)), _facts(1, _source("/b", FILES[:3] + FILES[5:]))]
    (diff,) = differences(facts)
    assert diff.startswith("dataset: rank 1 (node 1, host host1) sees 8 train / 2 val samples")
    assert "rank 0 (node 0, host host0) 10 train / 2 val" in diff
    assert "differing folders: train/cat (3 samples there, 5 on rank 0)" in diff and "train/dog" not in diff
    text = message([diff])
    assert text.startswith("the nodes of this job do not agree, so it stops before training (nothing was written)")


def test_config_differences_name_each_setting_and_agreeing_nodes_have_none():
    same = [_facts(0, _source("/a", FILES)), _facts(1, _source("/a", FILES))]
    assert differences(same) == []
    other = [_facts(0, _source("/a", FILES)), _facts(1, _source("/a", FILES), **{"optim.lr": 0.2})]
    assert differences(other) == ["config: rank 1 (node 1, host host1) has optim.lr=0.2 (rank 0: 0.1)"]


def test_many_folders_go_round_bounded_and_the_message_still_says_where(monkeypatch):
    """The per-folder fingerprints go through the store (a value holds 8 MiB): past agree.MAX_FOLDERS folders
    they are grouped by their upper folders, the same on every rank, and the message names the group."""
    import dataclasses

    from fasttrain import agree
    from fasttrain.config import Config

    monkeypatch.setattr(agree, "MAX_FOLDERS", 50)
    files = [f"c{i}/s{k}/{j}.jpg" for i in range(20) for k in range(5) for j in range(3)]  # 100 folders
    ranks = [_source("/a", files, labels=[0] * 300), _source("/b", files[1:], labels=[0] * 299)]
    sent: list[object] = []

    def gather(name, obj, timeout_s=0.0):
        ref = agree.node_facts(ranks[0], Config(), 0)
        if name == "facts":
            ref = dataclasses.replace(ref, dataset=agree.Fingerprint(ref.dataset.digest, ref.dataset.counts))
        elif name == "folder-sizes":
            ref = agree.folder_sizes(ref.dataset.folders)
        else:
            sent.append(obj)
            ref = agree.coarse_folders(
                ref.dataset.folders,
                agree.choose_depth(
                    [
                        agree.folder_sizes(ref.dataset.folders),
                        agree.folder_sizes(agree.dataset_fingerprint(ranks[1]).folders),
                    ]
                ),
            )
        return [ref, obj]

    monkeypatch.setattr(D, "current", lambda: D.DistInfo(rank=1, world_size=2))
    monkeypatch.setattr(D, "gather", gather)
    with pytest.raises(agree.NodesDisagree, match=r"differing folders: train/c0/\.\.\. \(14 samples there, 15 on"):
        agree.check_nodes(ranks[1], Config())
    (folders,) = sent
    assert 0 < len(folders) <= 50  # type: ignore[arg-type]
    whole = agree.dataset_fingerprint(ranks[0]).folders
    assert len(agree.coarse_folders(whole, 0)) <= 50  # even the top folders too many: groups by name hash
    assert agree.coarse_folders(whole, 3) == whole


# -- a failed worker's report ----------------------------------------------------------------------------------------
def test_a_failed_worker_is_named_with_its_reason_and_the_resume_command():
    failures = [
        D.WorkerFailure(0, 1, "RuntimeError: [gloo] Connection closed by peer [127.0.0.1]:1234", 10, "/r/run"),
        D.WorkerFailure(1, 1, "fasttrain: error: cannot write /r/run/x: No space left on device", 10, "/r/run"),
    ]
    text = D.failure_report(failures, 2, lambda run: True)
    assert text.splitlines() == [
        "fasttrain: error: rank 1 failed (exit status 1): cannot write /r/run/x: No space left on device",
        "  (rank 0 ended with it)",
        "continue the run from its last checkpoint with",
        "  fasttrain train --resume /r/run --nproc 2",
    ]
    killed = D.failure_report([D.WorkerFailure(3, -9, "Signal 9 (SIGKILL) received by PID 7", 1)], 4, bool)
    assert killed.splitlines()[0] == "fasttrain: error: rank 3 failed (killed by SIGKILL): the process was killed"
    assert "no run folder was written" in killed
    aborted = D.failure_report([D.WorkerFailure(1, -6, "Signal 6 (SIGABRT) received by PID 8", 1)], 2, bool)
    assert aborted.startswith("fasttrain: error: rank 1 failed (killed by SIGABRT): the process was aborted: with")
    assert "dist.timeout_s" in aborted  # NCCL's watchdog: a collective that waited too long ends so, silently
    assert "has no checkpoint yet" in D.failure_report([D.WorkerFailure(0, 2, "x", 1, "/r/run")], 2, lambda r: False)
    stopped = [D.WorkerFailure(0, -15, "data.root: x", 5), D.WorkerFailure(1, 2, "data.root: y", 5)]
    assert D.failure_report(stopped, 2, bool).startswith(
        "fasttrain: error: rank 1 failed (exit status 2): data.root: y"
    )


def test_a_collective_that_ran_out_of_time_names_dist_timeout_s(monkeypatch):
    monkeypatch.setattr(D, "_JOINED", D._Joined(timeout_s=60.0))
    err = RuntimeError("[gloo/unbound_buffer.cc:81] Timed out waiting 60000ms for recv operation to complete")
    text = D.timed_out(err)
    assert text is not None and "waited dist.timeout_s = 60 s for the other ranks" in text
    assert text.endswith(
        "(one frozen, or lost without its process ending?) and gave up ([gloo/unbound_buffer.cc:81] "
        "Timed out waiting 60000ms for recv operation to complete)"
    )
    assert D.timed_out(RuntimeError("mat1 and mat2 shapes cannot be multiplied")) is None
    monkeypatch.setattr(D, "_JOINED", D._Joined())
    assert D.timed_out(err) is None  # no process group: not ours to explain


def test_a_worker_records_its_error_where_torchrun_reads_it(tmp_path):
    from torch.distributed.elastic.multiprocessing.errors import ProcessFailure

    path = tmp_path / "error.json"
    D.record_failure("train.batch_size: 33 is not divisible", "/r/run", env={"TORCHELASTIC_ERROR_FILE": str(path)})
    failure = ProcessFailure(local_rank=0, pid=1, exitcode=2, error_file=str(path))
    assert failure.message == "train.batch_size: 33 is not divisible"
    assert failure.error_file_data["fasttrain_run_dir"] == "/r/run"
    D.record_failure("ignored", env={})  # outside torchrun: nothing


def test_the_report_names_the_rank_that_failed_not_one_that_stopped_with_it_in_the_same_second(tmp_path, monkeypatch):
    """Rank 0 stops with rank 1's error (PeerFailed) some milliseconds later, in the same second: torchrun's
    whole-second timestamps tied and the lower rank was blamed. Recorded to the microsecond, and a rank that
    stops with another's error is never the cause."""
    from types import SimpleNamespace

    from torch.distributed.elastic.multiprocessing.errors import ProcessFailure

    from fasttrain.cli import _worker_failure

    def failed(records):
        failures = {}
        for rank, (when, text, secondary) in records.items():
            path = tmp_path / f"error-{rank}-{when}.json"
            monkeypatch.setattr(D.time, "time", lambda when=when: when)
            D.record_failure(text, env={"TORCHELASTIC_ERROR_FILE": str(path)}, secondary=secondary)
            failures[rank] = ProcessFailure(local_rank=rank, pid=1, exitcode=1, error_file=str(path))
        monkeypatch.undo()
        return _worker_failure(SimpleNamespace(failures=failures), 2).splitlines()[0]

    peer = "rank 1 (node 1, host h) stopped: data.root: y; rank 0 (node 0, host h) stops with it"
    assert failed({0: (100.52, peer, True), 1: (100.5, "data.root: y", False)}) == (
        "fasttrain: error: rank 1 failed (exit status 1): data.root: y"
    )
    assert failed({0: (100.9, "later", False), 1: (100.1, "first", False)}) == (
        "fasttrain: error: rank 1 failed (exit status 1): first"
    )


# -- restart markers -------------------------------------------------------------------------------------------------
def test_a_marker_is_this_jobs_only_and_goes_when_the_job_ends(tmp_path):
    run = tmp_path / "run-1"
    (run / "checkpoints").mkdir(parents=True)
    remember_elastic_run(tmp_path, "job1", run, "token-a")
    assert elastic_run_dir(tmp_path, "job1", job="token-a") == run
    assert elastic_run_dir(tmp_path, "job1", job="token-b") is None  # a later job reusing the id
    assert elastic_run_dir(tmp_path, "job1") == run
    assert not holds_checkpoints(run)
    (run / "checkpoints" / "last.pt").write_bytes(b"x")
    assert holds_checkpoints(run)
    forget_elastic_run(tmp_path, "job1", tmp_path / "another-run")  # names another run: kept
    assert elastic_run_dir(tmp_path, "job1") == run
    forget_elastic_run(tmp_path, "job1", run)
    assert elastic_run_dir(tmp_path, "job1") is None and not list(tmp_path.glob(".torchrun-*"))
    # the job's restart after its run finished (the marker went): found by the token the folder keeps
    assert elastic_run_dir(tmp_path, "job1", job="token-a") == run
    assert elastic_run_dir(tmp_path, "job1", job="token-b") is None
    assert elastic_run_dir(tmp_path, "job1", job="token-a", search=False) is None  # a first attempt does not look
    # a restart that left a folder behind (its checkpoints broken) and trained in a new one: the new one is the run
    newer = tmp_path / "run-0"  # sorts first by name: the token file's age decides, not the name
    newer.mkdir()
    remember_elastic_run(tmp_path, "job1", newer, "token-a")
    forget_elastic_run(tmp_path, "job1", newer)
    os.utime(run / ".torchrun-job", ns=(1, 1))
    assert elastic_run_dir(tmp_path, "job1", job="token-a") == newer


def test_a_checkpoint_write_that_a_death_interrupted_is_no_checkpoint(tmp_path):
    """A start killed while writing its first last.pt leaves the write's temp file: its restart trains again in
    the same folder (the temp file is removed there), not in a second one beside it."""
    from fasttrain.checkpoint import save_checkpoint

    run = tmp_path / "run-1"
    (run / "checkpoints").mkdir(parents=True)
    (run / "checkpoints" / ".last.pt.ab12cd34.tmp").write_bytes(b"half a checkpoint")
    assert not holds_checkpoints(run)
    save_checkpoint(run / "checkpoints" / "last.pt", {"state": {}})
    assert holds_checkpoints(run)


def test_a_restart_resumes_only_its_jobs_run_with_its_config_and_reuses_a_folder_left_empty(
    shapes_root, tmp_path, monkeypatch, caplog
):
    """What rank 0 decides after a restart, from the marker: the job's own run with the same config is resumed;
    another config or another job (a reused rendezvous id) is a new run, said with the old folder's name; a
    start that died before its first checkpoint is trained again in its folder, not left behind empty."""
    import logging

    from tinyrun import tiny_cfg

    from fasttrain.engine import _elastic_plan, train

    runs = tmp_path / "runs"
    cfg = tiny_cfg(shapes_root, runs, epochs=1, max_steps=2)
    run = train(cfg, progress=False).run_dir
    info = D.DistInfo(rank=0, world_size=2, run_id="job1")
    remember_elastic_run(runs, "job1", run, "token-a")
    monkeypatch.setattr(D, "generation", lambda: 2)
    monkeypatch.setattr(D, "job_token", lambda: "token-a")
    more = tiny_cfg(shapes_root, runs, epochs=3, max_steps=2)
    with caplog.at_level(logging.WARNING, logger="fasttrain"):
        assert _elastic_plan(more, info) == (run, ["train.epochs=3"], None)
        assert "torchrun restart 1 of job job1: resuming" in caplog.text
        caplog.clear()
        assert _elastic_plan(tiny_cfg(shapes_root, runs, "optim.lr=0.5", epochs=1, max_steps=2), info) == (
            None,
            None,
            None,
        )
        assert f"run {run} was trained with another config (optim.lr (0.005 -> 0.5))" in caplog.text
        caplog.clear()
        monkeypatch.setattr(D, "job_token", lambda: "token-b")  # a later job, the same rendezvous id
        assert _elastic_plan(cfg, info) == (None, None, None)
        assert f"job id job1 named run {run} of an earlier job: this job starts a new run" in caplog.text
    empty = runs / "t-died-early"
    empty.mkdir()
    remember_elastic_run(runs, "job1", empty, "token-b")
    assert _elastic_plan(cfg, info) == (None, None, empty)


def test_a_restart_of_a_job_given_a_model_and_dataset_from_python_is_the_same_run(tmp_path):
    """The saved config went through prepare (model.name = custom; channels and sizes from the dataset's items),
    the job's did not: compared as prepare fills it, a restart resumes instead of starting a new run."""
    import dataclasses

    from tinyrun import tiny_cfg

    from fasttrain.engine import _job_config_differs

    cfg = tiny_cfg("", tmp_path, "data.root=", "model.num_outputs=0")
    data = dataclasses.replace(cfg.data, root="python:Toy", channels=1, image_size=28, resize_size=28)
    saved = dataclasses.replace(cfg, data=data, model=dataclasses.replace(cfg.model, name="custom", num_outputs=10))
    assert _job_config_differs(cfg, saved, tmp_path, model=True, dataset=True) == ""
    assert "model.name" in _job_config_differs(cfg, saved, tmp_path, dataset=True)
    assert "data.image_size" in _job_config_differs(cfg, saved, tmp_path, model=True)
    lr = dataclasses.replace(cfg, optim=dataclasses.replace(cfg.optim, lr=0.5))
    assert "optim.lr" in _job_config_differs(lr, saved, tmp_path, model=True, dataset=True)


def test_an_older_checkpoint_of_the_same_size_on_another_node_is_not_taken_for_rank_0s(tmp_path, monkeypatch):
    """A runs folder per node: rank 1's last.pt has the size of rank 0's but another epoch and step (an older
    one): rank 1 takes rank 0's checkpoint, sent to it, instead of resuming another state."""
    from fasttrain import engine

    start = tmp_path / "last.pt"
    torch.save({"state": {"epoch": 1, "step": 4}}, start)
    size = start.stat().st_size
    ours = {"state": {"epoch": 2, "step": 8}}
    monkeypatch.setattr(engine, "load_checkpoint", lambda path, resume=False: torch.load(path))
    monkeypatch.setattr(D, "current", lambda: D.DistInfo(rank=1, world_size=2))
    monkeypatch.setattr(D, "all_gather_object", lambda ok: [True, ok])
    monkeypatch.setattr(D, "broadcast_object", lambda obj, src=0: ours)
    assert engine._share_checkpoint(None, start, size, (2, 8)) is ours
    torch.save(ours, start)  # rank 0's, read from the shared folder
    assert start.stat().st_size == size
    monkeypatch.setattr(D, "broadcast_object", lambda obj, src=0: pytest.fail("nothing to send"))
    assert engine._share_checkpoint(None, start, size, (2, 8)) == ours


# -- the epoch record that straddles a resume ------------------------------------------------------------------------
def test_an_epoch_straddling_a_resume_on_fewer_processes_weighs_every_step_alike(monkeypatch):
    """Two processes, then one after a resume: the epoch's training loss is the mean of its steps' losses (it
    used to count each two-process step twice: 1.636 against 1.549 in the issue)."""
    from fasttrain.engine import Running

    losses = [1.0, 2.0, 4.0, 8.0]  # per step, the global micro-batch's mean loss
    run = Running()
    monkeypatch.setattr(D, "current", lambda: D.DistInfo(world_size=2))
    monkeypatch.setattr(D, "all_reduce_sums", lambda v, **k: {n: 2 * x for n, x in v.items()})  # equal halves
    for loss in losses[:2]:
        run.window = {"loss": torch.tensor(loss)}
        run.n_window = 1
        run.flush()
    saved = run.to_checkpoint()
    monkeypatch.undo()
    resumed = Running.from_checkpoint(saved, torch.device("cpu"), micro=2)
    for loss in losses[2:]:
        resumed.window = {"loss": torch.tensor(loss)}
        resumed.n_window = 1
        resumed.flush()
    assert resumed.epoch_sums["loss"].item() / resumed.n_summed == pytest.approx(sum(losses) / 4)
    # a checkpoint written before (sums over both processes' micro-batches) is read the same way
    old = {"epoch_sums": {"loss": torch.tensor(6.0)}, "n_summed": 4}
    again = Running.from_checkpoint(old, torch.device("cpu"), micro=2)
    assert (again.epoch_sums["loss"].item(), again.n_summed) == (3.0, 2)


def test_skipped_files_are_counted_over_every_rank(monkeypatch):
    """Each rank's loader meets the bad files of its own shard: rank 0 used to list only its own (4 of 6)."""
    from types import SimpleNamespace

    from fasttrain.engine import _skipped_files

    source = SimpleNamespace(skipped=[("/d/rows.csv:3", "no label")])
    loader = SimpleNamespace(skipped=[("/d/a.jpg", "truncated")])
    other_rank = [("/d/rows.csv:3", "no label"), ("/d/b.jpg", "not an image")]
    monkeypatch.setattr(D, "all_gather_object", lambda mine: [mine, other_rank])
    assert _skipped_files(source.skipped, loader, None) == [
        ("/d/rows.csv:3", "no label"),
        ("/d/a.jpg", "truncated"),
        ("/d/b.jpg", "not an image"),
    ]
    # Nodes mounting the data at other places: one file each, named under this rank's root (7 were counted for 5).
    other_node = [("\0rows.csv:3", "no label"), ("\0a.jpg", "truncated"), ("/elsewhere/x.jpg", "cut short")]
    monkeypatch.setattr(D, "all_gather_object", lambda mine: [mine, other_node])
    assert _skipped_files(source.skipped, loader, None, root="/d") == [
        ("/d/rows.csv:3", "no label"),
        ("/d/a.jpg", "truncated"),
        ("/elsewhere/x.jpg", "cut short"),
    ]


# -- two agents on one host ------------------------------------------------------------------------------------------
needs_gloo = pytest.mark.skipif(
    not torch.distributed.is_available() or not torch.distributed.is_gloo_available(),
    reason="needs torch.distributed with gloo",
)


def _sets(root, runs, *extra: str) -> list[str]:
    sets = [
        f"data.root={root}",
        "data.image_size=16",
        "data.resize_size=16",
        "data.random_resized_crop=false",
        "data.loader=torch",
        "data.workers=0",
        "model.name=mlp",
        "model.width=8",
        "optim.name=sgd",
        "optim.lr=0.05",
        "schedule.name=constant",
        "train.batch_size=32",
        "train.log_every=2",
        "train.epochs=2",
        "train.max_steps=6",
        "train.checkpoint_every_steps=2",
        "runtime.device=cpu",
        "runtime.precision=fp32",
        "dist.timeout_s=60",
        f"train.runs_dir={runs}",
        "name=nodes",
        *extra,
    ]
    return [a for s in sets for a in ("--set", s)]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _two_nodes(
    folders: list[Path],
    args: list[str],
    *,
    job: str,
    restarts: int = 0,
    limit: float = 150,
    node_env: list[dict[str, str]] | None = None,
):
    """Two torchrun agents (one worker each) in their own working folders, one job; (exit status, stderr) of
    each. A job still running after ``limit`` seconds is a hang: killed, and the test fails. ``node_env``: each
    node's own environment variables (over the test's)."""
    from tests.engine.test_ddp import worker_env

    base = worker_env()
    port = _free_port()
    procs = []
    for k, folder in enumerate(folders):
        env = {**base, **(node_env[k] if node_env else {})}
        folder.mkdir(parents=True, exist_ok=True)
        cmd = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nnodes=2",
            "--nproc-per-node=1",
            "--rdzv-backend=c10d",
            f"--rdzv-endpoint=127.0.0.1:{port}",
            f"--rdzv-id={job}",
            f"--max-restarts={restarts}",
            str(WORKER),
            *args,
        ]
        err = open(folder / f"agent-{job}.err", "w+")
        procs.append((subprocess.Popen(cmd, cwd=folder, env=env, stdout=subprocess.DEVNULL, stderr=err), err))
    deadline = time.monotonic() + limit
    out = []
    for p, err in procs:
        try:
            p.wait(timeout=max(deadline - time.monotonic(), 1))
        except subprocess.TimeoutExpired:
            for q, _ in procs:
                q.kill()
            pytest.fail(f"the job hung: still running after {limit:.0f} s")
        err.seek(0)
        out.append((p.returncode, err.read()))
        err.close()
    return out


def _weights(run: Path) -> dict[str, torch.Tensor]:
    from fasttrain.checkpoint import load_checkpoint

    return load_checkpoint(run / "checkpoints" / "last.pt")["state"]["modules"]["model"]


def _runs(*folders: Path) -> list[Path]:
    return [p for f in folders if f.is_dir() for p in f.iterdir() if p.is_dir()]


def _identical(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def _folders_report(found: list[Path], runs: Path, done: list[tuple[int, str]]) -> str:
    """What a job left that has other than one run folder: each folder's files (sizes), the heads of its
    metrics.jsonl and train.log, the restart markers, and each agent's output."""
    lines = []
    for run in found:
        lines.append(f"== {run}")
        for p in sorted(run.rglob("*")):
            lines.append(f"  {p.relative_to(run)}{'/' if p.is_dir() else f' {p.stat().st_size} B'}")
        for name in ("metrics.jsonl", "train.log"):
            if (run / name).is_file():
                lines += [f"  -- {name}:", *(f"  {x}" for x in (run / name).read_text().splitlines()[:15])]
    for marker in sorted(m for d in {runs, *(f.parent for f in found)} if d.is_dir() for m in d.glob(".torchrun-*")):
        lines.append(f"== marker {marker.name}: {marker.read_text()!r}")
    for k, (code, err) in enumerate(done):
        lines += [f"== agent {k}: exit status {code}", err[-6000:]]
    return "\n".join(lines)


@pytest.fixture(scope="module")
def straight(shapes_root, tmp_path_factory) -> Path:
    """An uninterrupted two-node run: the reference the restarted ones must equal bit for bit."""
    base = tmp_path_factory.mktemp("straight")
    done = _two_nodes([base / "n0", base / "n1"], ["train", "-q", *_sets(shapes_root, base / "runs")], job="ref")
    assert all(code == 0 for code, _ in done), done[0][1][-3000:] + done[1][1][-3000:]
    (run,) = _runs(base / "runs")
    return run


@pytest.mark.slow  # each case starts two torchrun agents and their workers
@needs_gloo
@pytest.mark.parametrize(
    "shared, step",
    [(True, 9), (False, 9), (True, 1)],
    ids=["shared-runs", "runs-per-node", "before-the-first-checkpoint"],
)
def test_a_killed_rank_restarts_once_and_ends_bit_identical(shapes_root, tmp_path, straight, shared, step):
    nodes = [tmp_path / "n0", tmp_path / "n1"]
    runs = tmp_path / "runs" if shared else "runs"  # relative: each node's own folder, not shared
    args = ["--kill-rank", "1", "--kill-step", str(step), "train", "-q", *_sets(shapes_root, runs)]
    done = _two_nodes(nodes, args, job=f"kill-{shared}-{step}", restarts=1)
    err = "".join(e for _, e in done)
    assert all(code == 0 for code, _ in done), err[-4000:]
    if step > 2:  # a checkpoint was written every 2 steps
        assert "torchrun restart 1" in err and "resuming" in err
    else:  # its folder is trained in again, not left behind empty beside a second one
        assert "its start ended before the first checkpoint; training afresh in" in err
    found = _runs(tmp_path / "runs", *(n / "runs" for n in nodes))
    # found again after the restart, not a second folder; none on the other node
    assert len(found) == 1, _folders_report(found, tmp_path / "runs", done)
    _identical(_weights(found[0]), _weights(straight))
    records = [json.loads(x) for x in (found[0] / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in records if "event" not in r] == [1, 2]
    assert not list(found[0].parent.glob(".torchrun-*"))  # the job ended: its marker went
    if not shared:
        assert "train.runs_dir is not shared with rank 1" in err


@pytest.mark.slow
@needs_gloo
def test_a_restart_after_the_run_finished_finds_the_run_and_trains_no_second_one(shapes_root, tmp_path, straight):
    """Rank 0 finished the run (and took the job's marker away), then its process still ended with an error, as
    one aborting at the interpreter's exit does (gloo's SIGABRT in CI); its node's agent had a restart left and
    restarted the job while rank 1 still ran. The restart found no marker and trained a second run from scratch
    in a new folder (CI: two run folders, every agent ended 0). It now finds the finished run by the job's token
    and resumes it, with nothing left to train."""
    nodes = [tmp_path / "n0", tmp_path / "n1"]
    once = {"DDP_WORKER_FAIL_ONCE": str(tmp_path / "failed-once")}
    args = ["train", "-q", *_sets(shapes_root, tmp_path / "runs")]
    done = _two_nodes(nodes, args, job="ends-failed", restarts=1, node_env=[once, once])
    err = "".join(e for _, e in done)
    assert all(code == 0 for code, _ in done), err[-4000:]
    assert "rank 0 ends with exit status 1 after its run" in err  # the job was restarted after the run finished
    found = _runs(tmp_path / "runs")
    assert len(found) == 1, _folders_report(found, tmp_path / "runs", done)
    assert "torchrun restart 1 of job ends-failed: resuming" in err
    _identical(_weights(found[0]), _weights(straight))
    records = [json.loads(x) for x in (found[0] / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in records if "event" not in r] == [1, 2]  # nothing trained twice
    assert not list(found[0].parent.glob(".torchrun-*"))


@pytest.mark.slow
@needs_gloo
def test_a_node_missing_files_is_refused_by_name_on_every_node(shapes_root, tmp_path):
    nodes = [tmp_path / "n0", tmp_path / "n1"]
    for n in nodes:
        shutil.copytree(shapes_root, n / "data")
    missing = sorted((nodes[1] / "data" / "train" / "circle").iterdir())[:7]
    for f in missing:
        f.unlink()
    t0 = time.monotonic()
    done = _two_nodes(nodes, ["train", "-q", *_sets("data", tmp_path / "runs")], job="missing", limit=150)
    assert time.monotonic() - t0 < 150  # a hang would wait dist.timeout_s, and then fail without naming the files
    for code, err in done:
        assert code != 0
        assert "the nodes of this job do not agree" in err and "train/circle (143 samples there, 150 on rank 0)" in err
    assert not _runs(tmp_path / "runs")  # nothing written


@pytest.mark.slow
@needs_gloo
def test_a_node_without_the_data_stops_every_node_at_once_naming_it(shapes_root, tmp_path):
    """Its rank fails before the process group exists; the other used to wait for it dist.timeout_s (30 min)."""
    nodes = [tmp_path / "n0", tmp_path / "n1"]
    shutil.copytree(shapes_root, nodes[0] / "data")
    nodes[1].mkdir()
    t0 = time.monotonic()
    args = ["train", "-q", *_sets("data", tmp_path / "runs", "dist.timeout_s=600")]
    done = _two_nodes(nodes, args, job="nodata", limit=150)
    assert time.monotonic() - t0 < 150  # not the 600 s of dist.timeout_s (it was 1800 s: 30 minutes)
    assert all(code != 0 for code, _ in done)
    lines = [line for _, err in done for line in err.splitlines() if line.startswith("fasttrain: error:")]
    assert len(lines) == 2 and all("data.root" in line for line in lines), lines
    assert any("stopped: data.root" in line and "stops with it" in line for line in lines), lines
    assert not _runs(tmp_path / "runs")


@pytest.mark.slow
@needs_gloo
def test_a_reused_rendezvous_id_with_another_config_is_a_new_run_never_the_old_one(shapes_root, tmp_path):
    """The first job dies for good (no restarts) and leaves its marker; a later job under the same rendezvous id
    and another learning rate starts its own run; the old one is left as it was."""
    runs = tmp_path / "runs"
    first = _two_nodes(
        [tmp_path / "a0", tmp_path / "a1"],
        ["--kill-rank", "1", "--kill-step", "9", "train", "-q", *_sets(shapes_root, runs)],
        job="job1",
    )
    assert any(code != 0 for code, _ in first)
    (old,) = _runs(runs)
    before = (old / "checkpoints" / "last.pt").read_bytes()
    second = _two_nodes(
        [tmp_path / "b0", tmp_path / "b1"], ["train", "-q", *_sets(shapes_root, runs, "optim.lr=0.02")], job="job1"
    )
    err = "".join(e for _, e in second)
    assert all(code == 0 for code, _ in second), err[-4000:]
    assert "this job starts a new run" in err and "resuming" not in err
    assert len(_runs(runs)) == 2 and (old / "checkpoints" / "last.pt").read_bytes() == before


@pytest.mark.slow
@needs_gloo
@pytest.mark.parametrize("holder", [0, 1], ids=["answer-on-the-first-node", "answer-on-the-second-node"])
def test_autotune_with_an_answer_cached_on_one_node_only_takes_rank_0s_way_on_every_rank(shapes_root, tmp_path, holder):
    """Each node keeps its own autotune cache ($FASTTRAIN_CACHE), one of them an answer for this very job.
    Rank 0 decides whether there is one and every rank follows: all answer from rank 0's cache, or all search
    together. A rank that answered from its own cache used to leave while the other searched, alone, in
    collectives nobody else joined (a dead peer, or a wait of dist.timeout_s)."""
    from fasttrain.cli import resolve_config
    from fasttrain.runtime import runtime_for
    from fasttrain.tuning import autotune, cache

    nodes = [tmp_path / "n0", tmp_path / "n1"]
    sets = _sets(shapes_root, tmp_path / "runs")
    cfg = resolve_config(None, sets[1::2])
    # The answer a node kept from an earlier call: filed under the key of this two-process job on this machine
    # (any stored answer serves; this one is the config's own batch, from a one-process call).
    answer = autotune(cfg, out_dir=tmp_path / "earlier", verify=False, use_cache=False)
    machine = {**cache.machine(runtime_for(cfg)), "world_size": 2}
    fields = cache.key_fields(cfg, budget_gib=cfg.tune.memory_budget_gib, machine_info=machine)
    cache.store(nodes[holder] / "cache" / "autotune" / f"{cache.cache_key(fields)}.json", fields, answer)
    done = _two_nodes(
        nodes,
        ["autotune", "--out", "out", "--no-verify", "--time-budget", "6", "-q", *sets],  # out: rank 0's folder
        job=f"tune-{holder}",
        limit=120,  # ~40 s here (two start-ups, a 6 s search); no rank waits for another over dist.timeout_s = 60
        node_env=[{"FASTTRAIN_CACHE": str(n / "cache")} for n in nodes],
    )
    err = "".join(e for _, e in done)
    assert all(code == 0 for code, _ in done), err[-4000:]
    (rank_0,) = [n for n in nodes if (n / "out" / "autotune.json").is_file()]
    report = json.loads((rank_0 / "out" / "autotune.json").read_text())
    assert report["ok"] and report["world_size"] == 2
    assert report["cached"] == (rank_0 == nodes[holder])  # rank 0's cache decides, whichever node rank 0 is on


@pytest.mark.slow
@needs_gloo
def test_nodes_whose_copies_read_differently_are_refused_not_left_to_hang(shapes_root, tmp_path):
    """A shard cut short on one node only: the names agree, so the job started; that rank skipped the lost
    members, drew its shard of another order and another number of steps, trained on samples the other rank
    also drew, and then waited in a collective for dist.timeout_s (30 minutes by default)."""
    from fasttrain.config import DataConfig
    from fasttrain.data.pack import pack

    nodes = [tmp_path / "n0", tmp_path / "n1"]
    pack(DataConfig(root=str(shapes_root)), tmp_path / "shards", shard_bytes=100_000)
    for n in nodes:
        shutil.copytree(tmp_path / "shards", n / "data")
    cut = sorted((nodes[0] / "data").glob("train-*.tar"))[0]
    with open(cut, "r+b") as f:
        f.truncate(cut.stat().st_size // 2)
    t0 = time.monotonic()
    args = ["train", "-q", *_sets("data", tmp_path / "runs", "dist.timeout_s=600")]
    done = _two_nodes(nodes, args, job="cut-short", limit=200)
    assert time.monotonic() - t0 < 200  # not the 600 s of dist.timeout_s
    for code, err in done:
        assert code != 0 and "the nodes of this job read different training data" in err, err[-3000:]
        assert "rank 0 (node 0" in err and "cut short" in err and "rank 1 (node 1" in err, err[-3000:]
    assert not _runs(tmp_path / "runs")  # refused before a run folder


def test_each_node_may_mount_the_data_and_write_its_runs_where_it_likes():
    """Two absolute train.runs_dir values were refused as a config difference, though runs_dir need not be
    shared (rank 0 writes the run; a rank that does not see its checkpoint is sent it)."""
    from fasttrain.agree import _flat
    from fasttrain.config import load_config

    mine = _flat(load_config("quickstart", ["data.root=/mnt/a/data", "train.runs_dir=/scratch/a/runs"]))
    theirs = _flat(load_config("quickstart", ["data.root=/mnt/b/data", "train.runs_dir=/scratch/b/runs"]))
    assert mine == theirs and "optim.lr" in mine
    assert _flat(load_config("quickstart", ["optim.lr=0.5"])) != mine


def test_nodes_on_other_commits_under_one_version_string_differ(monkeypatch):
    """A node running a checkout three commits behind (version string unchanged) trained with the others. Only
    commits both sides know are compared (a wheel's node has none), and a local "+dirty" is no other code."""
    from fasttrain import rundir
    from fasttrain.agree import _commit

    monkeypatch.setattr(rundir, "git_commit", lambda: "a" * 40 + "+dirty")
    assert _commit() == "a" * 40
    source = _source("/a", FILES)
    ahead, behind = _facts(0, source), _facts(1, source)
    ahead = dataclasses.replace(ahead, commit="a" * 40)
    assert differences([ahead, dataclasses.replace(behind, commit="b" * 40)]) == [
        "code: rank 1 (node 1, host host1) runs fasttrain's commit bbbbbbbbbbbb, rank 0 aaaaaaaaaaaa"
    ]
    assert differences([ahead, dataclasses.replace(behind, commit="")]) == []  # a wheel: unknown, not compared
    assert differences([ahead, dataclasses.replace(behind, commit="a" * 40)]) == []


@pytest.mark.slow
@needs_gloo
def test_sigterm_to_one_nodes_agent_saves_the_step_every_rank_agrees_on(shapes_root, tmp_path):
    """SLURM or Kubernetes ending one node's agent: it passes SIGTERM to its worker only. Signals were not
    handled under torchrun, so both nodes ended with nothing saved since the last epoch (15 steps lost in the
    scale walkthrough) and no command to resume; every rank now saves the step they vote for."""
    import signal

    from fasttrain.checkpoint import load_checkpoint
    from tests.engine.test_ddp import worker_env

    nodes = [tmp_path / "n0", tmp_path / "n1"]
    args = _sets(shapes_root, tmp_path / "runs", "train.epochs=50", "train.max_steps=0", "train.batch_size=8")
    port, procs = _free_port(), []
    for folder in nodes:
        folder.mkdir()
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes=2", "--nproc-per-node=1"]
        cmd += ["--rdzv-backend=c10d", f"--rdzv-endpoint=127.0.0.1:{port}", "--rdzv-id=term", str(WORKER)]
        err = open(folder / "agent.err", "w+")
        procs.append((subprocess.Popen([*cmd, "train", "-q", *args], cwd=folder, env=worker_env(), stderr=err), err))
    try:
        deadline = time.monotonic() + 150
        while time.monotonic() < deadline and not list((tmp_path / "runs").glob("*/checkpoints/last.pt")):
            assert all(p.poll() is None for p, _ in procs), [e.name for _, e in procs]
            time.sleep(0.1)
        (run,) = _runs(tmp_path / "runs")
        first = load_checkpoint(run / "checkpoints" / "last.pt")["state"]["step"]
        procs[1][0].send_signal(signal.SIGTERM)  # one node's agent, as its scheduler would
        for p, _ in procs:
            p.wait(timeout=90)
    finally:
        for p, _ in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    errs = []
    for _, e in procs:
        e.seek(0)
        errs.append(e.read())
        e.close()
    text = "\n".join(errs)
    ckpt = load_checkpoint(run / "checkpoints" / "last.pt")
    step = ckpt["state"]["step"]
    assert step > first and step % 4 == 0 and ckpt["position"]["micro"] > 0, text[-4000:]  # a vote's step
    assert f"SIGTERM: stopped at epoch {ckpt['position']['epoch'] + 1}, step {step}" in text, text[-4000:]
    assert text.count(f"fasttrain train --resume {run}") == 1, text[-4000:]
