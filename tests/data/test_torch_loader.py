import pytest
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
    assert train.skipped == []
    assert [len(b) for b in train] == [4, 4]  # topped up: one shape for every step
    assert [p for p, _ in train.skipped] == [paths[3]] and "cannot be decoded" in train.skipped[0][1]
    list(train)
    assert len(train.skipped) == 1  # listed once, however many epochs meet it
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
    with pytest.raises(ValueError, match="junk.pt: not a fasttrain checkpoint: it is a text file$"):
        load_checkpoint(tmp_path / "junk.pt")
    (tmp_path / "binary.pt").write_bytes(b"\x00\xfe\xff junk")
    with pytest.raises(ValueError, match="binary.pt: not a fasttrain checkpoint: its first bytes are neither a zip"):
        load_checkpoint(tmp_path / "binary.pt")
    (tmp_path / "utf8.pt").write_bytes(("é" * 40).encode())  # 80 bytes: byte 64 cuts a character in two
    with pytest.raises(ValueError, match="utf8.pt: not a fasttrain checkpoint: it is a text file$"):
        load_checkpoint(tmp_path / "utf8.pt")
    (tmp_path / "model.safetensors").write_bytes((20).to_bytes(8, "little") + b'{"__metadata__":{}}  ')
    with pytest.raises(ValueError, match="safetensors: not a fasttrain checkpoint: its first bytes are neither"):
        load_checkpoint(tmp_path / "model.safetensors")
    (tmp_path / "cut.pt").write_bytes((tmp_path / "list.pt").read_bytes()[:40])  # a zip's start, cut short
    with pytest.raises(ValueError, match="cut.pt: cannot be loaded"):
        load_checkpoint(tmp_path / "cut.pt")


def test_optimizer_states_take_the_layout_of_channels_last_parameters():
    """A checkpoint from a run without channels_last, resumed on a channels_last model: CUDA's fused optimizers
    need each state tensor laid out like its parameter (CPU kernels do not check, so check the strides)."""
    from torch import nn

    torch.manual_seed(0)
    saved_model = nn.Conv2d(3, 3, 3)
    saved_opt = torch.optim.AdamW(saved_model.parameters(), lr=0.1)
    saved_model(torch.randn(2, 3, 8, 8)).square().sum().backward()
    saved_opt.step()
    model = nn.Conv2d(3, 3, 3).to(memory_format=torch.channels_last)
    opt = torch.optim.AdamW(model.parameters(), lr=0.1)
    state = TrainState(
        {"model": model}, {"model": model}, {"model": opt}, {"model": torch.amp.GradScaler("cpu", enabled=False)}
    )
    state.load_state_dict(
        {
            "modules": {"model": saved_model.state_dict()},
            "optimizers": {"model": saved_opt.state_dict()},
            "scalers": {"model": {}},
            "schedulers": {},
            "epoch": 1,
            "step": 1,
        }
    )
    w = model.weight
    assert w.stride() == (27, 1, 9, 3)  # channels_last
    for key in ("exp_avg", "exp_avg_sq"):
        moved = opt.state[w][key]
        assert moved.stride() == w.stride(), key
        torch.testing.assert_close(moved, saved_opt.state[saved_model.weight][key], rtol=0, atol=0)
    assert opt.state[model.bias]["exp_avg"].stride() == model.bias.stride()


def test_decoding_a_sample_in_process_leaves_every_other_generator_alone(tmp_path, monkeypatch):
    """data.workers = 0 decodes in the training process: seeding a sample's augmentation must not reseed CUDA
    (dropout, a restored RNG state) nor move the global CPU stream."""
    from fasttrain.data.transforms import train_transform

    p = tmp_path / "a.png"
    Image.fromarray((torch.arange(40 * 32 * 3) % 251).reshape(32, 40, 3).to(torch.uint8).numpy()).save(p)
    calls = []
    monkeypatch.setattr(torch.cuda, "manual_seed_all", lambda seed: calls.append(seed))
    monkeypatch.setattr(torch.cuda, "manual_seed", lambda seed: calls.append(seed))
    ds = ImageDataset(Split("train", [str(p)], [0]), train_transform(DataConfig(image_size=8)), 3, seed=5)
    torch.manual_seed(123)
    calls.clear()
    before = torch.get_rng_state()
    first, _ = ds[(0, 2)]
    assert calls == []
    assert torch.equal(torch.get_rng_state(), before)
    again, _ = ds[(0, 2)]
    assert torch.equal(first, again)  # still seeded per (seed, epoch, index)
    other, _ = ds[(0, 3)]
    assert not torch.equal(first, other)


def _images(tmp_path, n):
    paths = []
    for i in range(n):
        p = tmp_path / f"{i}.png"
        Image.new("RGB", (12, 12), (i * 20, 0, 0)).save(p)
        paths.append(str(p))
    return paths


