"""``fasttrain bench``: what limits a run. The loader alone, the train step alone on a synthetic batch already on
the device (the ceiling) and the two together as ``fasttrain train`` runs them, with the verdict.

The clock lives in :mod:`fasttrain.timing` and memory readings in :mod:`fasttrain.memory` (the benchmarks
import them from there).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fasttrain.config import Config, TaskConfig
from fasttrain.io import write_new_text
from fasttrain.memory import format_bytes
from fasttrain.tasks import task_class
from fasttrain.timing import (
    Timing,
    end_to_end_throughput,
    loader_throughput,
    model_step_throughput,
)

if TYPE_CHECKING:
    from fasttrain.tasks.base import Task

log = logging.getLogger(__name__)

__all__ = [
    "BenchReport",
    "TimeToTarget",
    "time_to_target",
    "parse_target",
    "bench",
    "verdict",
]

NOISY_SPREAD = 0.25
"""(max - min) / median of the repeats above which a report calls its figures rough."""
SHARED_BELOW = 0.85
"""A compute-bound verdict whose end to end stays below this share of the ceiling gets a note: the parts keep up
alone and not together (autotune, which times them together, calls such a run input-bound)."""
INPUT_BOUND = "input-bound"
COMPUTE_BOUND = "compute-bound"


# -- the user-facing report -----------------------------------------------------------------------------------
def verdict(loader_sps: float, model_sps: float) -> str:
    """input-bound when the loader alone cannot keep up with the train step alone, else compute-bound."""
    return INPUT_BOUND if loader_sps < model_sps else COMPUTE_BOUND


@dataclass(frozen=True)
class TimeToTarget:
    """When a run first reached a metric's target, from its metrics.jsonl epoch records."""

    run: str
    metric: str
    target: float
    seconds: float | None
    """Training and evaluation time summed (epoch_time_s + eval_time_s) up to and including the first epoch at
    the target (set-up and checkpoints left out); None when no epoch reached it."""
    epoch: int | None
    best: float | None
    """The best value the run reached."""
    samples_per_s: float | None
    """The run's mean training samples/s over those epochs."""

    def line(self) -> str:
        rate = f", {self.samples_per_s:,.1f} samples/s in training" if self.samples_per_s else ""
        if self.seconds is None:
            best = "no value" if self.best is None else f"best {self.best:.4f}"
            return f"time to {self.metric} {self.target:g}: not reached ({best}) in {self.run}"
        return (
            f"time to {self.metric} {self.target:g}: {self.seconds:,.1f} s of training + evaluation "
            f"(epoch {self.epoch} of {self.run}{rate})"
        )


def parse_target(text: str) -> tuple[str, float]:
    """``"val_acc=0.9"`` -> ("val_acc", 0.9); ValueError naming ``--target``."""
    metric, sep, value = text.partition("=")
    try:
        if not sep or not metric.strip():
            raise ValueError
        return metric.strip(), float(value)
    except ValueError:
        raise ValueError(f"--target: expected METRIC=VALUE (for example val_acc=0.9), got {text!r}") from None


def _task_of(run_dir: Path) -> type[Task]:
    """The class of the task the run trained (its config.toml's task.name; the default task without one)."""
    name = TaskConfig().name
    try:
        name = tomllib.loads((run_dir / "config.toml").read_text(encoding="utf-8")).get("task", {}).get("name", name)
    except (OSError, tomllib.TOMLDecodeError):
        pass
    return task_class(name)


def time_to_target(run_dir: str | os.PathLike, metric: str, target: float) -> TimeToTarget:
    """The first epoch of the run in ``run_dir`` whose ``metric`` reached ``target`` (at least it where the run's
    task says higher is better, such as an accuracy; at most for losses and errors), and the training +
    evaluation seconds up to it."""
    records = []
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"--run: {run_dir} has no metrics.jsonl (not a run folder?)")
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue  # a torn last line of a killed run
        if "event" not in rec:
            records.append(rec)
    higher = _task_of(Path(run_dir)).metric_mode(metric) == "max"
    seconds, samples, best = 0.0, 0.0, None
    for rec in records:
        t = float(rec.get("epoch_time_s") or 0.0)
        seconds += t + float(rec.get("eval_time_s") or 0.0)
        samples += float(rec.get("samples_per_s") or 0.0) * t
        value = rec.get(metric)
        if value is None:
            continue
        best = value if best is None else (max(best, value) if higher else min(best, value))
        if (value >= target) if higher else (value <= target):
            train_s = sum(float(r.get("epoch_time_s") or 0.0) for r in records[: records.index(rec) + 1])
            rate = samples / train_s if train_s else None
            return TimeToTarget(str(run_dir), metric, target, round(seconds, 3), int(rec["epoch"]), value, rate)
    if best is None and records and metric not in records[-1]:
        known = ", ".join(k for k in records[-1] if k.startswith(("val_", "train_")))
        raise ValueError(f"--target: the run in {run_dir} records no {metric} (it has {known})")
    return TimeToTarget(str(run_dir), metric, target, None, None, best, None)


