"""speednet: airbench94's network, its whitening layer initialised from data patches by the engine."""

from __future__ import annotations

import pytest
import torch

from fasttrain.models import build_model
from fasttrain.models.small import SpeedNet


def test_shapes_and_what_learns():
    net = build_model("speednet", in_channels=3, num_outputs=10, image_size=32, width=8)
    assert isinstance(net, SpeedNet)
    assert net(torch.randn(2, 3, 32, 32)).shape == (2, 10)
    assert net(torch.randn(2, 3, 64, 64)).shape == (2, 10)  # global max-pool: any multiple of 8
    frozen = {n for n, p in net.named_parameters() if not p.requires_grad}
    assert "whiten.weight" in frozen and "whiten.bias" not in frozen
    assert all(n.endswith(".weight") for n in frozen)  # the whitening filters and the BN scales (fixed at 1)
    with pytest.raises(ValueError, match=r"data\.image_size: speednet .* multiple of 8, got 30"):
        build_model("speednet", in_channels=3, num_outputs=10, image_size=30)


def test_the_whitening_layer_decorrelates_the_patches_it_was_fitted_on():
    torch.manual_seed(0)
    mix = torch.randn(3, 3)
    images = torch.einsum("dc,nchw->ndhw", mix, torch.randn(64, 3, 12, 12))  # correlated channels
    images = images + 0.5 * images.roll(1, dims=3)  # and correlated neighbours
    net = SpeedNet(3, 10, width=8)
    net.init_from_data(images)
    out = net.whiten(images)[:, :12]  # the first half: the whitening basis (the rest is its negation)
    out = out - net.whiten.bias[:12, None, None]
    flat = out.permute(1, 0, 2, 3).reshape(12, -1)
    cov = flat @ flat.T / flat.shape[1]
    assert torch.allclose(cov, torch.eye(12), atol=0.05)
    assert torch.equal(net.whiten.weight[12:], -net.whiten.weight[:12])


def test_the_engine_initialises_it_from_training_images(shapes_root, tmp_path, caplog):
    from fasttrain.engine import train
    from tests.tinyrun import tiny_cfg

    caplog.set_level("INFO", logger="fasttrain")
    cfg = tiny_cfg(shapes_root, tmp_path, "model.name=speednet", "optim.name=sgd", "optim.lr=0.05", epochs=1)
    result = train(cfg, progress=False)
    # every training image of the epoch (450, trimmed to whole batches of 32)
    assert "SpeedNet initialised from the patches of 448 training images" in caplog.text
    from fasttrain.checkpoint import load_checkpoint

    w = load_checkpoint(result.run_dir / "checkpoints" / "last.pt")["state"]["modules"]["model"]["whiten.weight"]
    fresh = SpeedNet(3, 3, width=8).whiten.weight
    assert not torch.allclose(w, fresh)


def test_airbench_param_groups_scale_exactly_the_batchnorm_biases():
    from fasttrain.config import OptimConfig
    from fasttrain.optim import make_optimizer

    net = SpeedNet(3, 10, width=8)
    opt = make_optimizer(net, OptimConfig(name="sgd", lr=1.5, weight_decay=0.00133, norm_bias_lr_scale=64))
    scaled = {id(p) for p in opt.param_groups[2]["params"]}
    bn_biases = {id(m.bias) for m in net.modules() if isinstance(m, torch.nn.BatchNorm2d)}
    assert scaled == bn_biases and len(bn_biases) == 6  # two per conv group; not the whitening layer's bias
    assert opt.param_groups[2]["lr"] == pytest.approx(96.0)
    # the whitening bias as airbench trains it: the first 3 epochs only, decayed as the weights are
    (limited,) = [g for g in opt.param_groups if "train_epochs" in g]
    assert limited["params"] == [net.whiten.bias] and limited["train_epochs"] == 3
    assert (limited["lr"], limited["weight_decay"]) == (1.5, 0.00133)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_a_compiled_bf16_step_has_the_eager_step_gradients(device):
    """torch.compile under bf16 autocast, as a GPU run trains it: a global max taken with torch.amax after the last
    GELU gave NaN gradients to every layer below the head from the first step (the compiled backward recomputes
    the GELU in float32 and finds no element equal to the bf16-rounded maximum it saved)."""
    import torch.nn.functional as F

    torch.manual_seed(0)
    net = SpeedNet(3, 10, width=8).to(device).to(memory_format=torch.channels_last)
    x = torch.randn(16, 3, 32, 32, device=device)
    net.init_from_data(x)
    x = x.to(torch.bfloat16).contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 10, (16,), device=device)
    grads = []
    for fn in (net, torch.compile(net, dynamic=False)):
        net.zero_grad(set_to_none=True)
        with torch.autocast(device, dtype=torch.bfloat16):
            out = fn(x)
        F.cross_entropy(out.float(), y).backward()
        grads.append({n: p.grad.float() for n, p in net.named_parameters() if p.grad is not None})
    eager, compiled = grads
    assert eager.keys() == compiled.keys() and "body.1.0.weight" in compiled
    for name, g in compiled.items():
        assert torch.isfinite(g).all(), name
        # bf16's rounding apart. By direction: a bias gradient is a sum over every pixel that mostly cancels, so
        # its length moves with rounding (the whitening bias's differed by 12% on an H200) where its direction
        # holds; a wrong or missing gradient points elsewhere.
        assert F.cosine_similarity(g.flatten(), eager[name].flatten(), dim=0) >= 0.95, name
    every = torch.cat([g.flatten() for g in compiled.values()])
    reference = torch.cat([eager[n].flatten() for n in compiled])
    assert (every - reference).norm() <= 0.1 * reference.norm()


def test_a_run_killed_after_its_second_epoch_resumes_to_the_same_weights_buffers_and_held_bias(shapes_root, tmp_path):
    """speednet with the lookahead (BN statistics pulled) and its whitening bias held after epoch 3 of 4: the
    slow statistics and the per-group rates travel in the checkpoint, so a resumed run ends where a straight one
    does, and the bias did not move in the 4th epoch."""
    from fasttrain.checkpoint import load_checkpoint
    from fasttrain.engine import train
    from tests.tinyrun import killed_and_resumed, tiny_cfg

    # A pull every 3 steps: one ends epoch 3 (3 steps each), so the held bias is its slow copy and no later pull
    # moves it (a pull after the hold starts moves a held parameter once towards its slow copy, as airbench's does).
    extra = ("model.name=speednet", "optim.name=sgd", "optim.lr=0.05", "optim.lookahead_every=3", "runtime.seed=3")

    def last(run_dir):
        return load_checkpoint(run_dir / "checkpoints" / "last.pt")["state"]["modules"]["model"]

    biases = []
    straight = train(
        tiny_cfg(shapes_root, tmp_path / "a", *extra, epochs=4),
        progress=False,
        on_epoch_end=lambda state, record: biases.append(state.modules["model"].whiten.bias.detach().clone()),
    )
    assert not torch.equal(biases[1], biases[2]) and torch.equal(biases[2], biases[3])  # held after epoch 3

    resumed = killed_and_resumed(tiny_cfg(shapes_root, tmp_path / "b", *extra, epochs=4), after_epoch=2)
    wa, wb = last(straight.run_dir), last(resumed.run_dir)
    assert set(wa) == set(wb) and all(torch.equal(wa[k], wb[k]) for k in wa), [
        k for k in wa if not torch.equal(wa[k], wb[k])
    ]
    assert any("running_mean" in k for k in wa)
