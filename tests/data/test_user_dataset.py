"""Your own dataset from Python: train(cfg, dataset=..., val_dataset=...), and autotune / bench on it."""

from __future__ import annotations

import pytest
import torch
from torch.utils.data import Dataset, IterableDataset

from fasttrain import autotune, bench, load_config, train
from fasttrain.config import ConfigError
from fasttrain.data.base import normalize_on_device
from fasttrain.data.user import dataset_source
from fasttrain.prepare import prepare


class Bars(Dataset):
    """16 x 16 uint8 images: a bright horizontal (class 0) or vertical (class 1) bar at a random row / column.

    ``jitter``: a random one-pixel shift per read (a dataset with its own random transform); ``broken``: items
    that raise; ``missing``: items that come back as None."""

    classes = ["horizontal", "vertical"]

    def __init__(self, n: int, seed: int = 0, *, jitter: bool = False, broken=(), missing=(), dtype=torch.uint8):
        g = torch.Generator().manual_seed(seed)
        self.labels = torch.randint(0, 2, (n,), generator=g).tolist()
        self.pos = torch.randint(2, 14, (n,), generator=g).tolist()
        self.jitter, self.broken, self.missing, self.dtype = jitter, set(broken), set(missing), dtype

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int):
        if i in self.broken:
            raise OSError(f"cannot identify image file 'img_{i}.jpg'")
        if i in self.missing:
            return None
        x = torch.full((3, 16, 16), 30, dtype=torch.uint8)
        p, label = self.pos[i], self.labels[i]
        if label == 0:
            x[:, p - 1 : p + 1, :] = 220
        else:
            x[:, :, p - 1 : p + 1] = 220
        if self.jitter:
            x = x.roll(int(torch.randint(-1, 2, ())), dims=1 + label)
        if self.dtype != torch.uint8:
            x = (x.float() / 255 - 0.5) / 0.25  # "model-ready": normalized by the user's own transform
        return x, label


def config(tmp_path, *extra: str):
    return load_config(
        "quickstart",
        [
            f"train.runs_dir={tmp_path / 'runs'}",
            "runtime.device=cpu",
            "runtime.compile=off",
            "train.batch_size=32",
            "data.workers=0",
            *extra,
        ],
    )


def test_a_fixed_dataset_is_cached_trains_and_resumes_only_with_the_dataset_again(tmp_path):
    cfg = config(tmp_path, "train.epochs=2")
    result = train(cfg, dataset=Bars(320), val_dataset=Bars(96, seed=1), progress=False)
    assert result.backend == "cache"  # fixed items that fit: kept decoded, no per-step host work
    assert result.best_value is not None and result.best_value > 0.9  # the bars are easy: it learned them
    saved = load_config(result.run_dir / "config.toml")
    assert saved.data.root == "python:Bars" and saved.data.image_size == 16 and saved.model.num_outputs == 2
    with pytest.raises(ConfigError, match="dataset given from Python"):
        train(resume=result.run_dir, overrides=["train.epochs=3"], progress=False)
    more = train(
        resume=result.run_dir,
        overrides=["train.epochs=3"],
        dataset=Bars(320),
        val_dataset=Bars(96, seed=1),
        progress=False,
    )
    assert [r["epoch"] for r in more.history] == [1, 2, 3]


def test_a_dataset_with_random_transforms_goes_through_the_torch_loader_and_bad_items_are_skipped(tmp_path):
    cfg = config(tmp_path, "train.epochs=1", "data.val_fraction=0.2")
    ds = Bars(200, jitter=True, broken={3, 150}, missing={40})
    result = train(cfg, dataset=ds, progress=False)
    assert result.backend == "torch"  # caching would freeze one draw of the jitter per item
    # Named in the user's own indexing (held-out items too), with the dataset's own error.
    skipped = dict(result.skipped)
    assert skipped["dataset[3]"] == "cannot be read (OSError: cannot identify image file 'img_3.jpg')"
    assert "img_150.jpg" in skipped["dataset[150]"]
    assert skipped["dataset[40]"] == "the dataset returned None"
    assert len(result.history) == 1 and result.history[0]["val_acc"] >= 0


def test_items_reach_the_model_normalized_once_uint8_by_fasttrain_float_as_given(tmp_path):
    for dtype in (torch.uint8, torch.float32):
        ds = Bars(12, dtype=dtype)
        for backend in ("torch", "cache"):
            prep = prepare(
                config(tmp_path, f"data.loader={backend}", "data.val_fraction=0"), dataset=ds, val_dataset=ds
            )
            loader = prep.task.make_loader(prep.source.val, train=False, batch_size=5, backend=prep.backend)
            x = torch.cat([b.inputs for b in loader])
            items = torch.stack([ds[i][0] for i in range(len(ds))])
            spec = prep.task.input_spec()
            want = normalize_on_device(items, spec) if dtype == torch.uint8 else items.to(spec.dtype)  # as given
            torch.testing.assert_close(x, want, msg=f"{dtype} via {backend}")
            loader.close()


