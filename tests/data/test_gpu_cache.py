"""GPU-resident cache: fits arithmetic, exact eval pixels, epoch coverage, reproducible on-device augmentation."""

from __future__ import annotations

import logging
import math
import types

import numpy as np
import pytest
import torch
from PIL import Image

from fasttrain.config import Config, DataConfig, RuntimeConfig
from fasttrain.data import gpu_cache
from fasttrain.data.base import InputSpec, LoaderRequest, normalize_on_device
from fasttrain.data.decode import load_image
from fasttrain.data.gpu_cache import GpuCacheLoader, cache_bytes, cache_fits, random_resized_crop_theta
from fasttrain.data.samples import Samples
from fasttrain.data.sources import Split
from fasttrain.data.torch_loader import EpochSampler
from fasttrain.data.transforms import eval_transform
from fasttrain.numbers import GIB


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> list[str]:
    """23 files of mixed sizes and kinds (RGB/grayscale JPEG, RGB/RGBA PNG)."""
    folder = tmp_path_factory.mktemp("cache-images")
    rng = np.random.default_rng(0)
    paths = []
    for i in range(23):
        h, w = (int(v) for v in rng.integers(20, 70, 2))
        im = Image.fromarray((rng.random((h, w, 3)) * 255).astype(np.uint8))
        im = {0: im, 1: im.convert("L"), 2: im.convert("RGBA")}[i % 3]
        p = folder / f"{i:02d}.{'jpg' if i % 3 == 1 else 'png'}"
        im.save(p)
        paths.append(str(p))
    return paths


def spec_for(data: DataConfig, *, dtype=torch.float32, channels_last=False, device="cpu") -> InputSpec:
    mean, std = data.norm_mean_std()
    return InputSpec(torch.device(device), dtype, channels_last, tuple(mean), tuple(std))


def make(paths, data, spec=None, *, train, seed=0, batch_size=5, name=None) -> GpuCacheLoader:
    split = Split(name or ("train" if train else "val"), list(paths), list(range(len(paths))))
    request = LoaderRequest(Samples(split, "class"), train, batch_size)
    cfg = Config(data=data, runtime=RuntimeConfig(seed=seed))
    return gpu_cache.BACKEND.build(request, cfg, spec or spec_for(data))


def epoch(loader, e=None):
    if e is not None:
        loader.set_epoch(e)
    batches = list(loader)
    return batches, torch.cat([b.targets for b in batches]), torch.cat([b.inputs for b in batches])


# -- sizing ---------------------------------------------------------------------------------------------------


def test_cache_bytes_counts_uint8_pixels_and_labels():
    assert cache_bytes(50_000, DataConfig(image_size=32)) == 50_000 * (3 * 32 * 32 + 8)  # CIFAR-10: ~147 MiB
    assert cache_bytes(10, DataConfig(image_size=224, channels=1)) == 10 * (224 * 224 + 8)


