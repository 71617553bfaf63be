"""What a run and the commands say, line by line: the run header, a resume, a re-planned schedule, a file that is
not an image, and make-data's errors in the form of every other command's."""

from __future__ import annotations

import json
import re
import shutil

from tinyrun import tiny_cfg

from fasttrain.cli import main
from fasttrain.config import Config


def _cli_set(cfg: Config) -> list[str]:
    out = []
    for section in ("data", "model", "optim", "schedule", "train", "runtime"):
        for k, v in vars(getattr(cfg, section)).items():
            if v != vars(getattr(Config(), section))[k]:
                out += ["--set", f"{section}.{k}={json.dumps(v) if not isinstance(v, str) else v}"]
    return out


def test_header_resume_replanned_schedule_and_a_non_image(shapes_root, tmp_path, capsys):
    data = shutil.copytree(shapes_root, tmp_path / "shapes")
    (data / "train" / "circle" / "empty.png").write_bytes(b"")  # left out by the pre-check
    n_train = sum(1 for _ in (data / "train").rglob("*.png")) - 1
    n_val = sum(1 for _ in (data / "val").rglob("*.png"))
    runs = tmp_path / "runs"
    cfg = tiny_cfg(data, runs, "schedule.name=onecycle", epochs=1, max_steps=2)
    assert main(["train", *_cli_set(cfg)]) == 0
    err = capsys.readouterr().err
    # The header counts the images used, and the skipped file apart.
    assert f": {n_train} train, {n_val} val images (1 file skipped), 3 classes" in err, err
    (run,) = runs.iterdir()

    assert main(["train", "--resume", str(run), "--set", "train.epochs=2"]) == 0
    err = capsys.readouterr().err
    assert err.count("resumed from") == 1, err
    replanned = re.search(
        r"W train\.epochs 1 -> 2: the onecycle schedule is re-planned over 2 epochs; the learning rate at step 2 "
        r"goes from (\S+) to (\S+)\n",
        err,
    )
    assert replanned and float(replanned.group(1)) < float(replanned.group(2)), err  # the lr jumps: said

    text = tmp_path / "notes.png"
    text.write_text("not an image")
    assert main(["predict", str(run), str(text)]) == 1
    out = capsys.readouterr()
    assert f"{text}: error: cannot read image: not an image file Pillow can identify" in out.out
    assert "BufferedReader" not in out.out + out.err


def test_make_data_errors_have_the_prefix_and_status_of_every_command(tmp_path, capsys):
    (tmp_path / "d").mkdir()
    code = main(["make-data", "shapes", str(tmp_path / "d"), "--train-per-class", "2"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.startswith("fasttrain: error: ") and "already exists" in err, err
    # what another command says of an output that exists: the same prefix and status
    (tmp_path / "skip.txt").write_text("mine")
    code = main(["check-data", str(tmp_path / "d"), "--skip-list", str(tmp_path / "skip.txt")])
    other = capsys.readouterr().err.strip()
    assert code == 2 and other.startswith("fasttrain: error: "), other
