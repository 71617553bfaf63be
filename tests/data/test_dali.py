"""DALI loader: parity with the torch path, epoch coverage, order, shards, layout, bad files, a run that learns.

Everything runs in DALI's CPU-only mode (``device_id=None``); the ``gpu`` tests exercise the mixed decoder.
"""

from __future__ import annotations

import gc
import logging
import subprocess
import sys
import weakref
from pathlib import Path

import badfiles
import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn
from unlisted import UnlistedPaths

from fasttrain.config import DataConfig
from fasttrain.data.base import InputSpec, LoaderRequest, normalize_on_device
from fasttrain.data.checks import BadDataError, check_header, sniff_image_format
from fasttrain.data.dali import (
    DaliLoader,
    _Draws,
    dali_padding_bytes,
    dali_status,
    decoder_args,
    output_stream,
    rrc_window,
    train_params,
)
from fasttrain.data.decode import load_image
from fasttrain.data.index import IndexedPaths, load_or_build
from fasttrain.data.sources import Split
from fasttrain.data.torch_loader import EpochSampler, ImageDataset, TorchLoader
from fasttrain.data.transforms import eval_transform, train_transform

needs_dali = pytest.mark.skipif(not dali_status()[0], reason=dali_status()[1])

# One grey level is 1 / (255 * std) ~ 0.017 on the normalized scale. Both backends decode JPEGs with
# libjpeg-turbo and the geometry is torchvision's to the pixel, so what differs is the resampling arithmetic
# (DALI's antialiased linear filter vs Pillow's, which the torch path uses, each rounding to uint8) and the
# RGB->gray rounding: measured 0.002-0.006 mean per image, a few levels at single pixels. A one-pixel crop
# offset would already cost ~0.1-0.3.
PARITY_MEAN_ABS = 0.02  # per image, normalized scale (~1 grey level)
PARITY_MAX_ABS = 0.5  # any single value (~8 grey levels: rounding of gray conversion / resampling at edges)


