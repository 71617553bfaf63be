"""From a config to everything a run needs, decided once and shared by train, autotune and bench: the data
root (the demo dataset when empty, always saved absolute), the discovered files, the output count, the
process's place in a torchrun job, the runtime, the task and the loader backend with the reason for it.

What can be refused from the config and the file list is refused here, before a run creates its folder: an
unknown model, a classifier with one class, a batch that does not divide over the processes. (The engine
builds its loaders, which check the files themselves, before the folder too.)
"""

from __future__ import annotations

import dataclasses
import logging
import time
from dataclasses import dataclass
from typing import Any

from fasttrain import distributed
from fasttrain.config import Config, ConfigError, local_data_root
from fasttrain.data import prebuild
from fasttrain.data.index import indexed_source
from fasttrain.data.sources import DataSource
from fasttrain.distributed import DistInfo
from fasttrain.runtime import Runtime, resolve_device, runtime_for
from fasttrain.tasks import Task, make_task

log = logging.getLogger(__name__)

__all__ = ["Prepared", "check_cuda_graphs", "prepare", "resolve_data_root"]


@dataclass
class Prepared:
    """Everything a loop needs, built once from a config (shared with autotune and bench)."""

    cfg: Config
    runtime: Runtime
    source: DataSource
    task: Task
    backend: str
    backend_reason: str
    dist: DistInfo = dataclasses.field(default_factory=DistInfo)
    """This process's place in a torchrun job (one process: rank 0 of 1)."""
    marks: list[tuple[str, float]] = dataclasses.field(default_factory=list)
    """Where preparing went, for the run's start-up record: (phase, ``time.perf_counter()`` at its end), ``index``
    (joining a torchrun job, the dataset's index: read, built, or waited for while another process builds it)
    and ``device`` (the runtime's decisions, the device's first use)."""

    @property
    def micro_batch(self) -> int:
        """Samples per micro-batch on this process: the global batch split over accumulation and processes."""
        return distributed.per_rank_batch(self.cfg.train.micro_batch, self.dist.world_size)

    @property
    def eval_batch(self) -> int:
        return max(1, self.cfg.train.eval_batch // self.dist.world_size)

    def new_task(
        self, cfg: Config | None = None, runtime: Runtime | None = None, *, restoring: bool | None = None
    ) -> Task:
        """A task like this one for another config or runtime (autotune's eager probes, loader trials and
        verification), over the same data and with the same model given from Python, if any; ``restoring``
        as this one's unless given."""
        restoring = self.task.restoring if restoring is None else restoring
        model = self.task.custom_model
        return make_task(cfg or self.cfg, runtime or self.runtime, self.source, model=model, restoring=restoring)


def resolve_data_root(cfg: Config) -> Config:
    """An empty data.root means the demo dataset, written on first use. The root is made absolute, so a run's
    saved config (and ``--resume``) works from any folder."""
    if "://" in cfg.data.root:  # shards by URL (fasttrain.data.shards): no local path to resolve
        return cfg
    root = local_data_root(cfg.data.root)
    if root is None:
        from fasttrain.data.synthetic import demo_dataset

        root = str(demo_dataset())
        log.info("data.root is empty: using the demo dataset in %s", root)
    return dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, root=root))


def prepare(
    cfg: Config,
    *,
    memory_limit: int | None = None,
    model: Any = None,
    dataset: Any = None,
    val_dataset: Any = None,
    host_check: bool = True,
    restoring: bool = False,
) -> Prepared:
    """Resolve the data root, discover files, fix the output count, join a torchrun job, decide the runtime,
    the task and the backend, and check that a step can run. ``memory_limit``: device bytes the run may use
    when smaller than the card (the GPU cache must fit it). ``model``: an ``nn.Module`` (or a function returning
    one) from Python, used instead of ``model.name``'s (which becomes ``custom``). ``dataset`` /
    ``val_dataset``: map-style datasets from Python instead of ``data.root``'s files (:mod:`fasttrain.data.user`;
    ``data.root`` then records ``python:<class name>``). ``host_check``: on CPU, refuse a micro-batch whose step
    would not fit the host's memory (:func:`check_host_memory`; autotune, which looks for one that fits, turns it
    off). ``restoring``: a checkpoint will be loaded into the task's state (a resume: no starting weights)."""
    from fasttrain.data.user import DATASET_ROOT, dataset_source, is_dataset_run
    from fasttrain.models import CUSTOM, check_model

    if model is not None and cfg.model.name != CUSTOM:
        cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, name=CUSTOM))
    check_model(cfg.model.name, given=model is not None, dropout=cfg.model.dropout)
    if dataset is not None:
        cfg, source = dataset_source(cfg, dataset, val_dataset)
    elif val_dataset is not None:
        raise ValueError("val_dataset: given without dataset (the training data)")
    elif is_dataset_run(cfg):
        raise ConfigError(
            f"data.root = {cfg.data.root!r}: this run trained on a dataset given from Python; pass it "
            f"again (dataset=...), or set data.root to a folder of images (a root may not start with "
            f"{DATASET_ROOT!r})"
        )
    # before discovery: rank 0 lists (or reads the dataset index) for all
    info = distributed.init(resolve_device(cfg.runtime.device).type, timeout_s=cfg.dist.timeout_s)
    if dataset is None:
        cfg = resolve_data_root(cfg)
        if prebuild.pending():  # another process reads or builds the index: import what the first step needs
            _import_for_first_step(cfg)
        # the dataset index: built once, reused while the files are unchanged (the command line's child's, if any)
        source = indexed_source(cfg.data, timeout_s=cfg.dist.timeout_s, prebuilt=prebuild.take)
    marks = [("index", time.perf_counter())]
    if not cfg.model.num_outputs and source.num_outputs:
        cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, num_outputs=source.num_outputs))
    runtime = runtime_for(cfg, train_samples=len(source.train))  # under torchrun: LOCAL_RANK's GPU
    marks.append(("device", time.perf_counter()))
    task = make_task(cfg, runtime, source, model=model, restoring=restoring)
    task.check()
    if runtime.cuda_graphs:
        check_cuda_graphs(cfg, task)
    if host_check and not runtime.is_cuda:
        check_host_memory(
            cfg, runtime.precision.name, distributed.per_rank_batch(cfg.train.micro_batch, info.world_size)
        )
    backend, reason = _choose_backend(cfg, runtime, memory_limit, task)
    prep = Prepared(cfg, runtime, source, task, backend, reason, info, marks)
    _ = prep.micro_batch  # the global batch divides over the processes
    return prep


