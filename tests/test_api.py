"""The Python API the README shows: from fasttrain import train, autotune, bench, predict, load_config."""

from __future__ import annotations

import subprocess
import sys

import fasttrain


def test_importing_the_package_imports_no_torch_and_initialises_nothing():
    code = (
        "import sys, fasttrain; from fasttrain import __version__; "
        "assert 'torch' not in sys.modules and 'nvidia.dali' not in sys.modules, sorted(sys.modules)"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=fasttrain.__path__[0] + "/..")


def test_entry_points_train_and_predict_from_python(shapes_root, tmp_path):
    from fasttrain import autotune, bench, load_config, predict, train

    cfg = load_config(
        "quickstart",
        [
            f"data.root={shapes_root}",
            f"train.runs_dir={tmp_path}",
            "train.epochs=1",
            "train.max_steps=2",
            "data.workers=0",
            "data.loader=torch",
        ],
    )
    assert cfg.name == "quickstart"  # a packaged name, resolved as the command line does
    result = train(cfg, progress=False)
    assert result.history[-1]["epoch"] == 1 and (result.run_dir / "train.log").stat().st_size > 0
    (record,) = predict(result.run_dir, [str(next(shapes_root.rglob("*.png")))], device="cpu")
    assert record["class"] in ("circle", "square", "triangle")
    # the verbs are functions, whichever module was imported first; their modules are nouns
    import fasttrain.benchmark
    import fasttrain.tuning

    assert bench is fasttrain.benchmark.bench and autotune is fasttrain.tuning.autotune
    assert fasttrain.bench is bench and fasttrain.autotune is autotune and fasttrain.predict is predict


def test_your_own_model_from_python_trains_resumes_and_predicts(shapes_root, tmp_path):
    import pytest
    import torch
    from torch import nn

    from fasttrain import load_config, predict, train

    class Tiny(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3, padding=1)
            self.head = nn.Linear(4, 3)

        def forward(self, x):
            return self.head(self.conv(x).relu().mean((2, 3)))

    cfg = load_config(
        "quickstart",
        [
            f"data.root={shapes_root}",
            f"train.runs_dir={tmp_path}",
            "train.epochs=1",
            "train.max_steps=2",
            "data.workers=0",
            "data.loader=torch",
        ],
    )
    torch.manual_seed(0)
    result = train(cfg, model=Tiny, progress=False)  # a factory; an instance works the same
    run = result.run_dir
    assert load_config(run / "config.toml").model.name == "custom"
    saved = torch.load(run / "checkpoints" / "last.pt", weights_only=True)["state"]["modules"]["model"]
    assert set(saved) == {"conv.weight", "conv.bias", "head.weight", "head.bias"}
    image = str(next(shapes_root.rglob("*.png")))
    (record,) = predict(run, [image], device="cpu", model=Tiny())
    assert record["class"] in ("circle", "square", "triangle")
    with pytest.raises(ValueError, match="model.name: custom means this run's model was passed from Python"):
        predict(run, [image], device="cpu")
    resumed = train(resume=run, overrides=["train.epochs=2"], model=Tiny, progress=False)
    assert [r["epoch"] for r in resumed.history] == [1, 2]