def photo_like(rng: np.random.Generator, h: int, w: int) -> Image.Image:
    """Smooth random colour fields (low-resolution noise upsampled), closer to photos than white noise."""
    base = (rng.random((max(2, h // 10), max(2, w // 10), 3)) * 255).astype(np.uint8)
    return Image.fromarray(base).resize((w, h), Image.BICUBIC)


def write_mixed_images(folder: Path, n: int, seed: int = 0) -> list[str]:
    """Mixed sizes and kinds: RGB JPEG, RGB PNG, grayscale JPEG, opaque RGBA PNG."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    paths = []
    for i in range(n):
        h, w = (int(v) for v in rng.integers(36, 120, 2))
        im = photo_like(rng, h, w)
        kind = i % 4
        if kind == 0:
            p = folder / f"{i:03d}.jpg"
            im.save(p, quality=92)
        elif kind == 1:
            p = folder / f"{i:03d}.png"
            im.save(p)
        elif kind == 2:
            p = folder / f"{i:03d}.jpg"
            im.convert("L").save(p, quality=92)
        else:
            p = folder / f"{i:03d}.png"
            im.convert("RGBA").save(p)  # alpha 255 everywhere: compositing on white changes nothing
        paths.append(str(p))
    return paths


@pytest.fixture(scope="module")
def mixed(tmp_path_factory) -> list[str]:
    return write_mixed_images(tmp_path_factory.mktemp("mixed"), 23)


def spec_for(data: DataConfig, *, dtype=torch.float32, channels_last=False, device="cpu") -> InputSpec:
    mean, std = data.norm_mean_std()
    return InputSpec(torch.device(device), dtype, channels_last, tuple(mean), tuple(std))


def split_of(paths, targets=None, name="val") -> Split:
    return Split(name, list(paths), list(range(len(paths))) if targets is None else list(targets))


def epoch(loader, e=None):
    if e is not None:
        loader.set_epoch(e)
    batches = list(loader)
    return batches, torch.cat([b.targets for b in batches]), torch.cat([b.inputs for b in batches])


def torch_reference(paths, data: DataConfig, spec: InputSpec) -> torch.Tensor:
    tf = eval_transform(data)
    return normalize_on_device(torch.stack([tf(load_image(p, data.channels)) for p in paths]), spec)


def torch_training_epoch(paths, data: DataConfig, spec: InputSpec, *, batch_size: int, seed: int, epoch: int):
    loader = TorchLoader(
        ImageDataset(split_of(paths, name="train"), train_transform(data), data.channels, seed),
        spec,
        batch_size=batch_size,
        train=True,
        seed=seed,
        workers=0,
    )
    return epoch_of(loader, epoch)


def epoch_of(loader, e):
    return epoch(loader, e)


def check_image_file(path):
    return check_header(path)[1]


# -- no DALI needed -----------------------------------------------------------------------------------------


def test_importing_the_package_has_no_side_effects():
    """Importing any module has no side effects: no DALI import, no CUDA initialisation, no cuDNN flag changed."""
    code = (
        "import sys, torch; flags = torch.backends.cudnn.benchmark; "
        "import fasttrain, fasttrain.cli, fasttrain.engine, fasttrain.tuning, fasttrain.benchmark, "
        "fasttrain.prediction, fasttrain.data.dali, fasttrain.data.gpu_cache, fasttrain.data.loaders, "
        "fasttrain.tasks.classify, fasttrain.tasks.regress, fasttrain.tasks.pix2pix; "
        "sys.exit(1 if 'nvidia.dali' in sys.modules else 2 if torch.cuda.is_initialized() "
        "else 3 if torch.backends.cudnn.benchmark != flags else 0)"
    )
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0


def test_magic_bytes_and_truncation_check(tmp_path, mixed):
    im = Image.new("RGB", (20, 10), (10, 200, 30))
    for ext, kind in (("bmp", "bmp"), ("webp", "webp"), ("tiff", "tiff"), ("ppm", "pnm"), ("png", "png")):
        p = tmp_path / f"ok.{ext}"
        im.save(p)
        assert sniff_image_format(p.read_bytes()[:16]) == kind
        assert check_image_file(str(p)) is None
    assert all(check_image_file(p) is None for p in mixed)
    jpeg = Path(mixed[0]).read_bytes()
    cases = {
        "empty.jpg": b"",
        "html.jpg": b"<html><body>404</body></html>",
        "cut.jpg": jpeg[: len(jpeg) // 2],
        "cut.png": Path(mixed[1]).read_bytes()[:200],
    }
    for name, content in cases.items():
        (tmp_path / name).write_bytes(content)
        assert check_image_file(str(tmp_path / name)) is not None, name
    assert "empty" in check_image_file(str(tmp_path / "empty.jpg"))
    assert check_image_file(str(tmp_path / "missing.jpg")).startswith("cannot be read")
    (tmp_path / "trailer.jpg").write_bytes(jpeg + b"\0" * 300)  # bytes after EOI: valid, PIL confirms
    assert check_image_file(str(tmp_path / "trailer.jpg")) is None


@pytest.mark.parametrize("size", [(40, 56), (300, 20), (20, 300), (7, 9)])
def test_crop_windows_and_flips_are_the_torch_loaders_draws(size):
    """The DALI feeder's augmentation is the torch loader's: the same draws from the same per-sample seed."""
    from torchvision.transforms import v2
    from torchvision.transforms.v2 import functional as TF

    h, w = size
    data = DataConfig(image_size=8, crop_scale_min=0.08)
    rrc = v2.RandomResizedCrop(8, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3))
    im = Image.fromarray((np.arange(h * w * 3) % 251).astype(np.uint8).reshape(h, w, 3))
    tf = train_transform(data)
    flips = 0
    for index in range(40):
        window, flip = train_params(data, seed=5, epoch=3, index=index, height=h, width=w)
        with torch.random.fork_rng(devices=[]):
            from fasttrain.data.torch_loader import sample_seed

            torch.manual_seed(sample_seed(5, 3, index))
            expect = rrc.make_params([torch.empty(1, 1, 1).expand(3, h, w)])
            torch.manual_seed(sample_seed(5, 3, index))
            reference = tf(im)  # what ImageDataset computes for (epoch 3, index)
        assert window == (expect["top"], expect["left"], expect["height"], expect["width"])
        top, left, ch, cw = window
        mine = TF.pil_to_tensor(TF.resized_crop(im, top, left, ch, cw, [8, 8], antialias=True))
        assert torch.equal(mine.flip(2) if flip else mine, reference)
        flips += flip
    assert 5 < flips < 35
    whole = rrc_window(_Draws().seed(0), 10, 10, (1.0, 1.0))
    assert whole == (0, 0, 10, 10)  # area 1 fits at aspect 1 only, else the fallback: the whole image


def test_decoder_padding_is_per_thread_and_outputs_follow_torchs_stream(monkeypatch):
    """CPU twins of two GPU-only rules (untested on a GPU here): DALI's decoder paddings are per thread (the
    memory a run reserves grows with the thread count), and outputs are bound to torch's current stream."""
    assert dali_padding_bytes(DataConfig(dali_threads=1)) == (211_025_920, 2 * 140_544_512)
    assert dali_padding_bytes(DataConfig(dali_threads=6)) == (6 * 211_025_920, 12 * 140_544_512)
    assert dali_padding_bytes(DataConfig(dali_threads=6), decoders=2) == (12 * 211_025_920, 24 * 140_544_512)
    assert output_stream(None, torch.device("cpu")) is None  # CPU-only mode: host-synchronous outputs
    asked = []
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: asked.append(device) or "torch-stream")
    assert output_stream(0, torch.device("cuda", 0)) == "torch-stream" and asked == [torch.device("cuda", 0)]


GPU_GRAPHS = {
    "class train": dict(train=True),
    "class train progressive": dict(train=True, progressive=True),
    "class train centre crop progressive": dict(train=True, progressive=True, rrc=False),
    "class eval gray": dict(train=False, channels=1),
    "vector": dict(train=True, kind="vector"),
    "pair files": dict(train=True, kind="pair"),
    "pair side by side": dict(train=True, kind="pair", side_by_side=True),
    "pair side by side eval": dict(train=False, kind="pair", side_by_side=True),
}


@needs_dali
@pytest.mark.parametrize("graph", list(GPU_GRAPHS))
def test_the_gpu_graph_passes_dalis_own_graph_checks(mixed, monkeypatch, graph):
    """No GPU line has run in CI. DALI checks a graph when it adds its operators, before any needs CUDA: argument
    names against each operator's schema, each input on a device its operator takes (a mixed decoder's input on
    the CPU, a GPU operator's argument inputs on the CPU). The graph the GPU loader defines (mixed decode, GPU
    resize, slice, crop, normalize) goes through those checks here, short of instantiating the operators."""
    import nvidia.dali.pipeline as dali_pipeline
    from nvidia.dali.pipeline import Pipeline

    from fasttrain.data.formats import SIDE_BY_SIDE
    from fasttrain.data.progressive import TrainSizes
    from fasttrain.data.samples import Samples

    g = GPU_GRAPHS[graph]
    data = DataConfig(image_size=32, channels=g.get("channels", 3), random_resized_crop=g.get("rrc", True))
    kind = g.get("kind", "class")
    if kind == "pair":
        targets = [SIDE_BY_SIDE] * 4 if g.get("side_by_side") else mixed[4:8]
        samples = Samples(Split("train", mixed[:4], targets), "pair")
    elif kind == "vector":
        samples = Samples(Split("train", mixed[:4], [[0.5, 0.5]] * 4), "vector", size_targets=True)
    else:
        samples = Samples(split_of(mixed[:4], name="train"), "class")
    sizes = TrainSizes(16, 32, 0.0, 3.0, 8, 4) if g.get("progressive") else None
    spec = spec_for(data, dtype=torch.bfloat16, channels_last=True)
    loader = DaliLoader(samples, data, spec, batch_size=2, train=g["train"], seed=0, sizes=sizes)
    try:
        assert loader._sizes is not None or not sizes
        loader.device_id = 0  # the graph of a GPU loader; the backend object is made without a device
        real_init = Pipeline.__init__
        monkeypatch.setattr(Pipeline, "__init__", lambda self, *a, **k: real_init(self, *a, **{**k, "device_id": None}))
        monkeypatch.setattr(dali_pipeline.b, "check_cuda_runtime", lambda: None)
        monkeypatch.setattr(Pipeline, "build", lambda self: self.serialize())  # adds the operators: the checks
        checked = loader._define(loader._feeder, batch_size=2, threads=1, prefetch=1, padded=True)
        assert b"mixed" in checked.serialize() and b"jpeg_fancy_upsampling" in checked.serialize()
    finally:
        loader.device_id = None
        loader.close()


@pytest.mark.parametrize(
    "compile, mode, device, copies",
    [
        ("auto", "reduce-overhead", "cuda", True),
        ("on", "max-autotune", "cuda", True),
        ("auto", "default", "cuda", False),
        ("auto", "max-autotune-no-cudagraphs", "cuda", False),
        ("off", "reduce-overhead", "cuda", False),
        ("auto", "reduce-overhead", "cpu", False),  # CPU-only DALI: its batches are copied to the device anyway
    ],
)
def test_cuda_graph_compile_modes_get_torch_owned_batches(monkeypatch, compile, mode, device, copies):
    """DALI frees a DLPack-shared batch from a background thread with cudaDeviceSynchronize(), fatal while torch
    captures a CUDA graph: in the graph-capturing modes the GPU loader copies batches into torch's memory."""
    import fasttrain.data.dali as dali_mod
    from fasttrain.config import Config, apply_overrides

    made = {}
    monkeypatch.setattr(dali_mod, "DaliLoader", lambda *a, **k: made.update(k))
    cfg = apply_overrides(Config(), [f"runtime.compile={compile}", f"runtime.compile_mode={mode}"])
    spec = InputSpec(torch.device(device, 0), torch.float16, True, (0.5,) * 3, (0.5,) * 3)
    dali_mod.BACKEND.build(LoaderRequest(None, train=True, batch_size=4), cfg, spec)
    assert made["copy_outputs"] is copies


@needs_dali
def test_closing_a_loader_hands_dalis_pooled_memory_back(mixed, monkeypatch):
    """A closed pipeline's buffers went back to DALI's pools, not to the driver: autotune's later loader trials
    under-measured DALI, and a run after autotune() in one process trained with that memory held."""
    import nvidia.dali.backend as dali_backend

    from fasttrain import memory

    calls = []
    monkeypatch.setattr(dali_backend, "ReleaseUnusedMemory", lambda: calls.append("release"))
    data = DataConfig(image_size=32)
    loader = DaliLoader(split_of(mixed[:4]), data, spec_for(data), batch_size=2, train=False, seed=0)
    list(loader)
    gc.collect()  # loaders of earlier tests, closed by their __del__, release too: not what is counted here
    gc.disable()
    try:
        calls.clear()
        loader.close()
        assert calls == ["release"]
        memory.free_device_memory("cpu")  # what every autotune reading starts from (its gc.collect() may close
        assert len(calls) >= 2  # a stray loader of another test too: at least one more release)
    finally:
        gc.enable()


@pytest.mark.gpu
@needs_dali
def test_a_closed_gpu_loader_leaves_its_decoder_memory_with_the_driver(mixed):
    """Four decoder threads pad ~800 MiB of device memory; once the loader is closed it must be gone. Measured
    from after a first loader: what a process's first GPU pipeline loads once (DALI's and nvJPEG's kernels, which
    CUDA's lazy loading keeps on the device) is no loader's leak."""
    from fasttrain import memory

    dev = torch.device("cuda", 0)
    data = DataConfig(image_size=32, dali_threads=4)
    spec = spec_for(data, dtype=torch.float16, device="cuda:0")

    def one_loader():
        loader = DaliLoader(split_of(mixed), data, spec, batch_size=4, train=True, seed=0, device_id=0)
        list(loader)
        loader.close()
        memory.free_device_memory(dev)

    one_loader()
    before = memory.device_memory(dev).used_bytes
    one_loader()
    assert memory.device_memory(dev).used_bytes - before < 256 * memory.MIB


@needs_dali
def test_a_pair_in_two_files_counts_two_padded_decoders(tmp_path, mixed):
    from fasttrain.data.samples import Samples

    data = DataConfig(image_size=32)
    pair = Samples(Split("train", mixed[:4], mixed[4:8]), "pair")
    loader = DaliLoader(pair, data, spec_for(data), batch_size=2, train=False, seed=0)
    try:
        assert loader.decoders == 2
    finally:
        loader.close()
    single = DaliLoader(split_of(mixed[:4]), data, spec_for(data), batch_size=2, train=False, seed=0)
    single.close()
    assert single.decoders == 1


@needs_dali
def test_gpu_decoders_upsample_chroma_as_pillow_does(mixed, monkeypatch):
    """DALI's mixed decoder left jpeg_fancy_upsampling off: GPU-decoded 4:2:0 JPEGs differed from Pillow, DALI's
    CPU mode and predict. Every decoder of a pipeline takes decoder_args; on the GPU they turn it on."""
    import nvidia.dali.types as types

    import fasttrain.data.dali as dali_mod

    gpu = decoder_args(DataConfig(), types, gpu=True, padded=True)
    assert gpu["device"] == "mixed" and gpu["jpeg_fancy_upsampling"] is True
    assert gpu["device_memory_padding"] == 211_025_920
    assert "jpeg_fancy_upsampling" not in decoder_args(DataConfig(), types, gpu=False, padded=True)  # libjpeg's own
    used = []
    real = dali_mod.decoder_args
    monkeypatch.setattr(dali_mod, "decoder_args", lambda *a, **k: used.append(k) or real(*a, **k))
    data = DataConfig(image_size=32)
    DaliLoader(split_of(mixed[:4]), data, spec_for(data), batch_size=2, train=True, seed=0).close()
    assert used == [{"gpu": False, "padded": True}]  # the pipeline's decoders come from it


@needs_dali
def test_copy_to_torch_gives_a_torch_owned_copy():
    from nvidia.dali.backend import TensorCPU

    from fasttrain.data.dali import copy_to_torch

    src = np.arange(24, dtype=np.uint8).reshape(2, 3, 4)
    dali_tensor = TensorCPU(src)
    out = copy_to_torch(dali_tensor, torch.device("cpu"))
    assert out.dtype == torch.uint8 and out.tolist() == src.tolist()
    assert out.data_ptr() != dali_tensor.data_ptr()  # its own memory, no view of DALI's


@pytest.mark.gpu
@needs_dali
def test_dali_batches_feed_a_reduce_overhead_compiled_step(mixed):
    """The first GPU run confirms it: CUDA-graph capture with DALI batches, several steps, no terminate."""
    data = DataConfig(image_size=32)
    spec = spec_for(data, dtype=torch.float16, channels_last=True, device="cuda:0")
    loader = DaliLoader(split_of(mixed), data, spec, batch_size=4, train=True, seed=0, device_id=0, copy_outputs=True)
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 23)).cuda().half()
    step = torch.compile(model, mode="reduce-overhead")
    try:
        for _ in range(3):
            for batch in loader:
                step(batch.inputs).float().sum().item()
    finally:
        loader.close()


