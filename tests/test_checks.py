import hashlib

import pytest
from PIL import Image

from fasttrain.cli import main
from fasttrain.data.checks import check_data


def _tree(root):
    (root / "a").mkdir(parents=True)
    Image.new("RGB", (16, 16), (1, 2, 3)).save(root / "a" / "ok.jpg")
    Image.new("RGBA", (16, 16)).save(root / "a" / "alpha.png")
    Image.new("RGB", (16, 16)).save(root / "a" / "really_png.jpg", format="PNG")
    good = root / "a" / "ok2.jpg"
    Image.new("RGB", (64, 64), (9, 9, 9)).save(good, quality=95)
    (root / "a" / "truncated.jpg").write_bytes(good.read_bytes()[:200])
    (root / "a" / "empty.png").write_bytes(b"")
    (root / "a" / "notes.txt").write_text("not an image")


def _digest(root):
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(root.rglob("*")) if p.is_file()}


def test_check_data_reports_bad_and_odd_and_touches_nothing(tmp_path):
    root = tmp_path / "data"
    _tree(root)
    before = _digest(root)
    report = check_data(root, skip_list=tmp_path / "skip.txt")
    assert report.total == 6  # notes.txt is not an image
    bad = {p.rsplit("/", 1)[1]: why for p, why in report.bad}
    assert set(bad) == {"truncated.jpg", "empty.png"}
    assert bad["empty.png"] == "empty file"
    odd = {p.rsplit("/", 1)[1]: why for p, why in report.odd}
    assert "mode RGBA" in odd["alpha.png"] and "PNG data in a .jpg file" in odd["really_png.jpg"]
    assert sorted((tmp_path / "skip.txt").read_text().split()) == sorted(p for p, _ in report.bad)
    assert _digest(root) == before
    with pytest.raises(FileExistsError):  # the skip list is never overwritten
        check_data(root, skip_list=tmp_path / "skip.txt")


def test_check_data_cli_exit_code(tmp_path, capsys):
    root = tmp_path / "data"
    _tree(root)
    assert main(["check-data", str(root)]) == 1
    out = capsys.readouterr().out
    assert "2 unreadable" in out and "truncated.jpg" in out
    clean = tmp_path / "clean" / "c"
    clean.mkdir(parents=True)
    Image.new("RGB", (16, 16)).save(clean / "x.png")
    assert main(["check-data", str(tmp_path / "clean")]) == 0
