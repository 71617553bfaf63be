import dataclasses
import logging
import math
import tracemalloc
from pathlib import Path

import badfiles
import numpy as np
import pytest
import torch
from PIL import Image
from unlisted import UnlistedPaths

from fasttrain.checkpoint import load_checkpoint
from fasttrain.config import Config, ConfigError, apply_overrides
from fasttrain.data.dali import dali_status
from fasttrain.data.index import IndexedPaths, load_or_build
from fasttrain.data.sources import Split, discover
from fasttrain.data.synthetic import make_drawing_dataset
from fasttrain.data.vectors import Vectors
from fasttrain.engine import train
from fasttrain.prediction import predict
from fasttrain.runtime import Runtime
from fasttrain.tasks.regress import RegressTask, scale_targets, target_range

needs_dali = pytest.mark.skipif(not dali_status()[0], reason=dali_status()[1])
BACKENDS = ["torch", "cache", pytest.param("dali", marks=needs_dali)]
# Resampling tolerance of DALI against Pillow on the normalized scale, as for classification (tests/test_dali.py):
# one grey level is ~0.008 here (std 0.5), and the antialiased linear filters differ by a few levels at edges.
PARITY_MEAN_ABS = 0.02
PARITY_MAX_ABS = 0.5


def drawing_cfg(root, runs, *extra):
    return apply_overrides(
        Config(),
        [
            f"data.root={root}",
            "data.format=drawing",
            "data.image_size=32",
            "data.channels=1",
            "data.mean=[0.5]",
            "data.std=[0.5]",
            "data.workers=0",
            "data.val_fraction=0.2",
            "model.name=convnet",
            "model.width=8",
            "task.name=regress",
            "optim.name=adamw",
            "optim.lr=0.005",
            "optim.weight_decay=0.0",
            "schedule.name=constant",
            "train.epochs=12",
            "train.batch_size=32",
            "train.log_every=5",
            f"train.runs_dir={runs}",
            "name=draw",
            *extra,
        ],
    )


@pytest.fixture(scope="module")
def drawing_root(tmp_path_factory):
    return make_drawing_dataset(tmp_path_factory.mktemp("data") / "drawing", sessions=80, steps=5, size=32)


@pytest.fixture(scope="module")
def trained(drawing_root, tmp_path_factory):
    return train(drawing_cfg(drawing_root, tmp_path_factory.mktemp("runs")), progress=False)


def mean_predictor_mse(root, cfg) -> float:
    src = discover(cfg.data, root)
    tr, va = torch.tensor(src.train.targets), torch.tensor(src.val.targets)
    return float(((va - tr.mean(0)) ** 2).mean())


def mean_predictor_point_px(root, cfg, size: int) -> float:
    src = discover(cfg.data, root)
    tr, va = torch.tensor(src.train.targets)[:, :2], torch.tensor(src.val.targets)[:, :2]
    return float(((va - tr.mean(0)) * size).norm(dim=1).mean())


def test_drawing_run_beats_the_mean_predictor(trained, drawing_root, tmp_path):
    h = trained.history
    baseline = mean_predictor_mse(drawing_root, drawing_cfg(drawing_root, tmp_path))
    assert h[-1]["val_loss"] < h[0]["val_loss"]
    assert trained.best_metric == "val_loss"
    print(f"val_loss {trained.best_value:.4f}, mean predictor {baseline:.4f}")
    # Grayscale canvases (as the workload reads them): the point is easy, the colour is read off a small
    # gray marker, so the margin over the mean predictor is mostly the point's (measured 0.66-0.71 x the baseline).
    assert trained.best_value < 0.8 * baseline, (trained.best_value, baseline)
    assert {"val_mse", "val_point_px", "val_color_err"} <= set(h[-1])
    # targets already lie in 0..1, so the loss and the MSE in target units agree
    assert h[-1]["val_mse"] == pytest.approx(h[-1]["val_loss"], rel=1e-5)
    assert h[-1]["val_point_px"] < 0.5 * mean_predictor_point_px(drawing_root, drawing_cfg(drawing_root, tmp_path), 32)


