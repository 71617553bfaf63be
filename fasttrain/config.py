"""Configuration: one dataclass per concern, loaded from TOML, overridden with ``--set section.key=value``.

Precedence is defaults < TOML file < ``--set``. Every mistake (an unknown section or key, a value of the
wrong type, a value out of range) raises :class:`ConfigError` naming the offending ``section.key``.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import math
import os
import tomllib
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import tomli_w

from fasttrain import registry

__all__ = [
    "ConfigError",
    "Config",
    "DataConfig",
    "local_data_root",
    "trained_samples",
    "ModelConfig",
    "OptimConfig",
    "ScheduleConfig",
    "RuntimeConfig",
    "TrainConfig",
    "TaskConfig",
    "TuneConfig",
    "BenchConfig",
    "DistConfig",
    "load_config",
    "packaged_config",
    "packaged_configs",
    "config_path",
    "apply_overrides",
    "config_to_dict",
    "config_from_dict",
    "dump_config",
    "default_workers",
    "FieldInfo",
    "field_docs",
    "describe_config",
]


class ConfigError(ValueError):
    """A configuration value is wrong; the message names the field (``section.key``)."""


PILLOW_BOMB_PIXELS = 2 * 89_478_485
"""Pillow raises DecompressionBombError above 2 x ``PIL.Image.MAX_IMAGE_PIXELS`` (89,478,485 by default) pixels."""


def default_workers(device_type: str = "cuda", local_world_size: int | None = None) -> int:
    """Loader worker processes / DALI threads per process, taken from the machine: all cores but one, shared by
    the processes of this node (torchrun's ``LOCAL_WORLD_SIZE``; 8 GPUs on 96 cores: 11 each, not 8 x 16), at
    most 16 and at least 1. A CPU-only run on 2 cores or fewer takes none: a worker process competes with the
    step's own threads for the cores (measured on 2 cores, CIFAR-10 JPEG, smallcnn: 1 worker ran at 0.5x and 2
    workers at 0.89x of none)."""
    n = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    if device_type == "cpu" and n <= 2:
        return 0
    if local_world_size is None:
        try:
            local_world_size = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
        except ValueError:
            local_world_size = 1  # a malformed value is named where the distributed set-up reads it
    return max(1, min(16, (n - 1) // max(1, local_world_size)))


HEADER_CHECKS = ("auto", "start", "read")
"""data.header_checks' values (see DataConfig)."""
HEADER_CHECKS_AT_START_BELOW = 50_000
"""data.header_checks = auto: datasets of fewer files (listed under data.root) are checked when the index is built."""


def resolve_header_checks(value: str, files: int) -> str:
    """data.header_checks for a dataset of ``files`` files (listed under data.root): start or read (auto: start
    below :data:`HEADER_CHECKS_AT_START_BELOW`)."""
    if value == "auto":
        return "start" if files < HEADER_CHECKS_AT_START_BELOW else "read"
    return value


def _check(cond: bool, name: str, msg: str) -> None:
    if not cond:
        raise ConfigError(f"{name}: {msg}")


def _choice(value: str, name: str, choices: tuple[str, ...]) -> None:
    _check(value in choices, name, f"must be one of {', '.join(choices)}, got {value!r}")


