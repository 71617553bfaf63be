import logging
from pathlib import Path

import badfiles
import pytest
import torch
from PIL import Image

from fasttrain.checkpoint import load_checkpoint
from fasttrain.config import Config, ConfigError, apply_overrides
from fasttrain.data.dali import dali_status
from fasttrain.data.samples import PairDataset
from fasttrain.data.sources import Split, discover
from fasttrain.data.synthetic import make_paired_dataset
from fasttrain.engine import evaluate, train
from fasttrain.prediction import predict
from fasttrain.prepare import prepare
from fasttrain.runtime import Runtime
from fasttrain.tasks.pix2pix import Pix2PixTask

needs_dali = pytest.mark.skipif(not dali_status()[0], reason=dali_status()[1])
BACKENDS = ["torch", "cache", pytest.param("dali", marks=needs_dali)]
# DALI's resampling against Pillow's, normalized to -1..1 (one grey level ~0.008): as for classification.
PARITY_MEAN_ABS = 0.02
PARITY_MAX_ABS = 0.5


def p2p_cfg(root, runs, *extra):
    return apply_overrides(
        Config(),
        [
            f"data.root={root}",
            "data.format=paired",
            "data.image_size=32",
            "data.workers=0",
            "model.name=unet",
            "model.width=8",
            "task.name=pix2pix",
            "task.sample_every=10",
            "optim.name=adam",
            "optim.lr=0.002",
            "optim.betas=[0.5, 0.999]",
            "schedule.name=constant",
            "train.epochs=3",
            "train.batch_size=8",
            "train.log_every=5",
            f"train.runs_dir={runs}",
            "name=p2p",
            *extra,
        ],
    )


@pytest.fixture(scope="module")
def paired_root(tmp_path_factory):
    return make_paired_dataset(tmp_path_factory.mktemp("data") / "paired", n=100, size=32)


@pytest.fixture(scope="module")
def trained(paired_root, tmp_path_factory):
    return train(p2p_cfg(paired_root, tmp_path_factory.mktemp("runs")), progress=False)


def untrained_val_l1(cfg) -> float:
    prep = prepare(cfg)
    torch.manual_seed(cfg.runtime.seed)
    state = prep.task.build_state()
    loader = prep.task.make_loader(prep.source.val, train=False, batch_size=32, backend="torch")
    return evaluate(prep.task, state, loader)["l1"]


def test_short_run_lowers_val_l1_and_writes_samples(trained, paired_root, tmp_path):
    h = trained.history
    assert trained.best_metric == "val_l1"
    before = untrained_val_l1(p2p_cfg(paired_root, tmp_path))
    print(f"val_l1 untrained {before:.3f} -> best {trained.best_value:.3f}")
    assert trained.best_value < 0.6 * before
    assert {"train_d_loss", "train_g_gan", "train_g_l1", "val_l1", "val_psnr"} <= set(h[-1])
    samples = sorted(p.name for p in (trained.run_dir / "samples").iterdir())
    assert "step_0000010.png" in samples and "epoch_0003_val.png" in samples
    with Image.open(trained.run_dir / "samples" / "epoch_0003_val.png") as im:
        cell = 32 + 2  # make_grid: 32 px images, 2 px padding
        assert im.width == 3 * cell + 2  # input | output | target
        assert (im.height - 2) % cell == 0 and im.height > cell  # one row per sample, at least two


