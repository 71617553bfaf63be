"""timm's optimizers (lamb, lion, timm/<name>, layer-wise decay), RandAugment, RandomErasing and drop_path, all
through timm's own factories; a clear error naming the setting where timm is missing."""

from __future__ import annotations

import random
import sys

import pytest
import torch
from PIL import Image
from tinyrun import tiny_cfg

from fasttrain.config import ConfigError, apply_overrides, describe_config, load_config
from fasttrain.data.transforms import train_transform
from fasttrain.models import build_model
from fasttrain.optim import make_optimizer, make_scheduler

timm = pytest.importorskip("timm")


def _opt(*sets):
    return load_config(None, list(sets)).optim


@pytest.mark.parametrize("name, cls", [("lamb", "Lamb"), ("lion", "Lion"), ("timm/adan", "Adan")])
def test_timm_optimizers_by_name(name, cls):
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
    opt = make_optimizer(model, _opt(f"optim.name={name}", "optim.lr=0.01", "optim.weight_decay=0.1"))
    assert type(opt).__name__ == cls and type(opt).__module__.startswith("timm.optim")
    decay = {g["weight_decay"] for g in opt.param_groups if any(p.ndim > 1 for p in g["params"])}
    no_decay = {g["weight_decay"] for g in opt.param_groups if all(p.ndim <= 1 for p in g["params"])}
    assert decay == {0.1} and no_decay == {0.0}  # timm's groups: no decay on biases
    before = model[0].weight.detach().clone()
    model(torch.randn(3, 4)).sum().backward()
    opt.step()
    assert not torch.equal(before, model[0].weight)


def test_an_unknown_timm_optimizer_suggests_names():
    with pytest.raises(ValueError, match=r"optim\.name: timm has no optimizer 'lamd'.*did you mean timm/lamb"):
        make_optimizer(torch.nn.Linear(2, 2), _opt("optim.name=timm/lamd"))
    with pytest.raises(ConfigError, match=r"optim\.name: must be one of .*lamb, lion, timm/<name>"):
        _opt("optim.name=lamb2")


def test_layer_decay_scales_each_layer_and_survives_the_schedule():
    model = build_model("timm/resnet10t", in_channels=3, num_outputs=3, image_size=32)
    cfg = _opt("optim.name=adamw", "optim.lr=0.1", "optim.layer_decay=0.5")
    opt = make_optimizer(model, cfg)
    groups = opt.param_groups
    assert all(g["lr"] == pytest.approx(0.1 * g["lr_scale"]) for g in groups)
    assert groups[0]["lr"] == pytest.approx(0.1)  # the head's group first: the logged lr is the peak
    stem = next(g for g in groups if any(p is model.conv1[0].weight for p in g["params"]))
    head = next(g for g in groups if any(p is model.fc.weight for p in g["params"]))
    assert head["lr_scale"] == 1.0 and stem["lr_scale"] < 0.5**3  # the stem several layers below the head
    sched = make_scheduler(opt, load_config(None, ["schedule.name=cosine"]).schedule, 10, 10)
    for _ in range(5):
        opt.step()
        sched.step()
    assert stem["lr"] / head["lr"] == pytest.approx(stem["lr_scale"])  # the schedule keeps the ratio


def test_missing_timm_names_the_setting(monkeypatch):
    monkeypatch.setitem(sys.modules, "timm", None)  # import timm -> ImportError
    with pytest.raises(ValueError, match=r"optim\.name = 'lion' needs timm, which is not installed"):
        make_optimizer(torch.nn.Linear(2, 2), _opt("optim.name=lion"))
    with pytest.raises(ValueError, match=r"optim\.layer_decay = 0\.7 needs timm"):
        make_optimizer(torch.nn.Linear(2, 2), _opt("optim.layer_decay=0.7"))
    with pytest.raises(ValueError, match=r"data\.rand_augment = 'rand-m9' needs timm"):
        train_transform(load_config(None, ["data.rand_augment=rand-m9"]).data)