# -- CPU-only DALI --------------------------------------------------------------------------------------------


@needs_dali
@pytest.mark.parametrize("channels", [3, 1])
@pytest.mark.parametrize("channels_last", [False, True])
def test_eval_output_matches_the_torch_path(mixed, channels, channels_last):
    data = DataConfig(image_size=32, channels=channels)  # eval_resize 37: odd crop margins, half-pixel cases
    spec = spec_for(data, channels_last=channels_last)
    loader = DaliLoader(split_of(mixed), data, spec, batch_size=5, train=False, seed=0)
    _, targets, x = epoch(loader)
    loader.close()
    assert targets.tolist() == list(range(len(mixed)))  # labels follow the file list, in order
    ref = torch_reference(mixed, data, spec)
    assert x.shape == ref.shape == (len(mixed), channels, 32, 32)
    err = (x - ref).abs()
    per_image = err.flatten(1).mean(1)
    assert per_image.max() < PARITY_MEAN_ABS, per_image
    assert err.max() < PARITY_MAX_ABS


@needs_dali
def test_an_evaluation_shard_with_no_samples_yields_nothing_instead_of_raising(mixed):
    """Fewer validation images than processes: the empty shard raised alone (none decoded) while the other
    ranks went on to the all-reduce and waited. It yields no batch; the shards together still cover each once."""
    data = DataConfig(image_size=32)
    seen = []
    for shard in range(4):
        loader = DaliLoader(
            split_of(mixed[:2]), data, spec_for(data), batch_size=5, train=False, seed=0, num_shards=4, shard_id=shard
        )
        try:
            batches = list(loader)
            assert len(loader) == len(batches) == (1 if shard < 2 else 0)
            seen += [t for b in batches for t in b.targets.tolist()]
        finally:
            loader.close()
    assert sorted(seen) == [0, 1]