def test_checkpoint_holds_both_networks_and_predicts_images(trained, paired_root, tmp_path, monkeypatch):
    monkeypatch.setattr(torch.optim.Optimizer, "__init__", lambda *a, **k: pytest.fail("predict built an optimizer"))
    ckpt = load_checkpoint(trained.run_dir / "checkpoints" / "best.pt")
    state = ckpt["state"]
    for group in ("modules", "optimizers", "scalers", "schedulers"):
        assert set(state[group]) == {"generator", "discriminator"}, group
    assert state["optimizers"]["generator"]["param_groups"][0]["betas"] == (0.5, 0.999)
    src = paired_root / "val" / "A" / "00099.png"
    odd = tmp_path / "odd.png"
    Image.open(src).resize((40, 24)).save(odd)
    out = tmp_path / "pred"
    recs = predict(trained.run_dir / "checkpoints" / "best.pt", [src, odd], device="cpu", out_dir=out)
    assert Path(recs[0]["output"]) == out / "00099_pix2pix.png"
    with Image.open(recs[1]["output"]) as im:
        assert im.size == (40, 24)  # back at the input's size
    assert recs[1]["size"] == [24, 40]  # [H, W] of what was written, not the generator's square
    again = predict(trained.run_dir / "checkpoints" / "best.pt", [src], device="cpu", out_dir=out)
    assert Path(again[0]["output"]).name == "00099_pix2pix-2.png"  # never overwrites


def test_both_images_of_a_pair_get_the_same_crop_and_flip(tmp_path):
    # An asymmetric gradient as both halves of a side-by-side image: A and B must stay identical.
    xs = torch.linspace(0, 255, 40).round().to(torch.uint8)
    grad = torch.stack([xs.expand(40, 40), xs[:, None].expand(40, 40), 255 - xs.expand(40, 40)], -1)
    half = Image.fromarray(grad.numpy())
    ab = Image.new("RGB", (80, 40))
    ab.paste(half, (0, 0))
    ab.paste(half, (40, 0))
    ab.save(tmp_path / "ab.png")
    from fasttrain.data.formats import SIDE_BY_SIDE

    ds = PairDataset(Split("train", [str(tmp_path / "ab.png")], [SIDE_BY_SIDE]), 32, 3, train=True, flip=True, seed=0)
    crops = set()
    for epoch in range(12):
        a, b = ds[(0, epoch)]
        assert a.shape == (3, 32, 32) and torch.equal(a, b)
        crops.add((a[0, 0, 0].item(), a[0, 0, -1].item() < a[0, 0, 0].item()))
    assert len(crops) > 3  # crops and flips really vary from epoch to epoch
    assert any(flipped for _, flipped in crops)
    assert torch.equal(ds[(0, 3)][0], ds[(0, 3)][0])  # the same (epoch, index) gives the same crop
    val = PairDataset(ds.split, 32, 3, train=False, flip=True, seed=0)
    assert torch.equal(val[(0, 0)][0], val[(0, 5)][0])  # no randomness in evaluation


@pytest.mark.parametrize("backend", BACKENDS)
def test_unreadable_pairs_are_skipped_and_named(tmp_path, caplog, backend):
    root = make_paired_dataset(tmp_path / "p", n=8, size=32)
    cfg = p2p_cfg(root, tmp_path, "data.dali_threads=1")
    src = discover(cfg.data, root)
    garbage, corrupt = src.train.targets[0], src.train.targets[3]
    Path(garbage).write_bytes(b"garbage")  # the target file: caught by the shared pre-check
    badfiles.write_png_corrupt_deflate(Path(corrupt))  # passes the pre-check, fails in the decoder
    task = Pix2PixTask(cfg, Runtime(cfg.runtime), src)
    loader = task.make_loader(src.train, train=False, batch_size=16, backend=backend)
    with caplog.at_level(logging.WARNING):
        (batch,) = list(loader)
    assert len(batch) == len(src.train) - 2 and garbage in caplog.text
    skipped = dict(loader.skipped)
    assert garbage in skipped  # the bad file of the pair is named (loader.skipped is what the run lists)
    # DALI decodes a pair in one graph: it names the input and says which target went with it.
    assert corrupt in skipped or any(corrupt in why for why in skipped.values())
    assert batch.inputs.shape == batch.targets.shape == (len(batch), 3, 32, 32)
    assert -1 <= float(batch.targets.min()) and float(batch.targets.max()) <= 1  # the tanh's range