def test_cache_fits_compares_with_the_budget_share_of_ram(monkeypatch):
    monkeypatch.setattr(gpu_cache, "_available_ram", lambda: 4 * GIB)
    data = DataConfig(image_size=32, cache_budget=0.25)  # budget: 1 GiB
    per_image = 3 * 32 * 32 + 8
    ok, why = cache_fits(GIB // per_image, data, "cpu")
    assert ok and "available RAM" in why and "<=" in why
    ok, why = cache_fits(GIB // per_image + 1, data, "cpu")
    assert not ok and ">" in why and "1.00 GiB" in why


def test_cache_fits_uses_total_device_memory_on_cuda(monkeypatch):
    props = types.SimpleNamespace(total_memory=80 * GIB, name="FakeGPU")
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device=None: props)
    ok, why = cache_fits(1_281_167, DataConfig(image_size=224), "cuda:0")  # ImageNet at 224: never
    assert not ok and "179.62 GiB >" in why
    ok, why = cache_fits(60_000, DataConfig(image_size=32), "cuda:0")  # CIFAR-10 train + test: 0.17 GiB
    assert ok and "FakeGPU" in why and "20.00 GiB" in why


# -- contents and order -----------------------------------------------------------------------------------------


def test_eval_batches_are_the_torch_eval_pixels_every_sample_once(images):
    data = DataConfig(image_size=24)
    spec = spec_for(data)
    loader = make(images, data, spec, train=False)
    assert len(loader) == 5 and loader.num_samples == 23
    for e in range(2):
        batches, targets, x = epoch(loader, e)
        assert [len(b) for b in batches] == [5, 5, 5, 5, 3]
        assert targets.tolist() == list(range(23))
    tf = eval_transform(data)
    ref = normalize_on_device(torch.stack([tf(load_image(p, 3)) for p in images]), spec)
    assert torch.equal(x, ref)  # the same code decoded them: validation matches the torch loader exactly


def test_training_order_drops_the_partial_batch_and_matches_the_torch_sampler(images):
    loader = make(images, DataConfig(image_size=16), train=True, seed=5)
    assert len(loader) == 4
    batches, t0, _ = epoch(loader, 0)
    assert [len(b) for b in batches] == [5] * 4 and len(set(t0.tolist())) == 20
    t1 = epoch(loader, 1)[1]
    assert t1.tolist() != t0.tolist()
    sampler = EpochSampler(23, batch_size=5, shuffle=True, seed=5, drop_last=True)
    sampler.epoch = 1
    assert t1.tolist() == sampler.indices()


@pytest.mark.parametrize("rrc", [True, False])
def test_augmentation_is_deterministic_per_seed_and_epoch(images, rrc):
    data = DataConfig(image_size=16, random_resized_crop=rrc, crop_scale_min=0.2)
    a, b, other = (make(images, data, train=True, seed=s) for s in (1, 1, 2))
    _, ta, xa = epoch(a, 3)
    _, tb, xb = epoch(b, 3)
    assert torch.equal(ta, tb) and torch.equal(xa, xb)
    assert torch.equal(epoch(a, 3)[2], xa)  # going back to an epoch replays it
    assert not torch.equal(epoch(a, 4)[2], xa)
    assert not torch.equal(epoch(other, 3)[2], xa)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("channels", [3, 1])
def test_shapes_dtypes_layout_and_range(images, dtype, channels):
    data = DataConfig(image_size=16, channels=channels)
    spec = spec_for(data, dtype=dtype, channels_last=True)
    x = next(iter(make(images, data, spec, train=True))).inputs
    assert x.shape == (5, channels, 16, 16) and x.dtype == dtype
    assert x.is_contiguous(memory_format=torch.channels_last)
    mean, std = data.norm_mean_std()
    lo = min((0 - m) / s for m, s in zip(mean, std))
    hi = max((1 - m) / s for m, s in zip(mean, std))
    assert lo - 0.02 <= x.float().min() and x.float().max() <= hi + 0.02


# -- the on-device random-resized-crop ---------------------------------------------------------------------------


def test_random_resized_crop_windows_follow_torchvision_ranges():
    theta = random_resized_crop_theta(0, 0, np.arange(4000), 0.08, True)
    sx, h, cx, cy = theta[:, 0, 0], theta[:, 1, 1], theta[:, 0, 2], theta[:, 1, 2]
    w = sx.abs()
    area, ratio = w * h, w / h
    assert theta[:, 0, 1].eq(0).all() and theta[:, 1, 0].eq(0).all()
    assert (area >= 0.08 - 1e-6).all() and (area <= 1 + 1e-6).all()
    assert (ratio >= 3 / 4 - 1e-5).all() and (ratio <= 4 / 3 + 1e-5).all()
    assert (cx.abs() + w <= 1 + 1e-6).all() and (cy.abs() + h <= 1 + 1e-6).all()  # inside the canvas
    assert 0.45 < (sx < 0).float().mean() < 0.55  # half flipped
    assert abs(area.mean().item() - (0.08 + 1) / 2) < 0.06  # area ~ uniform(0.08, 1), a little fewer big ones
    assert abs(torch.log(ratio).mean().item()) < 0.02  # log-uniform aspect, symmetric around 1


def test_full_scale_crop_is_the_canvas_and_flip_mirrors_it(images):
    data = DataConfig(image_size=16, crop_scale_min=1.0, hflip=False)  # area 1 fits only at aspect 1
    rrc = epoch(make(images, data, train=True), 0)[2]
    plain = epoch(
        make(images, DataConfig(image_size=16, random_resized_crop=False, resize_size=16, hflip=False), train=True), 0
    )[2]
    assert torch.allclose(rrc, plain, atol=1e-4)  # identity grid: exact pixel centres, same samples and order
    flipped = epoch(make(images, DataConfig(image_size=16, crop_scale_min=1.0), train=True), 0)[2]
    mirrored = torch.isclose(flipped, plain.flip(3), atol=1e-4).flatten(1).all(1)
    same = torch.isclose(flipped, plain, atol=1e-4).flatten(1).all(1)
    assert (mirrored | same).all() and mirrored.any() and same.any()


def test_translate_flip_is_torchvisions_reflect_padded_crop_then_flip():
    """The cache's shift (one gather of reflected indices) against torchvision's RandomCrop(padding, 'reflect')
    geometry, the torch loader's: pad, cut at the drawn offsets, then mirror; every offset in 0..2 pad is drawn."""
    from torchvision.transforms.v2 import functional as TF

    x = torch.randint(0, 256, (64, 3, 9, 7), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    for pad in (1, 2, 4):
        params = gpu_cache.translate_plan(3, 1, np.arange(64), pad, True)
        out = gpu_cache.translate_flip(x, params, pad)
        assert out.dtype == torch.uint8 and out.is_contiguous(memory_format=torch.channels_last)
        for i in range(64):
            flip, top, left = params[i].tolist()
            cut = TF.crop(TF.pad(x[i], [pad], padding_mode="reflect"), top, left, 9, 7)
            assert torch.equal(out[i], TF.horizontal_flip(cut) if flip else cut)
        assert params[:, 1:].min() == 0 and params[:, 1:].max() == 2 * pad
        assert 0.3 < params[:, 0].float().mean() < 0.7
    unflipped = gpu_cache.translate_plan(3, 1, np.arange(64), 2, False)
    flippable = gpu_cache.translate_plan(3, 1, np.arange(64), 2, True)
    assert not unflipped[:, 0].any() and torch.equal(unflipped[:, 1:], flippable[:, 1:])  # no flips, same shifts


def test_unreadable_files_are_skipped_with_a_warning(images, tmp_path, caplog):
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"\xff\xd8\xff garbage")
    paths = [images[0], str(bad), images[1]]
    with caplog.at_level(logging.WARNING, logger="fasttrain.data.gpu_cache"):
        loader = make(paths, DataConfig(image_size=16), train=False)
    assert any(str(bad) in r.getMessage() for r in caplog.records)
    assert loader.num_samples == 2 and epoch(loader)[1].tolist() == [0, 2]
    assert [p for p, _ in loader.skipped] == [str(bad)]


def test_batch_larger_than_the_training_split_is_refused(images):
    with pytest.raises(
        ValueError, match=r"^train.batch_size: the train split has 3 usable images, fewer than one batch"
    ):
        make(images[:3], DataConfig(image_size=16), train=True, batch_size=4)


# -- CUDA ---------------------------------------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize("aug", ["rrc", "translate"])
def test_cuda_cache_steps_never_sync_with_the_host(images, aug):
    data = DataConfig(image_size=32, crop_scale_min=0.25)
    if aug == "translate":
        data = DataConfig(image_size=32, random_resized_crop=False, translate=2)
    spec = spec_for(data, dtype=torch.bfloat16, channels_last=True, device="cuda")
    loader = make(images, data, spec, train=True, seed=3)
    assert loader.images.device.type == "cuda" and loader.images.dtype == torch.uint8
    loader.set_epoch(1)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")  # any hidden .item() / pageable copy / sync raises
    try:
        batches = list(loader)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    x = torch.cat([b.inputs for b in batches])
    assert x.device.type == "cuda" and x.dtype == torch.bfloat16 and math.isfinite(x.float().abs().max().item())
    assert batches[0].inputs.is_contiguous(memory_format=torch.channels_last)
    again = torch.cat([b.inputs for b in epoch(make(images, data, spec, train=True, seed=3), 1)[0]])
    assert torch.equal(x, again)


# -- a user's own map-style dataset -------------------------------------------------------------------------------


class Tiles(torch.utils.data.Dataset):
    """A user's dataset: C x 8 x 8 image tensors (uint8, or model-ready floats) and int labels; None marks items
    it cannot give, and ``odd`` yields one of another shape."""

    def __init__(self, n, *, dtype=torch.uint8, missing=(), odd=None):
        g = torch.Generator().manual_seed(0)
        self.x = torch.randint(0, 256, (n, 3, 8, 8), generator=g).to(dtype)
        if dtype.is_floating_point:
            self.x = self.x / 255 - 0.5
        self.missing, self.odd = set(missing), odd

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        if i in self.missing:
            return None
        x = self.x[i] if i != self.odd else self.x[i, :, :4]
        return x, i % 5


def test_a_users_dataset_is_cached_and_served_as_the_torch_loader_serves_it():
    from fasttrain.data.torch_loader import TorchLoader

    ds, spec = Tiles(13), spec_for(DataConfig())
    for train in (False, True):
        cached = GpuCacheLoader.from_dataset(ds, spec, batch_size=4, train=train, seed=2)
        plain = TorchLoader(ds, spec, batch_size=4, train=train, seed=2, workers=0, epoch_keys=False)
        assert len(cached) == len(plain) == (3 if train else 4)
        got, ref = epoch(cached, 1), epoch(plain, 1)
        assert torch.equal(got[1], ref[1]) and got[1].dtype == torch.int64  # same order, labels as int64
        assert torch.equal(got[2], ref[2])  # uint8 normalized on the device, as the torch loader does


def test_a_float_dataset_is_taken_as_model_ready_and_cast():
    ds = Tiles(6, dtype=torch.float32)
    spec = spec_for(DataConfig(), dtype=torch.bfloat16, channels_last=True)
    loader = GpuCacheLoader.from_dataset(ds, spec, batch_size=6, train=False)
    (b,) = list(loader)
    assert b.inputs.dtype == torch.bfloat16 and b.inputs.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(b.inputs, ds.x.to(torch.bfloat16))


def test_items_a_dataset_cannot_give_are_listed_and_too_many_refuse_it():
    loader = GpuCacheLoader.from_dataset(
        Tiles(10, missing={0, 7}), spec_for(DataConfig()), batch_size=4, train=False, threads=2
    )
    assert loader.num_samples == 8 and loader.skipped == [
        ("Tiles[0]", "the dataset returned None for it"),
        ("Tiles[7]", "the dataset returned None for it"),
    ]
    assert loader.ids.tolist() == [1, 2, 3, 4, 5, 6, 8, 9] and epoch(loader)[1].tolist() == [1, 2, 3, 4, 0, 1, 3, 4]
    from fasttrain.data.checks import BadDataError

    with pytest.raises(BadDataError, match="max_bad_per_epoch = 1"):
        GpuCacheLoader.from_dataset(
            Tiles(10, missing={2, 5}), spec_for(DataConfig()), batch_size=4, train=False, max_bad=1
        )
    with pytest.raises(ValueError, match=r"Tiles\[3\]: shape \(3, 4, 8\).*one shape"):
        GpuCacheLoader.from_dataset(Tiles(10, odd=3), spec_for(DataConfig()), batch_size=4, train=False)


def test_evaluation_caches_only_its_shard_and_training_everything():
    spec = spec_for(DataConfig())
    shards = [
        GpuCacheLoader.from_dataset(Tiles(11), spec, batch_size=2, train=False, num_shards=3, shard_id=r)
        for r in range(3)
    ]
    assert [s.num_samples for s in shards] == [4, 4, 3] and shards[1].ids.tolist() == [1, 4, 7, 10]
    train = GpuCacheLoader.from_dataset(Tiles(11), spec, batch_size=2, train=True, num_shards=3, shard_id=1)
    assert train.num_samples == 11 and len(train) == 1  # 11 -> one global step of 2 x 3


def test_pair_targets_are_normalized_like_the_inputs():
    class Pairs(torch.utils.data.Dataset):
        def __len__(self):
            return 4

        def __getitem__(self, i):
            a = torch.full((3, 8, 8), 10 * i, dtype=torch.uint8)
            return a, 255 - a

    spec = spec_for(DataConfig(mean=[0.5] * 3, std=[0.5] * 3))
    (b,) = list(GpuCacheLoader.from_dataset(Pairs(), spec, batch_size=4, train=False, targets_are_images=True))
    assert torch.allclose(b.targets, -b.inputs) and b.targets.shape == (4, 3, 8, 8)


@pytest.mark.gpu
def test_cuda_pair_cache_steps_never_sync_and_match_the_cpu_twin():
    """The pair crop reads its offsets from the host's copy of the plan: no hidden sync on CUDA, and the same
    windows and flips as on the CPU."""
    from fasttrain.data.gpu_cache import PairCropFlip

    class Pairs(torch.utils.data.Dataset):
        def __init__(self):
            g = torch.Generator().manual_seed(0)
            self.a = torch.randint(0, 256, (12, 3, 20, 20), generator=g, dtype=torch.uint8)

        def __len__(self):
            return 12

        def __getitem__(self, i):
            return self.a[i], 255 - self.a[i]

    def loader(device, dtype):
        spec = spec_for(DataConfig(mean=[0.5] * 3, std=[0.5] * 3), dtype=dtype, channels_last=True, device=device)
        built = GpuCacheLoader.from_dataset(
            Pairs(),
            spec,
            batch_size=4,
            train=True,
            seed=1,
            targets_are_images=True,
            augment=PairCropFlip(size=16, load_size=20, flip=True),
        )
        built.set_epoch(2)
        return built

    cpu = list(loader("cpu", torch.float32))
    on_cuda = loader("cuda", torch.bfloat16)  # the build's one copy to the device waits, as it must
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")  # the steps: any hidden .item() / pageable copy / sync raises
    try:
        gpu = list(on_cuda)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert len(gpu) == len(cpu) == 3
    for g, c in zip(gpu, cpu):
        assert g.inputs.is_cuda and g.inputs.is_contiguous(memory_format=torch.channels_last)
        assert torch.allclose(g.inputs.float().cpu(), c.inputs, atol=0.01)
        assert torch.allclose(g.targets.float().cpu(), c.targets, atol=0.01)


def test_the_cache_opens_each_file_once_and_decodes_what_the_torch_loader_does(images, monkeypatch):
    from fasttrain.data import checks, decode

    opened: list[str] = []
    for module in (checks, decode):
        real = module.open_regular
        monkeypatch.setattr(module, "open_regular", lambda p, real=real: opened.append(str(p)) or real(p))
    data = DataConfig(image_size=32, resize_size=32, workers=2)
    loader = make(images, data, train=False, batch_size=23)
    assert sorted(opened) == sorted(images)  # validated and decoded from one read each (it was two)
    monkeypatch.undo()
    (x,) = [b.inputs for b in loader]
    expected = torch.stack([eval_transform(data)(load_image(p, 3)) for p in images])
    assert torch.equal(x, normalize_on_device(expected, spec_for(data)))


def test_the_cache_decodes_on_every_core_when_workers_is_auto(monkeypatch):
    monkeypatch.setattr(gpu_cache.os, "sched_getaffinity", lambda pid: {0, 1}, raising=False)
    assert gpu_cache.cache_threads(DataConfig()) == 2  # data.workers' auto is 1 on 2 cores: processes, not threads
    assert gpu_cache.cache_threads(DataConfig(workers=0)) == 1
    assert gpu_cache.cache_threads(DataConfig(workers=3)) == 3


def test_an_image_already_in_the_target_mode_is_not_copied(images, monkeypatch):
    copies = []
    real = Image.Image.copy
    monkeypatch.setattr(Image.Image, "copy", lambda self: copies.append(1) or real(self))
    rgb = images[0]  # an RGB PNG
    im = load_image(rgb, 3)
    assert im.mode == "RGB" and copies == []
    assert np.asarray(im).shape[2] == 3 and np.asarray(im).sum() > 0  # the pixels outlive the closed file


class _Timed(torch.utils.data.Dataset):
    """Items that take ``seconds`` each outside the GIL (a sleep, like Pillow's C decode of a large image), and
    the threads that made them; item 5 cannot be given."""

    def __init__(self, n: int, seconds: float):
        self.n, self.seconds, self.threads = n, seconds, set()

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int):
        import threading
        import time

        self.threads.add(threading.get_ident())
        time.sleep(self.seconds)
        return None if i == 5 else (torch.full((1, 2, 2), i % 256, dtype=torch.uint8), i)