def test_a_model_whose_first_linear_layer_is_sized_by_its_input_trains_resumes_and_predicts(shapes_root, tmp_path):
    """nn.LazyLinear instead of a dummy forward pass: sized before channels_last, the optimizer and a checkpoint's
    load (it raised "uninitialized parameter" in the channels_last conversion); BatchNorm's statistics untouched."""
    import pytest
    import torch
    from torch import nn

    from fasttrain import load_config, predict, train

    class Flat(nn.Module):
        def __init__(self):
            super().__init__()
            self.features = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.MaxPool2d(2))
            self.fc = nn.LazyLinear(3)

        def forward(self, x):
            return self.fc(self.features(x).flatten(1))

    overrides = [f"data.root={shapes_root}", f"train.runs_dir={tmp_path}", "train.epochs=1", "train.max_steps=2"]
    cfg = load_config("quickstart", [*overrides, "data.workers=0", "data.loader=torch"])
    result = train(cfg, model=Flat, progress=False)
    saved = torch.load(result.run_dir / "checkpoints" / "last.pt", weights_only=True)["state"]["modules"]["model"]
    assert saved["fc.weight"].shape == (3, 4 * 15 * 15)  # 32 px -> conv 30 -> pool 15
    image = str(next(shapes_root.rglob("*.png")))
    (record,) = predict(result.run_dir, [image], device="cpu", model=Flat)
    assert record["class"] in ("circle", "square", "triangle")
    resumed = train(resume=result.run_dir, overrides=["train.epochs=2"], model=Flat, progress=False)
    assert [r["epoch"] for r in resumed.history] == [1, 2]

    from fasttrain.runtime import Runtime
    from fasttrain.tasks import make_task
    from fasttrain.tasks.base import check_given_model

    image = ((torch.zeros(1, 3, 32, 32),), "one image")
    fresh = Flat()
    sized = check_given_model(fresh, *image, lambda out: None)
    assert sized.training and int(sized.features[1].num_batches_tracked) == 0

    class Broken(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.LazyLinear(2)

        def forward(self, x):
            return self.fc(x.view(1, 5))  # not the input it is given

    task = make_task(cfg, Runtime(cfg.runtime), None, model=Broken)
    with pytest.raises(ValueError, match=r"2 zero 3 x 32 x 32 images \(data.channels, data.image_size\) raised"):
        task.given_model()


def test_a_task_whose_model_takes_other_inputs_sizes_its_lazy_layers_by_its_own_inputs(tmp_path):
    """A task of one's own whose model reads more than one image (an image and a vector here) says what sizes
    the lazy layers (Task.sizing_inputs); the default, one image, fails for that model and says so."""
    import pytest
    import torch
    from torch import nn

    from fasttrain import load_config
    from fasttrain.runtime import Runtime
    from fasttrain.tasks import make_task
    from fasttrain.tasks.classify import ClassifyTask

    class Two(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.LazyLinear(3)

        def forward(self, image, extra):
            return self.fc(torch.cat([image.mean((2, 3)), extra], 1))

    class WithVector(ClassifyTask):
        def sizing_inputs(self):
            return (torch.zeros(2, 3, 8, 8), torch.zeros(2, 5)), "2 images and 5-vectors"

    cfg = load_config("quickstart", [f"train.runs_dir={tmp_path}", "model.num_outputs=3"])
    sized = WithVector(cfg, Runtime(cfg.runtime), None, model=Two).given_model()
    assert sized.fc.weight.shape == (3, 3 + 5)
    with pytest.raises(ValueError, match=r"2 zero 3 x 32 x 32 images .* raised TypeError"):
        make_task(cfg, Runtime(cfg.runtime), None, model=Two).given_model()


def test_a_model_from_python_that_cannot_train_is_refused_in_one_line_before_a_run_folder(shapes_root, tmp_path):
    """Each of these failed inside the first step, after the run folder was made, with a traceback from torch or
    from the task's loss; one forward pass of one image now names what the task takes."""
    import pytest
    from torch import nn

    from fasttrain import load_config, train
    from fasttrain.runtime import Runtime
    from fasttrain.tasks import make_task

    class Net(nn.Module):
        def __init__(self, outputs=3, channels=3, returns="tensor"):
            super().__init__()
            self.conv, self.returns = nn.Conv2d(channels, 4, 3), returns
            self.fc = nn.Linear(4, outputs)

        def forward(self, x):
            logits = self.fc(self.conv(x).mean((2, 3)))
            if self.returns == "tuple":
                return logits, logits
            if self.returns == "dict":
                return {"logits": logits}
            return logits[:, :, None, None] if self.returns == "map" else logits

    cfg = load_config("quickstart", [f"data.root={shapes_root}", f"train.runs_dir={tmp_path}", "data.loader=torch"])
    from fasttrain.data.sources import discover

    source = discover(cfg.data)
    assert source.class_names == ["circle", "square", "triangle"]
    cases = [
        (Net(returns="tuple"), r"its forward returned a tuple; task classify takes one tensor of N x 3 \(logits"),
        (Net(returns="dict"), r"returned a dict; task classify takes one tensor of N x 3"),
        (
            Net(returns="map"),
            r"returned a 2 x 3 x 1 x 1 tensor for 2 images; task classify takes 2 x 3 \(N x 3: logits",
        ),
        (Net(outputs=1), r"returned a 2 x 1 tensor .* takes 2 x 3 \(N x 3: logits of its 3 classes: circle, square"),
        (Net(channels=1), r"a forward pass of 2 zero 3 x 32 x 32 images .* raised RuntimeError: .*data.channels is"),
    ]
    for model, message in cases:
        with pytest.raises(ValueError, match=message):
            make_task(cfg, Runtime(cfg.runtime), source, model=model).given_model()
    assert make_task(cfg, Runtime(cfg.runtime), source, model=Net()).given_model() is not None

    with pytest.raises(ValueError, match="returned a tuple"):
        train(cfg, model=Net(returns="tuple"), progress=False)
    assert not list(tmp_path.iterdir())  # refused before a run folder

    wider = load_config("quickstart", [f"data.root={shapes_root}", "model.num_outputs=4"])
    with pytest.raises(ValueError, match=r"model.num_outputs: 4, but .* has 3 classes \(circle, square, triangle\)"):
        _ = make_task(wider, Runtime(wider.runtime), source).num_outputs


def test_trying_a_model_from_python_changes_nothing_of_it_and_takes_what_trains(shapes_root, tmp_path):
    """The review of the one-pass check: a layer initialised by its first batch was initialised on zeros, a
    forward that draws shifted the random streams, a model squeezing its output was refused at batch 1, and a
    bf16 model was fed float32 zeros; prediction (one image at a time) then failed on the squeezed output."""
    import dataclasses

    import torch
    from torch import nn

    from fasttrain import load_config
    from fasttrain.data.sources import discover
    from fasttrain.runtime import Runtime
    from fasttrain.tasks import make_task

    class FirstBatchInit(nn.Module):  # ActNorm-style: its scale is set by the first batch it sees
        def __init__(self):
            super().__init__()
            self.conv, self.fc = nn.Conv2d(3, 4, 3), nn.Linear(4, 3)
            self.register_buffer("ready", torch.zeros(()))

        def forward(self, x):
            if not self.ready:
                self.ready.fill_(1)
            torch.rand(1)  # a draw in every forward
            return self.fc(self.conv(x).mean((2, 3))).squeeze()  # squeeze: 2 x 3 stays 2 x 3

    cfg = load_config("quickstart", [f"data.root={shapes_root}", f"train.runs_dir={tmp_path}"])
    source = discover(cfg.data)
    model = FirstBatchInit()
    before = torch.random.get_rng_state()
    assert make_task(cfg, Runtime(cfg.runtime), source, model=model).given_model() is model
    assert not model.ready and torch.equal(torch.random.get_rng_state(), before)

    half = FirstBatchInit().to(torch.bfloat16)
    assert make_task(cfg, Runtime(cfg.runtime), source, model=half).given_model() is half

    from fasttrain import predict, train

    short = load_config("quickstart", [f"data.root={shapes_root}", f"train.runs_dir={tmp_path}", "train.max_steps=1"])
    run = train(dataclasses.replace(short, train=dataclasses.replace(short.train, epochs=1)), model=FirstBatchInit)
    image = str(next(shapes_root.rglob("*.png")))
    (record,) = predict(run.run_dir, [image], device="cpu", model=FirstBatchInit())  # squeezed to 3 for one image
    assert record["class"] in ("circle", "square", "triangle")


def _visible(text: str) -> list[str]:
    """What a terminal shows of ``text``: each line's part after its last carriage return (tqdm redraws a bar
    with "\\r" and erases one by drawing blanks over it)."""
    return [line.rpartition("\r")[2].strip() for line in text.split("\n")]


def test_train_from_python_prints_the_epoch_summaries_and_keeps_the_last_bar(
    shapes_root, tmp_path, capsys, monkeypatch
):
    import logging

    from fasttrain import load_config, metrics, train

    monkeypatch.setattr(logging.getLogger(), "handlers", [])  # a plain Python session: nothing configured
    monkeypatch.setattr(metrics, "_is_terminal", lambda: True)  # a terminal: the bar, not the step lines
    cfg = load_config(
        "quickstart",
        [
            f"data.root={shapes_root}",
            f"train.runs_dir={tmp_path}",
            "train.epochs=2",
            "train.max_steps=2",
            "train.log_every=1",
            "data.workers=0",
            "data.loader=torch",
        ],
    )
    train(cfg)
    seen = _visible(capsys.readouterr().err)
    assert sum(" I epoch 1/2 | train_loss" in line for line in seen) == 1, seen
    assert any(" I epoch 2/2 | train_loss" in line for line in seen), seen
    assert any(line.startswith("epoch 2/2: 100%") and "loss=" in line for line in seen), seen  # the bar stays
    assert not logging.getLogger("fasttrain").handlers  # nothing left behind

    train(cfg, quiet=True)
    assert "epoch" not in capsys.readouterr().err  # quiet: warnings only, no bar
