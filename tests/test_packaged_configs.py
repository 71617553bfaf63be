"""Every packaged config loads and trains a few steps end to end on data its generator writes."""

import pytest

from fasttrain.config import load_config, packaged_config
from fasttrain.data import synthetic
from fasttrain.engine import train
from fasttrain.prediction import predict

FAST = ["train.epochs=1", "train.max_steps=2", "data.workers=0", "train.eval_batch_size=4"]


def _data(kind, root):
    if kind == "shapes2":
        return synthetic.make_shapes_dataset(
            root, train_per_class=6, val_per_class=2, size=40, shapes=("circle", "square")
        )
    if kind == "shapes_noval":
        synthetic.make_shapes_dataset(root / "tmp", train_per_class=10, val_per_class=0, size=60)
        return root / "tmp" / "train"
    if kind == "drawing":
        return synthetic.make_drawing_dataset(root, sessions=4, steps=3, size=64)
    if kind == "paired":
        return synthetic.make_paired_dataset(root, n=10, size=64)
    if kind == "imagenet":
        return synthetic.make_imagenet_like(root, n=12, classes=3, size=(120, 90))
    raise ValueError(kind)


@pytest.mark.parametrize(
    "name, kind, extra",
    [
        ("catfish", "shapes2", ["train.batch_size=4"]),
        ("convnet", "shapes_noval", ["train.batch_size=4"]),
        ("drawing", "drawing", ["train.batch_size=4", "data.image_size=64"]),
        ("pix2pix", "paired", ["data.image_size=64", "model.width=8"]),
        (
            "resnet50-imagenet",
            "imagenet",
            ["train.batch_size=4", "data.image_size=64", "data.resize_size=72", "model.name=resnet18"],
        ),
        (
            "resnet50-imagenet-fast",
            "imagenet",
            [
                "train.batch_size=4",
                "data.image_size=64",
                "data.progressive=[32, 64]",
                "data.eval_size=64",
                "data.resize_size=72",
                "model.name=resnet18",
            ],
        ),
        ("cifar10-speedrun", "shapes2", ["train.batch_size=4", "model.width=8", "train.ema_decay=0.9"]),
        ("cifar10-speedrun-cpu", "shapes2", ["train.batch_size=4", "model.width=8"]),
    ],
)
def test_packaged_config_trains_on_generated_data(name, kind, extra, tmp_path):
    root = _data(kind, tmp_path / "data")
    path = packaged_config(name)
    assert path is not None, name
    cfg = load_config(path, [f"data.root={root}", f"train.runs_dir={tmp_path / 'runs'}", *FAST, *extra])
    result = train(cfg, progress=False)
    assert result.history and result.history[0]["step"] == 2
    ckpt = result.run_dir / "checkpoints" / "last.pt"
    image = next(p for p in sorted(root.rglob("*")) if p.suffix in (".png", ".jpg", ".jpeg"))
    (record,) = predict(ckpt, [str(image)], device="cpu", out_dir=tmp_path / "pred")
    assert "error" not in record


def test_quickstart_is_packaged_and_valid():
    cfg = load_config(packaged_config("quickstart"))
    assert cfg.name == "quickstart" and cfg.data.root == ""


def test_a_checkpoint_trained_in_fp16_predicts_on_a_cpu(tmp_path):
    """fp16 needs CUDA to train, not to predict: prediction picks the precision of the device it runs on."""
    import dataclasses

    from fasttrain.checkpoint import save_checkpoint
    from fasttrain.config import config_to_dict
    from fasttrain.runtime import runtime_for
    from fasttrain.tasks import make_task

    root = _data("shapes2", tmp_path / "data")
    cfg = load_config(packaged_config("catfish"), [f"data.root={root}", "model.num_outputs=2"])
    task = make_task(cfg, runtime_for(cfg, device="cpu"), None)
    state = task.build_state()
    fp16 = dataclasses.replace(cfg, runtime=dataclasses.replace(cfg.runtime, precision="fp16"))
    ckpt = save_checkpoint(
        tmp_path / "fp16.pt",
        {"state": state.state_dict(), "config": config_to_dict(fp16), "meta": {"class_names": ["circle", "square"]}},
    )
    image = next(p for p in sorted(root.rglob("*.png")))
    (record,) = predict(ckpt, [str(image)], device="cpu")
    assert "error" not in record and record["class"] in ("circle", "square")