def test_checkpoint_loads_and_predicts_point_and_colour(trained, drawing_root):
    ckpt_path = trained.run_dir / "checkpoints" / "best.pt"
    meta = load_checkpoint(ckpt_path)["meta"]
    assert meta["target_names"] == ["x", "y", "r", "g", "b"]
    assert meta["target_low"] == [0.0] * 5 and meta["target_high"] == [1.0] * 5
    canvas = drawing_root / "session_0000" / "step_0002.png"
    recs = predict(ckpt_path, [canvas, drawing_root / "nope.png"], device="cpu")
    rec = recs[0]
    assert rec["image"] == str(canvas)
    assert len(rec["point"]) == 2 and rec["color"].startswith("#") and len(rec["color"]) == 7
    assert "error" in recs[1]

    # predict() must reproduce the evaluation: its point error over the val split is the best epoch's.
    val = discover(drawing_cfg(drawing_root, "unused").data, drawing_root).val
    recs = predict(ckpt_path, val.paths, device="cpu")
    err = [math.dist(r["point"], (t[0] * 32, t[1] * 32)) for r, t in zip(recs, val.targets)]
    best = next(h for h in trained.history if h["val_loss"] == trained.best_value)
    assert sum(err) / len(err) == pytest.approx(best["val_point_px"], abs=0.1)  # predict rounds to 0.1 px


@pytest.mark.parametrize("backend", BACKENDS)
def test_unreadable_images_are_skipped_named_and_not_fatal(tmp_path, caplog, backend):
    root = make_drawing_dataset(tmp_path / "d", sessions=2, steps=4, size=16)
    cfg = apply_overrides(
        Config(),
        [
            "data.format=drawing",
            "data.image_size=16",
            "data.workers=0",
            "data.val_fraction=0",
            "data.dali_threads=1",
            "model.name=convnet",
            "model.width=4",
            "task.name=regress",
        ],
    )
    src = discover(cfg.data, root)
    cut, corrupt = src.train.paths[1], src.train.paths[4]
    Path(cut).write_bytes(b"\x89PNG\r\n\x1a\n broken after discovery")  # the shared pre-check catches it
    badfiles.write_png_corrupt_deflate(Path(corrupt))  # passes the pre-check, fails in the decoder
    task = RegressTask(cfg, Runtime(cfg.runtime), src)
    loader = task.make_loader(src.train, train=False, batch_size=64, backend=backend)
    with caplog.at_level(logging.WARNING):
        batches = list(loader)
    loader.close()
    assert sum(len(b) for b in batches) == len(src.train) - 2
    assert sorted(p for p, _ in loader.skipped) == sorted([cut, corrupt])  # named in loader.skipped (the run's list)
    assert cut in caplog.text and corrupt in caplog.text
    x, y = batches[0].inputs, batches[0].targets
    assert x.shape[1:] == (3, 16, 16) and x.dtype == task.runtime.precision.input_dtype  # the model's input dtype
    assert y.shape[1] == 5 + 2 and torch.all(y[:, 5:] == 16)  # targets, then the canvas width and height


# -- the same batches on every backend ---------------------------------------------------------------------------


