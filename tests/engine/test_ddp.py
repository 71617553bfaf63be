"""Data-parallel training under torchrun on CPU (gloo, 2 processes), against one process on the same data.

A BN-free model (mlp) makes the comparison exact up to float summation order: DDP averages the two halves'
gradients, which is the gradient of the global batch's mean loss.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fasttrain.checkpoint import load_checkpoint

REPO = next(p for p in Path(__file__).resolve().parents if (p / "pyproject.toml").is_file())
WORKER = REPO / "tests" / "ddp_worker.py"

pytestmark = [
    pytest.mark.slow,  # each case starts torchrun and its workers: seconds of imports per process
    pytest.mark.skipif(
        not torch.distributed.is_available() or not torch.distributed.is_gloo_available(),
        reason="needs torch.distributed with gloo",
    ),
]


def _sets(root: Path, runs: Path, *extra: str) -> list[str]:
    sets = [
        f"data.root={root}",
        "data.image_size=16",
        "data.resize_size=16",
        "data.random_resized_crop=false",
        "data.hflip=true",
        "data.loader=torch",
        "data.workers=0",
        "model.name=mlp",
        "model.width=8",
        "optim.name=sgd",
        "optim.lr=0.05",
        "schedule.name=constant",
        "train.batch_size=32",
        "train.eval_batch_size=32",
        "train.log_every=2",
        "runtime.device=cpu",
        # The ranks-match-one-process comparisons are to 5e-7: an fp32 property (bf16, the CPU's auto precision
        # where it has bf16 instructions, rounds each rank's half-batch sums differently).
        "runtime.precision=fp32",
        f"train.runs_dir={runs}",
        "name=ddp",
        *extra,
    ]
    return [a for s in sets for a in ("--set", s)]


def worker_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """The environment of a torchrun job under test: this checkout first on the path, one thread per process,
    and Python's fault handler on (a worker that aborts shows where)."""
    return {
        **os.environ,
        **(extra or {}),
        "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
        "OMP_NUM_THREADS": "1",
        "PYTHONFAULTHANDLER": "1",
    }


def _torchrun(
    nproc: int,
    args: list[str],
    *,
    restarts: int = 0,
    timeout: float = 300,
    worker: Path = WORKER,
    env_extra: dict[str, str] | None = None,
) -> subprocess.CompletedProcess:
    env = worker_env(env_extra)
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc-per-node={nproc}",
        f"--max-restarts={restarts}",
        str(worker),
        *args,
    ]
    return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)


def _one_process(args: list[str]) -> None:
    from fasttrain.cli import main

    assert main(args) == 0


def _weights(run: Path) -> dict[str, torch.Tensor]:
    return load_checkpoint(run / "checkpoints" / "last.pt")["state"]["modules"]["model"]


def _only_run(runs: Path) -> Path:
    (run,) = [p for p in runs.iterdir() if p.is_dir()]
    return run


def _close(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-5, msg=k)


