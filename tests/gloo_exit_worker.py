"""A torchrun worker that ends as a training worker ends, a gloo thread still holding the last references to
the tensors of a collective
(tests/engine/test_ddp.py::test_a_worker_exits_cleanly_while_a_gloo_thread_ends_a_collective).

    FLAGS=<a file of 2 bytes> python -m torch.distributed.run --standalone --nproc-per-node=2 tests/gloo_exit_worker.py

Both ranks join through :func:`fasttrain.distributed.init` and build a DistributedDataParallel, as a training
worker does. Rank 0 starts an all-reduce of a tensor made in Python and lets go of the tensor and the work: a
gloo thread now holds their last references (the tensor's Python object is kept alive for it), and will need
the GIL to drop them. Rank 0 calls :func:`fasttrain.distributed.shutdown`, then holds the GIL (a switch
interval of 1000 s, a loop that makes no system call) until rank 1, which joins the all-reduce only then (or
after ``WAIT_S``), is through it, and ends. This is the CI's rare ending made deterministic: a gloo thread on
a loaded machine that asked for the GIL just before the interpreter began to finalize.

Where the process group outlived ``shutdown()``, rank 0's gloo thread gets the GIL only once the interpreter
is finalizing (when it frees this module's ``_AT_TEARDOWN``, which lets go of the GIL), and the interpreter
ends the thread there, inside a C++ destructor: ``terminate called without an active exception``, SIGABRT.
Where ``shutdown()`` destroyed the process group, it waited for the all-reduce and the gloo threads ended in it.
"""

from __future__ import annotations

import atexit
import mmap
import os
import sys
import time

import torch

WAIT_S = 2.0
"""How long rank 1 waits for rank 0 to hold the GIL before it joins the all-reduce anyway: only a rank 0
whose ``shutdown()`` waits for the all-reduce (to end its gloo threads) makes it wait that long."""

MARGIN_S = 0.5
"""How long rank 0 holds the GIL after rank 1 is through the all-reduce: its own gloo thread is through it
within microseconds of rank 1's, and asks for the GIL."""


class _AtTeardown:
    """Freed when the interpreter clears this module, once it is finalizing: lets go of the GIL (as the rest
    of an interpreter's end does: closing a file, a C++ destructor), and says which threads rank 0 had after
    ``shutdown()``."""

    def __init__(self, threads: list[str], flags: mmap.mmap) -> None:
        self.threads, self.flags = threads, flags  # an mmap lets go of the GIL when it is freed

    def __del__(self) -> None:
        time.sleep(0.05)
        print(f"rank 0 threads after shutdown: {self.threads}", file=sys.stderr, flush=True)


_AT_TEARDOWN: _AtTeardown | None = None


def main() -> int:
    global _AT_TEARDOWN
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    from fasttrain import distributed

    info = distributed.init("cpu", timeout_s=60)
    DistributedDataParallel(torch.nn.Linear(2, 2))  # as distributed.wrap_state does
    with open(os.environ["FLAGS"], "r+b") as f:
        flags = mmap.mmap(f.fileno(), 2)  # [0]: rank 0 holds the GIL; [1]: rank 1 is through the all-reduce
    t = torch.ones(4)
    if info.rank == 0:
        work = dist.all_reduce(t, async_op=True)
        del t, work
        distributed.shutdown()
        threads = sorted(_thread_names())
        atexit._run_exitfuncs()  # the exit handlers (which may let go of the GIL) run now, not after the loop
        sys.setswitchinterval(1000.0)  # from here on the GIL changes hands only in a blocking call
        flags[0] = 1
        while not flags[1]:  # no system call: the GIL stays here
            pass
        end = time.monotonic() + MARGIN_S
        while time.monotonic() < end:
            pass
        _AT_TEARDOWN = _AtTeardown(threads, flags)
        return 0
    end = time.monotonic() + WAIT_S
    while not flags[0] and time.monotonic() < end:
        time.sleep(0.001)
    dist.all_reduce(t)
    flags[1] = 1
    distributed.shutdown()
    return 0


def _thread_names() -> list[str]:
    tasks = f"/proc/{os.getpid()}/task"
    names = []
    for tid in os.listdir(tasks):
        try:
            with open(f"{tasks}/{tid}/comm", encoding="utf-8") as f:
                names.append(f.read().strip())
        except OSError:  # the thread ended meanwhile
            pass
    return names


if __name__ == "__main__":
    sys.exit(main())
