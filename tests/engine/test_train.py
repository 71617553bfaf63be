import json
import logging
import math
import time

import pytest
import torch
from PIL import Image

from fasttrain.checkpoint import load_checkpoint
from fasttrain.cli import main
from fasttrain.config import Config, apply_overrides, load_config
from fasttrain.engine import train


def small_cfg(root, runs, *extra):
    return apply_overrides(
        Config(),
        [
            f"data.root={root}",
            "data.image_size=32",
            "data.resize_size=32",
            "data.random_resized_crop=false",
            "data.loader=torch",
            "data.workers=0",
            "model.name=smallcnn",
            "model.width=16",
            "optim.name=adamw",
            "optim.lr=0.005",
            "optim.weight_decay=0.01",
            "schedule.name=onecycle",
            "train.epochs=3",
            "train.batch_size=32",
            "train.log_every=2",
            f"train.runs_dir={runs}",
            "name=t",
            *extra,
        ],
    )


def weights(run_dir, which="last"):
    return load_checkpoint(run_dir / "checkpoints" / f"{which}.pt")["state"]["modules"]["model"]


@pytest.fixture(scope="module")
def trained(shapes_root, tmp_path_factory):
    return train(small_cfg(shapes_root, tmp_path_factory.mktemp("runs"), "train.epochs=8"), progress=False)


def test_short_run_learns_and_writes_its_folder(trained, shapes_root):
    result = trained
    h = result.history
    assert len(h) == 8
    assert h[-1]["train_loss"] < h[0]["train_loss"] * 0.5  # the loss falls
    assert result.best_value > 0.7  # 3 classes: chance is 0.33
    d = result.run_dir
    for f in (
        "config.toml",
        "environment.json",
        "metrics.jsonl",
        "train.log",
        "checkpoints/last.pt",
        "checkpoints/best.pt",
    ):
        assert (d / f).is_file(), f
    records = [json.loads(x) for x in (d / "metrics.jsonl").read_text().splitlines()]
    lines = [r for r in records if "event" not in r]
    assert [r["epoch"] for r in lines] == list(range(1, 9))
    assert {"train_loss", "val_loss", "val_acc", "samples_per_s", "lr"} <= set(lines[0])
    steps = [r for r in records if r.get("event") == "step"]  # every train.log_every steps, marked as such
    every = load_config(d / "config.toml").train.log_every
    assert [r["step"] for r in steps] == list(range(every, h[-1]["step"] + 1, every))
    assert {"epoch", "loss", "acc", "lr", "samples_per_s"} <= set(steps[0])
    resolved = load_config(d / "config.toml")
    assert resolved.model.num_outputs == 3 and resolved.data.root == str(shapes_root)
    ckpt = load_checkpoint(d / "checkpoints" / "best.pt")
    assert ckpt["meta"]["class_names"] == ["circle", "square", "triangle"]
    assert ckpt["config"]["train"]["epochs"] == 8
    assert {"optimizers", "scalers", "schedulers", "epoch", "step"} <= set(ckpt["state"])
    assert {"python", "numpy", "torch"} <= set(ckpt["rng"])


def test_run_folders_are_never_reused(shapes_root, tmp_path):
    cfg = small_cfg(shapes_root, tmp_path, "train.epochs=1", "train.run_name=same", "train.max_steps=1")
    a = train(cfg, progress=False).run_dir
    b = train(cfg, progress=False).run_dir
    assert a.name == "same" and b.name == "same-2"
    assert (a / "metrics.jsonl").read_text().count("\n") == 3  # the first run's files are untouched: its start-up,
    # its one epoch and its end


