"""Fine-tuning starts: torchvision's pretrained weights (offline, from a file the test writes into torch's cache),
model.init_from (a state dict or a fasttrain checkpoint), a new head for a new class count, timm models."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from fasttrain.config import load_config
from fasttrain.models import build_model, is_conv_model
from fasttrain.models.init import head_linear, load_initial_weights, read_state_dict
from fasttrain.runtime import runtime_for
from fasttrain.tasks import make_task


def _cfg(tmp_path, *overrides):
    return load_config(
        None,
        [
            "model.name=smallcnn",
            "model.width=4",
            "model.num_outputs=3",
            "data.image_size=16",
            f"train.runs_dir={tmp_path / 'runs'}",
            *overrides,
        ],
    )


def _model_state(cfg):
    task = make_task(cfg, runtime_for(cfg, device="cpu"), None)
    return task.build_state().modules["model"]


def test_init_from_a_state_dict_loads_every_tensor(tmp_path):
    torch.manual_seed(1)
    source = build_model("smallcnn", in_channels=3, num_outputs=3, image_size=16, width=4)
    torch.save({"state_dict": {f"module.{k}": v for k, v in source.state_dict().items()}}, tmp_path / "w.pth")
    torch.manual_seed(2)
    model = _model_state(_cfg(tmp_path, f"model.init_from={tmp_path / 'w.pth'}"))
    for k, v in source.state_dict().items():  # DDP's "module." prefix and the wrapper dict are undone
        assert torch.equal(model.state_dict()[k], v), k


def test_init_from_a_fasttrain_checkpoint_with_a_new_head(tmp_path):
    from fasttrain.checkpoint import save_checkpoint

    torch.manual_seed(3)
    cfg10 = _cfg(tmp_path, "model.num_outputs=10")
    task = make_task(cfg10, runtime_for(cfg10, device="cpu"), None)
    state = task.build_state()
    save_checkpoint(tmp_path / "last.pt", {"state": state.state_dict(), "config": {}})
    saved = state.modules["model"].state_dict()
    with pytest.raises(ValueError, match=r"shape mismatch: 9\.bias \(10,\) vs \(3,\).*model\.reset_head = true"):
        _model_state(_cfg(tmp_path, f"model.init_from={tmp_path / 'last.pt'}"))
    model = _model_state(_cfg(tmp_path, f"model.init_from={tmp_path / 'last.pt'}", "model.reset_head=true"))
    head_name, head = head_linear(model)
    assert head.out_features == 3 and head_name == "9"
    for k, v in model.state_dict().items():
        if not k.startswith("9."):
            assert torch.equal(v, saved[k]), k


def test_init_from_names_what_does_not_fit(tmp_path):
    torch.save({"0.0.weight": torch.zeros(4, 3, 3, 3), "extra.weight": torch.zeros(1)}, tmp_path / "partial.pt")
    with pytest.raises(
        ValueError,
        match=r"partial\.pt does not fit model smallcnn \(missing: .*unexpected: "
        r"extra\.weight\); saved from another architecture",
    ):
        _model_state(_cfg(tmp_path, f"model.init_from={tmp_path / 'partial.pt'}"))
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match=r"model\.init_from: .*junk\.pt is not a checkpoint \(neither the zip"):
        read_state_dict(tmp_path / "junk.pt")
    with pytest.raises(FileNotFoundError, match="model.init_from: .*nope.pt not found"):
        read_state_dict(tmp_path / "nope.pt")


def test_pretrained_torchvision_weights_from_the_cache_with_a_new_head_and_a_gray_stem(tmp_path, monkeypatch):
    """torchvision looks in $TORCH_HOME/hub/checkpoints before downloading: the test puts 'pretrained' weights
    there, so the real weights API runs without a network."""
    from torchvision.models import get_model_weights

    torch.manual_seed(4)
    reference = build_model("resnet18", in_channels=3, num_outputs=1000, image_size=32)
    cache = tmp_path / "torch" / "hub" / "checkpoints"
    cache.mkdir(parents=True)
    torch.save(reference.state_dict(), cache / get_model_weights("resnet18").DEFAULT.url.rsplit("/", 1)[1])
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    model = build_model("resnet18", in_channels=1, num_outputs=5, image_size=32, pretrained=True)
    assert model.fc.out_features == 5
    assert torch.equal(model.layer4[1].conv2.weight, reference.layer4[1].conv2.weight)
    # A gray pixel is R = G = B: the gray stem's filter is the RGB filters summed over colour.
    torch.testing.assert_close(model.conv1.weight, reference.conv1.weight.sum(1, keepdim=True))
    with pytest.raises(ValueError, match="model.pretrained: smallcnn is one of fasttrain's small nets"):
        build_model("smallcnn", in_channels=3, num_outputs=2, image_size=16, pretrained=True)


def test_load_initial_weights_refuses_a_wrong_head_without_reset():
    a, b = nn.Sequential(nn.Linear(4, 8), nn.Linear(8, 2)), nn.Sequential(nn.Linear(4, 8), nn.Linear(8, 5))
    with pytest.raises(ValueError, match="classifier head differs"):
        load_initial_weights(b, a.state_dict(), reset_head=False, source="a")
    info = load_initial_weights(b, a.state_dict(), reset_head=True, source="a")
    assert info["head_reset"] == ["1.bias", "1.weight"]
    assert torch.equal(b[0].weight, a[0].weight)


def test_timm_models_by_name(tmp_path):
    pytest.importorskip("timm")
    model = build_model("timm/resnet10t", in_channels=1, num_outputs=4, image_size=32)
    assert model(torch.randn(2, 1, 32, 32)).shape == (2, 4)
    assert is_conv_model("timm/resnet10t") and not is_conv_model("timm/vit_tiny_patch16_224")
    with pytest.raises(ValueError, match="timm has no model 'no_such_net'"):
        build_model("timm/no_such_net", in_channels=3, num_outputs=2, image_size=32)
    # the runtime treats it as any torchvision net: channels_last where it convolves
    cfg = load_config(None, ["model.name=timm/resnet10t", "runtime.channels_last=on"])
    assert runtime_for(cfg, device="cpu").channels_last


def test_resume_and_predict_take_the_checkpoint_not_the_starting_weights(tmp_path):
    """A run that started from init_from resumes and predicts after the file is gone (its weights are in the
    checkpoint), and the resumed weights are the checkpoint's."""
    from fasttrain.data.synthetic import make_shapes_dataset
    from fasttrain.engine import train
    from fasttrain.prediction import predict

    root = make_shapes_dataset(
        tmp_path / "data", train_per_class=4, val_per_class=1, size=16, shapes=("circle", "square")
    )
    source = build_model("smallcnn", in_channels=3, num_outputs=2, image_size=16, width=4)
    torch.save(source.state_dict(), tmp_path / "start.pt")
    cfg = _cfg(
        tmp_path,
        f"data.root={root}",
        "model.num_outputs=2",
        f"model.init_from={tmp_path / 'start.pt'}",
        "train.epochs=1",
        "train.batch_size=4",
        "data.workers=0",
        "train.max_steps=1",
    )
    run = train(cfg, progress=False).run_dir
    (tmp_path / "start.pt").unlink()
    resumed = train(resume=run, overrides=["train.epochs=2"], progress=False)
    assert resumed.history[-1]["epoch"] == 2
    image = next(root.rglob("*.png"))
    (record,) = predict(run / "checkpoints" / "last.pt", [str(image)], device="cpu")
    assert "error" not in record


