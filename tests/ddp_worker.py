"""A torchrun worker for the DDP tests: ``fasttrain train ...``, optionally killed with SIGKILL.

    python -m torch.distributed.run ... tests/ddp_worker.py [--kill-rank R --kill-step S] train CONFIG --set ...

With ``--kill-rank``, rank R of the first attempt (TORCHELASTIC_RESTART_COUNT = 0) kills itself with SIGKILL
once S optimizer steps are done, as a lost machine would: torchrun restarts the group and the run must resume.
With DDP_WORKER_DRAW=1, each rank prints a number drawn from torch's generator before its first step.
With DDP_WORKER_POISON=R:S, rank R's weights become infinite after the optimizer step taken at step S.
With DDP_WORKER_THREADS=1 in the environment, each rank names the threads it still has once main() returned.
With DDP_WORKER_FAIL_ONCE=PATH, the first rank 0 whose main() succeeds (the one that creates PATH) still ends with
exit status 1, as a rank that aborts at the interpreter's exit does (gloo's SIGABRT in CI); the other ranks of
that attempt (started while PATH did not exist) wait once they are done until their agent ends them (at most
120 s), so that the job is still running when rank 0's agent restarts it.
"""

from __future__ import annotations

import os
import signal
import sys
import threading


def main(argv: list[str]) -> int:
    once = os.environ.get("DDP_WORKER_FAIL_ONCE")
    hold = bool(once) and os.environ.get("RANK") != "0" and not os.path.exists(once)  # the attempt rank 0 fails
    if argv[:1] == ["--kill-rank"]:
        rank, step, argv = int(argv[1]), int(argv[3]), argv[4:]
        if os.environ.get("RANK") == str(rank) and os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") == "0":
            from fasttrain.tasks.base import Task

            train_step = Task.train_step

            def die(self, state, batch, *, _step=step, **kw):  # on every rank, unlike on_step_end (rank 0's)
                if state.step == _step:
                    os.kill(os.getpid(), signal.SIGKILL)
                return train_step(self, state, batch, **kw)

            Task.train_step = die
    if os.environ.get("DDP_WORKER_DRAW"):
        _draw_at_first_step()
    poison = os.environ.get("DDP_WORKER_POISON")
    if poison and os.environ.get("RANK") == poison.split(":")[0]:
        _poison_after(int(poison.split(":")[1]))
    from fasttrain.cli import main as cli

    rc = cli(argv)
    if os.environ.get("DDP_WORKER_THREADS"):  # what is left running once main() ended (shutdown() included)
        tasks = f"/proc/{os.getpid()}/task"
        names = sorted(_comm(f"{tasks}/{tid}/comm") for tid in os.listdir(tasks))
        # one write(2) under PIPE_BUF is atomic: both ranks share the agent's stderr pipe, and print()'s
        # separate writes of text and newline let the two lines interleave into one
        os.write(2, f"rank {os.environ.get('RANK')} threads after main: {names}\n".encode())
    if once and rc == 0 and os.environ.get("RANK") == "0" and _first(once):
        os.write(2, b"rank 0 ends with exit status 1 after its run (DDP_WORKER_FAIL_ONCE)\n")
        return 1
    if hold and rc == 0:
        threading.Event().wait(120)  # the restart's SIGTERM ends this process (its default action)
    return rc


def _draw_at_first_step() -> None:
    """Each rank prints one number from torch's global generator before its first step: what dropout draws."""
    import torch

    from fasttrain.tasks.base import Task

    train_step = Task.train_step

    def drawing(self, state, batch, **kw):
        if state.step == 0:
            os.write(2, f"rank {os.environ.get('RANK')} draws {torch.rand(()).item():.8f}\n".encode())
        return train_step(self, state, batch, **kw)

    Task.train_step = drawing


def _poison_after(step: int) -> None:
    """This rank's weights made infinite after the optimizer step taken at ``state.step == step`` (the ranks'
    weights then differ at that epoch's end, as one rank's BatchNorm statistics can)."""
    import torch

    from fasttrain.tasks.base import Task

    train_step = Task.train_step

    def poisoned(self, state, batch, **kw):
        out = train_step(self, state, batch, **kw)
        if state.step == step:
            with torch.no_grad():
                next(iter(state.modules["model"].parameters())).fill_(float("inf"))
        return out

    Task.train_step = poisoned


def _first(path: str) -> bool:
    """Whether this process is the first to get here: it created ``path``."""
    try:
        os.close(os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
    except FileExistsError:
        return False
    return True


def _comm(path: str) -> str:
    try:
        with open(path, encoding="utf-8") as f:
            return f.read().strip()
    except OSError:  # the thread ended meanwhile
        return ""


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