@dataclass
class DataConfig:
    root: str = ""
    """Dataset folder; empty means the built-in demo dataset (written on first use). Tar shards (fasttrain pack):
    their folder, one .tar, a brace pattern (train-{000000..000009}.tar) or http(s):// URLs of these."""
    format: str = "folder"
    """On-disk layout: folder (ImageFolder classes), manifest (CSV/JSONL image -> class or targets), drawing (canvas
    steps), paired (A/B or side-by-side pix2pix), shards (tar shards; found by themselves under folder)."""
    train_dir: str = "train"
    """Sub-folder with the training split (relative to root); root itself is used when it does not exist."""
    val_dir: str = "val"
    """Sub-folder with the validation split; when missing, val_fraction of the training files is held out."""
    test_dir: str = "test"
    """Optional sub-folder evaluated once at the end of training."""
    manifest: str = "labels.csv"
    """Manifest file (CSV with a header, or .jsonl), relative to root, for format=manifest: one row per image, its
    path (relative to root) in a column named path, image, file, filename, file_name, image_path, filepath,
    image_name or img; an optional split column (train, val, test). A label, class or category column holds
    classes (a classifier's dataset); else the numeric columns are regression targets."""
    target_columns: list[str] = field(default_factory=list)
    """Manifest columns/keys used as regression targets; empty means every numeric column but the path and split
    (and none when a label, class or category column makes the manifest a classifier's)."""
    val_fraction: float = 0.1
    """Share of training files held out for validation when there is no val_dir (0..0.9)."""
    split_seed: int = 0
    """Seed of the held-out validation split (independent of runtime.seed)."""
    image_size: int = 224
    """Side of the square training crop and evaluation crop, in pixels (data.progressive and data.eval_size set
    them apart)."""
    resize_size: int = 0
    """Evaluation: shorter side resized to this before the centre crop; 0 means the evaluation crop / 0.875."""
    eval_size: int = 0
    """Side of the evaluation centre crop, in pixels; 0 means image_size. Larger than the training size pays
    (the train-test resolution effect: random-resized crops make objects look larger in training)."""
    progressive: list[int] = field(default_factory=list)
    """Progressive resizing (classification): [min, max] training image side in pixels, growing from min to
    max over data.progressive_epochs (FFCV's ResNet recipes: [160, 192]); [] = off (image_size throughout).
    Evaluation stays at eval_size (or image_size)."""
    progressive_epochs: list[float] = field(default_factory=list)
    """Progressive resizing: [start, end] epochs (0-based): min up to start, max from end on, linear between;
    [] = the whole run (0 .. train.epochs - 1)."""
    progressive_step: int = 32
    """Progressive resizing: sizes are rounded to multiples of this many pixels (fewer distinct shapes, hence
    fewer torch.compile recompiles; multiples of 32 suit GPU kernels)."""
    channels: int = 3
    """Image channels fed to the model: 3 (RGB) or 1 (grayscale). Other modes (RGBA, P, CMYK, L) are converted."""
    random_resized_crop: bool = True
    """Training augmentation: random-resized-crop (else resize + centre crop as for evaluation)."""
    crop_scale_min: float = 0.08
    """Smallest area share of a random-resized-crop (0..1]."""
    hflip: bool = True
    """Training augmentation: random horizontal flip."""
    flip_alternate: bool = False
    """With data.hflip: each image flipped at random in the first epoch, then the other way in each epoch after
    (airbench's alternating flip: every image is seen both ways in any two epochs in a row, where random flips
    repeat a side half the time). Classification, on every backend."""
    translate: int = 0
    """Training augmentation for small images, with data.random_resized_crop = false: a random shift of up to this
    many pixels each way, the border reflected (torchvision's RandomCrop(size, padding=N, padding_mode='reflect');
    airbench: 2 on CIFAR's 32 px); 0 = off. Classification; the torch loader and the cache (DALI has no
    reflection)."""
    rand_augment: str = ""
    """Training augmentation: timm's RandAugment policy string (e.g. rand-m9-mstd0.5-inc1: magnitude 9 of 10, 2
    ops per image), applied after crop and flip by timm.data.rand_augment_transform; empty = off. Needs timm and
    the torch loader (it works on PIL images)."""
    mean: list[float] = field(default_factory=lambda: [0.485, 0.456, 0.406])
    """Per-channel mean on the 0..1 scale, subtracted on the device (one value per data.channels; three RGB
    values also serve grayscale, averaged)."""
    std: list[float] = field(default_factory=lambda: [0.229, 0.224, 0.225])
    """Per-channel standard deviation on the 0..1 scale (one value per data.channels, as data.mean)."""
    loader: str = "auto"
    """Backend, the same for every task: auto (the GPU cache when the decoded data fits it, else DALI: GPU decode
    on CUDA, its CPU-only mode without a GPU; torch where DALI cannot serve), torch, dali, cache."""
    workers: int = -1
    """torch loader worker processes; -1 means taken from the machine (cores - 1, shared by the node's processes
    under torchrun, at most 16 each; none for a CPU-only run on 2 cores or fewer)."""
    prefetch: int = 2
    """Batches prepared ahead per worker (torch) or pipeline depth (DALI)."""
    dali_threads: int = -1
    """DALI CPU threads; -1 means taken from the machine (cores - 1, shared by the node's processes under
    torchrun, at most 16 each)."""
    hw_decoder_load: float = 0.9
    """Share of JPEG decoding DALI sends to the GPU's hardware decoder (0..1)."""
    cache_budget: float = 0.25
    """GPU cache: use it only if the decoded dataset takes at most this share of device memory (0..1)."""
    max_samples: int = 0
    """Use at most this many training files (0 = all); for smoke tests and quick trials."""
    max_image_pixels: int = PILLOW_BOMB_PIXELS
    """Files whose header announces more pixels (width x height) are skipped on every backend, before decoding
    (a few-KB PNG can decode to gigabytes). Default and upper bound: Pillow's DecompressionBombError threshold."""
    max_bad_per_epoch: int = 10
    """A run stops, listing the files, when more than this many files fail to decode within one epoch (files
    the pre-check already skipped do not count): a damaged dataset is not trained on silently."""
    header_checks: str = "auto"
    """When each image file's header is checked (format, size, pixel limit, cut short): start (every file when
    the dataset index is built, before the first step: bad files are reported at once), read (the index is built
    from the listing alone, no file opened; each file is checked by the loader when it first reads its bytes,
    and a file refused then is skipped as the pre-check skips it, not counted by max_bad_per_epoch), auto (start
    below 50,000 files under data.root, read at or above: a cold start of a large dataset opens no file). Tasks
    that need each image's size before training (regression size targets, paired images) check unchecked files at
    construction."""
    stream: str = "auto"
    """Remote tar shards (http(s)://, s3://...): auto streams those with an index (.idx, as fasttrain pack writes)
    on the torch loader, read in one pass each, never stored, and downloads the others whole into the cache; on
    streams (a shard without an index is an error); off downloads every shard first. The cache and DALI read
    members by offset: they download a streamed shard whole on its first read."""
    shuffle_buffer: int = 1000
    """Streamed training shards: samples (undecoded bytes, per DataLoader worker) the shuffle buffer holds; it is
    filled before the first sample leaves. 0 = no buffer (shard order only). The order is shard-level plus this
    buffer, not the per-sample (seed, epoch) permutation local shards keep."""

    def __post_init__(self) -> None:
        _choice(self.format, "data.format", registry.names("formats"))
        _choice(self.loader, "data.loader", (registry.AUTO, *registry.names("backends")))
        _check(self.channels in (1, 3), "data.channels", f"must be 1 or 3, got {self.channels}")
        _check(0.0 <= self.val_fraction <= 0.9, "data.val_fraction", f"must be in 0..0.9, got {self.val_fraction}")
        _check(self.image_size >= 8, "data.image_size", f"must be >= 8 pixels, got {self.image_size}")
        _check(self.eval_size == 0 or self.eval_size >= 8, "data.eval_size", f"must be 0 or >= 8, got {self.eval_size}")
        _check(
            self.resize_size == 0 or self.resize_size >= self.eval_crop,
            "data.resize_size",
            f"must be 0 or >= the evaluation crop (data.eval_size or data.image_size, {self.eval_crop}), "
            f"got {self.resize_size}",
        )
        p, pe = self.progressive, self.progressive_epochs
        _check(self.progressive_step >= 1, "data.progressive_step", f"must be >= 1 pixel, got {self.progressive_step}")
        _check(
            not p or (len(p) == 2 and 8 <= p[0] <= p[1]),
            "data.progressive",
            f"must be [] (off) or [min, max] pixels with 8 <= min <= max, got {p}",
        )
        _check(
            not pe or (len(pe) == 2 and 0 <= pe[0] <= pe[1]),
            "data.progressive_epochs",
            f"must be [] (the whole run) or [start, end] epochs with 0 <= start <= end, got {pe}",
        )
        _check(
            not pe or bool(p),
            "data.progressive_epochs",
            "does nothing without data.progressive = [min, max] (the sizes to grow between)",
        )
        _check(0.0 < self.crop_scale_min <= 1.0, "data.crop_scale_min", f"must be in (0, 1], got {self.crop_scale_min}")
        _check(
            self.hflip or not self.flip_alternate,
            "data.flip_alternate",
            "alternates the flips data.hflip draws; with data.hflip = false there are none (set data.hflip = true)",
        )
        _check(self.translate >= 0, "data.translate", f"must be >= 0 pixels (0 = off), got {self.translate}")
        _check(
            not (self.translate and self.random_resized_crop),
            "data.translate",
            "shifts the whole image and needs data.random_resized_crop = false (a random-resized-crop already "
            "moves its window)",
        )
        smallest = self.progressive[0] if self.progressive else self.image_size
        _check(
            self.translate < smallest,
            "data.translate",
            f"must be below the smallest training size ({smallest} px: the reflected border comes from inside the "
            f"image), got {self.translate}",
        )
        for name in ("mean", "std"):
            vals = getattr(self, name)
            # One value per channel; RGB statistics (the default) also serve a grayscale input, averaged.
            _check(
                len(vals) == self.channels or (self.channels == 1 and len(vals) == 3),
                f"data.{name}",
                f"needs one value per channel ({self.channels} for data.channels = {self.channels}), got "
                f"{len(vals)}: {vals}",
            )
        _check(all(s > 0 for s in self.std), "data.std", "values must be > 0")
        _check(self.workers >= -1, "data.workers", f"must be >= 0 or -1 (auto), got {self.workers}")
        _check(self.dali_threads == -1 or self.dali_threads >= 1, "data.dali_threads", "must be >= 1 or -1 (auto)")
        _check(self.prefetch >= 1, "data.prefetch", f"must be >= 1, got {self.prefetch}")
        _check(0.0 <= self.hw_decoder_load <= 1.0, "data.hw_decoder_load", "must be in 0..1")
        _check(0.0 < self.cache_budget <= 0.9, "data.cache_budget", "must be in (0, 0.9]")
        _check(self.max_samples >= 0, "data.max_samples", "must be >= 0")
        _check(
            1 <= self.max_image_pixels <= PILLOW_BOMB_PIXELS,
            "data.max_image_pixels",
            f"must be in 1..{PILLOW_BOMB_PIXELS} (Pillow refuses larger images on the torch loader and cache), "
            f"got {self.max_image_pixels}",
        )
        _check(
            not self.rand_augment or self.rand_augment.startswith("rand"),
            "data.rand_augment",
            f"must be a timm RandAugment string such as rand-m9-mstd0.5-inc1, or empty, got {self.rand_augment!r}",
        )
        _check(self.max_bad_per_epoch >= 0, "data.max_bad_per_epoch", f"must be >= 0, got {self.max_bad_per_epoch}")
        _choice(self.header_checks, "data.header_checks", HEADER_CHECKS)
        _choice(self.stream, "data.stream", ("auto", "on", "off"))
        _check(
            0 <= self.shuffle_buffer <= 1_000_000,
            "data.shuffle_buffer",
            f"must be in 0..1000000 samples (0 = no buffer), got {self.shuffle_buffer}",
        )
        _check(
            not self.target_columns or self.format == "manifest",
            "data.target_columns",
            f"names manifest columns; data.format = {self.format!r} has none (remove it, or use format = manifest)",
        )

    @property
    def eval_crop(self) -> int:
        """Side of the evaluation centre crop: eval_size, else image_size."""
        return self.eval_size or self.image_size

    @property
    def eval_resize(self) -> int:
        return self.resize_size or int(round(self.eval_crop / 0.875))

    @property
    def train_size_max(self) -> int:
        """The largest training image side: progressive's max, else image_size."""
        return self.progressive[1] if self.progressive else self.image_size

    @property
    def num_workers(self) -> int:
        return default_workers() if self.workers < 0 else self.workers

    def workers_for(self, device_type: str) -> int:
        """``data.workers`` for a run on ``device_type`` (auto: :func:`default_workers` for that device)."""
        return default_workers(device_type) if self.workers < 0 else self.workers

    @property
    def num_dali_threads(self) -> int:
        return default_workers() if self.dali_threads < 0 else self.dali_threads

    def norm_mean_std(self) -> tuple[list[float], list[float]]:
        """Mean and std with one value per channel (RGB statistics are averaged for grayscale)."""

        def per_channel(vals: list[float]) -> list[float]:
            if len(vals) == self.channels:
                return list(vals)
            if len(vals) == 1:
                return list(vals) * self.channels
            return [sum(vals) / len(vals)]

        return per_channel(self.mean), per_channel(self.std)