@pytest.fixture
def no_network(monkeypatch, tmp_path):
    """A machine without network: names do not resolve, and a download attempted anyway fails the test."""
    import socket

    import huggingface_hub
    import torch.hub

    def unresolvable(*args, **kwargs):
        raise socket.gaierror(-2, "Name or service not known")

    def download(*args, **kwargs):
        raise AssertionError("a download was attempted")

    monkeypatch.setattr(socket, "getaddrinfo", unresolvable)
    monkeypatch.setattr(torch.hub, "download_url_to_file", download)
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", download)
    monkeypatch.setattr("timm.models._hub.hf_hub_download", download, raising=False)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))  # an empty cache


def test_pretrained_weights_offline_name_the_setting_the_cache_folder_and_init_from(tmp_path, no_network):
    import time

    t0 = time.perf_counter()
    with pytest.raises(ValueError) as e:
        build_model("resnet18", in_channels=3, num_outputs=5, image_size=32, pretrained=True)
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith("model.pretrained: the weights of resnet18 cannot be downloaded")
    assert "download.pytorch.org cannot be resolved" in msg
    assert f"{tmp_path / 'torch' / 'hub' / 'checkpoints'}/ as resnet18-" in msg and "model.init_from" in msg
    pytest.importorskip("timm")
    from huggingface_hub import constants

    with pytest.raises(ValueError) as e:
        build_model("timm/resnet18", in_channels=3, num_outputs=5, image_size=32, pretrained=True)
    msg = str(e.value)
    assert msg.startswith("model.pretrained: the weights of timm/resnet18 cannot be downloaded (huggingface.co")
    assert f"Hugging Face cache {constants.HF_HUB_CACHE}" in msg and "model.init_from" in msg
    assert time.perf_counter() - t0 < 10  # at once, not after a minute of retries


