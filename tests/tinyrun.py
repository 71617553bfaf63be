"""The small CPU run the engine tests share: smallcnn at 32 px on the torch loader, a few steps, logged each step;
and the small image files the loader tests share."""

from __future__ import annotations

from fasttrain.config import Config, apply_overrides


def tiny_cfg(root, runs, *extra: str, epochs: int = 2, max_steps: int = 3) -> Config:
    """``extra`` overrides (``section.key=value``) come last, so they win."""
    return apply_overrides(
        Config(),
        [
            f"data.root={root}",
            "data.image_size=32",
            "data.resize_size=32",
            "data.random_resized_crop=false",
            "data.loader=torch",
            "data.workers=0",
            "model.name=smallcnn",
            "model.width=8",
            "optim.name=adamw",
            "optim.lr=0.005",
            f"train.epochs={epochs}",
            "train.batch_size=32",
            f"train.max_steps={max_steps}",
            "train.log_every=1",
            f"train.runs_dir={runs}",
            "runtime.device=cpu",
            "name=t",
            *extra,
        ],
    )


def cli_args(cfg: Config) -> list[str]:
    """``cfg``'s settings that differ from the defaults, as ``--set`` arguments for the command line."""
    import json

    out = []
    for section in ("data", "model", "optim", "train", "runtime"):
        for k, v in vars(getattr(cfg, section)).items():
            if v != vars(getattr(Config(), section))[k]:
                out += ["--set", f"{section}.{k}={json.dumps(v) if not isinstance(v, str) else v}"]
    return out


def mixed_images(folder, n: int, seed: int, sides: tuple[int, int]) -> list[str]:
    """``n`` noise images of random sizes (each side in ``sides``), JPEG and PNG alternately, named by position."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    paths = []
    for i in range(n):
        h, w = (int(v) for v in rng.integers(*sides, 2))
        p = folder / f"{i:02d}.{'jpg' if i % 2 else 'png'}"
        Image.fromarray((rng.random((h, w, 3)) * 255).astype(np.uint8)).save(p)
        paths.append(str(p))
    return paths


def reflect_shifts(shifted, plain, pad: int) -> set[tuple[int, int, int]]:
    """Every (flip, top, left) for which the C x H x W image ``shifted`` is ``plain`` reflect-padded by ``pad``, cut
    at (top, left) and perhaps mirrored (torchvision's RandomCrop(padding=pad, padding_mode='reflect'), then a
    flip): empty when it is no such shift."""
    import torch

    padded = torch.nn.functional.pad(plain[None], (pad,) * 4, mode="reflect")[0]
    h, w = plain.shape[-2:]
    found = set()
    for top in range(2 * pad + 1):
        for left in range(2 * pad + 1):
            cut = padded[:, top : top + h, left : left + w]
            for flip, candidate in ((0, cut), (1, cut.flip(-1))):
                if torch.allclose(shifted, candidate, atol=1e-5):
                    found.add((flip, top, left))
    return found


class Killed(Exception):
    """Raised from ``on_epoch_end`` by :func:`killed_and_resumed`: the run stops after that epoch's checkpoint."""


def killed_and_resumed(cfg: Config, after_epoch: int):
    """Train ``cfg`` (its runs_dir empty), kill it after epoch ``after_epoch``, resume its run folder: the resumed
    run's result."""
    from pathlib import Path

    from fasttrain.engine import train

    def kill(state, record):
        if record["epoch"] == after_epoch:
            raise Killed

    try:
        train(cfg, progress=False, on_epoch_end=kill)
    except Killed:
        pass
    else:
        raise AssertionError(f"the run ended before epoch {after_epoch} killed it")
    (run,) = Path(cfg.train.runs_dir).iterdir()
    return train(resume=run, progress=False)
