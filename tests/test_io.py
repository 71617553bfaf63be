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


def test_a_full_disk_is_one_named_error_and_the_old_file_stays(tmp_path, monkeypatch):
    import errno

    import torch
    from faultfs import FaultFS

    from fasttrain.checkpoint import save_checkpoint
    from fasttrain.io import WriteError

    target = tmp_path / "ck" / "last.pt"
    save_checkpoint(target, {"state": {"w": torch.zeros(4)}})
    FaultFS(monkeypatch).disk_full(tmp_path / "ck", room=100)
    with pytest.raises(WriteError) as e:  # torch.save's own error wraps the OS's; the message gives the reason
        save_checkpoint(target, {"state": {"w": torch.ones(10_000)}})
    monkeypatch.undo()
    assert str(e.value) == (
        f"cannot write checkpoint {target}: No space left on device; the previous checkpoint {target} is intact"
    )
    assert e.value.errno == errno.ENOSPC and isinstance(e.value, OSError)
    assert torch.load(target, weights_only=True)["state"]["w"].shape == (4,)
    assert os.listdir(target.parent) == ["last.pt"]


def test_read_only_folders_give_named_errors(tmp_path, monkeypatch):
    from faultfs import FaultFS

    from fasttrain.io import WriteError, check_writable

    (tmp_path / "ro").mkdir()
    FaultFS(monkeypatch).read_only(tmp_path / "ro")
    with pytest.raises(WriteError, match=rf"cannot write {tmp_path}/ro/sub/x.json: Read-only file system"):
        write_new_text(tmp_path / "ro" / "sub" / "x.json", "{}")
    with pytest.raises(WriteError, match=r"--out: cannot write to .*/ro/a/b: Read-only file system"):
        check_writable(tmp_path / "ro" / "a" / "b", "--out")
    assert check_writable(tmp_path / "elsewhere" / "new", "--out") == tmp_path / "elsewhere" / "new"
    assert not (tmp_path / "elsewhere").exists()  # asking creates nothing
    (tmp_path / "file").write_text("x")
    with pytest.raises(WriteError, match="is not a folder"):
        check_writable(tmp_path / "file" / "sub", "--json")


def test_read_jsonl_drops_only_a_torn_last_line(tmp_path, caplog):
    import logging

    from fasttrain.io import append_jsonl, read_jsonl

    p = tmp_path / "metrics.jsonl"
    append_jsonl(p, {"epoch": 1})
    append_jsonl(p, {"epoch": 2})
    with open(p, "a") as f:
        f.write('{"epoch": 3, "lo')
    with caplog.at_level(logging.WARNING, logger="fasttrain"):
        assert read_jsonl(p) == [{"epoch": 1}, {"epoch": 2}]
    assert str(p) in caplog.text and "line 3" in caplog.text
    p.write_text('{"epoch": 1}\n{broken\n{"epoch": 3}\n')
    with pytest.raises(ValueError, match=r"metrics.jsonl:2: not a JSON record"):
        read_jsonl(p)


def test_remove_temp_files_takes_only_temp_files_of_atomic_writes(tmp_path):
    from fasttrain.io import remove_temp_files

    names = [
        ".last.pt.a1b2_c3d.tmp",
        ".metrics.jsonl.zzzzzzzz.tmp",
        "mine.tmp",
        ".last.pt.tmp",
        "last.pt",
        ".hidden.txt",
    ]
    for n in names:
        (tmp_path / n).write_text("x")
    removed = {p.name for p in remove_temp_files(tmp_path)}
    assert removed == {".last.pt.a1b2_c3d.tmp", ".metrics.jsonl.zzzzzzzz.tmp"}
    assert sorted(os.listdir(tmp_path)) == sorted(set(names) - removed)