@pytest.mark.parametrize("seconds, threaded", [(0.0, False), (0.003, True)])
def test_the_cache_build_takes_threads_only_where_items_are_slow_enough_to_gain(seconds, threaded):
    import threading

    from fasttrain.data.checks import BadFiles

    n = gpu_cache.PROBE_ITEMS + 40
    ds = _Timed(n, seconds)
    x, y, rows = gpu_cache._decode_rows(ds, list(range(n)), 2, BadFiles([], 10))
    assert rows == [r for r in range(n) if r != 5] and y.tolist() == rows  # order kept, the bad item out
    assert x[:, 0, 0, 0].tolist() == [r % 256 for r in rows]
    assert (ds.threads != {threading.get_ident()}) == threaded


class _Small(torch.utils.data.Dataset):
    """Quick items (GIL-bound, like a CIFAR JPEG's decode) naming the process that made them in their target;
    item 5 cannot be given, item 9 is a file the dataset skips, item ``odd`` (if any) has another shape."""

    def __init__(self, n: int, odd: int = -1, tensor_targets: bool = True):
        self.n, self.odd, self.tensor_targets = n, odd, tensor_targets

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int):
        import os

        from fasttrain.data.samples import Skip

        if i == 5:
            return None
        if i == 9:
            return Skip(f"img{i}.jpg", "truncated JPEG")
        x = torch.full((1, 2, 3 if i == self.odd else 2), i % 256, dtype=torch.uint8)
        return x, (torch.tensor([i, os.getpid()]) if self.tensor_targets else i)