@dataclass
class ModelConfig:
    name: str = "resnet18"
    """Registry name: torchvision models (resnet18, resnet50, ...) or small nets (mlp, convnet, smallcnn, unet)."""
    num_outputs: int = 0
    """Output units; 0 means taken from the data (classes, or target values)."""
    width: int = 32
    """Base channel width of the small nets (convnet, smallcnn, unet, patchgan)."""
    dropout: float = 0.0
    """Dropout before the classifier of the small nets and timm models (0..1); torchvision's models take none."""
    drop_path_rate: float = 0.0
    """Stochastic depth: the largest share of residual blocks skipped per sample in training (0 = off; 0.1-0.2
    usual): timm models' drop_path_rate, torchvision's stochastic_depth_prob (efficientnet_*, convnext_*); refused
    for models without it."""
    pretrained: bool = False
    """Start from the torchvision (or timm) default pretrained weights, downloaded into their cache on first use
    (torch.hub's checkpoints folder, or the Hugging Face cache; offline, an error names the folder and file);
    the head gets fresh outputs when the class count differs."""
    init_from: str = ""
    """Start from the weights in this file: a fasttrain checkpoint or a state dict (keys and shapes must match)."""
    reset_head: bool = False
    """With init_from: leave the file's classifier head out and start it fresh (a new class count)."""
    blurpool: bool = False
    """Anti-aliased downsampling (BlurPool) in torchvision ResNets, as FFCV's recipes: every strided convolution
    with >= 16 input channels blurs its input with a fixed 3x3 binomial filter first (+0.5-1 % top-1 on
    ImageNet for ~10 % more compute). Changes the checkpoint's layout (convN -> convN.conv)."""
    sync_bn: bool = False
    """Under torchrun: batch-norm statistics over all GPUs' samples (SyncBatchNorm), for small per-GPU batches.
    CUDA only (NCCL)."""

    def __post_init__(self) -> None:
        _check(bool(self.name), "model.name", "must not be empty")
        _check(
            not (self.pretrained and self.init_from),
            "model.init_from",
            "give model.pretrained or model.init_from, not both",
        )
        _check(
            not self.reset_head or bool(self.init_from),
            "model.reset_head",
            "applies only with model.init_from (model.pretrained starts a head of another class count fresh by "
            "itself); remove it or set model.init_from",
        )
        _check(self.num_outputs >= 0, "model.num_outputs", "must be >= 0")
        _check(self.width >= 1, "model.width", "must be >= 1")
        _check(0.0 <= self.dropout < 1.0, "model.dropout", "must be in [0, 1)")
        _check(
            0.0 <= self.drop_path_rate < 1.0, "model.drop_path_rate", f"must be in [0, 1), got {self.drop_path_rate}"
        )


_FLOAT32_MAX = 3.4028234663852886e38