def test_a_wrong_dataset_is_refused_with_what_is_wrong(tmp_path):
    cfg = config(tmp_path)

    class Stream(IterableDataset):
        def __iter__(self):
            yield torch.zeros(3, 8, 8, dtype=torch.uint8), 0

    class Wide(Bars):
        def __getitem__(self, i):
            return torch.zeros(3, 16, 24, dtype=torch.uint8), 0

    class ChannelsLast(Bars):
        def __getitem__(self, i):
            return torch.zeros(16, 16, 3, dtype=torch.uint8), 0

    class Nameless(Bars):
        classes = None

    class Labels(Bars):
        def __getitem__(self, i):
            return super().__getitem__(i)[0], "cat"

    class Pictures(Bars):
        def __getitem__(self, i):
            from PIL import Image

            return Image.new("RGB", (16, 16)), 0

    with pytest.raises(TypeError, match="map-style dataset"):
        dataset_source(cfg, Stream())
    with pytest.raises(TypeError, match=r"got Image \(\).*PILToTensor"):
        dataset_source(cfg, Pictures(4))
    with pytest.raises(ValueError, match=r"dataset\[0\]: image \(3, 16, 24\) is not square"):
        dataset_source(cfg, Wide(4))
    with pytest.raises(ValueError, match=r"dataset\[0\]: image \(16, 16, 3\) looks like H x W x C; .* C x H x W"):
        dataset_source(cfg, ChannelsLast(4))
    with pytest.raises(ConfigError, match="model.num_outputs"):
        dataset_source(cfg, Nameless(4))
    assert dataset_source(config(tmp_path, "model.num_outputs=2"), Nameless(4))[1].class_names == ["0", "1"]
    with pytest.raises(TypeError, match="int class index"):
        dataset_source(cfg, Labels(4))

    class Photos(Bars):  # an ImageFolder with PILToTensor and no Resize: it failed in torch.stack
        def __getitem__(self, i):
            return torch.zeros(3, 16, 16 if i < 5 else 12, dtype=torch.uint8), 0

    with pytest.raises(
        ValueError, match=r"dataset\[5\]: image 3 x 16 x 12, where dataset\[0\] is 3 x 16 x 16: .*Resize"
    ):
        dataset_source(cfg, Photos(8))
    with pytest.raises(ValueError, match=r"val_dataset\[5\]: image 3 x 16 x 12, where val_dataset\[0\] is 3 x 16 x 16"):
        dataset_source(cfg, Bars(8), Photos(8))

    class Larger(Bars):  # validated at another resolution than trained: as before, allowed
        def __getitem__(self, i):
            return torch.zeros(3, 24, 24, dtype=torch.uint8), 0

    assert dataset_source(cfg, Bars(8), Larger(8))[1].val is not None

    class NumpyLabels(Bars):
        def __getitem__(self, i):
            import numpy as np

            x, label = super().__getitem__(i)
            return x, np.int64(label)

    assert dataset_source(cfg, NumpyLabels(4))[1].class_names == ["horizontal", "vertical"]
    for loader in ("torch", "cache"):  # and they batch as ints do
        np_cfg = config(tmp_path / loader, f"data.loader={loader}", "train.max_steps=2", "train.epochs=1")
        assert train(np_cfg, dataset=NumpyLabels(80), progress=False).history[0]["val_acc"] >= 0
    with pytest.raises(ValueError, match="none of the first 4 items could be read .*img_0.jpg"):
        dataset_source(cfg, Bars(4, broken={0, 1, 2, 3}))
    with pytest.raises(ConfigError, match="data.loader: DALI reads files"):
        dataset_source(config(tmp_path, "data.loader=dali"), Bars(4))
    with pytest.raises(ConfigError, match="task.name"):
        dataset_source(load_config("pix2pix"), Bars(4))
    with pytest.raises(ConfigError, match="train.batch_size: 64 is larger than the usable training set"):
        train(config(tmp_path, "train.batch_size=64", "data.loader=torch"), dataset=Bars(40), progress=False)
    assert not (tmp_path / "runs").exists()  # refused before a run folder was made