def test_two_ranks_match_one_process_and_write_one_run_folder(shapes_root, tmp_path):
    args = ["train", "-q", *_sets(shapes_root, tmp_path / "two", "train.epochs=2", "train.max_steps=4")]
    done = _torchrun(2, args, env_extra={"DDP_WORKER_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-9000:]
    # main()'s shutdown() destroyed the process group and its gloo threads (see gloo_exit_worker.py)
    left = dict(re.findall(r"rank (\d) threads after main: (\[[^\]]*\])", done.stderr))
    assert sorted(left) == ["0", "1"] and not any("gloo" in names for names in left.values()), left
    run = _only_run(tmp_path / "two")  # rank 1 wrote nothing of its own
    _one_process(["train", "-q", *_sets(shapes_root, tmp_path / "one", "train.epochs=2", "train.max_steps=4")])
    single = _only_run(tmp_path / "one")
    _close(_weights(run), _weights(single))
    epochs = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    ref = [json.loads(x) for x in (single / "metrics.jsonl").read_text().splitlines()]
    a = [r for r in epochs if "event" not in r]
    b = [r for r in ref if "event" not in r]
    assert [r["step"] for r in a] == [r["step"] for r in b] == [4, 8]
    for x, y in zip(a, b):  # validation over both shards, summed: the single process's figures
        assert x["val_acc"] == pytest.approx(y["val_acc"], abs=1e-6)
        assert x["val_loss"] == pytest.approx(y["val_loss"], rel=1e-4)
        assert x["train_loss"] == pytest.approx(y["train_loss"], rel=1e-4)


@pytest.mark.parametrize("dropout", [0.0, 0.3])
def test_a_killed_rank_restarts_the_job_which_resumes_to_the_same_weights(shapes_root, tmp_path, dropout):
    """With dropout each rank draws its own masks: the checkpoint keeps every rank's random streams, and rank 1
    goes on with its own (given rank 0's, its masks after the restart would differ from the straight run's)."""
    common = ("train.epochs=2", "train.max_steps=6", "train.checkpoint_every_steps=2", f"model.dropout={dropout}")
    straight = _torchrun(2, ["train", "-q", *_sets(shapes_root, tmp_path / "a", *common)])
    assert straight.returncode == 0, straight.stderr[-9000:]
    killed = _torchrun(
        2,
        ["--kill-rank", "1", "--kill-step", "9", "train", "-q", *_sets(shapes_root, tmp_path / "b", *common)],
        restarts=1,
    )
    assert killed.returncode == 0, killed.stderr[-9000:]
    assert "torchrun restart 1" in killed.stderr and "resuming" in killed.stderr
    run = _only_run(tmp_path / "b")  # found again, not a second folder
    _close(_weights(_only_run(tmp_path / "a")), _weights(run))
    epochs = [
        json.loads(x)["epoch"] for x in (run / "metrics.jsonl").read_text().splitlines() if "event" not in json.loads(x)
    ]
    assert epochs == [1, 2]


def test_a_worker_exits_cleanly_while_a_gloo_thread_ends_a_collective(tmp_path):
    """CI's rare SIGABRT at a worker's end ('terminate called without an active exception'), made deterministic
    by tests/gloo_exit_worker.py: the process group must really be destroyed by distributed.shutdown(), its gloo
    threads with it, even after a DistributedDataParallel was built (whose import of torch._dynamo used to keep
    the group alive)."""
    flags = tmp_path / "flags"
    flags.write_bytes(b"\0\0")
    done = _torchrun(2, [], worker=REPO / "tests" / "gloo_exit_worker.py", env_extra={"FLAGS": str(flags)}, timeout=120)
    assert "terminate called" not in done.stderr, done.stderr[-9000:]
    assert done.returncode == 0, done.stderr[-9000:]
    threads = [line for line in done.stderr.splitlines() if line.startswith("rank 0 threads after shutdown:")]
    assert len(threads) == 1 and "gloo" not in threads[0], done.stderr[-9000:]


@pytest.mark.parametrize("first, then", [(2, 1), (1, 2)])
def test_a_checkpoint_resumes_on_another_world_size(shapes_root, tmp_path, first, then):
    """The global order is a function of (seed, epoch): 2 -> 1 and 1 -> 2 processes visit the same samples and
    end where an uninterrupted single-process run ends."""
    common = ("train.max_steps=4",)

    def run_with(nproc: int, args: list[str]) -> None:
        if nproc == 1:
            _one_process(args)
        else:
            done = _torchrun(nproc, args)
            assert done.returncode == 0, done.stderr[-9000:]

    run_with(first, ["train", "-q", *_sets(shapes_root, tmp_path / "r", "train.epochs=1", *common)])
    run = _only_run(tmp_path / "r")
    run_with(then, ["train", "-q", "--resume", str(run), "--set", "train.epochs=2"])
    _one_process(["train", "-q", *_sets(shapes_root, tmp_path / "ref", "train.epochs=2", *common)])
    _close(_weights(run), _weights(_only_run(tmp_path / "ref")))


def test_weights_gone_infinite_on_one_rank_stop_every_rank(shapes_root, tmp_path):
    """Ranks' weights can differ at an epoch's end (each rank's last forward updates its own BatchNorm statistics):
    the divergence check is the ranks' joint decision. Decided per rank, rank 1 raised while rank 0 went on into
    its next collective and waited there until dist.timeout_s."""
    sets = _sets(shapes_root, tmp_path / "x", "train.epochs=2", "train.max_steps=4", "dist.timeout_s=90")
    done = _torchrun(2, ["train", "-q", *sets], env_extra={"DDP_WORKER_POISON": "1:3"}, timeout=240)
    assert done.returncode != 0
    stopped = re.findall(r"fasttrain: error: training stopped after epoch 1, step 4: the weights are not", done.stderr)
    assert len(stopped) == 2, done.stderr[-9000:]  # both ranks, not rank 1 alone
    # rank 0 did not go on into the next collective (gloo then fails at once; NCCL waits for dist.timeout_s)
    assert "Connection closed by peer" not in done.stderr, done.stderr[-9000:]


def test_each_rank_draws_its_own_random_numbers(shapes_root, tmp_path):
    """Dropout masks, MixUp's and random erasing's draws come from the global generators, seeded alike on every
    rank for the model's initialisation; in training each rank's are its own (timm seeds seed + rank)."""
    done = _torchrun(
        2,
        ["train", "-q", *_sets(shapes_root, tmp_path / "x", "train.epochs=1", "train.max_steps=2")],
        env_extra={"DDP_WORKER_DRAW": "1"},
    )
    assert done.returncode == 0, done.stderr[-9000:]
    draws = dict(re.findall(r"rank (\d) draws ([0-9.]+)", done.stderr))
    assert sorted(draws) == ["0", "1"] and draws["0"] != draws["1"], done.stderr[-3000:]
    one = _torchrun(
        1,
        ["train", "-q", *_sets(shapes_root, tmp_path / "y", "train.epochs=1", "train.max_steps=2")],
        env_extra={"DDP_WORKER_DRAW": "1"},
    )
    assert dict(re.findall(r"rank (\d) draws ([0-9.]+)", one.stderr))["0"] == draws["0"]  # rank 0: one process's


def test_top_k_checkpoints_under_torchrun(shapes_root, tmp_path):
    """Rank 0 alone keeps the top-k copies; every save's gathering of the ranks' random streams happens on all
    ranks at once (a copy gathering on rank 0 alone paired with another rank's next collective)."""
    sets = _sets(shapes_root, tmp_path / "x", "train.epochs=3", "train.max_steps=2", "train.save_top_k=2")
    done = _torchrun(2, ["train", "-q", *sets], timeout=240)
    assert done.returncode == 0, done.stderr[-9000:]
    run = _only_run(tmp_path / "x")
    assert len(list((run / "checkpoints").glob("epoch=*.pt"))) == 2
    ckpt = load_checkpoint(run / "checkpoints" / "last.pt")
    assert len(ckpt["rng_ranks"]) == 2 and ckpt["rng"]["torch"].equal(ckpt["rng_ranks"][0]["torch"])
    assert not ckpt["rng_ranks"][0]["torch"].equal(ckpt["rng_ranks"][1]["torch"])


def test_a_batch_that_does_not_divide_over_the_processes_is_refused(shapes_root, tmp_path):
    done = _torchrun(2, ["train", "-q", *_sets(shapes_root, tmp_path / "x", "train.batch_size=33")])
    assert done.returncode != 0
    assert "train.batch_size: 33 is not divisible by the 2 processes" in done.stderr
    assert not (tmp_path / "x").exists() or not any(p.is_dir() for p in (tmp_path / "x").iterdir())


def test_the_quickstart_under_two_ranks_reaches_90_percent(tmp_path):
    env_cache = {"FASTTRAIN_CACHE": os.environ.get("FASTTRAIN_CACHE", str(tmp_path / "cache"))}
    os.environ.update(env_cache)
    done = _torchrun(
        2, ["train", "-q", "--set", f"train.runs_dir={tmp_path / 'runs'}", "--set", "data.workers=0"], timeout=900
    )
    assert done.returncode == 0, done.stderr[-9000:]
    run = _only_run(tmp_path / "runs")
    records = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert max(r["val_acc"] for r in records if "event" not in r) >= 0.90


def test_pix2pix_trains_under_two_ranks_with_both_networks_wrapped(tmp_path):
    """Both networks data-parallel; the frozen discriminator of the generator's phase runs unwrapped (a wrapped
    one would wait for gradients that never come, and the next step would fail)."""
    from fasttrain.data.synthetic import make_paired_dataset

    root = make_paired_dataset(tmp_path / "pairs", n=40, size=32)
    sets = [
        f"data.root={root}",
        "data.format=paired",
        "data.image_size=32",
        "data.workers=0",
        "data.loader=torch",
        "model.name=unet",
        "model.width=8",
        "task.name=pix2pix",
        "optim.name=adam",
        "optim.betas=[0.5, 0.999]",
        "train.batch_size=4",
        "train.epochs=2",
        "train.max_steps=3",
        "train.log_every=1",
        "runtime.device=cpu",
        f"train.runs_dir={tmp_path / 'runs'}",
        "name=p2p",
    ]
    done = _torchrun(2, ["train", "-q", *[a for s in sets for a in ("--set", s)]])
    assert done.returncode == 0, done.stderr[-9000:]
    run = _only_run(tmp_path / "runs")
    records = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    epochs = [r for r in records if "event" not in r]
    assert [r["step"] for r in epochs] == [3, 6] and all(r["val_l1"] == r["val_l1"] for r in epochs)  # not NaN
    saved = load_checkpoint(run / "checkpoints" / "last.pt")["state"]["modules"]
    assert set(saved) == {"generator", "discriminator"}
    assert not any(k.startswith("module.") for m in saved.values() for k in m)  # unwrapped: loads anywhere


def test_bench_and_autotune_under_two_ranks(shapes_root, tmp_path):
    """bench: per-GPU and global samples/s and the scaling efficiency; autotune: per-GPU batches, one answer,
    the global batch it implies in the tuned config."""
    sets = [
        "--set",
        f"data.root={shapes_root}",
        "--set",
        "data.image_size=16",
        "--set",
        "data.resize_size=16",
        "--set",
        "data.loader=torch",
        "--set",
        "data.workers=0",
        "--set",
        "model.name=mlp",
        "--set",
        "model.width=8",
        "--set",
        "train.batch_size=32",
        "--set",
        "runtime.device=cpu",
        "--set",
        "bench.steps=3",
        "--set",
        "bench.repeats=1",
        "--set",
        "bench.warmup_steps=1",
        "--set",
        f"train.runs_dir={tmp_path / 'runs'}",
        "--set",
        "tune.time_budget_s=8",
        "--set",
        "tune.max_batch=64",
        "--set",
        f"tune.cache_dir={tmp_path / 'cache'}",
    ]
    done = _torchrun(2, ["bench", *sets, "--json", str(tmp_path / "bench.json")])
    assert done.returncode == 0, done.stderr[-9000:]
    assert done.stdout.count("fasttrain bench") == 1  # rank 0 prints
    report = json.loads((tmp_path / "bench.json").read_text())
    assert report["world_size"] == 2 and report["batch_size"] == 16  # per GPU: half the global batch
    assert report["global_samples_per_s"] == pytest.approx(2 * report["end_to_end"]["samples_per_s"])
    assert 0 < report["scaling_efficiency"] < 5 and report["model_step_parallel"]["samples_per_s"] > 0
    done = _torchrun(2, ["autotune", *sets, "--out", str(tmp_path / "tune")])
    assert done.returncode in (0, 1), done.stderr[-9000:]  # 1: a noisy shared machine may refuse to advise
    written = list((tmp_path / "tune").glob("autotune*.json"))
    assert written, f"no autotune JSON (exit {done.returncode}):\n{done.stdout[-2000:]}\n{done.stderr[-4000:]}"
    tuned = json.loads(written[0].read_text())
    assert tuned["world_size"] == 2 and len(list((tmp_path / "tune").glob("autotune*.json"))) == 1  # rank 0 wrote
    if tuned["ok"]:
        assert tuned["tuned_values"]["train.batch_size"] == 2 * tuned["plan"]["global_batch"]


def test_a_failed_worker_under_nproc_is_named_with_its_reason(shapes_root, tmp_path):
    """``fasttrain train --nproc``: which rank failed and why, not ``a worker failed:`` with nothing after it."""
    env = worker_env()
    args = ["train", "-q", "--nproc", "2", *_sets(shapes_root, tmp_path / "x", "train.batch_size=33")]
    done = subprocess.run(
        [sys.executable, "-m", "fasttrain", *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 1
    report = done.stderr[done.stderr.rindex("fasttrain: error: rank ") :].splitlines()  # after the workers' own
    assert report[0].startswith("fasttrain: error: rank "), done.stderr
    assert report[0].endswith(
        "failed (exit status 2): train.batch_size: 33 is not divisible by the 2 processes "
        "(WORLD_SIZE); choose a multiple of 2"
    ), done.stderr
    assert report[-1] == "no run folder was written: start the run again once that is fixed"


@contextlib.contextmanager
def _job_past_its_first_checkpoint(args: list[str], runs: Path):
    """``fasttrain ARGS`` started (stderr piped) and waited for until a run folder under ``runs`` holds last.pt;
    killed at the end if it still runs."""
    import time

    proc = subprocess.Popen(
        [sys.executable, "-m", "fasttrain", *args], cwd=REPO, env=worker_env(), stderr=subprocess.PIPE, text=True
    )
    try:
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline and not list(runs.glob("*/checkpoints/last.pt")):
            assert proc.poll() is None, proc.communicate()[1][-4000:]
            time.sleep(0.1)
        yield proc
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_ctrl_c_under_nproc_says_it_once_with_the_command_that_resumes_all_workers(shapes_root, tmp_path):
    """Ctrl-C to `fasttrain train --nproc 2` printed the resume command once per rank, without --nproc, then 'a
    worker failed: Process N got signal: 2' and exit status 1. (The agent passes the signal to its workers.)"""
    import signal

    runs = tmp_path / "runs"
    args = ["train", "-q", "--nproc", "2", *_sets(shapes_root, runs, "train.epochs=50", "train.max_steps=0")]
    with _job_past_its_first_checkpoint(args, runs) as proc:
        proc.send_signal(signal.SIGINT)  # the agent's: it stops its workers with the same signal
        _, err = proc.communicate(timeout=120)
    (run,) = (p.parent.parent for p in runs.glob("*/checkpoints/last.pt"))
    assert proc.returncode == 130, err[-4000:]
    # every worker saved the step they agreed on (a stop signal was not handled under torchrun before)
    assert err.count("fasttrain: stopped by SIGINT; continue") == 1 and "SIGINT: stopped at epoch" in err, err
    assert err.count("--resume") == 1 and f"fasttrain train --resume {run} --nproc 2" in err, err
    assert "stopped by SIGINT (all 2 workers)" in err and "a worker failed" not in err


def _worker_pid(agent: int, rank: int) -> int | None:
    """The pid of the torchrun worker of global ``rank`` among ``agent``'s children (Linux /proc), or None."""
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            ppid = int(stat.read_text().rpartition(")")[2].split()[1])
            env = (stat.parent / "environ").read_bytes().split(b"\0")
        except (OSError, ValueError, IndexError):
            continue
        if ppid == agent and f"RANK={rank}".encode() in env:
            return int(stat.parent.name)
    return None


@pytest.mark.skipif(not Path("/proc/self/environ").is_file(), reason="finds the workers through Linux's /proc")
def test_a_signal_to_one_worker_stops_every_rank_at_one_saved_step(shapes_root, tmp_path):
    """Under torchrun a stop signal was not handled at all (its ranks would have stopped at different steps):
    SIGTERM ended a worker with no save, and the job failed. Sent here to one worker's process group only (its
    data loader worker included, which SIGTERM used to end too), every rank now stops at the step they agree on,
    inside the epoch, with that step saved, and the command that resumes it."""
    import signal

    runs = tmp_path / "runs"
    extra = ("train.epochs=50", "train.max_steps=0", "train.batch_size=8", "data.workers=1")
    args = ["train", "-q", "--nproc", "2", *_sets(shapes_root, runs, *extra)]
    with _job_past_its_first_checkpoint(args, runs) as proc:
        worker = _worker_pid(proc.pid, 1)
        assert worker is not None
        first = load_checkpoint(next(runs.glob("*/checkpoints/last.pt")))["state"]["step"]
        os.killpg(worker, signal.SIGTERM)  # torchrun starts each worker as its own process group
        _, err = proc.communicate(timeout=120)
    run = _only_run(runs)
    ckpt = load_checkpoint(run / "checkpoints" / "last.pt")
    step, micro = ckpt["state"]["step"], ckpt["position"]["micro"]
    assert step > first and step % 4 == 0 and 0 < micro, err[-4000:]  # a vote's step, inside an epoch
    assert f"SIGTERM: stopped at epoch {ckpt['position']['epoch'] + 1}, step {step}" in err, err[-4000:]
    assert f"fasttrain train --resume {run} --nproc 2" in err and err.count("--resume") == 1, err[-4000:]
    assert "killed by signal" not in err and "Traceback" not in err, err[-4000:]
    assert proc.returncode == 143 and "stopped by SIGTERM (all 2 workers)" in err, err[-4000:]
    assert "fasttrain: error" not in err, err[-4000:]