@pytest.mark.parametrize("tensor_targets", [True, False])
def test_a_cache_build_of_quick_items_goes_to_worker_processes_with_the_one_thread_result(monkeypatch, tensor_targets):
    """Small images decode in a few hundred microseconds of GIL-bound Python: threads only contend, so a build that
    would take one thread over PROCESSES_FROM_S forks workers (60,000 CIFAR JPEGs: ~15 s on one thread). The result
    is the one thread's: the same rows in order, the same skips with their reasons."""
    import os

    from fasttrain.data.checks import BadFiles

    n = gpu_cache.PROBE_ITEMS + 3 * gpu_cache.CHUNK_ITEMS + 7
    ds = _Small(n, tensor_targets=tensor_targets)
    alone = BadFiles([], 10)
    x1, y1, rows1 = gpu_cache._decode_rows(ds, list(range(n)), 2, alone)  # below PROCESSES_FROM_S: in process
    monkeypatch.setattr(gpu_cache, "PROCESSES_FROM_S", 0.0)
    forked = BadFiles([], 10)
    x2, y2, rows2 = gpu_cache._decode_rows(ds, list(range(n)), 2, forked, processes=2)
    assert rows1 == rows2 == [r for r in range(n) if r not in (5, 9)]
    assert torch.equal(x1, x2) and x2[:, 0, 0, 0].tolist() == [r % 256 for r in rows2]
    assert (
        alone.skipped
        == forked.skipped
        == [("_Small[5]", "the dataset returned None for it"), ("img9.jpg", "truncated JPEG")]
    )
    if tensor_targets:
        assert torch.equal(y1[:, 0], y2[:, 0]) and y2[:, 0].tolist() == rows2
        assert set(y1[:, 1].tolist()) == {os.getpid()}
        workers = set(y2[gpu_cache.PROBE_ITEMS + 2 :, 1].tolist())  # past the timed first chunk: in the workers
        assert len(workers) == 2 and os.getpid() not in workers
    else:
        assert torch.equal(y1, y2) and y2.tolist() == rows2
    # One process asked for, or a platform without fork: in process, as before.
    ds_one = _Small(n)
    _, y3, _ = gpu_cache._decode_rows(ds_one, list(range(n)), 2, BadFiles([], 10), processes=1)
    assert set(y3[:, 1].tolist()) == {os.getpid()}
    monkeypatch.setattr(gpu_cache, "_can_fork", lambda: False)
    _, y4, _ = gpu_cache._decode_rows(ds_one, list(range(n)), 2, BadFiles([], 10), processes=2)
    assert set(y4[:, 1].tolist()) == {os.getpid()}