@needs_dali
def test_eval_matches_the_torch_path_on_imagenette(tmp_path_factory, shared_extractor):
    root = shared_extractor(
        "imagenette224",
        tmp_path_factory.mktemp("imagenette-subset"),
        members_filter=lambda name: "/val/n03888257/" in name,
    )
    paths = sorted(str(p) for p in root.rglob("*.JPEG"))[:64]
    data = DataConfig(image_size=64)  # 224 -> 73 -> 64: real photos, downscaled, odd margins
    spec = spec_for(data, channels_last=True)
    loader = DaliLoader(split_of(paths), data, spec, batch_size=16, train=False, seed=0)
    _, _, x = epoch(loader)
    err = (x - torch_reference(paths, data, spec)).abs()
    assert err.flatten(1).mean(1).max() < PARITY_MEAN_ABS
    assert err.max() < PARITY_MAX_ABS


@needs_dali
def test_a_loader_dropped_without_close_is_freed_at_once_not_by_a_later_gc(mixed):
    """A DALI pipeline left to the cyclic garbage collector is destroyed wherever the collector next runs,
    including inside a forked DataLoader worker, where its executor waits for threads that do not exist in the
    child: the worker hangs (seen: a torch loader with workers after an unclosed DALI loader). Dropping the last
    reference must free the loader, its readers and its pipeline right there."""
    data = DataConfig(image_size=16)
    loader = DaliLoader(split_of(mixed), data, spec_for(data), batch_size=5, train=False, seed=0)
    next(iter(loader))
    pipe, pool = weakref.ref(loader._pipe), loader._feeder.pool
    gc.disable()
    try:
        gone = weakref.ref(loader)
        del loader
        assert gone() is None, "the loader is kept alive by a reference cycle"
        assert pipe() is None
        assert pool._shutdown
    finally:
        gc.enable()


@needs_dali
def test_eval_covers_every_sample_once_per_epoch(mixed):
    data = DataConfig(image_size=16)
    loader = DaliLoader(split_of(mixed), data, spec_for(data), batch_size=5, train=False, seed=0)
    assert len(loader) == 5 and loader.num_samples == 23
    for e in range(3):  # the reused pipeline restarts at the first sample every epoch
        batches, targets, _ = epoch(loader, e)
        assert [len(b) for b in batches] == [5, 5, 5, 5, 3]
        assert targets.tolist() == list(range(23))
    it = iter(loader)  # an abandoned pass must not shift the next one
    next(it)
    del it
    assert epoch(loader)[1].tolist() == list(range(23))


@needs_dali
def test_training_drops_the_partial_batch_and_reshuffles_reproducibly(mixed):
    data = DataConfig(image_size=16, crop_scale_min=0.3)
    spec = spec_for(data)

    def make(seed):
        return DaliLoader(split_of(mixed, name="train"), data, spec, batch_size=5, train=True, seed=seed)

    a, b = make(7), make(7)
    assert len(a) == 4
    batches, t0, x0 = epoch(a, 0)
    assert [len(bt) for bt in batches] == [5, 5, 5, 5]
    assert len(set(t0.tolist())) == 20  # 20 distinct samples, the 3 left over are dropped
    _, t1, _ = epoch(a, 1)
    assert t0.tolist() != t1.tolist()
    # Same order as the torch backend's sampler: both backends see the same files in the same order.
    sampler = EpochSampler(23, batch_size=5, shuffle=True, seed=7, drop_last=True)
    sampler.epoch = 1
    assert t1.tolist() == sampler.indices()
    # Reproducible: another loader with the same seed, and the same loader going back to epoch 0.
    _, t0b, x0b = epoch(b, 0)
    assert t0b.tolist() == t0.tolist() and torch.equal(x0b, x0)
    _, t0c, x0c = epoch(a, 0)
    assert t0c.tolist() == t0.tolist() and torch.equal(x0c, x0)
    assert epoch(make(8), 0)[1].tolist() != t0.tolist()


@needs_dali
@pytest.mark.parametrize("train", [False, True])
def test_shards_are_disjoint_and_cover_the_split(mixed, train):
    data = DataConfig(image_size=16)
    seen = []
    for shard in range(3):
        loader = DaliLoader(
            split_of(mixed), data, spec_for(data), batch_size=2, train=train, seed=1, shard_id=shard, num_shards=3
        )
        seen.append(epoch(loader, 4)[1].tolist())
        assert len(seen[-1]) == (2 * len(loader) if train else len(loader.sampler))
        loader.close()
    flat = [i for s in seen for i in s]
    assert len(flat) == len(set(flat))  # no sample in two shards
    if train:  # 23 trimmed to whole global batches of 2 x 3: the same 6 per shard, 18 in all
        assert [len(s) for s in seen] == [6, 6, 6]
        whole = EpochSampler(23, batch_size=6, shuffle=True, seed=1, drop_last=True).indices(4)
        for k in range(3):  # global step k: the 3 shards' batch k together are the one-process batch k
            assert sorted(i for s in seen for i in s[2 * k : 2 * k + 2]) == sorted(whole[6 * k : 6 * k + 6])
    else:
        assert sorted(flat) == list(range(23))