def test_pretrained_weights_with_hf_hub_offline_fail_at_once(monkeypatch):
    pytest.importorskip("timm")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ValueError, match=r"^model\.pretrained: .*timm/resnet18 .*\(HF_HUB_OFFLINE is set\)"):
        build_model("timm/resnet18", in_channels=3, num_outputs=5, image_size=32, pretrained=True)


def _saved_run(tmp_path, name, *overrides):
    from fasttrain.checkpoint import CheckpointManager

    cfg = _cfg(tmp_path, *overrides)
    task = make_task(cfg, runtime_for(cfg, device="cpu"), None)
    state = task.build_state()
    (tmp_path / name / "checkpoints").mkdir(parents=True)
    m = CheckpointManager(tmp_path / name, cfg=cfg, task=task, state=state, best_metric="val_acc")
    m.save_last()
    return m.last


def test_init_from_messages_say_in_one_line_what_the_file_is_and_what_differs(tmp_path):
    from PIL import Image

    def error(*overrides):
        with pytest.raises(ValueError) as e:
            _model_state(_cfg(tmp_path, *overrides))
        assert "\n" not in str(e.value)
        return str(e.value)

    # Another width: every conv differs, so leaving the head out cannot help and is not advised.
    wide = _saved_run(tmp_path, "wide", "model.width=8")
    msg = error(f"model.init_from={wide}")
    assert msg.startswith(f"model.init_from: {wide} does not fit model smallcnn (shape mismatch: ")
    assert "reset_head" not in msg and msg.endswith("the file was trained with model.width = 8 (this run: 4)")
    # Only the class count differs: reset_head is what helps, and it is said.
    ten = _saved_run(tmp_path, "ten", "model.num_outputs=10")
    assert "only the classifier head differs" in error(f"model.init_from={ten}")
    # An image is not a checkpoint (not torch's 7 lines of weights_only advice).
    png = tmp_path / "cat.png"
    Image.new("RGB", (8, 8)).save(png)
    assert error(f"model.init_from={png}") == (
        f"model.init_from: {png} is not a checkpoint (a PNG image); give a state dict or a fasttrain checkpoint "
        f"(torch.save's .pt / .pth)"
    )
    # A checkpoint of another task: said as such, not as lists of keys.
    drawing = _saved_run(
        tmp_path, "drawing", "task.name=regress", "data.channels=1", "data.mean=[0.5]", "data.std=[0.5]"
    )
    msg = error(f"model.init_from={drawing}")
    assert msg.startswith(f"model.init_from: {drawing} is a fasttrain checkpoint of task regress (model of smallcnn)")
    assert "not of task classify" in msg