def test_an_item_of_another_shape_in_a_worker_process_is_named_as_in_process(monkeypatch):
    from fasttrain.data.checks import BadFiles

    monkeypatch.setattr(gpu_cache, "PROCESSES_FROM_S", 0.0)
    n = gpu_cache.PROBE_ITEMS + 2 * gpu_cache.CHUNK_ITEMS
    odd = n - 10  # decoded by a worker
    with pytest.raises(ValueError, match=rf"_Small\[{odd}\]: shape \(1, 2, 3\).*one shape"):
        gpu_cache._decode_rows(_Small(n, odd=odd), list(range(n)), 2, BadFiles([], 10), processes=2)


def test_the_cache_build_shares_the_cores_between_the_ranks_of_a_node(monkeypatch):
    monkeypatch.setattr(gpu_cache.os, "sched_getaffinity", lambda pid: set(range(32)), raising=False)
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    assert gpu_cache.cache_processes(DataConfig()) == 16  # at most 16
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "8")
    assert gpu_cache.cache_processes(DataConfig()) == 4  # 8 ranks decode at once: 4 cores each
    assert gpu_cache.cache_processes(DataConfig(workers=0)) == 0  # asked for none: the build stays in process
    assert gpu_cache.cache_processes(DataConfig(workers=3)) == 3