# -- the same batches on every backend ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def pair_roots(tmp_path_factory):
    base = tmp_path_factory.mktemp("pair-parity")
    return {
        layout: make_paired_dataset(base / layout, n=12, size=40, layout=layout, val_fraction=0)
        for layout in ("folders", "side_by_side")
    }


def whole_epoch(loader, epoch: int):
    loader.set_epoch(epoch)
    batches = list(loader)
    loader.close()
    return [len(b) for b in batches], torch.cat([b.inputs for b in batches]), torch.cat([b.targets for b in batches])


@needs_dali
@pytest.mark.gpu
@pytest.mark.parametrize("layout", ["folders", "side_by_side"])
def test_dali_mixed_decode_pairs_match_cpu_mode(pair_roots, tmp_path, layout):
    """The GPU graph (mixed decode, slices of a side-by-side file on the device) cuts the CPU mode's pairs."""
    from fasttrain.data.base import InputSpec
    from fasttrain.data.dali import DaliLoader
    from fasttrain.data.samples import Samples

    cfg = p2p_cfg(pair_roots[layout], tmp_path, "data.image_size=24", "data.val_fraction=0")
    samples = Samples(discover(cfg.data).train, "pair")
    out = {}
    for device, dtype in (("cpu", torch.float32), ("cuda:0", torch.float16)):
        spec = InputSpec(torch.device(device), dtype, True, (0.5,) * 3, (0.5,) * 3)
        loader = DaliLoader(
            samples, cfg.data, spec, batch_size=4, train=True, seed=0, device_id=0 if device != "cpu" else None
        )
        out[device] = whole_epoch(loader, 1)
    assert out["cuda:0"][0] == out["cpu"][0]
    for k in (1, 2):  # nvJPEG / CUDA resampling and fp16 output: a looser bound than CPU parity
        assert (out["cuda:0"][k].float().cpu() - out["cpu"][k]).abs().flatten(1).mean(1).max() < 0.05


@pytest.mark.parametrize("backend", ["cache", pytest.param("dali", marks=needs_dali)])
@pytest.mark.parametrize("train", [False, True])
@pytest.mark.parametrize("layout", ["folders", "side_by_side"])
def test_every_backend_gives_the_torch_loaders_pairs(pair_roots, tmp_path, backend, train, layout):
    """40 px pairs at image_size 24: training resizes both to 27 and cuts the same window (and flip) from both,
    drawn per (seed, epoch, index) by every backend alike; the cache's batches are the torch loader's exactly,
    DALI's differ by resampling only."""
    cfg = p2p_cfg(pair_roots[layout], tmp_path, "data.image_size=24", "data.dali_threads=1", "data.val_fraction=0")
    src = discover(cfg.data)
    task = Pix2PixTask(cfg, Runtime(cfg.runtime), src)
    sizes, a_ref, b_ref = whole_epoch(task.make_loader(src.train, train=train, batch_size=4, backend="torch"), 3)
    got_sizes, a, b = whole_epoch(task.make_loader(src.train, train=train, batch_size=4, backend=backend), 3)
    assert got_sizes == sizes and a.shape == b.shape == (sum(sizes), 3, 24, 24)
    for got, ref in ((a, a_ref), (b, b_ref)):
        if backend == "cache":
            assert torch.equal(got, ref)
        else:
            err = (got - ref).abs()
            assert err.flatten(1).mean(1).max() < PARITY_MEAN_ABS and err.max() < PARITY_MAX_ABS


def test_a_step_updates_both_networks(paired_root, tmp_path):
    cfg = p2p_cfg(paired_root, tmp_path)
    task = Pix2PixTask(cfg, Runtime(cfg.runtime), None)
    state = task.build_state()
    before = {k: [p.detach().clone() for p in m.parameters()] for k, m in state.modules.items()}
    out = task.train_step(state, task.synthetic_batch(4, task.input_spec()))
    assert set(out) == {"loss", "d_loss", "g_gan", "g_l1"} and all(torch.isfinite(v) for v in out.values())
    for k, m in state.modules.items():
        assert any(not torch.equal(a, b) for a, b in zip(before[k], m.parameters())), k
        assert all(p.grad is None for p in m.parameters())  # cleared after each step
    assert all(p.requires_grad for p in state.modules["discriminator"].parameters())