def test_the_start_up_is_split_into_its_phases_in_the_log_and_the_metrics(shapes_root, tmp_path, monkeypatch):
    """Where a run's start went (on an H200 the CIFAR speed run's 29 s were mostly start-up): the process's start
    and imports, the index, the device, the rest of preparing, the loaders (a cache's decode), the model (a
    data-fitted first layer among it), the run folder. Each phase is timed by its own marks: a process started
    before train() counts as imports, a slow index as index, a slow loader as loaders, a slow fit as model.
    Measured against a run after a first one in the same process, which pays the imports a phase's first use
    brings."""
    from fasttrain import engine, prepare

    def startup(runs, started=None):
        cfg = small_cfg(shapes_root, tmp_path / runs, "train.epochs=1", "train.max_steps=1")
        run = train(cfg, progress=False, started=started)
        records = map(json.loads, (run.run_dir / "metrics.jsonl").read_text().splitlines())
        (event,) = [r for r in records if r.get("event") == "startup"]
        assert "start-up" in (run.run_dir / "train.log").read_text()
        return event

    startup("first")  # pays the imports
    warm = startup("warm")
    real_index, real_loader, real_fit = prepare.indexed_source, engine.Trainer._loader, engine._init_from_data

    def slow_index(*a, **kw):
        time.sleep(0.5)
        return real_index(*a, **kw)

    def slow_loader(self, *a, **kw):
        time.sleep(0.25)
        return real_loader(self, *a, **kw)

    def slow_fit(*a, **kw):
        time.sleep(1.0)
        return real_fit(*a, **kw)

    monkeypatch.setattr(prepare, "indexed_source", slow_index)
    monkeypatch.setattr(engine.Trainer, "_loader", slow_loader)
    monkeypatch.setattr(engine, "_init_from_data", slow_fit)
    started = time.perf_counter() - 0.5  # as if the process had started half a second before train()
    slow = startup("slow", started)
    phases = ("imports_s", "index_s", "device_s", "prepare_s", "loaders_s", "model_s", "open_s")
    assert warm["imports_s"] == 0  # train() called from Python: its start-up begins at the call
    assert 0.5 <= slow["imports_s"] < 1.5
    assert 0.45 <= slow["index_s"] - warm["index_s"] < 0.95
    assert 0.45 <= slow["loaders_s"] - warm["loaders_s"] < 0.95  # two loaders (train, val), 0.25 s each
    assert 0.9 <= slow["model_s"] - warm["model_s"] < 1.4
    assert slow["startup_s"] == pytest.approx(sum(slow[k] for k in phases), abs=0.01)
    assert (slow["epoch"], slow["step"]) == (0, 0)


class Stop(Exception):
    pass


def _straight_and_resumed(shapes_root, tmp_path, extra, kill_after):
    """(a straight run, the same run killed after epoch ``kill_after`` and resumed): their results."""
    straight = train(small_cfg(shapes_root, tmp_path / "a", *extra), progress=False)

    def kill(state, record):
        if record["epoch"] == kill_after:
            raise Stop

    with pytest.raises(Stop):
        train(small_cfg(shapes_root, tmp_path / "b", *extra), progress=False, on_epoch_end=kill)
    (run_b,) = (tmp_path / "b").iterdir()
    resumed = train(resume=run_b, progress=False)
    assert resumed.run_dir == run_b
    wa, wb = weights(straight.run_dir), weights(run_b)
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    return straight, resumed


@pytest.mark.parametrize("workers", [0, 1])
def test_resumed_run_ends_with_the_same_weights(shapes_root, tmp_path, workers):
    """Kill a run after epoch 2 of 3 (after its checkpoint), resume it: same final weights as one straight run."""
    extra = (f"data.workers={workers}", "model.dropout=0.2", "train.accumulation=2", "optim.grad_clip=1.0")
    straight, resumed = _straight_and_resumed(shapes_root, tmp_path, extra, kill_after=2)
    assert [r["epoch"] for r in resumed.history] == [1, 2, 3]
    assert resumed.history[-1]["val_loss"] == pytest.approx(straight.history[-1]["val_loss"], rel=1e-6)


def test_a_run_with_lookahead_resumed_before_its_first_pull_ends_with_the_same_weights(shapes_root, tmp_path):
    """Lookahead's slow copy starts as the weights before the first step; a checkpoint before its first pull (step 2
    of every 5) did not hold that start, and the resumed run pulled towards its own weights (72 tensors off)."""
    _straight_and_resumed(shapes_root, tmp_path, ("optim.lookahead_every=5", "train.max_steps=2", "model.width=8"), 1)