def test_worker_processes_leave_the_global_generator_as_a_build_in_process_does(monkeypatch):
    """Whether the build forks is a timing decision (the probe's seconds per item); the model is initialized from
    torch's global generator after the loaders are built, so forking must not draw from it (a DataLoader's
    iterator draws its workers' base seed from it unless the loader has its own generator)."""
    from fasttrain.data.checks import BadFiles

    n = gpu_cache.PROBE_ITEMS + 2 * gpu_cache.CHUNK_ITEMS
    monkeypatch.setattr(gpu_cache, "PROCESSES_FROM_S", 0.0)
    after = []
    for processes in (1, 2):  # one: in process; two: forked workers (the test above checks which)
        torch.manual_seed(0)
        gpu_cache._decode_rows(_Small(n), list(range(n)), 2, BadFiles([], 10), processes=processes)
        after.append(torch.rand(4))
    assert torch.equal(after[0], after[1])


def test_the_cache_build_forks_only_as_many_workers_as_shared_memory_holds_chunks_for(monkeypatch):
    """Each worker's stacked chunks wait in /dev/shm (64 MiB in a container by default): workers whose chunks do
    not fit failed the whole build (``unable to allocate shared memory``) that one thread decodes."""
    import os
    from types import SimpleNamespace

    from fasttrain.data.checks import BadFiles

    monkeypatch.setattr(gpu_cache, "PROCESSES_FROM_S", 0.0)
    n = gpu_cache.PROBE_ITEMS + 3 * gpu_cache.CHUNK_ITEMS
    chunk = gpu_cache.CHUNK_ITEMS * (4 + 2 * 8)  # _Small's 1x2x2 uint8 image and two int64 targets
    real = os.statvfs

    def shm(free: int):
        return lambda path: SimpleNamespace(f_bavail=free, f_frsize=1) if path == gpu_cache.SHM_DIR else real(path)

    monkeypatch.setattr(gpu_cache.os, "statvfs", shm(4 * chunk))  # not 2 x 2 chunks queued + 1 being copied
    _, y, _ = gpu_cache._decode_rows(_Small(n), list(range(n)), 2, BadFiles([], 10), processes=2)
    assert set(y[:, 1].tolist()) == {os.getpid()}  # in process
    monkeypatch.setattr(gpu_cache.os, "statvfs", shm(5 * chunk))
    _, y, _ = gpu_cache._decode_rows(_Small(n), list(range(n)), 2, BadFiles([], 10), processes=2)
    assert len(set(y[gpu_cache.PROBE_ITEMS + 2 :, 1].tolist()) - {os.getpid()}) == 2  # two workers
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")  # two ranks building at once share it
    _, y, _ = gpu_cache._decode_rows(_Small(n), list(range(n)), 2, BadFiles([], 10), processes=2)
    assert set(y[:, 1].tolist()) == {os.getpid()}
    assert gpu_cache._shm_processes(16, chunk) == 0 and gpu_cache._shm_processes(1, 1) == 1