@dataclass
class OptimConfig:
    name: str = "sgd"
    """Optimizer: sgd or adamw (adam is adamw with weight_decay 0); with timm installed also lamb, lion or
    timm/<name> (any of timm.optim.list_optimizers(), built by timm.optim.create_optimizer_v2 with lr,
    weight_decay and momentum from here, timm's defaults for the rest)."""
    lr: float = 0.1
    """Peak learning rate (per optimizer step, at the configured batch size)."""
    momentum: float = 0.9
    """SGD momentum."""
    nesterov: bool = True
    """SGD Nesterov momentum."""
    weight_decay: float = 5e-4
    """L2 / decoupled weight decay."""
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    """Adam(W), LAMB and Lion betas (Lion's authors use 0.9, 0.99)."""
    grad_clip: float = 0.0
    """Clip the global gradient norm to this value (0 = off)."""
    layer_decay: float = 0.0
    """Layer-wise learning-rate decay (timm's, needs timm): the head trains at optim.lr, each layer below at
    layer_decay times the one above (0 = off; 0.65-0.75 are usual for fine-tuning ViTs)."""
    norm_bias_lr_scale: float = 1.0
    """Learning-rate multiplier for the biases of normalization layers (airbench's bias_scaler, 64); their weight
    decay is divided by it, so each step decays them as much as the weights (1 = off: no decay on them)."""
    lookahead_every: int = 0
    """Lookahead as airbench does it: every N optimizer steps a slow copy of the weights moves towards them,
    slow += (1 - d) (weights - slow), and the weights are set to it, with d = lookahead_decay^N (step / steps)^3:
    nothing early, strong at the end; after the last step the weights are the slow copy (0 = off; airbench: 5).
    BatchNorm's running statistics are pulled alike, as airbench pulls its whole state."""
    lookahead_decay: float = 0.95
    """Lookahead: the per-step decay whose N-th power, times (step / steps)^3, gives d (airbench: 0.95)."""

    def __post_init__(self) -> None:
        if not self.name.startswith("timm/") or self.name == "timm/":
            _choice(self.name, "optim.name", (*registry.names("optimizers"), "timm/<name>"))
        _check(
            0.0 <= self.layer_decay <= 1.0, "optim.layer_decay", f"must be in [0, 1] (0 = off), got {self.layer_decay}"
        )
        _check(self.lr > 0, "optim.lr", f"must be > 0, got {self.lr}")
        _check(  # the optimizers compute in float32: a larger value raises mid-step ("cannot be converted")
            self.lr <= _FLOAT32_MAX,
            "optim.lr",
            f"{self.lr:g} is more than float32 holds ({_FLOAT32_MAX:.3g}); learning rates are usually 1e-5 to 1",
        )
        _check(0.0 <= self.momentum < 1.0, "optim.momentum", "must be in [0, 1)")
        _check(self.weight_decay >= 0, "optim.weight_decay", "must be >= 0")
        _check(
            len(self.betas) == 2 and all(0 <= b < 1 for b in self.betas), "optim.betas", "needs two values in [0, 1)"
        )
        _check(self.grad_clip >= 0, "optim.grad_clip", "must be >= 0")
        _check(self.norm_bias_lr_scale > 0, "optim.norm_bias_lr_scale", f"must be > 0, got {self.norm_bias_lr_scale}")
        _check(self.lookahead_every >= 0, "optim.lookahead_every", "must be >= 0 (0 = off)")
        _check(0 < self.lookahead_decay <= 1, "optim.lookahead_decay", f"must be in (0, 1], got {self.lookahead_decay}")


@dataclass
class ScheduleConfig:
    name: str = "cosine"
    """Learning-rate schedule: constant, step (multiply by gamma every step_epochs), cosine (with warmup), linear
    (warmup, then straight down to min_lr_ratio at the last step: FFCV's step-free schedule), onecycle."""
    warmup_epochs: float = 0.0
    """Linear warmup from schedule.warmup_start, in epochs (fractions allowed; at most half of the run's steps);
    used by constant, step, cosine and linear."""
    warmup_start: float = 0.0
    """The warm-up's first rate as a share of the peak (torch's LinearLR start_factor; airbench: 0.2); 0 = from
    zero."""
    step_epochs: int = 10
    """step: epochs between decays."""
    gamma: float = 0.5
    """step: factor applied every step_epochs (0.5 halves the rate, as hand-written scripts do)."""
    min_lr_ratio: float = 0.0
    """cosine, linear: final learning rate as a share of the peak."""
    pct_start: float = 0.25
    """onecycle: share of the run spent rising to the peak."""

    def __post_init__(self) -> None:
        _choice(self.name, "schedule.name", registry.names("schedules"))
        _check(self.warmup_epochs >= 0, "schedule.warmup_epochs", "must be >= 0")
        _check(0 <= self.warmup_start < 1, "schedule.warmup_start", f"must be in [0, 1), got {self.warmup_start}")
        _check(
            not self.warmup_start or (self.warmup_epochs > 0 and self.name != "onecycle"),
            "schedule.warmup_start",
            "starts a warm-up: give schedule.warmup_epochs > 0 with constant, step, cosine or linear (onecycle "
            "rises from lr / 25 by itself)",
        )
        _check(self.step_epochs >= 1, "schedule.step_epochs", "must be >= 1")
        _check(0 < self.gamma <= 1, "schedule.gamma", "must be in (0, 1]")
        _check(0 <= self.min_lr_ratio <= 1, "schedule.min_lr_ratio", "must be in [0, 1]")
        _check(0 < self.pct_start < 1, "schedule.pct_start", "must be in (0, 1)")


CUDA_GRAPH_COMPILE_MODES = ("reduce-overhead", "max-autotune")
"""torch.compile modes that capture CUDA graphs (runtime.compile_mode): a function's second call records its graph,
and the DALI loader copies its batches out of DALI's memory (:mod:`fasttrain.data.dali` says why). Here, beside the
setting, so that the data floor can read it without importing the runtime's."""


@dataclass
class RuntimeConfig:
    device: str = "auto"
    """auto (cuda when present, else cpu), cpu, cuda or cuda:N."""
    precision: str = "auto"
    """auto (bf16 on GPUs that support it, fp16 + scaler on older ones; on CPU bf16 where it has bf16
    instructions, else fp32), bf16, fp16, fp32."""
    channels_last: str = "auto"
    """auto (on for conv models), on, off."""
    compile: str = "auto"
    """torch.compile: auto (on for CUDA; on CPU only when the job is long enough to repay the compile), on,
    off."""
    compile_mode: str = "default"
    """torch.compile mode: default, reduce-overhead, max-autotune, max-autotune-no-cudagraphs. The two that capture
    CUDA graphs on CUDA (reduce-overhead, max-autotune) refuse train.accumulation > 1 and pix2pix."""
    seed: int = 0
    """Seed of weights, data order and augmentation."""
    deterministic: bool = False
    """Use deterministic algorithms (slower on GPU)."""
    cudnn_benchmark: bool = True
    """Let cuDNN pick the fastest convolution algorithms for the shapes seen."""
    tf32: str = "auto"
    """float32 matrix products and convolutions on tensor cores in TF32: auto (on), on, off. Matters only where
    work runs in float32 on CUDA (precision fp32, and the float32 parts of an autocast step)."""

    def __post_init__(self) -> None:
        d = self.device
        _check(
            d in ("auto", "cpu", "cuda") or (d.startswith("cuda:") and d[5:].isdigit()),
            "runtime.device",
            f"must be auto, cpu, cuda or cuda:N, got {d!r}",
        )
        _choice(self.precision, "runtime.precision", ("auto", "bf16", "fp16", "fp32"))
        _choice(self.channels_last, "runtime.channels_last", ("auto", "on", "off"))
        _choice(self.compile, "runtime.compile", ("auto", "on", "off"))
        _choice(self.tf32, "runtime.tf32", ("auto", "on", "off"))
        _choice(
            self.compile_mode,
            "runtime.compile_mode",
            ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"),
        )