def test_a_training_batch_with_no_decodable_file_is_replaced_so_every_process_takes_the_same_steps(tmp_path):
    """Under torchrun each process reads its own shard and every step all-reduces: a process that dropped a
    batch would leave the others waiting for ever. Training keeps len(loader) batches; evaluation drops it."""
    paths = _images(tmp_path, 8)
    data = DataConfig(image_size=8, resize_size=8)
    ds = ImageDataset(Split("train", paths, list(range(8))), eval_transform(data), 3, seed=0)
    order = EpochSampler(8, batch_size=2, shuffle=True, seed=0, drop_last=True).indices(0)
    for k in order[2:4] + order[6:8]:  # the second batch and the last one: every file broken
        (tmp_path / f"{k}.png").write_bytes(b"broken")
    train = TorchLoader(ds, SPEC, batch_size=2, train=True, seed=0, workers=0)
    batches = [b.targets.tolist() for b in train]
    assert len(batches) == len(train) == 4
    assert batches == [order[0:2], order[4:6], order[4:6], order[4:6]]  # the next good batch, then the last one
    assert sorted(p for p, _ in train.skipped) == sorted(paths[k] for k in order[2:4] + order[6:8])
    val = TorchLoader(ds, SPEC, batch_size=2, train=False, seed=0, workers=0)
    assert sum(len(b) for b in val) == 4  # evaluation counts each decoded sample once


def test_a_batch_saves_the_training_generator_once_and_each_sample_draws_its_own_crop(tmp_path, monkeypatch):
    from fasttrain.data.transforms import train_transform

    paths = []
    for i in range(6):
        p = tmp_path / f"{i}.png"
        Image.effect_noise((40, 40), 60 + i).convert("RGB").save(p)
        paths.append(str(p))
    data = DataConfig(image_size=16, resize_size=20, random_resized_crop=True)
    ds = ImageDataset(Split("train", paths, list(range(6))), train_transform(data), 3, seed=7)
    keys = [(i, 2) for i in (4, 0, 5, 1)]
    one_by_one = [ds[k][0] for k in keys]
    forks = []
    real = torch.random.fork_rng
    monkeypatch.setattr(torch.random, "fork_rng", lambda *a, **k: forks.append(1) or real(*a, **k))
    torch.manual_seed(123)
    before = torch.rand(3)
    torch.manual_seed(123)
    batch = ds.__getitems__(keys)
    assert torch.equal(torch.rand(3), before)  # the training process's generator did not move
    assert forks == [1]  # once per batch (it was once per sample)
    assert all(torch.equal(a, b) for a, (b, _) in zip(one_by_one, batch))  # per (seed, epoch, index)
    assert not torch.equal(batch[0][0], ds[(4, 3)][0])  # another epoch, another crop


@pytest.mark.parametrize("mode", ["RGB", "L"])
def test_the_deterministic_transforms_are_torchvisions_to_the_pixel(mode):
    """eval_transform and resize_square call Pillow themselves (no torchvision import): the same pixels, shapes
    and strides as torchvision's resize + center_crop + pil_to_tensor, odd sizes, portrait and landscape; the crop
    alone also where it is larger than the image (zero-padded)."""
    import numpy as np
    from PIL import Image
    from torchvision.transforms import v2
    from torchvision.transforms.v2 import functional as TF

    from fasttrain.config import DataConfig
    from fasttrain.data.transforms import center_crop, resize_square

    rng = np.random.default_rng(0)
    bilinear = v2.InterpolationMode.BILINEAR
    for w, h, resize, crop in [(40, 30, 32, 28), (29, 47, 33, 33), (64, 64, 64, 56), (31, 50, 25, 25), (17, 9, 14, 9)]:
        im = Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).convert(mode)
        cfg = DataConfig(image_size=crop, resize_size=resize, eval_size=crop)
        assert (cfg.eval_resize, cfg.eval_crop) == (resize, crop)
        want = TF.pil_to_tensor(TF.center_crop(TF.resize(im, [resize], interpolation=bilinear), [crop, crop]))
        got = eval_transform(cfg)(im)
        assert got.shape == want.shape and got.stride() == want.stride() and torch.equal(got, want)
        want = TF.pil_to_tensor(TF.resize(im, [resize, resize], interpolation=bilinear))
        got = resize_square(im, resize)
        assert got.stride() == want.stride() and torch.equal(got, want)
        for side in (h + 3, w + 4, max(w, h) + 1, min(w, h) - 1):
            assert torch.equal(TF.pil_to_tensor(center_crop(im, side)), TF.pil_to_tensor(TF.center_crop(im, [side])))