def test_resume_drops_metrics_written_after_the_checkpoint(shapes_root, tmp_path):
    cfg = small_cfg(shapes_root, tmp_path, "train.checkpoint_every=2", "train.epochs=3", "train.max_steps=1")

    def kill_after_three(state, record):
        if record["epoch"] == 3:
            raise Stop

    # epoch 3 is the last, so it is checkpointed: kill at epoch 3 of a 4-epoch run instead
    cfg = apply_overrides(cfg, ["train.epochs=4"])
    with pytest.raises(Stop):
        train(cfg, progress=False, on_epoch_end=kill_after_three)
    (run,) = tmp_path.iterdir()
    assert load_checkpoint(run / "checkpoints" / "last.pt")["state"]["epoch"] == 2
    result = train(resume=run, progress=False)
    records = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in records if "event" not in r] == [1, 2, 3, 4]  # epoch 3 trained again, recorded once
    steps = [r["step"] for r in records if r.get("event") == "step"]
    assert steps == sorted(set(steps))  # its step records too
    assert result.history[-1]["epoch"] == 4


def _odd_modes(folder):
    folder.mkdir(parents=True)
    rgb = Image.new("RGB", (20, 16), (200, 30, 30))
    rgb.convert("RGBA").save(folder / "rgba.png")
    rgb.convert("P").save(folder / "palette.png")
    p = rgb.convert("P")
    p.info["transparency"] = 0
    p.save(folder / "palette_t.png", transparency=0)
    rgb.convert("L").save(folder / "gray.png")
    rgb.convert("LA").save(folder / "gray_alpha.png")
    rgb.convert("CMYK").save(folder / "cmyk.jpg")
    rgb.convert("1").save(folder / "bits.png")
    Image.new("I;16", (20, 16), 40000).save(folder / "deep.png")
    (folder / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    (folder / "empty.png").write_bytes(b"")


@pytest.mark.parametrize("channels", [3, 1])
def test_odd_image_modes_are_converted_and_bad_files_skipped(tmp_path, channels, caplog):
    from fasttrain.data.decode import load_image

    _odd_modes(tmp_path / "train" / "a")
    _odd_modes(tmp_path / "train" / "b")
    for f in (tmp_path / "train" / "a").glob("*.png"):
        if f.stat().st_size and f.name != "empty.png":
            im = load_image(str(f), channels)
            assert im.mode == ("RGB" if channels == 3 else "L")
    assert load_image(str(tmp_path / "train" / "a" / "rgba.png"), 3).getpixel((0, 0)) == (200, 30, 30)
    assert load_image(str(tmp_path / "train" / "a" / "deep.png"), 1).getpixel((0, 0)) == round(40000 * 255 / 65535)
    mean = "[0.5]" if channels == 1 else "[0.5, 0.5, 0.5]"
    cfg = small_cfg(
        tmp_path,
        tmp_path / "runs",
        f"data.channels={channels}",
        f"data.mean={mean}",
        f"data.std={mean}",
        "data.val_fraction=0.3",
        "train.epochs=1",
        "train.batch_size=4",
    )
    result = train(cfg, progress=False)  # bad files in the tree: the run completes
    assert len(result.history) == 1 and math.isfinite(result.history[0]["train_loss"])
    assert math.isfinite(result.history[0]["val_loss"])

    # One evaluation pass over every file: each bad one is named once, every good one arrives.
    from fasttrain.data.base import InputSpec
    from fasttrain.data.sources import discover
    from fasttrain.data.torch_loader import ImageDataset, TorchLoader
    from fasttrain.data.transforms import eval_transform

    split = discover(apply_overrides(cfg, ["data.val_fraction=0"]).data).train
    spec = InputSpec(torch.device("cpu"), torch.float32, False, (0.5,) * channels, (0.5,) * channels)
    loader = TorchLoader(
        ImageDataset(split, eval_transform(cfg.data), channels, 0), spec, batch_size=4, train=False, seed=0, workers=0
    )
    caplog.clear()  # only this pass's records
    with caplog.at_level(logging.WARNING, logger="fasttrain"):
        batches = list(loader)
    bad = [p for p in split.paths if p.endswith(("broken.jpg", "empty.png"))]
    assert len(bad) == 4
    assert sum(len(b) for b in batches) == len(split) - len(bad)
    warned = [r.getMessage() for r in caplog.records]
    assert all(sum(p in w for w in warned) == 1 for p in bad)
    assert all(b.inputs.shape[1] == channels for b in batches)


def test_predict_prints_class_and_probability(trained, shapes_root, tmp_path, capsys):
    result = trained
    imgs = sorted((shapes_root / "val" / "square").iterdir())[:3]
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"nope")
    code = main(
        ["predict", str(result.run_dir / "checkpoints" / "best.pt"), *map(str, imgs), str(bad), "--device", "cpu"]
    )
    assert code == 1  # one image failed: the exit status says so, the others are still predicted
    captured = capsys.readouterr()
    assert str(bad) in captured.err
    out = captured.out.strip().splitlines()
    assert len(out) == 4
    assert all("class=" in line and "probability=" in line for line in out[:3])
    assert sum("class=square" in line for line in out[:3]) >= 2  # a trained model mostly gets it right
    assert out[3].startswith(str(bad)) and "error" in out[3]