def test_rand_augment_is_timms_seeded_per_sample(monkeypatch):
    import timm.data

    made = []
    factory = timm.data.rand_augment_transform

    def spy(config, hparams=None, transforms=None):
        made.append((config, dict(hparams or {})))
        return factory(config, hparams, transforms)

    monkeypatch.setattr(timm.data, "rand_augment_transform", spy)
    sets = ["data.image_size=32", "data.random_resized_crop=false", "data.hflip=false"]
    plain = train_transform(load_config(None, sets).data)
    ra = train_transform(load_config(None, [*sets, "data.rand_augment=rand-m9-n2-mstd0"]).data)
    assert made == [("rand-m9-n2-mstd0", {"translate_const": 14, "img_mean": (124, 116, 104)})]  # timm's factory
    rng = torch.Generator().manual_seed(1)
    im = Image.fromarray(torch.randint(0, 255, (40, 40, 3), dtype=torch.uint8, generator=rng).numpy())
    outs = []
    py_state = random.getstate()
    for seed in (0, 0, 1, 2, 3):
        torch.manual_seed(seed)
        outs.append(ra(im))
    assert random.getstate() == py_state  # timm's draws come from a fork: the global stream is untouched
    assert torch.equal(outs[0], outs[1])  # same torch seed (the loader's per-sample seed): same augmentation
    base = plain(im)
    assert sum(not torch.equal(o, base) for o in outs) >= 3  # it changes the images
    assert len({o.numpy().tobytes() for o in outs[1:]}) >= 3  # differently per seed


def test_rand_augment_needs_the_torch_loader(shapes_root, tmp_path):
    from fasttrain.data.base import RunSamples
    from fasttrain.data.loaders import choose_backend
    from fasttrain.data.samples import Samples
    from fasttrain.data.sources import Split

    cfg = tiny_cfg(shapes_root, tmp_path, "data.rand_augment=rand-m9")
    run = RunSamples(Samples(Split("train", ["a.png"] * 10, [0] * 10), "class"))
    backend, why = choose_backend("auto", run, cfg, "cpu")
    assert backend == "torch" and "data.rand_augment" in why
    with pytest.raises(ConfigError, match=r"data\.rand_augment: .*only the torch loader.*now dali"):
        choose_backend("dali", run, cfg, "cpu")


def test_random_erasing_is_timms_on_the_device_batch(shapes_root, tmp_path):
    from fasttrain.data.base import Batch
    from fasttrain.runtime import runtime_for
    from fasttrain.tasks import make_task

    cfg = tiny_cfg(shapes_root, tmp_path, "task.random_erasing=1.0", "model.num_outputs=3")
    task = make_task(cfg, runtime_for(cfg, device="cpu"), None)
    seen = []

    class Spy(torch.nn.Module):
        def forward(self, x):
            seen.append(x)
            return torch.zeros(len(x), 3, requires_grad=True)

    from fasttrain.tasks.base import TrainState

    state = TrainState({"model": Spy()}, {"model": Spy()}, {}, {})
    x = torch.zeros(4, 3, 32, 32)
    gen = task.train_phases(state, Batch(x, torch.tensor([0, 1, 2, 0])))
    next(gen)
    (erased,) = seen
    assert torch.equal(x, torch.zeros_like(x))  # the batch itself is left as it was
    per_image = (erased != 0).flatten(1).float().mean(1)
    assert ((per_image > 0.015) & (per_image < 0.34)).all()  # probability 1: a 2-33 % box of noise in each
    with pytest.raises(ConfigError, match=r"task\.random_erasing: .*task regress"):
        apply_overrides(cfg, ["task.name=regress"])


def test_drop_path_reaches_the_model_or_is_refused():
    from timm.layers import DropPath
    from torchvision.ops import StochasticDepth

    m = build_model("timm/resnet10t", in_channels=3, num_outputs=3, image_size=32, drop_path_rate=0.1)
    assert max(d.drop_prob for d in m.modules() if isinstance(d, DropPath)) == pytest.approx(0.1)
    m = build_model("efficientnet_b0", in_channels=3, num_outputs=3, image_size=32, drop_path_rate=0.3)
    assert max(d.p for d in m.modules() if isinstance(d, StochasticDepth)) == pytest.approx(0.3, rel=0.1)
    for name in ("resnet18", "mobilenet_v3_small", "smallcnn"):  # mobilenet would take it and ignore it
        with pytest.raises(ValueError, match=rf"model\.drop_path_rate: .*{name}"):
            build_model(name, in_channels=3, num_outputs=3, image_size=32, drop_path_rate=0.1)


def test_a_run_with_timms_optimizer_and_augmentations(shapes_root, tmp_path):
    from fasttrain.engine import train

    cfg = tiny_cfg(
        shapes_root,
        tmp_path,
        "optim.name=lion",
        "optim.lr=0.0005",
        "data.rand_augment=rand-m9-mstd0.5",
        "task.random_erasing=0.5",
        epochs=1,
        max_steps=2,
    )
    result = train(cfg, progress=False)
    assert result.backend == "torch" and all(torch.isfinite(torch.tensor(r["train_loss"])) for r in result.history)
    keys = {f.key: f for f in describe_config(cfg)}
    for key in (
        "optim.layer_decay",
        "model.drop_path_rate",
        "data.rand_augment",
        "task.random_erasing",
        "train.save_top_k",
        "train.early_stop_patience",
    ):
        assert keys[key].description  # documented, as `fasttrain config show` prints it
