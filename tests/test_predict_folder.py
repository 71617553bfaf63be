"""fasttrain predict on a folder: every image file under it, recursively; bad files named, the others predicted."""

from __future__ import annotations

import json
import shutil

import pytest
from tinyrun import tiny_cfg

from fasttrain.cli import main
from fasttrain.engine import train


@pytest.fixture(scope="module")
def run_dir(shapes_root, tmp_path_factory):
    return train(tiny_cfg(shapes_root, tmp_path_factory.mktemp("runs"), epochs=1, max_steps=1), progress=False).run_dir


def test_predict_a_folder_recursively_naming_bad_files(run_dir, shapes_root, tmp_path, capsys, monkeypatch):
    import torch

    # prediction builds no optimizer (the first one imports torch._dynamo: about a second of a predict)
    monkeypatch.setattr(torch.optim.Optimizer, "__init__", lambda *a, **k: pytest.fail("built an optimizer"))
    folder = tmp_path / "photos"
    (folder / "deeper" / "still").mkdir(parents=True)
    sources = sorted((shapes_root / "val" / "circle").glob("*.png"))[:3]
    shutil.copy(sources[0], folder / "a.png")
    shutil.copy(sources[1], folder / "deeper" / "b.png")
    shutil.copy(sources[2], folder / "deeper" / "still" / "c.PNG")
    (folder / "deeper" / "broken.jpg").write_bytes(b"not a jpeg")
    (folder / "notes.txt").write_text("not an image")  # not an image file: left out, as training does
    (folder / ".hidden.png").write_bytes(b"")  # hidden: left out
    code = main(["predict", str(run_dir), str(folder), "--json", "-q"])
    out, err = capsys.readouterr()
    records = {json.loads(line)["image"]: json.loads(line) for line in out.splitlines()}
    good = [str(folder / "a.png"), str(folder / "deeper" / "b.png"), str(folder / "deeper" / "still" / "c.PNG")]
    bad = str(folder / "deeper" / "broken.jpg")
    assert sorted(records) == sorted([*good, bad])
    assert all(records[g]["class"] in ("circle", "square", "triangle") for g in good)
    assert "cannot read image" in records[bad]["error"]
    assert code == 1 and f"1 of 4 images could not be predicted: {bad}" in err


def test_predict_a_folder_without_images_says_so(run_dir, tmp_path, capsys):
    (tmp_path / "empty" / "sub").mkdir(parents=True)
    (tmp_path / "empty" / "sub" / "x.txt").write_text("x")
    code = main(["predict", str(run_dir), str(tmp_path / "empty"), "-q"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.startswith(f"fasttrain: error: predict: no image files under {tmp_path / 'empty'}")
