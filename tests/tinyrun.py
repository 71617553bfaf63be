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