@dataclass
class TrainConfig:
    epochs: int = 10
    """Training epochs."""
    batch_size: int = 128
    """Samples per optimizer step (the global batch; split into accumulation micro-batches)."""
    accumulation: int = 1
    """Micro-batches per optimizer step; each micro-batch holds batch_size / accumulation samples."""
    eval_batch_size: int = 0
    """Evaluation batch size; 0 means twice the micro-batch."""
    label_smoothing: float = 0.0
    """Classification: label smoothing (0..1)."""
    runs_dir: str = "runs"
    """Folder holding one sub-folder per run."""
    run_name: str = ""
    """Run folder name; empty means <config name>-<date>-<time>. An existing folder is never reused."""
    checkpoint_every: int = 1
    """Write the `last` checkpoint every N epochs (and always at the end)."""
    checkpoint_every_steps: int = 0
    """Also write `last` every N optimizer steps inside an epoch (0 = off); a resumed run continues from that
    step. For long epochs, so a killed run loses minutes, not an epoch."""
    best_metric: str = ""
    """Validation metric that selects the `best` checkpoint (e.g. val_acc, val_loss); empty = the task's default."""
    save_top_k: int = 0
    """Also keep the k best checkpoints by train.best_metric as checkpoints/epoch=E-<metric>=V.pt (0 = off); one
    that drops out of the k is deleted (only files this run wrote)."""
    early_stop_metric: str = ""
    """Metric watched by early stopping (e.g. val_loss); empty = train.best_metric. Higher is better for
    accuracies and PSNR, lower for losses."""
    early_stop_patience: int = 0
    """Stop the run when early_stop_metric has not improved for this many evaluations in a row (one every
    train.eval_every epochs; 0 = never stop early). The count is kept in checkpoints: a resume goes on counting."""
    early_stop_min_delta: float = 0.0
    """Smallest change of early_stop_metric, in its own units, that counts as an improvement."""
    time_budget_s: float = 0.0
    """Train for at most this many seconds, from the command's start (from Python: the train() call) to the end of
    the run (0 = off; the CLI's --time-budget 10m): train.total_steps is set to the optimizer steps that fit,
    chosen from a short measurement of training and evaluation and re-planned once after the first epoch, with
    the learning-rate schedule stretched to them (it ends complete, not cut off; the last epoch may be partial)."""
    total_steps: int = 0
    """The run's length in optimizer steps (0 = train.epochs whole epochs). When set, train.epochs becomes the
    epochs these steps start, the last one partial where they do not divide, and the learning-rate schedule
    spans exactly them; train.time_budget_s sets it to its plan."""
    log_every: int = 50
    """Read losses from the device (a sync point) every N steps, for the progress bar and logs."""
    max_steps: int = 0
    """Stop each epoch after this many optimizer steps (0 = full epochs); for smoke tests. A cap per epoch, not
    on the run: train.total_steps caps the whole run."""
    eval_every: int = 1
    """Evaluate every N epochs (and always at the end)."""
    max_nonfinite_logs: int = 3
    """Stop the run when the training loss is non-finite (inf / nan) at this many logged steps in a row
    (every log_every steps); the last checkpoint with finite weights is kept. 0 = never stop."""
    loggers: list[str] = field(default_factory=lambda: ["jsonl"])
    """Metrics files: jsonl (metrics.jsonl, always written: resume and plot read it), csv (metrics.csv, one row
    per epoch), tensorboard (event files in tensorboard/, needs the tensorboard package), or a sink registered
    in fasttrain.registry's loggers table."""
    ema_decay: float = 0.0
    """Exponential moving average of the weights, updated every optimizer step (0 = off; 0.999-0.9999 usual);
    evaluated beside the model (val_ema_*), saved in checkpoints and used by predict."""

    def __post_init__(self) -> None:
        _check(self.epochs >= 1, "train.epochs", f"must be >= 1, got {self.epochs}")
        for name in self.loggers:
            _choice(name, "train.loggers", registry.names("loggers"))
        _check(0.0 <= self.ema_decay < 1.0, "train.ema_decay", f"must be in [0, 1), got {self.ema_decay}")
        _check(self.batch_size >= 1, "train.batch_size", f"must be >= 1, got {self.batch_size}")
        _check(self.accumulation >= 1, "train.accumulation", "must be >= 1")
        _check(
            self.batch_size % self.accumulation == 0,
            "train.batch_size",
            f"{self.batch_size} is not divisible by train.accumulation ({self.accumulation})",
        )
        _check(self.eval_batch_size >= 0, "train.eval_batch_size", "must be >= 0")
        _check(0 <= self.label_smoothing < 1, "train.label_smoothing", "must be in [0, 1)")
        _check(self.checkpoint_every >= 1, "train.checkpoint_every", "must be >= 1")
        _check(self.checkpoint_every_steps >= 0, "train.checkpoint_every_steps", "must be >= 0")
        _check(self.log_every >= 1, "train.log_every", "must be >= 1")
        _check(self.save_top_k >= 0, "train.save_top_k", f"must be >= 0 (0 = off), got {self.save_top_k}")
        _check(self.early_stop_patience >= 0, "train.early_stop_patience", "must be >= 0 (0 = never stop early)")
        _check(self.early_stop_min_delta >= 0, "train.early_stop_min_delta", "must be >= 0")
        for name in ("early_stop_metric", "early_stop_min_delta"):
            _check(
                not getattr(self, name) or self.early_stop_patience > 0,
                f"train.{name}",
                "does nothing without train.early_stop_patience (the evaluations to wait; 0 = never stop early)",
            )
        _check(self.max_steps >= 0, "train.max_steps", "must be >= 0")
        _check(self.total_steps >= 0, "train.total_steps", f"must be >= 0 (0 = whole epochs), got {self.total_steps}")
        _check(
            self.time_budget_s >= 0, "train.time_budget_s", f"must be >= 0 seconds (0 = off), got {self.time_budget_s}"
        )
        _check(self.eval_every >= 1, "train.eval_every", "must be >= 1")
        _check(self.max_nonfinite_logs >= 0, "train.max_nonfinite_logs", "must be >= 0 (0 = never stop)")
        _check(
            "/" not in self.run_name and self.run_name not in (".", ".."),
            "train.run_name",
            f"must be a plain folder name, got {self.run_name!r}",
        )

    @property
    def micro_batch(self) -> int:
        return self.batch_size // self.accumulation

    @property
    def eval_batch(self) -> int:
        return self.eval_batch_size or 2 * self.micro_batch