def test_accumulation_steps_both_networks_once_per_cycle(paired_root, tmp_path):
    """The engine's step owns accumulation for pix2pix too: a first micro-batch only accumulates gradients
    (the discriminator's from its own loss alone), the last one steps both networks and clears them."""
    cfg = p2p_cfg(paired_root, tmp_path, "train.accumulation=2", "train.batch_size=4")
    task = Pix2PixTask(cfg, Runtime(cfg.runtime), None)
    state = task.build_state()
    before = {k: [p.detach().clone() for p in m.parameters()] for k, m in state.modules.items()}
    batch = task.synthetic_batch(2, task.input_spec())
    task.train_step(state, batch, update=False, loss_scale=0.5)
    for k, m in state.modules.items():
        assert all(torch.equal(a, b) for a, b in zip(before[k], m.parameters())), k  # nothing stepped yet
        assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in m.parameters()), k
    d_grads = [p.grad.clone() for p in state.modules["discriminator"].parameters()]
    task.train_step(state, batch, update=False, loss_scale=0.5)  # the same batch again: D's grads double
    for g, p in zip(d_grads, state.modules["discriminator"].parameters()):
        torch.testing.assert_close(p.grad, 2 * g)  # nothing from the generator's phase leaked into D
    task.train_step(state, batch, update=True, loss_scale=0.5)
    for k, m in state.modules.items():
        assert any(not torch.equal(a, b) for a, b in zip(before[k], m.parameters())), k
        assert all(p.grad is None for p in m.parameters())


@pytest.mark.parametrize("override,field", [("model.name=resnet18", "model.name"), ("optim.name=sgd", "optim.name")])
def test_refused_settings_name_their_field(paired_root, tmp_path, override, field):
    cfg = p2p_cfg(paired_root, tmp_path, override)
    with pytest.raises(ConfigError, match=field):
        Pix2PixTask(cfg, Runtime(cfg.runtime), None)


def test_sample_grids_run_the_uncompiled_generator(paired_root, tmp_path):
    """Four images are a shape of their own: through the compiled generator they compiled a whole U-Net once more
    on CUDA (and took one more of dynamo's eight graphs)."""
    cfg = p2p_cfg(paired_root, tmp_path)
    task = Pix2PixTask(cfg, Runtime(cfg.runtime), None)
    state = task.build_state()
    state.local["generator"] = lambda x: pytest.fail("the compiled generator ran for a sample grid")
    grid = task.sample_grid(state, task.synthetic_batch(6, task.input_spec()))
    assert grid.dim() == 3 and grid.shape[0] == 3 and grid.min() >= 0 and grid.max() <= 1  # one RGB picture


def test_side_by_side_images_that_are_not_twice_as_wide_are_warned_of(tmp_path, caplog):
    """A folder of plain photos read as side-by-side pairs trained on their halves without a word."""
    from PIL import Image

    from fasttrain.data.samples import Samples, precheck_samples

    root = make_paired_dataset(tmp_path / "p", n=6, size=32, layout="side_by_side", val_fraction=0)
    cfg = p2p_cfg(root, tmp_path)
    src = discover(cfg.data, root)
    with caplog.at_level(logging.WARNING):
        precheck_samples(Samples(src.train, "pair"), cfg.data, threads=1)
    assert "not about twice as wide" not in caplog.text  # pix2pix's own AB images
    Image.new("RGB", (40, 40)).save(src.train.paths[2])  # a photo among them
    with caplog.at_level(logging.WARNING):
        precheck_samples(Samples(src.train, "pair"), cfg.data, threads=1)
    said = f"1 of {len(src.train)} side-by-side images are not about twice as wide as tall ({src.train.paths[2]} is"
    assert f"train split: {said} 40 x 40)" in caplog.text