def check_cuda_graphs(cfg: Config, task: Task) -> None:
    """Refuse what CUDA graphs (runtime.compile_mode reduce-overhead or max-autotune on CUDA) would get wrong.
    torch's CUDA-graph trees start a new generation at a compiled call made with no backward pending, and hand
    the previous calls' memory to it: gradients kept across micro-batches (accumulation) would be overwritten
    (torch's own error for this case names gradient accumulation), as would a task's activations saved for a
    backward that runs after another network's."""
    mode = f"runtime.compile_mode = {cfg.runtime.compile_mode}"
    fix = "use runtime.compile_mode = default or max-autotune-no-cudagraphs"
    if cfg.train.accumulation > 1:
        raise ConfigError(
            f"train.accumulation = {cfg.train.accumulation} with {mode}: CUDA graphs reuse the memory of a "
            f"micro-batch's gradients at the next one, so accumulated gradients would be overwritten; {fix}, "
            f"or train.accumulation = 1"
        )
    if task.cuda_graphs_refused:
        raise ConfigError(f"{mode}: the {task.name} task cannot run as CUDA graphs ({task.cuda_graphs_refused}); {fix}")


def _import_for_first_step(cfg: Config) -> None:
    """Import the slow modules the first step imports anyway, while the dataset index is built in another
    process (:mod:`fasttrain.data.prebuild`): ``torch._dynamo`` (about 1.3 s; torch's optimizers import it when
    they are built) and, unless the loader is DALI, ``torchvision`` (the torch loader's training transforms,
    torchvision's models; the backend is not chosen yet)."""
    import torch._dynamo  # noqa: F401

    if cfg.data.loader != "dali":
        import torchvision  # noqa: F401


def check_host_memory(cfg: Config, precision: str, micro_batch: int) -> None:
    """On CPU host memory is the budget: refuse, in one line and before the first step, a micro-batch whose
    training step (activations saved for backward, weights, gradients, optimizer state: estimated by
    ``runtime.model_profile``, from one small sample on the CPU or on the meta device) would not fit the memory
    available now; the kernel would kill the run without a word."""
    from fasttrain import memory
    from fasttrain.runtime import host_batch_limit, host_step_bytes, model_profile

    available = memory.available_host_bytes()
    profile = model_profile(cfg)
    if available is None or profile is None:
        return
    need = host_step_bytes(profile, micro_batch, precision)
    if need <= 0.9 * available:
        return
    fits = host_batch_limit(profile, precision, available)
    advice = f"about {fits} fits: lower train.batch_size" if fits else "not even one sample fits: use a smaller model"
    raise ConfigError(
        f"train.batch_size: a {precision} step of {cfg.model.name} at {cfg.data.image_size} px and micro-batch "
        f"{micro_batch} needs about {memory.format_bytes(need, 'GiB')} of host memory, more than 90% of the "
        f"{memory.format_bytes(available, 'GiB')} available; {advice} (or raise train.accumulation)"
    )


def _choose_backend(cfg: Config, runtime: Runtime, memory_limit: int | None, task: Task) -> tuple[str, str]:
    """The loader backend for every task and every kind of sample alike (``data.loader``), and why: the one
    policy of :func:`fasttrain.data.loaders.choose_backend` over the samples the task reads."""
    from fasttrain.data.loaders import choose_backend

    return choose_backend(cfg.data.loader, task.run_samples(), cfg, runtime.device, memory_limit)