def test_cli_reports_bad_settings_by_name(capsys, tmp_path):
    assert main(["train", "--set", "optim.lr=-2", "--set", f"train.runs_dir={tmp_path}"]) == 2
    assert "optim.lr: must be > 0" in capsys.readouterr().err
    assert main(["train", str(tmp_path / "nope.toml")]) == 2
    assert "nope.toml" in capsys.readouterr().err
    assert not any(tmp_path.iterdir())  # nothing was written


@pytest.mark.slow  # a full training run on real data
def test_real_digits_reach_high_accuracy(digits_root, tmp_path):
    """scikit-learn's 8x8 digits (real data from ../shared/data): a small conv net clearly learns them."""
    cfg = apply_overrides(
        Config(),
        [
            f"data.root={digits_root}",
            "data.channels=1",
            "data.mean=[0.5]",
            "data.std=[0.5]",
            "data.image_size=8",
            "data.resize_size=8",
            "data.random_resized_crop=false",
            "data.hflip=false",
            "data.loader=torch",
            "data.workers=0",
            "model.name=smallcnn",
            "model.width=16",
            "optim.name=adamw",
            "optim.lr=0.005",
            "optim.weight_decay=0.01",
            "train.epochs=6",
            "train.batch_size=64",
            f"train.runs_dir={tmp_path}",
        ],
    )
    result = train(cfg, progress=False)
    assert result.best_value > 0.85
    assert result.test_metrics["test_acc"] > 0.85  # the held-out test/ split, evaluated at the end


@pytest.mark.parametrize("loader", ["torch", "cache"])
def test_killed_mid_epoch_resumes_from_the_step_checkpoint(shapes_root, tmp_path, monkeypatch, loader):
    """checkpoint_every_steps: a run killed inside an epoch loses only the steps since its last checkpoint
    and, resumed, ends with the same weights as an uninterrupted run, and the same epoch records: the resumed
    epoch's train_loss / train_acc average all its steps (the checkpoint holds the running sums, including
    steps not yet logged). The torch loader skips the trained batches without decoding them; the cache loader
    draws and drops them (keeping its random stream)."""
    from fasttrain.tasks.classify import ClassifyTask

    extra = (
        "train.epochs=2",
        "train.checkpoint_every_steps=3",
        "model.dropout=0.2",
        "data.random_resized_crop=true",
        f"data.loader={loader}",
    )
    straight = train(small_cfg(shapes_root, tmp_path / "a", *extra), progress=False)
    steps_per_epoch = straight.history[0]["step"]
    assert steps_per_epoch > 11

    def die_at_step_11(self, state, batch, run_dir):
        if state.step == 11:
            raise Stop

    with monkeypatch.context() as m:
        m.setattr(ClassifyTask, "on_step_end", die_at_step_11)
        with pytest.raises(Stop):
            train(small_cfg(shapes_root, tmp_path / "b", *extra), progress=False)
    (run,) = (tmp_path / "b").iterdir()
    ckpt = load_checkpoint(run / "checkpoints" / "last.pt")
    # step 9 is between two logged steps (log_every 2): one step's values are not yet in the logged sums
    assert ckpt["state"]["step"] == 9 and ckpt["position"] == {"epoch": 0, "micro": 9}
    before = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["event"] for r in before] == ["startup"] + ["step"] * 5  # steps 2..10 logged, no epoch finished
    resumed = train(resume=run, progress=False)
    records = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    starts = [(r["epoch"], r["step"]) for r in records if r.get("event") == "startup"]
    assert starts == [(0, 0), (0, 9)]  # each start records its own, the resumed one at its checkpoint
    steps = [r["step"] for r in records if r.get("event") == "step"]
    assert steps == sorted(set(steps)) and 10 in steps  # step 10 was trained again, recorded once
    wa, wb = weights(straight.run_dir), weights(run)
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    assert [r["step"] for r in resumed.history] == [r["step"] for r in straight.history]
    for a, b in zip(straight.history, resumed.history):
        assert (a["train_loss"], a["train_acc"], a["val_loss"]) == (b["train_loss"], b["train_acc"], b["val_loss"])


