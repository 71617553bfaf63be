"""DALI backend: the same file list as every other backend, decoded and augmented by DALI, batches on the device.

On CUDA the JPEG decode runs on the GPU (``mixed``: hardware decoder for ``hw_decoder_load`` of the images,
CUDA for the rest) and every later op runs on the GPU. With ``device_id=None`` the identical graph runs in
DALI's CPU-only mode, which is what the CPU tests exercise.

Sample order and sharding come from the torch backend's :class:`EpochSampler`, so for one seed both backends
visit the same files in the same order, and an epoch's order is a pure function of (seed, epoch): resuming at
epoch k reproduces it. DALI readers cannot be re-seeded per epoch (``shuffle_after_epoch`` advances an
internal counter, ``random_shuffle`` is a sliding buffer), so the reader gets the epoch's ordered file list
and a training pipeline is rebuilt once per epoch; validation keeps one pipeline. ``nvidia.dali`` is imported
only when a loader is built.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import tempfile
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import torch

from fasttrain.config import DataConfig
from fasttrain.data.base import Batch, InputSpec
from fasttrain.data.sources import Split
from fasttrain.data.torch_loader import EpochSampler, sample_seed

log = logging.getLogger(__name__)

__all__ = ["dali_status", "DaliLoader", "sniff_image_format", "check_image_file", "drop_bad_files", "targets_tensor"]

# nvJPEG's scratch buffers in NVIDIA's ResNet-50 example (per thread there; split across threads here), so they
# are not regrown mid-epoch.
_DEVICE_MEMORY_PADDING = 211_025_920
_HOST_MEMORY_PADDING = 140_544_512
_FILES_ARGUMENT_MAX = 50_000  # longer file lists reach the reader through a temporary file_list


@functools.lru_cache(maxsize=1)
def dali_status() -> tuple[bool, str]:
    """(True, version) when DALI and its PyTorch plugin import, else (False, why not)."""
    try:
        import nvidia.dali as dali
        import nvidia.dali.plugin.pytorch  # noqa: F401  (the bridge to torch tensors)
    except Exception as e:  # noqa: BLE001 - ImportError, or a broken install failing to load its libraries
        return False, f"nvidia.dali does not import: {type(e).__name__}: {e}"
    return True, f"DALI {dali.__version__}"


# ---------------------------------------------------------------------------------------------------------
# Cheap pre-check: DALI aborts the whole pipeline on one undecodable file, so obvious non-images go first.


def sniff_image_format(head: bytes) -> str | None:
    """The image format announced by a file's first bytes (16 are enough), or None when it is no image DALI reads."""
    if head.startswith(b"\xff\xd8\xff"):
        return "jpeg"
    if head.startswith(b"\x89PNG\r\n\x1a\n"):
        return "png"
    if head.startswith(b"BM"):
        return "bmp"
    if head[:4] in (b"II*\x00", b"MM\x00*"):
        return "tiff"
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "webp"
    if len(head) >= 3 and head[:1] == b"P" and head[1:2] in b"123456" and head[2:3].isspace():
        return "pnm"
    if head.startswith(b"\x00\x00\x00\x0cjP  \r\n\x87\n") or head.startswith(b"\xffO\xffQ"):
        return "jpeg2000"
    return None


def check_image_file(path: str) -> str | None:
    """Why ``path`` cannot be decoded (empty, unreadable, not an image, truncated), or None when it looks fine.

    Two small reads per file: the first 16 bytes (magic) and, for JPEG and PNG, the last 64, which must hold
    the end marker (JPEG EOI, PNG IEND). A file without one (a cut-off download; DALI aborts on those) is
    decoded once with PIL to tell a truncated image from a valid one with trailing bytes.
    """
    try:
        with open(path, "rb") as f:
            head = f.read(16)
            kind = sniff_image_format(head)
            if kind in ("jpeg", "png"):
                f.seek(0, os.SEEK_END)
                f.seek(max(0, f.tell() - 64))
                tail = f.read()
    except OSError as e:
        return f"cannot be read ({e.strerror or e})"
    if not head:
        return "empty file"
    if kind is None:
        return f"not a JPEG/PNG/BMP/TIFF/WebP/PNM/JPEG 2000 file (starts with {head[:8].hex(' ')})"
    if kind in ("jpeg", "png") and (b"\xff\xd9" if kind == "jpeg" else b"IEND") not in tail:
        from PIL import Image

        try:
            with Image.open(path) as im:
                im.load()
        except Exception as e:  # noqa: BLE001 - PIL raises OSError, SyntaxError, ValueError... on broken streams
            return f"truncated or corrupt {kind} ({type(e).__name__}: {e})"
    return None