def test_bench_and_autotune_take_the_dataset_and_model_too(tmp_path, monkeypatch):
    from torch import nn

    from fasttrain.tuning import probe
    from fasttrain.tuning.search import Agreement

    cfg = config(tmp_path, "bench.warmup_steps=1", "bench.steps=2", "bench.repeats=1")
    model = nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 2)
    )
    report = bench(cfg, dataset=Bars(128), model=model)
    assert report.end_to_end.samples_per_s > 0
    tuned = autotune(cfg, dataset=Bars(128), model=model, time_budget_s=4, out_dir=tmp_path / "tune")
    # What autotune guarantees on a machine of any load: an answer and a tuned config, never a failure on noise;
    # when the figures disagree beyond the noise, the reason it is less sure, and no cache entry.
    assert tuned.ok and tuned.model == "custom" and tuned.input_shape == [3, 16, 16]
    assert (tmp_path / "tune" / f"{cfg.name}.tuned.toml").is_file()
    assert not tuned.cached and tuned.cache_path in (None, "")
    assert any("not cached" in n for n in tuned.notes)
    # A busy machine, made certain: every verification disagrees with its probe, unexplained.
    busy = Agreement("disagrees", False, False, "neither", "verification -8% vs the probe: unexplained")
    monkeypatch.setattr(probe, "judge_verification", lambda **kw: busy)
    # A long job: the CPU time cap (half the training tuned) would skip the verification of a short one. This
    # net steps at ~24,000 samples/s here: 1,000 epochs of its 96 training samples made a cap of ~2.3 s, under
    # the 4 s budget, spent before the verification ('cap-spent', reliable: failed in a full run); 100,000
    # epochs cap at minutes.
    long_job = config(tmp_path, "bench.warmup_steps=1", "bench.steps=2", "bench.repeats=1", "train.epochs=100000")
    noisy = autotune(long_job, dataset=Bars(128), model=model, time_budget_s=4, out_dir=tmp_path / "busy")
    assert noisy.ok and (tmp_path / "busy" / f"{cfg.name}.tuned.toml").is_file()
    assert noisy.cpu_cap_s is None and not noisy.shortcut, noisy.notes  # the verification ran
    assert not noisy.reliable and busy.text in noisy.unreliable  # the reason it is less sure
    assert noisy.chosen_batch == noisy.given_batch  # a change it could not confirm is not written


class Edges(Dataset):
    """8 x 8 grayscale uint8 images, like scikit-learn's digits: class k is a bright 2-pixel band along edge k on
    noise (what tells the classes apart lies outside the image's centre)."""

    classes = ["top", "bottom", "left", "right"]

    def __init__(self, n: int, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        self.labels = torch.randint(0, 4, (n,), generator=g).tolist()
        self.images = torch.randint(0, 90, (n, 1, 8, 8), generator=g, dtype=torch.uint8)
        for img, k in zip(self.images, self.labels):
            band = [img[:, :2], img[:, 6:], img[:, :, :2], img[:, :, 6:]][k]
            band += 150

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int):
        return self.images[i], self.labels[i]


def test_sizes_taken_from_the_dataset_reach_the_run_config_and_predict_on_files(tmp_path):
    from PIL import Image

    from fasttrain import predict

    # The quickstart's resize_size = 32 would make predict resize an 8 px file to 32 and centre-crop 8 of it.
    cfg = config(tmp_path, "train.epochs=3", "data.val_fraction=0")
    ds = Edges(256)
    result = train(cfg, dataset=ds, val_dataset=Edges(64, seed=1), progress=False)
    assert result.best_value is not None and result.best_value > 0.9
    saved = load_config(result.run_dir / "config.toml")
    assert (saved.data.channels, saved.data.image_size, saved.data.resize_size) == (1, 8, 8)
    test = Edges(24, seed=2)
    files = []
    for i in range(len(test)):
        files.append(tmp_path / f"{i}.png")
        Image.fromarray(test[i][0][0].numpy(), mode="L").save(files[-1])
    records = predict(result.run_dir, [str(f) for f in files], device="cpu")
    right = sum(r["class"] == Edges.classes[test[i][1]] for i, r in enumerate(records))
    assert right >= 22, records  # what the run learned from, predict reproduces


def test_predict_on_files_warns_when_the_run_learned_from_float_items(tmp_path, caplog):
    """Float items (ToTensor and a Normalize of one's own) reach the model as given; predict on image files
    normalizes with data.mean / data.std, which the model never saw: it agreed 0.50 where validation said 0.85."""
    import logging

    from PIL import Image

    from fasttrain import predict

    image = tmp_path / "bar.png"
    Image.fromarray(Bars(1)[0][0].permute(1, 2, 0).numpy()).save(image)
    for dtype, warned in ((torch.float32, True), (torch.uint8, False)):
        cfg = config(tmp_path / str(dtype), "train.epochs=1", "train.max_steps=1")
        run = train(cfg, dataset=Bars(64, dtype=dtype), progress=False).run_dir
        caplog.clear()
        with caplog.at_level(logging.WARNING):
            predict(run, [str(image)], device="cpu")
        assert ("learned from float images of a dataset given from Python" in caplog.text) == warned, dtype