@dataclass
class TaskConfig:
    name: str = "classify"
    """What a batch means: classify, regress (image -> numbers) or pix2pix (image -> image)."""
    lambda_l1: float = 100.0
    """pix2pix: weight of the L1 loss against the adversarial loss."""
    sample_every: int = 500
    """pix2pix: save an input / output / target grid as PNG every N steps (0 = only at epoch ends)."""
    mixup_alpha: float = 0.0
    """classify: MixUp on the device, Beta(alpha, alpha) mixing of batch pairs (0 = off; 0.2 is usual)."""
    cutmix_alpha: float = 0.0
    """classify: CutMix on the device, Beta(alpha, alpha) box area (0 = off; 1.0 is usual). With both on, each
    batch gets one of the two at random."""
    tta: str = "none"
    """classify: test-time augmentation in evaluation and predict: none, flip (the mean of the logits of the image
    and its mirror), flip_translate (and of the image shifted by one pixel up-left and down-right, with their
    mirrors: airbench's, for small images). Costs 2x / 6x the evaluation forward passes."""
    random_erasing: float = 0.0
    """classify: probability that timm's RandomErasing replaces a random box of a training image (2-33 % of its
    area) with noise, on the device after normalization (0 = off; 0.25 is timm's usual). Needs timm."""
    class_weights: str = "none"
    """classify: none, or balanced: each class's training loss weighed by N / (classes x its images), as
    scikit-learn's class_weight="balanced", so a rare class counts as much as a common one (validation loss and
    accuracy stay unweighed)."""

    def __post_init__(self) -> None:
        _choice(self.name, "task.name", registry.names("tasks"))
        _check(self.lambda_l1 >= 0, "task.lambda_l1", "must be >= 0")
        _check(self.sample_every >= 0, "task.sample_every", "must be >= 0")
        _check(self.mixup_alpha >= 0, "task.mixup_alpha", f"must be >= 0, got {self.mixup_alpha}")
        _check(self.cutmix_alpha >= 0, "task.cutmix_alpha", f"must be >= 0, got {self.cutmix_alpha}")
        _choice(self.tta, "task.tta", ("none", "flip", "flip_translate"))
        _check(
            self.tta == "none" or self.name == "classify",
            "task.tta",
            f"averages a classifier's logits; task {self.name} has none (set it to none)",
        )
        _check(0 <= self.random_erasing <= 1, "task.random_erasing", f"must be in [0, 1], got {self.random_erasing}")
        _choice(self.class_weights, "task.class_weights", ("none", "balanced"))
        _check(
            self.class_weights == "none" or self.name == "classify",
            "task.class_weights",
            f"weighs a classifier's classes; task {self.name} has none (set it to none)",
        )
        _check(
            self.random_erasing == 0 or self.name == "classify",
            "task.random_erasing",
            f"erases boxes of a classifier's images; task {self.name} would change its targets too (set it to 0)",
        )


@dataclass
class TuneConfig:
    memory_budget_gib: float = 16.0
    """VRAM budget in GiB; emulated on larger cards, the free memory on smaller ones (no budget on a CPU)."""
    headroom: float = 0.10
    """Share of the budget a chosen batch must leave free (0..0.5)."""
    min_batch: int = 8
    """Smallest batch size tried."""
    max_batch: int = 4096
    """Largest batch size the search grows to (the config's own batch is measured whatever its size)."""
    multiple: int = 8
    """Batch sizes are multiples of this."""
    time_budget_s: float = 45.0
    """Seconds the whole autotune may take, compilation excluded (the search stops early and reports the sizes
    it did not probe). 45 s: ResNet-50 eager probes on an H100 (about 3 s each with cuDNN's search per new
    shape, 8 to 10 sizes), one loader trial and the verification fit, with room for setup, inside 60 s plus one
    compile."""
    warmup_steps: int = 1
    """Train steps per candidate before timing (excluded; the first of a new shape carries cuDNN's algorithm
    search); where a budget applies, an eval step and two more train steps follow, and the repeats are sized by
    one more, timed alone."""
    repeats: int = 3
    """Timed repeats per measurement; the median is used and (max - min) / median is its spread."""
    repeat_s: float = 0.2
    """Each timed repeat lasts about this long."""
    measure_steps: int = 1
    """Timed steps per repeat, at least (a slow step still runs this many, whatever tune.repeat_s)."""
    noise: float = 0.03
    """Smallest relative difference treated as real; a larger measured spread widens it. Within it the
    config's own batch (else the smaller) is kept."""
    max_spread: float = 0.15
    """A measurement whose spread exceeds this is repeated once, then marked unreliable (and not cached)."""
    verify_s: float = 2.0
    """Seconds of end-to-end training at the tuned settings (tune.repeats windows; the loader comes warm from its
    trial), plus evaluation batches for at most 30 % of that (0 = skip verification)."""
    cache_dir: str = ""
    """Where results are cached; empty means ~/.cache/fasttrain/autotune."""

    def __post_init__(self) -> None:
        _check(self.memory_budget_gib > 0, "tune.memory_budget_gib", "must be > 0")
        _check(0 <= self.headroom <= 0.5, "tune.headroom", "must be in 0..0.5")
        _check(self.min_batch >= 1, "tune.min_batch", "must be >= 1")
        _check(self.max_batch >= self.min_batch, "tune.max_batch", "must be >= tune.min_batch")
        _check(self.multiple >= 1, "tune.multiple", "must be >= 1")
        _check(self.time_budget_s > 0, "tune.time_budget_s", "must be > 0 seconds")
        _check(self.warmup_steps >= 0, "tune.warmup_steps", "must be >= 0")
        _check(self.repeats >= 1, "tune.repeats", "must be >= 1")
        _check(self.repeat_s > 0, "tune.repeat_s", "must be > 0 seconds")
        _check(self.measure_steps >= 1, "tune.measure_steps", "must be >= 1")
        _check(0 <= self.noise < 0.5, "tune.noise", "must be in [0, 0.5)")
        _check(self.max_spread > 0, "tune.max_spread", "must be > 0")
        _check(self.verify_s >= 0, "tune.verify_s", "must be >= 0 seconds (0 skips verification)")


@dataclass
class BenchConfig:
    warmup_steps: int = 5
    """Steps excluded from timing (compile, cuDNN autotune, loader start)."""
    steps: int = 30
    """Timed steps per measurement."""
    repeats: int = 3
    """Repeats per measurement; the median is reported."""

    def __post_init__(self) -> None:
        _check(self.warmup_steps >= 0, "bench.warmup_steps", "must be >= 0")
        _check(self.steps >= 1, "bench.steps", "must be >= 1")
        _check(self.repeats >= 1, "bench.repeats", "must be >= 1")


@dataclass
class DistConfig:
    timeout_s: float = 1800.0
    """Seconds a process of a multi-process job (torchrun) waits on the others, at the start and in every
    collective, before it fails with an error naming this setting. The 1800 s default is torch's: a rank that
    lists a large dataset, compiles the first step or writes a large checkpoint on a slow filesystem keeps the
    others waiting for minutes; lower it where steps are short and a frozen rank should end the job sooner."""

    def __post_init__(self) -> None:
        _check(self.timeout_s > 0, "dist.timeout_s", f"must be > 0 seconds, got {self.timeout_s}")