@dataclass
class BenchReport:
    config_name: str
    backend: str
    """Loader backend the run uses: torch, dali or cache (``data.loader``, or what auto chose)."""
    model: str
    batch_size: int
    """Micro-batch (samples per train_step call)."""
    runtime: str
    """Runtime.describe(): device, precision, channels_last, compile."""
    loader: Timing
    model_step: Timing
    end_to_end: Timing
    environment: dict[str, Any] = field(default_factory=dict)
    json_path: str | None = None
    """Where the JSON report was written (a new name when the asked-for file existed)."""
    world_size: int = 1
    """Processes of a torchrun job: the timings above are then per GPU, end to end with DistributedDataParallel."""
    model_step_parallel: Timing | None = None
    """Under torchrun: the model-only step with gradients all-reduced over the processes (per GPU)."""
    time_to_target: TimeToTarget | None = None
    """``--run RUN --target METRIC=VALUE``: when that run reached the target, beside the samples/s above."""
    per_size: dict[int, Timing] = field(default_factory=dict)
    """Progressive resizing: the model-only step at each training size but the largest (which is measured above,
    as the loader and end to end are)."""
    image_size: int = 0
    """The training size the timings above are at (the largest, under progressive resizing)."""

    @property
    def scaling_efficiency(self) -> float | None:
        """Under torchrun: per-GPU samples/s of the data-parallel step against one GPU's alone (1.0 = the
        all-reduce costs nothing): global samples/s / (world_size x one GPU's)."""
        if self.model_step_parallel is None or not self.model_step.samples_per_s:
            return None
        return self.model_step_parallel.samples_per_s / self.model_step.samples_per_s

    @property
    def ceiling(self) -> Timing:
        """The model-only step end to end is measured against: under torchrun the data-parallel one (its
        all-reduce is part of every training step; one GPU's alone made a DDP run look input-bound at 23% of a
        ceiling it could not reach)."""
        return self.model_step_parallel or self.model_step

    @property
    def verdict(self) -> str:
        return verdict(self.loader.samples_per_s, self.ceiling.samples_per_s)

    @property
    def ceiling_share(self) -> float:
        """End-to-end samples/s as a share of the model-only ceiling (1.0 = the loader costs nothing)."""
        ceiling = self.ceiling.samples_per_s
        return self.end_to_end.samples_per_s / ceiling if ceiling else 0.0

    def to_dict(self) -> dict[str, Any]:
        return {
            "config": self.config_name,
            "backend": self.backend,
            "model": self.model,
            "batch_size": self.batch_size,
            "runtime": self.runtime,
            "verdict": self.verdict,
            "ceiling_share": self.ceiling_share,
            "loader": self.loader.to_dict(),
            "model_step": self.model_step.to_dict(),
            "end_to_end": self.end_to_end.to_dict(),
            "environment": self.environment,
            "world_size": self.world_size,
            "model_step_parallel": self.model_step_parallel.to_dict() if self.model_step_parallel else None,
            "global_samples_per_s": self.end_to_end.samples_per_s * self.world_size,
            "scaling_efficiency": self.scaling_efficiency,
            "time_to_target": dataclasses.asdict(self.time_to_target) if self.time_to_target else None,
            "model_step_per_size": {str(k): t.to_dict() for k, t in self.per_size.items()},
            "image_size": self.image_size,
        }

    def __str__(self) -> str:  # print(bench(cfg)) shows the table, not the dataclass's every field
        return self.to_table()

    def to_table(self) -> str:
        rows = [
            ("loader only", self.loader),
            ("model only (ceiling)", self.model_step),
            ("end to end", self.end_to_end),
        ]
        if self.model_step_parallel is not None:
            rows = [
                ("loader only", self.loader),
                ("model only, one GPU", self.model_step),
                (f"model only, {self.world_size} GPUs", self.model_step_parallel),  # the ceiling
                ("end to end", self.end_to_end),
            ]
        rows += [(f"model only, {size} px", t) for size, t in sorted(self.per_size.items())]
        cuda = self.model_step.peak_allocated_bytes is not None
        mem_head = "alloc GiB" if cuda else "RSS GiB"  # CUDA: peak allocated; CPU: process peak RSS
        head = f"{'measurement':<22}{'samples/s':>12}{'min':>12}{'max':>12}{'ms/step':>10}{mem_head:>11}"
        lines = [
            f"fasttrain bench {self.config_name}: {self.model}, batch {self.batch_size}, "
            f"loader {self.backend}, {self.runtime}",
            head,
            "-" * len(head),
        ]
        for name, t in rows:
            peak = t.peak_allocated_bytes if cuda else t.peak_rss_bytes
            mem = "-" if peak is None else format_bytes(peak, "GiB").split()[0]
            lines.append(
                f"{name:<22}{t.samples_per_s:>12,.1f}{t.samples_per_s_min:>12,.1f}"
                f"{t.samples_per_s_max:>12,.1f}{t.seconds_per_step * 1e3:>10.1f}{mem:>11}"
            )
        lines.append("")
        if self.world_size > 1:
            eff, total = self.scaling_efficiency, self.end_to_end.samples_per_s * self.world_size
            lines.append(
                f"per GPU above; {self.world_size} processes: {total:,.1f} samples/s end to end in all"
                + (
                    f"; scaling efficiency {eff:.0%} (the all-reduce's cost against one GPU alone)"
                    if eff is not None
                    else ""
                )
            )
        lines.append(f"verdict: {self.verdict}; end to end reaches {self.ceiling_share:.0%} of the model-only ceiling")
        if self.time_to_target is not None:
            lines.append(self.time_to_target.line())
        noisiest = max(t.spread for _, t in rows)
        if noisiest > NOISY_SPREAD:
            lines.append(
                f"note: repeats differ by up to {noisiest:.0%} of their median (a busy machine?); the "
                f"figures are rough: raise bench.steps / bench.repeats for steadier ones"
            )
        elif self.ceiling_share > 1.05:
            lines.append(
                "note: end to end measured above the model-only ceiling, which it cannot beat: the machine's "
                "speed changed between the two (a busy machine?) or the runs were short; raise bench.steps / "
                "bench.repeats for steadier figures"
            )
        elif self.verdict == COMPUTE_BOUND and self.ceiling_share < SHARED_BELOW:
            lines.append(
                f"note: each part alone keeps up, yet together they reach {self.ceiling_share:.0%} of the ceiling: "
                "the loader and the step compete (on a CPU for its cores: data.loader = cache decodes once, fewer "
                "data.workers leave the step more); autotune's loader trials measure them together"
            )
        if self.verdict == INPUT_BOUND:
            lines.append(
                "the loader limits this run: try data.loader = dali or cache, more data.workers / "
                "data.dali_threads, or smaller images"
            )
        return "\n".join(lines)

    def write_json(self, path: str | os.PathLike) -> Path:
        """Write ``to_dict()`` to ``path``, or ``stem-2.json``... where it exists (a user's file is never
        overwritten); returns the path written."""
        return write_new_text(path, json.dumps(self.to_dict(), indent=2) + "\n")


