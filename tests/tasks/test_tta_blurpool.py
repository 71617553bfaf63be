"""Test-time augmentation (task.tta) in evaluation and predict, and BlurPool (model.blurpool) in ResNets."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from fasttrain.config import Config, ConfigError, apply_overrides
from fasttrain.models import build_model
from fasttrain.models.blurpool import BlurPoolConv2d, apply_blurpool
from fasttrain.tasks.classify import tta_logits


class Probe(nn.Module):
    """Logits that read a pixel, so flips and shifts show: [x[0,0,0,0], x[0,0,0,-1]] per sample."""

    def forward(self, x):
        return torch.stack([x[:, 0, 0, 0], x[:, 0, 0, -1]], 1)


def test_flip_averages_the_image_and_its_mirror():
    x = torch.arange(2 * 1 * 3 * 4, dtype=torch.float32).reshape(2, 1, 3, 4)
    none = tta_logits(Probe(), x, "none")
    flip = tta_logits(Probe(), x, "flip")
    assert torch.equal(none, Probe()(x))
    mirror = Probe()(x.flip(-1))
    assert torch.allclose(flip, 0.5 * (none + mirror))
    assert not torch.allclose(flip, none)


def test_flip_translate_adds_the_one_pixel_shifts_with_their_mirrors():
    x = torch.randn(3, 2, 5, 5)
    calls = []

    def model(t):
        calls.append(t.clone())
        return t.mean((2, 3)) + t[:, :, 0, 0]

    out = tta_logits(model, x, "flip_translate")
    assert len(calls) == 6 and all(c.shape == x.shape for c in calls)
    padded = torch.nn.functional.pad(x, (1, 1, 1, 1), mode="reflect")
    up_left, down_right = padded[..., 0:5, 0:5], padded[..., 2:7, 2:7]

    def mirrored(t):
        return 0.5 * model(t) + 0.5 * model(t.flip(-1))

    assert torch.allclose(out, 0.5 * mirrored(x) + 0.25 * (mirrored(up_left) + mirrored(down_right)), atol=1e-6)


def test_tta_is_a_classifier_setting():
    with pytest.raises(ConfigError, match=r"task\.tta: must be one of none, flip, flip_translate"):
        apply_overrides(Config(), ["task.tta=mirror"])
    with pytest.raises(ConfigError, match=r"task\.tta: averages a classifier's logits"):
        apply_overrides(Config(), ["task.tta=flip", "task.name=regress"])


def test_evaluation_and_predict_use_tta(shapes_root, tmp_path):
    """A trained run evaluated with flip TTA: the validation loss differs from plain evaluation, and predict's
    probabilities are the mean logits of the image and its mirror."""
    from fasttrain.engine import evaluate, train
    from fasttrain.prepare import prepare
    from tests.tinyrun import tiny_cfg

    cfg = tiny_cfg(shapes_root, tmp_path / "runs", epochs=1)
    result = train(cfg, progress=False)
    tta_cfg = apply_overrides(cfg, ["task.tta=flip"])
    values = {}
    for name, c in (("none", cfg), ("flip", tta_cfg)):
        prep = prepare(c, restoring=True)
        task = prep.task
        state = task.build_state()
        from fasttrain.checkpoint import load_checkpoint

        state.modules["model"].load_state_dict(
            load_checkpoint(result.run_dir / "checkpoints" / "last.pt")["state"]["modules"]["model"]
        )
        loader = task.make_loader(prep.source.val, train=False, backend="torch", batch_size=16)
        values[name] = evaluate(task, state, loader)
        loader.close()
        x = torch.randn(2, 3, 32, 32)
        state.train(False)
        with torch.no_grad():
            m = state.local["model"]
            want = m(x) if name == "none" else 0.5 * (m(x) + m(x.flip(-1)))
            assert torch.allclose(task.infer(m, x), want, atol=1e-5)
    assert values["none"]["loss"] != values["flip"]["loss"]


def test_blurpool_wraps_the_strided_convs_of_a_resnet_and_keeps_shapes():
    plain = build_model("resnet18", in_channels=3, num_outputs=4, image_size=64)
    blurred = build_model("resnet18", in_channels=3, num_outputs=4, image_size=64, blurpool=True)
    wrapped = [m for m in blurred.modules() if isinstance(m, BlurPoolConv2d)]
    # resnet18: layer2-4 each have a strided 3x3 conv and a strided 1x1 downsample; the stem (3 channels) is left
    assert len(wrapped) == 6
    assert not isinstance(blurred.conv1, BlurPoolConv2d)
    x = torch.randn(2, 3, 64, 64)
    assert blurred(x).shape == plain(x).shape == (2, 4)
    assert "layer2.0.conv1.blur_filter" in blurred.state_dict()


def test_blurpool_blurs_before_the_strided_conv():
    conv = nn.Conv2d(16, 1, 1, stride=2, bias=False)
    nn.init.ones_(conv.weight)
    wrapper = nn.Sequential(conv)
    assert apply_blurpool(wrapper) == 1
    x = torch.zeros(1, 16, 4, 4)
    x[0, 0, 2, 2] = 16.0  # one bright pixel, on the stride-2 grid
    out = wrapper(x)
    assert out[0, 0, 1, 1].item() == pytest.approx(4.0)  # the centre tap of [1 2 1]^2 / 16 times 16
    assert conv(x)[0, 0, 1, 1].item() == pytest.approx(16.0)  # without the blur: the pixel whole


def test_blurpool_is_refused_for_other_models():
    with pytest.raises(ValueError, match=r"model\.blurpool: .* not smallcnn"):
        build_model("smallcnn", in_channels=3, num_outputs=4, image_size=32, blurpool=True)


@pytest.mark.parametrize("channels", [1, 3])
def test_the_shifted_batches_keep_the_batchs_strides(channels):
    """A compiled evaluation guards on strides: a one-channel channels_last batch is also 'contiguous', and the
    shifted batches were made with other strides, a new graph for each evaluation's TTA."""
    x = torch.empty(2, channels, 6, 6, memory_format=torch.channels_last).copy_(torch.randn(2, channels, 6, 6))
    seen = []

    def model(t):
        seen.append(t.stride())
        return t.mean((1, 2, 3))[:, None]

    tta_logits(model, x, "flip_translate")
    assert seen[0] == x.stride() and seen[2] == x.stride() and seen[4] == x.stride()  # x and its two shifts