def drop_bad_files(paths: Sequence[str], threads: int = 8) -> tuple[list[int], list[tuple[str, str]]]:
    """(indices of the files that pass :func:`check_image_file`, [(path, reason)] of those dropped, each logged)."""
    if len(paths) > 256 and threads > 1:  # opening files is I/O bound: threads hide the latency
        with ThreadPoolExecutor(max_workers=threads) as pool:
            reasons = list(pool.map(check_image_file, paths, chunksize=64))
    else:
        reasons = [check_image_file(p) for p in paths]
    keep, bad = [], []
    for i, (path, why) in enumerate(zip(paths, reasons)):
        if why is None:
            keep.append(i)
        else:
            bad.append((path, why))
            log.warning("skipping %s: %s", path, why)
    return keep, bad


def targets_tensor(targets: Sequence[Any]) -> torch.Tensor:
    """Class indices -> int64 (N); float vectors -> float32 (N x K); image targets (paths) -> ValueError."""
    try:
        t = torch.as_tensor(targets)
    except (TypeError, ValueError, RuntimeError) as e:
        raise ValueError("targets must be class indices or numeric vectors; paired image targets "
                         "need the torch loader") from e
    if t.dtype.is_floating_point:
        return t.float()
    if t.dtype == torch.bool or t.dtype.is_complex:
        raise ValueError(f"unsupported target dtype {t.dtype}")
    return t.long()


