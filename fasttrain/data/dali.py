"""DALI backend: the same files as every other backend, decoded and augmented by DALI, batches on the device.

On CUDA the JPEG decode runs on the GPU (``mixed``: hardware decoder for ``hw_decoder_load`` of the images,
CUDA for the rest) and every later op runs on the GPU. With ``device_id=None`` the identical graph runs in
DALI's CPU-only mode, which is what the CPU tests exercise. ``nvidia.dali`` is imported only when a loader is
built. Every kind of sample is served (:mod:`fasttrain.data.samples`): classification, regression (the whole
image resized square; targets, with each image's size from the header the pre-check read, gathered on the
device) and pairs (two files, or one side-by-side file decoded once and sliced into halves; one graph resizes
both images and cuts the same crop window and flip from both).

**One long-lived pipeline per loader**, fed by ``fn.external_source``: a feeder hands DALI each batch's encoded
file bytes in the order of :class:`~fasttrain.data.order.EpochSampler` (every backend visits the same files in
the same order, a pure function of (seed, epoch)), with the sample indices and, for training, each sample's
augmentation: torchvision's random-resized-crop window (decoded as a region of interest) and flip, drawn from a
generator seeded by (seed, epoch, index) exactly as the torch loader draws them (pairs: the
:func:`~fasttrain.data.samples.pair_jitter` window and flip). So a batch does not depend on
what the pipeline ran before it: resuming mid-epoch (:meth:`DaliLoader.skip_batches`) gives bit-identical
batches, and training crops are the torch loader's windows (the pixels differ by resampling only, and on the
GPU by nvJPEG's IDCT: chroma is upsampled as libjpeg-turbo does, see :func:`decoder_args`). The feeder
reads files ahead with threads and plans across epoch boundaries (epoch e+1 after e; an evaluation pass after
the last), so the next epoch starts decoding while the current one ends. Asked for anything else (another
epoch, a resumed position, a pass abandoned halfway) it drops what it decoded ahead and starts there.

**Progressive resizing** (``data.progressive``): classification training batches carry their epoch's size as
one more external_source column, the resize's argument input: the same pipeline serves every size.

**Pixels every backend agrees on.** DALI decodes 8-bit grey or colour JPEG and 8-bit grey/RGB PNG without
transparency itself. The files the pre-check flags (:attr:`~fasttrain.data.checks.ImageInfo.pil`: transparency,
16-bit, palettes, CMYK, other formats) are decoded by Pillow with the torch loader's rules (alpha composited on
white, 16 bits scaled) and handed to DALI as an uncompressed PNM image, so a transparent PNG is the same image
on every backend and in ``predict``.

**Bad files.** The shared pre-check (:func:`~fasttrain.data.checks.precheck`) skips what it catches at
construction. A file that still fails inside DALI is identified (DALI names the sample's place in the batch;
otherwise the batch's samples are decoded one by one), added to ``skipped``, and the pipeline rebuilt; the epoch
continues with the batch fed again without it (training tops the batch up by repeating samples, as the torch
loader does). More than ``data.max_bad_per_epoch`` such files in an epoch stop the run with a list. A file the
dataset index left unchecked (``data.header_checks = read``) is judged by the pre-check's rules from the bytes the
reader threads read (:func:`~fasttrain.data.checks.read_checked`), then routed and cropped from what its header
says as a pre-checked file is; one the rules refuse is skipped as above but not counted: the pre-check would have
skipped it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import io
import logging
import math
import re
import threading
import weakref
from collections import deque
from collections.abc import Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, cast

import numpy as np
import torch

from fasttrain.config import CUDA_GRAPH_COMPILE_MODES, Config, DataConfig, default_workers
from fasttrain.data.base import Backend, Batch, InputSpec, LoaderRequest, RunSamples, epoch_order
from fasttrain.data.checks import (
    BadFiles,
    ImageInfo,
    UnusableImage,
    jpeg_scan_suspect,
    pil_decode_error,
    read_checked,
)
from fasttrain.data.decode import DECODE_ERRORS, decode_image, load_image
from fasttrain.data.files import open_regular
from fasttrain.data.order import alternate_flips, check_shard, sample_seed
from fasttrain.data.progressive import TrainSizes, train_sizes
from fasttrain.data.samples import Samples, needs_pil, pair_jitter, pair_load_size, precheck_samples, targets_tensor
from fasttrain.data.sources import Split
from fasttrain.data.stream import is_streamed

log = logging.getLogger(__name__)

__all__ = [
    "BACKEND",
    "KINDS",
    "dali_status",
    "dali_padding_bytes",
    "decoder_args",
    "DaliLoader",
    "output_stream",
    "rrc_window",
    "train_params",
    "targets_tensor",
]

# nvJPEG's scratch buffers in NVIDIA's ResNet-50 example. DALI documents both as per decoder thread: each thread
# preallocates one device buffer of _DEVICE_MEMORY_PADDING and two pinned host buffers of _HOST_MEMORY_PADDING,
# so buffers are not regrown mid-epoch. That memory is outside torch's allocator (no budget sees it): a training
# pipeline holds num_threads x 201 MiB of device memory and num_threads x 2 x 134 MiB of pinned host memory;
# see dali_padding_bytes(). The validation pipeline keeps DALI's defaults.
_DEVICE_MEMORY_PADDING = 211_025_920
_HOST_MEMORY_PADDING = 140_544_512
_DECODE_FAILED = re.compile(r"[Ff]ailed to decode sample #(\d+)")
_DEVICE_FAILED = re.compile(
    r"out of memory|CUDA allocation failed|can't allocate \d+ bytes on device|CUDA (runtime|driver) API error"
    r"|CUDA call has failed|cudaError|bad_alloc",
    re.IGNORECASE,
)
"""DALI's messages for a failure of the device or its memory (libdali's strings), never a file's fault: such a
failure is raised as it is, not probed file by file (a batch of one could fail too, and blame a good file)."""
_RATIO = (3 / 4, 4 / 3)
_EXTERNAL_COLUMNS: dict[str, tuple[str, int]] = {
    "encoded": ("UINT8", 1),
    "index": ("INT64", 0),
    "anchor": ("INT32", 1),
    "shape": ("INT32", 1),
    "mirror": ("INT32", 0),
    "encoded_b": ("UINT8", 1),
    "half": ("INT32", 1),
    "origin": ("INT32", 1),
    "anchor_b": ("INT32", 1),
    "crop_x": ("FLOAT", 0),
    "crop_y": ("FLOAT", 0),
    "size": ("FLOAT", 0),
}
"""The external_source columns a batch may carry: DALI's type name (nvidia.dali.types) and ndim of each."""


