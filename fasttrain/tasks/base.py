"""The task contract: what a batch means, its loss, metrics and steps. The engine owns time, order and files.

A task builds a :class:`TrainState` (modules, optimizers, scalers; the engine adds schedulers), runs
``train_step`` / ``eval_step`` on :class:`~fasttrain.data.base.Batch` objects, and never reads a value back
from the device itself: steps return detached tensors and the engine decides when to sync.
Autotune and the benchmarks call the very same step functions.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Generator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from torch import nn

from fasttrain.config import Config
from fasttrain.data.base import Batch, InputSpec, Loader, LoaderRequest, RunSamples
from fasttrain.data.loaders import make_loader
from fasttrain.data.samples import Samples
from fasttrain.data.sources import DataSource, Split
from fasttrain.data.user import DatasetSplit
from fasttrain.runtime import Runtime
from fasttrain.step import run_step

__all__ = ["Task", "TrainState", "match_param_layout", "load_optimizer_state"]


TRIAL_BATCH = 2
"""Images in the one forward pass that tries a model given from Python: two, so that a model squeezing its
output (``x.squeeze()``) keeps the batch dimension it keeps in training."""


def check_given_model(
    model: nn.Module, inputs: tuple[Any, ...], described: str, check_output: Callable[[Any], None]
) -> nn.Module:
    """A model given from Python, tried once before anything else touches it: one forward pass of ``inputs``
    (the forward's arguments; ``described`` names them in an error), in eval mode and without gradients (no
    BatchNorm statistic moves, no dropout draw), where its parameters are (the CPU where it was built) and in
    their floating dtype. A model with lazy layers (``nn.LazyLinear`` sized by the first input, as a script's
    dummy forward pass would size it) is sized by that pass: they must exist before channels_last, the device
    move, the optimizer and a checkpoint's load. Any other is tried on a copy, under its own random streams, so
    that nothing of it changes (a layer initialised by its first batch, a generator's draws). ``check_output``
    (the task's) judges what the pass returned: a model that cannot train is refused in one line naming what to
    change, not by a traceback from inside the first step after the run folder was made. The inputs are the
    task's :meth:`Task.sizing_inputs`."""
    import copy

    from torch.nn.parameter import is_lazy

    lazy = any(is_lazy(t) for t in (*model.parameters(), *model.buffers()))
    if lazy:
        tried = model
    else:
        try:
            tried = copy.deepcopy(model)
        except Exception:  # noqa: BLE001 - a model that cannot be copied (a compiled one) is not tried
            return model
    first = next((t for t in tried.parameters() if t.is_floating_point()), None)
    device, dtype = (first.device, first.dtype) if first is not None else (torch.device("cpu"), torch.float32)
    inputs = tuple(
        t.to(device, dtype if t.is_floating_point() else t.dtype) if isinstance(t, torch.Tensor) else t for t in inputs
    )
    was_training = tried.training
    tried.eval()
    try:
        with torch.no_grad(), torch.random.fork_rng(devices=[]) if not lazy else contextlib.nullcontext():
            out = tried(*inputs)
    except Exception as e:
        why = (str(e).strip().splitlines() or [""])[0]
        raise ValueError(
            f"model=: a forward pass of {described} raised {type(e).__name__}: {why}"
            + (" (data.channels is the images' channels)" if "channels" in why else "")
        ) from e
    finally:
        tried.train(was_training)
    unsized = [n for n, t in (*model.named_parameters(), *model.named_buffers()) if is_lazy(t)]
    if unsized:
        raise ValueError(f"model=: lazy {', '.join(unsized)} still unsized after a forward pass of {described}")
    check_output(out)
    return model


def check_per_image(out: Any, n: int, what: str, task: str, batch: int = TRIAL_BATCH) -> None:
    """``check_output`` of a task whose model gives ``n`` numbers per image (``what``: the classes, the targets),
    for a forward pass of ``batch`` images."""
    if not isinstance(out, torch.Tensor):
        raise ValueError(
            f"model=: its forward returned a {type(out).__name__}; task {task} takes one tensor of N x {n} "
            f"({what}): return that alone"
        )
    if tuple(out.shape) != (batch, n):
        shape = " x ".join(map(str, out.shape)) or "scalar"
        raise ValueError(
            f"model=: its forward returned a {shape} tensor for {batch} images; task {task} takes {batch} x {n} "
            f"(N x {n}: {what})"
        )


@dataclass
class TrainState:
    modules: dict[str, nn.Module]
    """The uncompiled modules: their state_dicts are what checkpoints hold."""
    callables: dict[str, nn.Module]
    """What the training steps call: the compiled modules (or the same objects when compile is off), wrapped
    for data parallelism under torchrun."""
    optimizers: dict[str, torch.optim.Optimizer]
    scalers: dict[str, torch.amp.GradScaler]
    schedulers: dict[str, Any] = field(default_factory=dict)
    local: dict[str, nn.Module] = field(default_factory=dict)
    """The same modules without the data-parallel wrapper (compiled where ``callables`` are): for evaluation,
    prediction and frozen uses (pix2pix's discriminator while the generator learns), which must not take part in
    gradient synchronisation. Empty means ``callables``."""
    ddp: dict[str, Any] = field(default_factory=dict)
    """The DistributedDataParallel wrappers, by module name (empty in one process)."""
    ema: dict[str, Any] = field(default_factory=dict)
    """Exponential moving averages of the weights (``train.ema_decay``), by module name."""
    epoch: int = 0
    """Epochs completed."""
    step: int = 0
    """Optimizer steps completed."""

    def __post_init__(self) -> None:
        if not self.local:
            self.local = dict(self.callables)

    def state_dict(self) -> dict[str, Any]:
        sd = {
            "modules": {k: m.state_dict() for k, m in self.modules.items()},
            "optimizers": {k: o.state_dict() for k, o in self.optimizers.items()},
            "scalers": {k: s.state_dict() for k, s in self.scalers.items()},
            "schedulers": {k: s.state_dict() for k, s in self.schedulers.items()},
            "epoch": self.epoch,
            "step": self.step,
        }
        if self.ema:
            sd["ema"] = {k: m.state_dict() for k, m in self.ema.items()}
        return sd

    def load_state_dict(self, sd: dict[str, Any]) -> None:
        for group in ("modules", "optimizers", "scalers", "schedulers"):
            mine = getattr(self, group)
            missing = set(mine) ^ set(sd[group])
            if missing:
                raise ValueError(f"checkpoint {group} {sorted(sd[group])} do not match this task's {sorted(mine)}")
            for k, obj in mine.items():
                saved = sd[group][k]
                if group == "scalers" and (not saved or not obj.is_enabled()):
                    # A bf16/fp32 run saved a disabled scaler ({}), or this run needs none: start fresh.
                    continue
                if group == "optimizers":
                    load_optimizer_state(obj, saved)
                else:
                    obj.load_state_dict(saved)
        saved_ema = sd.get("ema") or {}
        for k, ema in self.ema.items():
            if k in saved_ema:
                ema.load_state_dict(saved_ema[k])
            else:  # a run that turned EMA on at resume: the average starts from the weights
                ema.module.load_state_dict(self.modules[k].state_dict())
        self.epoch, self.step = int(sd["epoch"]), int(sd["step"])

    def train(self, mode: bool = True) -> None:
        for m in self.modules.values():
            m.train(mode)
        for m in self.ema.values():
            m.train(mode)


_KERNEL_KEYS = ("fused", "foreach", "capturable")
"""The param-group settings that choose an optimizer's kernels: this run's runtime decides them, not the
checkpoint (:meth:`Runtime.optimizer_kwargs`)."""


def load_optimizer_state(optimizer: torch.optim.Optimizer, saved: dict[str, Any]) -> None:
    """``optimizer.load_state_dict(saved)``, keeping the kernels this run built it with.

    ``Optimizer.load_state_dict`` takes the *saved* param groups whole: a checkpoint written on a CPU
    (``foreach=True, fused=None``) and resumed on CUDA would turn the fused optimizer back into foreach while
    ``_step_supports_amp_scaling`` stays True, and fp16's ``GradScaler.step`` then hands ``grad_scale`` /
    ``found_inf`` to the foreach kernels, which assert at the first step. So the kernel choice is put back on
    every group, each ``step`` tensor goes where those kernels keep it (a float32 on the parameter's device for
    fused / capturable, a CPU scalar otherwise, as ``_init_group`` makes it), and the states take the
    parameters' layout.
    """
    kernels = [{k: g[k] for k in _KERNEL_KEYS if k in g} for g in optimizer.param_groups]
    optimizer.load_state_dict(saved)
    for group, choice in zip(optimizer.param_groups, kernels, strict=True):
        group.update(choice)
        on_device = bool(group.get("fused") or group.get("capturable"))
        for param in group["params"]:
            step = optimizer.state.get(param, {}).get("step")
            if isinstance(step, torch.Tensor):
                if on_device:
                    optimizer.state[param]["step"] = step.to(dtype=torch.float32, device=param.device)
                else:
                    default = torch.float64 if torch.get_default_dtype() == torch.float64 else torch.float32
                    optimizer.state[param]["step"] = step.to(dtype=default, device="cpu")
    match_param_layout(optimizer)


def match_param_layout(optimizer: torch.optim.Optimizer) -> None:
    """Give every per-parameter state tensor (momentum, Adam moments) its parameter's strides.

    ``Optimizer.load_state_dict`` casts states to the parameter's dtype and device but keeps the saved layout: a
    checkpoint written without channels_last, resumed on a channels_last model, gets NCHW-strided states beside
    NHWC-strided parameters, and CUDA's fused optimizer kernels refuse mixed layouts at the first step.
    """
    for param, state in optimizer.state.items():
        for key, value in state.items():
            if isinstance(value, torch.Tensor) and value.shape == param.shape and value.stride() != param.stride():
                state[key] = torch.empty_like(param, dtype=value.dtype).copy_(value)


class Task:
    """Base class; subclasses set the class attributes and implement the methods."""

    name: str = ""
    best_metric: str = "val_loss"
    """Default validation metric that selects the best checkpoint."""
    higher_is_better: frozenset[str] = frozenset()
    """The metrics (by name, without ``train_`` / ``val_`` / ``val_ema_`` / ``test_``) that are better when
    higher, such as an accuracy; every other one (a loss, an error) is better when lower. See
    :meth:`metric_mode`."""
    predict_module: str = "model"
    """The module (key of ``TrainState.local``) whose output prediction describes."""
    output_ndim: int = 2
    """Dimensions of that module's output for a batch (N x outputs); one less for one image is a model that
    squeezed the batch dimension away (``x.squeeze()``), which prediction puts back."""
    sample_kind: str = "class"
    """What its loaders hold (:mod:`fasttrain.data.samples`: class, vector, pair): every backend serves it from
    this (the cache is sized by it, DALI knows what to decode); :meth:`samples` adds what a kind needs more."""
    train_metric_names: tuple[str, ...] = ("loss",)
    """What ``train_step`` returns (epoch records hold them as ``train_<name>``)."""
    cuda_graphs_refused: str = ""
    """Why its step cannot run as CUDA graphs (runtime.compile_mode reduce-overhead or max-autotune on CUDA), or
    "" where it can: one network's forward and backward per micro-batch, its outputs read before the next
    compiled call. CUDA graphs hand each call's memory to the next call once no backward is pending."""

    def __init_subclass__(cls, **kwargs: Any) -> None:
        """A task written for the 0.1 interface said ``best_mode = "max"``; ignored, best.pt would keep its worst
        checkpoint, so it is refused by name when the class is defined."""
        super().__init_subclass__(**kwargs)
        if "best_mode" in vars(cls):
            raise TypeError(
                f"{cls.__qualname__}.best_mode is no longer read: list the metrics that are better when higher in "
                f"higher_is_better (e.g. higher_is_better = frozenset({{'acc'}})); every other one is better lower"
            )

    def __init__(
        self,
        cfg: Config,
        runtime: Runtime,
        source: DataSource | None,
        *,
        model: Any = None,
        restoring: bool = False,
    ):
        self.cfg = cfg
        self.runtime = runtime
        self.source = source
        self.custom_model = model
        """A model passed from Python (an ``nn.Module``, or a function returning one), used instead of
        ``model.name``'s (``model.name = custom``)."""
        self.restoring = restoring
        """A checkpoint will be loaded into the built state (resume, prediction): starting weights
        (model.pretrained, model.init_from) are then neither downloaded nor read."""
        self.inference = False
        """The built state only predicts: no optimizers or scalers (building the first torch optimizer imports
        ``torch._dynamo``, about a second of a prediction's start). A task of one's own may build them anyway."""

    @classmethod
    def metric_mode(cls, metric: str) -> str:
        """``max`` when ``metric`` (``val_acc``, ``test_ema_psnr``, ``acc``) is better higher, else ``min``."""
        name = metric
        for prefix in ("val_ema_", "test_ema_", "train_", "val_", "test_"):
            if metric.startswith(prefix):
                name = metric[len(prefix) :]
                break
        return "max" if name in cls.higher_is_better else "min"

    # -- building ---------------------------------------------------------------------------------------------
    def check(self) -> None:
        """Raise (naming the setting) what cannot train, before a run creates its folder: by default the
        output count (a classifier with one class, regression targets that do not match model.num_outputs)."""
        _ = self.num_outputs

    @property
    def num_outputs(self) -> int:
        """Output units of the (single) model."""
        raise NotImplementedError

    def build_state(self) -> TrainState:
        """Modules on the device (prepared by the runtime), optimizers and scalers; no schedulers.
        This default is one ``model`` from the registry with ``num_outputs`` outputs; pix2pix builds two."""
        from fasttrain.models import build_model
        from fasttrain.optim import make_optimizer

        c = self.cfg
        model = self.given_model() or build_model(
            c.model.name,
            in_channels=c.data.channels,
            num_outputs=self.num_outputs,
            image_size=c.data.image_size,
            width=c.model.width,
            dropout=c.model.dropout,
            pretrained=c.model.pretrained and not self.restoring,
            drop_path_rate=c.model.drop_path_rate,
            blurpool=c.model.blurpool,
        )
        self.load_initial_weights(model, "model")
        fn = self.runtime.prepare_model(model)
        training = not self.inference
        return TrainState(
            {"model": model},
            {"model": fn},
            {"model": make_optimizer(model, c.optim, fused_kwargs=self.runtime.optimizer_kwargs())} if training else {},
            {"model": self.runtime.grad_scaler()} if training else {},
            local={"model": self.runtime.for_eval(model, fn)},
        )

    def given_model(self) -> nn.Module | None:
        """The model passed from Python (a factory is called), or None."""
        m = self.custom_model
        if m is None:
            return None
        if not isinstance(m, nn.Module):
            m = m()
            if not isinstance(m, nn.Module):
                raise TypeError(f"model=: the factory returned a {type(m).__name__}, not a torch.nn.Module")
        return check_given_model(m, *self.sizing_inputs(), self.check_output)

    def data_notes(self) -> list[str]:
        """What the run should know about its training data before it starts (warned once, by rank 0): none by
        default."""
        return []

    def check_output(self, out: Any) -> None:
        """What a model given from Python returned for :meth:`sizing_inputs`: a ValueError naming what the task
        takes when it cannot train on it. The default takes anything."""

    def sizing_inputs(self) -> tuple[tuple[Any, ...], str]:
        """The forward's arguments of the one pass that tries a model given from Python (:func:`check_given_model`:
        it sizes the lazy layers and :meth:`check_output` judges the result), and how an error names them: one
        batch of :data:`TRIAL_BATCH` zero images of data.channels x data.image_size. A task whose model takes other
        inputs (several tensors, a vector) returns those."""
        c, s = self.cfg.data.channels, self.cfg.data.image_size
        described = f"{TRIAL_BATCH} zero {c} x {s} x {s} images (data.channels, data.image_size)"
        return (torch.zeros(TRIAL_BATCH, c, s, s),), described

    def load_initial_weights(self, model: nn.Module, module: str) -> None:
        """``model.init_from``: the file's weights (a fasttrain checkpoint's ``module``, or a state dict) into
        ``model``, before it moves to the device. Not on resume or prediction: their checkpoint overwrites it."""
        path = self.cfg.model.init_from
        if not path or self.restoring:
            return
        from fasttrain.models.init import init_from

        init_from(model, self.cfg, module)

    def samples(self, split: Split) -> Samples:
        """What a loader over ``split`` delivers (:mod:`fasttrain.data.samples`), the same on every backend: by
        default ``sample_kind`` over the split's files; a task whose samples need more says so here (regress:
        scaled targets and each image's size; pix2pix: the training jitter)."""
        return Samples(split, self.sample_kind)

    def _samples(self, split: Split) -> Samples:
        # A split of a dataset given from Python holds its own items, whatever the task would make of files.
        return Samples(split, "dataset") if isinstance(split, DatasetSplit) else self.samples(split)

    def run_samples(self) -> RunSamples:
        """Every sample the run reads (training and validation splits): what the backend choice weighs."""
        src = self.source
        if src is None:
            raise ValueError(f"task {self.name}: no data source (a task built for prediction has no samples)")
        return RunSamples(self._samples(src.train), self._samples(src.val) if src.val else None)

    def make_loader(
        self, split: Split, *, train: bool, batch_size: int, backend: str, num_shards: int = 1, shard_id: int = 0
    ) -> Loader:
        """A loader over ``split`` yielding device Batches of ``batch_size`` (this process's micro-batch).

        ``backend`` (``data.loader``, or what auto chose) means the same for every task: the task says which
        samples the split holds (:meth:`samples`) and the backend builds them (:mod:`fasttrain.data.loaders`).
        Under torchrun, ``num_shards`` is the world size and ``shard_id`` the global rank: the epoch's global order
        stays a function of (seed, epoch), each process reads an interleaved slice, and every process yields the
        same number of training batches (see :mod:`fasttrain.data.order`)."""
        request = LoaderRequest(self._samples(split), train, batch_size, num_shards, shard_id)
        return make_loader(backend, request, self.cfg, self.input_spec())

    def input_spec(self) -> InputSpec:
        mean, std = self.cfg.data.norm_mean_std()
        return self.runtime.input_spec(mean, std)

    # -- steps -----------------------------------------------------------------------------------------------
    def train_phases(
        self, state: TrainState, batch: Batch
    ) -> Generator[tuple[str, torch.Tensor], None, dict[str, torch.Tensor]]:
        """The meaning of one training micro-batch: forward passes that ``yield (module name, loss)`` in the
        order the networks update, then ``return`` detached scalar metrics (means over the batch).

        The backward pass, gradient synchronisation, clipping, scaling and the optimizer step of each yielded
        loss happen between the yields (:func:`fasttrain.step.run_step`), so a later phase sees the earlier
        network already updated, as in a hand-written GAN loop.
        """
        raise NotImplementedError

    def train_step(
        self, state: TrainState, batch: Batch, *, update: bool = True, loss_scale: float = 1.0
    ) -> dict[str, torch.Tensor]:
        """Forward + backward on one micro-batch; the optimizers step when ``update``.

        ``loss_scale`` (1 / accumulation) scales the backward pass. Returns detached scalar tensors (means over
        the batch), read by the engine only every ``train.log_every`` steps. The engine, autotune and the
        benchmarks all call this; what it does around the task's losses is :func:`fasttrain.step.run_step`.
        """
        phases = self.train_phases(state, batch)  # a generator: nothing runs before run_step advances it
        clip = self.cfg.optim.grad_clip
        return run_step(state, phases, grad_clip=clip, update=update, loss_scale=loss_scale)

    def eval_step(self, state: TrainState, batch: Batch) -> dict[str, torch.Tensor]:
        """Sums over the batch (and ``count``) as detached tensors; the engine adds them up on the device."""
        raise NotImplementedError

    def eval_metric_names(self) -> tuple[str, ...]:
        """What ``eval_metrics`` returns (``val_<name>`` in epoch records; what train.best_metric may name)."""
        return ("loss",)

    def eval_metrics(self, sums: dict[str, float]) -> dict[str, float]:
        """Turn summed eval values into the reported metrics (without the ``val_`` prefix)."""
        n = max(sums.get("count", 0.0), 1.0)
        return {k: v / n for k, v in sums.items() if k != "count"}

    def synthetic_batch(self, batch_size: int, spec: InputSpec, train: bool = True) -> Batch:
        """A batch of the largest shape the data produces, already on the device (autotune, benchmarks)."""
        raise NotImplementedError

    def synthetic_inputs(self, batch_size: int, spec: InputSpec, size: int = 0) -> torch.Tensor:
        """Random model inputs at ``size`` (default the configured size), dtype and memory format, on the device."""
        s, c = size or self.cfg.data.image_size, self.cfg.data.channels
        x = torch.randn(batch_size, c, s, s, device=spec.device).to(spec.dtype)
        return x.contiguous(memory_format=torch.channels_last) if spec.channels_last else x

    # -- hooks -----------------------------------------------------------------------------------------------
    def on_step_end(self, state: TrainState, batch: Batch, run_dir: Path | None) -> None:
        """Called after every optimizer step (pix2pix saves sample grids here)."""

    def on_epoch_end(self, state: TrainState, run_dir: Path | None, val_loader: Loader | None) -> None:
        """Called after each epoch's evaluation (pix2pix saves a sample grid from the first val batch)."""

    def on_run_end(
        self, state: TrainState, run_dir: Path | None, val_loader: Loader, weights: str, ema: bool = False
    ) -> None:
        """Called once after the last epoch with the weights the run reports (``weights`` says which: best.pt's
        where it has one; ``ema``: its moving average validated better, so reports use the average); every
        process calls it, ``run_dir`` is None where it must not write (the classifier writes its confusion
        matrix here)."""

    # -- prediction ------------------------------------------------------------------------------------------
    def preprocess(self, image: Image.Image) -> torch.Tensor:
        """A decoded image -> uint8 C x H x W as the evaluation transform makes it."""
        from fasttrain.data.transforms import eval_transform

        return eval_transform(self.cfg.data)(image)

    def predict(
        self, state: TrainState, paths: list[str], meta: dict[str, Any], out_dir: Path | None = None
    ) -> list[dict[str, Any]]:
        """One printable record per image file (unreadable files get an ``error``, the others continue).

        Each output goes to :meth:`describe_prediction` with ``meta`` plus ``image`` (the path),
        ``image_size`` (its width, height) and ``out_dir``.
        """
        from fasttrain.data.base import normalize_on_device
        from fasttrain.data.decode import DECODE_ERRORS, load_image

        spec = self.input_spec()
        scale_shift = spec.scale_shift()  # once, not per image
        model = state.local[self.predict_module]
        state.train(False)
        records = []
        for path in paths:
            try:
                image = load_image(path, self.cfg.data.channels)
            except DECODE_ERRORS as e:
                records.append({"image": path, "error": f"cannot read image: {e}"})
                continue
            with torch.no_grad(), self.runtime.autocast():
                out = self.infer(model, normalize_on_device(self.preprocess(image)[None], spec, scale_shift))
            if out.ndim == self.output_ndim - 1:  # a model of one's own squeezed the batch of one away
                out = out[None]
            info = {**meta, "image": path, "image_size": image.size, "out_dir": out_dir}
            records.append({"image": path, **self.describe_prediction(out[0].float().cpu(), info)})
        return records

    def infer(self, model: Any, x: torch.Tensor) -> torch.Tensor:
        """The model's output for an evaluation or prediction batch (a classifier adds test-time augmentation)."""
        return model(x)

    def describe_prediction(self, output: torch.Tensor, meta: dict[str, Any]) -> dict[str, Any]:
        """One model output (no batch dim, float32 on the CPU) -> a printable record."""
        raise NotImplementedError

    def checkpoint_meta(self) -> dict[str, Any]:
        """What prediction needs besides the config (class names, target names), stored in checkpoints."""
        src = self.source
        return {
            "class_names": list(src.class_names) if src and src.class_names else None,
            "target_names": list(src.target_names) if src and src.target_names else None,
            "samples": {s.name: len(s) for s in (src.train, src.val, src.test) if s is not None} if src else None,
            "float_items": bool(getattr(src.train, "floating", False)) if src else False,
        }
