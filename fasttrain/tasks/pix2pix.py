"""Image -> image (pix2pix, Isola et al. 2017): a U-Net generator against a PatchGAN discriminator.

Per batch, as the reference (junyanz/pytorch-CycleGAN-and-pix2pix) does: G makes fake B from A; D steps on
(A, real B) labelled real and (A, fake B) labelled fake, its loss halved; then G steps on the adversarial loss
of (A, fake B) labelled real plus ``task.lambda_l1`` times the L1 distance to B. Each network has its own
Adam optimizer (``optim.betas``; pix2pix uses 0.5, 0.999) and its own gradient scaler. Images are normalized to
-1..1 whatever ``data.mean``/``data.std`` say, because that is the range of the generator's tanh.

Both images of a pair get the same resize, crop and flip: training resizes to ``image_size * 286 / 256`` and
crops ``image_size`` at random (the reference's jitter), evaluation resizes to ``image_size``.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from PIL import Image
from torchvision.transforms.v2 import functional as TF
from torchvision.utils import make_grid

from fasttrain.config import ConfigError
from fasttrain.data.base import Batch, InputSpec, Loader
from fasttrain.data.samples import PAIR_JITTER, Samples
from fasttrain.data.sources import Split
from fasttrain.data.transforms import resize_square
from fasttrain.io import atomic_replace, write_new
from fasttrain.models import build_model
from fasttrain.optim import make_optimizer
from fasttrain.tasks.base import TRIAL_BATCH, Task, TrainState

log = logging.getLogger(__name__)

__all__ = ["Pix2PixTask", "GENERATORS"]

GENERATORS = ("unet",)
"""Registry names that map an image to an image of the same size (model.name for pix2pix)."""
SAMPLES = 4
"""Rows in a sample grid (input | output | target)."""


def _to_image(x: torch.Tensor) -> torch.Tensor:
    """-1..1 -> 0..1, float32 on the CPU."""
    return ((x.detach().float().cpu() + 1) / 2).clamp(0, 1)


def _save_png(image: torch.Tensor, tmp: Path) -> None:
    """C x H x W in 0..1 -> PNG at ``tmp`` (the io helpers give it its final name)."""
    from torchvision.utils import save_image

    save_image(image, tmp, format="png")


class Pix2PixTask(Task):
    name = "pix2pix"
    predict_module = "generator"
    output_ndim = 4
    best_metric = "val_l1"
    higher_is_better = frozenset({"psnr"})
    sample_kind = "pair"
    train_metric_names = ("loss", "d_loss", "g_gan", "g_l1")
    cuda_graphs_refused = (
        "its step runs the discriminator's backward while the generator's is pending, and CUDA graphs free the "
        "generator's saved activations at the next compiled call"
    )

    def __init__(self, cfg, runtime, source, **settings):
        super().__init__(cfg, runtime, source, **settings)
        if cfg.model.name not in (*GENERATORS, "custom"):  # custom: a generator passed from Python
            raise ConfigError(
                f"model.name: pix2pix needs an image-to-image generator ({', '.join(GENERATORS)}), "
                f"got {cfg.model.name!r}"
            )
        if cfg.optim.name == "sgd":
            raise ConfigError(
                "optim.name: pix2pix trains both networks with Adam; set optim.name = adam "
                "(and optim.betas = [0.5, 0.999] as the reference does)"
            )
        pairs = (
            source is None
            or source.format == "paired"
            or (source.format == "shards" and source.class_names is None and source.target_names is None)
        )  # shards: fasttrain pack's of a paired dataset
        if not pairs:
            assert source is not None
            raise ConfigError(f"data.format: pix2pix needs paired images (data.format = paired), got {source.format}")

    def check(self) -> None:
        """Its settings were checked when it was made (generator, optimizer, data format)."""

    def input_spec(self) -> InputSpec:
        c = self.cfg.data.channels
        return self.runtime.input_spec([0.5] * c, [0.5] * c)  # -1..1, the tanh's range

    # -- building ---------------------------------------------------------------------------------------------
    def check_output(self, out: Any) -> None:
        """The generator's images: N x C x H x W as its input (the discriminator reads the two side by side)."""
        c, size = self.cfg.data.channels, self.cfg.data.image_size
        want = (TRIAL_BATCH, c, size, size)
        if not isinstance(out, torch.Tensor) or tuple(out.shape) != want:
            got = " x ".join(map(str, out.shape)) + " tensor" if isinstance(out, torch.Tensor) else type(out).__name__
            raise ValueError(
                f"model=: the generator returned a {got} for {TRIAL_BATCH} {c} x {size} x {size} images; task "
                f"pix2pix takes images of the same shape ({' x '.join(map(str, want))})"
            )

    def build_state(self) -> TrainState:
        c = self.cfg
        ch = c.data.channels
        gen = self.given_model() or build_model(
            c.model.name,
            in_channels=ch,
            num_outputs=ch,
            image_size=c.data.image_size,
            width=c.model.width,
            dropout=c.model.dropout,
            pretrained=c.model.pretrained and not self.restoring,
            drop_path_rate=c.model.drop_path_rate,
        )
        self.load_initial_weights(gen, "generator")
        disc = build_model(
            "patchgan", in_channels=2 * ch, num_outputs=1, image_size=c.data.image_size, width=c.model.width
        )
        fused = self.runtime.optimizer_kwargs()
        modules = {"generator": gen, "discriminator": disc}
        callables = {k: self.runtime.prepare_model(m) for k, m in modules.items()}
        training = {} if self.inference else modules  # prediction: no optimizers, no scalers
        return TrainState(
            modules,
            callables,
            {k: make_optimizer(m, c.optim, fused_kwargs=fused) for k, m in training.items()},
            {k: self.runtime.grad_scaler() for k in training},
            local={k: self.runtime.for_eval(m, callables[k]) for k, m in modules.items()},
        )

    def samples(self, split: Split) -> Samples:
        """Pairs (A, B) with the same resize, crop and flip, on any backend; both normalized to -1..1."""
        return Samples(split, "pair", jitter=PAIR_JITTER)

    # -- steps -----------------------------------------------------------------------------------------------
    @staticmethod
    def _gan_loss(logits: torch.Tensor, real: bool) -> torch.Tensor:
        logits = logits.float()
        target = torch.ones_like(logits) if real else torch.zeros_like(logits)
        return F.binary_cross_entropy_with_logits(logits, target)

    def train_phases(self, state: TrainState, batch: Batch):
        gen, disc = state.callables["generator"], state.callables["discriminator"]
        d_module = state.modules["discriminator"]
        real_a, real_b = batch.inputs, batch.targets
        with self.runtime.autocast():
            fake_b = gen(real_a)

        # Discriminator: real pairs -> 1, generated pairs -> 0 (the generator gets no gradient from this).
        d_module.requires_grad_(True)
        with self.runtime.autocast():
            pred_fake = disc(torch.cat([real_a, fake_b.detach()], 1))
            pred_real = disc(torch.cat([real_a, real_b], 1))
        d_loss = 0.5 * (self._gan_loss(pred_fake, False) + self._gan_loss(pred_real, True))
        yield "discriminator", d_loss

        # Generator: fool D and stay close to B. D is frozen (its weights get no gradient) and called without
        # its data-parallel wrapper, which would otherwise wait for gradients that never come.
        d_module.requires_grad_(False)
        try:
            with self.runtime.autocast():
                pred_fake = state.local["discriminator"](torch.cat([real_a, fake_b], 1))
            g_gan = self._gan_loss(pred_fake, True)
            g_l1 = F.l1_loss(fake_b.float(), real_b.float())
            g_loss = g_gan + self.cfg.task.lambda_l1 * g_l1
            yield "generator", g_loss
        finally:
            d_module.requires_grad_(True)
        return {"loss": g_loss.detach(), "d_loss": d_loss.detach(), "g_gan": g_gan.detach(), "g_l1": g_l1.detach()}

    def eval_metric_names(self) -> tuple[str, ...]:
        return ("l1", "psnr")

    def eval_step(self, state: TrainState, batch: Batch) -> dict[str, torch.Tensor]:
        with self.runtime.autocast():
            fake = state.local["generator"](batch.inputs)
        diff = fake.float() - batch.targets.float()
        l1 = diff.abs().mean((1, 2, 3))
        mse01 = (diff / 2).pow(2).mean((1, 2, 3)).clamp_min(1e-10)  # on the 0..1 scale
        return {
            "l1": l1.sum(),
            "psnr": (-10.0 * torch.log10(mse01)).sum(),
            "count": torch.full((), float(len(l1)), device=l1.device),  # no host->device copy: no sync
        }

    def synthetic_batch(self, batch_size: int, spec: InputSpec, train: bool = True) -> Batch:
        s, c = self.cfg.data.image_size, self.cfg.data.channels
        x, y = (torch.rand(batch_size, c, s, s, device=spec.device).mul(2).sub(1).to(spec.dtype) for _ in range(2))
        if spec.channels_last:
            x, y = (t.contiguous(memory_format=torch.channels_last) for t in (x, y))
        return Batch(x, y)

    # -- samples ---------------------------------------------------------------------------------------------
    def sample_grid(self, state: TrainState, batch: Batch) -> torch.Tensor:
        """Rows of input | output | target for the first few samples, 0..1 on the CPU (eval mode, no grad). The
        uncompiled generator: four images are a new shape, whose compile (a whole U-Net's, and one more graph
        towards dynamo's recompile limit) would cost far more than running them eagerly."""
        gen = state.modules["generator"]
        was_training = state.modules["generator"].training
        state.modules["generator"].train(False)
        try:
            a, b = batch.inputs[:SAMPLES], batch.targets[:SAMPLES]
            with torch.no_grad(), self.runtime.autocast():
                fake = gen(a)
        finally:
            state.modules["generator"].train(was_training)
        rows = torch.stack([_to_image(a), _to_image(fake), _to_image(b)], 1).flatten(0, 1)
        if rows.shape[1] == 1:
            rows = rows.expand(-1, 3, -1, -1)
        return make_grid(rows, nrow=3, padding=2, pad_value=1.0)

    def on_step_end(self, state: TrainState, batch: Batch, run_dir: Path | None) -> None:
        every = self.cfg.task.sample_every
        if run_dir is not None and every and state.step % every == 0:
            grid = self.sample_grid(state, batch)
            atomic_replace(Path(run_dir) / "samples" / f"step_{state.step:07d}.png", lambda p: _save_png(grid, p))

    def on_epoch_end(self, state: TrainState, run_dir: Path | None, val_loader: Loader | None) -> None:
        if run_dir is None or val_loader is None:
            return
        batch = next(iter(val_loader), None)
        if batch is not None:
            grid = self.sample_grid(state, batch)
            atomic_replace(
                Path(run_dir) / "samples" / f"epoch_{state.epoch + 1:04d}_val.png", lambda p: _save_png(grid, p)
            )

    # -- prediction ------------------------------------------------------------------------------------------
    def preprocess(self, image: Image.Image) -> torch.Tensor:
        return resize_square(image, self.cfg.data.image_size)

    def describe_prediction(self, output: torch.Tensor, meta: dict[str, Any]) -> dict[str, Any]:
        """Write the generated image (resized back to its input's size) as ``out_dir/<stem>_pix2pix.png``.

        ``out_dir`` defaults to ``./predictions``; existing files are never overwritten (a number is added).
        Side-by-side files are not split: pass the input images themselves.
        """
        rec: dict[str, Any] = {"size": list(output.shape[-2:])}  # [H, W] generated; the file: the input's size
        if not meta.get("image"):
            return rec
        out_dir = Path(meta.get("out_dir") or "predictions")
        w, h = meta["image_size"]
        rec["size"] = [h, w]  # what was written (it printed the generator's 256 x 256 for a 64 x 64 input)
        img = TF.resize(_to_image(output), [h, w], antialias=True).clamp(0, 1)
        dest = write_new(out_dir / f"{Path(meta['image']).stem}_pix2pix.png", lambda p: _save_png(img, p))
        rec["output"] = str(dest)
        return rec