@needs_dali
def test_channels_last_is_a_view_with_the_right_strides(mixed):
    data = DataConfig(image_size=16)
    cl = DaliLoader(split_of(mixed), data, spec_for(data, channels_last=True), batch_size=4, train=True, seed=0)
    x = next(iter(cl)).inputs
    assert x.shape == (4, 3, 16, 16) and x.stride() == (16 * 16 * 3, 1, 16 * 3, 3)
    assert x.is_contiguous(memory_format=torch.channels_last)
    plain = DaliLoader(split_of(mixed), data, spec_for(data), batch_size=4, train=True, seed=0)
    y = next(iter(plain)).inputs
    assert y.is_contiguous() and y.shape == (4, 3, 16, 16)
    assert torch.allclose(x, y, atol=1e-5)  # same samples, same augmentation, only the layout differs


@needs_dali
def test_bf16_is_cast_from_fp32_and_keeps_channels_last(mixed):
    data = DataConfig(image_size=16)
    fp32 = next(
        iter(DaliLoader(split_of(mixed), data, spec_for(data, channels_last=True), batch_size=8, train=False, seed=0))
    ).inputs
    bf16 = next(
        iter(
            DaliLoader(
                split_of(mixed),
                data,
                spec_for(data, dtype=torch.bfloat16, channels_last=True),
                batch_size=8,
                train=False,
                seed=0,
            )
        )
    ).inputs
    assert bf16.dtype == torch.bfloat16 and bf16.is_contiguous(memory_format=torch.channels_last)
    assert torch.allclose(bf16.float(), fp32, atol=0.02)  # bf16 keeps 8 bits of mantissa


@needs_dali
def test_grayscale_output_has_one_channel(mixed):
    data = DataConfig(image_size=16, channels=1)
    for train in (True, False):
        loader = DaliLoader(
            split_of(mixed), data, spec_for(data, channels_last=True), batch_size=4, train=train, seed=0
        )
        assert next(iter(loader)).inputs.shape == (4, 1, 16, 16)


@needs_dali
def test_float_targets_are_gathered_alongside(mixed):
    data = DataConfig(image_size=16)
    targets = [[float(i), -float(i)] for i in range(len(mixed))]
    loader = DaliLoader(split_of(mixed, targets), data, spec_for(data), batch_size=10, train=False, seed=0)
    t = epoch(loader)[1]
    assert t.dtype == torch.float32 and t.shape == (23, 2) and t[:, 0].tolist() == list(range(23))


@needs_dali
def test_bad_files_are_skipped_with_a_warning(tmp_path, mixed, caplog):
    empty, text, cut = tmp_path / "empty.jpg", tmp_path / "text.png", tmp_path / "cut.jpg"
    empty.write_bytes(b"")
    text.write_text("not an image")
    cut.write_bytes(Path(mixed[0]).read_bytes()[:300])
    paths = [mixed[0], str(empty), mixed[1], str(text), mixed[2], str(cut)]
    data = DataConfig(image_size=16)
    with caplog.at_level(logging.WARNING, logger="fasttrain.data.dali"):
        loader = DaliLoader(split_of(paths), data, spec_for(data), batch_size=2, train=False, seed=0)
    for bad in (empty, text, cut):
        assert any(str(bad) in r.getMessage() for r in caplog.records), bad
    assert loader.num_samples == 3 and [p for p, _ in loader.skipped] == [str(empty), str(text), str(cut)]
    assert epoch(loader)[1].tolist() == [0, 2, 4]  # the surviving files keep their own labels


@needs_dali
@pytest.mark.parametrize("train", [True, False])
def test_a_loader_over_the_dataset_index_reads_its_view_without_listing_it(tmp_path, mixed, train):
    """DALI serves the index's compact view as it is (a path made per sample read), with the same batches and
    skipped files as from a list: one the index's verdicts refuse, one that fails to decode while feeding."""
    root = tmp_path / "data"
    for k, path in enumerate(mixed[:12]):
        folder = root / "train" / f"c{k % 2}"
        folder.mkdir(parents=True, exist_ok=True)
        (folder / Path(path).name).write_bytes(Path(path).read_bytes())
    badfiles.write_text(root / "train" / "c0" / "text.jpg")  # refused by the index's header verdict
    badfiles.write_corrupt_mid_stream_jpeg(root / "train" / "c1" / "cut.jpg")  # passes it, refused when read
    data = DataConfig(root=str(root), image_size=16, crop_scale_min=0.3, val_fraction=0.0)
    split = load_or_build(data).index.source().train
    assert isinstance(split.paths, IndexedPaths) and len(split) == 14
    view = Split(split.name, UnlistedPaths(split.paths.table, split.paths.ids), split.targets)
    listed = Split(split.name, [split.paths[i] for i in range(len(split))], split.targets)
    runs = []
    for s in (view, listed):
        loader = DaliLoader(s, data, spec_for(data), batch_size=4, train=train, seed=3)
        runs.append((epoch(loader, 1), loader.skipped))
        loader.close()
    (got, got_skipped), (want, want_skipped) = runs
    assert torch.equal(got[1], want[1]) and torch.equal(got[2], want[2])
    assert got_skipped == want_skipped and sorted(Path(p).name for p, _ in got_skipped) == ["cut.jpg", "text.jpg"]


@pytest.fixture(scope="module")
def awkward(tmp_path_factory) -> list[str]:
    """Valid files whose pixels depend on conversion rules: transparent PNG, CMYK JPEG, 16-bit PNG, plus a plain
    JPEG and PNG."""
    return badfiles.write_corpus(tmp_path_factory.mktemp("awkward"), bad={})[0]


