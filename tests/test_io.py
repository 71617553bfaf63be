import os

import pytest

from fasttrain.io import atomic_replace, atomic_write_text, write_new, write_new_text


def test_write_new_never_overwrites(tmp_path):
    a = write_new_text(tmp_path / "x.tuned.toml", "one")
    b = write_new_text(tmp_path / "x.tuned.toml", "two")
    assert a.name == "x.tuned.toml" and b.name == "x.tuned-2.toml"
    assert a.read_text() == "one" and b.read_text() == "two"
    assert not list(tmp_path.glob(".*tmp"))  # no temp file left behind
    assert oct(a.stat().st_mode & 0o777) != oct(0o600)  # the user's usual mode, not mkstemp's


def test_atomic_replace_keeps_the_old_file_when_writing_fails(tmp_path):
    target = tmp_path / "sub" / "last.pt"
    atomic_write_text(target, "good")

    def fail(p):
        p.write_text("half")
        raise RuntimeError("killed mid-write")

    with pytest.raises(RuntimeError):
        atomic_replace(target, fail)
    assert target.read_text() == "good"
    assert os.listdir(target.parent) == ["last.pt"]
    atomic_write_text(target, "newer")  # replacing is what checkpoints want
    assert target.read_text() == "newer"


def test_write_new_leaves_nothing_when_writing_fails(tmp_path):
    with pytest.raises(ValueError):
        write_new(tmp_path / "r.json", lambda p: (_ for _ in ()).throw(ValueError("no")))
    assert os.listdir(tmp_path) == []
