"""MixUp / CutMix on device batches (task.mixup_alpha, task.cutmix_alpha) in the classification step."""

from __future__ import annotations

import pytest
import torch

from fasttrain.config import load_config
from fasttrain.data.base import Batch
from fasttrain.runtime import runtime_for
from fasttrain.tasks import make_task


def _task_and_state(*overrides):
    cfg = load_config(
        None, ["model.name=smallcnn", "model.width=4", "model.num_outputs=4", "data.image_size=16", *overrides]
    )
    task = make_task(cfg, runtime_for(cfg, device="cpu"), None)
    return task, task.build_state()


def _seen_inputs(task, state, batch):
    seen = []
    hook = state.modules["model"].register_forward_pre_hook(lambda m, args: seen.append(args[0].detach().clone()))
    try:
        task.train_step(state, batch)
    finally:
        hook.remove()
    return seen[0]


def test_mixup_feeds_a_convex_mix_of_batch_pairs():
    torch.manual_seed(0)
    task, state = _task_and_state("task.mixup_alpha=0.4")
    x = torch.randn(6, 3, 16, 16)
    batch = Batch(x, torch.tensor([0, 1, 2, 3, 0, 1]))
    fed = _seen_inputs(task, state, batch)
    rolled = x.roll(1, 0)
    # x_fed = lam * x + (1 - lam) * roll(x): solve for lam on one pixel, then check every pixel
    i = (x - rolled).abs().flatten().argmax()
    lam = ((fed.flatten()[i] - rolled.flatten()[i]) / (x.flatten()[i] - rolled.flatten()[i])).item()
    assert 0.0 <= lam <= 1.0 and not torch.equal(fed, x)
    torch.testing.assert_close(fed, lam * x + (1 - lam) * rolled, rtol=1e-5, atol=1e-5)


def test_cutmix_pastes_a_box_and_off_leaves_inputs_alone():
    torch.manual_seed(1)
    task, state = _task_and_state("task.cutmix_alpha=1.0")
    x = torch.randn(4, 3, 16, 16)
    fed = _seen_inputs(task, state, Batch(x, torch.tensor([0, 1, 2, 3])))
    from_self, from_next = (fed == x).all(1), (fed == x.roll(1, 0)).all(1)  # per pixel, all channels
    assert bool((from_self | from_next).all()) and bool(from_next.any())
    plain_task, plain_state = _task_and_state()
    assert plain_task.batch_mix() is None
    assert torch.equal(_seen_inputs(plain_task, plain_state, Batch(x, torch.tensor([0, 1, 2, 3]))), x)


def test_negative_alpha_names_the_field():
    with pytest.raises(ValueError, match="task.mixup_alpha: must be >= 0"):
        load_config(None, ["task.mixup_alpha=-1"])


def test_balanced_class_weights_weigh_the_training_loss_and_unbalanced_data_is_warned_of(tmp_path, caplog):
    """300 cats and 40 fish: best.pt was a model answering cat (val_acc 0.886, the share of cats) with no word
    and no setting to weigh the rare class."""
    import torch.nn.functional as F

    from fasttrain.config import ConfigError
    from fasttrain.data.sources import DataSource, Split

    split = Split("train", [f"/d/{i}.png" for i in range(340)], [0] * 300 + [1] * 40)
    source = DataSource(tmp_path, "folder", split, None, class_names=["cat", "fish"])
    cfg = load_config(None, ["model.name=smallcnn", "model.width=4", "data.image_size=16"])
    plain = make_task(cfg, runtime_for(cfg, device="cpu"), source)
    (note,) = plain.data_notes()
    assert "unbalanced: cat has 300 training images, fish 40" in note and "accuracy near 0.88" in note
    assert plain.loss_weight(torch.device("cpu")) is None

    weighed = load_config(
        None,
        ["model.name=smallcnn", "model.width=4", "data.image_size=16", "task.class_weights=balanced"]
        + ["runtime.precision=fp32"],
    )
    task = make_task(weighed, runtime_for(weighed, device="cpu"), source)
    assert task.data_notes() == []
    weight = task.loss_weight(torch.device("cpu"))
    torch.testing.assert_close(weight, torch.tensor([340 / 600, 340 / 80]))
    state = task.build_state()
    x, y = torch.randn(4, 3, 16, 16), torch.tensor([0, 0, 0, 1])
    got = task.train_step(state, Batch(x, y), update=False)["loss"]
    logits = state.modules["model"](x)
    torch.testing.assert_close(got, F.cross_entropy(logits.float(), y, weight=weight))

    with pytest.raises(ConfigError, match="task.class_weights"):
        load_config(None, ["task.class_weights=inverse"])
    with pytest.raises(ConfigError, match="task.class_weights: weighs a classifier's classes"):
        load_config("drawing", ["task.class_weights=balanced"])
    python = DataSource(tmp_path, "dataset", Split("train", ["dataset[0]"], []), None, class_names=["a", "b"])
    with pytest.raises(ConfigError, match="a dataset from Python does not list"):
        make_task(weighed, runtime_for(weighed, device="cpu"), python)