@needs_dali
@pytest.mark.parametrize("channels", [3, 1])
def test_transparent_cmyk_and_16bit_files_decode_as_on_every_other_backend(awkward, channels):
    """One rule everywhere: a transparent PNG is composited on white (DALI used to drop alpha: black)."""
    data = DataConfig(image_size=32, channels=channels)
    spec = spec_for(data)
    loader = DaliLoader(split_of(awkward), data, spec, batch_size=4, train=False, seed=0)
    x = epoch(loader)[2]
    ref = torch_reference(awkward, data, spec)
    err = (x - ref).abs()
    assert err.flatten(1).mean(1).max() < PARITY_MEAN_ABS and err.max() < PARITY_MAX_ABS
    transparent = x[[Path(p).name for p in awkward].index("transparent.png")]
    white = (1 - torch.tensor(spec.mean)) / torch.tensor(spec.std)
    assert torch.allclose(transparent[:, 25:, :6], white.view(-1, 1, 1).expand(-1, 7, 6), atol=0.02)  # left half
    # Training crops too: the same windows and flips as the torch loader, on the same composited pixels.
    train = DaliLoader(split_of(awkward, name="train"), data, spec, batch_size=2, train=True, seed=4)
    _, t_dali, x_dali = epoch(train, 1)
    _, t_torch, x_torch = torch_training_epoch(awkward, data, spec, batch_size=2, seed=4, epoch=1)
    assert t_dali.tolist() == t_torch.tolist()
    assert (x_dali - x_torch).abs().flatten(1).mean(1).max() < PARITY_MEAN_ABS


@needs_dali
@pytest.mark.parametrize("rrc", [True, False])
def test_training_batches_match_the_torch_loader(mixed, rrc):
    """Same order, same crop windows and flips per (seed, epoch, index): the pixels differ by resampling only."""
    data = DataConfig(image_size=32, crop_scale_min=0.2, random_resized_crop=rrc)
    spec = spec_for(data)
    dali = DaliLoader(split_of(mixed, name="train"), data, spec, batch_size=5, train=True, seed=3)
    for e in (0, 2):
        _, t_dali, x_dali = epoch(dali, e)
        _, t_torch, x_torch = torch_training_epoch(mixed, data, spec, batch_size=5, seed=3, epoch=e)
        assert t_dali.tolist() == t_torch.tolist()
        err = (x_dali - x_torch).abs()
        assert err.flatten(1).mean(1).max() < PARITY_MEAN_ABS, err.flatten(1).mean(1)  # measured 0.004
        assert err.max() < PARITY_MAX_ABS


@needs_dali
@pytest.mark.parametrize("train", [True, False])
def test_one_pipeline_serves_every_epoch(mixed, train):
    data = DataConfig(image_size=16, crop_scale_min=0.3)
    loader = DaliLoader(split_of(mixed), data, spec_for(data), batch_size=5, train=train, seed=9)
    sampler = EpochSampler(23, batch_size=5, shuffle=train, seed=9, drop_last=train)
    for e in range(4):
        sampler.epoch = e
        assert epoch(loader, e)[1].tolist() == sampler.indices()
    assert loader.builds == 1  # built once, at construction: no rebuild at an epoch boundary
    loader.close()


@needs_dali
def test_resuming_mid_epoch_gives_bit_identical_batches(mixed):
    """skip_batches(n): the batches after the skip are those of a full pass (augmentation is per sample), whatever
    the pipeline ran before, and the skip applies to one pass only."""
    data = DataConfig(image_size=16, crop_scale_min=0.3)

    def make():
        return DaliLoader(split_of(mixed, name="train"), data, spec_for(data), batch_size=4, train=True, seed=2)

    full = epoch(make(), 3)[0]
    resumed = make()
    resumed.set_epoch(3)
    resumed.skip_batches(2)
    tail = list(resumed)
    assert len(tail) == len(full) - 2
    for a, b in zip(tail, full[2:]):
        assert torch.equal(a.inputs, b.inputs) and torch.equal(a.targets, b.targets)
    assert all(torch.equal(a.inputs, b.inputs) for a, b in zip(epoch(resumed, 3)[0], full))
    # An epoch asked for out of turn, or after a pass abandoned halfway, is the same epoch.
    other = make()
    epoch(other, 7)
    it = iter(other)
    next(it)
    del it
    again = epoch(other, 3)[0]
    assert all(torch.equal(a.inputs, b.inputs) and torch.equal(a.targets, b.targets) for a, b in zip(again, full))
    assert other.builds == 1


def corrupt(folder: Path, n: int) -> list[str]:
    """PNGs that pass the pre-check (valid chunks, a zlib header) and fail in the decoder itself."""
    folder.mkdir(parents=True, exist_ok=True)
    return [str(badfiles.write_png_corrupt_deflate(folder / f"corrupt{i}.png")) for i in range(n)]


@needs_dali
@pytest.mark.parametrize("how", ["named", "probed"])
@pytest.mark.parametrize("train", [True, False])
def test_a_file_failing_inside_dali_is_skipped_and_the_epoch_goes_on(mixed, tmp_path, monkeypatch, how, train):
    if how == "probed":  # DALI's message names no sample: each sample of the batch is decoded alone
        from fasttrain.data import dali

        monkeypatch.setattr(dali, "_DECODE_FAILED", __import__("re").compile("never matches"))
    (bad,) = corrupt(tmp_path, 1)
    paths = mixed[:7] + [bad] + mixed[7:12]  # 13 files, the bad one at index 7
    data = DataConfig(image_size=16, crop_scale_min=0.3)
    loader = DaliLoader(
        split_of(paths, name="train" if train else "val"), data, spec_for(data), batch_size=4, train=train, seed=1
    )
    assert loader.skipped == []  # the pre-check cannot tell
    batches, targets, _ = epoch(loader, 0)
    assert [p for p, _ in loader.skipped] == [bad] and "DALI failed to decode it" in loader.skipped[0][1]
    assert 7 not in targets.tolist() and loader.builds == 2  # rebuilt once, the epoch carried on
    sampler = EpochSampler(13, batch_size=4, shuffle=train, seed=1, drop_last=train)
    expect = [i for i in sampler.indices() if i != 7]
    if train:  # every batch keeps its shape: the bad file's batch is topped up with one of its own samples
        assert [len(b) for b in batches] == [4, 4, 4]
        assert [i for i in dict.fromkeys(targets.tolist())] == expect
    else:
        assert targets.tolist() == expect and [len(b) for b in batches] == [4, 3, 4, 1]
    assert epoch(loader, 1)[1].tolist().count(7) == 0 and loader.builds == 2  # known now: never fed again