@dataclass
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    runtime: RuntimeConfig = field(default_factory=RuntimeConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    task: TaskConfig = field(default_factory=TaskConfig)
    tune: TuneConfig = field(default_factory=TuneConfig)
    bench: BenchConfig = field(default_factory=BenchConfig)
    dist: DistConfig = field(default_factory=DistConfig)
    name: str = "run"
    """Config name (the TOML file's stem unless set); prefixes run folders."""

    def __post_init__(self) -> None:
        _check(
            bool(self.name) and "/" not in self.name and self.name not in (".", ".."),
            "name",
            f"must be a plain name (it prefixes run folders), got {self.name!r}",
        )
        if self.task.name != "classify":  # settings only a class-label loss uses would silently do nothing
            for key, value in (
                ("task.mixup_alpha", self.task.mixup_alpha),
                ("task.cutmix_alpha", self.task.cutmix_alpha),
                ("train.label_smoothing", self.train.label_smoothing),
            ):
                _check(
                    value == 0,
                    key,
                    f"mixes or smooths class labels, which task.name = {self.task.name!r} does not have; "
                    f"got {value} (set it to 0)",
                )
        _check(
            not self.data.progressive or self.task.name == "classify",
            "data.progressive",
            f"resizes classification training crops (task.name = classify); task {self.task.name}'s targets are "
            f"tied to the image size (set data.progressive = [])",
        )
        _check(
            not self.data.flip_alternate or self.task.name == "classify",
            "data.flip_alternate",
            f"alternates classification training flips (task.name = classify); task {self.task.name} flips at "
            f"random (set data.flip_alternate = false)",
        )
        _check(
            not self.data.translate or self.task.name == "classify",
            "data.translate",
            f"shifts classification training images (task.name = classify); task {self.task.name}'s targets are "
            f"tied to positions in the image (set data.translate = 0)",
        )
        _check(
            not self.data.eval_size or self.task.name == "classify",
            "data.eval_size",
            f"sets a classifier's evaluation crop; task {self.task.name} evaluates at data.image_size (set it to 0)",
        )
        _check(
            not (
                self.data.progressive
                and not self.data.progressive_epochs
                and (self.train.time_budget_s or self.train.total_steps)
            ),
            "data.progressive_epochs",
            "give [start, end] epochs with train.time_budget_s or train.total_steps: the run's length, which [] "
            "would span, is chosen from the steps once the loaders stand (and by a budget while it runs)",
        )


_SECTIONS: dict[str, type] = {
    f.name: f.default_factory  # type: ignore[misc]
    for f in dataclasses.fields(Config)
    if dataclasses.is_dataclass(f.default_factory)
}
"""Section name -> its dataclass."""


def _coerce(value: Any, typ: Any, name: str) -> Any:
    """Check ``value`` against the annotated type, converting int -> float; raise ConfigError naming ``name``."""
    origin = typing.get_origin(typ)
    if typ is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{name}: expected true or false, got {value!r}")
    if typ is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(f"{name}: expected an integer, got {value!r}")
    if typ is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            if not math.isfinite(value):  # TOML has inf and nan literals; no setting means either
                raise ConfigError(f"{name}: must be a finite number, got {value!r}")
            return float(value)
        raise ConfigError(f"{name}: expected a number, got {value!r}")
    if typ is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"{name}: expected a string, got {value!r}")
    if origin is list:
        (item,) = typing.get_args(typ)
        if isinstance(value, (int, float, str)) and not isinstance(value, bool):
            value = [value]  # a single value where a list is expected: `--set data.mean=0.5`
        if not isinstance(value, list):
            raise ConfigError(f"{name}: expected a list, got {value!r}")
        return [_coerce(v, item, f"{name}[{i}]") for i, v in enumerate(value)]
    raise TypeError(f"unsupported config type {typ!r} for {name}")


def _section_hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _did_you_mean(name: str, section: str | None) -> str:
    """ "; did you mean optim.lr?" for a misspelt key (closest in its section, else the same key in another
    section: train.lr -> optim.lr) or section; empty when nothing is close."""
    import difflib

    if section is None:
        close = difflib.get_close_matches(name, [*_SECTIONS, "name"], n=1)
        return f"; did you mean {close[0]}?" if close else ""
    close = difflib.get_close_matches(name, list(_section_hints(_SECTIONS[section])), n=1)
    if close:
        return f"; did you mean {section}.{close[0]}?"
    elsewhere = [s for s, cls in _SECTIONS.items() if name in _section_hints(cls)]
    return f"; did you mean {elsewhere[0]}.{name}?" if elsewhere else ""


def config_from_dict(data: dict[str, Any], base: Config | None = None, source: str = "config") -> Config:
    """Build a Config from nested dicts over ``base`` (defaults when None); validates every field."""
    base = base or Config()
    merged = config_to_dict(base)
    for key, value in data.items():
        if key == "name":
            merged["name"] = _coerce(value, str, "name")
            continue
        if key not in _SECTIONS:
            raise ConfigError(
                f"{source}: unknown section {key!r} (known: {', '.join(_SECTIONS)}, name){_did_you_mean(key, None)}"
            )
        if not isinstance(value, dict):
            raise ConfigError(f"{source}: {key} must be a table of settings, got {value!r}")
        cls = _SECTIONS[key]
        hints = _section_hints(cls)
        for k, v in value.items():
            if k not in hints:
                known = ", ".join(hints)
                raise ConfigError(f"{source}: unknown key {key}.{k} (known in [{key}]: {known}){_did_you_mean(k, key)}")
            merged[key][k] = _coerce(v, hints[k], f"{key}.{k}")
    sections = {}
    for key, cls in _SECTIONS.items():
        sections[key] = cls(**merged[key])  # __post_init__ validates
    return Config(**sections, name=merged["name"])


def config_to_dict(cfg: Config) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def _parse_value(text: str) -> Any:
    """Parse an override value as a TOML value (numbers, booleans, lists, quoted strings); bare words are strings."""
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


def parse_overrides(items: list[str]) -> dict[str, Any]:
    """Turn ``["optim.lr=0.1", "data.root=/x"]`` into nested dicts; a malformed item names itself."""
    out: dict[str, Any] = {}
    for item in items:
        key, sep, text = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise ConfigError(f"--set {item!r}: expected section.key=value")
        if key == "name":
            out["name"] = text
            continue
        section, dot, k = key.partition(".")
        if not dot or not k or "." in k:
            raise ConfigError(f"--set {item!r}: expected section.key=value (for example optim.lr=0.05)")
        out.setdefault(section, {})[k] = _parse_value(text.strip())
    return out


def apply_overrides(cfg: Config, items: list[str]) -> Config:
    return config_from_dict(parse_overrides(items), base=cfg, source="--set")


def packaged_config(name: str) -> Path | None:
    """A config shipped with fasttrain (``quickstart``, ``catfish``, ...) by name, or None."""
    from importlib import resources

    stem = name[:-5] if name.endswith(".toml") else name
    if not stem or "/" in stem or "\\" in stem:
        return None
    p = resources.files("fasttrain") / "configs" / f"{stem}.toml"
    return Path(str(p)) if p.is_file() else None


