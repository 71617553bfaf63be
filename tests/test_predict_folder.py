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


def test_arguments_swapped_or_a_file_that_is_no_checkpoint_are_named_for_what_they_are(
    run_dir, shapes_root, tmp_path, capsys
):
    """An image, a config or an empty file where the checkpoint goes was "refused: it holds pickled Python
    objects, which could run code"."""
    image = str(next(shapes_root.rglob("*.png")))
    code = main(["predict", image, str(run_dir), "-q"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and f"{image} is an image where the checkpoint or run folder goes" in err, err
    assert f"(fasttrain predict {run_dir} {image} ...)" in err
    renamed = tmp_path / "weights.pt"
    shutil.copy(image, renamed)
    for path, what in [
        (renamed, "it is a PNG image"),
        (run_dir / "config.toml", "it is a text file (a config: train with it, or give its run folder)"),
    ]:
        assert main(["predict", str(path), image, "-q"]) == 2
        assert f"checkpoint {path}: not a fasttrain checkpoint: {what}" in capsys.readouterr().err
    (tmp_path / "empty.pt").write_bytes(b"")
    assert main(["predict", str(tmp_path / "empty.pt"), image, "-q"]) == 2
    assert "not a fasttrain checkpoint: it is empty" in capsys.readouterr().err
    code = main(["train", "--resume", str(run_dir / "config.toml"), "-q"])
    assert code != 0 and f"its run folder: --resume {run_dir}" in capsys.readouterr().err