@contextlib.contextmanager
def _reader_file_source(files: list[str], labels: list[int]) -> Iterator[dict[str, Any]]:
    """``fn.readers.file`` arguments for this file order: ``files``/``labels``, or for long lists a temporary
    ``file_list`` (1.28 M paths: 2.8 s to pass as an argument, 0.5 s to write and parse as a file, per epoch)."""
    if len(files) <= _FILES_ARGUMENT_MAX or any("\n" in f or f != f.rstrip() for f in files):
        yield dict(files=files, labels=labels)  # names a file_list cannot carry stay an argument
        return
    fd, path = tempfile.mkstemp(prefix="fasttrain-dali-", suffix=".txt")
    try:
        with os.fdopen(fd, "w") as f:
            f.write("".join(f"{p} {i}\n" for p, i in zip(files, labels)))
        yield dict(file_list=path)
    finally:
        os.unlink(path)


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
    """The loader contract over a DALI pipeline (see the module docstring for order, sharding and rebuilds).

    Training: random-resized-crop fused into the decoder (area ``crop_scale_min``..1, aspect 3/4..4/3), resized
    to ``image_size``, random flip; the last partial batch is dropped. Evaluation: shorter side resized to
    ``eval_resize`` (linear, antialiased), centre crop ``image_size``; every sample exactly once, the last batch
    partial. Output: normalized, ``spec.dtype``, NCHW (a channels_last view of DALI's NHWC output when
    ``spec.channels_last``), targets indexed on the device. DALI has no bfloat16: bf16 is emitted as fp16 on
    the GPU (fp32 on the CPU) and cast by torch, one cheap elementwise pass.
    """

    def __init__(self, split: Split, data: DataConfig, spec: InputSpec, *, batch_size: int, train: bool,
                 seed: int, shard_id: int = 0, num_shards: int = 1, device_id: int | None = None):
        ok, why = dali_status()
        if not ok:
            raise RuntimeError(f"DaliLoader: {why}")
        if batch_size < 1:
            raise ValueError(f"DaliLoader: batch_size must be >= 1, got {batch_size}")
        if not 0 <= shard_id < num_shards:
            raise ValueError(f"DaliLoader: shard_id {shard_id} outside 0..{num_shards - 1}")
        if device_id is not None and spec.device.type != "cuda":
            raise ValueError(f"DaliLoader: device_id={device_id} (GPU decode) but the inputs go to {spec.device}")
        if len(spec.mean) != data.channels or len(spec.std) != data.channels:
            raise ValueError(f"DaliLoader: spec has {len(spec.mean)} mean values for {data.channels} channels")
        self.data, self.spec, self.train, self.seed = data, spec, train, seed
        self.batch_size = batch_size
        self.device_id = device_id
        self.shard_id, self.num_shards = shard_id, num_shards

        keep, self.skipped = drop_bad_files(split.paths, threads=max(1, data.num_dali_threads))
        if not keep:
            raise ValueError(f"DaliLoader: no readable images in the {split.name} split ({len(split)} files)")
        self._paths = [split.paths[i] for i in keep]
        self._targets = targets_tensor([split.targets[i] for i in keep]).to(spec.device)
        self.num_samples = len(self._paths)
        self.sampler = EpochSampler(self.num_samples, batch_size=batch_size, shuffle=train, seed=seed,
                                    drop_last=train, num_shards=num_shards, shard_id=shard_id)
        if len(self.sampler) == 0:
            raise ValueError(f"DaliLoader: the {split.name} split has {self.num_samples} usable images, "
                             f"{len(range(shard_id, self.num_samples, num_shards))} in shard {shard_id}: fewer than "
                             f"one batch of {batch_size} (training drops partial batches); lower the batch size")
        self._pipe = None
        self._pipe_epoch: int | None = None
        self._pipe_fresh = False  # True: the pipeline sits at the start of an epoch (new, or one ran to its end)
        self._build(self.sampler.epoch)  # fail here, not at the first step, if DALI cannot run this graph

    # -- the loader contract -----------------------------------------------------------------------------

    def __len__(self) -> int:
        return -(-len(self.sampler) // self.batch_size)

    def set_epoch(self, epoch: int) -> None:
        self.sampler.epoch = epoch

    def close(self) -> None:
        """Shut the pipeline down (its threads and buffers go; tensors already handed out stay valid)."""
        self._drop_pipeline()

    def __iter__(self) -> Iterator[Batch]:
        epoch = self.sampler.epoch
        # Training reshuffles (new reader file list) every epoch; evaluation reuses its pipeline when the last
        # pass ran to the end: pad_last_batch then leaves the reader exactly at the shard's first sample.
        if not (self._pipe_fresh and (self._pipe_epoch == epoch or not self.train)):
            self._build(epoch)
        pipe, self._pipe_fresh = self._pipe, False
        remaining = len(self.sampler)
        for _ in range(len(self)):
            try:
                images, idx = pipe.run()
            except RuntimeError as e:  # the pipeline is dead after any operator error
                self._drop_pipeline()
                raise RuntimeError(f"DALI pipeline failed (a file the pre-check could not catch?): {e}") from e
            x, i = self._to_torch(images, pipe), self._to_torch(idx, pipe).view(-1)
            n = min(self.batch_size, remaining)
            remaining -= n
            if n < self.batch_size:  # the reader padded the last batch by repeating its last sample
                x, i = x[:n], i[:n]
            yield Batch(self._finish_images(x), self._targets[i.long()])
        self._pipe_fresh = not self.train

    # -- internals ---------------------------------------------------------------------------------------

    def _drop_pipeline(self) -> None:
        if self._pipe is not None:
            shutdown = getattr(self._pipe, "_shutdown", None)  # frees threads and pools now, not at collection
            if shutdown is not None:
                shutdown()
            self._pipe = None
        self._pipe_epoch, self._pipe_fresh = None, False

    def _build(self, epoch: int) -> None:
        self._drop_pipeline()
        self.sampler.epoch = epoch
        order = self.sampler.indices()
        files = [self._paths[i] for i in order]
        # DALI seeds are 32-bit; one per (seed, epoch, shard) keeps augmentation reproducible and shards distinct.
        pipe_seed = sample_seed(self.seed, epoch, -1 - self.shard_id) % (2**31 - 1)
        with _reader_file_source(files, order) as source:
            self._pipe = self._define(source, pipe_seed)
            self._pipe.build()  # the reader parses a file_list here, so the file can go right after
        self._pipe_epoch, self._pipe_fresh = epoch, True

    def _define(self, source: dict[str, Any], seed: int):
        from nvidia.dali import fn, types
        from nvidia.dali.pipeline import Pipeline

        d, gpu, size = self.data, self.device_id is not None, self.data.image_size
        dev = "gpu" if gpu else "cpu"
        pipe = Pipeline(batch_size=self.batch_size, num_threads=d.num_dali_threads, device_id=self.device_id,
                        seed=seed, prefetch_queue_depth=d.prefetch)
        with pipe:
            # Labels are positions in self._paths; the real targets (ints or float vectors) are gathered on
            # the device. pad_last_batch repeats the last sample so an epoch ends on a batch boundary.
            encoded, index = fn.readers.file(**source, name="reader", pad_last_batch=True, random_shuffle=False)
            # adjust_orientation=False: PIL (the torch backend) ignores EXIF rotation too, so both see the same pixels.
            decode: dict[str, Any] = dict(device="mixed" if gpu else "cpu", adjust_orientation=False,
                                          output_type=types.RGB if d.channels == 3 else types.GRAY)
            if gpu:
                decode["hw_decoder_load"] = d.hw_decoder_load
                if self.train:
                    # The paddings are per decoder thread, outside torch's allocator (no budget sees them): split
                    # the example's totals across threads, and leave the validation pipeline at DALI's defaults.
                    threads = max(1, d.num_dali_threads)
                    decode.update(device_memory_padding=_DEVICE_MEMORY_PADDING // threads,
                                  host_memory_padding=_HOST_MEMORY_PADDING // threads)
            crop: dict[str, Any] = {}
            if self.train and d.random_resized_crop:
                # Fused crop: only the chosen window is decoded (ROI decode), then resized as torchvision does.
                images = fn.decoders.image_random_crop(encoded, random_area=[d.crop_scale_min, 1.0],
                                                       random_aspect_ratio=[3 / 4, 4 / 3], num_attempts=10, **decode)
                images = fn.resize(images, device=dev, resize_x=size, resize_y=size,
                                   interp_type=types.INTERP_LINEAR, antialias=True)
            else:
                images = fn.decoders.image(encoded, **decode)
                resize_hw, crop_pos_yx = _torchvision_eval_geometry(encoded, d.eval_resize, size)
                images = fn.resize(images, device=dev, resize_y=resize_hw[0], resize_x=resize_hw[1],
                                   interp_type=types.INTERP_LINEAR, antialias=True)
                crop = dict(crop=(size, size), crop_pos_y=crop_pos_yx[0], crop_pos_x=crop_pos_yx[1])
            mirror = fn.random.coin_flip(probability=0.5) if self.train and d.hflip else 0
            images = fn.crop_mirror_normalize(
                images, device=dev, dtype=self._dali_dtype(types), mirror=mirror,
                output_layout="HWC" if self.spec.channels_last else "CHW",
                mean=[255.0 * m for m in self.spec.mean], std=[255.0 * s for s in self.spec.std], **crop)
            pipe.set_outputs(images, index.gpu() if gpu else index)
        return pipe

    def _dali_dtype(self, types):
        # DALI has no bfloat16: fp16 on the GPU (half the bytes, fp16 holds normalized pixels more precisely
        # than bf16) and fp32 on the CPU (CPU fp16 arithmetic is slow); torch casts afterwards.
        if self.spec.dtype == torch.float16 or (self.spec.dtype == torch.bfloat16 and self.device_id is not None):
            return types.FLOAT16
        return types.FLOAT

    def _to_torch(self, tensor_list, pipe) -> torch.Tensor:
        """Zero-copy DLPack view of a dense DALI batch, as DALI's own PyTorch iterator does with its dynamic
        executor (the buffer lives as long as the torch tensor; on the GPU, DLPack orders torch's stream after
        DALI's). A copy for the legacy executor, whose output buffers are recycled on the next run."""
        t = tensor_list.as_tensor()
        if getattr(pipe, "exec_dynamic", False):
            if self.device_id is None:
                return torch.from_dlpack(t)
            with torch.cuda.device(self.device_id):
                return torch.from_dlpack(t)
        from nvidia.dali.plugin.pytorch import feed_ndarray, to_torch_type

        device = torch.device("cuda", self.device_id) if self.device_id is not None else torch.device("cpu")
        out = torch.empty(t.shape(), dtype=to_torch_type[t.dtype], device=device)
        feed_ndarray(t, out, cuda_stream=torch.cuda.current_stream(device) if device.type == "cuda" else None)
        return out

    def _finish_images(self, x: torch.Tensor) -> torch.Tensor:
        if self.spec.channels_last:
            x = x.permute(0, 3, 1, 2)  # a contiguous NHWC tensor *is* NCHW with channels_last strides
        x = x.to(self.spec.device, non_blocking=True)  # no-op unless CPU-only DALI feeds a GPU
        return x.to(self.spec.dtype)  # bf16 (DALI cannot emit it); keeps the memory format