def test_a_cache_build_in_a_daemonic_process_stays_in_process(monkeypatch):
    """A daemonic process (a multiprocessing pool's worker training a config) may start no children: the DataLoader
    raised 'daemonic processes are not allowed to have children' where one thread decodes the cache."""
    import multiprocessing
    import os

    from fasttrain.data.checks import BadFiles

    monkeypatch.setattr(gpu_cache, "PROCESSES_FROM_S", 0.0)
    monkeypatch.setattr(multiprocessing.current_process(), "daemon", True)
    n = gpu_cache.PROBE_ITEMS + 2 * gpu_cache.CHUNK_ITEMS
    _, y, rows = gpu_cache._decode_rows(_Small(n), list(range(n)), 2, BadFiles([], 10), processes=2)
    assert set(y[:, 1].tolist()) == {os.getpid()} and rows == [r for r in range(n) if r not in (5, 9)]


class _SkipsLate(_Small):
    """_Small with a None and a skipped file among the rows the workers decode (past the timed first chunk)."""

    late = (gpu_cache.PROBE_ITEMS + 40, gpu_cache.PROBE_ITEMS + gpu_cache.CHUNK_ITEMS + 3)

    def __getitem__(self, i: int):
        from fasttrain.data.samples import Skip

        if i == self.late[0]:
            return None
        if i == self.late[1]:
            return Skip(f"img{i}.jpg", "cannot be decoded", refused=True)
        return super().__getitem__(i)


def test_skips_met_in_a_worker_process_are_listed_in_order_as_in_process(monkeypatch):
    from fasttrain.data.checks import BadFiles

    n = gpu_cache.PROBE_ITEMS + 3 * gpu_cache.CHUNK_ITEMS
    ds = _SkipsLate(n, tensor_targets=False)
    alone = BadFiles([], 10)
    x1, y1, rows1 = gpu_cache._decode_rows(ds, list(range(n)), 2, alone)
    monkeypatch.setattr(gpu_cache, "PROCESSES_FROM_S", 0.0)
    forked = BadFiles([], 10)
    x2, y2, rows2 = gpu_cache._decode_rows(ds, list(range(n)), 2, forked, processes=2)
    gone = (5, 9, *_SkipsLate.late)
    assert rows1 == rows2 == [r for r in range(n) if r not in gone] and y2.tolist() == rows2
    assert torch.equal(x1, x2) and torch.equal(y1, y2)
    assert alone.skipped == forked.skipped and [p for p, _ in forked.skipped][2:] == [
        f"_SkipsLate[{_SkipsLate.late[0]}]",
        f"img{_SkipsLate.late[1]}.jpg",
    ]