def bench(
    cfg: Config,
    *,
    json_path: str | os.PathLike | None = None,
    model: Any = None,
    dataset: Any = None,
    val_dataset: Any = None,
    run: str | os.PathLike | None = None,
    target: tuple[str, float] | None = None,
) -> BenchReport:
    """Loader-only, model-only and end-to-end samples/s for ``cfg``, with the verdict. Writes JSON when asked.
    ``model``, ``dataset``, ``val_dataset``: your own, as :func:`fasttrain.train` takes them.

    The config is prepared exactly as ``fasttrain train`` prepares it (data root, runtime, task, backend);
    ``cfg.bench`` (warmup_steps, steps, repeats) sets every measurement; batches are training micro-batches.
    Under torchrun each process measures its GPU: the model-only step alone and with gradients all-reduced (the
    scaling efficiency), the loader on its shard, and end to end as data-parallel training runs; rank 0 reports.
    ``run`` and ``target`` (metric, value): the report adds when that run first reached the target
    (:func:`time_to_target`), read before anything is measured.
    """
    reached = None
    if run is not None:
        if target is None:
            raise ValueError("--run needs --target METRIC=VALUE (for example val_acc=0.9)")
        reached = time_to_target(run, *target)
    from fasttrain.data.progressive import train_sizes
    from fasttrain.prepare import prepare
    from fasttrain.runtime import environment, seed_everything

    prep = prepare(cfg, model=model, dataset=dataset, val_dataset=val_dataset)
    cfg, runtime = prep.cfg, prep.runtime
    seed_everything(cfg.runtime.seed)
    b, tc = cfg.bench, cfg.train
    log.info("bench %s: %s | loader %s (%s)", cfg.name, runtime.describe(), prep.backend, prep.backend_reason)
    with runtime.flags():
        model_t, parallel_t, loader_t, e2e_t, per_size = _measure_all(prep, b, tc)
    report = BenchReport(
        config_name=cfg.name,
        backend=prep.backend,
        model=cfg.model.name,
        batch_size=prep.micro_batch,
        runtime=runtime.describe(),
        loader=loader_t,
        model_step=model_t,
        end_to_end=e2e_t,
        environment=environment(runtime.device),
        world_size=prep.dist.world_size,
        model_step_parallel=parallel_t,
        time_to_target=reached,
        per_size=per_size,
        image_size=train_sizes(cfg).largest,
    )
    if json_path is not None and prep.dist.is_main:
        report.json_path = str(report.write_json(json_path))
        log.info("bench report written to %s", report.json_path)
    return report