@needs_dali
@pytest.mark.parametrize(
    "message",
    ["CUDA allocation failed", "Can't allocate 1048576 bytes on device 0.", "CUDA runtime API error 2: out of memory"],
)
@pytest.mark.parametrize("where", ["batch", "probe"])
def test_a_device_failure_inside_dali_is_raised_and_blames_no_file(mixed, monkeypatch, message, where):
    """DALI's own allocator failing (its memory is outside torch's) is the device's fault: raised as it is, for
    autotune to read as out of memory, with no file probed (a batch-of-one pipeline would fail too, and blame a
    good file), skipped or counted against data.max_bad_per_epoch. ``probe``: the batch failed otherwise, and the
    device failed while its files were probed one by one. Either way the next passes are those of a loader that
    never failed (the pipeline rebuilt, its feeder rewound). The CPU twin: a pipeline's run feeds its files, then
    raises DALI's message from the second batch on, and every probe's does."""
    from fasttrain.memory import is_oom_error

    data = DataConfig(image_size=16, crop_scale_min=0.3)

    def make():
        return DaliLoader(split_of(mixed[:16], name="train"), data, spec_for(data), batch_size=4, train=True, seed=3)

    loader, fresh = make(), make()
    assert loader.builds == 1  # built at construction
    real_define = DaliLoader._define

    def failing(run, text, after=0):
        calls = [0]

        def fail(*args, **kwargs):
            out = run(*args, **kwargs)  # the files are fed, as when DALI fails inside its operators
            calls[0] += 1
            if calls[0] > after:
                raise RuntimeError(f"[DALI] Error in thread 0: {text}")
            return out

        return fail

    def full_define(self, *args, **kwargs):
        pipe = real_define(self, *args, **kwargs)
        pipe.run = failing(pipe.run, message)
        return pipe

    first = message if where == "batch" else "an operator failed"
    with monkeypatch.context() as full:
        full.setattr(loader._pipe, "run", failing(loader._pipe.run, first, after=1))
        full.setattr(DaliLoader, "_define", full_define)
        with pytest.raises(RuntimeError, match=message) as raised:
            epoch(loader, 0)
    assert is_oom_error(raised.value) and loader.skipped == []
    for e in (1, 2):
        got, want = epoch(loader, e), epoch(fresh, e)
        assert torch.equal(got[1], want[1]) and torch.equal(got[2], want[2]), e
    assert loader.builds == 2


@needs_dali
def test_a_training_batch_whose_files_all_fail_is_stood_in_for_so_every_process_takes_the_same_steps(mixed, tmp_path):
    """Under torchrun every process feeds its own shard and every step all-reduces: a process that dropped a batch
    (every file failing inside DALI) would leave the others waiting. Training keeps len(loader) batches."""
    sampler = EpochSampler(12, batch_size=3, shuffle=True, seed=1, drop_last=True)
    order = sampler.indices(0)
    doomed = set(order[3:6])  # the second batch of epoch 0
    bad = iter(corrupt(tmp_path, 3))
    paths = [next(bad) if i in doomed else mixed[i] for i in range(12)]
    data = DataConfig(image_size=16, crop_scale_min=0.3)
    loader = DaliLoader(split_of(paths, name="train"), data, spec_for(data), batch_size=3, train=True, seed=1)
    for e in (0, 1):  # epoch 0 meets the failures inside DALI; epoch 1 plans around the files known bad
        batches, targets, _ = epoch(loader, e)
        assert len(batches) == len(loader) == 4, e
        assert not doomed & set(targets.tolist())
    assert sorted(p for p, _ in loader.skipped) == sorted(paths[i] for i in doomed)
    loader.close()


@needs_dali
def test_a_training_batch_whose_files_vanished_is_stood_in_for_by_the_last_one(mixed, tmp_path):
    """Files that passed the pre-check and cannot be read when their batch comes (deleted, a lost mount)."""
    paths = []
    for i, src in enumerate(mixed[:12]):
        dst = tmp_path / f"{i:02d}{Path(src).suffix}"
        dst.write_bytes(Path(src).read_bytes())
        paths.append(str(dst))
    data = DataConfig(image_size=16)
    loader = DaliLoader(split_of(paths, name="train"), data, spec_for(data), batch_size=3, train=True, seed=1)
    order = loader.sampler.indices(0)
    for i in order[6:9]:  # the third batch of epoch 0
        Path(paths[i]).unlink()
    batches, targets, _ = epoch(loader, 0)
    assert len(batches) == len(loader) == 4
    assert [b.targets.tolist() for b in batches][2] == order[3:6]  # the batch before stood in
    assert sorted(p for p, _ in loader.skipped) == sorted(paths[i] for i in order[6:9])
    loader.close()


@needs_dali
def test_too_many_failures_in_one_epoch_stop_with_the_list(mixed, tmp_path):
    bad = corrupt(tmp_path, 3)
    data = DataConfig(image_size=16, max_bad_per_epoch=1)
    loader = DaliLoader(split_of(bad + mixed[:5]), data, spec_for(data), batch_size=8, train=False, seed=0)
    with pytest.raises(BadDataError, match="data.max_bad_per_epoch = 1") as err:
        epoch(loader)
    assert bad[0] in str(err.value) and bad[1] in str(err.value)
    loader.close()


@needs_dali
def test_a_training_set_that_never_decodes_is_refused(tmp_path):
    data = DataConfig(image_size=16)
    loader = DaliLoader(
        split_of(corrupt(tmp_path, 3), name="train"), data, spec_for(data), batch_size=2, train=True, seed=0
    )
    with pytest.raises(BadDataError, match="not one image of the train split"):
        epoch(loader, 0)


class Stop(Exception):
    pass