def packaged_configs() -> dict[str, str]:
    """Every packaged config's name with its first comment line (one sentence: what it trains)."""
    from importlib import resources

    out = {}
    for entry in sorted(resources.files("fasttrain").joinpath("configs").iterdir(), key=lambda e: e.name):
        if entry.name.endswith(".toml"):
            first = next((ln for ln in entry.read_text(encoding="utf-8").splitlines() if ln.startswith("#")), "#")
            out[entry.name[:-5]] = first.lstrip("# ").strip()
    return out


def config_path(name_or_path: str | os.PathLike) -> Path:
    """A config file, or a packaged config's name; an unknown one names the packaged configs (and the closest)."""
    p = Path(name_or_path)
    if p.is_file():
        return p
    found = packaged_config(str(name_or_path))  # before folders: catfish's data folder is called catfish
    if found is not None:
        mine = Path(f"{name_or_path}.toml")
        if mine.is_file():  # a user's catfish.toml beside the packaged catfish: say which one runs
            logging.getLogger(__name__).warning(
                "config %s: the packaged one; %s here is another (give it by its file name to use it)",
                name_or_path,
                mine,
            )
        return found
    key, eq, _ = str(name_or_path).partition("=")
    if eq and "." in key and not p.exists():  # `fasttrain train train.epochs=2`: a setting where the config goes
        raise ConfigError(
            f"config {name_or_path}: no such file; a setting is given with --set (--set {name_or_path}), and the "
            "config (a TOML file or a packaged name, default quickstart) before or without it"
        )
    if p.is_dir():
        from fasttrain.rundir import is_run_folder

        if is_run_folder(p):
            again = f", or train its config again with {p / 'config.toml'}" if (p / "config.toml").is_file() else ""
            raise ConfigError(f"config {p}: a run folder, not a config: continue it with --resume {p}{again}")
        raise ConfigError(
            f"config {p}: a folder, not a config; a folder of images trains with --set data.root={p} (after the "
            "config, default quickstart; 'fasttrain config list' shows the packaged ones)"
        )
    if os.sep in str(name_or_path) or str(name_or_path).endswith(".toml"):
        raise ConfigError(f"config file {p}: not found")
    import difflib

    names = list(packaged_configs())
    close = difflib.get_close_matches(str(name_or_path), names, n=1)
    hint = f"; did you mean {close[0]}?" if close else ""
    raise ConfigError(
        f"config {name_or_path}: no such file, and no packaged config of that name (packaged: {', '.join(names)}){hint}"
    )


def local_data_root(root: str) -> str | None:
    """``data.root`` as a run records it: absolute, so its saved config (and ``--resume``) works from any folder.
    None for a root that names no local path: a URL (shards over the network) or empty (the demo dataset, whose
    place is decided where it is written)."""
    if not root or "://" in root:
        return None
    return str(Path(root).expanduser().resolve())


def trained_samples(tc: TrainConfig, train_samples: int) -> int:
    """Samples a run trains: ``train.epochs`` epochs of whole batches, each epoch cut at ``train.max_steps``
    optimizer steps (a cap per epoch, not per run); or ``train.total_steps`` when set (the run trains exactly
    those, its epochs made to fit)."""
    batch = max(tc.batch_size, 1)
    per_epoch = train_samples // batch
    if tc.max_steps:
        per_epoch = min(per_epoch, tc.max_steps)
    return (tc.total_steps or tc.epochs * per_epoch) * batch


def load_config(path: str | os.PathLike | None = None, overrides: list[str] | str | None = None) -> Config:
    """Defaults < TOML file < overrides. ``path``: a TOML file, or a packaged config's name (``"quickstart"``);
    None means the defaults alone. ``overrides``: ``section.key=value`` strings (one alone may be given as is)."""
    if isinstance(overrides, str):  # load_config("catfish", "data.root=photos") read it letter by letter
        overrides = [overrides]
    cfg = Config()
    if path is not None:
        p = config_path(path)
        try:
            # utf-8-sig: a byte-order mark (some Windows editors write one) is not part of the text
            data = tomllib.loads(p.read_text(encoding="utf-8-sig"))
        except UnicodeDecodeError as e:
            raise ConfigError(
                f"config file {p}: not UTF-8 text (byte {e.start} is {e.object[e.start : e.start + 1]!r}); "
                f"save it as UTF-8"
            ) from None
        except tomllib.TOMLDecodeError as e:
            raise ConfigError(f"config file {p}: not valid TOML: {e}") from None
        except OSError as e:
            raise ConfigError(f"config file {p}: cannot be read: {e.strerror or e}") from None
        data.setdefault("name", p.stem)
        cfg = config_from_dict(data, base=cfg, source=str(p))
    if overrides:
        cfg = apply_overrides(cfg, overrides)
    return cfg


def dump_config(cfg: Config) -> str:
    """The resolved config as TOML text, loadable by :func:`load_config`."""
    d = config_to_dict(cfg)
    name = d.pop("name")
    return tomli_w.dumps({"name": name, **d})


@dataclass(frozen=True)
class FieldInfo:
    """One setting, as ``fasttrain config show`` prints it."""

    key: str
    """section.key"""
    value: Any
    default: Any
    type: str
    description: str


@functools.cache
def field_docs(cls: type) -> dict[str, str]:
    """The attribute docstrings of a config dataclass (the string under each field), read once from its source.
    They are the settings' descriptions, units included; Python keeps no such docstring at run time."""
    import ast
    import inspect
    import textwrap

    try:
        tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    except (OSError, TypeError):  # no source (a frozen build): no descriptions
        return {}
    body = tree.body[0].body if tree.body and isinstance(tree.body[0], ast.ClassDef) else []
    docs = {}
    for node, nxt in zip(body, body[1:]):
        if (
            isinstance(node, ast.AnnAssign)
            and isinstance(node.target, ast.Name)
            and isinstance(nxt, ast.Expr)
            and isinstance(nxt.value, ast.Constant)
            and isinstance(nxt.value.value, str)
        ):
            docs[node.target.id] = " ".join(nxt.value.value.split())
    return docs


def describe_config(cfg: Config) -> list[FieldInfo]:
    """Every setting of ``cfg`` with its value, its default, its type and its description."""
    defaults = Config()
    out = [FieldInfo("name", cfg.name, defaults.name, "str", field_docs(Config).get("name", ""))]
    for section, cls in _SECTIONS.items():
        hints, docs = _section_hints(cls), field_docs(cls)
        for fld in dataclasses.fields(cls):
            typ = hints[fld.name]
            out.append(
                FieldInfo(
                    f"{section}.{fld.name}",
                    getattr(getattr(cfg, section), fld.name),
                    getattr(getattr(defaults, section), fld.name),
                    getattr(typ, "__name__", str(typ)),
                    docs.get(fld.name, ""),
                )
            )
    return out