def write_manifest(root: Path, n: int = 14) -> Path:
    """JPEG and PNG photos-like images of mixed sizes; targets in their own units (scaled by the task)."""
    rng = np.random.default_rng(3)
    rows = ["path,age,height"]
    root.mkdir(parents=True)
    for i in range(n):
        h, w = (int(v) for v in rng.integers(20, 60, 2))
        base = (rng.random((max(2, h // 8), max(2, w // 8), 3)) * 255).astype(np.uint8)
        im = Image.fromarray(base).resize((w, h), Image.BICUBIC)
        name = f"{i}.{'jpg' if i % 2 else 'png'}"
        im.save(root / name, **({"quality": 92} if i % 2 else {}))
        rows.append(f"{name},{20 + i},{150 + 3 * i}")
    (root / "labels.csv").write_text("\n".join(rows) + "\n")
    return root


@pytest.fixture(scope="module")
def parity_data(tmp_path_factory):
    base = tmp_path_factory.mktemp("regress-parity")
    return {
        "drawing": make_drawing_dataset(base / "drawing", sessions=4, steps=4, size=(40, 30)),
        "manifest": write_manifest(base / "manifest"),
    }


def regress_task(root: Path, fmt: str, channels: int):
    cfg = apply_overrides(
        Config(),
        [
            f"data.root={root}",
            f"data.format={fmt}",
            "data.image_size=24",
            f"data.channels={channels}",
            "data.workers=0",
            "data.dali_threads=1",
            "data.val_fraction=0",
            "model.name=convnet",
            "task.name=regress",
        ],
    )
    src = discover(cfg.data)
    return RegressTask(cfg, Runtime(cfg.runtime), src), src


def whole_epoch(loader, epoch: int):
    loader.set_epoch(epoch)
    batches = list(loader)
    loader.close()
    return [len(b) for b in batches], torch.cat([b.inputs for b in batches]), torch.cat([b.targets for b in batches])


@pytest.mark.parametrize("backend", ["cache", pytest.param("dali", marks=needs_dali)])
@pytest.mark.parametrize("train", [False, True])
@pytest.mark.parametrize("fmt,channels", [("drawing", 1), ("manifest", 3)])
def test_every_backend_gives_the_torch_loaders_batches(parity_data, backend, train, fmt, channels):
    """The whole image resized square, nothing cropped or flipped, in the same order with the same scaled targets
    and image sizes: the cache holds the torch loader's pixels exactly; DALI's resize differs by resampling."""
    task, src = regress_task(parity_data[fmt], fmt, channels)
    sizes, x_ref, y_ref = whole_epoch(task.make_loader(src.train, train=train, batch_size=4, backend="torch"), 2)
    got_sizes, x, y = whole_epoch(task.make_loader(src.train, train=train, batch_size=4, backend=backend), 2)
    assert got_sizes == sizes and torch.equal(y, y_ref)
    if fmt == "manifest":
        assert y[:, :2].min() >= 0 and y[:, :2].max() <= 1 and y[:, 2:].max() > 20  # scaled, then width, height
    if backend == "cache":
        assert torch.equal(x, x_ref)
    else:
        err = (x - x_ref).abs()
        assert err.flatten(1).mean(1).max() < PARITY_MEAN_ABS and err.max() < PARITY_MAX_ABS


def indexed_train(task: RegressTask) -> Split:
    """The training split from the dataset index, its paths a view that cannot be listed."""
    split = load_or_build(task.cfg.data).index.source().train
    assert isinstance(split.paths, IndexedPaths) and isinstance(split.targets, Vectors)
    return Split(split.name, UnlistedPaths(split.paths.table, split.paths.ids), split.targets)


@pytest.mark.parametrize("backend", ["torch", "cache", pytest.param("dali", marks=needs_dali)])
def test_the_dataset_index_s_view_is_served_as_it_is_on_every_backend(parity_data, backend):
    """From the dataset index a split is a view (a path made per access, the targets one array): the task scales
    the targets as one array and keeps the view, and each backend gives the batches of the listed split."""
    listed_task, listed = regress_task(parity_data["manifest"], "manifest", 3)
    split = indexed_train(listed_task)
    src = dataclasses.replace(listed, train=split)
    task = RegressTask(listed_task.cfg, Runtime(listed_task.cfg.runtime), src)
    assert (task.low, task.high) == (listed_task.low, listed_task.high)
    samples = task.samples(split)
    assert samples.split.paths is split.paths and isinstance(samples.split.targets, Vectors)
    want = whole_epoch(listed_task.make_loader(listed.train, train=True, batch_size=4, backend=backend), 1)
    got = whole_epoch(task.make_loader(split, train=True, batch_size=4, backend=backend), 1)
    assert got[0] == want[0] and torch.equal(got[1], want[1]) and torch.equal(got[2], want[2])


def test_scaling_an_indexed_split_adds_its_float32_targets_not_a_list_per_sample(parity_data):
    task, _ = regress_task(parity_data["manifest"], "manifest", 3)
    small = indexed_train(task)
    rows = np.tile(np.arange(len(small)), 300)  # ~4,000 samples over the same files
    split = small.subset(rows.tolist())
    tracemalloc.start()
    low, high = target_range(split.targets)
    scaled = scale_targets(split, low, high)
    held, _ = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert scaled.paths is split.paths and np.asarray(scaled.targets).dtype == np.float32
    assert held / len(split) < 2 * 4 + 4, held / len(split)  # the scaled array (2 float32 a sample) and change
    expect = (np.asarray(split.targets) - low) / (np.asarray(high) - low)
    np.testing.assert_allclose(np.asarray(scaled.targets), expect, rtol=1e-6)


def test_manifest_targets_outside_0_1_are_scaled_and_come_back_in_their_units(tmp_path):
    from PIL import Image

    rows = ["path,age,height"]
    for i in range(12):
        Image.new("L", (12, 12), i * 20).save(tmp_path / f"{i}.png")
        rows.append(f"{i}.png,{20 + i},{150 + 3 * i}")
    (tmp_path / "labels.csv").write_text("\n".join(rows) + "\n")
    cfg = apply_overrides(
        Config(),
        [
            f"data.root={tmp_path}",
            "data.format=manifest",
            "data.channels=1",
            "data.image_size=12",
            "data.workers=0",
            "model.name=mlp",
            "model.width=4",
            "task.name=regress",
        ],
    )
    src = discover(cfg.data, tmp_path)
    task = RegressTask(cfg, Runtime(cfg.runtime), src)
    assert task.low[0] >= 20 and task.high[0] <= 31
    state = task.build_state()
    batch = next(iter(task.make_loader(src.train, train=False, batch_size=4, backend="torch")))
    assert 0 <= float(batch.targets[:, :2].min()) and float(batch.targets[:, :2].max()) <= 1
    with torch.no_grad():
        sums = task.eval_step(state, batch)
    assert float(sums["mse"]) > float(sums["loss"])  # MSE in years / cm, loss in scaled units
    desc = task.describe_prediction(torch.zeros(2), task.checkpoint_meta())
    assert set(desc) == {"age", "height"}
    assert desc["age"] == pytest.approx((task.low[0] + task.high[0]) / 2)  # sigmoid(0) = mid-range


def test_target_range():
    assert target_range([[0.2, 1.0], [0.0, 0.5]]) == ([0.0, 0.0], [1.0, 1.0])
    assert target_range([[2.0, 5.0], [4.0, 5.0]]) == ([2.0, 5.0], [4.0, 6.0])  # constant column: unit span


def test_regress_needs_numeric_targets(shapes_root):
    cfg = apply_overrides(Config(), [f"data.root={shapes_root}", "task.name=regress"])
    with pytest.raises(ConfigError, match="task.name: regress needs numeric targets"):
        RegressTask(cfg, Runtime(cfg.runtime), discover(cfg.data))


def test_synthetic_batch_runs_a_train_step(drawing_root):
    cfg = drawing_cfg(drawing_root, "unused", "model.num_outputs=5")
    task = RegressTask(cfg, Runtime(cfg.runtime), None)
    state = task.build_state()
    batch = task.synthetic_batch(4, task.input_spec())
    out = task.train_step(state, batch)
    assert out["loss"].ndim == 0 and torch.isfinite(out["loss"])