@needs_dali
def test_killed_mid_epoch_resumes_on_dali_with_the_same_weights(shapes_root, tmp_path, monkeypatch):
    """The engine resumes a DALI run mid-epoch with skip_batches: per-sample augmentation makes the resumed
    batches those of an uninterrupted run, so the final weights are bit-identical (CPU-only mode)."""
    from fasttrain.checkpoint import load_checkpoint
    from fasttrain.config import Config, apply_overrides
    from fasttrain.engine import train
    from fasttrain.tasks.classify import ClassifyTask

    def cfg(runs):
        return apply_overrides(
            Config(),
            [
                f"data.root={shapes_root}",
                "data.image_size=24",
                "data.loader=dali",
                "data.dali_threads=1",
                "data.max_samples=256",
                "model.name=smallcnn",
                "model.width=8",
                "model.dropout=0.2",
                "optim.name=adamw",
                "optim.lr=0.005",
                "train.epochs=1",
                "train.batch_size=32",
                "train.checkpoint_every_steps=2",
                f"train.runs_dir={runs}",
                "name=d",
            ],
        )

    straight = train(cfg(tmp_path / "a"), progress=False)
    assert straight.backend == "dali" and straight.history[0]["step"] == 8

    def die_at_step_5(self, state, batch, run_dir):
        if state.step == 5:
            raise Stop

    with monkeypatch.context() as m:
        m.setattr(ClassifyTask, "on_step_end", die_at_step_5)
        with pytest.raises(Stop):
            train(cfg(tmp_path / "b"), progress=False)
    (run,) = (tmp_path / "b").iterdir()
    assert load_checkpoint(run / "checkpoints" / "last.pt")["position"] == {"epoch": 0, "micro": 4}
    train(resume=run, progress=False)
    wa = load_checkpoint(straight.run_dir / "checkpoints" / "last.pt")["state"]["modules"]["model"]
    wb = load_checkpoint(run / "checkpoints" / "last.pt")["state"]["modules"]["model"]
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def write_stripes(root: Path, per_class: int, seed: int) -> tuple[list[str], list[int]]:
    """3 classes an augmentation cannot confuse (horizontal, vertical, checker stripes; random colours and
    periods; mixed sizes, JPEG and PNG). A layout mix-up (HWC read as CHW) scrambles orientation: no learning."""
    rng = np.random.default_rng(seed)
    paths, targets = [], []
    for k in range(3):
        for i in range(per_class):
            h, w = (int(v) for v in rng.integers(36, 64, 2))
            period = int(rng.integers(4, 9))
            yy, xx = np.mgrid[0:h, 0:w] // period
            band = (yy % 2, xx % 2, (yy + xx) % 2)[k]
            a = np.where(band[..., None] == 1, rng.integers(0, 256, 3), rng.integers(0, 256, 3)).astype(np.uint8)
            p = root / f"{k}_{i}.{'jpg' if i % 2 else 'png'}"
            Image.fromarray(a).save(p)
            paths.append(str(p))
            targets.append(k)
    return paths, targets


@needs_dali
def test_a_short_cpu_training_run_learns(tmp_path):
    train_files, train_targets = write_stripes(tmp_path, 40, seed=0)
    (tmp_path / "val").mkdir()
    val_files, val_targets = write_stripes(tmp_path / "val", 15, seed=1)
    data = DataConfig(image_size=32, crop_scale_min=0.35)
    spec = spec_for(data, channels_last=True)
    train = DaliLoader(Split("train", train_files, train_targets), data, spec, batch_size=16, train=True, seed=0)
    val = DaliLoader(Split("val", val_files, val_targets), data, spec, batch_size=64, train=False, seed=0)
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1),
        nn.BatchNorm2d(16),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(16, 32, 3, padding=1),
        nn.BatchNorm2d(32),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(32, 3),
    )
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    losses = []
    for e in range(8):
        train.set_epoch(e)
        total = 0.0
        for b in train:
            loss = nn.functional.cross_entropy(model(b.inputs), b.targets)
            opt.zero_grad()
            loss.backward()
            opt.step()
            total += loss.item()
        losses.append(total / len(train))
    model.eval()
    with torch.no_grad():
        correct = sum((model(b.inputs).argmax(1) == b.targets).sum().item() for b in val)
    assert losses[-1] < 0.6 * losses[0], losses  # measured: 1.18 -> 0.43
    assert correct / val.num_samples > 0.6  # chance is 1/3; measured 0.82


# -- GPU (mixed decode) ---------------------------------------------------------------------------------------


@needs_dali
@pytest.mark.gpu
def test_mixed_decode_matches_cpu_mode(mixed):
    data = DataConfig(image_size=32)
    gpu_spec = spec_for(data, dtype=torch.float16, channels_last=True, device="cuda:0")
    gpu = DaliLoader(split_of(mixed), data, gpu_spec, batch_size=8, train=False, seed=0, device_id=0)
    batches, targets, x = epoch(gpu)
    assert all(b.inputs.device.type == "cuda" and b.targets.device.type == "cuda" for b in batches)
    assert batches[0].inputs.dtype == torch.float16
    assert batches[0].inputs.is_contiguous(memory_format=torch.channels_last)
    assert targets.tolist() == list(range(23)) and [len(b) for b in batches] == [8, 8, 7]
    cpu = DaliLoader(split_of(mixed), data, spec_for(data), batch_size=8, train=False, seed=0)
    ref = epoch(cpu)[2]
    # jpeg_fancy_upsampling: chroma upsampled as libjpeg-turbo does; nvJPEG's IDCT still differs a little and
    # fp16 output rounds to ~0.002 (before it, 4:2:0 chroma needed 0.05 here).
    err = (x.float().cpu() - ref).abs()
    assert err.flatten(1).mean(1).max() < 0.03


@needs_dali
@pytest.mark.gpu
def test_mixed_decode_training_batches_bf16(mixed):
    data = DataConfig(image_size=32)
    spec = spec_for(data, dtype=torch.bfloat16, channels_last=True, device="cuda:0")

    def run(seed):
        loader = DaliLoader(split_of(mixed, name="train"), data, spec, batch_size=4, train=True, seed=seed, device_id=0)
        out = epoch(loader, 2)
        loader.close()
        return out

    batches, targets, x = run(3)
    assert len(batches) == 5 and all(len(b) == 4 for b in batches)
    assert x.dtype == torch.bfloat16 and x.device.type == "cuda"
    assert batches[0].inputs.is_contiguous(memory_format=torch.channels_last)
    assert x.float().abs().max() < 3.0  # normalized ImageNet statistics stay within about +-2.7
    assert run(3)[1].tolist() == targets.tolist()


@needs_dali
@pytest.mark.parametrize("device", ["cpu", "cuda:1"])
def test_gpu_decode_refuses_inputs_bound_for_another_device(mixed, device):
    """The GPU that decodes (device_id) is the one the batches are for: DALI's outputs are handed over on that
    device's stream, so inputs bound for the CPU or another GPU are refused before anything is built."""
    data = DataConfig(image_size=16)
    with pytest.raises(ValueError, match=rf"device_id=0 \(GPU decode\) but the inputs go to {device}"):
        DaliLoader(
            split_of(mixed[:4]), data, spec_for(data, device=device), batch_size=2, train=False, seed=0, device_id=0
        )
