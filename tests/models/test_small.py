import pytest
import torch
from torch import nn

from fasttrain.models import build_model
from fasttrain.models.gan import unet_depth


def n_params(m: nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())


@pytest.mark.parametrize("size,channels", [(50, 1), (50, 3), (8, 1), (28, 1), (64, 3), (97, 3), (128, 1)])
def test_convnet_sizes_its_linear_layer_for_any_input(size, channels):
    net = build_model("convnet", in_channels=channels, num_outputs=2, image_size=size, width=8)
    out = net(torch.zeros(3, channels, size, size))
    assert out.shape == (3, 2)
    # No lazy (uninitialized) parameters: the optimizer, compile and checkpoints see final shapes.
    assert not any(isinstance(p, nn.parameter.UninitializedParameter) for p in net.parameters())


def test_convnet_grayscale_50px_is_the_classic_script_net():
    net = build_model("convnet", in_channels=1, num_outputs=2, image_size=50, width=32)
    convs = [m for m in net.features if isinstance(m, nn.Conv2d)]
    assert [c.out_channels for c in convs] == [32, 64, 128]
    first_linear = next(m for m in net.head if isinstance(m, nn.Linear))
    assert first_linear.in_features == 128 * 6 * 6  # 50 -> 25 -> 12 -> 6
    # Large inputs get extra blocks so the first linear layer stays bounded.
    big = build_model("convnet", in_channels=1, num_outputs=2, image_size=256, width=8)
    assert next(m for m in big.head if isinstance(m, nn.Linear)).in_features <= 8 * 2**5 * 8 * 8


def test_convnet_trains_with_an_optimizer_built_before_the_first_forward():
    torch.manual_seed(0)  # its own seed: it used to pass or fail with the RNG state earlier tests left
    net = build_model("convnet", in_channels=1, num_outputs=3, image_size=20, width=4)
    opt = torch.optim.AdamW(net.parameters(), lr=1e-2)
    x, y = torch.randn(16, 1, 20, 20), torch.randint(0, 3, (16,))
    losses = []
    for _ in range(20):
        loss = nn.functional.cross_entropy(net(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] * 0.5


def test_mlp_for_8x8_digits():
    net = build_model("mlp", in_channels=1, num_outputs=10, image_size=8, width=16, dropout=0.1)
    assert net(torch.zeros(5, 1, 8, 8)).shape == (5, 10)
    assert isinstance(net[1], nn.Linear) and net[1].in_features == 64 and net[1].out_features == 64


@pytest.mark.parametrize("size,depth", [(64, 6), (128, 7), (256, 8), (96, 5), (512, 8)])
def test_unet_depth_follows_the_image_size(size, depth):
    assert unet_depth(size) == depth


def test_unet_refuses_sizes_it_cannot_halve():
    with pytest.raises(ValueError, match="data.image_size"):
        unet_depth(50)


@pytest.mark.parametrize("size", [64, 128])
def test_unet_maps_images_to_images_in_tanh_range(size):
    g = build_model("unet", in_channels=3, num_outputs=3, image_size=size, width=4, dropout=0.5)
    y = g(torch.randn(2, 3, size, size) * 3)
    assert y.shape == (2, 3, size, size)
    assert y.abs().max() <= 1.0


def test_unet_at_256_matches_the_reference_size():
    g = build_model("unet", in_channels=3, num_outputs=3, image_size=256, width=64)
    assert abs(n_params(g) - 54.41e6) < 0.01e6  # pytorch-CycleGAN-and-pix2pix unet_256: 54.414M


def test_patchgan_is_the_70px_discriminator():
    d = build_model("patchgan", in_channels=6, num_outputs=1, image_size=256, width=64)
    assert abs(n_params(d) - 2.769e6) < 0.001e6  # the reference's basic D: 2.769M
    assert d(torch.zeros(1, 6, 256, 256)).shape == (1, 1, 30, 30)
    small = build_model("patchgan", in_channels=2, num_outputs=1, image_size=64, width=8)
    assert small(torch.zeros(2, 2, 64, 64)).shape == (2, 1, 6, 6)