@functools.lru_cache(maxsize=1)
def dali_status() -> tuple[bool, str]:
    """(True, version) when DALI and its PyTorch plugin import, else (False, why not)."""
    try:
        import nvidia.dali as dali
        import nvidia.dali.plugin.pytorch  # noqa: F401  (the bridge to torch tensors)
    except Exception as e:  # noqa: BLE001 - ImportError, or a broken install failing to load its libraries
        return False, f"nvidia.dali does not import: {type(e).__name__}: {e}"
    return True, f"DALI {dali.__version__}"


def decoder_args(data: DataConfig, types: Any, *, gpu: bool, padded: bool) -> dict[str, Any]:
    """The arguments of every ``fn.decoders.image`` / ``image_slice`` of a pipeline (``types``: DALI's module).

    ``jpeg_fancy_upsampling`` on the GPU: DALI's ``mixed`` decoder otherwise upsamples 4:2:0 chroma its own way,
    while Pillow (the torch loader, the cache, ``predict``) and DALI's CPU decoder use libjpeg-turbo's fancy
    upsampling, so GPU-decoded JPEGs would differ from what every other path, and prediction, sees. Its cost
    (it may keep some JPEGs off the hardware decoder) has not been measured on a GPU yet."""
    decode: dict[str, Any] = dict(
        device="mixed" if gpu else "cpu",
        adjust_orientation=False,  # PIL (the torch backend) ignores EXIF rotation too: the same pixels
        output_type=types.RGB if data.channels == 3 else types.GRAY,
    )
    if gpu:
        decode["hw_decoder_load"] = data.hw_decoder_load
        decode["jpeg_fancy_upsampling"] = True
        if padded:  # per decoder thread, as DALI documents them (see _DEVICE_MEMORY_PADDING)
            decode.update(device_memory_padding=_DEVICE_MEMORY_PADDING, host_memory_padding=_HOST_MEMORY_PADDING)
    return decode


def dali_padding_bytes(data: DataConfig, decoders: int = 1) -> tuple[int, int]:
    """(device, pinned host) bytes the GPU training pipeline's ``decoders`` preallocate outside torch's allocator
    (each padded decoder per thread: pix2pix's paired files have two, see :attr:`DaliLoader.decoders`)."""
    threads = max(1, data.num_dali_threads)
    return decoders * threads * _DEVICE_MEMORY_PADDING, decoders * threads * 2 * _HOST_MEMORY_PADDING


# In torch.compile's CUDA_GRAPH_COMPILE_MODES (fasttrain.config) a DALI batch shared through DLPack is freed by
# DALI's background thread, which calls ``cudaDeviceSynchronize()``; while torch captures a graph on that device
# this is an invalid operation, raised inside a ``std::thread`` -> ``std::terminate`` (NVIDIA/DALI#3703's class;
# DALI later retries such frees, NVIDIA/DALI#6259, but which releases have it is not checked here). In these modes
# the GPU loader copies each batch into a torch-owned tensor instead (``copy_to_external`` on torch's stream): one
# device-to-device copy of the batch per step, no DALI memory in torch's hands.


def copy_to_torch(dali_tensor, device: torch.device) -> torch.Tensor:
    """A dense DALI GPU tensor copied into a new torch tensor on ``device``, on torch's current stream (ordered
    after DALI's work, which :func:`output_stream` bound to that stream; no host wait)."""
    from nvidia.dali.plugin.pytorch import feed_ndarray, to_torch_type

    out = torch.empty(dali_tensor.shape(), dtype=to_torch_type[dali_tensor.dtype], device=device)
    stream = torch.cuda.current_stream(device) if device.type == "cuda" else None
    return feed_ndarray(dali_tensor, out, cuda_stream=stream)


def output_stream(device_id: int | None, device: torch.device):
    """The CUDA stream DALI binds its outputs to: torch's current stream on the loader's device, so handing a
    batch over enqueues a wait instead of blocking the Python thread; None (host-synchronous) in CPU-only mode."""
    if device_id is None:
        return None
    return torch.cuda.current_stream(device)


# ---------------------------------------------------------------------------------------------------------
# Augmentation parameters: the torch loader's, drawn the same way from the same per-sample seed.


class _Draws:
    """A generator and one-element buffers, reused per reader thread: the torch ops torchvision's transforms make,
    without allocating a tensor per draw (3x faster per sample, same values: ``torch.randint`` is ``random_`` on a
    new tensor, ``torch.rand`` is ``uniform_(0, 1)``)."""

    def __init__(self):
        self.g = torch.Generator()
        self.f = torch.empty(1)
        self.i = torch.empty(1, dtype=torch.long)
        log_ratio = torch.log(torch.tensor(_RATIO))  # float32, as RandomResizedCrop keeps it
        self.log_ratio = (float(log_ratio[0]), float(log_ratio[1]))

    def seed(self, seed: int) -> _Draws:
        self.g.manual_seed(seed)
        return self

    def uniform(self, lo: float, hi: float) -> float:
        return self.f.uniform_(lo, hi, generator=self.g).item()

    def aspect(self) -> float:
        return self.f.uniform_(*self.log_ratio, generator=self.g).exp_().item()

    def randint(self, hi: int) -> int:
        return int(self.i.random_(0, hi, generator=self.g).item())


_draws = threading.local()


def _draws_here() -> _Draws:
    d = getattr(_draws, "d", None)
    if d is None:
        d = _draws.d = _Draws()
    return d


def rrc_window(draws: _Draws, height: int, width: int, scale: tuple[float, float]) -> tuple[int, int, int, int]:
    """(top, left, h, w): torchvision's ``RandomResizedCrop.make_params`` (ratio 3/4..4/3), draw for draw, so the
    same generator state gives the same window."""
    area = height * width
    for _ in range(10):
        target_area = area * draws.uniform(scale[0], scale[1])
        aspect = draws.aspect()
        w = int(round(math.sqrt(target_area * aspect)))
        h = int(round(math.sqrt(target_area / aspect)))
        if 0 < w <= width and 0 < h <= height:
            top = draws.randint(height - h + 1)
            return top, draws.randint(width - w + 1), h, w
    in_ratio = width / height  # fallback: the centre crop torchvision takes
    if in_ratio < min(_RATIO):
        w, h = width, int(round(width / min(_RATIO)))
    elif in_ratio > max(_RATIO):
        h, w = height, int(round(height * max(_RATIO)))
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