def _measure_all(prep, b, tc) -> tuple[Timing, Timing | None, Timing, Timing, dict[int, Timing]]:
    """(model-only, model-only data-parallel (torchrun only), loader-only, end to end, model-only at the smaller
    progressive sizes) for a prepared config. The first four are at the largest training size."""
    from fasttrain import distributed
    from fasttrain.data.base import Batch
    from fasttrain.data.progressive import train_sizes

    task, runtime, info = prep.task, prep.runtime, prep.dist
    micro = prep.micro_batch
    state = task.build_state()
    loader = task.make_loader(
        prep.source.train,
        train=True,
        batch_size=micro,
        backend=prep.backend,
        num_shards=info.world_size,
        shard_id=info.rank,
    )
    sizes = train_sizes(prep.cfg)
    first = sizes.first_largest_epoch  # progressive resizing: the largest size
    loader.set_epoch(first)
    parallel_t = None
    try:
        # The ceiling first: its warm-up also absorbs compile and cuDNN autotuning, so end to end starts warm.
        batch = task.synthetic_batch(micro, task.input_spec(), train=True)

        def step_rate(batch: Batch) -> Timing:
            return model_step_throughput(
                task,
                state,
                batch,
                warmup=b.warmup_steps,
                steps=b.steps,
                repeats=b.repeats,
                accumulation=tc.accumulation,
            )

        model_t = step_rate(batch)
        if info.enabled:  # the same step with DDP's all-reduce: one GPU's ceiling against N's
            distributed.wrap_state(state, runtime, sync_bn=prep.cfg.model.sync_bn)
            parallel_t = step_rate(batch)
        del batch
        per_size = {}
        runtime.allow_shapes(len(sizes.distinct()) + 4)  # compiled: one graph per size, as training keeps them
        for size in sizes.distinct() if sizes.progressive else []:
            if size == sizes.largest:
                continue
            spec = task.input_spec()  # classification only (progressive resizing is): targets are the labels
            small = Batch(task.synthetic_inputs(micro, spec, size), task.synthetic_batch(micro, spec).targets)
            per_size[size] = step_rate(small)
        # Both keep to the largest size past the epoch's end (epochs after ``first`` are at it too).
        loader_t = loader_throughput(
            loader,
            warmup_batches=b.warmup_steps,
            max_batches=b.steps,
            repeats=b.repeats,
            device=runtime.device,
            epoch=first,
        )
        e2e_t = end_to_end_throughput(
            task,
            state,
            loader,
            warmup=b.warmup_steps,
            steps=b.steps,
            repeats=b.repeats,
            accumulation=tc.accumulation,
            epoch=first,
        )
    finally:
        loader.close()
    return model_t, parallel_t, loader_t, e2e_t, per_size
