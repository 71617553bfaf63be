"""fasttrain lr-find: the exponential sweep, the smoothed loss, the steepest-descent suggestion, the files."""

from __future__ import annotations

import json
import math

import pytest
from PIL import Image

from fasttrain.cli import main
from fasttrain.lr_find import smooth, suggest


def test_smoothing_is_debiased():
    assert smooth([3.0, 3.0, 3.0], 0.9) == pytest.approx([3.0, 3.0, 3.0])  # no pull towards 0 at the start
    assert smooth([1.0, 3.0], 0.5) == pytest.approx([1.0, (0.25 * 1 + 0.5 * 3) / 0.75])


def test_the_suggestion_is_the_steepest_fall():
    lrs = [1e-6 * 10 ** (i / 10) for i in range(60)]
    curve = [2.0 - math.tanh((i - 33) / 4) for i in range(60)]  # falls fastest at index 33
    assert suggest(lrs, curve) == lrs[33]
    assert suggest(lrs[:12], curve[:12]) is None  # too short once the first 10 are left out


def test_lr_find_sweeps_until_the_loss_diverges_and_writes_only_its_files(shapes_root, tmp_path, capsys):
    config = tmp_path / "my.toml"
    config.write_text(
        f'[data]\nroot = "{shapes_root}"\nimage_size = 32\nresize_size = 32\nloader = "torch"\nworkers = 0\n'
        '[model]\nname = "smallcnn"\nwidth = 8\n[optim]\nname = "adamw"\nlr = 0.005\n'
        f'[train]\nbatch_size = 16\nruns_dir = "{tmp_path / "runs"}"\n[runtime]\ndevice = "cpu"\n'
    )
    before = config.read_bytes()
    code = main(["lr-find", str(config), "--start-lr", "1e-5", "--end-lr", "1e5", "--steps", "30", "-q"])
    out = capsys.readouterr().out
    (folder,) = (tmp_path / "runs").iterdir()
    assert folder.name.startswith("lr-find-my-") and sorted(p.name for p in folder.iterdir()) == [
        "lr_find.json",
        "lr_find.png",
    ]
    assert config.read_bytes() == before  # the user's config is not touched
    r = json.loads((folder / "lr_find.json").read_text())
    n = len(r["lrs"])
    assert 12 <= n < 30 and ("passed 4 x its lowest" in r["reason"] or "not finite" in r["reason"])  # diverged
    assert len(r["losses"]) == len(r["smoothed"]) == n
    ratios = [b / a for a, b in zip(r["lrs"], r["lrs"][1:])]
    assert ratios == pytest.approx([(1e5 / 1e-5) ** (1 / 29)] * (n - 1))  # exponential, start to end in 30 steps
    assert r["smoothed"] == pytest.approx(smooth(r["losses"], 0.98))
    assert r["suggestion"] == suggest(r["lrs"], r["smoothed"]) and r["suggestion"] in r["lrs"]
    assert code == 0 and f"try --set optim.lr={r['suggestion']:.3g}" in out
    with Image.open(folder / "lr_find.png") as png:
        assert png.format == "PNG"


def test_lr_find_refuses_bad_flags(capsys):
    assert main(["lr-find", "--start-lr", "1", "--end-lr", "0.1"]) == 2
    assert "lr-find --end-lr: must be above --start-lr" in capsys.readouterr().err