def train_params(
    data: DataConfig, seed: int, epoch: int, index: int, height: int, width: int
) -> tuple[tuple[int, int, int, int] | None, bool]:
    """(random-resized-crop window or None, flip) of one training sample: the draws ``transforms.train_transform``
    makes from the generator the torch loader seeds with ``sample_seed(seed, epoch, index)``."""
    draws = _draws_here().seed(sample_seed(seed, epoch, index))
    window = rrc_window(draws, height, width, (data.crop_scale_min, 1.0)) if data.random_resized_crop else None
    if data.flip_alternate:  # the torch loader's dataset flips these, its transform draws no flip
        return window, bool(data.hflip and alternate_flips(seed, epoch, [index])[0])
    flip = bool(data.hflip and draws.uniform(0.0, 1.0) < 0.5)  # v2 flips unless torch.rand(1) >= p
    return window, flip


def _pnm(im) -> bytes:
    """A decoded PIL image (RGB or L) as an uncompressed PPM / PGM file: lossless, and trivial to decode."""
    buf = io.BytesIO()
    im.save(buf, format="PPM")
    return buf.getvalue()


class _Refused(Exception):
    """A file Pillow's full decode refuses; the message is the reason every backend gives."""


class _Headers:
    """Per sample what the pre-check read from its file's header, as arrays (~10 bytes a sample, where a list of
    :class:`ImageInfo` takes ~180); an ImageInfo is made on access, None for a file the pre-check left unchecked
    (``data.header_checks = read``: format code :data:`UNKNOWN`, judged when its bytes are read)."""

    UNKNOWN = 255

    def __init__(self, infos: Sequence[ImageInfo | None]):
        n = len(infos)
        self.formats: list[str] = []
        code: dict[str, int] = {}
        for info in infos:  # few formats: one code each
            if info is not None and info.format not in code:
                code[info.format] = len(self.formats)
                self.formats.append(info.format)
        self.format = np.fromiter((self.UNKNOWN if i is None else code[i.format] for i in infos), np.uint8, n)
        self.width = np.fromiter((0 if i is None else i.width for i in infos), np.int32, n)
        self.height = np.fromiter((0 if i is None else i.height for i in infos), np.int32, n)
        self.pil = np.fromiter((i is not None and i.pil for i in infos), np.bool_, n)

    def __len__(self) -> int:
        return len(self.format)

    def __getitem__(self, i: int) -> ImageInfo | None:
        f = int(self.format[i])
        if f == self.UNKNOWN:
            return None
        return ImageInfo(self.formats[f], int(self.width[i]), int(self.height[i]), bool(self.pil[i]))


@dataclass
class _Planned:
    serial: int
    """Which planned run of batches it belongs to: a new one at each epoch boundary and at each reposition."""
    key: int
    """The epoch (training) or 0 (evaluation: every pass is the same)."""
    batch: int
    """Its batch number in the epoch."""
    indices: list[int]
    """Positions in the loader's file list: the batch's files less those known bad (training: topped up)."""


@dataclass
class _Sample:
    index: int
    data: np.ndarray | None
    """The encoded file (or the PNM of Pillow's decode); None when it could not be read (``error``)."""
    window: tuple[int, int, int, int] | None = None
    """Class training: (top, left, h, w) of the random-resized-crop."""
    flip: bool = False
    error: tuple[str, str] | None = None
    """(file, reason) when a file of the sample could not be read."""
    refused: bool = False
    """The error is the header rules' verdict on a file the pre-check left unchecked: skipped as the pre-check
    skips, not counted against ``data.max_bad_per_epoch``."""
    data_b: np.ndarray | None = None
    """Pairs of two files: the target file."""
    crop: tuple[float, float] = (0.0, 0.0)
    """Pair training: (x, y) of the crop window as shares of the margin (crop_mirror_normalize's crop_pos)."""
    half: tuple[int, int] = (0, 0)
    """Side-by-side pairs: (w, h) of each half."""


