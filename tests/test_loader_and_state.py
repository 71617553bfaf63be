import torch
from PIL import Image

from fasttrain.config import DataConfig
from fasttrain.data.base import InputSpec
from fasttrain.data.sources import Split
from fasttrain.data.torch_loader import EpochSampler, ImageDataset, TorchLoader
from fasttrain.data.transforms import eval_transform
from fasttrain.tasks.base import TrainState

SPEC = InputSpec(torch.device("cpu"), torch.float32, False, (0.5,) * 3, (0.5,) * 3)


def test_training_batches_keep_their_shape_when_a_file_is_unreadable(tmp_path):
    paths = []
    for i in range(8):
        p = tmp_path / f"{i}.png"
        Image.new("RGB", (12, 12), (i * 20, 0, 0)).save(p)
        paths.append(str(p))
    (tmp_path / "3.png").write_bytes(b"broken")
    data = DataConfig(image_size=8, resize_size=8)
    ds = ImageDataset(Split("train", paths, list(range(8))), eval_transform(data), 3, seed=0)
    train = TorchLoader(ds, SPEC, batch_size=4, train=True, seed=0, workers=0)
    assert [len(b) for b in train] == [4, 4]  # topped up: one shape for every step
    val = TorchLoader(ds, SPEC, batch_size=4, train=False, seed=0, workers=0)
    batches = list(val)
    assert [len(b) for b in batches] == [3, 4]  # evaluation never counts a sample twice
    assert sorted(torch.cat([b.targets for b in batches]).tolist()) == [0, 1, 2, 4, 5, 6, 7]


def test_sampler_skips_trained_samples_and_only_once():
    s = EpochSampler(10, batch_size=2, shuffle=True, seed=1, drop_last=True)
    s.epoch = 3
    full = [i for i, _ in s]
    s.start = 4
    assert [i for i, _ in s] == full[4:]
    assert [i for i, _ in s] == full  # the skip applies to the next iteration only


def test_scaler_state_from_a_run_without_scaling_is_not_loaded_into_an_enabled_scaler():
    model = torch.nn.Linear(2, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)

    def state(enabled):
        return TrainState({"m": model}, {"m": model}, {"m": opt}, {"m": torch.amp.GradScaler("cpu", enabled=enabled)})

    saved = state(False).state_dict()  # bf16/fp32: a disabled scaler saves {}
    assert saved["scalers"]["m"] == {}
    resumed = state(True)  # e.g. resumed with runtime.precision=fp16
    resumed.load_state_dict(saved)
    assert resumed.scalers["m"].is_enabled() and resumed.scalers["m"].get_scale() == 65536.0


def test_loading_something_else_than_a_checkpoint_names_the_file(tmp_path):
    import pytest

    from fasttrain.checkpoint import load_checkpoint

    for name, obj in (("list.pt", [1, 2]), ("other.pt", {"format": 99})):
        torch.save(obj, tmp_path / name)
        with pytest.raises(ValueError, match=f"checkpoint .*{name}: not a fasttrain checkpoint"):
            load_checkpoint(tmp_path / name)
    (tmp_path / "junk.pt").write_bytes(b"junk")
    with pytest.raises(ValueError, match="junk.pt: cannot be loaded"):
        load_checkpoint(tmp_path / "junk.pt")