@pytest.mark.gpu
@pytest.mark.parametrize("loader", ["torch", "cache", "dali"])
def test_cuda_run_with_amp_channels_last_compile(shapes_root, tmp_path, loader):
    """On a GPU the defaults turn on bf16/fp16 autocast, channels_last and torch.compile, for every backend."""
    if loader == "dali":
        pytest.importorskip("nvidia.dali")
    cfg = small_cfg(
        shapes_root,
        tmp_path,
        "runtime.device=cuda",
        "runtime.compile=auto",
        f"data.loader={loader}",
        "train.epochs=2",
        "data.workers=2",
    )
    result = train(cfg, progress=False)
    assert result.backend == loader
    env = json.loads((result.run_dir / "environment.json").read_text())
    assert env["gpu"] and env["cuda"]
    rec = result.history[-1]
    assert 0 < rec["max_memory_gib"] <= rec["max_reserved_gib"] and rec["samples_per_s"] > 0
    assert math.isfinite(rec["train_loss"]) and rec["train_loss"] < result.history[0]["train_loss"] * 1.5
    state = load_checkpoint(result.run_dir / "checkpoints" / "last.pt")["state"]["modules"]["model"]
    assert not any(k.startswith("_orig_mod.") for k in state)  # the uncompiled module is what is saved


def test_diverging_run_warns_about_non_finite_losses(shapes_root, tmp_path, caplog):
    cfg = small_cfg(
        shapes_root,
        tmp_path,
        "optim.name=sgd",
        "optim.lr=1e12",
        "optim.momentum=0.0",
        "train.epochs=1",
        "train.log_every=1",
        "schedule.name=constant",
        "train.max_nonfinite_logs=0",
    )
    with caplog.at_level(logging.WARNING, logger="fasttrain.engine"):
        train(cfg, progress=False)
    warnings = [r.getMessage() for r in caplog.records if "non-finite" in r.getMessage()]
    assert len(warnings) == 1  # once per epoch, not once per step


@pytest.mark.parametrize(
    "override, message",
    [
        ("model.name=resnet9000", "model.name: unknown model 'resnet9000'"),
        ("train.batch_size=4096", "train.batch_size: 4096 is larger than the usable training set"),
        ("model.num_outputs=1", "model.num_outputs: a classifier needs at least 2 classes"),
    ],
)
def test_what_cannot_train_is_refused_before_a_run_folder_exists(shapes_root, tmp_path, override, message):
    runs = tmp_path / "runs"
    with pytest.raises(ValueError, match=message):
        train(small_cfg(shapes_root, runs, override), progress=False)
    assert not runs.exists() or not any(runs.iterdir())


def test_the_runs_skipped_files_are_all_listed_and_check_data_offered_only_where_it_reads_the_layout(tmp_path, caplog):
    """The end of a run named 20 skipped files and sent the rest to `fasttrain check-data`, which does not read
    every layout (drawing sessions)."""
    import logging

    from fasttrain.engine import _log_skipped

    skipped = [(f"/d/s{i}/step_0001.json", "not valid JSON") for i in range(25)]
    with caplog.at_level(logging.WARNING):
        _log_skipped(skipped, tmp_path, "drawing")
    assert "25 files were skipped (unreadable or unusable):" in caplog.text and "check-data" not in caplog.text
    assert f"... and 5 more (all of them: {tmp_path / 'skipped.txt'})" in caplog.text
    assert (tmp_path / "skipped.txt").read_text().splitlines() == [f"{f}\t{why}" for f, why in skipped]
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        _log_skipped(skipped[:2], None, "folder")
    assert "`fasttrain check-data` on the data decodes every image" in caplog.text