class _Feeder:
    """``fn.external_source``'s source: each call hands DALI the next planned batch, its files read ahead by a few
    threads, and records it in ``in_flight`` until the loader takes its output (DALI keeps batches in order)."""

    def __init__(self, loader: DaliLoader, readers: int, ahead: int):
        # A weak reference: the pipeline holds this feeder as its source, so a strong one would make a cycle
        # (loader -> pipeline -> feeder -> loader) that only the cyclic GC frees, at a moment nobody chose,
        # possibly inside a forked DataLoader worker, where destroying the pipeline hangs.
        self._loader = weakref.ref(loader)
        self.ahead = ahead
        self.pool = ThreadPoolExecutor(max_workers=readers, thread_name_prefix="fasttrain-dali-read")
        self.in_flight: deque[_Planned] = deque()
        self.queue: deque[tuple[_Planned, Future]] = deque()
        self.starts: dict[int, tuple[int, int]] = {}
        """Per serial, the (key, batch) it started at."""
        self.serial = self._counter = 0
        self.pos = (0, 0)
        self._orders: dict[int, list[int]] = {}
        self._last_ok: list[_Sample] = []
        """Training: the samples of the last batch fed, which stand in for a batch none of whose files reads."""

    @property
    def loader(self) -> DaliLoader:
        loader = self._loader()
        if loader is None:
            raise RuntimeError("DALI loader: the loader was freed while its pipeline still ran")
        return loader

    def reset(self, key: int, batch: int, serial: int | None = None) -> int:
        """Plan from (key, batch) on, as a new serial (or continuing ``serial``); drops the batches read ahead."""
        for _, fut in self.queue:
            fut.cancel()
        self.queue.clear()
        if serial is None:
            return self._start_serial(key, batch)
        self.serial, self.pos = serial, (key, batch)
        return serial

    def _start_serial(self, key: int, batch: int) -> int:
        self._counter += 1
        self.serial, self.pos = self._counter, (key, batch)
        self.starts[self.serial] = (key, batch)
        self.starts.pop(self.serial - 16, None)  # nothing that old is in flight
        return self.serial

    def rewind(self, serial: int) -> None:
        """After the pipeline was dropped: everything it held is gone; plan again from the earliest batch of
        ``serial`` or later that was not output yet (with the current list of bad files)."""
        pending = [p for p in self.in_flight if p.serial >= serial] + [p for p, _ in self.queue]
        self.in_flight.clear()
        if pending:
            self.reset(pending[0].key, pending[0].batch, pending[0].serial)

    def peek(self) -> _Planned:
        """The batch the pipeline outputs next."""
        if self.in_flight:
            return self.in_flight[0]
        self._fill()
        return self.queue[0][0]

    def __call__(self):
        L = self.loader
        while True:
            self._fill()
            planned, fut = self.queue.popleft()
            samples = fut.result()
            for s in samples:
                if s.error is not None:
                    L._bad.add(
                        s.error[0], s.error[1], counted=not s.refused
                    )  # may stop the run (BadDataError out of pipe.run)
            ok = [s for s in samples if s.error is None]
            if ok:
                break
            if L.train and self._last_ok:  # no file of the batch could be read: the last batch fed stands in,
                ok = self._last_ok  # so this process keeps the step count of the others (see _plan)
                break
        if len(ok) < len(samples) and L.train:
            ok = [ok[k % len(ok)] for k in range(L.batch_size)]
        if L.train:
            self._last_ok = ok
        planned.indices = [s.index for s in ok]
        self.in_flight.append(planned)
        return L._outputs(ok, planned.key)

    def close(self) -> None:
        self.reset(*self.pos)
        self.pool.shutdown(wait=False, cancel_futures=True)

    def _order(self, key: int) -> list[int]:
        if key not in self._orders:
            if len(self._orders) >= 2:
                self._orders.pop(next(iter(self._orders)))
            self._orders[key] = self.loader.sampler.indices(key)
        return self._orders[key]

    def _fill(self) -> None:
        while len(self.queue) < self.ahead:
            planned = self._plan()
            self.queue.append((planned, self.pool.submit(self.loader._read, planned)))

    def _plan(self) -> _Planned:
        L, B = self.loader, self.loader.batch_size
        for _ in range(len(L) + 1):
            (key, b), serial = self.pos, self.serial
            order = self._order(key)
            if (b + 1) * B < len(order):
                self.pos = (key, b + 1)
            else:  # the epoch's last batch: the next epoch (training) or the next pass (evaluation) follows
                self._start_serial(key + 1 if L.train else 0, 0)
            good = [i for i in order[b * B : (b + 1) * B] if L._usable(i)]
            if not good and L.train:
                # Every file of this batch is known bad, but training still takes this step: under torchrun each
                # process feeds its own shard and every step all-reduces, so a process one step short would leave
                # the others waiting for ever. Another batch of the epoch stands in.
                good = self._stand_in(order, b)
            if good:
                if L.train and len(good) < B:  # one shape for every step, as the torch loader's collate does
                    good = [good[k % len(good)] for k in range(B)]
                return _Planned(serial, key, b, good)
        raise L._bad.none_decoded(L._split_name)  # a whole epoch of batches without one usable file

    def _stand_in(self, order: list[int], b: int) -> list[int]:
        """The usable samples of the nearest batch of ``order`` after batch ``b`` (else before it) that has any."""
        L, B = self.loader, self.loader.batch_size
        batches = -(-len(order) // B)
        for k in [*range(b + 1, batches), *range(b - 1, -1, -1)]:
            good = [i for i in order[k * B : (k + 1) * B] if L._usable(i)]
            if good:
                return good
        return []


def _centre_geometry(data: DataConfig, train: bool) -> tuple[int, int]:
    """(crop side, shorter side before it) of a centre crop: evaluation's (``eval_crop``, ``eval_resize``), or
    training's without random-resized-crop (the largest training size, and size / 0.875 unless resize_size)."""
    if not train:
        return data.eval_crop, data.eval_resize
    side = data.train_size_max
    return side, data.resize_size if data.resize_size and side == data.image_size else int(round(side / 0.875))


def _torchvision_eval_geometry(encoded, resize: int, crop: int):
    """Per-sample ((out_h, out_w), (crop_pos_y, crop_pos_x)) DALI nodes reproducing torchvision exactly.

    ``resize_shorter`` rounds the long side where torchvision truncates (``int(resize * long / short)``), and
    DALI rounds a centre crop's half-pixel offset away from zero where torchvision's ``round`` goes to even; a
    one-pixel shift costs ~0.27 mean absolute error (normalized) on 73-pixel Imagenette crops, exact geometry
    ~0.002. Computed from the JPEG/PNG header on the CPU, so the GPU graph gets them as argument inputs.
    """
    from nvidia.dali import fn, types
    from nvidia.dali import math as dmath

    shape = fn.peek_image_shape(encoded, adjust_orientation=False)  # H, W, C as int64
    h, w = shape[0], shape[1]
    short = dmath.min(h, w)
    out_h, out_w = (h * resize) // short, (w * resize) // short  # the short side comes out as `resize` exactly
    pos = []
    for out in (out_h, out_w):
        margin = out - crop
        half = margin // 2
        anchor = half + (margin % 2) * (half % 2)  # round(margin / 2), halves to even, as Python does
        pos.append(anchor / dmath.max(margin, 1))  # DALI: crop_start = round(pos * margin) = anchor
    return (fn.cast(out_h, dtype=types.FLOAT), fn.cast(out_w, dtype=types.FLOAT)), tuple(pos)


class DaliLoader:
    """The loader contract over one long-lived DALI pipeline (see the module docstring for order, augmentation,
    pixels and bad files), for any kind of :class:`~fasttrain.data.samples.Samples` (a plain Split is ``class``).

    ``class`` training: random-resized-crop (area ``crop_scale_min``..1, aspect 3/4..4/3; only the window is
    decoded), resized to ``image_size``, random flip. ``class`` evaluation: shorter side resized to ``eval_resize``
    (linear, antialiased), centre crop ``image_size``. ``vector``: the whole image resized to ``image_size``
    squared, no augmentation; targets gathered on the device, with each image's width and height from its header
    when ``size_targets``. ``pair``: both images through the same graph (two files, or the halves of one
    side-by-side file sliced after one decode), resized square (training: to the jitter size, then the same
    :func:`~fasttrain.data.samples.pair_jitter` window and flip for both, as the torch loader cuts them); the
    target images are the batch's targets. Training drops the last partial global batch; evaluation yields every
    sample of the shard once. Output: normalized, ``spec.dtype``, NCHW (a channels_last view of DALI's NHWC
    output when ``spec.channels_last``). DALI has no bfloat16: bf16 is emitted as fp16 on the GPU (fp32 on the
    CPU) and cast by torch, one cheap elementwise pass.

    ``shard_id`` / ``num_shards``: the global rank and world size (:class:`~fasttrain.data.order.EpochSampler`);
    ``device_id``: the GPU of this process (its local rank), None for the CPU-only mode.
    """

    order = ""
    """Nothing beyond (seed, epoch): see :attr:`fasttrain.data.base.Loader.order`."""

    def __init__(
        self,
        split: Split | Samples,
        data: DataConfig,
        spec: InputSpec,
        *,
        batch_size: int,
        train: bool,
        seed: int,
        shard_id: int = 0,
        num_shards: int = 1,
        device_id: int | None = None,
        copy_outputs: bool = False,
        sizes: TrainSizes | None = None,
    ):
        ok, why = dali_status()
        if not ok:
            raise RuntimeError(f"DaliLoader: {why}")
        if batch_size < 1:
            raise ValueError(f"DaliLoader: batch_size must be >= 1, got {batch_size}")
        check_shard(num_shards, shard_id)
        if device_id is not None and (spec.device.type != "cuda" or spec.device.index not in (None, device_id)):
            # one GPU decodes and trains: DALI's outputs are handed over on its own device's stream
            raise ValueError(f"DaliLoader: device_id={device_id} (GPU decode) but the inputs go to {spec.device}")
        if len(spec.mean) != data.channels:
            raise ValueError(f"DaliLoader: spec has {len(spec.mean)} mean values for {data.channels} channels")
        samples = split if isinstance(split, Samples) else Samples(split, "class")
        self.kind = samples.kind
        self.data, self.spec, self.train, self.seed = data, spec, train, seed
        self.batch_size = batch_size
        self.device_id = device_id
        self.copy_outputs = copy_outputs
        """Copy each GPU batch into a torch-owned tensor instead of sharing DALI's through DLPack (see
        :data:`fasttrain.config.CUDA_GRAPH_COMPILE_MODES`)."""
        self.shard_id, self.num_shards = shard_id, num_shards
        self._rrc = train and self.kind == "class" and data.random_resized_crop
        self._flip = train and self.kind != "vector" and data.hflip
        self._side_by_side = samples.side_by_side
        self._load_size = pair_load_size(data.image_size, samples.jitter) if train else data.image_size
        self._sizes = sizes if train and self.kind == "class" and sizes is not None and sizes.progressive else None
        """Progressive resizing: each epoch's training size, fed per batch through external_source."""

        checked = precheck_samples(samples, data, threads=max(1, data.num_dali_threads))
        split = checked.samples.split
        self.skipped: list[tuple[str, str]] = list(checked.bad)
        """(path, reason) of every file left out: by the pre-check, and any that failed inside DALI since."""
        self._bad = BadFiles(self.skipped, data.max_bad_per_epoch)
        self._split_name = split.name
        # The split's own sequences, never a list per sample: from the dataset index they are views (a str made
        # on access), so a loader over ImageNet holds arrays, not 1.3 M Python objects.
        self._paths: Sequence[str] = split.paths
        self._infos = _Headers(checked.infos)
        self._paths_b: Sequence[str] | None = None
        self._infos_b = None if checked.target_infos is None else _Headers(checked.target_infos)
        if self.kind == "pair":
            self._targets = None
            if not self._side_by_side:
                self._paths_b = split.targets
        else:
            targets = targets_tensor(split.targets)
            if samples.size_targets:  # the width and height the pre-check read from each header
                wh = torch.from_numpy(np.stack([self._infos.width, self._infos.height], 1))
                targets = torch.cat([targets.float(), wh.float()], 1)
            self._targets = targets.to(spec.device)
        self.num_samples = len(self._paths)
        self.sampler = epoch_order(
            self.num_samples, batch_size, train, seed, num_shards, shard_id, refuse_empty="DaliLoader", split=split.name
        )
        self._start = 0  # batches of the next epoch to skip (resume)
        self._passes = 0
        self._last_serial: int | None = None  # the serial of the last batch handed out
        self.builds = 0
        """Pipelines built so far: one for the loader's life, plus one per file that failed inside DALI."""
        readers = max(2, min(8, data.num_dali_threads // 4))  # reading is I/O: a few threads keep ahead
        self._feeder = _Feeder(self, readers=readers, ahead=data.prefetch + 1)
        self._pipe: Any = None
        if len(self.sampler) == 0:
            # Evaluation on a shard with no samples (fewer images than processes): this process yields no batch,
            # builds no pipeline, and its evaluation still joins the others' all-reduce with zero sums.
            return
        self._feeder.reset(self._key(self.sampler.epoch), 0)
        self._build()  # fail here, not at the first step, if DALI cannot run this graph

    # -- the loader contract -----------------------------------------------------------------------------

    def __len__(self) -> int:
        return -(-len(self.sampler) // self.batch_size)

    def set_epoch(self, epoch: int) -> None:
        self.sampler.epoch = epoch

    def skip_batches(self, n: int) -> None:
        """Start the next iteration ``n`` batches into the epoch without decoding them (resume mid-epoch).
        Augmentation is drawn per sample from (seed, epoch, index): the batches after the skip are bit-identical
        to those of a full pass."""
        self._start = n

    def close(self) -> None:
        """Shut the pipeline and the readers down (tensors already handed out stay valid), and hand the memory
        DALI's pools kept from it back to the driver."""
        self._drop_pipeline()
        self._feeder.close()
        from fasttrain.memory import release_dali_pools

        release_dali_pools()

    def __del__(self) -> None:
        # A loader dropped without close() releases its pipeline and threads here, in the process that owns them.
        with contextlib.suppress(Exception):
            self.close()

    def __iter__(self) -> Iterator[Batch]:
        if len(self.sampler) == 0:  # an evaluation shard with no samples
            return
        epoch, start, self._start = self.sampler.epoch, self._start, 0
        self._bad.start_epoch(epoch if self.train else ("pass", self._passes))
        self._passes += 1
        serial = self._seek(self._key(epoch), start)
        decoded = 0
        while self._feeder.peek().serial == serial:
            step = self._step(serial)
            if step is None:  # a file failed inside DALI: recorded, pipeline rebuilt, the batch is fed again
                continue
            self._last_serial = serial
            decoded += 1
            if self.kind == "pair":
                a, b, _ = step
                yield Batch(self._finish_images(self._to_torch(a)), self._finish_images(self._to_torch(b)))
            else:
                images, idx = step
                targets = cast(torch.Tensor, self._targets)  # set for every kind but pairs
                yield Batch(self._finish_images(self._to_torch(images)), targets[self._to_torch(idx).long()])
        if not decoded and start < len(self):
            raise self._bad.none_decoded(self._split_name)

    # -- feeding ------------------------------------------------------------------------------------------

    def _key(self, epoch: int) -> int:
        return epoch if self.train else 0  # every evaluation pass is the same

    def _seek(self, key: int, start: int) -> int:
        """The serial of the batches that begin at (key, start): those already planned or decoding when the
        feeder foresaw this position (an epoch after the last one, or the next evaluation pass); otherwise a new
        plan, after the batches decoded ahead for another position are drained and dropped."""
        nxt = self._feeder.peek()
        if nxt.serial != self._last_serial and self._feeder.starts.get(nxt.serial) == (key, start):
            return nxt.serial
        serial = self._feeder.reset(key, start)
        while self._feeder.in_flight and self._feeder.in_flight[0].serial != serial:
            self._step(serial)  # output of a batch nobody asked for any more: dropped
        return serial

    def _read(self, planned: _Planned) -> list[_Sample]:
        """A planned batch's samples (runs in a reader thread): bytes, and for training the augmentation."""
        done: dict[int, _Sample] = {}
        return [done[i] if i in done else done.setdefault(i, self._read_one(i, planned.key)) for i in planned.indices]

    def _usable(self, i: int) -> bool:
        """Sample ``i`` has no file known to be bad."""
        return self._paths[i] not in self._bad and (self._paths_b is None or self._paths_b[i] not in self._bad)

    def _encoded(self, path: str, info: ImageInfo, data: bytes | None = None) -> bytes:
        """The bytes DALI decodes (``data``: the file's, already read)."""
        if info.pil:  # Pillow's pixels with the shared rules (alpha on white), as an uncompressed image
            if data is not None:
                return _pnm(decode_image(io.BytesIO(data), self.data.channels, self.data.max_image_pixels))
            return _pnm(load_image(path, self.data.channels, self.data.max_image_pixels))
        if data is None:
            with open_regular(path) as f:
                data = f.read()
        # One rule for every backend: Pillow's decode judges a JPEG whose scan data is corrupt mid-stream (DALI
        # would decode it anyway, naming nothing); a cheap byte scan finds the few files that need it.
        if info.format == "jpeg" and jpeg_scan_suspect(data):
            why = pil_decode_error(data)
            if why is not None:
                raise _Refused(why)
        return data

    def _read_one(self, i: int, key: int) -> _Sample:
        files = [(self._paths[i], self._infos[i])]
        if self._paths_b is not None and self._infos_b is not None:
            files.append((self._paths_b[i], self._infos_b[i]))
        encoded = []
        first: ImageInfo | None = None
        for path, info in files:
            read = None
            if info is None:  # left unchecked at start: judged now from the bytes read, by the pre-check's rules
                try:
                    read, info = read_checked(path, self.data.max_image_pixels)
                except UnusableImage as e:
                    return _Sample(i, None, error=(path, str(e)), refused=True)
            first = first or info
            try:
                data = self._encoded(path, info, read)
            except _Refused as e:
                return _Sample(i, None, error=(path, str(e)))
            except DECODE_ERRORS as e:
                return _Sample(i, None, error=(path, f"cannot be read ({type(e).__name__}: {e})"))
            if not data:
                return _Sample(i, None, error=(path, "empty file"))
            encoded.append(np.frombuffer(data, np.uint8))
        sample = _Sample(i, encoded[0], data_b=encoded[1] if len(encoded) > 1 else None)
        info = cast(ImageInfo, first)
        if self.kind == "class" and self.train:
            sample.window, sample.flip = train_params(self.data, self.seed, key, i, info.height, info.width)
        elif self.kind == "pair":
            if self._side_by_side:
                sample.half = (info.width // 2, info.height)
            if self.train:
                margin = self._load_size - self.data.image_size
                top, left, flipped = (int(v[0]) for v in pair_jitter(self.seed, key, [i], margin + 1, self.data.hflip))
                # crop_mirror_normalize starts the window at round(pos x margin): pos = offset / margin exactly.
                sample.crop = (left / margin, top / margin) if margin else (0.0, 0.0)
                sample.flip = bool(flipped)
        return sample

    def _outputs(self, samples: list[_Sample], key: int | None = None) -> tuple:
        """The external source's outputs for one batch, in the order of :meth:`_output_names`; ``key``: the
        epoch it belongs to (progressive resizing: its size; None: the largest)."""
        size = 0
        if self._sizes is not None:
            size = self._sizes.largest if key is None else self._sizes.size(key)

        def windows() -> list[tuple[int, int, int, int]]:  # drawn for every sample when the crop is random
            ws = [s.window for s in samples]
            if any(w is None for w in ws):
                raise RuntimeError("DALI loader: a sample has no random-resized-crop window")
            return cast("list[tuple[int, int, int, int]]", ws)

        columns: dict[str, Any] = {
            "encoded": lambda: [s.data for s in samples],
            "index": lambda: np.array([s.index for s in samples], np.int64),
            "anchor": lambda: np.array([(w[1], w[0]) for w in windows()], np.int32),  # (x, y)
            "shape": lambda: np.array([(w[3], w[2]) for w in windows()], np.int32),  # (w, h)
            "mirror": lambda: np.array([s.flip for s in samples], np.int32),
            "encoded_b": lambda: [s.data_b for s in samples],
            "half": lambda: np.array([s.half for s in samples], np.int32),
            "anchor_b": lambda: np.array([(s.half[0], 0) for s in samples], np.int32),
            "origin": lambda: np.zeros((len(samples), 2), np.int32),
            "crop_x": lambda: np.array([s.crop[0] for s in samples], np.float32),
            "crop_y": lambda: np.array([s.crop[1] for s in samples], np.float32),
            "size": lambda: np.full(len(samples), size, np.float32),
        }
        return tuple(columns[name]() for name in self._output_names())

    def _output_names(self) -> list[str]:
        names = ["encoded", "index"] + (["anchor", "shape"] if self._rrc else [])
        names += ["size"] if self._sizes is not None else []
        if self.kind == "pair":
            names += ["half", "origin", "anchor_b"] if self._side_by_side else ["encoded_b"]
            names += ["crop_x", "crop_y"] if self.train else []
        return names + (["mirror"] if self._flip else [])

    # -- running ------------------------------------------------------------------------------------------

    def _step(self, serial: int):
        """(images, indices) of the next batch, or None when a file failed inside DALI (then it is recorded,
        the pipeline rebuilt and the feeder rewound to the earliest batch of ``serial`` not output yet)."""
        if self._pipe is None:
            self._build()
        stream = output_stream(self.device_id, self.spec.device)
        try:
            outs = self._pipe.run() if stream is None else self._pipe.run(stream)
        except RuntimeError as e:
            failed = self._feeder.in_flight[0] if self._feeder.in_flight else None
            try:
                if _DEVICE_FAILED.search(str(e)):  # no file's fault: raised as it is (autotune reads an OOM)
                    raise
                bad = self._identify(failed, str(e)) if failed is not None else []  # may meet the device's too
            finally:  # the pipeline's memory back, and the next pass fed from this batch on
                self._drop_pipeline()
                self._feeder.rewind(serial)
            if not bad:
                raise RuntimeError(f"DALI pipeline failed, and no single file of the batch fails alone: {e}") from e
            for i, why in bad:
                if self._paths_b is not None:  # the batch-of-one pipeline cannot tell which file of the pair
                    why = f"{why}, or its target image {self._paths_b[i]}"
                self._bad.add(self._paths[i], why)
            return None
        self._feeder.in_flight.popleft()
        return outs

    def _identify(self, failed: _Planned, message: str) -> list[tuple[int, str]]:
        """The files of ``failed`` that DALI cannot decode: the sample its message names, once a batch-of-one
        pipeline confirms it; else each sample of the batch decoded alone."""
        samples = list({s.index: s for s in self._read(failed) if s.error is None}.values())
        m = _DECODE_FAILED.search(message)
        if m and int(m.group(1)) < len(failed.indices):
            named = failed.indices[int(m.group(1))]
            bad = self._probe([s for s in samples if s.index == named])
            if bad:
                return bad
        return self._probe(samples)

    def _probe(self, samples: list[_Sample]) -> list[tuple[int, str]]:
        """(index, DALI's reason) of the samples a batch-of-one copy of the pipeline fails on."""
        bad: list[tuple[int, str]] = []
        current: list[_Sample] = []
        pipe = None
        try:
            for s in samples:
                if pipe is None:
                    pipe = self._define(
                        lambda: self._outputs(current), batch_size=1, threads=1, prefetch=1, padded=False
                    )
                current[:] = [s]
                try:
                    pipe.run()
                except RuntimeError as e:
                    if _DEVICE_FAILED.search(str(e)):
                        raise
                    lines = [ln.strip(" :") for ln in str(e).splitlines() if ln.strip(" :")]
                    detail = "" if _DECODE_FAILED.search(str(e)) or not lines else f" ({lines[-1]})"
                    bad.append((s.index, f"DALI failed to decode it{detail}"))
                    _shutdown(pipe)  # an operator error leaves the pipeline unusable
                    pipe = None
        finally:
            if pipe is not None:
                _shutdown(pipe)
        return bad

    def _drop_pipeline(self) -> None:
        if self._pipe is not None:
            _shutdown(self._pipe)
            self._pipe = None

    def _build(self) -> None:
        d = self.data
        self._pipe = self._define(
            self._feeder, batch_size=self.batch_size, threads=d.num_dali_threads, prefetch=d.prefetch, padded=self.train
        )
        self.builds += 1

    def _define(self, source, *, batch_size: int, threads: int, prefetch: int, padded: bool):
        from nvidia.dali import fn, types
        from nvidia.dali.pipeline import Pipeline

        gpu = self.device_id is not None
        dev = "gpu" if gpu else "cpu"
        # No random operator in the graph (augmentation arrives per sample): the seed only has to be valid.
        pipe = Pipeline(
            batch_size=batch_size,
            num_threads=threads,
            device_id=self.device_id,
            seed=sample_seed(self.seed, 0, -1 - self.shard_id) % (2**31 - 1),
            prefetch_queue_depth=prefetch,
            exec_dynamic=True,
        )
        names = self._output_names()
        kinds = {n: _EXTERNAL_COLUMNS[n] for n in names}
        with pipe:
            columns = fn.external_source(
                source=source,
                num_outputs=len(names),
                batch=True,
                dtype=[getattr(types, k[0]) for k in kinds.values()],
                ndim=[k[1] for k in kinds.values()],
            )
            nodes = dict(zip(names, columns))
            ops = dict(
                decode=decoder_args(self.data, types, gpu=gpu, padded=padded),
                linear=dict(device=dev, interp_type=types.INTERP_LINEAR, antialias=True),
                normalize=dict(
                    device=dev,
                    dtype=self._dali_dtype(types),
                    mirror=nodes.get("mirror", 0),
                    output_layout="HWC" if self.spec.channels_last else "CHW",
                    mean=[255.0 * m for m in self.spec.mean],
                    std=[255.0 * s for s in self.spec.std],
                ),
            )
            index = nodes["index"].gpu() if gpu else nodes["index"]
            graph = self._pair_graph if self.kind == "pair" else self._image_graph
            pipe.set_outputs(*graph(fn, nodes, dev, **ops), index)
        pipe.build()
        return pipe

    def _pair_graph(self, fn, nodes: dict[str, Any], dev: str, *, decode, linear, normalize) -> tuple:
        """Both images of a pair: two files, or one side-by-side file decoded once and sliced into halves; each
        resized square (training: to the jitter size, then the same crop window and flip for both)."""
        a = fn.decoders.image(nodes["encoded"], **decode)
        if self._side_by_side:  # one decode, two slices: (0, 0) and (w, 0), each w x h
            b = fn.slice(a, nodes["anchor_b"], nodes["half"], axis_names="WH", device=dev)
            a = fn.slice(a, nodes["origin"], nodes["half"], axis_names="WH", device=dev)
        else:
            b = fn.decoders.image(nodes["encoded_b"], **decode)
        side, size = self._load_size, self.data.image_size
        window = dict(crop=(size, size), crop_pos_x=nodes["crop_x"], crop_pos_y=nodes["crop_y"]) if self.train else {}
        return tuple(
            fn.crop_mirror_normalize(fn.resize(t, resize_x=side, resize_y=side, **linear), **normalize, **window)
            for t in (a, b)
        )

    def _image_graph(self, fn, nodes: dict[str, Any], dev: str, *, decode, linear, normalize) -> tuple:
        """One image per sample: regression's whole image squared, classification's random-resized-crop window
        (only the window decoded) or torchvision's evaluation geometry; progressive sizes from the batch."""
        encoded, size = nodes["encoded"], self.data.image_size
        crop: dict[str, Any] = {}
        if self.kind == "vector":  # the whole image, squared: a target may be a position in it
            images = fn.resize(fn.decoders.image(encoded, **decode), resize_x=size, resize_y=size, **linear)
        elif self._rrc:
            # Only the window is decoded (ROI decode), then resized as torchvision's resized_crop does; under
            # progressive resizing to the size fed with the batch (no rebuild per size).
            images = fn.decoders.image_slice(encoded, nodes["anchor"], nodes["shape"], axis_names="WH", **decode)
            out = nodes.get("size", size)
            images = fn.resize(images, resize_x=out, resize_y=out, **linear)
        else:
            images = fn.decoders.image(encoded, **decode)
            side, resize = _centre_geometry(self.data, self.train)
            resize_hw, crop_pos_yx = _torchvision_eval_geometry(encoded, resize, side)
            images = fn.resize(images, resize_y=resize_hw[0], resize_x=resize_hw[1], **linear)
            crop = dict(crop=(side, side), crop_pos_y=crop_pos_yx[0], crop_pos_x=crop_pos_yx[1])
            if "size" in nodes:  # progressive: the centre crop at the largest size, resized to the batch's
                images = fn.crop(images, **crop, device=dev)
                images = fn.resize(images, resize_x=nodes["size"], resize_y=nodes["size"], **linear)
                crop = {}
        return (fn.crop_mirror_normalize(images, **normalize, **crop),)

    @property
    def decoders(self) -> int:
        """Image decoders in the pipeline: two for pairs in separate files (a and b), else one."""
        return 2 if self.kind == "pair" and not self._side_by_side else 1

    def _dali_dtype(self, types):
        # DALI has no bfloat16: fp16 on the GPU (half the bytes, fp16 holds normalized pixels more precisely
        # than bf16) and fp32 on the CPU (CPU fp16 arithmetic is slow); torch casts afterwards.
        if self.spec.dtype == torch.float16 or (self.spec.dtype == torch.bfloat16 and self.device_id is not None):
            return types.FLOAT16
        return types.FLOAT

    def _to_torch(self, tensor_list) -> torch.Tensor:
        """Zero-copy DLPack view of a dense DALI batch (the dynamic executor does not recycle output buffers:
        the memory lives as long as the torch tensor). On the GPU the outputs are already bound to torch's
        current stream (:func:`output_stream`), so taking them enqueues no host wait. ``copy_outputs``: a copy
        into a tensor torch allocated, on torch's current stream, and no DLPack capsule at all."""
        t = tensor_list.as_tensor()
        if self.device_id is None:
            return torch.from_dlpack(t)
        with torch.cuda.device(self.device_id):
            if self.copy_outputs:
                return copy_to_torch(t, torch.device("cuda", self.device_id))
            return torch.from_dlpack(t)

    def _finish_images(self, x: torch.Tensor) -> torch.Tensor:
        if self.spec.channels_last:
            x = x.permute(0, 3, 1, 2)  # a contiguous NHWC tensor *is* NCHW with channels_last strides
        x = x.to(self.spec.device, non_blocking=True)  # no-op unless CPU-only DALI feeds a GPU
        return x.to(self.spec.dtype)  # bf16 (DALI cannot emit it); keeps the memory format


def _shutdown(pipe) -> None:
    shutdown = getattr(pipe, "_shutdown", None)  # frees threads and pools now, not at collection
    if shutdown is not None:
        shutdown()


KINDS = ("class", "vector", "pair")
"""Sample kinds (:mod:`fasttrain.data.samples`) DALI serves: those read from image files."""
_CPU_GAIN = "DALI's CPU-only mode decodes faster than the torch loader (2.6x on Imagenette photos, 2 cores)"


class DaliBackend(Backend):
    """``data.loader = dali``: GPU decode on the inputs' CUDA device (the process's local rank under torchrun),
    the CPU-only mode otherwise. ``auto`` takes it after the cache, wherever it imports."""

    name = "dali"
    rank = 20

    def build(self, request: LoaderRequest, cfg: Config, spec: InputSpec) -> DaliLoader:
        device_id = (spec.device.index or 0) if spec.device.type == "cuda" else None
        rt = cfg.runtime
        graphs = rt.compile != "off" and rt.compile_mode in CUDA_GRAPH_COMPILE_MODES  # compile=auto is on for CUDA
        return DaliLoader(
            request.samples,
            cfg.data,
            spec,
            batch_size=request.batch_size,
            train=request.train,
            seed=rt.seed,
            shard_id=request.shard_id,
            num_shards=request.num_shards,
            device_id=device_id,
            copy_outputs=graphs and device_id is not None,
            sizes=train_sizes(cfg) if request.train else None,
        )

    def serves(self, run: RunSamples, cfg: Config, device: torch.device) -> tuple[bool, str]:
        if run.kind not in KINDS:
            return False, f"DALI cannot serve {run.kind} samples (it reads image files)"
        refusal = needs_pil(cfg.data)
        if refusal:
            return False, refusal
        if cfg.data.translate:
            return False, "data.translate: DALI has no reflected border to shift images into (the cache and torch do)"
        ok, why = dali_status()
        if not ok:
            return False, f"DALI cannot run here ({why})"
        return True, "" if device.type == "cuda" else "CPU-only mode"

    def fits(
        self, run: RunSamples, cfg: Config, device: torch.device, memory_limit: int | None = None
    ) -> tuple[bool, str]:
        if is_streamed(run.train.split):  # DALI reads members by offset: every shard would be downloaded first
            return False, "remote shards stream on the torch loader (DALI would download each whole; data.stream=off)"
        return True, "DALI decodes on the GPU" if device.type == "cuda" else f"no CUDA device: {_CPU_GAIN}"

    def knobs(self, data: DataConfig, device_type: str) -> list[dict[str, Any]]:
        """Decode threads: the config's own, then a quarter, half and all of the machine's share, at the configured
        hw_decoder_load; when that is below 0.9 a last try raises it to 0.9 (the hardware JPEG decoder is a
        separate engine: a lower load only moves decoding onto CPU threads)."""
        w, load = default_workers(), data.hw_decoder_load
        counts = sorted({max(1, w // 4), max(1, w // 2), w})
        others = [{"dali_threads": n, "hw_decoder_load": load} for n in counts]
        if load < 0.9:
            others.append({"dali_threads": w, "hw_decoder_load": 0.9})

        def resolved(setting: dict[str, Any]) -> tuple:
            d = dataclasses.replace(data, **setting)
            return d.num_dali_threads, d.hw_decoder_load

        return self.ladder({"dali_threads": data.dali_threads, "hw_decoder_load": load}, others, resolved)

    def queue_depth(self, data: DataConfig) -> int:
        """The pipeline's prefetch queue."""
        return data.prefetch


BACKEND = DaliBackend()
