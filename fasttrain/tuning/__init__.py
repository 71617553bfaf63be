"""Batch-size and loader autotuning: the best samples/s that fits a memory budget, backed by measurements, written
to a new config.

The layers, one module each:

- :mod:`~fasttrain.tuning.search` (pure, no torch): noise-aware comparison, the batch-size search, the
  choice, batch plans, the loader choice, the verification verdict, the CPU time rules;
- :mod:`~fasttrain.tuning.probe`: the budget, the step probe, the compiled check, the verification run;
- :mod:`~fasttrain.tuning.loader`: loader settings judged end to end against the model-only step;
- :mod:`~fasttrain.tuning.report`: the typed report, its table, JSON, PNG and the tuned TOML;
- :mod:`~fasttrain.tuning.cache`: answers keyed by the whole resolved config minus an explicit ignore list;
- :mod:`~fasttrain.tuning.run`: :func:`autotune`, the entry point: the cache, then the search and one loop
  "plan -> compile -> loader trials -> verify -> smaller plan" inside ``runtime.flags()``, the report built
  from what each stage returned.

Order and time: the config's own micro-batch is probed first (the baseline every change must beat beyond the
noise), then the search, then (compile on) one compiled check at the planned micro-batch, then the loader
settings at that micro-batch, then the verification. ``tune.time_budget_s`` bounds the whole call, compile
excluded: the search may use the first 60 % of it, the loader trials up to 80 %, the verification the rest (at
least a short window: an answer is never handed out unverified because time ran short).

Compile: the search probes **eagerly** and compiles **once**, at the planned micro-batch. Compiling per
candidate costs a compile per batch size, and a dynamic batch dimension is not the static program training
runs. Eager memory bounds compiled memory for the step (inductor fuses and saves fewer activations), so an
eager fit is a safe fit; the compiled check measures what training will run and its state is reused by the
loader trials and the verification.

On CPU there is no memory budget: the batch is chosen by samples/s, accumulation is never proposed, and the
config's own batch and loader setting are measured too, so the tuned config is never slower than the given one
beyond the noise. Autotune takes at most half the training it tunes: a job too short to repay any tuning is not
tuned, and once the time cap from the job's length is spent with the config's own batch standing, the config is
written as it is (see :mod:`~fasttrain.tuning.run`).

``import fasttrain.tuning`` imports no torch: the names from the modules that need it load on first use.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from fasttrain.tuning.search import (
    Agreement,
    BatchPlan,
    Candidate,
    SearchResult,
    Skipped,
    choose_batch,
    judge_verification,
    plan_batches,
    search_batch_size,
)

if TYPE_CHECKING:
    from fasttrain.memory import is_oom_error
    from fasttrain.tuning.loader import LoaderResult, LoaderTrial, loader_ladder, tune_loader
    from fasttrain.tuning.probe import Budget, StepProbe, Verification, release_budget, setup_budget
    from fasttrain.tuning.report import AutotuneReport, plot_report, tuned_config
    from fasttrain.tuning.run import autotune

__all__ = [
    "autotune",
    "AutotuneReport",
    "Candidate",
    "SearchResult",
    "Skipped",
    "BatchPlan",
    "Budget",
    "Agreement",
    "Verification",
    "LoaderTrial",
    "LoaderResult",
    "StepProbe",
    "search_batch_size",
    "choose_batch",
    "plan_batches",
    "judge_verification",
    "loader_ladder",
    "tune_loader",
    "setup_budget",
    "release_budget",
    "is_oom_error",
    "plot_report",
    "tuned_config",
]

# Names from the modules that need torch, loaded on first use: the pure search imports without torch.
_LAZY = {
    "autotune": "fasttrain.tuning.run",
    "AutotuneReport": "fasttrain.tuning.report",
    "plot_report": "fasttrain.tuning.report",
    "tuned_config": "fasttrain.tuning.report",
    "Budget": "fasttrain.tuning.probe",
    "StepProbe": "fasttrain.tuning.probe",
    "Verification": "fasttrain.tuning.probe",
    "setup_budget": "fasttrain.tuning.probe",
    "release_budget": "fasttrain.tuning.probe",
    "LoaderTrial": "fasttrain.tuning.loader",
    "LoaderResult": "fasttrain.tuning.loader",
    "loader_ladder": "fasttrain.tuning.loader",
    "tune_loader": "fasttrain.tuning.loader",
    "is_oom_error": "fasttrain.memory",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'fasttrain.tuning' has no attribute {name!r}")
